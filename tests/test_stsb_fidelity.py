"""Real weights (all-MiniLM-L6-v2) on real data (STS-benchmark dev): fidelity of the optimized model."""

import os
import sys

import pytest
import torch
from conftest import ROOT, SHARED

import tokencompile

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
def test_minilm_stsb_spearman_at_budgets(recipe):
    from stsb_fidelity import embed, read_pairs, spearman
    from transformers import AutoTokenizer

    import models

    tokenizer = AutoTokenizer.from_pretrained(models.minilm_dir())
    first, second, gold = read_pairs(os.path.join(SHARED, "data", "stsb", "sts-dev.csv"), 300)
    module, _ = recipe("minilm")
    program = tokencompile.compiler.export_module(module, models.text_inputs(2, 32))

    def score(model):
        a, b = embed(model, tokenizer, first, 32), embed(model, tokenizer, second, 32)
        return spearman(torch.nn.functional.cosine_similarity(a, b).tolist(), gold)

    original = score(program.module())
    assert original > 0.8  # the real weights, not random ones
    at_one = score(tokencompile.optimize(program, budget=1.0).program.module())
    assert at_one == pytest.approx(original, abs=1e-6)
    at_075 = score(tokencompile.optimize(program, budget=0.75).program.module())
    assert original - 0.05 < at_075 < original + 0.01
