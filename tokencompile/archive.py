"""Check a .pt2 archive before torch.export.load: refuse entries that loading would unpickle with code.

torch.export.save writes JSON (the program, payload configs), raw tensor bytes and the example inputs
as a tensors-only pickle. torch.export.load unpickles without restrictions (running any code the pickle
names) the weights and constants whose config says ``use_pickle``, custom and opaque objects, and any
pickle the restricted (weights-only) unpickler refuses. Those need --trust-pickle.
"""

from __future__ import annotations

import io
import json
import re
import zipfile

import torch

from .errors import TokenCompileError

METADATA = re.compile(r"(archive_format|archive_version|byteorder|version|\.data/version|\.data/serialization_id"
                      r"|models/[^/]+\.json|serialized_[a-z_]+\.json|extra/.+)")
PAYLOAD_CONFIG = re.compile(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json")
RAW_TENSOR = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
# pickles holding tensors only (example inputs; the older formats' state dict and constants)
TENSOR_PICKLE = re.compile(r"data/(sample_inputs|weights|constants)/[^/]+\.pt|serialized_[a-z_]+\.pt")


def _refuse(path: str, what: str, why: str) -> TokenCompileError:
    return TokenCompileError(f"{path}: {what} {why}; loading it could run arbitrary code",
                             "pass --trust-pickle if you trust the file's source")


def _root(names: list[str]) -> str:
    """The folder every entry of a pt2 archive sits in ('' for the older flat format)."""
    if "version" in names:
        return ""
    roots = {name.split("/", 1)[0] for name in names}
    return roots.pop() + "/" if len(roots) == 1 and all("/" in name for name in names) else ""


def _check_payload_config(path: str, entry: str, data: bytes, pickled: set[str]) -> None:
    try:
        config = json.loads(data)["config"]
    except (ValueError, KeyError, TypeError):
        raise TokenCompileError(f"{path}: the archive entry {entry!r} is not a payload config",
                                "save the program again with torch.export.save") from None
    for name, meta in config.items():
        file_name = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not RAW_TENSOR.fullmatch(f"{entry.rsplit('/', 1)[0]}/{file_name}"):
            pickled.add(name)


def _loads_tensors_only(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception:  # noqa: BLE001 - whatever the restricted unpickler refuses
        return False
    return True


def check_archive(path: str) -> None:
    """Raise TokenCompileError unless loading the .pt2 at ``path`` unpickles nothing beyond tensors."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise TokenCompileError(f"cannot read {path} as a torch.export program ({error})",
                                "save it with torch.export.save") from None
    with archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
        root = _root(names)
        pickled: set[str] = set()
        for name in names:
            entry = name[len(root):]
            if METADATA.fullmatch(entry) or RAW_TENSOR.fullmatch(entry):
                continue
            if PAYLOAD_CONFIG.fullmatch(entry):
                _check_payload_config(path, entry, archive.read(name), pickled)
            elif TENSOR_PICKLE.fullmatch(entry):
                if not _loads_tensors_only(archive.read(name)):
                    raise _refuse(path, f"the archive entry {entry!r}", "is a pickle of more than tensors")
            else:
                raise _refuse(path, f"the archive entry {entry!r}", "is not one torch.export.save writes")
        if pickled:
            raise _refuse(path, f"the weight or constant {min(pickled)!r}", "is stored as a pickle")
