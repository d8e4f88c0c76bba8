"""The operator lists in `pipeline/trt/ops/`, generated from onnx-tensorrt's `docs/operators.md`.

    python -m pipeline.trt.oplists operators.md --version 10.15 --source "onnx-tensorrt 10.15-GA"
    python -m pipeline.trt.oplists operators.md --version 11.5 --opset-max 25 \\
        --source "onnx-tensorrt 10.15-GA" --inferred "no 11.5 tag here: 10.15's matrix, opset 25 (release notes)"

Each list records the tag its matrix came from (`source`) and, where that tag was not to be had,
what was inferred and from what (`inferred`): a list is never silently another version's. The
readiness check (`readiness.py`) reads the opset range, the supported operators with their
types and restrictions, and the unsupported ones. Written here because onnx-tensorrt publishes the
matrix only as Markdown.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

_HEADER = re.compile(r"TensorRT\s+([0-9.]+)\s+supports operators in the inclusive range of opset\s+(\d+)\s+to opset\s+(\d+)",
                     re.IGNORECASE)
_OLD_HEADER = re.compile(r"TensorRT\s+([0-9.]+)\s+supports operators up to Opset\s+(\d+)", re.IGNORECASE)


def parse_operators_md(text: str) -> dict[str, Any]:
    """The support matrix of an operators.md: its TensorRT version, opset range, supported
    operators (types, restriction) and unsupported ones."""
    header = _HEADER.search(text)
    if header:
        version, low, high = header.group(1), int(header.group(2)), int(header.group(3))
    elif old := _OLD_HEADER.search(text):
        version, low, high = old.group(1), 1, int(old.group(2))
    else:
        raise ValueError("not an onnx-tensorrt operators.md: no 'TensorRT X supports operators ...' line")
    supported: dict[str, dict[str, Any]] = {}
    unsupported: list[str] = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N") or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", cells[0]):
            continue
        name = cells[0]
        if cells[1] == "N":
            unsupported.append(name)
            continue
        types = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        entry: dict[str, Any] = {"types": types}
        restriction = " ".join(c for c in cells[3:] if c).replace("<br />", " ").strip()
        if restriction:
            entry["restriction"] = re.sub(r"\s+", " ", restriction)
        supported[name] = entry
    if not supported:
        raise ValueError("no operator rows found in the support matrix")
    return {"trt_version": version, "opset_min": low, "opset_max": high,
            "supported": dict(sorted(supported.items())), "unsupported": sorted(unsupported)}


def op_list(text: str, version: str, source: str, inferred: str | None = None, opset_max: int | None = None,
            drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The list for TensorRT `version` from an operators.md (of that version, or, with `inferred`,
    of the nearest one there is): `opset_max` and `drop` record what the inference changed."""
    parsed = parse_operators_md(text)
    if parsed["trt_version"] != version and not inferred:
        raise ValueError(f"the matrix is TensorRT {parsed['trt_version']}'s, not {version}'s: say what is inferred "
                         "(--inferred) or give that version's operators.md")
    for name in drop:
        parsed["supported"].pop(name, None)
        parsed["unsupported"] = sorted({*parsed["unsupported"], name})
    return {"trt_version": version, "source": source, **({"inferred": inferred} if inferred else {}),
            "opset_min": parsed["opset_min"], "opset_max": opset_max or parsed["opset_max"],
            "supported": parsed["supported"], "unsupported": parsed["unsupported"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("operators_md", type=Path, help="onnx-tensorrt's docs/operators.md at a tag")
    parser.add_argument("--version", required=True, help="the TensorRT major.minor the list is for")
    parser.add_argument("--source", required=True, help="where the matrix came from (repository and tag)")
    parser.add_argument("--inferred", default=None, help="what was inferred, where the version's tag was missing")
    parser.add_argument("--opset-max", type=int, default=None, help="the newest opset, where inferred")
    parser.add_argument("--drop", action="append", default=[], help="an operator the version does not have yet")
    parser.add_argument("--out", type=Path, default=None, help="[default: pipeline/trt/ops/VERSION.json]")
    args = parser.parse_args(argv)
    made = op_list(args.operators_md.read_text(encoding="utf-8"), args.version, args.source, args.inferred,
                   args.opset_max, tuple(args.drop))
    out = args.out or Path(__file__).parent / "ops" / f"{args.version}.json"
    out.write_text(json.dumps(made, indent=1) + "\n")
    print(f"{out}: {len(made['supported'])} supported, {len(made['unsupported'])} unsupported, "
          f"opset {made['opset_min']}-{made['opset_max']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
