"""Flax model -> Hugging Face style directory (safetensors + config.json + tokenizer).

A compressed model is written in the base family's layout and tensor names, with its per-layer widths
recorded under the ``"modegpt"`` key of ``config.json`` (kept RoPE pair indices included), so
:mod:`converters.hf_import` reads it back exactly. The directory is written aside and renamed into place:
it appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from converters.name_maps import NAME_MAPS, hf_name
from modegpt_jax.errors import UserError
from modegpt_jax.model import Transformer

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


def export_config(model: Transformer, base_hf_config: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """The base ``config.json`` plus, for a compressed model, its per-layer widths."""
    cfg = model.config
    config = dict(base_hf_config)
    config.pop("quantization_config", None)
    config["dtype"] = str(model.dtype)
    if not cfg.is_dense:
        config["modegpt"] = {
            "layers": [spec.to_dict() for spec in cfg.layers],
            # Folding the value bias (OPT, Qwen2) gives the output projection a bias the base may not have.
            "o_bias": cfg.o_bias,
            **(extra or {}),
        }
    return config


def save_model(model: Transformer, out_dir: str | Path, *, base_hf_config: dict[str, Any],
               tokenizer_dir: str | Path | None = None, extra_files: dict[str, str] | None = None,
               modegpt_info: dict[str, Any] | None = None) -> Path:
    """Write ``out_dir`` atomically: weights, config, tokenizer files and any extra text files."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = export_config(model, base_hf_config, modegpt_info)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
