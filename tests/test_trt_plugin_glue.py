"""The TensorRT plugin module (plugins/) against a stand-in for `tensorrt.plugin` that enforces what the
real decorators check (annotations are classes, attributes are plain int/float/str/bool/bytes, aot_impl
has a return annotation) and whose ShapeExpr, like TensorRT's, has no __rmul__. This runs the glue's
every line on the CPU; the real API behind it still needs a GPU (plugins/README.md)."""

import importlib.util
import inspect
import json
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATTRIBUTE_TYPES = (int, float, str, bool, bytes)


class ShapeExpr:
    def __init__(self, value, fake=False):
        self.value, self.is_fake = (value.value if isinstance(value, ShapeExpr) else value), fake

    def _other(self, other):
        return other.value if isinstance(other, ShapeExpr) else other

    def __mul__(self, other):
        return ShapeExpr(self.value * self._other(other))

    def __add__(self, other):
        return ShapeExpr(self.value + self._other(other))

    def __sub__(self, other):
        return ShapeExpr(self.value - self._other(other))

    def __floordiv__(self, other):
        return ShapeExpr(self.value // self._other(other))

    @property
    def is_constant(self):
        if self.is_fake:
            raise RuntimeError("is_constant on a fake expression")
        return True

    def constant_value(self):
        return self.value


class ShapeExprs(list):
    def __init__(self, n):
        super().__init__([None] * n)

    def __setitem__(self, index, value):
        assert isinstance(value, ShapeExpr), f"ShapeExprs holds ShapeExpr, got {type(value).__name__}"
        super().__setitem__(index, value)


class TensorDesc:
    def __init__(self, shape=(), dtype=None):
        self.shape_expr, self.dtype = [ShapeExpr(d) for d in shape], dtype

    def like(self):
        return TensorDesc([d.value for d in self.shape_expr], self.dtype)


class KernelLaunchParams:
    grid_x = grid_y = grid_z = block_x = shared_mem = None


def _stub_modules(registered):
    trt = types.ModuleType("tensorrt")
    for name in ("float32", "float16", "bfloat16", "int64", "int32", "bool"):
        setattr(trt, name, f"trt.{name}")
    trtp = types.ModuleType("tensorrt.plugin")

    def register(name):
        def wrap(fn):
            for param in inspect.signature(fn).parameters.values():
                annotation = param.annotation
                assert inspect.isclass(annotation), f"{name}: {param.name} annotation {annotation!r} is not a class"
                assert annotation is TensorDesc or annotation in ATTRIBUTE_TYPES, (name, param.name, annotation)
            registered[("describe", name)] = fn
            return fn
        return wrap

    def aot_impl(name):
        def wrap(fn):
            signature = inspect.signature(fn)
            assert signature.return_annotation is not inspect.Signature.empty, f"{name}: aot_impl without return"
            assert all(inspect.isclass(p.annotation) or p.name == "outputs" for p in signature.parameters.values())
            registered[("aot", name)] = fn
            return fn
        return wrap

    trtp.register, trtp.aot_impl = register, aot_impl
    trtp.TensorDesc, trtp.ShapeExpr, trtp.ShapeExprs, trtp.KernelLaunchParams = (TensorDesc, ShapeExpr, ShapeExprs,
                                                                                 KernelLaunchParams)
    trtp.SymIntExprs = lambda n: [None] * n
    trtp.SymInt32 = lambda value: ("i32", value)
    trtp.cdiv = lambda a, b: ShapeExpr((ShapeExpr(a).value + b - 1) // b)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def glue(monkeypatch, tmp_path):
    registered = {}
    trt, trtp = _stub_modules(registered)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    params = [("x_ptr", "*fp32"), ("weight_ptr", "*fp32"), ("rep_ptr", "*i64"), ("src_ptr", "*i64"),
              ("dst_ptr", "*i64"), ("N", "i32"), ("C", "i32"), ("n_out", "i32"), ("m", "i32"), ("out_ptr", "*fp32"),
              ("global_scratch", "*i8"), ("profile_scratch", "*i8")]
    gather = [("t_ptr", "*fp32"), ("rep_ptr", "*i64"), ("outer", "i32"), ("N", "i32"), ("inner", "i32"),
              ("n_out", "i32"), ("t_batch_stride", "i32"), ("out_ptr", "*fp32"), ("global_scratch", "*i8"),
              ("profile_scratch", "*i8")]
    kernels = [{"name": "merge_tokens_fp32", "entry": "merge_kernel", "ptx": "m.ptx", "ptx_no_scratch": "m.ns.ptx",
                "params": [{"name": n, "type": t} for n, t in params], "grid": ["B", "n_out", "cdiv(C, 128)"],
                "threads_per_block": 128, "shared_bytes": 0},
               {"name": "gather_tokens_b4_rows", "entry": "gather_kernel", "ptx": "g.ptx", "ptx_no_scratch": "g.ns.ptx",
                "params": [{"name": n, "type": t} for n, t in gather], "grid": ["B * outer", "n_out", "cdiv(inner, 128)"],
                "threads_per_block": 128, "shared_bytes": 0}]
    (tmp_path / "manifest.json").write_text(json.dumps({"kernels": kernels}))
    for name in ("m.ns.ptx", "g.ns.ptx"):
        (tmp_path / name).write_text(f"// {name}")
    spec = importlib.util.spec_from_file_location("tokencompile_trt_plugins",
                                                  os.path.join(ROOT, "plugins", "tokencompile_trt_plugins.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register_plugins(tmp_path)
    return registered


def test_every_plugin_registers_and_describes_its_outputs(glue):
    names = {name for _, name in glue}
    assert names == {f"tokencompile::{op}" for op in ("TcMergeTokens", "TcSumTokens", "TcGatherTokens",
                                                       "TcTomePlan", "TcTopkPlan")}
    x, w = TensorDesc((8, 197, 384), "trt.float32"), TensorDesc((8, 197), "trt.float32")
    rep, src = TensorDesc((8, 101), "trt.int64"), TensorDesc((8, 96), "trt.int64")
    (merged,) = glue[("describe", "tokencompile::TcMergeTokens")](x, w, rep, src, src)
    assert [d.value for d in merged.shape_expr] == [8, 101, 384] and merged.dtype == "trt.float32"
    plan = glue[("describe", "tokencompile::TcTomePlan")](TensorDesc((8, 197, 64), "trt.float32"), w, 16, 1, 0, 1)
    assert [[d.value for d in o.shape_expr] for o in plan] == [[8, 181], [8, 16], [8, 16]]
    assert all(o.dtype == "trt.int64" for o in plan)


def test_aot_launch_of_merge_and_broadcast_gather(glue):
    x, w = TensorDesc((8, 197, 384), "trt.float32"), TensorDesc((8, 197), "trt.float32")
    rep, src = TensorDesc((8, 101), "trt.int64"), TensorDesc((8, 96), "trt.int64")
    name, ptx, launch, scalars = glue[("aot", "tokencompile::TcMergeTokens")](x, w, rep, src, src, (), 0)
    assert name == "merge_kernel" and ptx == "// m.ns.ptx"
    assert [ShapeExpr(g).value for g in (launch.grid_x, launch.grid_y, launch.grid_z)] == [8, 101, 3]
    assert [(kind, ShapeExpr(v).value) for kind, v in scalars] == [("i32", 197), ("i32", 384), ("i32", 101),
                                                                     ("i32", 96)]
    # a batch-1 mask gathered for 8 samples: batch stride 0 (broadcast), token axis 2 of [1, 4, 197, 197]
    mask = TensorDesc((1, 4, 197, 197), "trt.float32")
    _, _, launch, scalars = glue[("aot", "tokencompile::TcGatherTokens")](mask, rep, 2, (), 0)
    values = [ShapeExpr(v).value for _, v in scalars]
    assert values == [4, 197, 197, 101, 0]
