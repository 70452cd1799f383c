"""Output files: every path is checked before the work starts, and written atomically.

A write goes to a temporary file in the target's folder, is flushed to disk, then renamed over the
target: on any failure the old file is untouched and no partial file is left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable

from .errors import TokenCompileError

WHAT = {".pt2": "a torch.export program", ".onnx": "an ONNX model", ".json": "JSON", ".png": "a PNG image",
        ".engine": "a TensorRT engine"}


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def _check_folder(folder: str, option: str, path: str) -> None:
    """The folder must exist, be a folder, and accept new files."""
    if not os.path.isdir(folder):
        existing = folder
        while existing and not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if existing and not os.path.isdir(existing):
            raise TokenCompileError(f"cannot write {option} {path}: {existing} is a file, not a folder",
                                    "choose a path inside a folder")
        raise TokenCompileError(f"cannot write {option} {path}: the folder {folder} does not exist",
                                f"create it (mkdir -p {folder}) or choose another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".tokencompile-probe-", dir=folder)
    except OSError as error:
        raise TokenCompileError(f"cannot write {option} {path}: {error.strerror or error} in {folder}",
                                "choose a writable folder") from None
    os.close(handle)
    os.remove(probe)


def check_output(path: str, option: str, extensions: tuple[str, ...], inputs: Iterable[str | None] = (),
                 hint: str | None = None) -> str:
    """The absolute path of an output file, after checking its name, its folder and that it is no input.

    ``extensions``: the endings allowed (the first names what is written); ``hint``: an extra fix for a
    wrong ending."""
    path = os.fspath(path)
    absolute = os.path.abspath(path)
    stem, extension = os.path.splitext(absolute)
    if extension.lower() not in extensions:
        what = WHAT.get(extensions[0], extensions[0])
        fix = f"name it {os.path.basename(stem)}{extensions[0]}" + (f"; {hint}" if hint else "")
        raise TokenCompileError(f"{option} {path} does not end in {' or '.join(extensions)}, but {what} is "
                                "written there", fix)
    if os.path.isdir(absolute):
        raise TokenCompileError(f"{option} {path} is a folder", "give a file name")
    if os.path.lexists(absolute) and not os.path.isfile(absolute):
        raise TokenCompileError(f"{option} {path} exists and is not a regular file", "choose another path")
    for source in inputs:
        if source and os.path.exists(source) and _same_file(absolute, source):
            raise TokenCompileError(f"{option} {path} is the input {source}: writing it would destroy the input",
                                    "choose another output path")
        if source and os.path.isdir(source) and os.path.lexists(absolute) and _inside(absolute, source):
            raise TokenCompileError(f"{option} {path} is a file of the input folder {source}: writing it would "
                                    "change the input", "choose another output path")
    _check_folder(os.path.dirname(absolute), option, path)
    return absolute


def check_outputs(outputs: list[tuple], inputs: Iterable[str | None] = ()) -> list[str | None]:
    """check_output for each (option, path or None, extensions[, hint]); no two outputs may be the same file."""
    inputs = list(inputs)
    checked: list[str | None] = []
    for option, path, extensions, *hint in outputs:
        checked.append(None if path is None else check_output(path, option, extensions, inputs, *hint))
    given = [(entry[0], path) for entry, path in zip(outputs, checked) if path]
    for index, (option, path) in enumerate(given):
        for other_option, other in given[:index]:
            if path == other:
                raise TokenCompileError(f"{other_option} and {option} both write {path}", "give different paths")
    return checked


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, then fsync and rename it to ``path``; on failure remove it, keep ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, extension = os.path.splitext(name)
    existed = os.path.exists(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".partial{extension}", dir=folder)
    except OSError as error:
        raise TokenCompileError(f"cannot write {path}: {error.strerror or error}", "choose a writable folder") \
            from None
    os.close(handle)
    try:
        write(temporary)
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o666 & ~_umask()
        os.chmod(temporary, mode)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and "write" in str(error).lower()):
            reason = error.strerror if isinstance(error, OSError) and error.strerror else \
                str(error).strip().splitlines()[-1]
            raise TokenCompileError(f"cannot write {path}: {reason}", "free some space or choose another folder"
                                    + ("; the old file is unchanged" if existed else "")) from error
        raise


def write_bytes(path: str, data: bytes) -> None:
    """``data`` written atomically to ``path``."""

    def write(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(data)
    write_atomically(path, write)


def save_program(program, path: str) -> None:
    """torch.export.save into memory, then written atomically (torch's own archive writer aborts the process
    when the disk fills up)."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    write_bytes(path, buffer.getvalue())


def write_json(path: str, data) -> None:
    """Strict JSON (no NaN / Infinity), written atomically."""
    try:
        text = json.dumps(data, indent=2, allow_nan=False)
    except ValueError:
        raise TokenCompileError(f"the result to write to {path} contains NaN or Infinity",
                                "rerun with --debug and report it") from None
    write_bytes(path, (text + "\n").encode())


def default_program_path(model: str) -> str:
    """Where `optimize` writes without -o: <input stem>.tc.pt2 next to the input, or in the current folder
    for a model id (timm:NAME, hf:DIR)."""
    if model.startswith("timm:"):
        return os.path.abspath(f"{model[5:]}.tc.pt2")
    if model.startswith("hf:"):
        return os.path.abspath(f"{os.path.basename(os.path.normpath(model[3:]))}.tc.pt2")
    return f"{os.path.splitext(os.path.abspath(model))[0]}.tc.pt2"
