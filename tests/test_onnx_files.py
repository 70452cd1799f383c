"""ONNX files: weights in NAME.onnx.data past one protobuf's 2 GB (or on request), written atomically, read
back by ONNX Runtime with the same results; a replaced model's stale weights file removed."""

from __future__ import annotations

import os

import onnx
import pytest
import torch

import tokencompile
from tokencompile.errors import TokenCompileError
from tokencompile.lowering import onnx_files
from tokencompile.lowering.onnx_export import export_onnx, verify_onnx
from tokencompile.lowering.onnx_files import external_data_files, save_onnx


@pytest.fixture(scope="module")
def reduced(tiny_vit):
    return tokencompile.optimize(tiny_vit, schedule=[4, 4]).program


def _inputs(batch):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch)),)


def test_external_data_on_request(reduced, tmp_path):
    path = tmp_path / "vit.onnx"
    export_onnx(reduced, str(path), _inputs(2), external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["vit.onnx", "vit.onnx.data"]
    assert external_data_files(str(path)) == {"vit.onnx.data"}
    weights = sum(p.numel() * p.element_size() for p in reduced.state_dict.values())
    assert os.path.getsize(tmp_path / "vit.onnx.data") > 0.95 * weights
    inline = [t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024]
    assert inline == []
    onnx.checker.check_model(str(path), full_check=True)
    rows = verify_onnx(reduced, str(path), [_inputs(1), _inputs(3)])
    assert all(row["max_abs_error"] <= 1e-5 for row in rows), rows


def test_weights_past_the_limit_go_to_a_side_file(reduced, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "SINGLE_FILE_LIMIT", 10_000)  # the tiny ViT's weights stand for > 2 GB
    export_onnx(reduced, str(tmp_path / "vit.onnx"), _inputs(2))
    assert sorted(os.listdir(tmp_path)) == ["vit.onnx", "vit.onnx.data"]
    monkeypatch.setattr(onnx_files, "SINGLE_FILE_LIMIT", 2**31 - 2**27)
    export_onnx(reduced, str(tmp_path / "vit.onnx"), _inputs(2))   # fits again: the stale weights file goes
    assert os.listdir(tmp_path) == ["vit.onnx"] and external_data_files(str(tmp_path / "vit.onnx")) == set()
    assert verify_onnx(reduced, str(tmp_path / "vit.onnx"), [_inputs(2)])[0]["ok"]


def test_a_failed_write_keeps_the_old_model_and_its_weights(reduced, tmp_path, monkeypatch):
    path = tmp_path / "vit.onnx"
    export_onnx(reduced, str(path), _inputs(2), external_data=True)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    import onnx_ir

    real_save = onnx_ir.save

    def full_disk(model, staged, **kwargs):
        real_save(model, staged, **kwargs)  # both files written in the staging folder, then the disk fills
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onnx_ir, "save", full_disk)
    with pytest.raises(TokenCompileError) as error:
        save_onnx(onnx.load(str(path)), str(path), external_data=True)
    assert str(error.value) == (f"cannot write {path}: No space left on device (free some space or choose another "
                                "folder; the old file is unchanged)")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before  # no staging left


@pytest.mark.parametrize("plugins", [False, True])
def test_cli_export_reads_back_with_external_data(reduced, tmp_path, plugins):
    from click.testing import CliRunner

    from tokencompile.cli import main

    torch.export.save(reduced, tmp_path / "vit.pt2")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "vit.pt2"), "-o", str(tmp_path / "out.onnx"),
                                       "--external-data", "--verify",
                                       *(["--plugins"] if plugins else ["--check", "trt"])])
    assert result.exit_code == 0, result.output
    assert "verify batch 1: max abs error" in result.output and "FAILED" not in result.output
    assert plugins or "TensorRT check: 0 blocking" in result.output
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data", "vit.pt2"]
