"""Fidelity evaluation: data loaders (and their errors), metrics against hand-computed values, evaluate(),
sweep and the `eval` / `sweep` commands."""

import json
import math
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import SHARED
from PIL import Image

import tokencompile
from tokencompile.cli import main
from tokencompile.errors import TokenCompileError
from tokencompile.evaluation import data as evdata
from tokencompile.evaluation import metrics
from tokencompile.evaluation.data import Preprocess
from tokencompile.evaluation.runner import evaluate, run_model
from tokencompile.evaluation.sweep import format_sweep, plot_pareto, sweep

STSB = os.path.join(SHARED, "data", "stsb", "sts-dev.csv")
IMAGES = os.path.join(SHARED, "data", "images")


def tokenizer_dir():
    import models

    return models.minilm_dir()


def save_image(path, size=(40, 30), color=(255, 0, 0)):
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    save_image(folder / "n01440764_tench.png", color=(255, 255, 255))
    save_image(folder / "cat.jpg", color=(0, 0, 0))
    save_image(folder / "n15075141_toilet_tissue.JPEG", color=(255, 0, 0))
    (folder / "notes.txt").write_text("not an image")
    return folder


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def raises(match):
    return pytest.raises(TokenCompileError, match=match)


# ---------------------------------------------------------------- images

def test_image_folder_shapes_labels_and_order(image_dir):
    data = evdata.load_images(str(image_dir), (3, 32, 32))
    assert data.kind == "images" and data.inputs[0].shape == (3, 3, 32, 32)
    assert data.names == ["cat.jpg", "n01440764_tench.png", "n15075141_toilet_tissue.JPEG"]
    assert data.labels.tolist() == [-1, 0, 999]  # first and last of the 1,000 sorted synsets
    assert evdata.load_images(str(image_dir), (3, 32, 32), labels=False).labels is None
    assert len(evdata.load_images(str(image_dir), (3, 32, 32), limit=1)) == 1


def test_no_synset_names_give_no_labels(tmp_path):
    save_image(tmp_path / "dog.png")
    assert evdata.load_images(str(tmp_path), (3, 8, 8)).labels is None


def test_unknown_synset_is_unlabelled():
    assert evdata.imagenet_index("n00000000") == -1


def test_normalization_by_hand():
    # white pixels: (1 - mean) / std per channel
    settings = Preprocess(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    tensor = evdata.preprocess_image(Image.new("RGB", (20, 10), (255, 255, 255)), (8, 8), settings)
    assert tensor.shape == (3, 8, 8)
    assert tensor[:, 0, 0].tolist() == pytest.approx([1.0, 3.0, 0.5])


def test_resize_and_center_crop_by_hand():
    # 64x32 image, left half black, right half white; shorter side 32 -> 16 (crop_pct 1), so 32x16, then
    # the center 16x16 crop keeps columns 8..23 of the resized image: 8 black columns, then 8 white ones.
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (32, 0, 64, 32))
    settings = Preprocess(mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0, interpolation="nearest")
    tensor = evdata.preprocess_image(image, (16, 16), settings)
    assert tensor[0, :, :8].max() == 0 and tensor[0, :, 8:].min() == 1
    # crop_pct 0.5: shorter side -> 32 (no resize), center 16x16 of the 64x32 image is columns 24..39
    tensor = evdata.preprocess_image(image, (16, 16), Preprocess(mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.5,
                                                                 interpolation="nearest"))
    assert tensor[0, :, :8].max() == 0 and tensor[0, :, 8:].min() == 1


def test_preprocess_from_timm_config_and_overrides():
    settings = evdata.preprocess_from_config({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9,
                                              "interpolation": "bicubic", "input_size": (3, 224, 224)})
    assert settings == Preprocess((0.5,) * 3, (0.5,) * 3, 0.9, "bicubic", (3, 224, 224))
    assert evdata.timm_preprocess("vit_small_patch16_224").crop_pct == 0.9
    changed = evdata.resolve_preprocess("timm:vit_small_patch16_224", mean="0.1,0.2,0.3", crop_pct=1.0)
    assert changed.mean == (0.1, 0.2, 0.3) and changed.std == (0.5,) * 3 and changed.crop_pct == 1.0
    assert evdata.resolve_preprocess("model.pt2") == Preprocess()


