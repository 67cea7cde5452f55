"""The dense teacher's final residual stream for every training window of ``modegpt heal``, computed once on disk.

Distillation needs the teacher's token distributions at every training position. Computed on the fly, they cost a
whole teacher in memory and one teacher forward pass per step, in every run. A :class:`TeacherCache` holds instead
the teacher's residual stream after its last block, ``[windows, seqlen, hidden]`` in float32 (the head, a few
megabytes of weights, turns it into logits inside the train step: 85x smaller than the logits for SmolLM2's
vocabulary). :func:`fill_teacher_cache` computes it block by block from the checkpoint, so the teacher is never
whole in memory (one block and one batch of windows at a time); a killed fill continues where it stopped, and a
finished cache serves every later run on the same windows (a learning-rate sweep, a resumed run).

Layout of the directory: ``meta.json`` (what the cache was computed from, its shape, how many stages and windows
the fill has done), float32 memory maps, and ``lock`` (held by the process filling it; another is refused). The
fill alternates between two buffers (stage ``s`` reads ``stage-{(s - 1) % 2}`` and writes ``stage-{s % 2}``), so a
batch redone after a crash reads the same input again; once finished, the result is renamed ``hidden.f32`` and the
other buffer deleted. While filling, the directory holds two buffers of the cache's size.

In a ``jax.distributed`` run (:func:`open_teacher_cache`) process 0 opens and fills the cache while the others
wait, then every process reads it: the directory must be one that every process sees at the same path (a shared
filesystem), which is checked before the fill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from modegpt_jax.errors import UserError

__all__ = ["TeacherCache", "checkpoint_identity", "fill_teacher_cache", "open_teacher_cache"]

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
            meta = self._read_meta()
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
            self.meta = {"fingerprint": fingerprint, "shape": list(self.shape), "stage": 0, "rows": 0,
                         "complete": False}
            self._save_meta()

    @classmethod
    def existing(cls, directory: str | Path, shape: tuple[int, int, int]) -> "TeacherCache":
        """The cache in ``directory`` as its ``meta.json`` describes it (no fingerprint to compare: another process
        opened it with one)."""
        cache = cls.__new__(cls)
        cache.directory, cache.shape = Path(directory), tuple(int(n) for n in shape)
        cache.meta = cache._read_meta()
        if tuple(cache.meta["shape"]) != cache.shape:
            raise UserError(f"teacher cache {cache.directory} holds states of shape {tuple(cache.meta['shape'])}, "
                            f"not {cache.shape}", argument="teacher_cache")
        return cache

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def hidden(self) -> np.ndarray:
        """The finished cache, a read-only float32 memory map ``[windows, seqlen, hidden]``."""
        if not self.complete:
            raise ValueError(f"teacher cache {self.directory} is not filled yet")
        path = self.directory / "hidden.f32"
        if not path.is_file() or path.stat().st_size != 4 * int(np.prod(self.shape)):
            raise UserError(f"teacher cache {self.directory}: hidden.f32 is missing or of the wrong size; delete "
                            "the directory", argument="teacher_cache")
        return np.memmap(path, np.float32, "r", shape=self.shape)

    @contextlib.contextmanager
    def lock(self):
        """Exclusive use of the directory while filling: a second process filling it at once is refused."""
        with open(self.directory / "lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(f"teacher cache {self.directory} is being filled by another process: wait for it, "
                                "or give another directory", argument="teacher_cache") from None
            self.meta = self._read_meta()  # as the last process to hold the lock left it
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _buffer(self, parity: int, mode: str) -> np.memmap:
        path = self.directory / f"stage-{parity}.f32"
        if mode == "r+" and not path.exists():
            mode = "w+"
        return np.memmap(path, np.float32, mode, shape=self.shape)

    def _read_meta(self) -> dict[str, Any]:
        try:
            meta = json.loads((self.directory / "meta.json").read_text())
            meta["fingerprint"], meta["shape"], meta["stage"], meta["rows"], meta["complete"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"teacher cache {self.directory}: meta.json is unreadable or not this version's; "
                            "delete the directory", argument="teacher_cache") from None
        return meta

    def _save_meta(self) -> None:
        tmp = self.directory / "meta.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=1) + "\n")
        os.replace(tmp, self.directory / "meta.json")

    def _finish(self, stages: int) -> None:
        last = self.directory / f"stage-{(stages - 1) % 2}.f32"
        if last.exists():  # else renamed already, by a fill stopped just after
            os.replace(last, self.directory / "hidden.f32")
        (self.directory / f"stage-{stages % 2}.f32").unlink(missing_ok=True)
        self.meta.update(complete=True, stage=stages, rows=0)
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

    windows = np.asarray(windows, np.int32)
    cfg = checkpoint.config
    if windows.shape != cache.shape[:2] or cfg.hidden_size != cache.shape[2]:
        raise ValueError(f"windows {windows.shape} and hidden size {cfg.hidden_size} do not match the cache's "
                         f"shape {cache.shape}")
    stages, N = len(cfg.layers) + 1, len(windows)
    with cache.lock():
        if cache.complete:
            return
        top = checkpoint.load_shell(dataclasses.replace(cfg, layers=()), dtype)  # embeddings, final norm and head
        bar = tqdm(total=stages * N, initial=cache.meta["stage"] * N + cache.meta["rows"], desc="teacher cache",
                   unit="window", disable=not progress)
        for stage in range(cache.meta["stage"], stages):
            source = None if stage == 0 else cache._buffer((stage - 1) % 2, "r")
            target = cache._buffer(stage % 2, "r+")
            block = None if stage == 0 else checkpoint.load_block(stage - 1, dtype)
            # progress is counted in windows, so a run with another batch size continues where this one stopped
            for r0 in range(cache.meta["rows"], N, batch_size):
                rows = slice(r0, min(N, r0 + batch_size))
                tokens = jnp.asarray(windows[rows])
                if block is None:
                    h = hidden_states(top, tokens)  # no blocks: the embeddings
                else:
                    h = run_block(block, jnp.asarray(source[rows]).astype(top.dtype), top.positions(tokens))
                target[rows] = np.asarray(h, np.float32)
                target.flush()
                cache.meta["rows"] = rows.stop
                cache._save_meta()
                bar.update(rows.stop - r0)
            cache.meta.update(stage=stage + 1, rows=0)
            cache._save_meta()
            del block, source, target
        bar.close()
        cache._finish(stages)


def open_teacher_cache(directory: str | Path, fingerprint: dict[str, Any], checkpoint, windows: np.ndarray,
                       dtype: Any = "float32", *, batch_size: int = 4, progress: bool = True,
                       poll_seconds: float = 1.0) -> tuple[np.ndarray, bool]:
    """The teacher's final residual stream for ``windows`` from the cache ``directory`` (of ``fingerprint``),
    filled first from ``checkpoint`` if it is not finished (:func:`fill_teacher_cache`); also whether it was
    finished already (reused).

    In a multi-process run every process calls this with the same arguments. Process 0 opens the cache (its
    refusals are everyone's) and every process checks that it sees the same ``meta.json`` at ``directory``, else
    all refuse; then process 0 fills it, the others wait for it to finish (every ``poll_seconds``), and every
    process returns the same memory map. If process 0's fill fails, it leaves its error in ``fill-failed`` and the
    others stop with it."""
    shape = (*np.shape(windows), checkpoint.config.hidden_size)
    if jax.process_count() == 1:
        cache = TeacherCache(directory, fingerprint, shape)
        reused = cache.complete
        fill_teacher_cache(cache, checkpoint, windows, dtype, batch_size=batch_size, progress=progress)
        return cache.hidden, reused
    from jax.experimental import multihost_utils

    directory, leader = Path(directory), jax.process_index() == 0
    cache, refusal, seal = None, None, np.zeros(32, np.uint8)
    if leader:
        try:
            cache = TeacherCache(directory, fingerprint, shape)
            (directory / "fill-failed").unlink(missing_ok=True)  # from an earlier run
            seal = np.frombuffer(_meta_digest(directory), np.uint8).copy()
        except UserError as error:
            refusal = error
    seal = np.asarray(multihost_utils.broadcast_one_to_all(seal), np.uint8)
    if not seal.any():  # process 0 refused the directory
        raise refusal or UserError(f"teacher cache {directory}: process 0 refused it (its error says why)",
                                   argument="teacher_cache")
    sees = multihost_utils.process_allgather(np.asarray(leader or _meta_digest(directory) == seal.tobytes()))
    if not np.all(sees):
        blind = [i for i, ok in enumerate(np.ravel(sees)) if not ok]
        raise UserError(f"teacher cache {directory}: process(es) {blind} do not see process 0's cache there; in a "
                        "multi-process run the cache must be a directory every process sees at the same path (a "
                        "shared filesystem)", argument="teacher_cache")
    reused = bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(leader and cache.complete))))
    failed = directory / "fill-failed"  # process 0's error, for the waiting processes
    if leader:
        try:
            fill_teacher_cache(cache, checkpoint, windows, dtype, batch_size=batch_size, progress=progress)
        except BaseException as error:
            failed.write_text(str(error) or type(error).__name__)
            raise
    else:
        while not _meta_complete(directory):
            if failed.is_file():
                raise UserError(f"teacher cache {directory}: process 0 stopped filling it: {failed.read_text()}",
                                argument="teacher_cache")
            time.sleep(poll_seconds)
    multihost_utils.sync_global_devices("teacher cache filled")
    return (cache if leader else TeacherCache.existing(directory, shape)).hidden, reused


def _meta_digest(directory: Path) -> bytes:
    try:
        return hashlib.sha256((directory / "meta.json").read_bytes()).digest()
    except OSError:
        return b""


def _meta_complete(directory: Path) -> bool:
    try:
        return bool(json.loads((directory / "meta.json").read_text())["complete"])
    except (OSError, ValueError, KeyError):  # being replaced, or not visible yet
        return False
