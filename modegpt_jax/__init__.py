"""modegpt-jax: MoDeGPT structured compression of language models in JAX.

The names a user needs, importable from here (loaded on first use, so ``import modegpt_jax`` stays light):

- ``compress_checkpoint(model, output, settings, run)``: a whole run, checkpoint to output directory (what
  ``modegpt compress`` does); ``CompressionSettings``, ``RunSettings``.
- ``compress(model_or_checkpoint, tokens, settings)`` and ``compress_streamed(...)``: the pipeline on tokens you
  bring, returning the model in memory or staging blocks on disk.
- ``HFCheckpoint``, ``load_model``, ``load_tokenizer``, ``save_model``; ``calibration_windows``;
  ``evaluate`` (held-out perplexity, :func:`modegpt_jax.perplexity.perplexity`) with ``tokenize`` and
  ``token_windows``; ``generate`` (greedy decoding with a KV cache).
- ``heal_checkpoint(model, teacher, output, settings)``: recovery training, compressed directory to output
  directory (what ``modegpt heal`` does), with ``HealSettings``; on models in memory,
  :func:`modegpt_jax.heal.heal`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "compress_checkpoint": "modegpt_jax.run",
    "RunSettings": "modegpt_jax.run",
    "heal_checkpoint": "modegpt_jax.run",
    "HealSettings": "modegpt_jax.heal",
    "CompressionSettings": "modegpt_jax.pipeline",
    "compress": "modegpt_jax.pipeline",
    "compress_streamed": "modegpt_jax.pipeline",
    "HFCheckpoint": "converters.hf_import",
    "load_model": "converters.hf_import",
    "load_tokenizer": "converters.hf_import",
    "save_model": "converters.hf_export",
    "calibration_windows": "modegpt_jax.calibration",
    "evaluate": "modegpt_jax.perplexity",
    "tokenize": "modegpt_jax.perplexity",
    "token_windows": "modegpt_jax.perplexity",
    "generate": "modegpt_jax.decoding",
}
# Exported under another name than in their module (a package attribute named like a submodule is replaced by
# the submodule once that is imported).
_RENAMED = {"evaluate": "perplexity"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'modegpt_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
