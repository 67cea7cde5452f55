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
    that is not a JSON object is left alone and named in the error."""
    path = Path(path)
    existing: dict[str, Any] = {}
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except ValueError as e:
            raise SystemExit(f"error: {path} is not valid JSON ({e}); move it away to start a new one") from None
        if not isinstance(existing, dict):
            raise SystemExit(f"error: {path} does not hold a JSON object; move it away to start a new one")
    if key is None:
        existing.update(fields)
    else:
        existing[key] = fields
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=2) + "\n")
    return path