@pytest.mark.parametrize("option, message", [
    ({"mean": "1,2"}, "cannot read mean"), ({"std": "a,b,c"}, "cannot read std"),
    ({"crop_pct": 1.5}, "crop-pct 1.5 is out of range")])
def test_bad_preprocess_options(option, message):
    with raises(message):
        evdata.resolve_preprocess("model.pt2", **option)


def test_real_images_folder():
    data = evdata.load_images(IMAGES, (3, 32, 32), limit=3)
    assert data.labels.tolist() == [0, 20, 40]  # n01440764 tench, n01601694 water ouzel, ...


def test_image_errors(tmp_path, monkeypatch):
    with raises("no such data path"):
        evdata.load_images(str(tmp_path / "missing"), (3, 8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    with raises("the image folder .* is empty"):
        evdata.load_images(str(empty), (3, 8, 8))
    others = tmp_path / "others"
    others.mkdir()
    (others / "readme.txt").write_text("x")
    with raises(r"no images in .* \(1 other files\)"):
        evdata.load_images(str(others), (3, 8, 8))
    (others / "broken.jpg").write_bytes(b"not a jpeg")
    with raises("cannot read image .*broken.jpg"):
        evdata.load_images(str(others), (3, 8, 8))
    with raises("is not a folder"):
        evdata.image_files(str(others / "readme.txt"))
    with raises("3-channel"):
        evdata.load_images(str(others), (1, 8, 8))
    with raises("unknown interpolation"):
        evdata.preprocess_image(Image.new("RGB", (8, 8)), (8, 8), Preprocess(interpolation="cubic"))


def test_synsets_without_timm(image_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm.data", None)
    evdata._imagenet_synsets.cache_clear()
    try:
        with raises("timm .* is not installed.*--no-labels"):
            evdata.load_images(str(image_dir), (3, 8, 8))
    finally:
        evdata._imagenet_synsets.cache_clear()


# ---------------------------------------------------------------- texts and pairs

def test_text_lines(tmp_path):
    path = write(tmp_path / "texts.txt", "first text\n\n  second text  \n")
    assert evdata.read_texts(path) == ["first text", "second text"]
    assert evdata.read_texts(path, limit=1) == ["first text"]


def test_text_errors(tmp_path):
    with raises("no such data path"):
        evdata.read_texts(str(tmp_path / "missing.txt"))
    with raises("the text file .* is empty"):
        evdata.read_texts(write(tmp_path / "blank.txt", "\n  \n"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with raises("is not UTF-8 text"):
        evdata.read_texts(str(bad))
    with raises("is a folder, not a text file"):
        evdata.read_texts(str(tmp_path))


def test_pairs_layouts(tmp_path):
    first, second, gold = evdata.read_pairs(write(tmp_path / "three.tsv", "a b\tc d\t4.5\ne\tf\t1\n"))
    assert (first, second, gold.tolist()) == (["a b", "e"], ["c d", "f"], [4.5, 1.0])
    first, second, gold = evdata.read_pairs(write(tmp_path / "two.tsv", "a\tb\n"))
    assert (first, second, gold) == (["a"], ["b"], None)
    stsb = "g\tf\t2012\t0001\t3.5\tone\ttwo\ng\tf\t2016\t0002\t2\tthree\tfour\tsource\tsource\n"
    first, second, gold = evdata.read_pairs(write(tmp_path / "stsb.tsv", stsb))
    assert (first, second, gold.tolist()) == (["one", "three"], ["two", "four"], [3.5, 2.0])


def test_stsb_dev_file():
    first, second, gold = evdata.read_pairs(STSB)
    assert len(first) == len(second) == len(gold) == 1500
    assert first[0] == "A man with a hard hat is dancing." and gold[0] == 5.0


@pytest.mark.parametrize("text, message", [
    ("a\tb\tc\td\n", "line 1: 4 tab-separated columns"),
    ("only one column\n", "line 1: 1 tab-separated columns"),
    ("a\tb\tgood\n", "line 1: the gold score 'good' is not a number"),
    ("a\tb\t1\nc\td\n", "line 2: 2 columns, unlike the rows before it"),
    ("a\t \t1\n", "line 1: an empty sentence"),
    ("\n\n", "no sentence pairs in"),
])
def test_pairs_errors(tmp_path, text, message):
    with raises(message):
        evdata.read_pairs(write(tmp_path / "pairs.tsv", text))


def test_tokenizer_errors(tmp_path):
    with raises(r"text data needs a tokenizer \(pass --tokenizer DIR"):
        evdata.load_tokenizer(None)
    with raises("no such tokenizer directory"):
        evdata.load_tokenizer(str(tmp_path / "missing"))
    with raises("cannot load a tokenizer from"):
        evdata.load_tokenizer(str(tmp_path))


def test_tokenize_pads_and_truncates(tmp_path):
    tokenizer = evdata.load_tokenizer(tokenizer_dir())
    path = write(tmp_path / "texts.txt", "a short one\n" + "word " * 40 + "\n")
    data = evdata.load_texts(path, tokenizer, 8)
    ids, mask = data.inputs
    assert ids.shape == mask.shape == (2, 8) and data.truncated == 1
    assert mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # [CLS] a short one [SEP] + padding
    pairs = evdata.load_pairs(write(tmp_path / "p.tsv", "a\tb\t1\nc\td\t2\n"), tokenizer, 8)
    assert pairs.inputs[0].shape == (4, 8) and pairs.names == ["a", "c", "b", "d"]


def test_load_data_dispatch_and_shape_checks(tiny_vit, tiny_bert, image_dir, tmp_path):
    assert evdata.program_image_size(tiny_vit) == (3, 32, 32)
    assert evdata.program_token_count(tiny_bert) == 16
    assert evdata.program_input_shapes(tiny_bert) == [(None, 16), (None, 16)]
    texts = write(tmp_path / "texts.txt", "hello world\n")
    assert evdata.load_data(str(image_dir), tiny_vit).inputs[0].shape == (3, 3, 32, 32)
    assert evdata.load_data(texts, tiny_bert, tokenizer_dir()).inputs[0].shape == (1, 16)
    with raises("text data needs a program taking"):
        evdata.load_data(texts, tiny_vit, tokenizer_dir())
    with raises("image data needs a program taking one"):
        evdata.load_data(str(image_dir), tiny_bert)
    with raises("text data needs a tokenizer"):
        evdata.load_data(texts, tiny_bert)
    with raises("--limit 0 leaves no samples"):
        evdata.load_data(texts, tiny_bert, tokenizer_dir(), limit=0)
    batches = evdata.load_calibration_inputs(str(image_dir), tiny_vit, batch=2)
    assert [tuple(b[0].shape) for b in batches] == [(2, 3, 32, 32), (1, 3, 32, 32)]


# ---------------------------------------------------------------- metrics (expected values by hand)

def test_top1_and_top5_agreement():
    original = torch.tensor([[2.0, 1, 0], [0, 1, 2], [0, 0, 1]])  # argmax 0, 2, 2
    optimized = torch.tensor([[1.0, 2, 0], [0, 0, 3], [3, 2, 1]])  # argmax 1, 2, 0
    assert metrics.top1_agreement(original, optimized) == pytest.approx(1 / 3)
    # top-2 of optimized: {1, 0} has 0, {2, x} has 2, {0, 1} lacks 2
    assert metrics.top5_agreement(original, optimized, k=2) == pytest.approx(2 / 3)
    assert metrics.top5_agreement(original, optimized) == 1.0  # k capped at the 3 classes


def test_kl_divergence():
    original = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    optimized = torch.tensor([[0.0, math.log(3)]])  # q = (1/4, 3/4)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # = ln(4/3) / 2
    assert metrics.kl_divergence(original, optimized) == pytest.approx(expected)
    assert metrics.kl_divergence(optimized, optimized) == pytest.approx(0.0, abs=1e-12)


def test_accuracy():
    logits = torch.tensor([[3.0, 2, 1], [0, 2, 1], [0, 1, 2]])  # top-1: 0, 1, 2; top-2: {0,1} {1,2} {2,1}
    labels = torch.tensor([0, 2, -1])
    assert metrics.accuracy(logits, labels) == 0.5
    assert metrics.accuracy(logits, labels, k=2) == 1.0
    assert metrics.accuracy(logits, torch.tensor([-1, -1, -1])) is None


def test_cosine_to_original():
    original = torch.tensor([[1.0, 0], [1, 1]])
    optimized = torch.tensor([[0.0, 1], [2, 2]])  # cosines 0 and 1
    assert metrics.cosine_to_original(original, optimized) == pytest.approx(0.5)


def test_spearman():
    # ranks differ by 0, 1, 1, 0: 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    assert metrics.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    first = torch.tensor([[1.0, 0], [1, 0], [1, 0]])
    second = torch.tensor([[1.0, 0], [1, 1], [0, 1]])  # cosines 1, 0.71, 0
    assert metrics.sts_spearman(first, second, torch.tensor([5.0, 3, 1])) == pytest.approx(1.0)
    assert metrics.sts_spearman(first, second, torch.tensor([1.0, 3, 5])) == pytest.approx(-1.0)


def test_next_token_agreement():
    original = torch.tensor([[[1.0, 0], [0, 1], [1, 0]]])  # predicts 0, 1, 0
    optimized = torch.tensor([[[1.0, 0], [1, 0], [0, 1]]])  # predicts 0, 0, 1
    assert metrics.next_token_agreement(original, optimized) == pytest.approx(1 / 3)
    assert metrics.next_token_agreement(original, optimized, torch.tensor([[1, 1, 0]])) == pytest.approx(0.5)


def test_perplexity():
    assert metrics.perplexity(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long)) == pytest.approx(4.0)
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])  # p = (1/4, 3/4) at both positions
    targets = torch.tensor([[1, 0]])
    assert metrics.perplexity(logits, targets) == pytest.approx(1 / math.sqrt(0.75 * 0.25))
    assert metrics.perplexity(logits, targets, torch.tensor([[1, 0]])) == pytest.approx(4 / 3)


# ---------------------------------------------------------------- evaluate and sweep

def test_run_model_pads_the_last_batch(tiny_vit):
    images = torch.randn(5, 3, 32, 32)
    together = run_model(tiny_vit, (images,), batch=5)
    assert torch.allclose(run_model(tiny_vit, (images,), batch=2), together, atol=1e-5)


def test_evaluate_classify_identity_at_budget_one(tiny_vit, image_dir):
    data = evdata.load_data(str(image_dir), tiny_vit)
    same = tokencompile.optimize(tiny_vit, budget=1.0).program
    lines = []
    result = evaluate(tiny_vit, same, data, "classify", batch=2, progress=lines.append)
    assert result["top1_agreement"] == 1.0 and result["top5_agreement"] == 1.0
    assert result["kl_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert "accuracy_original" not in result  # label 999 does not exist in a 10-class model
    assert lines[-1] == "optimized: 3/3 samples"
    data.labels = torch.tensor([-1, 0, 5])
    result = evaluate(tiny_vit, same, data, "classify")
    assert result["accuracy_optimized"] == result["accuracy_original"] in (0.0, 0.5, 1.0)


def test_evaluate_sts_identity_and_task_checks(tiny_bert, tmp_path):
    pairs = write(tmp_path / "pairs.tsv", "a man eats\ta man is eating\t4\na dog runs\tthe sky is blue\t0\n"
                                          "a cat sleeps\ta cat is asleep\t5\n")
    data = evdata.load_data(pairs, tiny_bert, tokenizer_dir())
    result = evaluate(tiny_bert, tiny_bert, data, "sts")
    assert result["pairs"] == 3 and result["cosine_to_original"] == pytest.approx(1.0)
    assert result["spearman_optimized"] == pytest.approx(result["spearman_original"])
    texts = evdata.load_data(write(tmp_path / "t.txt", "one\ntwo\n"), tiny_bert, tokenizer_dir())
    assert evaluate(tiny_bert, tiny_bert, texts, "embed")["cosine_to_original"] == pytest.approx(1.0)
    with raises("--task sts needs sentence pairs"):
        evaluate(tiny_bert, tiny_bert, texts, "sts")
    per_token = lambda ids, mask: ids.float()[..., None]
    with raises("--task classify needs"):
        evaluate(per_token, per_token, texts, "classify")
    with raises("unknown task"):
        evaluate(tiny_bert, tiny_bert, texts, "translate")


def test_sweep_table_and_plot(tiny_vit, image_dir, tmp_path):
    data = evdata.load_data(str(image_dir), tiny_vit)
    lines = []
    results = sweep(tiny_vit, (torch.randn(2, 3, 32, 32),), data, "classify", ["random"], [0.75, 0.01],
                    progress=lines.append)
    ok, unreachable = results["runs"]
    assert ok["flops_ratio"] <= 0.75 and 0 <= ok["top1_agreement"] <= 1
    assert unreachable["error"].startswith("not reachable")
    assert results["original"]["top1_agreement"] == 1.0 and results["primary"] == "top1_agreement"
    table = format_sweep(results)
    assert "| original | 1 | 1.000 | 1.0000 |" in table and "| random | 0.01 | not reachable" in table
    assert any(line.startswith("[1/2] random budget 0.75: FLOPs ratio") for line in lines)
    plot_pareto(results, str(tmp_path / "pareto.png"))
    assert Image.open(tmp_path / "pareto.png").size[0] > 100


# ---------------------------------------------------------------- command line

def run(*args):
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def program_files(tiny_vit, tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("programs")
    torch.export.save(tiny_vit, folder / "vit.pt2")
    torch.export.save(tiny_bert, folder / "bert.pt2")
    return str(folder / "vit.pt2"), str(folder / "bert.pt2")


def test_cli_eval_images(program_files, image_dir, tmp_path):
    vit, _ = program_files
    code, out = run("eval", vit, vit, "--data", image_dir, "--task", "classify", "--json", tmp_path / "r.json")
    assert code == 0, out
    assert "top1_agreement" in out and "1.0000" in out
    assert json.loads((tmp_path / "r.json").read_text())["top1_agreement"] == 1.0


def test_cli_eval_pairs(program_files, tmp_path):
    _, bert = program_files
    pairs = write(tmp_path / "pairs.tsv", "a\tb\t1\nc\td\t2\ne\tf\t3\n")
    code, out = run("eval", bert, bert, "--data", pairs, "--task", "sts", "--tokenizer", tokenizer_dir(),
                    "--limit", 2)
    assert code == 0, out
    assert "pairs" in out and "spearman_optimized" in out


@pytest.mark.parametrize("extra, message", [
    (["--data", "missing_dir"], "error: no such data path: missing_dir"),
    (["--data", "{texts}"], "error: text data needs a tokenizer (pass --tokenizer DIR"),
    (["--data", "{texts}", "--tokenizer", "nowhere"], "error: no such tokenizer directory: nowhere"),
    (["--data", "{empty}"], "error: the image folder"),
])
def test_cli_eval_errors(program_files, tmp_path, extra, message):
    _, bert = program_files
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = write(tmp_path / "texts.txt", "hello\n")
    extra = [arg.format(texts=texts, empty=empty) for arg in extra]
    code, out = run("eval", bert, bert, "--task", "embed", *extra)
    assert code == 2 and message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_cli_sweep(program_files, image_dir, tmp_path):
    vit, _ = program_files
    code, out = run("sweep", vit, "--data", image_dir, "--task", "classify", "--methods", "random",
                    "--budgets", "0.75", "--plot", tmp_path / "p.png", "--json", tmp_path / "s.json")
    assert code == 0, out
    assert "| random | 0.75 |" in out and (tmp_path / "p.png").exists()
    assert json.loads((tmp_path / "s.json").read_text())["runs"][0]["method"] == "random"


@pytest.mark.parametrize("extra, message", [
    (["--methods", "nope"], "error: unknown method 'nope'"),
    (["--budgets", "0.5,x"], "error: cannot read budgets '0.5,x'"),
    (["--budgets", "1.5"], "error: budget 1.5 is out of range"),
])
def test_cli_sweep_errors(program_files, image_dir, extra, message):
    vit, _ = program_files
    code, out = run("sweep", vit, "--data", image_dir, "--task", "classify", *extra)
    assert code == 2 and message in out and len(out.strip().splitlines()) == 1
