"""The pruning plan: what the graph-level pruning removed, recorded so that it applies to PyTorch exactly.

`stages/prune.py` prunes the ONNX graph; recovery by distillation (issue #11) trains the same
structure in PyTorch. So the prune stage writes `model.pruned.plan.json` beside the pruned graph:
per layer the FFN neurons kept, the heads removed, and the output biases that compensation
rewrote (the values themselves, so PyTorch gets the same float32 numbers); and which weights were
made 2:4 sparse. `apply_to_torch` makes a Hugging Face model the same function as the pruned
graph: slicing with transformers' own `prune_linear_layer` and `prune_heads` (or, for a family
transformers cannot prune heads of, zeroing their columns of the output projection: the family
table's `torch_heads`), setting those biases, and masking 2:4 with the same rule on the same weights.
Written here because no library maps ONNX-level pruning back to PyTorch modules.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from pipeline.errors import ArtifactError
from pipeline.families import Family, config_size, family_of

PLAN_VERSION = 1
# 2:4 targets: which projection of a layer, as the graph side names them.
ROLES = ("ffn.w1", "ffn.w2", "attention.q", "attention.k", "attention.v", "attention.out")


@dataclass
class LayerPlan:
    layer: int
    ffn_size: int  # before pruning
    ffn_keep: list[int]
    heads_removed: list[int]
    ffn_bias: list[float] | None = None  # the FFN output bias compensation wrote
    attention_bias: list[float] | None = None  # the attention output bias compensation wrote


@dataclass
class PruningPlan:
    layers: list[LayerPlan]
    sparse_24: list[tuple[int, str]] = field(default_factory=list)  # (layer, role)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"pruning plan {path} not found; it is written beside the pruned ONNX by "
                                "shipyard prune / shipyard run (prune again to get one)")
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != PLAN_VERSION:
                raise ValueError(f"version {raw.get('version')}")
            return cls(layers=[LayerPlan(**layer) for layer in raw["layers"]],
                       sparse_24=[(int(layer), str(role)) for layer, role in raw["sparse_24"]])
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"pruning plan {path} is not a plan this Shipyard reads ({err}); prune again") from None


def plan_path(pruned_onnx: Path) -> Path:
    """Where the plan of a pruned graph lives: `model.pruned.onnx` -> `model.pruned.plan.json`."""
    pruned_onnx = Path(pruned_onnx)
    return pruned_onnx.with_name(pruned_onnx.stem + ".plan.json")


def mask_24(weight: np.ndarray) -> np.ndarray:
    """Keep the 2 largest |w| of every 4 consecutive weights along axis 0 of an ONNX [in, out]
    weight (the reduction axis); rows not a multiple of 4 are left dense."""
    if weight.shape[0] % 4:
        return np.ones_like(weight, dtype=bool)
    groups = weight.reshape(weight.shape[0] // 4, 4, weight.shape[1])
    order = np.argsort(-np.abs(groups), axis=1, kind="stable")
    mask = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(mask, order[:, :2, :], True, axis=1)
    return mask.reshape(weight.shape)


def _layers(model) -> list:
    """The transformer layers of a Hugging Face encoder, whatever its task head, where its family's
    entry says they are (`pipeline.families`)."""
    base = getattr(model, model.base_model_prefix, model)
    found = _attribute(base, family_of(model.config.to_dict()).layers)
    if found is None:
        raise ArtifactError(f"{type(model).__name__}: no encoder layers at {family_of(model.config.to_dict()).layers}; "
                            "recovery supports the families in pipeline/families.py")
    return list(found)


def _attribute(holder, path: str):
    for name in path.split("."):
        holder = getattr(holder, name, None)
    return holder


def _modules(layer, family: Family) -> dict[str, tuple[Any, str]]:
    """role -> (parent module, attribute) of each projection in one layer, from the family's entry."""
    modules = {}
    for role, path in family.modules.items():
        parent, _, name = path.rpartition(".")
        modules[role] = (_attribute(layer, parent), name)
    return modules


def apply_to_torch(model, plan: PruningPlan):
    """Prune `model` (a Hugging Face encoder, in place) as the plan says; returns it."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    layers, family = _layers(model), family_of(model.config.to_dict())
    if len(layers) != len(plan.layers):
        raise ArtifactError(f"the pruning plan has {len(plan.layers)} layers but the model has {len(layers)}; "
                            "pass the model the pruned graph was exported from")
    heads = {p.layer: p.heads_removed for p in plan.layers if p.heads_removed}
    if heads and family.torch_heads == "prune_heads":
        model.prune_heads(heads)
    with torch.no_grad():
        for p in plan.layers:
            modules = _modules(layers[p.layer], family)
            if len(p.ffn_keep) < p.ffn_size:
                keep = np.asarray(p.ffn_keep)
                rows = np.concatenate([keep, keep + p.ffn_size]) if family.gated_ffn else keep  # input and gate halves
                for role, dim, kept in (("ffn.w1", 0, rows), ("ffn.w2", 1, keep)):
                    parent, name = modules[role]
                    index = cast(torch.LongTensor, torch.tensor(kept, dtype=torch.long))
                    setattr(parent, name, prune_linear_layer(getattr(parent, name), index, dim=dim))
                _set_intermediate_size(layers[p.layer], len(p.ffn_keep))
            for role, bias in (("ffn.w2", p.ffn_bias), ("attention.out", p.attention_bias)):
                if bias is not None:
                    parent, name = modules[role]
                    getattr(parent, name).bias.copy_(torch.tensor(bias, dtype=torch.float32))
        for linear, mask in weight_masks(model, plan):
            linear.weight *= mask
    return model


def weight_masks(model, plan: PruningPlan) -> list[tuple[Any, Any]]:
    """(linear layer, 0/1 mask) for each weight the plan made 2:4, from the model's current weights,
    and for each output projection whose heads are masked rather than pruned (`torch_heads`):
    recovery multiplies them in again after every optimizer step."""
    import torch

    layers, family = _layers(model), family_of(model.config.to_dict())
    masks = []
    if family.torch_heads == "masked":
        for p in (p for p in plan.layers if p.heads_removed):
            parent, name = _modules(layers[p.layer], family)["attention.out"]
            linear = getattr(parent, name)
            head_dim = linear.weight.shape[1] // config_size(model.config.to_dict(), "num_attention_heads")
            mask = torch.ones_like(linear.weight)
            for head in p.heads_removed:
                mask[:, head * head_dim:(head + 1) * head_dim] = 0
            masks.append((linear, mask))
    for layer, role in plan.sparse_24:
        parent, name = _modules(layers[layer], family)[role]
        linear = getattr(parent, name)
        mask = mask_24(linear.weight.detach().numpy().T).T  # ONNX keeps [in, out]; torch [out, in]
        masks.append((linear, torch.from_numpy(np.ascontiguousarray(mask)).to(linear.weight.dtype)))
    return masks


def _set_intermediate_size(layer, size: int) -> None:
    """Keep the module's own record of its FFN width in step (used by nothing at inference, but
    saved configs and repr should not lie)."""
    for holder in (getattr(layer, "intermediate", None), getattr(layer, "ffn", None)):
        if holder is not None and hasattr(holder, "intermediate_size"):
            holder.intermediate_size = size
