"""Hugging Face checkpoint -> :class:`modegpt_jax.model.Transformer` (and its tokenizer).

Weights are read one tensor at a time and written straight into an abstract (shape-only) model, so the
checkpoint is never held twice. :func:`load_block` builds a single decoder block the same way: the
compression pipeline streams the model one layer at a time with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from converters.checkpoint import TensorSource, open_checkpoint
from converters.resolve import resolve_model
from modegpt_jax.config import ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.families import config_from_hf, family, hf_name
from modegpt_jax.families.base import fused_tensors
from modegpt_jax.model import Block, Buffer, Transformer
from modegpt_jax.rope import kept_pair_frequencies
from modegpt_jax.sharding import make_sharded, param_sharding

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def parse_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} has no config.json: not a Hugging Face model directory") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


class HFCheckpoint:
    """A resolved Hugging Face model directory: its configuration and a lazy tensor source."""

    def __init__(self, spec: str | Path, dtype: Any = jnp.float32):
        self.dtype = parse_dtype(dtype)
        self.directory = resolve_model(str(spec))
        self.hf_config = read_hf_config(self.directory)
        self.config: ModelConfig = config_from_hf(self.hf_config)
        self.name_map = family(self.config.model_type).names
        self._source: TensorSource | None = None
        self._fused: dict[str, tuple[np.ndarray, set[str]]] = {}  # fused tensors whose parts are still to be read

    @property
    def source(self) -> TensorSource:
        if self._source is None:
            self._source = open_checkpoint(self.directory)
            self._names = set(self._source.names())
        return self._source

    def tensor(self, path: tuple, shape: tuple[int, ...], dtype: Any, mesh: Mesh | None = None) -> jax.Array:
        """Our parameter at ``path``, read from the checkpoint, transposed and cast; with ``mesh``, placed on it
        with :func:`modegpt_jax.sharding.param_spec`'s sharding, each device taking its slice of the host copy."""
        name, transpose = hf_name(self.name_map, path)
        array = self._read(name, path)
        if transpose:
            array = array.T
        if tuple(array.shape) != tuple(shape):
            raise UserError(
                f"tensor {name!r} has shape {tuple(array.shape)}, the configuration implies {tuple(shape)}"
            )
        if mesh is not None:
            return make_sharded(array.shape, dtype, param_sharding(mesh, path, array.shape), lambda i: array[i])
        return jnp.asarray(np.ascontiguousarray(array), dtype=dtype)

    def _read(self, name: str, path: tuple) -> np.ndarray:
        """The checkpoint's tensor ``name`` (of our parameter ``path``), cut out of a fused tensor if the family
        stores it in one (:attr:`Family.fused`); a fused tensor is read once for all its parts."""
        source = self.source
        if name not in self._names and name.removeprefix("model.") in self._names:
            name = name.removeprefix("model.")  # some checkpoints (OPT on the hub) omit the prefix
        if name in self._names:
            return source.get(name)
        part = self._fused_part(name, path)
        if part is None:
            raise UserError(
                f"checkpoint {self.directory} lacks the tensor {name!r} "
                f"(is it really a {self.config.model_type} checkpoint?)"
            )
        fused_name, begin, end, total, parts = part
        if fused_name not in self._fused:
            self._fused[fused_name] = (source.get(fused_name), set(parts))
        array, pending = self._fused[fused_name]
        if array.shape[0] != total:
            raise UserError(f"tensor {fused_name!r} has {array.shape[0]} rows, the configuration implies {total}")
        pending.discard(name)
        if not pending:  # every part taken: let the fused tensor go
            del self._fused[fused_name]
        return array[begin:end]

    def _fused_part(self, name: str, path: tuple) -> tuple[str, int, int, int, list[str]] | None:
        """(fused tensor, first row, end row, its rows, the names of all its parts) of ``name``, if the family
        fuses it and the checkpoint holds the fused tensor."""
        if path[0] != "layers":
            return None
        fused = fused_tensors(family(self.config.model_type), self.config, int(path[1]), name.rsplit(".", 1)[1])
        for fused_name, parts in fused.items():
            names = [part for part, _ in parts]
            if name in names and fused_name in self._names:
                k = names.index(name)
                begin = sum(rows for _, rows in parts[:k])
                return fused_name, begin, begin + parts[k][1], sum(rows for _, rows in parts), names
        return None

    def fill(self, module: nnx.Module, prefix: tuple = (), *, skip_layers: bool = False,
             mesh: Mesh | None = None) -> None:
        """Replace every parameter of an (abstract) module by the checkpoint's tensor, and set buffers.

        ``skip_layers`` leaves the decoder blocks abstract (the compression pipeline fills them one by one).
        ``mesh`` places every array on it (:mod:`modegpt_jax.sharding`) instead of the default device.
        """
        params, buffers = nnx.state(module, nnx.Param, Buffer)
        for path, var in nnx.to_flat_state(params):
            if skip_layers and path[0] == "layers":
                continue
            var.set_value(self.tensor(prefix + tuple(path), var.shape, var.dtype, mesh))
        for path, var in nnx.to_flat_state(buffers):
            if skip_layers:
                break
            full = prefix + tuple(path)
            layer = int(full[full.index("layers") + 1])
            freqs = np.asarray(kept_pair_frequencies(self.config, self.config.layers[layer]))
            var.set_value(jnp.asarray(freqs) if mesh is None else
                          make_sharded(freqs.shape, freqs.dtype, param_sharding(mesh, path, freqs.shape),
                                       lambda i, f=freqs: f[i]))
        nnx.update(module, params, buffers)

    def load_model(self, dtype: Any = None) -> Transformer:
        dtype = self.dtype if dtype is None else parse_dtype(dtype)
        cfg = self.config
        model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        self.fill(model)
        return model

    def load_shell(self, cfg: ModelConfig, dtype: Any = None, mesh: Mesh | None = None) -> Transformer:
        """A model of configuration ``cfg`` (same family, any per-layer widths) whose embeddings, final norm
        and head come from the checkpoint (placed on ``mesh`` if given) and whose blocks are still abstract
        (shapes only, no memory)."""
        dtype = self.dtype if dtype is None else parse_dtype(dtype)
        model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        self.fill(model, skip_layers=True, mesh=mesh)
        return model

    def load_block(self, layer: int, dtype: Any = None, mesh: Mesh | None = None) -> Block:
        """Decoder block ``layer`` alone, for streaming one layer at a time; with ``mesh``, every weight goes
        straight into its shards (:mod:`modegpt_jax.sharding`)."""
        dtype = self.dtype if dtype is None else parse_dtype(dtype)
        cfg = self.config
        block = nnx.eval_shape(lambda: Block(cfg, cfg.layers[layer], dtype=dtype, rngs=nnx.Rngs(0)))
        self.fill(block, ("layers", layer), mesh=mesh)
        return block

    def load_tokenizer(self):
        import transformers

        level = transformers.logging.get_verbosity()
        # transformers loads the model config to find the tokenizer; for our remote-code export that config is
        # read without the code (a tokenizer needs none), which it reports as a warning: not the user's concern.
        transformers.logging.set_verbosity_error()
        try:
            return transformers.AutoTokenizer.from_pretrained(self.directory, trust_remote_code=False)
        except Exception as e:
            detail = " ".join(str(e).split())[:300]  # transformers' messages span lines; ours is one line
            raise UserError(f"cannot load a tokenizer from {self.directory}: {detail}") from None
        finally:
            transformers.logging.set_verbosity(level)


def load_model(spec: str | Path, dtype: Any = jnp.float32) -> Transformer:
    """Our Flax model of a Hugging Face checkpoint (directory, .gguf, hub id or embedded name)."""
    return HFCheckpoint(spec).load_model(dtype)


def load_tokenizer(spec: str | Path):
    return HFCheckpoint(spec).load_tokenizer()
