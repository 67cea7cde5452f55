"""Calibration text and token windows for the compression.

:func:`load_calibration_text` turns a calibration source (``RunSettings.calib_data``) into text:

* ``"wikipedia"`` (the default): the calibration split of the embedded Wikipedia sample;
  ``"wikipedia-validation"``: its validation split (for tuning hyperparameters).  The held-out
  split is reserved for evaluation and refused here;
* a local file: ``.txt`` (UTF-8), ``.jsonl`` (one JSON object per line, field ``"text"``, else
  ``"content"``, else Alpaca's ``"instruction"`` / ``"input"`` / ``"output"``), ``.parquet``
  (column ``"text"``, else the first string column; needs ``pyarrow``);
* a Hugging Face ``datasets`` name: ``wikitext2``, ``ptb``, ``c4``, ``alpaca`` (needs the
  ``datasets`` package and the network, or a filled ``datasets`` cache).

:func:`calibration_windows` tokenises that text once and draws ``n_samples`` non-overlapping
windows of ``seqlen`` tokens at seeded random positions.

Public API: :func:`load_calibration_text`, :func:`calibration_tokens`, :func:`sample_windows`,
:func:`calibration_windows`, :data:`HUB_DATASETS`, :data:`FILE_SUFFIXES`, :data:`WIKIPEDIA_SOURCES`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import numpy as np

from modegpt_jax import wikipedia
from modegpt_jax.errors import UserError

__all__ = [
    "DEFAULT_SOURCE",
    "WIKIPEDIA_SOURCES",
    "FILE_SUFFIXES",
    "HUB_DATASETS",
    "HUB_MAX_CHARS",
    "DOCUMENT_SEPARATOR",
    "HubDataset",
    "load_calibration_text",
    "calibration_tokens",
    "sample_windows",
    "calibration_windows",
]

DEFAULT_SOURCE = "wikipedia"

#: Embedded Wikipedia sources -> split of :mod:`modegpt_jax.wikipedia`.
WIKIPEDIA_SOURCES: dict[str, str] = {
    "wikipedia": "calibration",
    "wikipedia-calibration": "calibration",
    "wikipedia-validation": "validation",
}
#: Names that ask for the held-out split: refused (it is for evaluation only).
_HELDOUT_NAMES = ("heldout", "held-out", "wikipedia-heldout", "wikipedia-held-out")

FILE_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")

#: Documents of a list source are joined with this before the (single) tokenisation.
DOCUMENT_SEPARATOR = "\n\n"

#: Hub data sets are cut (at a document boundary) after this many characters, ~4M tokens:
#: far more than 128 x 2048 calibration tokens, and it keeps the one tokenizer call short
#: (a whole C4 shard is ~300 MB of text).
HUB_MAX_CHARS = 16_000_000


@dataclasses.dataclass(frozen=True)
class HubDataset:
    """Arguments of ``datasets.load_dataset`` for one named calibration set, and its text field."""

    path: str
    name: str | None
    split: str
    field: str
    data_files: dict[str, str] | None = None
    join: bool = False  # True: one string (rows joined by DOCUMENT_SEPARATOR); False: a list of documents

    def describe(self) -> str:
        parts = [self.path] + ([self.name] if self.name else [])
        if self.data_files:
            parts.append(", ".join(self.data_files.values()))
        return " / ".join(parts) + f", split {self.split}"


HUB_DATASETS: dict[str, HubDataset] = {
    # The usual WikiText-2 calibration text: every row (lines, headings, blank rows) joined by "\n\n".
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "train", "text", join=True),
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "train", "sentence"),
    # Only the first of the 1024 English shards ("en/..."), not the whole config.
    "c4": HubDataset(
        "allenai/c4", None, "train", "text", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}
    ),
    "alpaca": HubDataset("tatsu-lab/alpaca", None, "train", "text"),
}

_PIP_DATASETS = "pip install datasets"
_PIP_PYARROW = "pip install pyarrow"


def _accepted() -> str:
    return (
        f"{', '.join(WIKIPEDIA_SOURCES)} (embedded), a local {'/'.join(FILE_SUFFIXES)} file, "
        f"or a datasets name: {', '.join(HUB_DATASETS)}"
    )


def _one_line(text: str, limit: int = 240) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- local files


def _read_txt(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"calibration file {path} is not UTF-8 text (bad byte at offset {exc.start}): save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read calibration file {path}: {exc.strerror or exc}") from exc


def _jsonl_document(record: Any, path: pathlib.Path, lineno: int) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
    for key in ("text", "content"):
        if key in record:
            value = record[key]
            if not isinstance(value, str):
                raise UserError(f"{path} line {lineno}: field {key!r} must be a string, got {type(value).__name__}")
            return value
    alpaca = [k for k in ("instruction", "input", "output") if k in record]
    if alpaca:
        parts = []
        for key in alpaca:
            value = record[key]
            if value is None:
                continue
            if not isinstance(value, str):
                raise UserError(f"{path} line {lineno}: field {key!r} must be a string, got {type(value).__name__}")
            if value.strip():
                parts.append(value.strip())
        return "\n".join(parts)
    raise UserError(
        f"{path} line {lineno}: no text field; give each object a \"text\" or \"content\" string, "
        f"or Alpaca's \"instruction\"/\"input\"/\"output\" (found keys: {', '.join(map(str, record)) or 'none'})"
    )


def _read_jsonl(path: pathlib.Path) -> list[str]:
    documents: list[str] = []
    for lineno, line in enumerate(_read_txt(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {lineno} is not valid JSON ({exc.msg}, column {exc.colno})") from exc
        document = _jsonl_document(record, path, lineno)
        if document.strip():
            documents.append(document)
    return documents


def _read_parquet(path: pathlib.Path) -> list[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UserError(f"reading the parquet file {path} needs pyarrow; install it with: {_PIP_PYARROW}") from exc
    try:
        schema = pq.read_schema(path)
        strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
        if hasattr(pa.types, "is_string_view"):
            strings += [f.name for f in schema if pa.types.is_string_view(f.type) and f.name not in strings]
            strings.sort(key=schema.names.index)
        if "text" in strings:
            column = "text"
        elif strings:
            column = strings[0]
        else:
            raise UserError(
                f"parquet file {path} has no string column for the text "
                f"(columns: {', '.join(f'{f.name}: {f.type}' for f in schema) or 'none'})"
            )
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"cannot read parquet file {path}: {_one_line(exc)}") from exc
    return [v for v in values if v is not None and v.strip()]


def _read_file(path: pathlib.Path) -> str | list[str]:
    suffix = path.suffix.lower()
    if path.is_dir():
        raise UserError(f"calibration source {path} is a folder; give a {'/'.join(FILE_SUFFIXES)} file")
    if suffix not in FILE_SUFFIXES:
        raise UserError(
            f"calibration file {path} has an unsupported extension {path.suffix or '(none)'!r}; "
            f"use one of {', '.join(FILE_SUFFIXES)}"
        )
    if not path.is_file():
        raise UserError(f"calibration file not found: {path}")
    text: str | list[str]
    if suffix == ".txt":
        text = _read_txt(path)
    elif suffix == ".jsonl":
        text = _read_jsonl(path)
    else:
        text = _read_parquet(path)
    if not (text.strip() if isinstance(text, str) else text):
        raise UserError(f"calibration file {path} holds no text")
    return text


# --------------------------------------------------------------------------- hub data sets


def _import_datasets():
    import datasets  # noqa: PLC0415  (optional dependency)

    return datasets


def _load_hub(name: str) -> str | list[str]:
    spec = HUB_DATASETS[name]
    where = f"calibration dataset {name!r} ({spec.describe()})"
    local = f"or pass a local {'/'.join(FILE_SUFFIXES)} file, or use the embedded default 'wikipedia'"
    try:
        datasets = _import_datasets()
    except ImportError as exc:
        raise UserError(f"{where} needs the datasets package: install it with `{_PIP_DATASETS}`, {local}") from exc
    kwargs: dict[str, Any] = {"split": spec.split}
    if spec.data_files:
        kwargs["data_files"] = spec.data_files
    try:
        if spec.name is None:
            dataset = datasets.load_dataset(spec.path, **kwargs)
        else:
            dataset = datasets.load_dataset(spec.path, spec.name, **kwargs)
    except Exception as exc:  # hub failures come as many types (connection, HTTP, not found, offline mode)
        raise UserError(
            f"cannot load {where}: {type(exc).__name__}: {_one_line(exc, 160)}; "
            f"check the network (or the datasets cache when offline), {local}"
        ) from exc
    try:
        column = dataset[spec.field]
    except (KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{where} has no field {spec.field!r}") from exc
    documents: list[str] = []
    total = 0
    for value in column:
        if value is None:
            continue
        documents.append(value)
        total += len(value) + len(DOCUMENT_SEPARATOR)
        if total >= HUB_MAX_CHARS:
            break
    if spec.join:
        return DOCUMENT_SEPARATOR.join(documents)
    return [d for d in documents if d.strip()]


# --------------------------------------------------------------------------- public API


def load_calibration_text(source: str = DEFAULT_SOURCE) -> str | list[str]:
    """The calibration text named by ``source``: one string, or a list of documents.

    Named sources (``wikipedia``, ``wikipedia-validation``, the ``datasets`` names) take
    precedence over a file of the same name; write ``./c4`` for a file called ``c4``.
    """
    if not isinstance(source, (str, pathlib.PurePath)):
        raise UserError(f"calibration source must be a string, got {type(source).__name__}")
    raw = str(source)
    key = raw.strip().lower()
    if key in WIKIPEDIA_SOURCES:
        return wikipedia.embedded_text(WIKIPEDIA_SOURCES[key])
    if key in _HELDOUT_NAMES:
        raise UserError(
            f"calibration source {raw!r}: the held-out Wikipedia split is reserved for evaluation "
            "(perplexity) and is never used to calibrate; use 'wikipedia' (calibration split) "
            "or 'wikipedia-validation'"
        )
    if key in HUB_DATASETS:
        return _load_hub(key)
    path = pathlib.Path(raw).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.exists():
        return _read_file(path)
    raise UserError(f"unknown calibration source {raw!r}; accepted: {_accepted()}")


def calibration_tokens(tokenizer: Any, text: str | list[str]) -> np.ndarray:
    """All tokens of ``text`` (documents joined by a blank line), one tokenizer call, no special tokens."""
    from modegpt_jax.perplexity import tokenize

    if not isinstance(text, str):
        text = DOCUMENT_SEPARATOR.join(text)
    return tokenize(tokenizer, text)


def _check_positive(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def sample_windows(
    tokens: np.ndarray, n_samples: int, seqlen: int, seed: int, *, source: str = "the text"
) -> np.ndarray:
    """``n_samples`` distinct, non-overlapping windows [n_samples, seqlen] of ``tokens`` at seeded random places.

    The stream is cut into ``len(tokens) // seqlen`` slots after a random offset in
    ``[0, len(tokens) % seqlen]``; ``n_samples`` slots are then drawn without replacement
    (in random order).  Raises :class:`UserError` when there are fewer than
    ``n_samples * seqlen`` tokens.
    """
    n_samples = _check_positive(n_samples, "n_samples", 1)
    seqlen = _check_positive(seqlen, "seqlen", 2)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {tokens.shape}")
    needed = n_samples * seqlen
    found = len(tokens)
    if found < needed:
        raise UserError(
            f"calibration text {source} has {found} tokens, but {n_samples} windows of {seqlen} tokens "
            f"need {needed}: use fewer windows (calib_samples), shorter ones (calib_seqlen), or more text",
            argument=("calib_samples", "calib_seqlen"),
        )
    rng = np.random.default_rng(seed)
    slots = found // seqlen
    offset = int(rng.integers(0, found - slots * seqlen + 1))
    starts = offset + rng.choice(slots, size=n_samples, replace=False) * seqlen
    return tokens[starts[:, None] + np.arange(seqlen)].astype(np.int32, copy=False)


def calibration_windows(tokenizer: Any, source: str, n_samples: int, seqlen: int, seed: int) -> np.ndarray:
    """Calibration token windows [n_samples, seqlen] int32 from ``source`` (see :func:`load_calibration_text`)."""
    _check_positive(n_samples, "n_samples", 1)
    _check_positive(seqlen, "seqlen", 2)
    text = load_calibration_text(source)
    tokens = calibration_tokens(tokenizer, text)
    return sample_windows(tokens, n_samples, seqlen, seed, source=repr(str(source)))
