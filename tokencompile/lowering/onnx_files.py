"""Write ONNX models atomically, with the weights in a side file when one protobuf cannot hold them.

A protobuf message is at most 2 GB, so a model whose weights are larger (an fp32 model above about 500M
parameters) is written as ``NAME.onnx`` plus ``NAME.onnx.data`` (the ONNX external-data format, which ONNX
Runtime and TensorRT read from the model's folder). Both files are written and checked in a temporary folder
beside the target, then moved into place, the weights first: a failed write leaves the old model as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import onnx

from ..errors import TokenCompileError
from ..outputs import write_bytes

# the largest weight total kept inside the .onnx file: 2 GB less room for the graph itself
SINGLE_FILE_LIMIT = 2**31 - 2**27
EXTERNAL_THRESHOLD = 1024  # tensors this small stay in the graph (shapes, scalars, small constants)


def data_file_name(path: str) -> str:
    return os.path.basename(path) + ".data"


def weight_bytes(model) -> int:
    """Bytes of the initializers of an onnx_ir model (subgraphs included)."""
    return sum(value.const_value.nbytes for graph in model.graphs() for value in graph.initializers.values()
               if value.const_value is not None)


def external_data_files(path: str) -> set[str]:
    """The external-data files (relative names) a saved model refers to."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file: it refers to nothing
        return set()
    names = set()
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            names.update(entry.value for entry in tensor.external_data if entry.key == "location")
    return names


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _fsync(path: str) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_with_external_data(model, path: str, check: bool) -> None:
    import onnx_ir

    folder, name = os.path.split(path)
    data = data_file_name(path)
    try:
        staging = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder)
    except OSError as error:
        raise TokenCompileError(f"cannot write {path}: {error.strerror or error}", "choose a writable folder") \
            from None
    try:
        staged = os.path.join(staging, name)
        onnx_ir.save(model, staged, external_data=data, size_threshold_bytes=EXTERNAL_THRESHOLD)
        if check:
            onnx.checker.check_model(staged, full_check=True)
        for file in (data, name):
            _fsync(os.path.join(staging, file))
        for file in (data, name):  # the weights first: the new graph never points at the old weights' file
            os.replace(os.path.join(staging, file), os.path.join(folder, file))
        _fsync(folder)
    except OSError as error:
        existed = os.path.exists(path)
        raise TokenCompileError(f"cannot write {path}: {error.strerror or error}", "free some space or choose "
                                "another folder" + ("; the old file is unchanged" if existed else "")) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_onnx(model, path: str, external_data: bool | None = None, check: bool = True) -> list[str]:
    """Write an onnx_ir model (or an onnx ModelProto) to ``path``, checked by the ONNX checker first.

    ``external_data``: None puts the weights in ``NAME.onnx.data`` only when they would not fit in one file;
    True always does. Returns the paths written. A ``NAME.onnx.data`` the replaced model used and the new
    one does not is removed."""
    import onnx_ir

    if isinstance(model, onnx.ModelProto):
        model = onnx_ir.serde.deserialize_model(model)
    path = os.path.abspath(path)
    stale = external_data_files(path) if os.path.isfile(path) else set()
    if external_data is None:
        external_data = weight_bytes(model) > SINGLE_FILE_LIMIT
    if external_data:
        _write_with_external_data(model, path, check)
        written = [path, os.path.join(os.path.dirname(path), data_file_name(path))]
    else:
        proto = onnx_ir.serde.serialize_model(model)
        if check:
            onnx.checker.check_model(proto, full_check=True)
        write_bytes(path, proto.SerializeToString())
        written = [path]
    own_data = os.path.join(os.path.dirname(path), data_file_name(path))
    if data_file_name(path) in stale and own_data not in written and os.path.isfile(own_data):
        os.remove(own_data)
    return written
