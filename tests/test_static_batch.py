"""Programs exported the default way (every size fixed, the batch included) work in every verb and give the
same results as the same model exported with a symbolic batch."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from tokencompile.cli import main
from tokencompile.signature import describe, static_batch


def run(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_vit_module, tiny_bert_module, tiny_vit, tiny_bert):
    """Each tiny model saved twice (fixed batch 2, symbolic batch), 3 images and 3 sentence pairs (odd counts:
    the last batch is padded)."""
    folder = tmp_path_factory.mktemp("static")
    for name, (module, inputs), symbolic in (("vit", tiny_vit_module, tiny_vit), ("bert", tiny_bert_module, tiny_bert)):
        with torch.no_grad():
            torch.export.save(torch.export.export(module, inputs), folder / f"{name}_b2.pt2")
        torch.export.save(symbolic, folder / f"{name}.pt2")
    (folder / "images").mkdir()
    for index in range(3):
        Image.new("RGB", (40, 30), (90 * index, 60, 0)).save(folder / "images" / f"image{index}.png")
    (folder / "pairs.tsv").write_text("a cat sits on the mat\ta cat sat on a mat\t4.5\n"
                                      "a dog runs\tthe stock market fell\t0.5\n"
                                      "the sun is bright\tthe sun shines\t3.8\n")
    return folder


def data_args(name, folder):
    import models

    if name == "vit":
        return ["--data", folder / "images", "--task", "classify"]
    return ["--data", folder / "pairs.tsv", "--task", "sts", "--tokenizer", models.minilm_dir()]


def report(folder, model, *args):
    path = folder / f"{model.stem}.{len(args)}.json"
    run("optimize", model, "-o", folder / f"{model.stem}.tc.pt2", "--report", path, "--force", *args)
    return json.loads(path.read_text())


@pytest.mark.parametrize("name", [pytest.param("vit", marks=pytest.mark.slow), "bert"])  # BERT: padding too
def test_every_verb_on_a_static_batch_program(files, name, tmp_path, caplog):
    static, symbolic = files / f"{name}_b2.pt2", files / f"{name}.pt2"
    assert static_batch(torch.export.load(str(static))) == 2 and static_batch(torch.export.load(str(symbolic))) is None

    info = [json.loads(run("inspect", model, "--json").stdout) for model in (static, symbolic)]
    assert info[0]["tokens"] == info[1]["tokens"] and info[0]["blocks"] == info[1]["blocks"] == 2
    assert info[0]["inputs"].startswith(("x: 2,3,32,32", "input_ids: 2,16")) and "(B in " in info[1]["inputs"]

    fixed, free = report(files, static, "--budget", "0.75"), report(files, symbolic, "--budget", "0.75")
    assert fixed["schedule"] == free["schedule"] and fixed["flops_ratio"] == pytest.approx(free["flops_ratio"])
    optimized = files / f"{name}_b2.tc.pt2"
    assert static_batch(torch.export.load(str(optimized))) == 2

    exported = run("export", optimized, "-o", tmp_path / "b2.onnx", "--verify")
    out = exported.output
    assert "verify batch 2: " in out and "(ok" in out and "verify batch 1" not in out and "FAILED" not in out
    # torch.onnx's constant folding of fixed sizes warns "Evaluation failed" (twice for BERT): not shown
    assert not [record for record in caplog.records if "Evaluation failed" in record.getMessage()]
    if name == "vit":
        out = run("export", optimized, "-o", tmp_path / "b2p.onnx", "--plugins", "--verify").output
        assert "verify batch 2: " in out and "FAILED" not in out

    runtime = "ort" if name == "vit" else "torch"  # both runtimes, one model each
    bench = run("bench", static, optimized, "--runtime", runtime, "--rounds", "2", "--no-memory", "--batch", "8",
                "--json", tmp_path / "bench.json")
    assert "fixed batch of 2: timing batches of 2" in bench.stderr
    assert json.loads((tmp_path / "bench.json").read_text())["batch"] == 2

    metrics = []
    for original, candidate in ((static, optimized), (symbolic, files / f"{name}.tc.pt2")):
        run("eval", original, candidate, *data_args(name, files), "--json", tmp_path / "eval.json")
        metrics.append(json.loads((tmp_path / "eval.json").read_text()))
    assert metrics[0]["samples"] == (3 if name == "vit" else 6)
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-6)

    sweeps = []
    for model in (static, symbolic):
        run("sweep", model, *data_args(name, files), "--methods", "tome", "--budgets", "0.75", "--json",
            tmp_path / "sweep.json")
        sweeps.append(json.loads((tmp_path / "sweep.json").read_text())["runs"][0])
    numbers = [{k: v for k, v in run_.items() if isinstance(v, float) and k != "seconds"} for run_ in sweeps]
    assert sweeps[0]["schedule"] == sweeps[1]["schedule"] and numbers[0] == pytest.approx(numbers[1], abs=1e-6)

    calib = data_args(name, files)[:2] + data_args(name, files)[4:]  # --data DATA [--tokenizer DIR]
    calibrated = [report(files, model, "--budget", "0.75", "--schedule", "auto", "--calib", calib[1], *calib[2:])
                  for model in (static, symbolic)]
    assert calibrated[0]["calibration"]["samples"] == calibrated[1]["calibration"]["samples"]
    assert calibrated[0]["schedule"] == calibrated[1]["schedule"]


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_dynamic_batch_re_exports_a_static_program(files, name, tmp_path):
    out = tmp_path / "dynamic.pt2"
    result = run("optimize", files / f"{name}_b2.pt2", "--budget", "0.75", "--dynamic-batch", "-o", out,
                 "--report", tmp_path / "r.json")
    assert "batch: re-exported with a symbolic batch (was fixed at 2)" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["dynamic_batch"].startswith("re-exported")
    program = torch.export.load(str(out))
    assert static_batch(program) is None and "B" in describe(program)
    run("optimize", files / f"{name}.pt2", "--budget", "0.75", "-o", tmp_path / "symbolic.pt2")
    reference = torch.export.load(str(tmp_path / "symbolic.pt2")).module()
    inputs = (torch.randn(3, 3, 32, 32),) if name == "vit" else \
        (torch.randint(1000, 2000, (3, 16)), torch.ones(3, 16, dtype=torch.long))
    with torch.no_grad():
        assert torch.allclose(program.module()(*inputs), reference(*inputs), atol=1e-5)


def test_dynamic_batch_of_a_symbolic_program_changes_nothing(files, tmp_path):
    result = run("optimize", files / "vit.pt2", "--budget", "0.75", "--dynamic-batch", "-o", tmp_path / "o.pt2")
    assert "batch: already symbolic" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["vit_small", "hf_bert"])
def test_recipe_exported_the_default_way_exports_and_verifies(recipe_name, tmp_path):
    """The reported case: a ViT-S exported at batch 2 without dynamic shapes, optimized, then exported with
    --verify (standard and plugin form)."""
    import models

    torch.export.save(models.export(recipe_name, static_batch=True), tmp_path / "b2.pt2")
    run("optimize", tmp_path / "b2.pt2", "--budget", "0.5", "-o", tmp_path / "b2.tc.pt2")
    for extra in ([], ["--plugins"]):
        out = run("export", tmp_path / "b2.tc.pt2", "-o", tmp_path / "b2.onnx", "--verify", *extra).output
        assert "verify batch 2: " in out and "FAILED" not in out


def test_no_torch_traceback_without_debug(files, tmp_path, caplog):
    """VisionZip on a static-batch BERT makes torch log a meta-kernel failure it recovers from: shown only with
    --debug."""
    args = ["optimize", files / "bert_b2.pt2", "--budget", "0.75", "--method", "visionzip", "-o", tmp_path / "o.pt2"]
    run(*args)
    assert not [record for record in caplog.records if record.exc_info]
    run(*args, "--debug")
    assert [record for record in caplog.records if record.exc_info]
