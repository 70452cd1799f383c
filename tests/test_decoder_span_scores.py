"""The encoder scores (DART, DivPrune, ZipCache, random) restricted to a decoder prompt's span: each
equals an eager reference written from the Hugging Face layers (score, kept rows, logits, caches), runs
in ONNX Runtime and through the CLI, and bad options are one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from test_decoder import reference_forward, reference_kept, reference_qk

import models
from tokencompile.cli import main
from tokencompile.decoder import (
    compile_decoder,
    generate,
    prefill,
    teacher_forced_logits,
)
from tokencompile.decoder.onnx_export import OnnxRunner, export_decoder_onnx
from tokencompile.errors import TokenCompileError
from tokencompile.methods.zipcache import probe_slices

pytestmark = pytest.mark.usefixtures("one_trace_per_prompt")

TOKENS, LAYER, SPAN = 24, 2, (4, 16)


@pytest.fixture(scope="module")
def prompts():
    return models.decoders.prompt_ids(3, TOKENS, seed=2)[0]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def dart_score(q, k, scale, n_keep, pivots=2):
    metric = k.mean(1)
    norm = metric.norm(dim=-1)
    chosen = norm.topk(pivots).indices
    unit = _unit(metric)
    duplication = (unit @ unit.gather(1, chosen[..., None].expand(-1, -1, unit.shape[-1])).transpose(1, 2)).amax(-1)
    return (-duplication).scatter(1, chosen, float("inf"))


def divprune_score(q, k, scale, n_keep):
    """Greedy farthest-point order on key cosine distance, from the token farthest from the mean."""
    unit = _unit(k.mean(1))
    scores = torch.full(unit.shape[:2], -1.0)
    for b in range(unit.shape[0]):
        distance = 1 - unit[b] @ unit[b].T
        mean = unit[b].mean(0)
        nearest = 1 - unit[b] @ mean / mean.norm()
        taken = torch.zeros(unit.shape[1], dtype=torch.bool)
        for step in range(n_keep):
            pick = int(nearest.masked_fill(taken, -math.inf).argmax())
            scores[b, pick], taken[pick] = n_keep - step, True
            nearest = distance[pick] if step == 0 else torch.minimum(nearest, distance[pick])
    return scores


def zipcache_score(q, k, scale, n_keep, fraction=0.2):
    """Causal attention of the probe rows, head mean, summed per key over the probes at or after it and
    divided by their number."""
    n = q.shape[2]
    rows = torch.cat([torch.arange(n)[slice(*s)] for s in probe_slices(n, fraction)])
    future = torch.arange(n)[None, :] > rows[:, None]                                   # [P, N]
    attention = (q[:, :, rows] @ k.transpose(-2, -1) * scale).masked_fill(future, -math.inf).softmax(-1).mean(1)
    return attention.sum(1) / (~future).sum(0).clamp(min=1)


def random_score(q, k, scale, n_keep, seed=5):
    positions = torch.arange(q.shape[2]).expand(q.shape[0], -1)
    return ((positions * 2654435761 + 2654435761 + 7919 * LAYER + 104729 * seed) % (1 << 24)).float()


REFERENCES = {"dart": (dart_score, {"pivots": 2}), "divprune": (divprune_score, None),
              "zipcache": (zipcache_score, {"probes": 0.2}), "random": (random_score, {"seed": "5"})}


@pytest.mark.parametrize("method", list(REFERENCES))
def test_span_score_matches_eager_reference(llama, prompts, method):
    score_of, options = REFERENCES[method]
    ids = prompts[:2]
    program = compile_decoder(llama, ids, keep=0.5, layer=LAYER, span=SPAN, method=method, options=options)
    assert program.report["tokens_per_layer"] == [24, 24, 16, 16]
    removable = torch.zeros_like(ids, dtype=torch.bool)
    removable[:, SPAN[0]:SPAN[0] + SPAN[1]] = True
    q, k, scale = reference_qk(llama, ids, LAYER - 1)
    with torch.no_grad():
        kept = reference_kept(score_of(q, k, scale, TOKENS - 8), removable, 8)
        expected_logits, expected_caches = reference_forward(llama, ids, LAYER, kept)
        logits, caches = prefill(program, ids)
    assert torch.allclose(logits, expected_logits[:, -1], atol=1e-5)
    for (key, value), (key_ref, value_ref) in zip(caches, expected_caches):
        assert key.shape == key_ref.shape
        assert torch.allclose(key, key_ref, atol=1e-5) and torch.allclose(value, value_ref, atol=1e-5)
    alone, _ = prefill(program, ids[1:])
    assert torch.allclose(alone, logits[1:], atol=1e-5)


@pytest.mark.slow  # tiny model, but several compiles and exports: the default run stays under 15 min
@pytest.mark.parametrize("method", ["divprune", "zipcache"])
def test_span_scores_run_in_onnx_runtime(llama, prompts, method, tmp_path):
    program = compile_decoder(llama, prompts[:1], keep=(0.75, 0.25), layer=(1, 3), span=SPAN, method=method,
                              options=REFERENCES[method][1])
    assert program.report["tokens_per_layer"] == [24, 20, 20, 12]
    export_decoder_onnx(program, str(tmp_path))
    runner = OnnxRunner(str(tmp_path))
    logits, _ = runner.prefill(prompts)
    assert torch.allclose(logits, prefill(program, prompts)[0], atol=1e-5)
    continuation = prompts[:, :5].flip(1)
    assert torch.allclose(teacher_forced_logits(runner, prompts, continuation),
                          teacher_forced_logits(program, prompts, continuation), atol=1e-4)
    assert torch.equal(generate(runner, prompts, 8), generate(program, prompts, 8))


def test_zipcache_reads_the_probabilities_of_eager_attention():
    """With eager attention the decoder's ZipCache takes its probe rows from the model's softmax (which holds
    whatever the model does to its logits: soft-capping, its own scale), not from q . k / sqrt(d)."""
    from tokencompile.graph_utils import GraphBuilder
    from tokencompile.methods import ZipCache
    from tokencompile.methods.base import SiteInputs

    class Inputs(torch.nn.Module):
        def forward(self, x, query, keys, probabilities):
            return x + query.sum() + keys.sum() + probabilities.sum()

    generator = torch.Generator().manual_seed(0)
    n = 20
    query, keys = torch.randn(2, 3, n, 4, generator=generator), torch.randn(2, 3, n, 4, generator=generator)
    future = torch.arange(n)[None, :] > torch.arange(n)[:, None]
    probabilities = torch.randn(2, 3, n, n, generator=generator).masked_fill(future, -math.inf).softmax(-1)
    x = torch.zeros(2, n, 8)
    gm = torch.export.export(Inputs(), (x, query, keys, probabilities)).module()
    nodes = [node for node in gm.graph.nodes if node.op == "placeholder"]
    site = SiteInputs(block=0, x=nodes[0], query=nodes[1], keys=nodes[2], valid=None, sizes=None, num_prefix=0,
                      protect_last_valid=False, n=n, depth=2, probabilities=nodes[3])
    method = ZipCache(probes=0.2, causal=True)
    score = method.score(GraphBuilder(gm, nodes[3]), site, 10)
    next(node for node in gm.graph.nodes if node.op == "output").args = ((score,),)
    gm.recompile()
    rows = torch.cat([torch.arange(n)[slice(*s)] for s in probe_slices(n, 0.2)])
    seen = torch.arange(n)[None, :] <= rows[:, None]                                               # [P, N]
    expected = (probabilities[:, :, rows].mean(1) * seen).sum(1) / seen.sum(0).clamp(min=1)
    torch.testing.assert_close(gm(x, query, keys, probabilities), expected)


def test_budget_is_met(llama, prompts):
    program = compile_decoder(llama, prompts[:1], budget=0.7, layer=1, method="dart")
    assert program.report["flops_ratio"] <= 0.7
    assert program.report["stages"][0]["layer"] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="dart", options={"heads": 2}), "method 'dart' has no option 'heads'"),
    (dict(method="zipcache", options={"probes": 0}), "option probes=0 of method 'zipcache' is out of range"),
    (dict(method="random", options={"seed": "x"}), "option seed='x' of method 'random' is not a int"),
    (dict(method="dart", pool=7), "probes, pool and lookup shape FastV's attention score; dart has its own"),
    (dict(method="fastv", options={"pivots": 2}), "fastv takes no options"),
    (dict(method="tome"), "method 'tome' is not a decoder method"),
    (dict(method="zipcache", options={"causal": "false"}), "method 'zipcache' has no option 'causal'"),
    (dict(method="dart", options={"pivots": 2.5}), "option pivots=2.5 of method 'dart' is not a int"),
    (dict(method="dart", options={"pivots": True}), "option pivots=True of method 'dart' is not a int"),
    (dict(method="dart", options=["pivots"]), "options of method 'dart' must be a dict, got list"),
])
def test_bad_options_are_one_line_errors(llama, prompts, kwargs, message):
    with pytest.raises(TokenCompileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        compile_decoder(llama, prompts[:1], keep=0.5, **kwargs)


def test_cli_generate_with_a_span_score(llama, prompts, tmp_path):
    llama.save_pretrained(tmp_path)
    ids = ",".join(map(str, prompts[0].tolist()))
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--prompt-ids", ids, "--method", "dart", "--option",
                                       "pivots=2", "--keep", "0.5", "--layer", "2", "--span", "4,16",
                                       "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "tokens per layer [24, 24, 16, 16]" in result.output
    expected = generate(compile_decoder(llama, prompts[:1], keep=0.5, layer=2, span=SPAN, method="dart",
                                        options={"pivots": 2}), prompts[:1], 4)[0, -4:]
    assert ",".join(map(str, expected.tolist())) in result.output


def test_cli_offers_every_method_without_pixel_inputs():
    from tokencompile.decoder.cli import CLI_METHODS
    from tokencompile.decoder.prefill import METHODS
    from tokencompile.decoder.span_scored import SPAN_SCORES

    assert set(CLI_METHODS) == {*METHODS, *SPAN_SCORES}
