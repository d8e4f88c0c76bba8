"""The float16 graphs of the TensorRT FP16 targets keep in float32 what float16 gets wrong in these
families: DeBERTa's attention scores (they overflow) and ModernBERT's rotary angles (an angle of
thousands of radians has no fractional digits left in float16), on models made to show it."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from zoo import make_model

from pipeline.errors import ShipyardError
from pipeline.families import FAMILIES
from pipeline.parity.runners import OrtRunner
from pipeline.stages.export import export_onnx
from pipeline.stages.trt_onnx import to_float16

pytestmark = pytest.mark.slow


def _batch(folder, words: int, max_length: int):
    from calibration.encode import Encoder, load_tokenizer
    from calibration.sampling import Columns

    encoder = Encoder(load_tokenizer(folder, "text"), Columns(), max_length, "longest", "text")
    return encoder.encode([{"text": " ".join(f"w{i}" for i in range(n))} for n in (words, 7)])


def test_deberta_s_scores_stay_float32_where_float16_overflows(tmp_path):
    """Query and key weights scaled up (as training makes them) push DeBERTa's disentangled
    scores past float16's 65,504: converted as other families are, the graph returns Inf and is
    refused unwritten; with the family's `float32_scores` it matches the FP32 graph."""
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = make_model(tmp_path / "deberta", "deberta-v2")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("query_proj.weight", "key_proj.weight")):
                param.mul_(400)
    model.save_pretrained(str(folder))
    exported = tmp_path / "model.onnx"
    export_onnx(folder, exported, 17, "text-classification")
    assert FAMILIES["deberta-v2"].float32_scores

    with pytest.raises(ShipyardError, match="NaN or Inf"):
        to_float16(exported, tmp_path / "plain.onnx", False, "fp16", float32_scores=False)
    assert not (tmp_path / "plain.onnx").exists()
    options = to_float16(exported, tmp_path / "kept.onnx", False, "fp16", float32_scores=True)
    assert options["float32_nodes"] > 0
    batch = _batch(folder, 100, 128)
    expected, got = (OrtRunner(p).infer(batch)["logits"] for p in (exported, tmp_path / "kept.onnx"))
    assert np.isfinite(got).all() and np.abs(expected - got).max() < 1e-3


def _first_cos(path, batch):
    """The first rotary Cos output of a graph, whatever its type after conversion."""
    model = onnx.load(str(path))
    cos = next(n for n in model.graph.node if n.op_type == "Cos")
    for elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.append(onnx.helper.make_tensor_value_info(cos.output[0], elem, None))
        try:
            session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # the other element type
            continue
        names = {i.name for i in session.get_inputs()}
        return session.run([cos.output[0]], {k: v for k, v in batch.items() if k in names})[0].astype(np.float64)
    raise AssertionError("no Cos output read")


def test_modernbert_s_rotary_angles_stay_float32_at_long_contexts(tmp_path, monkeypatch):
    """At 1,500 tokens, positions and inverse frequencies in float16 put cos(angle) off by up to
    0.96; kept in float32 (positions never rounded on the way between float32 nodes) it is exact."""
    import pipeline.stages.trt_onnx as trt_onnx

    folder = make_model(tmp_path / "modernbert", "modernbert")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # rotary: no position weights to resize
    (folder / "config.json").write_text(json.dumps(config))
    exported = tmp_path / "model.onnx"
    export_onnx(folder, exported, 17, "text-classification")
    batch = _batch(folder, 1500, 2048)
    assert batch["input_ids"].shape[1] > 1500
    reference = _first_cos(exported, batch)

    to_float16(exported, tmp_path / "kept.onnx", False, "fp16", float32_scores=False)
    assert np.abs(_first_cos(tmp_path / "kept.onnx", batch) - reference).max() < 1e-5
    monkeypatch.setattr(trt_onnx, "float32_nodes", lambda model, scores: [])
    to_float16(exported, tmp_path / "plain.onnx", False, "fp16", float32_scores=False)
    assert np.abs(_first_cos(tmp_path / "plain.onnx", batch) - reference).max() > 0.1  # what the rule prevents


def test_a_bert_s_float16_graph_keeps_no_extra_node(tiny, tmp_path):
    """BERT has no index arithmetic, rotary angles or family rule: nothing beyond the LayerNorms
    and Softmax is kept float32, so its TensorRT FP16 engines lose no speed to the rules."""
    exported = tmp_path / "model.onnx"
    export_onnx(tiny.model, exported, 17, "text-classification")
    options = to_float16(exported, tmp_path / "fp16.onnx", False, "fp16", float32_scores=False)
    assert options["float32_nodes"] == 0
