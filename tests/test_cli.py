"""CLI behaviour: one-line errors with exit code 2 for bad input, and the happy path."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tokencompile.cli import main


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def vit_file(recipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "vit.pt2"
    torch.export.save(recipe("vit_small")[1], str(path))
    return str(path)


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    path = tmp_path_factory.mktemp("models") / "cnn.pt2"
    torch.export.save(torch.export.export(cnn, (torch.randn(2, 3, 32, 32),)), str(path))
    pickled = path.with_suffix(".pt")
    torch.save(cnn, pickled)
    return str(path), str(pickled)


def test_missing_file():
    code, out = run("optimize", "nope.pt2", "--budget", "0.5")
    assert code == 2 and "no such file: nope.pt2" in out and "Traceback" not in out


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    code, out = run("inspect", str(bad))
    assert code == 2 and "cannot read" in out and "torch.export program" in out


def test_pickle_needs_opt_in(cnn_file):
    code, out = run("inspect", cnn_file[1], "--input-shape", "2,3,32,32")
    assert code == 2 and "loading it runs arbitrary code" in out and "--trust-pickle" in out


def test_no_transformer_blocks(cnn_file):
    code, out = run("inspect", cnn_file[0])
    assert code == 2 and "no transformer blocks found" in out
    code, out = run("optimize", cnn_file[1], "--trust-pickle", "--input-shape", "2,3,32,32", "--budget", "0.5")
    assert code == 2 and "no transformer blocks found" in out


@pytest.mark.parametrize("budget", ["0", "-0.5", "1.5"])
def test_budget_out_of_range(vit_file, budget):
    code, out = run("optimize", vit_file, "--budget", budget)
    assert code == 2 and f"budget {float(budget):g} is out of range" in out


def test_unknown_method(vit_file):
    code, out = run("optimize", vit_file, "--budget", "0.5", "--method", "magic")
    assert code == 2 and "unknown method 'magic'" in out and "tome" in out


def test_schedule_removing_too_many_tokens(vit_file):
    code, out = run("optimize", vit_file, "--schedule", "r=120,0")  # a constant r=K is capped per block instead
    assert code == 2 and "removes 120 tokens in block 0" in out


def test_bad_schedule_text(vit_file):
    code, out = run("optimize", vit_file, "--schedule", "r=a,b")
    assert code == 2 and "cannot read schedule" in out


def test_inspect_json(vit_file):
    code, out = run("inspect", vit_file, "--json")
    info = json.loads(out)
    assert code == 0 and info["tokens"] == 197 and info["blocks"] == 12 and info["protected_prefix_tokens"] == 1
    assert [b["name"] for b in info["block_table"]][:2] == ["blocks.0", "blocks.1"]


def test_optimize_writes_program_and_report(vit_file, tmp_path):
    out_file, report_file = tmp_path / "vit.tc.pt2", tmp_path / "vit.json"
    code, out = run("optimize", vit_file, "--budget", "0.5", "-o", str(out_file), "--report", str(report_file))
    assert code == 0, out
    report = json.loads(report_file.read_text())
    assert report["flops_ratio"] <= 0.5
    assert torch.export.load(str(out_file)).module()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    # inspect on the optimized program: fewer tokens per block, attention still one fused SDPA node each
    code, out = run("inspect", str(out_file))
    assert code == 0, out
    assert "12 blocks, 12 fused attention (SDPA) nodes" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "11 "))]
    assert rows[0][1:4] == ["blocks.0", "197", "sdpa"] and int(rows[1][2]) < 197 and rows[1][3] == "sdpa"
    assert out.count("tome_plan") == sum(1 for r in report["schedule"] if r)


def test_real_process_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "tokencompile.cli", "optimize", "missing.pt2", "--budget", "0.5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_debug_shows_traceback():
    code, out = run("optimize", "missing.pt2", "--budget", "0.5", "--debug")
    assert code == 2 and "Traceback" in out


def test_inspect_timm_id():
    code, out = run("inspect", "timm:deit_small_distilled_patch16_224", "--json")
    info = json.loads(out)
    assert code == 0 and info["tokens"] == 198 and info["protected_prefix_tokens"] == 2


def test_inspect_hf_directory():
    import models

    result = CliRunner().invoke(main, ["inspect", f"hf:{models.minilm_dir()}", "--input-shape", "2,32", "--json"])
    info = json.loads(result.stdout)  # transformers reports loading progress on stderr
    assert result.exit_code == 0 and info["tokens"] == 32 and info["blocks"] == 6
    assert info["attention_mask_input"] is not None and info["protect_last_valid_token"]


def test_trusted_pickle_of_a_transformer(tmp_path):
    from test_passes import Tiny

    path = tmp_path / "tiny.pt"
    torch.save(Tiny().eval(), path)
    code, out = run("optimize", str(path), "--trust-pickle", "--input-shape", "2,15,32", "--schedule", "r=3")
    assert code == 0, out
    assert "tokens entering each block: 16 13 10" in out
