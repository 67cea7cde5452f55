"""Read Hugging Face PyTorch checkpoints tensor by tensor.

A :class:`TensorSource` lists tensor names and returns one tensor at a time as a NumPy array in the
checkpoint's own dtype (bfloat16 through ml_dtypes), so a checkpoint is never held twice and the
compression pipeline can stream one layer at a time.

Formats: ``model.safetensors``, sharded ``model.safetensors.index.json``, and ``pytorch_model.bin``
(single or sharded, through the ``torch`` extra, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from modegpt_jax.errors import UserError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class TensorSource(Protocol):
    def names(self) -> Iterable[str]: ...

    def get(self, name: str) -> np.ndarray: ...


def _read_index(path: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the checkpoint index {path}: {e}") from None
    files = {name: path.parent / fname for name, fname in weight_map.items()}
    missing = sorted({str(f) for f in files.values() if not f.is_file()})
    if missing:
        raise UserError(f"checkpoint shard(s) listed in {path.name} are missing: {', '.join(missing)}")
    return files


class SafetensorsSource:
    """One or many ``.safetensors`` files; each file is memory-mapped and read a tensor at a time."""

    def __init__(self, files_by_name: dict[str, Path]):
        self._files = files_by_name

    @classmethod
    def from_file(cls, path: Path) -> SafetensorsSource:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"corrupt or unreadable safetensors file {path}: {e}") from None
        return cls({n: path for n in names})

    @classmethod
    def from_index(cls, path: Path) -> SafetensorsSource:
        return cls(_read_index(path))

    def names(self) -> Iterable[str]:
        return self._files.keys()

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self._files[name]
        try:
            # Opened per tensor: a handle kept open keeps its memory map, and every page read through it stays
            # in this process's resident memory (2.3 GB after four 7B-shaped layers); the header parse is cheap.
            with safe_open(str(path), framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise UserError(f"cannot read tensor {name!r} from {path}: {e}") from None


class TorchBinSource:
    """``pytorch_model.bin`` files (torch extra); a shard is loaded when first needed, memory-mapped."""

    def __init__(self, files_by_name: dict[str, Path]):
        self._files = files_by_name
        self._loaded: tuple[Path, dict] | None = None

    @classmethod
    def from_file(cls, path: Path) -> TorchBinSource:
        src = cls({})
        state = src._load(path)
        src._files = {n: path for n in state}
        return src

    @classmethod
    def from_index(cls, path: Path) -> TorchBinSource:
        return cls(_read_index(path))

    def _load(self, path: Path) -> dict:
        if self._loaded is not None and self._loaded[0] == path:
            return self._loaded[1]
        try:
            import torch
        except ImportError:
            raise UserError(
                f"{path.name} is a PyTorch checkpoint: install the torch extra "
                "(pip install 'modegpt-jax[torch]' or pip install torch==2.13.0)"
            ) from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"corrupt or unreadable PyTorch checkpoint {path}: {e}") from None
        self._loaded = (path, state)
        return state

    def names(self) -> Iterable[str]:
        return self._files.keys()

    def get(self, name: str) -> np.ndarray:
        import torch

        t = self._load(self._files[name])[name]
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()


def open_checkpoint(directory: Path) -> TensorSource:
    """The weights of a Hugging Face model directory, preferring safetensors over ``.bin``."""
    for fname, opener in (
        (SAFETENSORS_INDEX, SafetensorsSource.from_index),
        (SAFETENSORS, SafetensorsSource.from_file),
        (TORCH_BIN_INDEX, TorchBinSource.from_index),
        (TORCH_BIN, TorchBinSource.from_file),
    ):
        if (directory / fname).is_file():
            return opener(directory / fname)
    raise UserError(
        f"no weights in {directory}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} or a .gguf file"
    )
