"""Recovery after pruning: knowledge distillation from the original PyTorch model into the pruned structure.

The pruned graph's plan (`pipeline.stages.prune.plan`) is applied to a copy of the original model,
which is checked to be the same function as the pruned ONNX before any training (outputs within
1e-4). That student is then trained to match the teacher (the original model) on the user's text:

- classification and token classification: temperature-scaled KL divergence on the logits (over
  non-padding tokens for token classification), plus cross-entropy on gold labels for text
  classification when the data has them (names or class ids, mapped by `calibration.encode.label_ids`
  as the gates map them; a label the model does not know is refused before training, as the
  gates refuse it: a typo in a class name would otherwise train on nothing, silently);
- question answering: the same KL on start and end logits;
- feature extraction: 1 - cosine similarity of each non-padding token's hidden state;
- optionally (`hidden_weight`), intermediate-layer matching: every layer's hidden state against
  the teacher's, variance-normalised MSE over non-padding tokens.

The student trains without dropout unless `dropout` is set: the aim is the original's function,
not a regularised one, and the training rows are rarely seen twice in the steps a CPU allows.

2:4-sparse weights are masked again after every optimizer step, so the sparsity the plan made
survives training. Every `eval_every` steps the student is checked against the teacher on
tuning rows drawn from the same data but disjoint from the training rows (never evaluation
rows): its agreement, and its distance (`Task.distance`: 1 - mean cosine for embeddings, mean
|difference| of the outputs otherwise). The state closest to the teacher is kept and training
stops after `patience` checks that come no closer. Not the most agreeing state: agreement
counts rows across a boundary, so on a few hundred rows it jumps by a point from check to check
(the compact demo kept a step-200 state whose 1,000 tuning rows read 0.960 and whose evaluation
rows read 0.932), and it is flat where no row passes yet (an embedding model far below the 0.99
cosine a row needs), which kept the pruned model itself. Agreement is recorded at every check.
The recovered model is saved as a Hugging Face folder (pruned heads in its config) and goes
through the same Optimum export and export gate as the original; its ONNX is stamped as pruned,
so it is gated like any pruned artifact.

Written here because no library distils into an ONNX-pruned structure: transformers' Trainer
knows neither the plan nor the parity measure the gates use.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibration.encode import Encoder, label_ids, load_tokenizer
from calibration.sampling import Columns, row_digest
from pipeline.artifacts import (
    Artifact,
    StageResult,
    atomic_file,
    check_writable_parent,
    sha256_file,
)
from pipeline.errors import ArtifactError, ShipyardError
from pipeline.families import family_of
from pipeline.graph import model as graph_model
from pipeline.graph.proof import prove_runs
from pipeline.inputs import data as datamod
from pipeline.inputs.model import inspect_model
from pipeline.parity.policy import PRUNED_MARK, stamp
from pipeline.parity.runners import OrtRunner, TorchRunner
from pipeline.parity.tasks import collect
from pipeline.progress import SILENT, Progress
from pipeline.recipe import ExportSpec, RecoverSpec
from pipeline.stages import export
from pipeline.stages.prune.plan import (
    PruningPlan,
    apply_to_torch,
    plan_path,
    weight_masks,
)
from pipeline.stages.prune.stage import slice_masked_heads
from pipeline.tasks import task_spec

EXACT = 1e-4  # the plan applied to PyTorch must reproduce the pruned graph to this before training


@dataclass(frozen=True)
class TrainingData:
    """The text to distil on: a file, its columns, how many rows, and rows never to train on."""

    path: Path
    columns: Columns
    samples: int = 4000
    encoding: str | None = None
    exclude: frozenset[str] = frozenset()  # row digests: a recipe's evaluation and tuning rows

    def cache_identity(self) -> dict[str, Any]:
        """What the stage cache's key records of the training data: its content, not its path."""
        from pipeline.release.manifest import folder_sha256

        content = sha256_file(self.path) if Path(self.path).is_file() else folder_sha256(self.path)
        return {"content": content, "columns": [self.columns.text, self.columns.text_pair, self.columns.label],
                "samples": self.samples, "encoding": self.encoding, "exclude": sorted(self.exclude)}


@dataclass
class RecoverReport:
    steps: int
    seconds: float
    training_rows: int
    tuning_rows: int
    training_fingerprint: str
    agreement_before: float
    agreement_after: float
    distance_before: float  # Task.distance to the teacher on the tuning rows: 1 - cosine or mean |diff|
    distance_after: float
    best_step: int
    stopped_early: bool
    loss_first: float
    loss_last: float
    curve: list[dict[str, float]] = field(default_factory=list)  # per check: step, loss, agreement, distance

    @property
    def improved(self) -> bool:
        return self.best_step > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _student_outputs(model, batch, task: str, hidden: bool = False):
    import inspect

    import torch

    accepts = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    out = model(**{k: torch.from_numpy(v).to(device) for k, v in batch.items() if k in accepts},
                output_hidden_states=hidden)
    outputs = {name: getattr(out, name) for name in task_spec(task).outputs}
    if hidden:
        outputs["hidden_states"] = out.hidden_states
    return outputs


