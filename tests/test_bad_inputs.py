"""Bad inputs: each is refused with exit code 2 and one line on stderr (no traceback), before any work, and
leaves every file as it was: no file changed, none half-written, no temporary file left behind."""

import contextlib
import hashlib
import io
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest
import torch
from click.testing import CliRunner
from test_passes import Tiny

import tokencompile
from tokencompile.cli import main
from tokencompile.compiler import export_module
from tokencompile.errors import TokenCompileError

MARKER = "payload-ran"


class Payload:
    """Unpickling this creates the file MARKER in the current folder."""

    def __reduce__(self):
        return open, (MARKER, "w")


def crafted(source: str, target: str, entry_suffix: str, payload: bytes, config_suffix: str | None = None) -> None:
    """A copy of the archive ``source`` with the entry ending in ``entry_suffix`` replaced by ``payload``
    (and, given ``config_suffix``, every payload in that config marked as pickled)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for name in archive.namelist():
            data = archive.read(name)
            if name.endswith(entry_suffix):
                data = payload
            elif config_suffix and name.endswith(config_suffix):
                config = json.loads(data)
                for meta in config["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(config).encode()
            out.writestr(name, data)


def md5s(folder) -> dict:
    """Every file under ``folder`` (temporary files included) with its md5."""
    result = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                result[os.path.relpath(path, folder)] = hashlib.md5(handle.read()).hexdigest()
    return result


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_vit, tiny_bert):
    """One folder with small programs, existing outputs and data, built once for every case."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    tiny = Tiny().eval()
    tokens = torch.randn(2, 15, 32)
    torch.export.save(export_module(tiny, (tokens,)), folder / "tiny.pt2")
    torch.export.save(torch.export.export(tiny, (tokens,)), folder / "tiny_static.pt2")
    torch.export.save(tiny_vit, folder / "vit.pt2")
    torch.export.save(tiny_bert, folder / "bert.pt2")
    torch.export.save(tiny_vit, folder / "old.pt2")            # existing outputs that must survive
    (folder / "old.onnx").write_bytes(b"an existing ONNX file")
    (folder / "old.json").write_text("{}")
    (folder / "empty.pt2").write_bytes(b"")
    (folder / "corrupt.pt2").write_bytes(b"PK\x03\x04 not really a zip")
    os.symlink(folder / "tiny.pt2", folder / "link.pt2")
    os.symlink(folder / "tiny.pt2", folder / "link.onnx")
    pickled = io.BytesIO()
    torch.save(Payload(), pickled)
    crafted(folder / "tiny.pt2", folder / "evil_weights.pt2", "data/weights/weight_0", pickled.getvalue(),
            "_weights_config.json")
    crafted(folder / "tiny.pt2", folder / "evil_inputs.pt2", "data/sample_inputs/model.pt", pickled.getvalue())
    shutil.copy(folder / "tiny.pt2", folder / "evil_object.pt2")
    with zipfile.ZipFile(folder / "evil_object.pt2", "a") as archive:
        root = archive.namelist()[0].split("/")[0]
        archive.writestr(f"{root}/data/constants/opaque_obj_0", pickle.dumps(Payload()))
    (folder / "tiny.tc.pt2").write_bytes(b"an existing default output")
    images = folder / "images"
    images.mkdir()
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (40, 30), (80 * index, 0, 0)).save(images / f"image{index}.png")
    (folder / "nan_gold.tsv").write_text("a cat sits\ta cat sat\t4.0\na dog runs\ta dog ran\tnan\n")
    (folder / "flat_gold.tsv").write_text("a cat sits\ta cat sat\t3.0\na dog runs\ta bird flew\t3.0\n"
                                          "the sun\tthe moon\t3.0\n")
    (folder / "parent_file").write_text("a file, not a folder")
    return folder


def tokenizer():
    import models

    return models.minilm_dir()


