"""TensorRT: readiness rules and the operator lists each TensorRT version supports."""
