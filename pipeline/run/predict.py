"""`shipyard predict`: text in, the task's prediction out, from a verified release alone.

The release's own tokenizer and serving record (`pipeline.release.serving`) encode the rows as
the gate encoded its evaluation rows (max length, padding, batches of the same size ordered by
length the same way), the chosen artifact's own CPU runtime (`pipeline.runtimes`) runs it, and the task code the gate compares
with (`pipeline.parity.tasks.readable`) turns outputs into labels, tags, answers or embeddings.
So on the gate's rows `predict` gives the predictions the gate measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.encode import Encoder, as_text
from calibration.sampling import Columns
from pipeline.errors import ShipyardError
from pipeline.release import serving
from pipeline.release.manifest import ArtifactRecord, Manifest
from pipeline.runtimes import runtime

# The artifact `predict` runs unless told: the CPU one, else the dense FP32 graph.
PREFERRED = ("model.int8.cpu", "model.recovered", "model.pruned", "model.fp32")


@dataclass(frozen=True)
class Rows:
    """What to predict on: texts (and their pairs, or QA contexts) given on the command line, or
    a data file's columns."""

    texts: tuple[str, ...] = ()
    pairs: tuple[str, ...] = ()
    data: Path | None = None
    text_column: str = "text"
    pair_column: str | None = None
    encoding: str | None = None


def choose_artifact(manifest: Manifest, name: str | None, release: Path) -> ArtifactRecord:
    """The CPU artifact named `name`, or else the release's CPU form (the fastest CPU artifact its
    run measured), else the preferred one the release has."""
    cpu = {a.name: a for a in manifest.artifacts if runtime(a.format).device == "cpu"}
    if name is None:
        chosen = (manifest.cpu_form or {}).get("artifact")
        found = cpu.get(chosen) if chosen else next((cpu[n] for n in PREFERRED if n in cpu), None)
        if found is None:
            raise ShipyardError(f"release {release} has no CPU artifact to run; pass a release written by shipyard run")
        return found
    if name not in cpu:
        engines = [a.name for a in manifest.artifacts if a.name not in cpu]
        why = (" (an engine: it runs under TensorRT on its GPU; predict runs CPU artifacts)"
               if name in engines else "")
        raise ShipyardError(f"release {release} has no CPU artifact {name!r}{why}; use one of: {', '.join(sorted(cpu))}")
    return cpu[name]


def _rows(rows: Rows, record: serving.ServingRecord) -> list[dict[str, str]]:
    if rows.data is not None:
        from pipeline.inputs import data as datamod

        loaded = datamod.load_rows(rows.data, rows.encoding)
        needed = [rows.text_column] + ([rows.pair_column] if rows.pair_column else [])
        datamod.require_columns(loaded, needed, rows.data)
        # A pre-split row (a tagger's words as a list) is its words joined: the encoder splits them again.
        return [{"text": as_text(r[rows.text_column]), **({"pair": as_text(r[rows.pair_column])} if rows.pair_column else {})}
                for r in loaded]
    if not rows.texts:
        raise ShipyardError("nothing to predict: pass --text TEXT (repeatable) or --data FILE")
    if record.text_pair and len(rows.pairs) != len(rows.texts):
        what = "context" if record.task == "question-answering" else "pair"
        raise ShipyardError(f"this release's model reads a {what} with each text: pass one --pair per --text "
                            f"({len(rows.texts)} texts, {len(rows.pairs)} pairs)")
    return [{"text": t, **({"pair": p} if record.text_pair else {})} for t, p in
            zip(rows.texts, rows.pairs or [""] * len(rows.texts), strict=True)]


def predict(release: Path, artifact: str | None, rows: Rows, truncate: bool = False) -> dict[str, Any]:
    """Predictions for `rows` by `artifact` of the verified `release`, in the rows' order."""
    from pipeline.parity.runners import runner_for
    from pipeline.parity.tasks import Pooling, Task, collect, readable
    from pipeline.tasks import task_spec

    release = Path(release)
    manifest = serving.intact(release, "predict runs").intact()
    record, tokenizer = serving.load(release)
    chosen = choose_artifact(manifest, artifact, release)
    table = _rows(rows, record)
    if record.text_pair and rows.data is not None and rows.pair_column is None:
        raise ShipyardError("this release's model reads a second text with each row: pass --pair-column")
    spec = task_spec(record.task)
    columns = Columns("text", "pair" if record.text_pair else None)
    encoder = Encoder(tokenizer, columns, record.max_length, record.padding, spec.encoding)
    full = [len(ids) for ids in tokenizer([r["text"] for r in table], [r["pair"] for r in table] if record.text_pair
                                          else None, truncation=False)["input_ids"]]
    long = [i for i, n in enumerate(full) if n > record.max_length]
    if long and not truncate:
        raise ShipyardError(f"row {long[0]} is {full[long[0]]} tokens, longer than the {record.max_length} this release "
                            f"was gated at ({len(long)} such rows); shorten it, or pass --truncate to cut it as the gate did")
    order = (np.argsort(encoder.encode(table)["attention_mask"].sum(axis=1), kind="stable") if record.order_by_length
             else np.arange(len(table)))
    ordered = [table[i] for i in order]
    batches = list(encoder.batches(ordered, record.batch_size))
    pooling = Pooling(record.pooling.mode, record.pooling.normalize) if record.pooling else Pooling()
    task = Task(record.task, pooling, record.max_answer_tokens or 30, record.min_cosine or 0.99)
    reduced = collect(runner_for(release / chosen.path, chosen.format), batches, task)
    predicted = readable(task, reduced, batches, record.id2label, [r["text"] for r in ordered],
                         [r.get("pair", "") for r in ordered])
    results: list[dict[str, Any]] = [{}] * len(table)
    for position, index in enumerate(order):
        results[int(index)] = {"text": table[int(index)]["text"], **predicted[position],
                               **({"truncated": True} if int(index) in long else {})}
    return {"release": str(release), "artifact": chosen.name, "task": record.task, "predictions": results}


def describe(result: dict[str, Any]) -> str:
    """The predictions as lines a person reads."""
    lines = [f"{result['artifact']} ({result['task']}):"]
    for row in result["predictions"]:
        if "label" in row:
            lines.append(f"  {row['label']} ({row['score']:.3f})  {row['text']}")
        elif "tags" in row:
            lines.append("  " + " ".join(f"{w}/{t}" for w, t in zip(row["words"], row["tags"], strict=True)))
        elif "answer" in row:
            lines.append(f"  {row['answer']!r}  <- {row['text']}")
        else:
            vector = row["embedding"]
            lines.append(f"  [{len(vector)}] {', '.join(f'{x:.4f}' for x in vector[:4])}, ...  {row['text']}")
    return "\n".join(lines)
