"""The decoder fidelity benchmark's texts (windows of license files) and its resampling of them."""

import importlib.metadata
import math
import os
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from decoder_fidelity import bootstrap_interval, license_token_ids, per_file  # noqa: E402


class CharTokenizer:
    """One id per character: windows can be checked against the file's text."""

    def __call__(self, text: str):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()


def test_windows_are_consecutive_slices_of_one_license_file():
    tokenizer = CharTokenizer()
    whole, sources = license_token_ids(tokenizer, ["numpy"], 300)
    ids, window_sources = license_token_ids(tokenizer, ["numpy"], 100, range(1, 3))
    assert window_sources == [sources[0] + "#2", sources[0] + "#3"]
    assert torch.equal(ids, whole[0, 100:300].view(2, 100))


def test_windows_past_the_end_of_the_file_are_left_out():
    tokenizer = CharTokenizer()
    ids, sources = license_token_ids(tokenizer, ["kiwisolver"], 1000, range(10**6))
    path = sources[0].split(":", 1)[1].split("#")[0]
    with open(importlib.metadata.distribution("kiwisolver").locate_file(path), errors="replace") as f:
        length = len(f.read())
    assert ids.shape == (length // 1000, 1000)
    assert sources[-1].endswith(f"#{length // 1000}")
    whole, _ = license_token_ids(tokenizer, ["kiwisolver"], length, range(10**6))  # a window ending at the end
    assert whole.shape == (1, length)


def _rows(nll: list[float]) -> dict:
    return {"per_text_nll": nll, "per_text_agreement": [1.0 - x for x in nll]}


def test_one_text_per_group_resamples_the_texts():
    nll, base = [0.3, 0.1, 0.7, 0.2, 0.0], [0.1, 0.1, 0.2, 0.0, 0.05]
    interval = bootstrap_interval(_rows(nll), _rows(base), list("abcde"), draws=2000, seed=3)
    draw = torch.randint(0, 5, (2000, 5), generator=torch.Generator().manual_seed(3))
    change = (torch.tensor(nll)[draw].mean(1) - torch.tensor(base)[draw].mean(1)).exp() - 1
    expected = change.quantile(torch.tensor([0.025, 0.975])).tolist()
    assert interval["perplexity_change_95"] == pytest.approx(expected, abs=1e-6)
    agreement = (1.0 - torch.tensor(nll))[draw].mean(1).quantile(torch.tensor([0.025, 0.975])).tolist()
    assert interval["agreement_95"] == pytest.approx(agreement, abs=1e-6)


def test_windows_of_one_file_are_drawn_together():
    # file a: three windows whose log-perplexity rose by x; file b: one window that did not change
    x, base = 0.4, [0.0] * 4
    groups = ["a", "a", "a", "b"]
    grouped = bootstrap_interval(_rows([x, x, x, 0.0]), _rows(base), groups)
    # draws of files: {b, b} (a quarter of them) gives no change, {a, a} gives x
    assert grouped["perplexity_change_95"] == pytest.approx([0.0, math.exp(x) - 1], abs=1e-6)
    assert grouped["agreement_95"] == pytest.approx([1.0 - x, 1.0], abs=1e-6)
    # drawn one window at a time, four draws of b's window (1 in 256) are too rare for the 2.5% quantile
    alone = bootstrap_interval(_rows([x, x, x, 0.0]), _rows(base), ["a", "c", "d", "b"])
    assert alone["perplexity_change_95"][0] == pytest.approx(math.exp(x / 4) - 1, abs=1e-6)


def test_a_draw_weighs_each_window_of_the_files_it_drew():
    # file a: one window whose log-perplexity rose by x; files b, c, d: three unchanged windows each.
    # Three or more draws of a in four (5.1% of the draws, four: 0.4%) hold the 97.5% quantile: a's
    # window against the three of the one other file drawn, x / 2 (files weighted equally: 3x / 4)
    x = 0.4
    groups = ["a"] + ["b"] * 3 + ["c"] * 3 + ["d"] * 3
    interval = bootstrap_interval(_rows([x] + [0.0] * 9), _rows([0.0] * 10), groups)
    assert interval["perplexity_change_95"] == pytest.approx([0.0, math.exp(x / 2) - 1], abs=1e-6)


def test_per_file_averages_the_windows_of_each_file():
    groups = ["b", "a", "b", "b"]
    nll, agreement = per_file(_rows([0.5, 0.4, 0.2, 0.2]), _rows([0.2, 0.1, 0.2, 0.2]), groups)
    assert list(nll) == ["b", "a"]
    assert nll == pytest.approx({"b": 0.1, "a": 0.3})
    assert agreement == pytest.approx({"b": 0.7, "a": 0.6})
