"""Prefill and decode throughput of a dense model and its compressed version, in JAX and in PyTorch.

Both frameworks decode greedily through a KV cache: JAX with :mod:`modegpt_jax.decoding` (jitted prefill, then the
decode loop in one jitted call), PyTorch through the exported Hugging Face directory (the dense model as its stock
``transformers`` class, the compressed one through its ``modeling_modegpt.py``) with a manual loop over
``past_key_values`` under ``torch.inference_mode``. Both models get the same prompt tokens; each measurement is
preceded by a warm-up run (compilation, allocator) and repeated, dense and compressed interleaved, and the median
is kept, so a noisy machine affects both sides alike.

- prefill tokens/s: ``batch * prompt_len / time(prompt -> logits of its last token, cache filled)``;
- decode tokens/s: ``batch * new_tokens / time(new_tokens single-token steps through the cache)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from modegpt_jax.errors import UserError

FRAMEWORKS = ("jax", "torch")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    new_tokens: int = 64
    repeats: int = 5
    frameworks: tuple[str, ...] = FRAMEWORKS
    threads: int | None = None  # torch intra-op threads (None: one per core, like JAX's CPU client)
    seed: int = 0

    def validate(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserError(f"batch_sizes must be positive integers, got {self.batch_sizes}", argument="batch_sizes")
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise UserError("prompt_len and new_tokens must be at least 1", argument=("prompt_len", "new_tokens"))
        if self.repeats < 1:
            raise UserError("repeats must be at least 1", argument="repeats")
        unknown = set(self.frameworks) - set(FRAMEWORKS)
        if unknown or not self.frameworks:
            raise UserError(f"frameworks must be a comma-separated subset of {','.join(FRAMEWORKS)}",
                            argument="frameworks")


def prompt_tokens(tokenizer, batch: int, prompt_len: int, seed: int = 0) -> np.ndarray:
    """``batch`` different prompts of exactly ``prompt_len`` tokens from the embedded held-out text."""
    from modegpt_jax.wikipedia import embedded_text

    ids = np.asarray(tokenizer(embedded_text("heldout"), add_special_tokens=False)["input_ids"], np.int64)
    n = len(ids) // prompt_len
    if n < batch:
        raise UserError(f"the held-out text has only {n} windows of {prompt_len} tokens; lower --prompt-len")
    starts = np.random.default_rng(seed).choice(n, size=batch, replace=False) * prompt_len
    return np.stack([ids[s : s + prompt_len] for s in starts])


# -- one measurement: (prefill seconds, decode seconds, generated tokens) ------------------------------------
def jax_runner(model) -> Callable[[np.ndarray, int], tuple[float, float, np.ndarray]]:
    import jax
    import jax.numpy as jnp

    from modegpt_jax.decoding import CachedDecoder

    decoder = CachedDecoder(model)  # split once: no per-call Python work on the model inside the timings

    def run(tokens: np.ndarray, new_tokens: int):
        B, T = tokens.shape
        prompt = jax.block_until_ready(jnp.asarray(tokens, jnp.int32))
        cache = jax.block_until_ready(decoder.init_cache(B, T + new_tokens))
        t0 = time.perf_counter()
        logits, cache = decoder.prefill(prompt, cache)
        first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        first.block_until_ready()
        t1 = time.perf_counter()
        out, cache = decoder.greedy(first, cache, new_tokens)
        out.block_until_ready()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, np.asarray(out)

    return run


def torch_runner(model) -> Callable[[np.ndarray, int], tuple[float, float, np.ndarray]]:
    import inspect

    import torch

    # transformers 5 names the cache argument `cache` (the old name still works, with a warning per call)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def run(tokens: np.ndarray, new_tokens: int):
        prompt = torch.as_tensor(tokens, dtype=torch.long)
        generated = []
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            cache = _cache_of(out)
            for _ in range(new_tokens):
                out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
                cache = _cache_of(out)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(token)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, torch.cat(generated, 1).numpy()

    return run


def _cache_of(out):
    cache = getattr(out, "past_key_values", None)  # transformers 4 and 5 name the field differently
    return cache if cache is not None else out.cache


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{option} is empty")
    return values


@contextlib.contextmanager
def compressed_model(dense: str, compressed: str | None, ratio: float | None,
                     log: Callable[[str], None] = print) -> Iterator[str]:
    """The compressed model to measure: ``compressed`` as given, or ``dense`` compressed at ``ratio`` with the
    default settings (64 x 512 calibration tokens) into a temporary export that is removed afterwards."""
    if (compressed is None) == (ratio is None):
        raise UserError("give either --compressed DIR (an export of modegpt compress) or --ratio R")
    if compressed is not None:
        if not Path(compressed).expanduser().exists():
            raise UserError(f"compressed {compressed}: no such directory", argument="compressed")
        yield compressed
        return
    from modegpt_jax.pipeline import CompressionSettings
    from modegpt_jax.run import compress_checkpoint

    log(f"compressing {dense} at ratio {ratio} (default settings) ...")
    with tempfile.TemporaryDirectory(prefix="modegpt-bench-") as tmp:
        out = Path(tmp) / "compressed"
        report = compress_checkpoint(dense, out, CompressionSettings(ratio=ratio), progress=False)
        log(f"compressed: decoder blocks -{report['achieved_block_ratio']:.1%}")
        yield str(out)


def load_jax(spec: str):
    from converters.hf_import import HFCheckpoint

    return HFCheckpoint(spec).load_model()


def load_torch(spec: str):
    import torch
    from transformers import AutoModelForCausalLM

    from converters.hf_import import HFCheckpoint

    directory = HFCheckpoint(spec).directory
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=True).eval()


def count_matmul_params(spec: str) -> dict[str, int]:
    """Parameters of the decoder blocks and of the whole model (the JAX model's Param leaves)."""
    import jax.numpy as jnp
    from flax import nnx

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.model import Transformer, count_params

    cfg = HFCheckpoint(spec).config
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))  # shapes only
    return {"blocks": sum(count_params(b) for b in model.layers), "total": count_params(model)}


