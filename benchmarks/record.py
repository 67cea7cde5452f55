"""The benchmarks' results files: a run writes the fields it measured and keeps every other field.

``benchmarks/results/*.json`` also hold records of earlier runs under their own names (other settings, other
days, other machines), which the README cites; rerunning a benchmark must not drop them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def update_results(path: str | Path, fields: dict[str, Any], key: str | None = None) -> Path:
    """Write ``fields`` into the JSON object in ``path`` (created with its folder if missing): at the top level,
    replacing fields of the same names, or, with ``key``, as the value of ``key``. Every other field stays. A file
    that is not a JSON object is left alone: this run's record goes to ``NAME.unmerged.json`` beside it (a long
    benchmark's result is not lost), and the error names both."""
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
            problem = None if isinstance(existing, dict) else "does not hold a JSON object"
        except ValueError as e:
            problem = f"is not valid JSON ({e})"
        if problem:
            aside = path.with_name(f"{path.stem}.unmerged.json")
            aside.write_text(json.dumps(fields if key is None else {key: fields}, indent=2) + "\n")
            raise SystemExit(f"error: {path} {problem}; left as it is, this run's record written to {aside}")
    if key is None:
        existing.update(fields)
    else:
        existing[key] = fields
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    return path
