"""Which nodes of an ONNX graph TensorRT's ONNX parser (TensorRT 10) cannot build.

A static check from the parser's documented operator matrix and restrictions; it cannot replace
building an engine on a GPU, but it catches what would stop the parser before anyone gets there.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from .plugin_onnx import DOMAIN as PLUGIN_DOMAIN
from .plugin_onnx import KERNEL_PLUGIN_OPS, PLUGIN_OPS

# Operators the TensorRT 10 ONNX parser imports natively (opsets 9 to 20).
NATIVE = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization GRU HardSigmoid HardSwish Identity If
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean Min Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
Trilu Unsqueeze Where Xor
""".split())

MAX_TOPK = 3840
MIN_OPSET, MAX_OPSET = 9, 20
# inputs that the parser needs as initializers / constants: (op, input index)
CONSTANT_INPUTS = {("TopK", 1), ("CumSum", 1), ("Slice", 3), ("Squeeze", 1), ("Unsqueeze", 1)}


@dataclass
class Finding:
    node: str
    op_type: str
    problem: str
    blocking: bool  # False: served by a plugin TensorRT ships, or a note

    def __str__(self) -> str:
        return f"{'ERROR' if self.blocking else 'note '} {self.op_type:<16} {self.node}: {self.problem}"


def _constants(graph: onnx.GraphProto, outer: dict | None = None) -> dict[str, onnx.TensorProto]:
    values = dict(outer or {})
    values.update({init.name: init for init in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = attribute.t
    return values


def check_tensorrt(model: onnx.ModelProto) -> list[Finding]:
    findings: list[Finding] = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and not MIN_OPSET <= opset.version <= MAX_OPSET:
            findings.append(Finding("(model)", "opset", f"opset {opset.version} is outside TensorRT 10's "
                                                        f"{MIN_OPSET}..{MAX_OPSET}", True))
    _check_graph(model.graph, _constants(model.graph), findings)
    return findings


def _check_graph(graph: onnx.GraphProto, constants: dict, findings: list[Finding]) -> None:
    """The nodes of ``graph``, and of the graphs inside them (Loop bodies, If branches)."""
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == PLUGIN_DOMAIN and node.op_type in PLUGIN_OPS:
            if PLUGIN_OPS[node.op_type].name in KERNEL_PLUGIN_OPS:
                findings.append(Finding(node.name, node.op_type, "tokencompile TensorRT plugin (export --format trt "
                                        "--plugins --plugin-dir DIR loads it)", False))
            else:
                findings.append(Finding(node.name, node.op_type, "tokencompile plan plugin without a TensorRT "
                                        "kernel: export --format trt --plugins writes plans in standard ops", True))
            continue
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(node.name, node.op_type, f"custom domain {node.domain!r}: needs a TensorRT "
                                    "plugin registered under this op name", True))
            continue
        if node.op_type not in NATIVE:
            findings.append(Finding(node.name, node.op_type, "not supported by TensorRT's ONNX parser", True))
            continue
        for op_type, index in CONSTANT_INPUTS:
            if node.op_type == op_type and len(node.input) > index and node.input[index] \
                    and node.input[index] not in constants:
                findings.append(Finding(node.name, node.op_type, f"input {index} must be a constant", True))
        if node.op_type == "TopK":
            if attrs.get("sorted", 1) != 1:
                findings.append(Finding(node.name, "TopK", "sorted=0 is not supported", True))
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if k is not None and int(onnx.numpy_helper.to_array(k).reshape(-1)[0]) > MAX_TOPK:
                findings.append(Finding(node.name, "TopK", f"k > {MAX_TOPK}", True))
        if node.op_type == "ScatterElements" and attrs.get("reduction", b"none") not in (b"none", "none"):
            findings.append(Finding(node.name, node.op_type, "reduction is served by TensorRT's ScatterElements "
                                    "plugin (int64 indices; no BF16)", False))
        if node.op_type == "Loop":
            findings.append(Finding(node.name, node.op_type, "a loop: TensorRT restricts the layers inside loops "
                                    "(the support matrix's flow-control section); only building the engine "
                                    "confirms it", False))
        for attribute in node.attribute:
            for body in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                _check_graph(body, _constants(body, constants), findings)
