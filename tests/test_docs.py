"""The README and docs/ are what a newcomer reads: the generated pages match the code, every page
is linked from the README, every relative link resolves, and the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_generated_pages_match_the_code():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "generate.py"), "--check"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


def test_the_generated_tables_hold_every_key_and_rule():
    from pipeline.recipe import Recipe
    from pipeline.trt.readiness import RULES

    recipe_page, trt_page = (ROOT / "docs" / "recipe.md").read_text(), (ROOT / "docs" / "tensorrt.md").read_text()
    for key in ("data.padding", "stages.quantize.fallback.max_nodes", "targets[].profiles[].sequence.max",
                *(f"thresholds.{kind}.min_agreement" for kind in ("fp32", "pruned", "fp16", "int8"))):
        assert f"| `{key}` |" in recipe_page, key
    assert all(f"| `{name}` |" in recipe_page for name in Recipe.model_fields)
    for rule, (severity, _) in RULES.items():
        assert f"| `{rule}` | {severity} |" in trt_page, rule


def test_every_doc_is_linked_from_the_readme_and_every_link_resolves():
    readme = (ROOT / "README.md").read_text()
    linked = {m.group(1) for m in LINK.finditer(readme)}
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert pages and set(pages) <= linked, set(pages) - linked
    for page in [ROOT / "README.md", *(ROOT / p for p in pages)]:
        for match in LINK.finditer(page.read_text()):
            target = match.group(1)
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_readme_is_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
