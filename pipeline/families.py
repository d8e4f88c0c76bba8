"""What Shipyard knows about each encoder family: one entry per Hugging Face `model_type`.

Adding a family is adding its entry here and its tests (`tests/zoo.py` makes a small model of
it, `tests/test_families.py` runs every stage on it and checks this entry against transformers
and Optimum). Everything else reads the entry:

- `config_keys`: the config keys of its sizes where they differ from BERT's. DistilBERT calls its
  layers, heads, width and FFN width `n_layers`, `n_heads`, `dim` and `hidden_dim`; a config
  written with BERT's names for it loads with the unpruned sizes. The first three are in
  transformers' `attribute_map`, the FFN width is not, which is why this table names them.
- `reserved_positions`: position embeddings the model keeps for padding (RoBERTa-style models
  and MPNet start counting at 2).
- `tasks`: the tasks Optimum's ONNX exporter registers for the family (ModernBERT has no
  question answering): any other is refused before any work.
- `pruning`: what the ONNX pruner can remove exactly ("heads", "ffn"), and the reason for what it
  cannot, which a refused request quotes.
- `layers`, `modules`, `gated_ffn`: where a pruning plan finds each layer and projection in the
  PyTorch model (recovery trains that model), as attribute paths, and whether W1 holds a gate half.
- `torch_heads`: how a plan removes heads from that model. "prune_heads" is transformers' own
  (the config records `pruned_heads` and the pruned model reloads); "masked" keeps the heads and
  zeroes their columns of the output projection, which is the pruned graph's function exactly,
  for families transformers cannot prune: ModernBERT has no `prune_heads`, and MPNet's adds a
  position bias of every head to fewer heads. Recovery keeps those columns zero while training
  and slices the heads out of the recovered model's export.
- `float32_scores`: whether its float16 graphs (the TensorRT FP16 targets') keep the attention
  scores in float32 (`pipeline.graph.precision`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from pipeline.names import TASKS

# Shipyard's names for a model's sizes (BERT's config keys).
SizeName = Literal["num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"]
SIZE_NAMES: tuple[SizeName, ...] = ("num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size")
PruneUnit = Literal["heads", "ffn"]
# The projections a pruning plan touches, by role (see pipeline/stages/prune/plan.py).
ROLES = ("attention.q", "attention.k", "attention.v", "attention.out", "ffn.w1", "ffn.w2")

BERT_MODULES = MappingProxyType({
    "attention.q": "attention.self.query", "attention.k": "attention.self.key",
    "attention.v": "attention.self.value", "attention.out": "attention.output.dense",
    "ffn.w1": "intermediate.dense", "ffn.w2": "output.dense"})


@dataclass(frozen=True)
class Family:
    """One encoder family (module docstring)."""

    model_type: str
    config_keys: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    reserved_positions: int = 0
    tasks: tuple[str, ...] = TASKS
    pruning: tuple[PruneUnit, ...] = ("heads", "ffn")
    not_prunable: str = ""  # why the units missing from `pruning` cannot be removed exactly
    layers: str = "encoder.layer"
    modules: MappingProxyType[str, str] = field(default_factory=lambda: BERT_MODULES)
    gated_ffn: bool = False  # W1 makes the activation's input and its gate (2 x intermediate rows)
    torch_heads: Literal["prune_heads", "masked"] = "prune_heads"
    float32_scores: bool = False  # its FP16 graph keeps the attention scores in float32 (they overflow)

    def key(self, name: SizeName) -> str:
        """The config key this family stores size `name` under."""
        return self.config_keys.get(name, name)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("bert"),
    Family("roberta", reserved_positions=2),
    Family("xlm-roberta", reserved_positions=2),
    Family("camembert", reserved_positions=2),
    Family("distilbert", MappingProxyType({"num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
                                           "hidden_size": "dim", "intermediate_size": "hidden_dim"}),
           layers="transformer.layer",
           modules=MappingProxyType({"attention.q": "attention.q_lin", "attention.k": "attention.k_lin",
                                     "attention.v": "attention.v_lin", "attention.out": "attention.out_lin",
                                     "ffn.w1": "ffn.lin1", "ffn.w2": "ffn.lin2"})),
    Family("electra"),
    Family("albert", pruning=(),
           not_prunable="ALBERT shares one set of layer weights, so removing a unit from one layer would remove it "
                        "from all"),
    # Disentangled scores (QKᵀ + c2p + p2c) overflow float16 in trained models.
    # Its query and key projections also apply to the relative positions: one slice of their
    # weights takes a head out of the content and the position scores alike.
    Family("deberta-v2", float32_scores=True, torch_heads="masked",
           modules=MappingProxyType({"attention.q": "attention.self.query_proj",
                                     "attention.k": "attention.self.key_proj",
                                     "attention.v": "attention.self.value_proj", "attention.out": "attention.output.dense",
                                     "ffn.w1": "intermediate.dense", "ffn.w2": "output.dense"})),
    Family("modernbert", tasks=("text-classification", "token-classification", "feature-extraction"),
           gated_ffn=True, layers="layers", torch_heads="masked",
           # Q, K and V are the thirds of one fused projection (the graph side slices all three).
           modules=MappingProxyType({"attention.q": "attn.Wqkv", "attention.k": "attn.Wqkv",
                                     "attention.v": "attn.Wqkv", "attention.out": "attn.Wo",
                                     "ffn.w1": "mlp.Wi", "ffn.w2": "mlp.Wo"})),
    # One relative-position bias per head, computed once for every layer: the graph side slices
    # it per layer where heads go.
    Family("mpnet", reserved_positions=2, torch_heads="masked",
           modules=MappingProxyType({"attention.q": "attention.attn.q", "attention.k": "attention.attn.k",
                                     "attention.v": "attention.attn.v", "attention.out": "attention.attn.o",
                                     "ffn.w1": "intermediate.dense", "ffn.w2": "output.dense"})),
)}


def family_of(config: dict[str, Any]) -> Family:
    """The entry for a config.json's `model_type`; BERT's names for a type the table does not know
    (`pipeline.inputs.model.inspect_model` refuses those before any stage reads sizes)."""
    return FAMILIES.get(str(config.get("model_type", "")), Family(str(config.get("model_type", ""))))


def config_size(config: dict[str, Any], name: SizeName) -> int:
    """Size `name` from a config.json, under the family's own key (0 when absent)."""
    return int(config.get(family_of(config).key(name), 0))
