"""Graph surgery on graphs other tools touched: shape inference, onnxslim, older opsets,
deduplicated constants, other activation forms; and the proof every written graph must pass."""

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import pytest
from conftest import invoke
from zoo import make_model, reference_pruned_export

from pipeline.graph import model as graph_model
from pipeline.graph.attention import find_attention_blocks
from pipeline.graph.bert import Graph, find_ffn_blocks
from pipeline.graph.proof import GraphCheckError, prove_runs
from pipeline.parity.runners import OrtRunner
from pipeline.stages.export import export_onnx

pytestmark = pytest.mark.slow
HEADS = {0: [0, 2], 1: [3]}



@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs") / "model.onnx"
    export_onnx(tiny.model, out, 17, "text-classification")
    return out


def _reference_prune(folder, tmp_path, opset=17):
    return reference_pruned_export(folder, tmp_path, HEADS, opset)


def _assert_same_logits(a, b, folder):
    from calibration.encode import Encoder, load_tokenizer
    from calibration.sampling import Columns

    encoder = Encoder(load_tokenizer(folder, "text"), Columns(), 48, "longest", "text")
    rows = [{"text": t} for t in ("hello there", "a rather longer sentence about trains and snow", "ok")]
    for batch in (encoder.encode(rows), encoder.encode(rows[1:2] * 4)):
        assert np.abs(OrtRunner(a).infer(batch)["logits"] - OrtRunner(b).infer(batch)["logits"]).max() <= 1e-4


def test_shape_inferred_graph_prunes_into_a_model_that_loads_and_passes(tiny, tiny_holdout_small, tiny_export,
                                                                       tmp_path):
    annotated = tmp_path / "annotated.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(tiny_export))), str(annotated))
    assert len(onnx.load(str(annotated)).graph.value_info) > 100
    out = tmp_path / "pruned.onnx"
    result = invoke("prune", "--model", annotated, "--out", out, "--calibration", tiny_holdout_small,
                    "--tokenizer", tiny.model, "--ffn", "0.1", "--heads-per-layer", "1", "--samples", "64",
                    "--max-length", "64", "--quiet")
    assert result.exit_code == 0, result.output
    result = invoke("validate", "--reference", tiny.model, "--artifact", out, "--data", tiny_holdout_small,
                    "--samples", "300", "--max-length", "64", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gate"]["min_agreement"] == 0.95  # the pruned gate, passed


def test_stale_annotations_are_caught_by_the_runtime_proof(tiny_export, tmp_path):
    """The bug this guards against: slicing weights under stale value_info gave exit 0 and a
    model ONNX Runtime refuses. The proof must refuse such a file."""
    model = graph_model.from_proto(onnx.shape_inference.infer_shapes(onnx.load(str(tiny_export))))
    g = Graph(model)
    block = find_ffn_blocks(g)[0]
    keep = np.arange(block.size // 2)
    g.set_array(block.w1, g.array(block.w1)[:, keep])
    g.set_array(block.b1, g.array(block.b1)[keep])  # type: ignore[arg-type]
    g.set_array(block.w2, g.array(block.w2)[keep, :])
    graph_model.save(model, tmp_path / "stale.onnx")
    with pytest.raises(GraphCheckError, match="nothing was written"):
        prove_runs(tmp_path / "stale.onnx", "test")


@pytest.mark.parametrize("tool", ["onnxslim", "onnxsim"])
def test_simplified_graph_prunes_exactly(tiny, tiny_export, tmp_path, tool):
    """onnxslim shares shape constants across layers; onnxsim folds projections into
    Reshape-Gemm-Reshape. Both must prune to what PyTorch's prune_heads gives."""
    slim = tmp_path / "slim.onnx"
    if tool == "onnxslim":
        import onnxslim

        onnx.save(onnxslim.slim(onnx.load(str(tiny_export))), str(slim))
    else:
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(tiny_export)))
        assert ok and any(n.op_type == "Gemm" for n in simplified.graph.node)
        onnx.save(simplified, str(slim))
    out = tmp_path / "pruned.onnx"
    result = invoke("prune", "--model", slim, "--out", out, "--tokenizer", tiny.model, "--quiet",
                    "--prune-heads", json.dumps({str(k): v for k, v in HEADS.items()}))
    assert result.exit_code == 0, result.output
    _assert_same_logits(out, _reference_prune(tiny.model, tmp_path), tiny.model)


