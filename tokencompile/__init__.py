"""tokencompile: a compiler that makes transformers faster by processing fewer tokens.

Importing the package registers the ``tokencompile::`` custom ops, which optimized programs need
when they are loaded (``torch.export.load``) in a fresh process.
"""

from . import (
    kernels,  # noqa: F401  (on CUDA tensors the ops run as fused Triton kernels)
    ops,  # noqa: F401  (registers torch.ops.tokencompile.*)
)
from .analysis import ModelAnalysis, analyse
from .compiler import OptimizeResult, optimize
from .errors import TokenCompileError, UnsupportedModelError
from .load import load_program
from .outputs import save_program

__all__ = ["ModelAnalysis", "OptimizeResult", "TokenCompileError", "UnsupportedModelError", "analyse",
           "load_program", "optimize", "save_program"]
__version__ = "0.1.0"
