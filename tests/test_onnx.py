"""ONNX lowering: standard ops only, dynamic batch, ONNX Runtime parity, TensorRT readiness."""

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper

import tokencompile
from models import RECIPES, text_inputs
from tokencompile.cli import main
from tokencompile.errors import TokenCompileError
from tokencompile.lowering.onnx_export import (
    export_onnx,
    ort_feeds,
    ort_session,
    verify_onnx,
)
from tokencompile.lowering.onnx_ops import translation_table
from tokencompile.lowering.onnx_optimize import optimize_onnx, single_output_rules
from tokencompile.lowering.tensorrt_check import check_tensorrt

MODELS = ["vit_small", "deit_small_distilled", "hf_vit", "hf_bert", "hf_bert_eager", "minilm"]
tc = torch.ops.tokencompile


def _inputs(name, batch):
    example = RECIPES[name].example_inputs(2)
    if name in ("hf_bert", "hf_bert_eager", "minilm"):
        return text_inputs(batch, example[0].shape[1], seed=11)
    return (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)),)


def _export_and_check(result, name, tmp_path):
    path = str(tmp_path / f"{name}.onnx")
    info = export_onnx(result.program, path, _inputs(name, 2))  # runs onnx.checker full_check
    model = onnx.load(path)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}   # standard ops only
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not [f for f in check_tensorrt(model) if f.blocking]
    rows = verify_onnx(result.program, path, [_inputs(name, 1), _inputs(name, 8)])
    assert all(row["max_abs_error"] <= 1e-4 for row in rows), rows
    return info, model


# the default run keeps one ViT and one padded BERT at 0.5; the other models run in the slow set (with every
# model at the other budgets), to keep the default run near 15 minutes
@pytest.mark.parametrize("name", [name if name in ("vit_small", "hf_bert") else
                                  pytest.param(name, marks=pytest.mark.slow) for name in MODELS])
def test_onnx_parity_budget_half(optimized, name, tmp_path):
    info, model = _export_and_check(optimized(name, 0.5), name, tmp_path)
    assert info.token_op_nodes > 0
    names = [node.name for node in model.graph.node]
    assert any(".token_reduction/tome_plan" in n for n in names)    # recognisable in Netron
    assert "ScatterND" not in info.op_counts


@pytest.mark.sweep  # budget 0.5 runs on every model above
@pytest.mark.parametrize("budget", [1.0, 0.75, 0.25])
@pytest.mark.parametrize("name", MODELS)
def test_onnx_parity_other_budgets(optimized, name, budget, tmp_path):
    _export_and_check(optimized(name, budget), name, tmp_path)


class _AllOps(torch.nn.Module):
    def __init__(self, use_valid, ab_order=False):
        super().__init__()
        self.use_valid, self.ab_order = use_valid, ab_order
        self.table = torch.nn.Parameter(torch.randn(1, 12, 3))

    def forward(self, x, valid):
        rep, src, dst = tc.tome_plan(x, valid if self.use_valid else None, 4, int(self.ab_order), self.use_valid,
                                     self.ab_order)
        sizes = x[..., 0].abs() + 1
        merged = tc.merge_tokens(x, sizes, rep, src, dst)
        mask = valid[:, None, :, None] & valid[:, None, None, :]
        score = x[..., 1]
        plans = [tc.topk_plan(score, valid if self.use_valid else None, 6, 2, self.use_valid, fuse)
                 for fuse in (False, True)]
        # the ops of methods that pick pairs themselves: route 3 tokens, drop one of them
        removed = src[:, :3]
        target = torch.cat([rep[:, 1:3], torch.full_like(rep[:, :1], -1)], dim=1)
        routed = tc.route_plan(removed, target, x.shape[1])
        prefix = 1 if self.use_valid else 0   # without protected tokens the greedy starts from the mean
        ranks = tc.farthest_point_rank(x, valid if self.use_valid else None, 7, prefix, self.use_valid)
        return (merged, tc.sum_tokens(sizes, rep, src, dst), tc.gather_tokens(self.table, rep, 1),
                tc.gather_tokens(tc.gather_tokens(mask, rep, 2), rep, 3), *plans[0], *plans[1],
                tc.merge_tokens(x, sizes, *plans[1]), *routed, tc.max_tokens(sizes, *routed), ranks)


