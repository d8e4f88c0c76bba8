"""A bounded stage cache: `shipyard cache ls|prune`, the size cap applied after each store,
least recently used first, and a key that names the CPU the kernels ran on."""

import json
import os
import time
from pathlib import Path

import pytest
from conftest import invoke, write_recipe

QUICK = {"stages": {"quantize": {"enabled": False}},
         "data": {"calibration": {"samples": 32}, "tuning_samples": 32, "evaluation": {"samples": 64}, "max_length": 32}}


def listing(cache: Path) -> dict:
    result = invoke("cache", "ls", "--cache-dir", cache, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def stage_cached(release: Path) -> dict[str, bool]:
    return {s["stage"]: s["cached"] for s in json.loads((release / "manifest.json").read_text())["stages"]}


def used(cache: Path, key: str, when: float) -> None:
    entry = cache / "stages" / key / "entry.json"
    os.utime(entry, (when, when))


@pytest.fixture
def filled(tiny, tiny_holdout_small, tmp_path):
    """A cache after one quick run (export and validate entries), its recipe and the run's release."""
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, **QUICK)
    cache = tmp_path / "cache"
    result = invoke("run", recipe, "--out", tmp_path / "first", "--cache-dir", cache, "--quiet")
    assert result.exit_code == 0, result.output
    return recipe, cache


def test_ls_lists_every_entry_with_its_stage_size_and_last_use(filled):
    recipe, cache = filled
    listed = listing(cache)
    stages = sorted(e["stage"] for e in listed["entries"])
    assert "export" in stages and any(s.startswith("validate") for s in stages) and "pytorch-reference" in stages
    assert "damaged" not in stages and "unnamed" not in stages
    on_disk = sum(f.stat().st_size for f in (cache / "stages").rglob("*") if f.is_file() and
                  not f.relative_to(cache / "stages").parts[0].startswith("."))
    assert listed["bytes"] == on_disk == sum(e["bytes"] for e in listed["entries"])
    assert listed["max_size"] == 20 * 10**9
    text = invoke("cache", "ls", "--cache-dir", cache).output
    assert f"{len(listed['entries'])} entries" in text and "cap 20.0 GB" in text


def test_prune_to_a_size_keeps_the_most_recently_used_and_the_next_run_reuses_them(filled, tmp_path):
    """The export entry is made the most recently used; a cap its size fits keeps it alone, and
    the next run copies the export and recomputes the rest, with the same bytes."""
    recipe, cache = filled
    entries = listing(cache)["entries"]
    export = next(e for e in entries if e["stage"] == "export")
    now = time.time()
    for i, entry in enumerate(entries):
        used(cache, entry["key"], now - 3600 * (i + 1))
    used(cache, export["key"], now)
    result = invoke("cache", "prune", "--cache-dir", cache, "--max-size", f"{export['bytes'] + 1}B")
    assert result.exit_code == 0, result.output
    assert f"removed {len(entries) - 1} entries" in result.output and "kept 1" in result.output
    assert [e["key"] for e in listing(cache)["entries"]] == [export["key"]]
    again = invoke("run", recipe, "--out", tmp_path / "again", "--cache-dir", cache, "--quiet")
    assert again.exit_code == 0, again.output
    cached = stage_cached(tmp_path / "again")
    assert cached["export"] and not any(v for k, v in cached.items() if k != "export")
    first = json.loads((tmp_path / "first" / "manifest.json").read_text())["artifacts"]
    second = json.loads((tmp_path / "again" / "manifest.json").read_text())["artifacts"]
    assert [a["sha256"] for a in first] == [a["sha256"] for a in second]


def test_prune_older_than_removes_only_the_entries_unused_that_long(filled):
    recipe, cache = filled
    entries = listing(cache)["entries"]
    old = entries[-1]["key"]
    used(cache, old, time.time() - 40 * 86400)
    result = invoke("cache", "prune", "--cache-dir", cache, "--older-than", "30d", "--json")
    assert result.exit_code == 0, result.output
    assert [e["key"] for e in json.loads(result.output)["removed"]] == [old]
    assert len(listing(cache)["entries"]) == len(entries) - 1


def test_a_reused_entry_becomes_the_most_recently_used(filled, tmp_path):
    recipe, cache = filled
    entries = listing(cache)["entries"]
    for entry in entries:
        used(cache, entry["key"], time.time() - 86400)
    result = invoke("run", recipe, "--out", tmp_path / "again", "--cache-dir", cache, "--quiet")
    assert result.exit_code == 0, result.output
    reused = {stage for stage, cached in stage_cached(tmp_path / "again").items() if cached}
    today = time.strftime("%Y-%m-%d")
    after = listing(cache)["entries"]
    assert reused and {e["stage"] for e in after if e["last_used"].startswith(today)} == reused
    # what a fully cached run never needs (PyTorch's outputs: every verdict was reused) stays old
    assert [e["stage"] for e in after if not e["last_used"].startswith(today)] == ["pytorch-reference"]


def test_the_size_cap_applies_after_each_store(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    """SHIPYARD_CACHE_MAX_SIZE below one entry's size leaves the cache empty after a run, and the
    manifest and summary say entries were evicted; the release is whole."""
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, **QUICK)
    monkeypatch.setenv("SHIPYARD_CACHE_MAX_SIZE", "1B")
    result = invoke("run", recipe, "--out", tmp_path / "r", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "least recently used entries removed" in " ".join(result.output.split())
    record = json.loads((tmp_path / "r" / "manifest.json").read_text())["invocation"]["cache"]
    assert record["max_size"] == 1 and record["evicted"] >= 2
    assert listing(tmp_path / "cache")["entries"] == []
    assert invoke("verify", tmp_path / "r").exit_code == 0


@pytest.mark.parametrize(("args", "fragment"), [
    (("prune", "--max-size", "lots"), "--max-size 'lots' is not a size"),
    (("prune", "--older-than", "30 days"), "--older-than '30 days' is not an age"),
])
def test_bad_prune_values_are_one_line_errors(tmp_path, args, fragment):
    result = invoke("cache", *args, "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2 and result.output.strip().startswith(f"error: {fragment}"), result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_bad_size_cap_in_the_environment_is_named(tiny, tiny_holdout_small, tmp_path, monkeypatch):
    monkeypatch.setenv("SHIPYARD_CACHE_MAX_SIZE", "twenty gigs")
    recipe = write_recipe(tmp_path, tiny.model, tiny_holdout_small, **QUICK)
    result = invoke("run", recipe, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "SHIPYARD_CACHE_MAX_SIZE 'twenty gigs' is not a size" in result.output
    assert not (tmp_path / "r").exists()


def test_the_key_names_the_cpu_the_kernels_ran_on(monkeypatch, tmp_path):
    """An entry made on an AVX-512 VNNI machine is not served to an AVX2 one, nor to an ARM one."""
    from pipeline.release import manifest
    from pipeline.run import cache as cache_mod

    assert manifest.machine().cpu_features.startswith(os.uname().machine + ":")  # recorded in every manifest
    store = cache_mod.StageCache.at(tmp_path)
    keys = set()
    for cpu in ("x86_64:avx,avx2,fma", "x86_64:avx,avx2,avx512_vnni,avx512f,fma", "aarch64:asimd,asimddp"):
        monkeypatch.setattr(manifest, "cpu_kernel_features", lambda cpu=cpu: cpu)
        cache_mod.keyed_versions.cache_clear()
        keys.add(store.key("export", {"model": "same"}))
    cache_mod.keyed_versions.cache_clear()
    assert len(keys) == 3
