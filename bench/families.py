"""CPU speed of each family's artifacts at one realistic size, measured in one run.

    python bench/families.py [--layers 6] [--hidden 384] [--families bert deberta-v2 modernbert mpnet]

For each family, a classifier of that size with MiniLM's 12 heads and vocabulary
(`pipeline.run.demo`'s narrow encoder, random weights: speed does not depend on training) is
exported through the export stage, and its CPU INT8 artifact made by the quantize stage
(`--format cpu`, every node quantized). Prints batch-1 latency (median) and batch-32 throughput
at sequence length 64 with 2 threads for PyTorch FP32, the FP32 ONNX and the CPU INT8 artifact,
with the ratios the README's family table quotes: INT8 against PyTorch and against the family's
own FP32 ONNX. Machines here are noisy and differ in their vector units (this prints its lscpu
flags): compare ratios within one run.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.encode import Encoder, load_tokenizer  # noqa: E402
from calibration.sampling import Columns  # noqa: E402
from pipeline.parity.runners import OrtRunner, TorchRunner  # noqa: E402
from pipeline.parity.timing import SEQ, THREADS, measure_all  # noqa: E402
from pipeline.recipe import QuantizeSpec  # noqa: E402
from pipeline.run.demo import _narrow_encoder, minilm_dir, read_tweets  # noqa: E402
from pipeline.run.standalone import CalibrationRows, quantize_file  # noqa: E402
from pipeline.stages.export import export_onnx  # noqa: E402

LABELS = {"id2label": {0: "negative", 1: "neutral", 2: "positive"},
          "label2id": {"negative": 0, "neutral": 1, "positive": 2}}


def cpu_flags() -> str:
    """The vector-unit flags of this CPU that decide INT8 speed."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return " ".join(f for f in wanted if f in flags) or "unknown"


def make(family: str, layers: int, hidden: int, folder: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    model = _narrow_encoder(family, layers, hidden, LABELS, tokenizer).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--families", nargs="+", default=["bert", "deberta-v2", "modernbert", "mpnet"])
    args = parser.parse_args()

    import torch

    torch.set_num_threads(THREADS)
    rows = [{"text": row["text"]} for row in read_tweets()[:32]]
    print(f"{args.layers} layers, {args.hidden} wide, 12 heads | sequence {SEQ}, {THREADS} threads | "
          f"CPU flags: {cpu_flags()}")
    print(f"{'family':12s} {'artifact':10s} {'b1 ms':>8s} {'b32 seq/s':>10s} {'vs PyTorch b1/b32':>18s} "
          f"{'vs FP32 ONNX b1/b32':>20s}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tweets.csv"  # the calibration rows, as UTF-8 with a text column
        with data.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text"])
            writer.writeheader()
            writer.writerows({"text": row["text"]} for row in read_tweets()[:256])
        for family in args.families:
            work = Path(tmp) / family
            folder = make(family, args.layers, args.hidden, work / "model")
            export_onnx(folder, work / "model.onnx", 17, "text-classification")
            quantize_file(work / "model.onnx", work / "int8.cpu.onnx", "cpu", QuantizeSpec(),
                          CalibrationRows(data, folder, Columns(), 64, SEQ), tuning_samples=0)
            encoder = Encoder(load_tokenizer(folder, "text"), Columns(), SEQ, "max_length", "text")
            batch32 = encoder.encode(rows)
            batch1 = {k: v[:1] for k, v in batch32.items()}
            runners = [("PyTorch", TorchRunner(folder, task="text-classification", threads=THREADS)),
                       ("FP32 ONNX", OrtRunner(work / "model.onnx", THREADS)),
                       ("CPU INT8", OrtRunner(work / "int8.cpu.onnx", THREADS))]
            timings = measure_all([r for _, r in runners], batch1, batch32)
            (torch_b1, torch_b32), (onnx_b1, onnx_b32) = ((t.b1_ms, t.b32_per_s) for t in timings[:2])
            for (name, _), timing in zip(runners, timings, strict=True):
                latency, throughput = timing.b1_ms, timing.b32_per_s
                print(f"{family:12s} {name:10s} {latency:8.2f} {throughput:10.1f} "
                      f"{torch_b1 / latency:8.2f}x/{throughput / torch_b32:5.2f}x "
                      f"{onnx_b1 / latency:10.2f}x/{throughput / onnx_b32:5.2f}x")


if __name__ == "__main__":
    main()
