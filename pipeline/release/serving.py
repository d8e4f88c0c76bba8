"""What a server needs besides the graphs, inside the release: the tokenizer, the labels, the encoding.

A release is served where the model folder is not. So the run writes, beside the artifacts and
hashed in the manifest like them:

- `tokenizer/`: the model's tokenizer, saved by transformers as the gate loaded it;
- `serving.json`: the task, the label map (`id2label`: classes, or the tag set), and how text
  became the tokens the gate measured: max length, padding, truncation, the batch size and the
  length-ordering of batches (dynamic INT8 scales its activations per batch, so the same rows in
  the same batches are what reproduces the gate's predictions), whether a second text is read
  (a pair, or QA's context), a sentence encoder's pooling and normalisation, QA's answer limit.

`shipyard predict` reads both back (`load`), never the model folder. Written here because no
library records this contract: Optimum's ONNX folders carry a tokenizer but not the encoding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.artifacts import atomic_file
from pipeline.errors import ShipyardError

SERVING_FILE = "serving.json"
TOKENIZER_DIR = "tokenizer"


class Pooling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["mean", "cls", "max"]
    normalize: bool


class ServingRecord(BaseModel):
    """The encoding and labels of a release (module docstring)."""

    model_config = ConfigDict(extra="forbid")
    task: str
    id2label: dict[int, str]
    max_length: int
    padding: Literal["max_length", "longest"]
    truncation: Literal["longest_first", "only_second"]
    batch_size: int
    order_by_length: bool
    text_pair: bool  # a second text per row: the pair of a pair classifier, QA's context
    pooling: Pooling | None = None
    max_answer_tokens: int | None = None
    min_cosine: float | None = None


def write(folder: Path, model_dir: Path, record: ServingRecord) -> list[Path]:
    """Save the tokenizer of `model_dir` and `record` into the release `folder`; the files written."""
    from calibration.encode import load_tokenizer
    from pipeline.tasks import task_spec

    tokenizer = load_tokenizer(model_dir, task_spec(record.task).encoding)
    target = Path(folder) / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    written = [Path(p) for p in tokenizer.save_pretrained(str(target))]
    with atomic_file(Path(folder) / SERVING_FILE) as tmp:
        tmp.write_text(json.dumps(record.model_dump(mode="json"), indent=1) + "\n")
    return [*written, Path(folder) / SERVING_FILE]


def intact(release: Path, action: str):
    """The manifest of `release` if it verifies, else a one-line error: `action` ("predict runs",
    "package takes") only an intact release."""
    from pipeline.release.signing import read_verified

    verified = read_verified(Path(release))
    if verified.problems:
        raise ShipyardError(f"release {release} does not verify ({verified.problems[0]}); {action} only an intact "
                            "release (shipyard verify lists every problem)")
    return verified


def load(folder: Path) -> tuple[ServingRecord, Any]:
    """The release's serving record and its tokenizer, or a one-line error naming what is missing."""
    from pydantic import ValidationError

    from calibration.encode import TOKENIZER_FILES, load_tokenizer
    from pipeline.tasks import task_spec

    folder = Path(folder)
    path = folder / SERVING_FILE
    if not path.is_file():
        raise ShipyardError(f"release {folder} has no {SERVING_FILE} (made before Shipyard recorded the encoding); "
                            "run the recipe again to make a release that can be served")
    try:
        record = ServingRecord.model_validate_json(path.read_text())
    except ValidationError as err:
        raise ShipyardError(f"{path}: not a serving record ({err.errors()[0]['msg']}); run the recipe again") from None
    tokenizer_dir = folder / TOKENIZER_DIR
    if not tokenizer_dir.is_dir() or not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ShipyardError(f"release {folder}: its tokenizer files ({TOKENIZER_DIR}/) are missing; restore them "
                            "from the release as it was written (shipyard verify names what changed)")
    return record, load_tokenizer(tokenizer_dir, task_spec(record.task).encoding)
