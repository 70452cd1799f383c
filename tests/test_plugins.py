"""Plugin-form ONNX (runs in ONNX Runtime via onnxruntime-extensions), TensorRT glue, doctor, GPU kit."""

import os
import sys

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from models import RECIPES
from tokencompile.cli import main
from tokencompile.errors import TokenCompileError
from tokencompile.lowering import tensorrt_build as tb
from tokencompile.lowering.onnx_export import export_onnx, ort_feeds, ort_session
from tokencompile.lowering.plugin_onnx import (
    DOMAIN,
    PLUGIN_OPS,
    export_plugin_onnx,
    plugin_output_dtypes,
    plugin_output_shapes,
    plugin_session,
)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_validation

tc = torch.ops.tokencompile
HAS_TENSORRT = any(name == "TensorRT" and usable for name, usable, _ in tb.doctor())


def _plugin_nodes(model):
    return [node for node in model.graph.node if node.domain == DOMAIN]


def _check_plugin_graph(model, program):
    nodes = _plugin_nodes(model)
    expected = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("tokencompile."):
            op_type = next((op.op_type for op in PLUGIN_OPS.values() if op.name == str(node.target).split(".")[1]),
                           None)
            if op_type is not None:  # ops without a plugin (route_plan, ...) stay in standard ops
                expected[op_type] = expected.get(op_type, 0) + 1
    got = {}
    for node in nodes:
        got[node.op_type] = got.get(node.op_type, 0) + 1
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"tokencompile" and attrs["plugin_version"] == b"1"
        op = PLUGIN_OPS[node.op_type]
        assert set(attrs) == {*op.attrs, "plugin_namespace", "plugin_version"}
        assert len(node.input) == len(op.inputs)
    assert got == expected and got
    # no standard-op subgraph of a token op is left: every node in a token scope is a plugin node
    leftovers = [n.name for n in model.graph.node if n.domain != DOMAIN and "token_reduction/" in n.name
                 and n.name.split("/")[1].rstrip("_0123456789") in {op.name for op in PLUGIN_OPS.values()}]
    assert not leftovers, leftovers[:5]


def _compare_with_standard(result, name, tmp_path, batches=(1, 3)):
    example = RECIPES[name].example_inputs(2)
    plugin_path, standard_path = str(tmp_path / f"{name}.plugins.onnx"), str(tmp_path / f"{name}.onnx")
    info = export_plugin_onnx(result.program, plugin_path, example)
    export_onnx(result.program, standard_path, example)
    model = onnx.load(plugin_path)
    _check_plugin_graph(model, result.program)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    plugins, standard = plugin_session(plugin_path), ort_session(standard_path)
    for batch in batches:
        inputs = RECIPES[name].example_inputs(batch)
        got = plugins.run(None, ort_feeds(plugins, inputs))
        want = standard.run(None, ort_feeds(standard, inputs))
        assert gpu_validation.max_abs_error(got, want) <= 1e-5
    return info


@pytest.mark.parametrize("name", [pytest.param("vit_small", marks=pytest.mark.slow), "hf_bert"])
def test_plugin_onnx_matches_standard_ops(optimized, name, tmp_path):
    info = _compare_with_standard(optimized(name, 0.5), name, tmp_path)
    assert info.plugin_nodes["TcTomePlan"] > 0 and info.plugin_nodes["TcMergeTokens"] > 0


@pytest.mark.parametrize("method", ["pitome", "tofu"])
def test_ops_without_plugins_stay_standard(method, tmp_path):
    """Methods with their own plan ops (route_plan, max_tokens) export in plugin form too."""
    import tokencompile
    from tokencompile.compiler import export_module

    from test_passes import Tiny

    torch.manual_seed(0)
    tokens = torch.randn(2, 15, 32)
    result = tokencompile.optimize(export_module(Tiny().eval(), (tokens,)), schedule=[2, 3, 3], method=method)
    plugin_path, standard_path = str(tmp_path / "p.onnx"), str(tmp_path / "s.onnx")
    export_plugin_onnx(result.program, plugin_path, (tokens,))
    export_onnx(result.program, standard_path, (tokens,))
    _check_plugin_graph(onnx.load(plugin_path), result.program)
    plugins, standard = plugin_session(plugin_path), ort_session(standard_path)
    inputs = (torch.randn(3, 15, 32),)
    got = plugins.run(None, ort_feeds(plugins, inputs))
    assert gpu_validation.max_abs_error(got, standard.run(None, ort_feeds(standard, inputs))) <= 1e-5


@pytest.mark.slow
def test_plugin_onnx_minilm_real_weights(optimized, tmp_path):
    _compare_with_standard(optimized("minilm", 0.5), "minilm", tmp_path)


