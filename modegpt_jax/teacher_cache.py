"""The dense teacher's final residual stream for every training window of ``modegpt heal``, computed once on disk.

Distillation needs the teacher's token distributions at every training position. Computed on the fly, they cost a
whole teacher in memory and one teacher forward pass per step, in every run. A :class:`TeacherCache` holds instead
the teacher's residual stream after its last block, ``[windows, seqlen, hidden]`` in float32 (the head, a few
megabytes of weights, turns it into logits inside the train step: 85x smaller than the logits for SmolLM2's
vocabulary). :func:`fill_teacher_cache` computes it block by block from the checkpoint, so the teacher is never
whole in memory (one block and one batch of windows at a time); a killed fill continues where it stopped, and a
finished cache serves every later run on the same windows (a learning-rate sweep, a resumed run).

Layout of the directory: ``meta.json`` (what the cache was computed from, its shape, how far the fill got) and
float32 memory maps. The fill alternates between two buffers (stage ``s`` reads ``stage-{(s - 1) % 2}`` and writes
``stage-{s % 2}``), so a batch redone after a crash reads the same input again; once finished, the result is
renamed ``hidden.f32`` and the other buffer deleted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from modegpt_jax.errors import UserError

__all__ = ["TeacherCache", "checkpoint_identity", "fill_teacher_cache"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json")


def checkpoint_identity(checkpoint) -> dict[str, Any]:
    """What identifies a checkpoint's weights without reading them: its configuration and the names, sizes and
    modification times of its weight and index files."""
    directory = Path(checkpoint.directory)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()
                   if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    return {"config": checkpoint.config.to_json(), "files": [list(f) for f in files]}


class TeacherCache:
    """A cache directory for the teacher's final residual stream ``[windows, seqlen, hidden]`` (float32).

    ``fingerprint``: JSON-able description of what the cache is computed from (the teacher, the windows, the
    compute dtype); a directory holding a cache of another fingerprint or shape is refused, never overwritten."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any], shape: tuple[int, int, int]):
        self.directory = Path(directory)
        self.shape = tuple(int(n) for n in shape)
        fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from meta.json
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"teacher cache {self.directory} is a file, not a directory", argument="teacher_cache")
        meta_path = self.directory / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            changed = sorted(k for k in set(fingerprint) | set(meta["fingerprint"])
                             if fingerprint.get(k) != meta["fingerprint"].get(k))
            if tuple(meta["shape"]) != self.shape:
                changed.append("shape")
            if changed:
                raise UserError(f"teacher cache {self.directory} holds the teacher's states for another run (other "
                                f"{', '.join(changed)}): give another directory, or delete this one",
                                argument="teacher_cache")
            self.meta = meta
        elif self.directory.exists() and any(self.directory.iterdir()):
            raise UserError(f"teacher cache {self.directory} is a non-empty directory without a cache in it: give "
                            "an empty or new directory", argument="teacher_cache")
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.meta = {"fingerprint": fingerprint, "shape": list(self.shape), "stage": 0, "batches": 0,
                         "complete": False}
            self._save_meta()

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def hidden(self) -> np.ndarray:
        """The finished cache, a read-only float32 memory map ``[windows, seqlen, hidden]``."""
        if not self.complete:
            raise ValueError(f"teacher cache {self.directory} is not filled yet")
        return np.memmap(self.directory / "hidden.f32", np.float32, "r", shape=self.shape)

    def _buffer(self, parity: int, mode: str) -> np.memmap:
        path = self.directory / f"stage-{parity}.f32"
        if mode == "r+" and not path.exists():
            mode = "w+"
        return np.memmap(path, np.float32, mode, shape=self.shape)

    def _save_meta(self) -> None:
        tmp = self.directory / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
        os.replace(tmp, self.directory / "meta.json")

    def _finish(self, stages: int) -> None:
        last = self.directory / f"stage-{(stages - 1) % 2}.f32"
        if last.exists():  # else renamed already, by a fill stopped just after
            os.replace(last, self.directory / "hidden.f32")
        (self.directory / f"stage-{stages % 2}.f32").unlink(missing_ok=True)
        self.meta.update(complete=True, stage=stages, batches=0)
        self._save_meta()


def fill_teacher_cache(cache: TeacherCache, checkpoint, windows: np.ndarray, dtype: Any = "float32", *,
                       batch_size: int = 4, progress: bool = True) -> None:
    """Compute the teacher's final residual stream for every window into ``cache``, streamed block by block from
    ``checkpoint`` (an :class:`~converters.hf_import.HFCheckpoint`) in ``dtype``: stage 0 embeds the windows, stage
    ``l + 1`` runs block ``l`` on the output of stage ``l``, ``batch_size`` windows at a time. Only the embeddings
    (then one block) and one batch are in memory. Continues an unfinished fill; returns at once if finished.

    The states equal the in-memory teacher's, computed block by block, up to float rounding (the whole-model
    train step is one compiled program, whose fusions may round differently)."""
    from modegpt_jax.model import hidden_states, run_block

    if cache.complete:
        return
    windows = np.asarray(windows, np.int32)
    cfg = checkpoint.config
    if windows.shape != cache.shape[:2] or cfg.hidden_size != cache.shape[2]:
        raise ValueError(f"windows {windows.shape} and hidden size {cfg.hidden_size} do not match the cache's "
                         f"shape {cache.shape}")
    stages = len(cfg.layers) + 1
    starts = range(0, len(windows), batch_size)
    top = checkpoint.load_shell(dataclasses.replace(cfg, layers=()), dtype)  # embeddings, final norm and head
    bar = tqdm(total=stages * len(starts), initial=cache.meta["stage"] * len(starts) + cache.meta["batches"],
               desc="teacher cache", unit="batch", disable=not progress)
    for stage in range(cache.meta["stage"], stages):
        source = None if stage == 0 else cache._buffer((stage - 1) % 2, "r")
        target = cache._buffer(stage % 2, "r+")
        block = None if stage == 0 else checkpoint.load_block(stage - 1, dtype)
        for b in range(cache.meta["batches"], len(starts)):
            rows = slice(starts[b], starts[b] + batch_size)
            tokens = jnp.asarray(windows[rows])
            if block is None:
                h = hidden_states(top, tokens)  # no blocks: the embeddings
            else:
                h = run_block(block, jnp.asarray(source[rows]).astype(top.dtype), top.positions(tokens))
            target[rows] = np.asarray(h, np.float32)
            target.flush()
            cache.meta["batches"] = b + 1
            cache._save_meta()
            bar.update(1)
        cache.meta.update(stage=stage + 1, batches=0)
        cache._save_meta()
        del block, source, target
    bar.close()
    cache._finish(stages)