def hidden_state_loss(student: dict, teacher: dict, batch: dict):
    """Intermediate-layer matching: mean squared error of every layer's hidden state over non-padding
    tokens, each layer scaled by the teacher's variance there (pruning keeps layers and width, so
    the layers pair one to one)."""
    import torch

    mask = torch.from_numpy(batch["attention_mask"]).float().unsqueeze(-1).to(student["hidden_states"][0].device)
    losses = []
    for s, t in zip(student["hidden_states"][1:], teacher["hidden_states"][1:], strict=True):  # [0] is the embeddings
        variance = ((t * mask) ** 2).sum() / (mask.sum() * t.shape[-1]).clamp_min(1)
        losses.append((((s - t) ** 2) * mask).sum() / (mask.sum() * t.shape[-1]).clamp_min(1) / variance.clamp_min(1e-6))
    return torch.stack(losses).mean()


def distillation_loss(student: dict, teacher: dict, batch: dict, task: str, temperature: float,
                      labels=None, label_weight: float = 0.0):
    """The loss the module docstring describes, for one batch."""
    import torch
    import torch.nn.functional as F

    def kl(s, t, mask=None):
        log_p = F.log_softmax(s / temperature, dim=-1)
        q = F.softmax(t / temperature, dim=-1)
        per = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(-1) * temperature ** 2
        if mask is not None:
            return (per * mask).sum() / mask.sum().clamp_min(1)
        return per.mean()

    device = next(iter(v for v in student.values() if hasattr(v, "device"))).device
    mask = torch.from_numpy(batch["attention_mask"]).float().to(device)
    kind = task_spec(task).kind
    if kind == "class":
        loss = kl(student["logits"], teacher["logits"])
        if labels is not None and label_weight > 0:
            loss = (1 - label_weight) * loss + label_weight * F.cross_entropy(student["logits"], labels)
        return loss
    if kind == "tag":
        return kl(student["logits"], teacher["logits"], mask)
    if kind == "span":  # over the sequence: start and end positions are distributions
        masked = (1 - mask) * -1e4
        return (kl(student["start_logits"] + masked, teacher["start_logits"] + masked)
                + kl(student["end_logits"] + masked, teacher["end_logits"] + masked)) / 2
    cos = F.cosine_similarity(student["last_hidden_state"], teacher["last_hidden_state"], dim=-1)
    return ((1 - cos) * mask).sum() / mask.sum().clamp_min(1)


class _ModelRunner(TorchRunner):
    """TorchRunner over a model object in memory (the student between steps)."""

    def __init__(self, model, task: str) -> None:
        super().__init__(Path("."), task=task, device=str(next(model.parameters()).device))
        import inspect

        self._model = model
        self._accepts = set(inspect.signature(model.forward).parameters)


def _split_rows(data: TrainingData, tuning_samples: int, seed: int) -> tuple[list, list]:
    """Seeded, disjoint tuning and training rows of `data`, none of them in `data.exclude`."""
    rows = datamod.load_sample(data.path, data.columns, None, seed, "training", data.encoding, data.exclude)
    if len(rows) < tuning_samples + 8:
        left_out = f" after leaving out {len(data.exclude)} evaluation and tuning rows" if data.exclude else ""
        raise ShipyardError(f"{data.path}: {len(rows)} usable rows{left_out}; recovery needs at least "
                            f"{tuning_samples + 8} ({tuning_samples} tuning rows and some to train on); pass more "
                            "data or lower the tuning samples")
    order = np.random.default_rng(seed).permutation(len(rows))
    tuning = [rows[i] for i in order[:tuning_samples]]
    training = [rows[i] for i in order[tuning_samples:tuning_samples + data.samples]]
    return training, tuning


def run(reference: Path, src: Artifact, data: TrainingData, out: Path, spec: RecoverSpec, max_length: int,
        task_name: str | None, opset: int, seen: tuple[str, ...] = (), progress: Progress = SILENT,
        allow_pickle: bool = False, device: str = "cpu") -> StageResult:
    """The recover stage as `shipyard run` and `shipyard recover` call it (through the stage cache):
    `recover` of the pruned artifact `src`, its plan beside it; the report is in the result's details."""
    result, _ = recover(reference, src.path, data, out, spec, max_length, task_name, progress, opset, seen,
                        allow_pickle, device)
    return result


