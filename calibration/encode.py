"""Rows -> tokenized batches (`dict[str, np.ndarray]` of int64), with the model's own tokenizer.

Besides the model inputs, a batch may carry arrays whose names start with "_" that runners never
feed (they pass only the inputs a graph or `forward` declares) and the comparator reads:
`_word_index` (token classification: the word index at each word's first sub-token, -1 elsewhere)
and `_context_offsets` (question answering: each context token's character span in the context,
-1 for question, special and padding tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from calibration.errors import DataError, ShipyardError
from calibration.sampling import Columns
from calibration.sources import Row

# How a row becomes tokens (each task's `encoding`, `pipeline.tasks`): text with an optional pair,
# pre-split words whose first sub-tokens are scored, or a question and its context.
Encoding = Literal["text", "words", "question-context"]
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json", "spiece.model", "spm.model")
WORD_INDEX = "_word_index"
CONTEXT_OFFSETS = "_context_offsets"


def split_words(value: Any) -> list[str]:
    """A row's words: a list as given (pre-tokenized data), or a string split on white space."""
    if isinstance(value, (list, tuple)):
        return [str(w) for w in value]
    return str(value).split()


def as_text(value: Any) -> str:
    return " ".join(split_words(value)) if isinstance(value, (list, tuple)) else str(value)


def load_tokenizer(folder: Path, encoding: Encoding) -> Any:
    """The tokenizer saved in a model folder, for rows encoded as `encoding`; never downloads.

    For pre-split words (token classification) it is loaded with `add_prefix_space=True`: byte-level BPE tokenizers
    (RoBERTa's) refuse pre-split words without it and tag every word as if it began the text;
    WordPiece and SentencePiece tokenizers ignore the flag."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShipyardError(f"tokenizer folder {folder} not found; pass the fine-tuned model's folder")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ShipyardError(
            f"model folder {folder} has no tokenizer (no tokenizer.json or vocab.txt); "
            "save it there with tokenizer.save_pretrained(folder)"
        )
    from transformers import AutoTokenizer

    options = {"add_prefix_space": True} if encoding == "words" else {}
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, **options)


@dataclass
class Encoder:
    """Tokenizes rows the way the model will see them in production."""

    tokenizer: Any
    columns: Columns
    max_length: int
    padding: Literal["max_length", "longest"]
    encoding: Encoding

    def encode(self, rows: list[Row]) -> dict[str, np.ndarray]:
        if self.encoding == "words":
            return self._encode_words(rows)
        if self.encoding == "question-context":
            return self._encode_question_context(rows)
        texts = [as_text(r[self.columns.text]) for r in rows]
        pairs = [as_text(r[self.columns.text_pair]) for r in rows] if self.columns.text_pair else None
        enc = self.tokenizer(
            texts,
            pairs,
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {name: np.asarray(value, dtype=np.int64) for name, value in enc.items()}

    def _require_fast(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"encoding {self.encoding} needs a fast tokenizer (tokenizer.json) to map tokens to words and "
                            "characters; save one with tokenizer.save_pretrained from a *TokenizerFast")

    def _encode_words(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """Words -> tokens; `_word_index` marks each word's first sub-token, the one that is scored."""
        self._require_fast()
        words = [split_words(r[self.columns.text]) for r in rows]
        enc = self.tokenizer(words, is_split_into_words=True, padding=self.padding, truncation=True,
                             max_length=self.max_length, return_tensors="np")
        first = np.full(enc["input_ids"].shape, -1, dtype=np.int64)
        for i in range(len(rows)):
            previous = None
            for position, word in enumerate(enc.word_ids(i)):
                if word is not None and word != previous:
                    first[i, position] = word
                previous = word
        batch = {name: np.asarray(value, dtype=np.int64) for name, value in enc.items()}
        batch[WORD_INDEX] = first
        return batch

    def _encode_question_context(self, rows: list[Row]) -> dict[str, np.ndarray]:
        """(question, context) pairs, the context truncated; `_context_offsets` maps context tokens
        back to characters of the context."""
        self._require_fast()
        if not self.columns.text_pair:
            raise DataError("question answering needs question and context columns: set text_column (the "
                            "question) and text_pair_column (the context)")
        questions = [str(r[self.columns.text]) for r in rows]
        contexts = [str(r[self.columns.text_pair]) for r in rows]
        try:
            enc = self.tokenizer(questions, contexts, padding=self.padding, truncation="only_second",
                                 max_length=self.max_length, return_offsets_mapping=True, return_tensors="np")
        except Exception as err:
            # tokenizers raises a plain Exception, so the type cannot tell a question too long for
            # max_length ("Truncation error: Second sequence not long enough to be truncated")
            # from anything else, which keeps its own type and exit code.
            if "Truncation error" not in str(err):
                raise
            raise DataError(f"a question is longer than max_length {self.max_length} tokens ({str(err)[:80]}); "
                            "raise data.max_length or shorten the questions") from None
        offsets = np.asarray(enc.pop("offset_mapping"), dtype=np.int64)
        for i in range(len(rows)):
            in_context = np.array([sid == 1 for sid in enc.sequence_ids(i)])
            offsets[i][~in_context] = -1
        batch = {name: np.asarray(value, dtype=np.int64) for name, value in enc.items()}
        batch[CONTEXT_OFFSETS] = offsets
        return batch

    def batches(self, rows: list[Row], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(rows), batch_size):
            yield self.encode(rows[start : start + batch_size])

    def by_length(self, rows: list[Row]) -> list[Row]:
        """`rows` ordered by token count (stable), so that batches padded to their longest row
        carry little padding: every runner then does a fraction of the work for the same
        per-row outputs."""
        if not rows:
            return rows
        lengths = self.encode(rows)["attention_mask"].sum(axis=1)
        return [rows[i] for i in np.argsort(lengths, kind="stable")]


def label_ids(rows: list[Row], label_column: str, label2id: Mapping[str, int], source: Path) -> np.ndarray:
    """Map each row's label (a name from `id2label`, or an id) to the model's class id."""
    id_set = set(label2id.values())
    ids = []
    unknown: set[str] = set()
    for row in rows:
        value = row[label_column]
        if str(value) in label2id:
            ids.append(label2id[str(value)])
        elif str(value).lstrip("-").isdigit() and int(value) in id_set:
            ids.append(int(value))
        else:
            unknown.add(str(value))
    if unknown:
        raise DataError(
            f"data {source}: labels {sorted(unknown)} in column {label_column!r} are not in the model's "
            f"id2label {sorted(label2id)}; fix the data or the model config"
        )
    return np.asarray(ids, dtype=np.int64)
