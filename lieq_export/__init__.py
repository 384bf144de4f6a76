"""lieq-export: layer-wise mixed-bit quantization of small LLMs for ExecuTorch and ONNX."""

__version__ = "0.1.0"