@pytest.mark.parametrize("use_valid,ab_order", [(False, False), (True, False), (False, True), (True, True)])
def test_each_op_lowers_exactly(tmp_path, use_valid, ab_order):
    module = _AllOps(use_valid, ab_order)
    x = torch.randn(3, 12, 5)
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, 7:] = False
    program = torch.export.export(module, (x, valid), dynamic_shapes=({0: torch.export.Dim("b")}, {0: torch.export.Dim("b")}))
    path = str(tmp_path / "ops.onnx")
    export_onnx(program, path, (x, valid))
    session = ort_session(path)
    for batch in (1, 5):
        xs, vs = torch.randn(batch, 12, 5), torch.ones(batch, 12, dtype=torch.bool)
        vs[0, 9:] = False
        got = session.run(None, ort_feeds(session, (xs, vs)))
        for g, want in zip(got, module(xs, vs)):
            assert (torch.from_numpy(g).float() - want.detach().float()).abs().max() <= 1e-5


def _graph(model):
    """Every node (attributes, so Loop bodies, included) and the initializers' names."""
    return ([(n.op_type, n.name, list(n.input), list(n.output), [str(a) for a in n.attribute])
             for n in model.graph.node], [i.name for i in model.graph.initializer])


@pytest.mark.parametrize("method", ["tome", "evit", "divprune"])  # divprune: a Loop
def test_optimize_onnx_equals_onnxscripts_whole_optimizer(tiny_bert, tiny_bert_module, method):
    """optimize_onnx leaves out onnxscript's multi-output pattern rules (time quadratic in the graph) and
    gives the same graph as torch.onnx.export(optimize=True)."""
    import onnxscript.rewriter

    program = tokencompile.optimize(tiny_bert, budget=0.7, method=method).program
    inputs = tiny_bert_module[1]

    def export(optimize):
        return torch.onnx.export(program, inputs, dynamo=True, opset_version=18, optimize=optimize,
                                 custom_translation_table=translation_table(), verbose=False)
    ours, whole = export(False), export(True)
    optimize_onnx(ours)
    assert _graph(ours.model_proto) == _graph(whole.model_proto)
    rules = single_output_rules()
    assert rules is not None, "this onnxscript does not expose its rules: optimize_onnx runs the whole optimizer"
    assert "SlicesSplit" not in {rule.name for rule in rules}
    assert len(rules) == len(onnxscript.rewriter._DEFAULT_REWRITE_RULES) - 1  # restored after the call


def _grouped_reference(rows, weight, offs):
    out, start = torch.zeros(rows.shape[0], weight.shape[2]), 0
    for expert, end in enumerate(offs.tolist()):
        out[start:end] = rows[start:end] @ weight[expert]
        start = end
    return out


class _Experts(torch.nn.Module):
    def forward(self, rows, weight, offs):
        return torch.ops.transformers.grouped_mm_fallback(rows, weight, offs)


@pytest.mark.parametrize("dtype,offsets_dtype", [(torch.float32, torch.int64), (torch.float16, torch.int32)])
def test_grouped_experts_lower_to_an_onnx_loop(tmp_path, dtype, offsets_dtype):
    """Hugging Face's grouped matmul of a mixture of experts (rows sorted by expert, cumulative counts):
    empty experts, rows past the last offset (left 0) and any number of rows, in ONNX Runtime."""
    import transformers.integrations.moe  # noqa: F401  (registers the op)

    rows, weight = torch.randn(10, 6, dtype=dtype), torch.randn(4, 6, 3, dtype=dtype)
    offs = torch.tensor([3, 3, 7, 10], dtype=offsets_dtype)
    rows_dim = torch.export.Dim("rows")
    program = torch.export.export(_Experts(), (rows, weight, offs), dynamic_shapes=({0: rows_dim}, None, None))
    path = str(tmp_path / "experts.onnx")
    info = export_onnx(program, path, (rows, weight, offs))
    assert info.op_counts.get("Loop") == 1
    session = ort_session(path)
    cases = [(rows, offs), (torch.randn(9, 6), [0, 5, 5, 7]), (torch.randn(1, 6), [0, 0, 1, 1]),
             (torch.randn(12, 6), [2, 2, 2, 2]), (torch.randn(3, 6), [0, 0, 0, 0])]
    for case_rows, case_offs in cases:
        case_rows, case_offs = case_rows.to(dtype), torch.as_tensor(case_offs, dtype=offsets_dtype)
        got = torch.from_numpy(session.run(None, ort_feeds(session, (case_rows, weight, case_offs)))[0])
        want = _grouped_reference(case_rows.float(), weight.float(), case_offs)
        assert got.dtype == dtype
        assert torch.allclose(got.float(), want, atol=1e-5 if dtype == torch.float32 else 1e-2), (case_offs, got, want)


