"""Fused Triton kernels for the token-reduction ops (see ``triton_kernels``) and their ahead-of-time
compilation to PTX/cubin (see ``aot``).

Importing this package is cheap and works without Triton. When Triton is installed it registers, for
the ``cuda`` dispatch key only, thin launchers that import Triton and the kernels on their first call.
CPU keeps the PyTorch reference in ``tokencompile.ops``.
"""

from __future__ import annotations

import importlib.util

import torch

from .. import ops  # noqa: F401  (defines the custom ops registered below)

# op name -> launcher name in triton_kernels (same signature and outputs as the op)
CUDA_LAUNCHERS = {
    "tokencompile::tome_plan": "tome_plan",
    "tokencompile::merge_tokens": "merge_tokens",
    "tokencompile::sum_tokens": "sum_tokens",
    "tokencompile::gather_tokens": "gather_tokens",
}


def triton_available() -> bool:
    """Whether Triton can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _lazy_launcher(name: str):
    def launch(*args, **kwargs):
        from . import triton_kernels
        return getattr(triton_kernels, name)(*args, **kwargs)
    launch.__name__ = launch.__qualname__ = name
    return launch


def register_cuda_kernels() -> None:
    """Make the Triton launchers the CUDA implementation of the custom ops (idempotent)."""
    for op_name, launcher in CUDA_LAUNCHERS.items():
        torch.library.register_kernel(op_name, "cuda", _lazy_launcher(launcher))


if triton_available():
    register_cuda_kernels()