def recover(reference: Path, pruned_onnx: Path, data: TrainingData, out: Path,
            spec: RecoverSpec, max_length: int = 128, task_name: str | None = None,
            progress: Progress = SILENT, opset: int = 17, seen: tuple[str, ...] = (), allow_pickle: bool = False,
            device: str = "cpu") -> tuple[StageResult, RecoverReport]:
    """Distil `reference` into the structure of `pruned_onnx` and export it to `out` (see module doc).

    `seen` are digests of rows the pruned graph was already fitted or chosen on (a recipe's
    calibration and tuning rows); the recovered ONNX records them with its own training rows.
    `allow_pickle` (the recipe's model.allow_pickle) lets teacher and student load pickle weights,
    with torch.load(weights_only=True), as the reference runner does."""
    import torch
    import transformers

    started = time.perf_counter()
    check_writable_parent(out)
    plan = PruningPlan.load(plan_path(pruned_onnx))
    sizes = {len(layer.ffn_keep) for layer in plan.layers}
    if len(sizes) > 1:
        raise ShipyardError(f"{pruned_onnx}: FFN widths differ per layer ({sorted(sizes)}), which a Hugging Face "
                            "config cannot express, so the recovered model could not be exported; prune with "
                            "ffn_scope uniform to recover")
    info = inspect_model(reference, task_name, allow_pickle)
    task = info.task()
    tokenizer = load_tokenizer(reference, task.spec.encoding)
    columns = data.columns
    training, tuning = _split_rows(data, spec.tuning_samples, spec.seed)
    encoder = Encoder(tokenizer, columns, max_length, "longest", task.spec.encoding)
    tuning_batches = list(encoder.batches(encoder.by_length(tuning), 32))
    # Every training row's class id, before any work: the mapping and refusal the gates use.
    training_labels = (label_ids(training, columns.label, info.label2id, data.path)
                       if task.spec.kind == "class" and columns.label is not None else None)

    torch.manual_seed(spec.seed)
    auto = getattr(transformers, task.spec.auto_class)

    def load():
        return auto.from_pretrained(str(reference), local_files_only=True, dtype=torch.float32,
                                    trust_remote_code=False, use_safetensors=None if allow_pickle else True)

    teacher = load().eval().to(device)
    student = apply_to_torch(load().eval(), plan).to(device)
    probe = tuning_batches[0]
    got = collect(_ModelRunner(student, task.name), [probe], task)
    expected = collect(OrtRunner(pruned_onnx), [probe], task)
    worst = max(float(np.abs(got[0][k] - expected[0][k]).max()) for k in got[0])
    if worst > EXACT:
        raise ArtifactError(f"{pruned_onnx}: its pruning plan applied to {reference} differs from the graph by "
                            f"{worst:.3g} (> {EXACT}); pass the model the pruned graph was made from")
    teacher_tuning = collect(_ModelRunner(teacher, task.name), tuning_batches, task)

    def check() -> tuple[float, float]:
        """The student's tuning agreement with the teacher and its distance from it."""
        student.eval()
        with torch.inference_mode():
            outputs = collect(_ModelRunner(student, task.name), tuning_batches, task)
        student.train(spec.dropout)
        return (task.agreement_rate(teacher_tuning, outputs, tuning_batches),
                task.distance(teacher_tuning, outputs, tuning_batches))

    masks = weight_masks(student, plan)
    steps_per_epoch = math.ceil(len(training) / spec.batch_size)
    total = min(spec.max_steps or steps_per_epoch * spec.epochs, steps_per_epoch * spec.epochs)
    optimizer = torch.optim.AdamW(student.parameters(), lr=spec.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, (total - s) / total))
    before, distance_before = check()
    best, best_distance, best_step, best_state, since_best = before, distance_before, 0, _state(student), 0
    curve = [{"step": 0, "loss": float("nan"), "agreement": before, "distance": distance_before}]
    losses: list[float] = []
    step, stopped = 0, False
    rng = np.random.default_rng(spec.seed)
    student.train(spec.dropout)
    with progress.task("recover (distil from PyTorch)", total=total) as advance:
        while step < total and not stopped:
            order = rng.permutation(len(training))
            for start in range(0, len(order), spec.batch_size):
                if step >= total:
                    break
                chosen = order[start:start + spec.batch_size]
                rows = [training[i] for i in chosen]
                batch = encoder.encode(rows)
                hidden = spec.hidden_weight > 0
                with torch.no_grad():
                    target = _student_outputs(teacher, batch, task.name, hidden)
                labels = None if training_labels is None else torch.from_numpy(training_labels[chosen]).to(device)
                outputs = _student_outputs(student, batch, task.name, hidden)
                loss = distillation_loss(outputs, target, batch, task.name, spec.temperature, labels, spec.label_weight)
                if hidden:
                    loss = loss + spec.hidden_weight * hidden_state_loss(outputs, target, batch)
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                _apply_masks(masks)
                step += 1
                losses.append(float(loss.detach()))
                advance(1, description=f"recover (distil) loss {np.mean(losses[-20:]):.4f}")
                if step % spec.eval_every == 0 or step == total:
                    score, distance = check()
                    curve.append({"step": step, "loss": float(np.mean(losses[-spec.eval_every:])),
                                  "agreement": score, "distance": distance})
                    if distance < best_distance:
                        best, best_distance, best_step, best_state, since_best = score, distance, step, _state(student), 0
                    else:
                        since_best += 1
                        if since_best >= spec.patience:
                            stopped = True
                            break
    student.load_state_dict(best_state)
    student.eval()
    report = RecoverReport(
        steps=step, seconds=round(time.perf_counter() - started, 1), training_rows=len(training),
        tuning_rows=len(tuning), training_fingerprint=datamod.fingerprint(training), agreement_before=before,
        agreement_after=best, distance_before=distance_before, distance_after=best_distance, best_step=best_step,
        stopped_early=stopped,
        loss_first=losses[0] if losses else float("nan"), loss_last=losses[-1] if losses else float("nan"),
        curve=curve)
    seen = sorted(set(seen) | {row_digest(columns, r) for r in training + tuning})
    result = _export(student, tokenizer, out, task, tuning_batches, opset, plan, seen, report)
    result.artifacts[0].options["source_sha256"] = sha256_file(pruned_onnx)
    return result, report


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _apply_masks(masks) -> None:
    import torch

    with torch.no_grad():
        for linear, mask in masks:
            linear.weight.mul_(mask)


