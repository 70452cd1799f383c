"""rebuild_program: a rewritten module lifted back into a program equals a second export of it, and the
cases that cannot be lifted back are exported again."""

import io

import pytest
import torch
from torch.export.graph_signature import OutputKind

import tokencompile
from tokencompile import compiler
from tokencompile.compiler import export_module
from tokencompile.decoder import compile_decoder
from tokencompile.errors import TokenCompileError
from tokencompile.graph_utils import GraphBuilder, refresh_fake_values, shape_of
from tokencompile.rebuild import rebuild_program


@pytest.fixture
def exports(monkeypatch):
    """Inputs of every torch.export.export call made during the test."""
    calls, export = [], torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda module, args, **kw: calls.append(args) or
                        export(module, args, **kw))
    return calls


def _retrace_never(module):
    raise AssertionError("rebuild_program traced the module again")


def test_optimize_lifts_the_rewritten_module_back_without_tracing(tiny_vit_module, exports, monkeypatch):
    module, (x,) = tiny_vit_module
    program = export_module(module, (x,))  # its own shape env: no guard another test added
    exports.clear()
    rebuilt = []
    monkeypatch.setattr(compiler, "rebuild_program", lambda original, rewritten, retrace: rebuilt.append(
        (rewritten, retrace)) or rebuild_program(original, rewritten, _retrace_never))
    result = tokencompile.optimize(program, budget=0.75)
    assert exports == [] and result.report["attention_tokens"][-1] < 17
    assert result.program.graph_signature.input_specs == program.graph_signature.input_specs
    rewritten, retrace = rebuilt[-1]
    exported = retrace(rewritten)  # what optimize gave before: the rewritten module exported again
    buffer = io.BytesIO()
    torch.export.save(result.program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        for batch in (torch.randn(1, 3, 32, 32), x, torch.randn(5, 3, 32, 32)):
            expected = exported.module()(batch)
            assert torch.equal(result.program.module()(batch), expected)
            assert torch.equal(loaded.module()(batch), expected)


@pytest.mark.parametrize("padding", [False, True])
def test_compile_decoder_traces_the_prefill_once(llama, exports, padding):
    """With fastv's lookup prior, whose shifted copies of the prompt once guarded the batch size, and with a
    padding mask (two inputs share a batch axis whose range starts at 1)."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    program = compile_decoder(llama, ids, keep=0.5, layer=1, span=(0, 20), lookup=4, padding=padding)
    assert len(exports) == 1 and program.tokens_per_layer[-1] == 14
    mask = (torch.ones_like(ids),) if padding else ()
    with torch.no_grad():  # the batch stays symbolic
        torch.testing.assert_close(program.prefill.module()(ids[:1], *(m[:1] for m in mask))[0],
                                   program.prefill.module()(ids, *mask)[0][:1])


class CountsCalls(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.linear(x)


def test_a_program_that_mutates_a_buffer_is_exported_again():
    """After run_decompositions a mutation is an output of the program (an in-place op before it)."""
    x = torch.randn(2, 4)
    program = export_module(CountsCalls(), (x,)).run_decompositions({})
    assert [spec.kind for spec in program.graph_signature.output_specs] == [OutputKind.BUFFER_MUTATION,
                                                                             OutputKind.USER_OUTPUT]
    module, retraced = program.module(), []
    rebuilt = rebuild_program(program, module, lambda m: retraced.append(m) or export_module(m, (x,)))
    assert retraced == [module]
    counting = rebuilt.module()
    counting(x), counting(x)
    assert counting.calls.item() == 2


@pytest.mark.parametrize("loaded", [False, True])
def test_a_new_guard_on_an_input_size_is_exported_again(loaded):
    """Also for a program loaded from a .pt2, whose shape env prints no guards."""
    x = torch.randn(2, 4)
    program = export_module(torch.nn.Linear(4, 4), (x,))
    if loaded:
        buffer = io.BytesIO()
        torch.export.save(program, buffer)
        buffer.seek(0)
        program = torch.export.load(buffer)
    module = program.module()
    rebuild_program(program, module, _retrace_never)
    placeholder = next(node for node in module.graph.nodes if node.op == "placeholder")
    assert int(placeholder.meta["val"].shape[0]) == 2  # guards batch == 2 in the program's shape env
    retraced = []
    rebuild_program(program, module, lambda m: retraced.append(m) or program)
    assert retraced == [module]


def test_a_node_without_a_fake_value_is_an_internal_error():
    program = export_module(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    module = program.module()
    output = next(node for node in module.graph.nodes if node.op == "output")
    with module.graph.inserting_before(output):
        relu = module.graph.call_function(torch.ops.aten.relu.default, (output.args[0][0],))
    output.args = ((relu,),)
    with pytest.raises(TokenCompileError, match="node 'relu_default' .* has no fake value"):
        rebuild_program(program, module, _retrace_never)


class Broadcasts(torch.nn.Module):
    def forward(self, x, table):
        return (x.unsqueeze(1) + (table * 2).unsqueeze(1)).sum(1).neg()


def test_fake_values_follow_a_node_replaced_by_a_broadcastable_one():
    """As when positions=renumber slices a rotary table shared by the batch instead of gathering it."""
    program = export_module(Broadcasts(), (torch.randn(2, 4, 8), torch.randn(2, 4, 8)))
    module = program.module()
    nodes = {node.target: node for node in module.graph.nodes}
    doubled = nodes[torch.ops.aten.mul.Tensor]
    first = GraphBuilder(module, doubled).call(torch.ops.aten.slice.Tensor, doubled, 0, 0, 1)
    doubled.replace_all_uses_with(first, delete_user_cb=lambda user: user is not first)
    summed = nodes[torch.ops.aten.sum.dim_IntList].meta["val"]
    refresh_fake_values(module, [first])
    unsqueezed = next(iter(first.users))
    assert shape_of(first)[0] == 1 and shape_of(unsqueezed)[:2] == (1, 1)
    added = nodes[torch.ops.aten.add.Tensor]
    assert shape_of(added) == shape_of(added.args[0])  # [B, 1, 4, 8], as before
    assert nodes[torch.ops.aten.sum.dim_IntList].meta["val"] is summed  # its input did not change: not recomputed
    rebuilt = rebuild_program(program, module, _retrace_never)
    x, table = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    torch.testing.assert_close(rebuilt.module()(x, table), -(x + 2 * table[:1]))
