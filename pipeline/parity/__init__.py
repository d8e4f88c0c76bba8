"""Parity: runners (PyTorch, ONNX Runtime, TensorRT), tasks and metrics, the comparator and the gate policy."""
