"""Lowering optimized programs to deployable artifacts (ONNX; TensorRT readiness)."""
