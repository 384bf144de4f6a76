"""Lowering of lieq-export quantized models to deployment formats (installed as lieq_export.backends)."""