def measure_pair(runners: dict[str, Callable], tokens: np.ndarray, new_tokens: int, repeats: int,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, float]]:
    """Median prefill/decode times of each runner on the same tokens, runners interleaved on every repeat."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    generated = {}
    for name, run in runners.items():  # warm-up: compilation, allocator, caches
        generated[name] = run(tokens, new_tokens)[2]
    for _ in range(repeats):
        for name, run in runners.items():
            prefill_s, decode_s, _ = run(tokens, new_tokens)
            times[name].append((prefill_s, decode_s))
    B, T = tokens.shape
    result = {}
    for name, ts in times.items():
        prefill_s = statistics.median(t[0] for t in ts)
        decode_s = statistics.median(t[1] for t in ts)
        result[name] = {
            "prefill_seconds": prefill_s,
            "decode_seconds": decode_s,
            "prefill_tokens_per_s": B * T / prefill_s,
            "decode_tokens_per_s": B * new_tokens / decode_s,
            "prefill_seconds_all": [t[0] for t in ts],
            "decode_seconds_all": [t[1] for t in ts],
            "generated": np.asarray(generated[name]).tolist(),
        }
        log(f"  {name:>10}: prefill {B * T / prefill_s:9.1f} tok/s  decode {B * new_tokens / decode_s:8.1f} tok/s")
    return result


def run_benchmark(dense: str, compressed: str, settings: BenchSettings,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure ``dense`` and ``compressed`` (model specs: directories or embedded names) side by side."""
    settings.validate()
    from converters.hf_import import HFCheckpoint

    if settings.threads is not None or "torch" in settings.frameworks:
        import torch

        torch.set_num_threads(settings.threads or os.cpu_count() or 1)
    tokenizer = HFCheckpoint(dense).load_tokenizer()
    prompts = prompt_tokens(tokenizer, max(settings.batch_sizes), settings.prompt_len, settings.seed)
    params = {"dense": count_matmul_params(dense), "compressed": count_matmul_params(compressed)}
    rows = []
    for framework in settings.frameworks:
        load = load_jax if framework == "jax" else load_torch
        make = jax_runner if framework == "jax" else torch_runner
        runners = {"dense": make(load(dense)), "compressed": make(load(compressed))}
        for batch in settings.batch_sizes:
            log(f"{framework}, batch {batch}, prompt {settings.prompt_len}, {settings.new_tokens} new tokens")
            measured = measure_pair(runners, prompts[:batch], settings.new_tokens, settings.repeats, log)
            row = {"framework": framework, "batch": batch, **{k: v for k, v in measured.items()}}
            for phase in ("prefill", "decode"):
                row[f"{phase}_speedup"] = (measured["compressed"][f"{phase}_tokens_per_s"]
                                           / measured["dense"][f"{phase}_tokens_per_s"])
            rows.append(row)
        del runners
    # Sanity check: both frameworks decode the same greedy tokens from the same weights (up to float ties).
    agreement = {}
    if len(settings.frameworks) == 2:
        by = {(r["framework"], r["batch"]): r for r in rows}
        for batch in settings.batch_sizes:
            for model in ("dense", "compressed"):
                a = np.asarray(by[("jax", batch)][model]["generated"])
                b = np.asarray(by[("torch", batch)][model]["generated"])
                agreement[f"{model}_batch{batch}"] = float((a == b).mean())
    for row in rows:  # the tokens themselves stay out of the JSON
        for model in ("dense", "compressed"):
            row[model].pop("generated")
    return {
        "dense": dense,
        "compressed": compressed,
        "settings": dataclasses.asdict(settings),
        "params": params,
        "param_ratio_blocks": params["dense"]["blocks"] / params["compressed"]["blocks"],
        "param_ratio_total": params["dense"]["total"] / params["compressed"]["total"],
        "machine": machine_info(settings),
        "rows": rows,
        "greedy_tokens_equal_jax_torch": agreement,
    }


def machine_info(settings: BenchSettings) -> dict[str, Any]:
    import platform

    import jax

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend()}
    if "torch" in settings.frameworks:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    return info


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: tokens/s of each model and the compressed/dense ratio, per framework and batch."""
    lines = [
        ("| framework | batch | prefill dense | prefill compressed | prefill x | decode dense | decode compressed "
         "| decode x |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['framework']} | {r['batch']} "
            f"| {r['dense']['prefill_tokens_per_s']:.0f} | {r['compressed']['prefill_tokens_per_s']:.0f} "
            f"| {r['prefill_speedup']:.2f} "
            f"| {r['dense']['decode_tokens_per_s']:.1f} | {r['compressed']['decode_tokens_per_s']:.1f} "
            f"| {r['decode_speedup']:.2f} |"
        )
    s = result["settings"]
    lines.append("")
    lines.append(
        f"tokens/s; prompt {s['prompt_len']} tokens, {s['new_tokens']} greedy tokens through the KV cache, "
        f"median of {s['repeats']}; decoder-block parameters shrink {result['param_ratio_blocks']:.2f}x, "
        f"the whole model {result['param_ratio_total']:.2f}x"
    )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