class _AllOps(torch.nn.Module):
    def forward(self, x, valid, mask):
        rep, src, dst = tc.tome_plan(x, valid, 3, 1, True)
        sizes = x[..., 0].abs() + 1
        k_rep, k_src, k_dst = tc.topk_plan(x[..., 1], None, 5, 1, False, True)
        return (tc.merge_tokens(x, sizes, rep, src, dst), tc.sum_tokens(sizes, rep, src, dst),
                tc.gather_tokens(mask, rep, 2), tc.gather_tokens(valid, k_rep, 1), k_src, k_dst)


def _all_ops_program():
    x, valid = torch.randn(2, 10, 4), torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    mask = valid[:, None, :, None] & valid[:, None, None, :]
    batch = torch.export.Dim("batch")
    program = torch.export.export(_AllOps(), (x, valid, mask), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    return program, (x, valid, mask)


def test_every_op_as_plugin_and_tensorrt_preparation(tmp_path):
    program, inputs = _all_ops_program()
    path = str(tmp_path / "ops.onnx")
    export_plugin_onnx(program, path, inputs)
    model = onnx.load(path)
    topk = next(n for n in _plugin_nodes(model) if n.op_type == "TcTopkPlan")
    assert list(topk.input)[1] == ""  # an absent valid is an empty-name input
    want = program.module()(*inputs)
    for candidate in (model, tb.prepare_for_tensorrt(model)):  # the TensorRT graph edit keeps the results
        session = plugin_session(candidate)
        got = session.run(None, ort_feeds(session, inputs))
        assert gpu_validation.max_abs_error(got, [w.float() for w in want]) == 0
    prepared = tb.prepare_for_tensorrt(model)
    assert all(all(_plugin_nodes(prepared)[i].input) for i in range(len(_plugin_nodes(prepared))))
    partial = str(tmp_path / "partial.onnx")
    export_plugin_onnx(program, partial, inputs, plugin_ops={"merge_tokens", "sum_tokens", "gather_tokens"})
    assert {n.op_type for n in _plugin_nodes(onnx.load(partial))} == {"TcMergeTokens", "TcSumTokens",
                                                                        "TcGatherTokens"}


@pytest.mark.parametrize("case", [
    ("tome_plan", lambda: (torch.randn(3, 11, 4), None), (4, 1, False)),
    ("topk_plan", lambda: (torch.randn(3, 11), torch.ones(3, 11, dtype=torch.bool)), (6, 1, True, True)),
    ("merge_tokens", lambda: (torch.randn(3, 11, 4), torch.ones(3, 11), *_plan()), ()),
    ("sum_tokens", lambda: (torch.ones(3, 11), *_plan()), ()),
    ("gather_tokens", lambda: (torch.randn(1, 5, 11, 7), _plan()[0]), (2,)),
    ("gather_tokens", lambda: (torch.ones(3, 11, dtype=torch.bool), _plan()[0]), (1,)),
])
def test_output_shapes_and_dtypes_match_fake_kernels(case):
    name, make, ints = case
    op = next(o for o in PLUGIN_OPS.values() if o.name == name)
    tensors = make()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = getattr(tc, name)(*tensors, *ints)
    fake = fake if isinstance(fake, tuple) else (fake,)
    attrs = dict(zip(op.attrs, ints))
    shapes = [list(t.shape) if t is not None else None for t in tensors]
    assert plugin_output_shapes(op.op_type, shapes, attrs) == [list(f.shape) for f in fake]
    dtypes = [t.dtype if t is not None else None for t in tensors]
    assert plugin_output_dtypes(op.op_type, dtypes, torch.int64) == [f.dtype for f in fake]


def _plan():
    return tc.tome_plan(torch.randn(3, 11, 4), None, 4, 1, False)


MERGE_ENTRY = {"name": "merge_tokens_fp32", "entry": "merge_tokens_kernel", "ptx": "m.ptx",
               "params": [{"name": n, "type": t} for n, t in [
                   ("x_ptr", "*fp32"), ("weight_ptr", "*fp32"), ("rep_ptr", "*i64"), ("src_ptr", "*i64"),
                   ("dst_ptr", "*i64"), ("N", "i32"), ("C", "i32"), ("n_out", "i32"), ("m", "i32"),
                   ("out_ptr", "*fp32")]],
               "grid": ["B", "n_out", "cdiv(C, 128)"], "threads_per_block": 128, "shared_bytes": 0}


def test_kernel_launch_recipe():
    shapes = [[8, 197, 384], [8, 197], [8, 101], [8, 96], [8, 96]]
    dims = tb.kernel_dims("TcMergeTokens", shapes, {})
    assert dims == {"B": 8, "n_out": 101, "N": 197, "m": 96, "C": 384}
    assert [tb.evaluate_launch(g, dims) for g in MERGE_ENTRY["grid"]] == [8, 101, 3]
    assert tb.abi_problems(MERGE_ENTRY, 5, 1) == []
    assert tb.scalar_params(MERGE_ENTRY) == ["N", "C", "n_out", "m"]
    today = dict(MERGE_ENTRY, params=MERGE_ENTRY["params"][:5] + MERGE_ENTRY["params"][9:] + MERGE_ENTRY["params"][
        5:9] + [{"name": "global_scratch", "type": "*i8"}, {"name": "profile_scratch", "type": "*i8"}])
    assert len(tb.abi_problems(today, 5, 1)) == 2
    gather = tb.kernel_dims("TcGatherTokens", [[1, 4, 197, 197], [8, 101]], {"dim": 2})
    assert gather == {"B": 8, "n_out": 101, "outer": 4, "N": 197, "inner": 197, "t_batch_stride": 0}
    assert tb.kernel_name("TcGatherTokens", "bool", [[8, 197], [8, 101]], {"dim": 1}) == "gather_tokens_b1_flat"
    assert tb.kernel_name("TcSumTokens", "float16") == "sum_tokens_fp16"
    with pytest.raises(TokenCompileError, match="standard ops"):
        tb.check_engine_plugins(["TcMergeTokens", "TcTomePlan"])
    tb.check_engine_plugins(["TcMergeTokens", "TcGatherTokens"])


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the behaviour without TensorRT")
def test_cli_trt_and_doctor_without_tensorrt(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["export", "missing.pt2", "--format", "trt", "-o", str(tmp_path / "m.engine")])
    assert out.exit_code == 2
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "TensorRT" in lines[0] and "Traceback" not in out.output
    out = runner.invoke(main, ["doctor"])
    assert out.exit_code == 0
    rows = {line[4:28].strip(): line[:3].strip() for line in out.output.splitlines()}
    assert rows["ONNX Runtime CPU"] == "ok" and rows["TensorRT"] == "no" and rows["onnxruntime-extensions"] == "ok"
    assert set(rows) == {name for name, _ in tb.BACKENDS}
    with pytest.raises(TokenCompileError, match="TensorRT"):
        tb.build_engine("x.onnx", str(tmp_path / "x.engine"))
    assert gpu_validation.main(["--models", "vit_small"]) == 2


def test_cli_export_plugins_verify(optimized, tmp_path):
    path = tmp_path / "bert.tc.pt2"
    torch.export.save(optimized("hf_bert", 0.5).program, str(path))
    out = CliRunner().invoke(main, ["export", str(path), "--plugins", "--verify", "-o", str(tmp_path / "b.onnx")])
    assert out.exit_code == 0, out.output
    assert "TcTomePlan" in out.output and "verify batch 8" in out.output and "FAILED" not in out.output


@pytest.mark.slow  # about 13 s: the default run keeps its 15-minute margin
def test_validation_kit_cpu_parts(recipe, optimized, tmp_path):
    case = gpu_validation.prepare_case("hf_bert", 1.0, recipe("hf_bert")[1])
    assert case.flops_ratio == 1.0 and case.skipped is None
    half = gpu_validation.Case("hf_bert", 0.5, optimized("hf_bert", 0.5).program,
                               RECIPES["hf_bert"].example_inputs(2), 0.48)
    paths = gpu_validation.export_forms(half, str(tmp_path))
    assert set(paths) == {"standard", "plugins"}
    assert {n.op_type for n in _plugin_nodes(onnx.load(paths["plugins"]))} <= {"TcMergeTokens", "TcSumTokens",
                                                                                "TcGatherTokens"}
    assert gpu_validation.max_abs_error([np.ones(3)], [np.ones(3) + 0.5]) == 0.5
    rows = [gpu_validation.Row("vit_small", 8, 1.0, 1.0, {"original": 10.0}, {"standard": 1e-6}),
            gpu_validation.Row("vit_small", 8, 0.5, 0.49, {"original": 10.0, "standard": 6.0, "plugins": 5.0},
                               {"standard": 2e-6, "plugins": 3e-6}),
            gpu_validation.Row("minilm", 32, 0.25, note="budget not reachable")]
    table = gpu_validation.format_table(rows).splitlines()
    assert len(table) == 5 and all(line.count("|") == 13 for line in table)
    assert "1.67x" in table[3] and "2.00x" in table[3] and "ViT-S/16" in table[2]
    assert "budget not reachable" in table[4]