@pytest.mark.parametrize("opset", [14, 16, 20])
def test_other_opsets_prune_exactly(tiny, tmp_path, opset):
    """Opsets 14-16 decompose LayerNorm into elementwise ops; opset 20 emits the Gelu op."""
    exported = tmp_path / "model.onnx"
    export_onnx(tiny.model, exported, opset, "text-classification")
    ops = {n.op_type for n in onnx.load(str(exported)).graph.node}
    assert ("LayerNormalization" not in ops) if opset < 17 else ("Gelu" in ops)
    out = tmp_path / "pruned.onnx"
    result = invoke("prune", "--model", exported, "--out", out, "--tokenizer", tiny.model, "--quiet",
                    "--prune-heads", json.dumps({str(k): v for k, v in HEADS.items()}))
    assert result.exit_code == 0, result.output
    _assert_same_logits(out, _reference_prune(tiny.model, tmp_path, opset), tiny.model)


@pytest.mark.parametrize("simplifier", [None, "onnxsim"])
def test_deduplicated_constants_prune_exactly(tmp_path, simplifier):
    """A freshly initialised BERT has equal (zero) biases; the exporter shares them through
    Identity nodes, and onnxsim has every Gemm read one zero bias directly (seen: prune exited 2,
    "BERT blocks not found"). Each layer must get its own copy before one is sliced."""
    import torch
    import transformers

    folder = make_model(tmp_path / "fresh", "bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    model.save_pretrained(str(folder))
    exported = tmp_path / "model.onnx"
    export_onnx(folder, exported, 17, "text-classification")
    assert any(n.op_type == "Identity" for n in onnx.load(str(exported)).graph.node)
    if simplifier == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(onnx.load(str(exported)))
        readers = Counter(name for n in simplified.graph.node for name in n.input)
        biases = [i.name for i in simplified.graph.initializer if len(i.dims) == 1]
        assert ok and max(readers[b] for b in biases) > 2, "onnxsim no longer shares one bias: test moot"
        exported = tmp_path / "simplified.onnx"
        onnx.save(simplified, str(exported))
    out = tmp_path / "pruned.onnx"
    result = invoke("prune", "--model", exported, "--out", out, "--tokenizer", folder, "--quiet",
                    "--prune-heads", json.dumps({str(k): v for k, v in HEADS.items()}))
    assert result.exit_code == 0, result.output
    _assert_same_logits(out, _reference_prune(folder, tmp_path), folder)


@pytest.mark.parametrize("activation", ["gelu_new", "relu"])
def test_other_activation_forms_are_found(tmp_path, activation):
    import transformers

    folder = make_model(tmp_path / "m", "bert")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    config.hidden_act = activation
    transformers.AutoModelForSequenceClassification.from_pretrained(str(folder), config=config).save_pretrained(
        str(folder))
    exported = tmp_path / "model.onnx"
    export_onnx(folder, exported, 17, "text-classification")
    g = Graph(graph_model.load(exported))
    assert [b.size for b in find_ffn_blocks(g)] == [128, 128]
    assert [b.num_heads for b in find_attention_blocks(g)] == [4, 4]


def test_blocks_that_contradict_the_config_are_refused(tiny, tiny_export, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny.model, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "p.onnx"
    result = invoke("prune", "--model", tiny_export, "--out", out, "--tokenizer", other, "--prune-heads", '{"0": [1]}')
    assert result.exit_code == 2, result.output
    assert "config has 6 layers, the graph 2 FFN and 2 attention blocks" in result.output
    assert "Traceback" not in result.output and not out.exists()
