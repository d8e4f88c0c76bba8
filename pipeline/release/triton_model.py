"""Shipyard's Triton Python-backend model, copied as `model.py` into a packaged repository.

One file, three roles (the config's `role` parameter): `preprocess` tokenizes TEXT (and PAIR) with
the release's tokenizer as the gate encoded its rows; `postprocess` turns the inference model's
outputs into the task's prediction (one JSON object per row) with the gate's own task code; `ort`
runs an ONNX artifact with ONNX Runtime, for a server without the onnxruntime backend, and
`openvino` an OpenVINO IR with OpenVINO, for a server without the openvino backend. Triton's
Python stub does not read PYTHONPATH, so the `python_path` parameter carries the paths of the
environment that has Shipyard and its libraries (`shipyard package --python-path`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

AUX = ("word_index", "context_offsets")  # what postprocess reads besides the model's outputs


class TritonPythonModel:
    """The model Triton's Python backend loads (its interface: initialize, execute)."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        for path in reversed([p for p in params.get("python_path", "").split(os.pathsep) if p]):
            if path not in sys.path:
                sys.path.insert(0, path)
        import triton_python_backend_utils as pb  # the stub provides it

        self.pb = pb
        self.role = params["role"]
        self.outputs = [o["name"] for o in config.get("output", [])]
        here = Path(args["model_repository"]) / args["model_version"]
        if self.role == "ort":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = int(params.get("threads", "0"))
            self.session = onnxruntime.InferenceSession(str(here / "model.onnx"), options,
                                                        providers=["CPUExecutionProvider"])
            return
        if self.role == "openvino":
            import openvino

            threads = int(params.get("threads", "0"))
            self.compiled = openvino.Core().compile_model(
                str(here / "model.xml"), "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})})
            self.ov_inputs = [port.get_any_name() for port in self.compiled.inputs]
            self.ov_request = self.compiled.create_infer_request()  # one instance runs one request at a time
            return
        from calibration.encode import Encoder
        from calibration.sampling import Columns
        from pipeline.parity.tasks import Pooling, Task
        from pipeline.release import serving
        from pipeline.tasks import task_spec

        self.record, tokenizer = serving.load(here)
        spec = task_spec(self.record.task)
        self.encoder = Encoder(tokenizer, Columns("text", "pair" if self.record.text_pair else None),
                               self.record.max_length, self.record.padding, spec.encoding)
        pooling = self.record.pooling
        self.task = Task(self.record.task, Pooling(pooling.mode, pooling.normalize) if pooling else Pooling(),
                         self.record.max_answer_tokens or 30, self.record.min_cosine or 0.99)

    def _strings(self, request, name: str) -> list[str]:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return [] if tensor is None else [v.decode() if isinstance(v, bytes) else str(v)
                                          for v in tensor.as_numpy().reshape(-1)]

    def execute(self, requests):
        import numpy as np

        from calibration.encode import CONTEXT_OFFSETS, WORD_INDEX

        responses = []
        for request in requests:
            if self.role == "ort":
                feeds = {i.name: self.pb.get_input_tensor_by_name(request, i.name).as_numpy()
                         for i in self.session.get_inputs()}
                values = self.session.run(self.outputs, feeds)
                tensors = [self.pb.Tensor(name, value) for name, value in zip(self.outputs, values, strict=True)]
            elif self.role == "openvino":
                feeds = {name: self.pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.ov_inputs}
                result = self.ov_request.infer(feeds)
                by_name = {port.get_any_name(): np.array(result[port]) for port in self.compiled.outputs}
                tensors = [self.pb.Tensor(name, by_name[name]) for name in self.outputs]
            elif self.role == "preprocess":
                texts, pairs = self._strings(request, "TEXT"), self._strings(request, "PAIR")
                rows = [{"text": t, **({"pair": pairs[i]} if self.record.text_pair else {})} for i, t in enumerate(texts)]
                batch = self.encoder.encode(rows)
                renamed = {WORD_INDEX: "word_index", CONTEXT_OFFSETS: "context_offsets"}
                tensors = [self.pb.Tensor(renamed.get(k, k), v) for k, v in batch.items() if renamed.get(k, k) in self.outputs]
            else:
                from pipeline.parity.tasks import readable

                texts, pairs = self._strings(request, "TEXT"), self._strings(request, "PAIR")
                batch = {}
                for name, key in (("word_index", WORD_INDEX), ("context_offsets", CONTEXT_OFFSETS)):
                    tensor = self.pb.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        batch[key] = tensor.as_numpy()
                mask = self.pb.get_input_tensor_by_name(request, "attention_mask")
                if mask is not None:
                    batch["attention_mask"] = mask.as_numpy()
                raw = {name: self.pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.task.outputs}
                reduced = [self.task.reduce(raw, batch)]
                rows = readable(self.task, reduced, [batch], self.record.id2label, texts, pairs or None)
                encoded = np.array([json.dumps(row).encode() for row in rows], dtype=object).reshape(-1, 1)
                tensors = [self.pb.Tensor("PREDICTION", encoded)]
            responses.append(self.pb.InferenceResponse(output_tensors=tensors))
        return responses