def _check_same(exported: Path, sliced: Path, batches: list, out: Path) -> None:
    """The recovered export with its masked heads sliced out computes what it computed before."""
    before, after = OrtRunner(exported), OrtRunner(sliced)
    for batch in batches:
        want, got = before.infer(batch), after.infer(batch)
        worst = max(float(np.abs(want[k] - got[k]).max()) for k in want)
        if worst > EXACT:
            raise ArtifactError(f"slicing the masked heads out of the recovered model changed its outputs by {worst:.3g} "
                                f"(> {EXACT}); not writing {out}")


def _export(student, tokenizer, out: Path, task, batches, opset: int, plan: PruningPlan,
            seen: list[str], report: RecoverReport) -> StageResult:
    """Save the student as a model folder beside `out`, export it through the export stage and its
    gate, and stamp the ONNX as a pruned artifact."""

    folder = Path(out).with_suffix(".model")
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=f".{Path(out).name}.") as tmp:
        model_dir = Path(tmp) / "model"
        # The family's own key: DistilBERT's FFN width is hidden_dim, and BERT's name would be ignored.
        setattr(student.config, family_of(student.config.to_dict()).key("intermediate_size"), len(plan.layers[0].ffn_keep))
        student.save_pretrained(str(model_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(model_dir))
        (model_dir / "shipyard_recovery.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        exported = export.run(model_dir, Path(tmp) / "model.onnx", ExportSpec(opset=opset), batches[:2],
                              TorchRunner(model_dir, task=task.name), task)
        if not exported.passed:
            raise ArtifactError(f"the recovered model's export failed its gate ({exported.message}); not writing {out}")
        model = graph_model.load(Path(tmp) / "model.onnx")
        if family_of(student.config.to_dict()).torch_heads == "masked" and any(p.heads_removed for p in plan.layers):
            # The student kept its masked heads (zero output columns): the same function without them.
            model = slice_masked_heads(model, plan, student.config.to_dict(), Path(out))
            graph_model.save(model, Path(tmp) / "sliced.onnx")
            _check_same(Path(tmp) / "model.onnx", Path(tmp) / "sliced.onnx", batches[:2], out)
        stamp(model, "pruned", seen)
        model.metadata_props[PRUNED_MARK] = json.dumps({"recovered": True})
        with atomic_file(out) as out_tmp:
            graph_model.save(model, out_tmp, graph_model.external_data_name(out))
            prove_runs(out_tmp, f"recover {out}")
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(model_dir), str(folder))
    artifact = Artifact(name="model.recovered", path=Path(out), format="onnx", precision="fp32", stage="recover",
                        from_pruned=True, options={"model_folder": folder.name, "recovery": report.to_dict()})
    return StageResult(
        stage="recover", artifacts=[artifact], seconds=report.seconds,
        message=(f"{report.steps} steps on {report.training_rows} rows in {report.seconds:.0f} s: tuning agreement "
                 f"{report.agreement_before:.4f} -> {report.agreement_after:.4f}, distance {report.distance_before:.4g}"
                 f" -> {report.distance_after:.4g}"
                 + ("" if report.improved else " (no check improved on the pruned model, which is what was "
                    "exported: train longer or at a higher learning rate)")
                 + f"; export {exported.message}"),
        details={"recovery": report.to_dict()}, files=sorted(p for p in folder.rglob("*") if p.is_file()),
    )