# (id, arguments with {w} for the work folder, text the one-line error contains)
CASES = [
    ("optimize-over-input", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/tiny.pt2", "is the input"),
    ("optimize-over-input-link", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/link.pt2", "is the input"),
    ("export-over-input-link", "export {w}/tiny.pt2 -o {w}/link.onnx", "is the input"),
    ("export-pt2-name", "export {w}/tiny.pt2 -o {w}/tiny.pt2", "does not end in .onnx"),
    ("optimize-onnx-name", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/out.onnx", "for ONNX use --onnx"),
    ("report-name", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/o.pt2 --report {w}/r.txt",
     "--report {w}/r.txt does not end in .json"),
    ("missing-folder", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/missing/o.pt2",
     "the folder {w}/missing does not exist"),
    ("parent-is-file", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/parent_file/o.pt2",
     "{w}/parent_file is a file, not a folder"),
    ("proc", "optimize {w}/tiny.pt2 --schedule r=3 -o /proc/o.pt2", "cannot write -o /proc/o.pt2"),
    ("onnx-in-missing-folder", "optimize {w}/tiny.pt2 --schedule r=3 -o {w}/o.pt2 --onnx {w}/missing/o.onnx",
     "the folder {w}/missing does not exist"),
    ("plot-in-missing-folder", "sweep {w}/vit.pt2 --data {w}/images --task classify --plot {w}/missing/p.png",
     "the folder {w}/missing does not exist"),
    ("json-name", "bench {w}/tiny.pt2 {w}/tiny.pt2 --json {w}/b.csv", "does not end in .json"),
    ("default-output-exists", "optimize {w}/tiny.pt2 --schedule r=3", "tiny.tc.pt2 exists (pass --force"),
    ("opset", "export {w}/tiny.pt2 -o {w}/old.onnx --opset 99", "--opset 99 is out of range"),
    ("dart-pivots", "optimize {w}/tiny.pt2 --budget 0.5 -o {w}/o.pt2 --method dart --option pivots=-1",
     "option pivots=-1 of method 'dart' is out of range (give pivots >= 1)"),
    ("visionzip-contextual", ("optimize {w}/tiny.pt2 --budget 0.5 -o {w}/o.pt2 --method visionzip "
                              "--option contextual=-1"), "give 0 <= contextual <= 1"),
    ("zipcache-probes", "optimize {w}/tiny.pt2 --budget 0.5 -o {w}/o.pt2 --method zipcache --option probes=-1",
     "give 0 < probes <= 1"),
    ("tofu-prune-blocks", "optimize {w}/tiny.pt2 --budget 0.5 -o {w}/o.pt2 --method tofu --option prune_blocks=5",
     "give 0 <= prune_blocks <= 1"),
    ("calib-limit", ("optimize {w}/vit.pt2 --budget 0.5 -o {w}/o.pt2 --schedule auto --calib {w}/images "
                     "--calib-limit 0"), "--calib-limit 0 is out of range"),
    ("bench-batch", "bench {w}/tiny.pt2 {w}/tiny.pt2 --batch 0", "--batch 0 is out of range"),
    ("eval-batch", "eval {w}/vit.pt2 {w}/vit.pt2 --data {w}/images --task classify --batch 0",
     "--batch 0 is out of range"),
    ("input-shape-rank", "inspect {w}/tiny.pt2 --input-shape 2,15", "--input-shape 2,15 does not fit"),
    ("input-shape-size", "inspect {w}/tiny.pt2 --input-shape 2,16,32", "whose first input has shape B,15,32"),
    ("input-shape-static-batch", "inspect {w}/tiny_static.pt2 --input-shape 3,15,32", "has shape 2,15,32"),
    ("bench-unrelated", "bench {w}/tiny.pt2 {w}/vit.pt2 --runtime torch", "take different inputs"),
    ("eval-unrelated", "eval {w}/vit.pt2 {w}/bert.pt2 --data {w}/images --task classify", "take different inputs"),
    ("pickled-weight", "inspect {w}/evil_weights.pt2", "is stored as a pickle"),
    ("pickled-inputs", "inspect {w}/evil_inputs.pt2", "is a pickle of more than tensors"),
    ("pickled-object", "inspect {w}/evil_object.pt2", "'data/constants/opaque_obj_0' is not one torch.export"),
    ("pickled-bench", "bench {w}/evil_weights.pt2 {w}/tiny.pt2 --runtime torch", "--trust-pickle"),
    ("empty-pt2", "inspect {w}/empty.pt2", "cannot read {w}/empty.pt2 as a torch.export program"),
    ("corrupt-pt2", "inspect {w}/corrupt.pt2", "cannot read {w}/corrupt.pt2 as a torch.export program"),
    ("nan-gold", "eval {w}/bert.pt2 {w}/bert.pt2 --data {w}/nan_gold.tsv --task sts --tokenizer {tok}",
     "nan_gold.tsv line 2: the gold score is 'nan'"),
    ("constant-gold", ("eval {w}/bert.pt2 {w}/bert.pt2 --data {w}/flat_gold.tsv --task sts --tokenizer {tok} "
                       "--json {w}/e.json"), "Spearman is undefined: the gold scores are all equal"),
    ("zero-std", "eval {w}/vit.pt2 {w}/vit.pt2 --data {w}/images --task classify --std 0,0,0",
     "--std 0,0,0 has a value that is not positive"),
    ("nan-mean", "eval {w}/vit.pt2 {w}/vit.pt2 --data {w}/images --task classify --mean nan,0,0",
     "cannot read mean 'nan,0,0'"),
]


@pytest.mark.parametrize("args,message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input(work, args, message):
    before = md5s(work)
    cwd = os.getcwd()
    os.chdir(work)  # a payload that runs would leave MARKER here
    try:
        fill = {"w": str(work), "tok": tokenizer()}
        result = CliRunner().invoke(main, args.format(**fill).split())
    finally:
        os.chdir(cwd)
    errors = [line for line in result.stderr.splitlines() if not line.endswith(" samples")]  # progress lines
    assert result.exit_code == 2, result.output
    assert len(errors) == 1 and errors[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert "looks like a bug" not in errors[0]
    assert message.format(**fill) in errors[0]
    assert md5s(work) == before  # nothing written, nothing changed, no temporary file left
    assert not (work / MARKER).exists()


def test_crafted_archives_would_run_their_payload(work, tmp_path):
    """The crafted archives are real attacks: torch.export.load alone runs the payload."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for name in ("evil_weights.pt2", "evil_inputs.pt2"):
            with contextlib.suppress(Exception):  # the payload runs before the load fails
                torch.export.load(str(work / name))
            assert (tmp_path / MARKER).exists(), name
            os.remove(tmp_path / MARKER)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("args,target", [("optimize {w}/tiny.pt2 --schedule r=3 -o {w}/old.pt2", "old.pt2"),
                                         ("export {w}/tiny.pt2 -o {w}/old.onnx", "old.onnx")])
def test_full_disk_keeps_the_old_file(work, args, target):
    """A write that fails half-way (file-size limit: past it a write fails as on a full disk) leaves the old
    output as it was and no partial file."""
    before = md5s(work)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, "-m", "tokencompile.cli", *args.format(w=work).split()],
                          capture_output=True, text=True, preexec_fn=limit, check=False)
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: cannot write {work / target}: File too large"), proc.stderr
    assert error[0].endswith("; the old file is unchanged)")
    assert md5s(work) == before


def test_report_survives_a_failed_onnx_export(work, tmp_path, monkeypatch):
    from tokencompile.lowering import onnx_export

    def fail(*args, **kwargs):
        raise TokenCompileError("ONNX export failed: an unsupported op")
    monkeypatch.setattr(onnx_export, "export_onnx", fail)
    result = CliRunner().invoke(main, ["optimize", str(work / "tiny.pt2"), "--schedule", "r=3", "-o",
                                       str(tmp_path / "o.pt2"), "--report", str(tmp_path / "r.json"),
                                       "--onnx", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and result.stderr == "error: ONNX export failed: an unsupported op\n"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["onnx_error"] == "ONNX export failed: an unsupported op" and report["schedule"] == [3, 3, 3]
    assert sorted(os.listdir(tmp_path)) == ["o.pt2", "r.json"]


def test_overwrite_is_atomic_and_keeps_permissions(work, tmp_path):
    target = tmp_path / "out.pt2"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    result = CliRunner().invoke(main, ["optimize", str(work / "tiny.pt2"), "--schedule", "r=3", "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path) == ["out.pt2"] and os.stat(target).st_mode & 0o777 == 0o640
    assert torch.export.load(str(target)).module()(torch.randn(1, 15, 32))[0].shape == (1, 5)


def test_default_output_next_to_the_input(work, tmp_path):
    source = tmp_path / "model.pt2"
    source.write_bytes((work / "tiny.pt2").read_bytes())
    result = CliRunner().invoke(main, ["optimize", str(source), "--schedule", "r=3"])
    assert result.exit_code == 0 and f"wrote {tmp_path / 'model.tc.pt2'}" in result.output
    again = CliRunner().invoke(main, ["optimize", str(source), "--schedule", "r=2", "--force"])
    assert again.exit_code == 0 and "schedule r=2,2,2" in again.output
    assert sorted(os.listdir(tmp_path)) == ["model.pt2", "model.tc.pt2"]


def test_trusted_pickle_still_loads_a_clean_program(work):
    result = CliRunner().invoke(main, ["inspect", str(work / "tiny.pt2"), "--trust-pickle", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["blocks"] == 3


def test_model_output_program_loads_after_importing_its_type(tmp_path):
    """A program returning a transformers ModelOutput loads in a fresh process (the type is imported)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    ids = torch.randint(0, 1000, (2, 8))
    torch.export.save(torch.export.export(model, (ids, torch.ones_like(ids))), tmp_path / "out.pt2")
    script = ("import sys; from tokencompile.load import load_program; "
              "print(type(load_program(sys.argv[1])).__name__, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.pt2")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0 and proc.stdout.split() == ["ExportedProgram", "True"], proc.stderr
    assert proc.stderr == ""  # torch's warnings about the first attempt are not shown


def test_negative_r_list_in_python(work):
    program = torch.export.load(str(work / "tiny.pt2"))
    with pytest.raises(TokenCompileError, match="give a list of non-negative integers"):
        tokencompile.optimize(program, schedule=[3, -1, 2])


def test_strict_json_refuses_nan(tmp_path):
    from tokencompile.outputs import write_json

    with pytest.raises(TokenCompileError, match="contains NaN or Infinity"):
        write_json(str(tmp_path / "r.json"), {"spearman": float("nan")})
    assert os.listdir(tmp_path) == []


def test_own_kernel_plugins_do_not_block_tensorrt():
    from onnx import TensorProto, helper

    from tokencompile.lowering.tensorrt_check import check_tensorrt

    node = helper.make_node("TcMergeTokens", ["x", "w", "rep", "src", "dst"], ["y"], domain="tokencompile",
                            name="blocks.0/merge")
    plan = helper.make_node("TcTomePlan", ["x"], ["rep", "src", "dst"], domain="tokencompile", name="blocks.0/plan")
    value = helper.make_tensor_value_info
    graph = helper.make_graph([plan, node], "g", [value("x", TensorProto.FLOAT, None),
                                                  value("w", TensorProto.FLOAT, None)],
                              [value("y", TensorProto.FLOAT, None)])
    findings = {f.op_type: f for f in check_tensorrt(helper.make_model(graph))}
    assert not findings["TcMergeTokens"].blocking and "tokencompile TensorRT plugin" in findings["TcMergeTokens"].problem
    assert findings["TcTomePlan"].blocking and "writes plans in standard ops" in findings["TcTomePlan"].problem


def test_python_save_and_load(work, tmp_path):
    program = tokencompile.load_program(str(work / "tiny.pt2"))
    tokencompile.save_program(program, str(tmp_path / "copy.pt2"))
    assert tokencompile.load_program(str(tmp_path / "copy.pt2")).graph_signature.user_inputs == ("tokens",)
    with pytest.raises(TokenCompileError, match="cannot write .*missing/copy.pt2: No such file or directory"):
        tokencompile.save_program(program, str(tmp_path / "missing" / "copy.pt2"))
    with pytest.raises(TokenCompileError, match="is stored as a pickle"):
        tokencompile.load_program(str(work / "evil_weights.pt2"))
    assert os.listdir(tmp_path) == ["copy.pt2"]


def test_default_output_names():
    from tokencompile.outputs import default_program_path

    assert default_program_path("timm:vit_small_patch16_224") == os.path.abspath("vit_small_patch16_224.tc.pt2")
    assert default_program_path("hf:/models/bert-base/") == os.path.abspath("bert-base.tc.pt2")
    assert default_program_path("/data/net.pt") == "/data/net.tc.pt2"
    assert default_program_path("/data/vit.tc.pt2") == "/data/vit.tc.tc.pt2"
