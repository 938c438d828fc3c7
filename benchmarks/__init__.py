"""onnxq against its peers (ONNX Runtime's quantizers, PyTorch's int8), all in one run.

``python -m benchmarks.run`` (see ``benchmarks/run.py``). This package is the only place that
imports ``onnxruntime.quantization`` and ``torch.ao``: they are the peers being measured.
"""
