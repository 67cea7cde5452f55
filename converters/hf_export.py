"""Flax model -> Hugging Face style directory (safetensors + config.json + tokenizer).

Tensors keep the base family's Hugging Face names. A compressed model whose shapes a stock architecture can
hold (one MLP width everywhere, attention untouched) is written as that architecture; any other is written with
``model_type: "modegpt"`` and the PyTorch configuration/modeling files it needs (``converters/remote_code``),
registered through ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads
it. :mod:`converters.hf_import` reads either back exactly. The directory is written aside and renamed into place:
it appears complete or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors import SafetensorError

from converters.name_maps import NAME_MAPS, hf_name
from modegpt_jax.errors import UserError
from modegpt_jax.config import ModelConfig
from modegpt_jax.families import config_from_hf
from modegpt_jax.model import Transformer
from modegpt_jax.rope import kept_pair_frequencies

REMOTE_CODE = Path(__file__).parent / "remote_code"
STOCK_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "opt": "OPTForCausalLM",
}

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json",
)


def hf_state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """Our parameters under Hugging Face names, PyTorch orientation, as host arrays."""
    name_map = NAME_MAPS[model.config.model_type]
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transpose = hf_name(name_map, tuple(path))
        array = np.asarray(var.get_value())
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


def _stock_width(cfg: ModelConfig) -> int | None:
    """The single MLP width when the compressed model is a stock architecture of its family, else None."""
    widths = {spec.mlp_width for spec in cfg.layers}
    stock_attention = all(
        spec.qk_dim == cfg.head_dim and spec.vo_dim == cfg.head_dim and spec.rope_pairs is None
        for spec in cfg.layers
    )
    return widths.pop() if len(widths) == 1 and stock_attention else None


def export_config(model: Transformer, base_hf_config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """``config.json``: the stock family config where the shapes allow it, else the remote-code architecture.

    The remote-code config records every per-layer width and, per KV group, the kept RoPE pairs and their
    original frequencies; ``modegpt`` is the same description that :mod:`modegpt_jax.config` uses.
    """
    cfg = model.config
    if base_hf_config.get("model_type") == "modegpt":  # compressing an export again: start from its base
        base_hf_config = base_hf_config["base_config"]
    base = {k: v for k, v in base_hf_config.items() if k not in ("quantization_config", "auto_map", "architectures")}
    base["dtype"] = str(model.dtype)
    width = _stock_width(cfg)
    if width is not None and cfg.o_bias == config_from_hf(base_hf_config).o_bias:
        key = "ffn_dim" if cfg.model_type == "opt" else "intermediate_size"
        return {**base, key: width, "architectures": [STOCK_ARCHITECTURES[cfg.model_type]]}
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


def shard_plan(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most ``max_shard_bytes`` (a larger tensor gets a file alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    return shards


def write_safetensors(tensors: dict[str, np.ndarray], directory: Path, max_shard_bytes: int) -> list[str]:
    """``model.safetensors``, or numbered shards with ``model.safetensors.index.json`` above the size limit."""
    from safetensors.numpy import save_file

    shards = shard_plan(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
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
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        write_safetensors(hf_state_dict(model), tmp, max_shard_bytes)
        config = export_config(model, base_hf_config, modegpt_info)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if config["model_type"] == "modegpt":
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
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(_write_failure(out, e)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
