"""Exported GGUF files run in llama.cpp, through its Python binding (``llama-cpp-python``, optional: ``make test``
builds it): logits, greedy continuation, perplexity and speed, as the tests and ``benchmarks/llamacpp.py`` use them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from modegpt_jax.errors import UserError


def load(path: str | Path, *, n_ctx: int = 512, threads: int = 2, logits_all: bool = True,
         kv_f32: bool = False) -> Any:
    """A ``llama_cpp.Llama`` for ``path`` on ``threads`` CPU threads (prompt and decoding alike). The KV cache is
    float16 (llama.cpp's default, which rounds keys and values to about 5e-4) unless ``kv_f32``."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError("llama.cpp's Python binding is not installed: pip install llama-cpp-python") from exc
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=max(64, n_ctx), n_batch=max(64, n_ctx), logits_all=logits_all,
                           n_threads=threads, n_threads_batch=threads, verbose=False, **kv)


def _window_logits(llm: Any, window: np.ndarray) -> np.ndarray:
    llm.reset()  # a fresh context for each window
    llm.eval([int(t) for t in window])
    return np.array(llm.scores[: len(window)], np.float32)


def logits(path: str | Path, windows: np.ndarray, threads: int = 2, kv_f32: bool = False) -> np.ndarray:
    """llama.cpp's float32 logits ``[B, T, V]`` of each token window (``kv_f32``: see :func:`load`)."""
    llm = load(path, n_ctx=windows.shape[1], threads=threads, kv_f32=kv_f32)
    return np.stack([_window_logits(llm, window) for window in windows])


def perplexity(path: str | Path, windows: np.ndarray, threads: int = 2) -> float:
    """``exp(mean NLL)`` over every predicted token of the windows (``seqlen - 1`` each), as
    :func:`modegpt_jax.perplexity.perplexity` counts them."""
    llm = load(path, n_ctx=windows.shape[1], threads=threads)
    total, count = 0.0, 0
    for window in windows:  # one window at a time: [T, V] float64 stays small
        z = _window_logits(llm, window)[:-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        total -= np.take_along_axis(logp, window[1:, None], -1).sum()
        count += len(window) - 1
    return float(np.exp(total / count))


def greedy(path: str | Path, prompt: list[int], steps: int, threads: int = 2) -> list[int]:
    """``steps`` greedy tokens after ``prompt``."""
    llm = load(path, n_ctx=len(prompt) + steps, threads=threads, logits_all=False)
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        out.append(int(token))
        if len(out) == steps:
            return out
    return out


def speed(paths: list[str | Path], prompt: list[int], decode: list[int], threads: int = 2,
          repeats: int = 3) -> list[dict[str, Any]]:
    """Tokens/s of prompt processing (``prompt`` in one batch) and of decoding (``decode`` fed one token at a time
    after it: the work of generating them, without the sampler) of each file in ``paths``, timed in turns:
    ``repeats`` rounds, each loading every file in an order that rotates from round to round and timing one run
    after an untimed warm-up run, so that a slower spell of the machine falls on every file alike. One file is
    loaded at a time (with three SmolLM2 files loaded at once, prompts ran 20 % and decoding 14 % slower on 2
    cores). Per file: the median tokens/s, and every round's figures (``rounds``: (prompt, decode) tokens/s pairs)
    so that speed-ups can be taken within a round."""
    import statistics

    def run(llm: Any) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        middle = time.perf_counter()
        for token in decode:
            llm.eval([token])
        end = time.perf_counter()
        return len(prompt) / (middle - start), len(decode) / (end - middle)

    rounds: list[list[tuple[float, float]]] = [[] for _ in paths]
    for r in range(repeats):
        for k in range(len(paths)):
            i = (r + k) % len(paths)
            llm = load(paths[i], n_ctx=len(prompt) + len(decode), threads=threads, logits_all=False)
            try:
                run(llm)  # warm-up
                rounds[i].append(run(llm))
            finally:
                llm.close()
    return [{"prompt_tokens_per_s": statistics.median(x[0] for x in runs),
             "decode_tokens_per_s": statistics.median(x[1] for x in runs), "rounds": runs} for runs in rounds]
