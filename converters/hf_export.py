"""Flax model -> Hugging Face style directory (safetensors + config.json + tokenizer).

Tensors keep the base family's Hugging Face names. A compressed model whose shapes a stock architecture can
hold (one MLP width everywhere, attention untouched) is written as that architecture; any other is written with
``model_type: "modegpt"`` and the PyTorch configuration/modeling files it needs (``converters/remote_code``),
registered through ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads
it. :mod:`converters.hf_import` reads either back exactly. The directory is written aside and renamed into place:
it appears complete or not at all.

Weights are written by a streaming safetensors writer: each file's header is computed from names, shapes and
dtypes alone, then the tensors are loaded and written one at a time, byte for byte as ``safetensors.numpy.save_file``
would write them. :func:`save_model` feeds it from a model in memory; :func:`save_staged_model` from a shell
(top-level parameters) and the per-layer files of a staging directory (:mod:`modegpt_jax.staging`), so a
compressed model never has to be resident as a whole.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from modegpt_jax.errors import UserError
from modegpt_jax.config import ModelConfig
from modegpt_jax.families import config_from_hf, family, hf_name
from modegpt_jax.families.base import fused_tensors
from modegpt_jax.model import Transformer
from modegpt_jax.rope import kept_pair_frequencies
from modegpt_jax.staging import array_key, block_file
from modegpt_jax.stats import to_host

REMOTE_CODE = Path(__file__).parent / "remote_code"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its Hugging Face name, shape and dtype (known without loading it), and ``load``,
    which returns it as a host array in PyTorch orientation (any memory layout: it is written row block by row
    block when not C-contiguous, so a transposed view costs no second copy)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _oriented(load: Callable[[], np.ndarray], transpose: bool) -> np.ndarray:
    array = load()
    return array.T if transpose else array


def _param_entry(name: str, transpose: bool, shape: Sequence[int], dtype: Any,
                 load: Callable[[], np.ndarray]) -> TensorEntry:
    """The entry of one of our parameters (``[in, out]`` kernels become ``[out, in]``)."""
    shape = tuple(int(n) for n in shape)
    return TensorEntry(name, shape[::-1] if transpose else shape, np.dtype(dtype),
                       functools.partial(_oriented, load, transpose))


def model_entries(model: Transformer) -> list[TensorEntry]:
    """The parameters of a model in memory as lazily loaded entries, in NNX state order."""
    name_map = family(model.config.model_type).names
    entries = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_name(name_map, tuple(path))
        value = var.get_value()
        entries.append(_param_entry(name, transpose, value.shape, value.dtype, functools.partial(to_host, value)))
    return entries


def _concatenated(loads: Sequence[Callable[[], np.ndarray]]) -> np.ndarray:
    return np.concatenate([load() for load in loads], axis=0)


def fuse_entries(entries: Sequence[TensorEntry], config: ModelConfig) -> list[TensorEntry]:
    """``entries`` with the projections that the family's stock checkpoints store as one tensor (Phi-3's
    ``qkv_proj``, ``gate_up_proj``; :attr:`Family.fused`) joined along the output dimension, each fused entry
    where its first part was; unchanged for families without fused tensors."""
    record = family(config.model_type)
    by_name = {e.name: e for e in entries}
    joined: dict[str, TensorEntry] = {}  # first part's name -> fused entry
    dropped: set[str] = set()
    for i in range(config.num_layers):
        for leaf in ("weight", "bias"):
            for fused_name, parts in fused_tensors(record, config, i, leaf).items():
                names = [part for part, _ in parts]
                if not any(n in by_name for n in names):
                    continue
                members = [by_name[n] for n in names]  # a part missing here is a bug: KeyError
                shape = (sum(e.shape[0] for e in members), *members[0].shape[1:])
                joined[names[0]] = TensorEntry(fused_name, shape, members[0].dtype,
                                               functools.partial(_concatenated, [e.load for e in members]))
                dropped.update(names[1:])
    return [joined.get(e.name, e) for e in entries if e.name not in dropped]


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """Our parameters under Hugging Face names, PyTorch orientation, as host arrays."""
    return {e.name: np.ascontiguousarray(e.load()) for e in model_entries(model)}


def _stock_width(cfg: ModelConfig) -> int | None:
    """The single MLP width when the compressed model is a stock architecture of its family, else None."""
    widths = {spec.mlp_width for spec in cfg.layers}
    stock_attention = all(
        spec.qk_dim == cfg.head_dim and spec.vo_dim == cfg.head_dim and spec.rope_pairs is None
        for spec in cfg.layers
    )
    return widths.pop() if len(widths) == 1 and stock_attention else None


def export_config(config: ModelConfig | Transformer, base_hf_config: dict[str, Any],
                  extra: dict[str, Any] | None = None, *, dtype: Any = None) -> dict:
    """``config.json``: the stock family config where the shapes allow it, else the remote-code architecture.

    ``config`` is the compressed model's :class:`ModelConfig` and ``dtype`` its parameter dtype; a model may be
    passed instead of both (its ``config`` and ``dtype``). The remote-code config records every per-layer width
    and, per KV group, the kept RoPE pairs and their original frequencies; ``modegpt`` is the same description
    that :mod:`modegpt_jax.config` uses.
    """
    if isinstance(config, Transformer):
        config, dtype = config.config, config.dtype if dtype is None else dtype
    if dtype is None:
        raise TypeError("export_config needs the parameter dtype with a ModelConfig")
    cfg = config
    if base_hf_config.get("model_type") == "modegpt":  # compressing an export again: start from its base
        base_hf_config = base_hf_config["base_config"]
    # Keys with a leading underscore are loader bookkeeping (``_name_or_path`` is the directory or file the source
    # was read from on the machine that wrote the export), not part of the model.
    base = {k: v for k, v in base_hf_config.items()
            if k not in ("quantization_config", "auto_map", "architectures") and not k.startswith("_")}
    base["dtype"] = str(np.dtype(dtype))
    width = _stock_width(cfg)
    if width is not None and cfg.o_bias == config_from_hf(base_hf_config).o_bias:
        record = family(cfg.model_type)
        return {**base, record.width_key: width, "architectures": [record.stock_architecture]}
    description = cfg.to_dict()
    for spec, layer in zip(cfg.layers, description["layers"]):
        if cfg.use_rope:
            layer["rope_frequencies"] = kept_pair_frequencies(cfg, spec).tolist()
    return {
        "model_type": "modegpt",
        "architectures": ["ModeGPTForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_modegpt.ModeGPTConfig",
            "AutoModelForCausalLM": "modeling_modegpt.ModeGPTForCausalLM",
        },
        "base_model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        **{k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "dtype") if k in base},
        "modegpt": description,
        "compression": extra or {},
        "base_config": base,
    }


def model_card(report: dict[str, Any]) -> str:
    """README.md of an exported model: method, ratios, parameter counts, per-layer widths, how to load it."""
    lines = [
        "---", "library_name: transformers", "tags: [modegpt, compression, modegpt-jax]", "---", "",
        f"# {report.get('model', 'model')} compressed with MoDeGPT", "",
        "Structured compression by modular decomposition (Lin et al., ICLR 2025) with modegpt-jax: every block's MLP",
        "(Nystrom), key-query (CR) and value-output (whitened SVD) modules were shrunk to smaller dense matrices,",
        "fitted to calibration activations, with no fine-tuning.", "",
        f"- target ratio (decoder-block parameters): {report['target_ratio']}",
        f"- achieved: {report['achieved_block_ratio']:.4f} of decoder-block parameters, "
        f"{report['achieved_total_ratio']:.4f} of all parameters",
        f"- parameters: {report['params_before']:,} -> {report['params_after']:,}",
        f"- calibration: {report['calibration']}",
    ]
    if "perplexity" in report:
        lines.append(f"- perplexity: {report['perplexity']}")
    else:
        lines.append("- perplexity: not measured during compression (`modegpt eval --model <this directory>`)")
    lines += [
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>", trust_remote_code=True)', "```", "",
        "| layer | sparsity | MLP width | Q/K dim | V/O dim |", "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {x['layer']} | {x['sparsity']:.3f} | {x['mlp_width']} | {x['qk_dim']} | {x['vo_dim']} |"
              for x in report["layers"]]
    return "\n".join(lines) + "\n"


# The safetensors dtype codes, in the order of the library's ``Dtype`` enum ("increasing alignment order"): a file
# lays its tensors out by descending position here, then by name (``safetensors::tensor::prepare``).
SAFETENSORS_DTYPES = (
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
)
_DTYPE_RANK = {code: rank for rank, code in enumerate(SAFETENSORS_DTYPES)}
# NumPy dtype name -> safetensors code, as the safetensors Python binding maps them (``parse_dtype_str``).
NUMPY_TO_SAFETENSORS = {
    "bool": "BOOL", "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32",
    "int64": "I64", "uint64": "U64", "float16": "F16", "float32": "F32", "float64": "F64", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ", "float8_e8m0fnu": "F8_E8M0", "complex64": "C64",
}

#: Bytes of one row block when a non-contiguous (transposed) tensor is written.
WRITE_CHUNK_BYTES = 8 * 2**20


def safetensors_code(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in NUMPY_TO_SAFETENSORS:
        raise ValueError(f"dtype {name} cannot be written to safetensors")
    return NUMPY_TO_SAFETENSORS[name]


def safetensors_layout(entries: Sequence[TensorEntry],
                       metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorEntry]]:
    """The header (length prefix included) of a safetensors file holding ``entries``, and the entries in the order
    their data follows it: as the safetensors library writes them, by descending dtype alignment then by name,
    the JSON compact with ``__metadata__`` first, padded with spaces to a multiple of 8 bytes."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names) or "__metadata__" in names:
        raise ValueError("tensor names must be unique and not __metadata__")
    ordered = sorted(entries, key=lambda e: (-_DTYPE_RANK[safetensors_code(e.dtype)], e.name))
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for e in ordered:
        header[e.name] = {"dtype": safetensors_code(e.dtype), "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, ordered


def _little_endian(array: np.ndarray) -> np.ndarray:
    order = array.dtype.byteorder
    if order == ">" or (order == "=" and sys.byteorder == "big"):
        return array.astype(array.dtype.newbyteorder("<"))
    return array


def _write_array(f, array: np.ndarray) -> None:
    """The raw bytes of ``array`` in C order; a non-contiguous array goes in row blocks of ``WRITE_CHUNK_BYTES``."""
    array = _little_endian(array)
    if array.ndim == 0 or array.flags.c_contiguous:
        f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        return
    rows = max(1, WRITE_CHUNK_BYTES // max(1, array[:1].nbytes))
    for r in range(0, array.shape[0], rows):
        f.write(memoryview(np.ascontiguousarray(array[r : r + rows]).reshape(-1).view(np.uint8)))


def write_safetensors_file(path: str | Path, entries: Sequence[TensorEntry],
                           metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, byte-identical to ``safetensors.numpy.save_file`` of the same tensors, holding one
    tensor in memory at a time (each entry is loaded just before its bytes are written and dropped after)."""
    header, ordered = safetensors_layout(entries, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for e in ordered:
            array = e.load()
            if tuple(array.shape) != e.shape or safetensors_code(array.dtype) != safetensors_code(e.dtype):
                raise ValueError(f"{e.name}: loaded {array.dtype}{list(array.shape)}, "
                                 f"expected {np.dtype(e.dtype)}{list(e.shape)}")
            _write_array(f, array)
            del array


def shard_plan(tensors: Mapping[str, np.ndarray] | Iterable[TensorEntry], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most ``max_shard_bytes`` (a larger tensor gets a file alone), in order."""
    sizes = ([(name, a.nbytes) for name, a in tensors.items()] if isinstance(tensors, Mapping)
             else [(e.name, e.nbytes) for e in tensors])
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes:
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _array_entry(name: str, array: np.ndarray) -> TensorEntry:
    return TensorEntry(name, tuple(array.shape), array.dtype, lambda: array)


def write_safetensors(tensors: Mapping[str, np.ndarray] | Sequence[TensorEntry], directory: Path,
                      max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or numbered shards with ``model.safetensors.index.json`` above the size limit.

    ``tensors``: arrays by name, or entries loaded one at a time; their order decides the sharding.
    """
    entries = ([_array_entry(n, a) for n, a in tensors.items()] if isinstance(tensors, Mapping)
               else list(tensors))
    by_name = {e.name: e for e in entries}
    if len(by_name) != len(entries):
        raise ValueError("duplicate tensor names")
    metadata = {"format": "pt"}
    shards = shard_plan(entries, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors_file(directory / "model.safetensors", entries, metadata)
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_file(directory / fname, [by_name[n] for n in names], metadata)
        files.append(fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": int(sum(e.nbytes for e in entries))}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def generation_config(base_hf_config: dict[str, Any]) -> dict[str, Any]:
    """A ``generation_config.json`` from the model's special tokens, for checkpoints that came without one."""
    base = base_hf_config.get("base_config", base_hf_config)
    return {k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if base.get(k) is not None}


DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _write_failure(out: Path, error: Exception) -> str:
    """One line for a failed write, naming the fix (disk full is the common case)."""
    text = getattr(error, "strerror", None) or str(error)
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text:
        return (f"cannot write {out}: no space left on its file system (nothing was written); "
                f"free some space or choose an --output on another disk")
    if getattr(error, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {out}: {text} (nothing was written); choose an --output you can write to"
    return f"cannot write {out}: {text} (nothing was written)"


def save_model(model: Transformer, out_dir: str | Path, *, base_hf_config: dict[str, Any],
               tokenizer_dir: str | Path | None = None, extra_files: dict[str, str | bytes] | None = None,
               modegpt_info: dict[str, Any] | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write ``out_dir`` atomically: weights, config, tokenizer files and any extra files.

    ``extra_files`` maps relative paths (``report.json``, ``plots/errors.png``) to text or bytes. Weights above
    ``max_shard_bytes`` are split into numbered safetensors files with an index, as ``save_pretrained`` does.
    """
    return _save(out_dir, model_entries(model), model.config, model.dtype, base_hf_config=base_hf_config,
                 tokenizer_dir=tokenizer_dir, extra_files=extra_files, modegpt_info=modegpt_info,
                 max_shard_bytes=max_shard_bytes)


def save_staged_model(out_dir: str | Path, *, shell: Transformer, config: ModelConfig, staging_dir: str | Path,
                      base_hf_config: dict[str, Any], tokenizer_dir: str | Path | None = None,
                      extra_files: dict[str, str | bytes] | None = None, modegpt_info: dict[str, Any] | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """:func:`save_model` of a compressed model that exists only as ``shell`` and a staging directory.

    ``shell``: a :class:`Transformer` whose top-level parameters (embeddings, final norm, LM head) hold real
    arrays (its layers may be abstract; they are never read) and whose ``dtype`` is the parameter dtype.
    ``config``: the compressed model's configuration (per-layer widths in ``config.layers``). ``staging_dir``
    holds ``block_{i:05d}.safetensors`` for every layer (:mod:`modegpt_jax.staging`). The weights are copied from
    disk one tensor at a time; the directory is byte-identical to ``save_model`` of the same model in memory.
    """
    entries = staged_entries(shell, config, staging_dir)
    return _save(out_dir, entries, config, shell.dtype, base_hf_config=base_hf_config, tokenizer_dir=tokenizer_dir,
                 extra_files=extra_files, modegpt_info=modegpt_info, max_shard_bytes=max_shard_bytes)


def read_safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors' header entries of a safetensors file and the file offset where their data starts."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", prefix)
        if n > 100 * 2**20:
            raise ValueError(f"header of {n} bytes")
        text = f.read(n)
        if len(text) != n:
            raise ValueError("truncated header")
    header = json.loads(text)
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_staged(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    array = np.fromfile(path, dtype=dtype, count=count, offset=offset)
    if array.size != count:
        raise UserError(f"staged block file {path} is truncated (a tensor ends past its end)")
    return array.reshape(shape)


def _staged_block(path: Path, layer: int, keys: set[str], params: dict[str, tuple[tuple[int, ...], np.dtype]]
                  ) -> dict[str, Callable[[], np.ndarray]]:
    """Loaders of the parameters of one staged block file. The file must hold exactly ``keys`` (parameters and
    buffers), each parameter with the expected shape and dtype."""
    if not path.is_file():
        raise UserError(f"staging directory {path.parent} has no {path.name} (block {layer} was not staged)")
    try:
        header, start = read_safetensors_header(path)
    except (OSError, ValueError) as e:
        raise UserError(f"staged block file {path} is unreadable: {e}") from None
    if set(header) != keys:
        raise UserError(f"staged block file {path} holds {sorted(header)}, expected {sorted(keys)}")
    size = path.stat().st_size
    loaders = {}
    for key, (shape, dtype) in params.items():
        info = header[key]
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            valid = (tuple(info["shape"]) == shape and info["dtype"] == safetensors_code(dtype)
                     and end - begin == math.prod(shape) * dtype.itemsize and 0 <= begin and start + end <= size)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise UserError(f"staged block file {path}: {key} is {json.dumps(info)}, expected "
                            f"{safetensors_code(dtype)}{list(shape)} within a file of {size} bytes")
        loaders[key] = functools.partial(_read_staged, path, start + begin, shape, dtype)
    return loaders


def staged_entries(shell: Transformer, config: ModelConfig, staging_dir: str | Path) -> list[TensorEntry]:
    """The parameters of a compressed model as entries: top-level ones from ``shell``, those of block ``i`` read
    from ``staging_dir/block_{i:05d}.safetensors``; in the order :func:`model_entries` gives for the same model
    in memory. Every block file's header is checked here, before anything is written."""
    dtype = np.dtype(shell.dtype)
    name_map = family(config.model_type).names
    # The compressed model's structure, shapes only: its parameter order is the in-memory model's.
    template = nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    params = [(tuple(path), tuple(var.get_value().shape)) for path, var in
              nnx.to_flat_state(nnx.state(template, nnx.Param))]
    keys: dict[int, set[str]] = {}
    for path, _ in nnx.to_flat_state(nnx.state(template)):  # every array of a block, buffers included
        if path[0] == "layers":
            keys.setdefault(int(path[1]), set()).add(array_key(path[2:]))
    block_params: dict[int, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}
    for path, shape in params:
        if path[0] == "layers":
            block_params.setdefault(int(path[1]), {})[array_key(path[2:])] = (shape, dtype)
    top = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(shell, nnx.Param))
           if path[0] != "layers"}
    staging_path = Path(staging_dir)
    blocks = {i: _staged_block(block_file(staging_path, i), i, keys[i], block_params[i])
              for i in sorted(block_params)}
    entries = []
    for path, shape in params:
        name, transpose = hf_name(name_map, path)
        if path[0] == "layers":
            load = blocks[int(path[1])][array_key(path[2:])]
        else:
            value = top.get(path)
            if (value is None or isinstance(value, jax.ShapeDtypeStruct) or tuple(value.shape) != shape
                    or np.dtype(value.dtype) != dtype):
                found = "nothing" if value is None else f"{type(value).__name__} {value.dtype}{list(value.shape)}"
                raise ValueError(f"shell parameter {'.'.join(map(str, path))}: {found}, "
                                 f"expected an array {dtype}{list(shape)}")
            load = functools.partial(to_host, value)
        entries.append(_param_entry(name, transpose, shape, dtype, load))
    return entries


def _save(out_dir: str | Path, entries: Sequence[TensorEntry], config: ModelConfig, dtype: Any, *,
          base_hf_config: dict[str, Any], tokenizer_dir: str | Path | None, extra_files: dict[str, str | bytes] | None,
          modegpt_info: dict[str, Any] | None, max_shard_bytes: int) -> Path:
    """The directory of :func:`save_model` and :func:`save_staged_model`, written aside and renamed into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        hf_config = export_config(config, base_hf_config, modegpt_info, dtype=dtype)
        if hf_config["model_type"] != "modegpt":  # a stock architecture: its checkpoints' tensor layout
            entries = fuse_entries(entries, config)
        write_safetensors(entries, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if hf_config["model_type"] == "modegpt":
            for src in REMOTE_CODE.glob("*_modegpt.py"):
                shutil.copy2(src, tmp / src.name)
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        if not (tmp / "generation_config.json").exists():
            gen = generation_config(base_hf_config)
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for fname, content in (extra_files or {}).items():
            target = tmp / fname
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_write_failure(out, e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
