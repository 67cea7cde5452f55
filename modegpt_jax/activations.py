"""The calibration hidden states between layers: one array per batch, on the devices or parked in host memory.

The pipeline holds exactly one set of hidden states (the residual stream entering the current layer, then the
stream halfway through it, then the stream leaving it): each pass over the batches replaces batch ``j``'s array
by its successor, so the old one is freed as soon as the new one exists.

When the hidden states of all calibration tokens do not fit on the devices (128 x 2048 tokens of a 70B model are
8 GiB in bfloat16 per data shard), they live in host memory and stream through batch by batch: :meth:`get`
puts one batch back on its devices, :meth:`set` takes the result off them again. Each device's shard is kept
separately, so this works unchanged for arrays sharded over a mesh and in multi-process runs (a process holds
only its own devices' shards).
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np

from modegpt_jax.mesh import local_blocks

# Park the hidden states on the host when they would take more than this share of one device's memory.
DEVICE_SHARE = 0.3


class _Parked:
    """A device array in host memory (one copy of each distinct block), enough to rebuild it with the same
    sharding."""

    def __init__(self, x: jax.Array):
        self.shape, self.dtype, self.sharding = x.shape, x.dtype, x.sharding
        shards = {s.device: s for s in x.addressable_shards}
        self.layout = local_blocks(x.sharding, x.shape)
        self.blocks = {key: np.asarray(shards[device].data) for device, key, first in self.layout if first}

    def restore(self) -> jax.Array:
        arrays = [jax.device_put(self.blocks[key], device) for device, key, _ in self.layout]
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, arrays)


def should_park(bytes_per_device: int) -> bool:
    """Whether hidden states of this size (per device) belong in host memory: only where devices report a
    memory limit (GPU, TPU) and the states would take more than ``DEVICE_SHARE`` of it. On CPU the devices are
    host memory already."""
    try:
        limits = [(d.memory_stats() or {}).get("bytes_limit") for d in jax.local_devices()]
    except Exception:  # backends without memory statistics
        return False
    limits = [x for x in limits if x]
    return bool(limits) and bytes_per_device > DEVICE_SHARE * min(limits)


class HiddenStates:
    """One array per calibration batch; ``on_host`` parks them in host memory between uses."""

    def __init__(self, arrays: Iterable[jax.Array], *, on_host: bool = False):
        """``arrays`` may be a generator: with ``on_host`` each batch is parked before the next one is made."""
        self.on_host = on_host
        self._items: list = []
        for x in arrays:
            self._items.append(None)
            self.set(len(self._items) - 1, x)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, j: int) -> jax.Array:
        x = self._items[j]
        return x.restore() if isinstance(x, _Parked) else x

    def set(self, j: int, x: jax.Array) -> None:
        self._items[j] = _Parked(x) if self.on_host else x

