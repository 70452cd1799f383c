"""rebuild_program: a rewritten module lifted back into a program equals a second export of it, and the
cases that cannot be lifted back are exported again."""

import io

import pytest
import torch
from torch.export import Dim
from torch.export.graph_signature import OutputKind

import tokencompile
from tokencompile.compiler import export_module
from tokencompile.decoder import compile_decoder
from tokencompile.errors import TokenCompileError
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


def test_optimize_lifts_the_rewritten_module_back_without_tracing(tiny_vit, tiny_vit_module, exports):
    result = tokencompile.optimize(tiny_vit, budget=0.75)
    assert exports == [] and result.report["attention_tokens"][-1] < 17
    program, (x,) = result.program, tiny_vit_module[1]
    assert program.graph_signature.input_specs == tiny_vit.graph_signature.input_specs
    assert program.range_constraints == tiny_vit.range_constraints
    exported = torch.export.export(program.module(), (x,), dynamic_shapes=({0: Dim.AUTO},))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    with torch.no_grad():
        for batch in (torch.randn(1, 3, 32, 32), x, torch.randn(5, 3, 32, 32)):
            expected = exported.module()(batch)
            assert torch.equal(program.module()(batch), expected)
            assert torch.equal(loaded.module()(batch), expected)


def test_compile_decoder_traces_the_prefill_once(llama, exports):
    """With fastv's lookup prior too, whose shifted copies of the prompt once guarded the batch size."""
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    program = compile_decoder(llama, ids, keep=0.5, layer=1, span=(0, 20), lookup=4)
    assert len(exports) == 1 and program.tokens_per_layer[-1] == 14
    with torch.no_grad():  # the batch stays symbolic
        torch.testing.assert_close(program.prefill.module()(ids[:1])[0], program.prefill.module()(ids)[0][:1])


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


def test_a_new_guard_on_an_input_size_is_exported_again():
    x = torch.randn(2, 4)
    program = export_module(torch.nn.Linear(4, 4), (x,))
    module = program.module()
    assert rebuild_program(program, module, _retrace_never).range_constraints == program.range_constraints
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
