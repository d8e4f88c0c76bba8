"""`--overwrite` replaces a release so that a SIGKILL at any instant leaves one that verifies:
the kill is injected at each step of the replacement in a real `shipyard run` process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke
from test_faults import quick_recipe

from pipeline.artifacts import aside, restore_replaced

# Runs `shipyard` with a SIGKILL injected right after the step named by argv[1]: "exchange" (the
# one-step swap of old and new), or "aside" (the old release renamed aside, on a system without
# the swap, before the new one is renamed in).
KILLED = """
import os, signal, sys
import pipeline.artifacts as artifacts

step = sys.argv.pop(1)
real_exchange, real_replace = artifacts._exchange, os.replace

def exchange(a, b):
    if step == "aside":
        return False
    done = real_exchange(a, b)
    os.kill(os.getpid(), signal.SIGKILL)
    return done

def replace(src, dst):
    real_replace(src, dst)
    if step == "aside" and str(dst).endswith(".replaced"):
        os.kill(os.getpid(), signal.SIGKILL)

artifacts._exchange, artifacts.os.replace = exchange, replace
from pipeline.cli import main
main()
"""


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("step", ["exchange", "aside"])
def test_a_kill_inside_overwrite_leaves_a_release_that_verifies(tiny, tiny_holdout_small, tmp_path, step):
    recipe = quick_recipe(tmp_path, tiny.model, tiny_holdout_small)
    out = tmp_path / "release"
    assert invoke("run", recipe, "--out", out, "--quiet").exit_code == 0
    old = _manifest(out)["data"]["evaluation"]["rows"]
    done = subprocess.run([sys.executable, "-c", KILLED, step, "run", str(recipe), "--out", str(out), "--overwrite",
                           "--quiet", "--set", "data.evaluation.samples=48"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]  # killed where the injection says
    if step == "exchange":  # the swap is one step: the new release is in place and whole
        assert _manifest(out)["data"]["evaluation"]["rows"] == 48
    else:  # between the renames: nothing at the path, the old release whole beside it
        assert not out.exists() and invoke("verify", aside(out)).exit_code == 0
        restore_replaced(out)  # what the next write into the folder does first
        assert _manifest(out)["data"]["evaluation"]["rows"] == old
    assert invoke("verify", out).exit_code == 0
    again = invoke("run", recipe, "--out", out, "--overwrite", "--quiet")  # cleans up after the kill
    assert again.exit_code == 0, again.output
    assert invoke("verify", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".release")) == []
