"""What Shipyard knows about each encoder family: one entry per Hugging Face `model_type`.

Code that reads or writes a model's sizes asks this table for the family's own config key
instead of guessing among aliases: DistilBERT calls its layers, heads, width and FFN width
`n_layers`, `n_heads`, `dim` and `hidden_dim`, and a config written with BERT's names for it
loads with the unpruned sizes. The first three are what transformers' `attribute_map` for the
config class says; the FFN width is not in DistilBERT's map, which is why the table, checked
against transformers in tests/test_families.py, is the one place these names live.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# Shipyard's names for a model's sizes (BERT's config keys).
SizeName = Literal["num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"]
SIZE_NAMES: tuple[SizeName, ...] = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")


@dataclass(frozen=True)
class Family:
    """One encoder family: its config keys where they differ from BERT's, and how many positions
    of its position embeddings are reserved (RoBERTa-style models keep the first two for padding)."""

    model_type: str
    config_keys: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    reserved_positions: int = 0

    def key(self, name: SizeName) -> str:
        """The config key this family stores size `name` under."""
        return self.config_keys.get(name, name)


def _family(model_type: str, reserved_positions: int = 0, **keys: str) -> Family:
    return Family(model_type, MappingProxyType(keys), reserved_positions)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _family("bert"),
    _family("roberta", reserved_positions=2),
    _family("xlm-roberta", reserved_positions=2),
    _family("camembert", reserved_positions=2),
    _family("distilbert", num_hidden_layers="n_layers", num_attention_heads="n_heads", hidden_size="dim",
            intermediate_size="hidden_dim"),
    _family("electra"),
    _family("albert"),
)}


def family_of(config: dict[str, Any]) -> Family:
    """The entry for a config.json's `model_type`; BERT's names for a type the table does not know
    (`pipeline.inputs.model.inspect_model` refuses those before any stage reads sizes)."""
    return FAMILIES.get(str(config.get("model_type", "")), Family(str(config.get("model_type", ""))))


def config_size(config: dict[str, Any], name: SizeName) -> int:
    """Size `name` from a config.json, under the family's own key (0 when absent)."""
    return int(config.get(family_of(config).key(name), 0))
