"""A model past protobuf's 2 GB limit through the whole release: export, prune, quantize (Q/DQ and
CPU), validate, manifest and verify, with external data at every step.

    python bench/large_model.py [--work DIR] [--layers 24] [--keep]

Builds a random-weight XLM-RoBERTa of xlm-roberta-large's size (24 layers, hidden 1024, 16 heads,
FFN 4096, vocabulary 250,002: 560 M parameters, 2.24 GB in float32; no hub download), runs
`shipyard run` on a small recipe over the demo's hold-out tweets (`shipyard demo prepare` first),
then `shipyard verify` on the release, and prints per artifact its files, sizes and verdict. Its
classifier is scaled so that a random model's logits are not all tied. Not in the test suite: it
takes tens of minutes and ~12 GB of memory on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.run.cache import shipyard_home  # noqa: E402
from pipeline.run.demo import demo_paths, minilm_dir  # noqa: E402


def make_model(folder: Path, layers: int) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer

    config = transformers.XLMRobertaConfig(
        vocab_size=250002, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
        id2label=dict(enumerate(("negative", "neutral", "positive"))),
        label2id={"negative": 0, "neutral": 1, "positive": 2})
    torch.manual_seed(0)
    model = transformers.XLMRobertaForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.out_proj.weight.mul_(30.0)
    model.save_pretrained(str(folder), safe_serialization=True)
    # Only token ids reach the graph: MiniLM's WordPiece vocabulary (ids < 30,522) stands in for
    # XLM-R's SentencePiece one, which is not on this machine.
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tokenizer.save_pretrained(str(folder))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/shipyard-large"))
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    holdout = demo_paths(shipyard_home() / "demo").holdout
    if not holdout.is_file():
        print(f"{holdout} not found: run `shipyard demo prepare` first", file=sys.stderr)
        return 2
    model_dir = work / "model"
    started = time.perf_counter()
    if not (model_dir / "model.safetensors").exists() and not (model_dir / "model.safetensors.index.json").exists():
        make_model(model_dir, args.layers)
    print(f"model: {model_dir} ({sum(p.stat().st_size for p in model_dir.iterdir()) / 1e9:.2f} GB on disk, "
          f"{time.perf_counter() - started:.0f} s)")
    recipe = {
        "name": "large", "model": {"path": str(model_dir)},
        "data": {"calibration": {"path": str(holdout), "samples": 32}, "evaluation": {"path": str(holdout), "samples": 96},
                 "text_column": "text", "label_column": "sentiment", "max_length": 32, "tuning_samples": 32,
                 "batch_size": 16},
        "stages": {"prune": {"enabled": True, "ffn_fraction": 0.25},
                   "quantize": {"formats": ["qdq", "cpu"], "fallback": {"max_nodes": 0}}},
        # A random model's predictions hang on every neuron: its agreement figures are printed, not
        # gated (this measures the plumbing of a large model, not a release's accuracy). FP32's
        # default gate (atol and agreement against PyTorch) stays on.
        "thresholds": {"int8": {"min_agreement": 0.0, "max_metric_drop": 1.0},
                       "pruned": {"min_agreement": 0.0, "max_metric_drop": 1.0}},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    release = work / "release"
    timings = {}
    for name, command in (("run", ["run", str(work / "recipe.yaml"), "--out", str(release), "--overwrite",
                                   "--no-cache", "--quiet"]),
                          ("verify", ["verify", str(release)])):
        began = time.perf_counter()
        result = subprocess.run(["shipyard", *command], capture_output=True, text=True)
        timings[name] = time.perf_counter() - began
        print(f"shipyard {name}: exit {result.returncode} in {timings[name]:.0f} s")
        if result.returncode:
            print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
            return result.returncode
    manifest = json.loads((release / "manifest.json").read_text())
    print(f"{'artifact':<18} {'graph MB':>9} {'external data':<28} {'total GB':>8}  agreement  verdict")
    for artifact in manifest["artifacts"]:
        data = artifact.get("external_data", {})
        graph_mb = (release / artifact["path"]).stat().st_size / 1e6
        agreement = (artifact.get("parity") or {}).get("agreement")
        print(f"{artifact['name']:<18} {graph_mb:>9.1f} {', '.join(data) or '(inline)':<28} "
              f"{artifact['size_bytes'] / 1e9:>8.2f}  {agreement if agreement is not None else '-':>9}  "
              f"{'pass' if artifact['passed'] else 'FAIL'}")
    for stage in manifest["stages"]:
        print(f"  {stage['stage']:<28} {stage['seconds']:>7.1f} s  {stage['message'][:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
