"""How long the pipeline itself takes: a recipe's first run (empty stage cache) and its rerun with
nothing changed, in one process each, from one invocation, with the time of every stage.

    python bench/pipeline_time.py recipes/minilm-tweets.yaml

Prints wall-clock seconds of both runs, their ratio, and the stages' seconds from the first
run's manifest (where the time goes). One run each: these machines are noisy, so read the ratio
and the ranking of stages, not the second decimal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(recipe: Path, out: Path, cache: Path) -> float:
    exe = Path(sys.executable).with_name("shipyard")
    started = time.perf_counter()
    result = subprocess.run([str(exe), "run", str(recipe), "--out", str(out), "--cache-dir", str(cache), "--quiet"])
    seconds = time.perf_counter() - started
    if result.returncode not in (0, 1):
        sys.exit(f"shipyard run exited {result.returncode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-") as tmp:
        work = Path(tmp)
        first = timed_run(args.recipe, work / "first", work / "cache")
        rerun = timed_run(args.recipe, work / "rerun", work / "cache")
        manifest = json.loads((work / "first" / "manifest.json").read_text())
        reused = json.loads((work / "rerun" / "manifest.json").read_text())["invocation"]["cache"]["reused"]
    print(f"first run (empty cache): {first:7.1f} s")
    print(f"rerun (nothing changed): {rerun:7.1f} s   ratio rerun/first {rerun / first:.3f}")
    print(f"stages reused on rerun: {len(reused)}")
    print("where the first run's time went (stage seconds from its manifest):")
    for stage in sorted(manifest["stages"], key=lambda s: -s["seconds"]):
        if stage["seconds"] >= 0.5:
            print(f"  {stage['stage']:40s} {stage['seconds']:7.1f} s")


if __name__ == "__main__":
    main()
