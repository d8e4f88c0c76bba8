"""The searches a run makes: loops in the orchestrator that call stages, never the other way round.

- `bisect_fraction`: the largest FFN fraction whose agreement on the tuning rows meets the prune
  budget, by bisection in [0, max_fraction];
- `prune_within_budget`: that search on a `Pruner`'s candidates, each measured as the recipe says
  (as pruned, or after a short recovery), then the chosen graph written as the prune stage's output.

The INT8 float fallback is a search too; it stays inside the quantize stage, because it is one
ONNX Runtime quantization call per candidate set, with no other stage in the loop.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact, StageResult
from pipeline.parity.runners import OrtRunner
from pipeline.parity.tasks import Task, collect
from pipeline.progress import SILENT, Progress
from pipeline.recipe import BudgetSpec, PruneSpec
from pipeline.run.context import RecoveryInputs
from pipeline.stages.prune.plan import PruningPlan, plan_path
from pipeline.stages.prune.recover import recover
from pipeline.stages.prune.scores import PruneError
from pipeline.stages.prune.stage import Pruner

Batch = dict[str, Any]


def bisect_fraction(budget: BudgetSpec, agreement: Callable[[float], float]) -> tuple[float, list[dict[str, float]]]:
    """The largest fraction in [0, budget.max_fraction] whose `agreement(fraction)` meets
    `budget.min_agreement` (bisection, `budget.steps` steps after the end points), and the trials."""
    trials: list[dict[str, float]] = []

    def passes(fraction: float) -> bool:
        measured = agreement(fraction)
        trials.append({"ffn_fraction": fraction, "agreement": measured})
        return measured >= budget.min_agreement

    lo, hi = 0.0, budget.max_fraction
    if passes(hi):
        return hi, trials
    if not passes(lo):
        return lo, trials  # even the heads/sparsity alone miss the budget: the gate will say so
    for _ in range(budget.steps):
        mid = round((lo + hi) / 2, 4)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def prune_within_budget(src: Artifact, spec: PruneSpec, out_path: Path, calibration: list[Batch],
                        tuning: list[Batch], model_config: dict, task: Task, seen: Sequence[str],
                        recovery: RecoveryInputs | None = None, trial_settings: dict | None = None,
                        progress: Progress = SILENT) -> StageResult:
    """Prune `src` at the largest FFN fraction whose agreement with `src` on the `tuning` rows (never
    the evaluation rows) meets `spec.budget`; with `budget.recovered`, each candidate is judged after
    at most `budget.trial_steps` recovery steps (`recovery`, `trial_settings`: the reference model,
    max_length and opset the recovery needs)."""
    budget = spec.budget
    if budget is None:
        raise PruneError("no prune budget to search: set stages.prune.budget")
    if not tuning:
        raise PruneError("a prune budget chooses on tuning rows; set data.tuning_samples above 0")
    pruner = Pruner.of(src, spec, calibration, model_config)
    original = collect(OrtRunner(src.path), tuning, task)

    def agreement_of(path: Path) -> float:
        return task.agreement_rate(original, collect(OrtRunner(path), tuning, task), tuning)

    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=".budget-") as tmp:
        def measure(fraction: float) -> float:
            trial = Path(tempfile.mkdtemp(dir=tmp, prefix="trial-"))  # each candidate its own folder
            candidate = trial / "candidate.onnx"
            plan = pruner.candidate(fraction, candidate)
            if not budget.recovered or recovery is None:
                return agreement_of(candidate)
            return agreement_of(_recovered(candidate, plan, budget, recovery, trial_settings or {}, seen, task,
                                           progress))

        fraction, trials = bisect_fraction(budget, measure)
    return pruner.write(fraction, out_path, seen, trials)


def _recovered(candidate: Path, plan: PruningPlan, budget: BudgetSpec, recovery: RecoveryInputs, settings: dict,
               seen: Sequence[str], task: Task, progress: Progress) -> Path:
    """`candidate` after a short recovery (at most `budget.trial_steps` steps) along `plan`."""
    plan_path(candidate).write_text(plan.to_json())
    steps = min(recovery.spec.max_steps or budget.trial_steps, budget.trial_steps)
    out = candidate.with_name("recovered.onnx")
    recover(settings["reference"], candidate, recovery.data, out, recovery.spec.model_copy(update={"max_steps": steps}),
            settings["max_length"], task.name, progress, settings["opset"], tuple(seen), device=settings["device"])
    return out