@torch.library.custom_op("tokencompile_test::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_no_onnx.register_fake
def _(x):
    return torch.empty_like(x)


class _NoOnnx(torch.nn.Module):
    def forward(self, x):
        return torch.ops.tokencompile_test.no_onnx(x) + 1


def test_an_op_without_translation_is_named(tmp_path):
    x = torch.randn(2, 3)
    program = torch.export.export(_NoOnnx(), (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(TokenCompileError, match=r"^ONNX export failed: torch.onnx has no ONNX translation for the "
                                                r"model's op tokencompile_test.no_onnx.default \(export a model "
                                                r"without it, or add a translation of it to "):
        export_onnx(program, str(tmp_path / "x.onnx"), (x,))


def test_tensorrt_check_flags_what_the_parser_cannot_build():
    topk = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="bad_topk", sorted=0)
    custom = helper.make_node("Magic", ["x"], ["y"], name="magic", domain="my.ops")
    unsupported = helper.make_node("StringNormalizer", ["s"], ["t"], name="strings")
    graph = helper.make_graph([topk, custom, unsupported], "g", [], [],
                              initializer=[helper.make_tensor("k", onnx.TensorProto.INT64, [1], [5000])])
    findings = {(f.node, f.problem) for f in check_tensorrt(helper.make_model(graph)) if f.blocking}
    assert ("bad_topk", "sorted=0 is not supported") in findings
    assert ("bad_topk", "k > 3840") in findings
    assert any(node == "magic" and "custom domain" in problem for node, problem in findings)
    assert any(node == "strings" and "not supported" in problem for node, problem in findings)


def test_tensorrt_check_reads_loop_bodies():
    """Nodes inside a Loop's body are checked with the constants of the body and of the graphs around it."""
    body = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="inner_topk"),
         helper.make_node("TopK", ["x", "k_inner"], ["v2", "i2"], name="inner_topk_inner_k"),
         helper.make_node("TopK", ["x", "cond"], ["v3", "i3"], name="inner_topk_variable_k"),
         helper.make_node("StringNormalizer", ["s"], ["t"], name="inner_strings"),
         helper.make_node("Identity", ["cond"], ["cond_out"], name="inner_cond")],
        "body", [helper.make_tensor_value_info("iteration", onnx.TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, [])],
        initializer=[helper.make_tensor("k_inner", onnx.TensorProto.INT64, [1], [4000])])
    loop = helper.make_node("Loop", ["n", ""], [], name="outer_loop", body=body)
    graph = helper.make_graph([loop], "g", [], [], initializer=[helper.make_tensor("k", onnx.TensorProto.INT64, [1],
                                                                                  [2])])
    findings = {(f.node, f.problem, f.blocking) for f in check_tensorrt(helper.make_model(graph))}
    assert ("inner_strings", "not supported by TensorRT's ONNX parser", True) in findings
    assert ("inner_topk_inner_k", "k > 3840", True) in findings
    assert ("inner_topk_variable_k", "input 1 must be a constant", True) in findings
    assert not [f for f in findings if f[0] == "inner_topk"]   # k from the graph around the loop
    assert any(node == "outer_loop" and not blocking for node, _, blocking in findings)


@pytest.mark.slow  # about 30 s: the default run keeps its 15-minute margin
def test_cli_export_verify_check_and_bench(recipe, tmp_path):
    _, program = recipe("hf_bert")
    original = tmp_path / "bert.pt2"
    torch.export.save(program, str(original))
    runner = CliRunner()
    out = runner.invoke(main, ["optimize", str(original), "--budget", "0.5", "-o", str(tmp_path / "bert.tc.pt2"),
                               "--onnx", str(tmp_path / "bert.tc.onnx")])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["export", str(tmp_path / "bert.tc.pt2"), "-o", str(tmp_path / "x.onnx"), "--verify",
                               "--check", "trt"])
    assert out.exit_code == 0, out.output
    assert "verify batch 8" in out.output and "TensorRT check: 0 blocking" in out.output
    json_path = tmp_path / "bench.json"
    out = runner.invoke(main, ["bench", str(original), str(tmp_path / "bert.tc.pt2"), "--runtime", "torch",
                               "--batch", "4", "--rounds", "3", "--no-memory", "--json", str(json_path)])
    assert out.exit_code == 0, out.output
    assert "speed-up" in out.output
    import json
    result = json.loads(json_path.read_text())
    assert result["batch"] == 4 and result["original"]["median_s"] > 0 and result["speedup"] > 0
