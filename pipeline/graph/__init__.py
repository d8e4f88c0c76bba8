"""The ONNX graph: BERT-block finding, generic rewrites, and the proof that a graph loads and runs."""
