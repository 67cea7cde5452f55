"""Zero-shot multiple-choice accuracy through lm-eval-harness (PIQA, HellaSwag, WinoGrande, ARC, ...).

Two backends behind one call, both handed the same lm-eval task objects (``zeroshot_tasks.load_tasks``), so the
documents, prompts, context/continuation tokenisation and metrics are lm-eval's own and only the forward pass
differs:

- ``jax``: ``JaxLM``, our Flax model behind lm-eval's ``TemplateLM`` interface (log-likelihoods only: all that
  multiple-choice tasks ask for);
- ``hf``: lm-eval's ``HFLM`` on the Hugging Face directory (PyTorch; our remote-code exports need
  ``trust_remote_code``).

``acc`` picks the choice with the highest summed log-probability, ``acc_norm`` the highest per character of the
choice text, as lm-eval computes them, with lm-eval's standard errors.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from modegpt_jax.errors import UserError
from modegpt_jax.model import Transformer, hidden_states
from modegpt_jax.perplexity import token_nll
from modegpt_jax.zeroshot_tasks import load_tasks, parse_tasks, require_lm_eval

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the module still imports; evaluate() names the install command
    TemplateLM = object

BACKENDS = ("jax", "hf")
METRICS = ("acc", "acc_norm")


@nnx.jit
def _token_logprobs(model: Transformer, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For every position t < T-1: log p(tokens[:, t+1] | tokens[:, :t+1]) and whether it is the argmax."""
    logits = model.head(hidden_states(model, tokens)[:, :-1])
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return -token_nll(logits, tokens[:, 1:]), picked >= logits.max(-1)


def continuation_logprobs(model: Transformer, sequences: list[list[int]], n_continuation: list[int], *,
                          batch_size: int = 16, bucket: int = 32,
                          progress: bool = True) -> list[tuple[float, bool]]:
    """(sum of log p of the last ``n`` tokens of each sequence given the ones before, whether each of those tokens
    is the model's greedy choice), for every sequence."""
    order = np.argsort([-len(s) for s in sequences], kind="stable")  # similar lengths together: less padding
    out: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    for start in tqdm(range(0, len(order), batch_size), desc="log-likelihoods", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        length = -(-max(len(sequences[i]) for i in idx) // bucket) * bucket  # few shapes: few compilations
        tokens = np.zeros((batch_size, length), np.int32)  # right padding: causal attention never sees it
        for row, i in enumerate(idx):
            tokens[row, : len(sequences[i])] = sequences[i]
        logp, greedy = (np.asarray(a) for a in _token_logprobs(model, jnp.asarray(tokens)))
        for row, i in enumerate(idx):
            n_tok, n_cont = len(sequences[i]), n_continuation[i]
            span = slice(n_tok - 1 - n_cont, n_tok - 1)
            out[i] = (float(logp[row, span].astype(np.float64).sum()), bool(greedy[row, span].all()))
    return out


class JaxLM(TemplateLM):
    """Our Flax model as an lm-eval language model. Tokenisation mirrors ``HFLM``'s (the tokenizer's own special
    tokens, none added to a string that already starts with BOS), so both backends score identical tokens."""

    def __init__(self, model: Transformer, tokenizer: Any, *, batch_size: int = 16, progress: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.progress = batch_size, progress

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:  # stands in for an empty context
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        # As HFLM: too long a sequence loses tokens on the left; the continuation is always scored whole.
        sequences = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        return continuation_logprobs(self.model, sequences, [len(cont) for _, _, cont in requests],
                                     batch_size=self.batch_size, progress=self.progress and not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("the JAX backend scores multiple-choice tasks only; "
                                  "for perplexity use `modegpt eval` without --tasks")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("the JAX backend does not generate text: it scores multiple-choice tasks only")


def make_lm(model: str, backend: str = "jax", *, batch_size: int = 16, dtype: str = "float32",
            progress: bool = True):
    """An lm-eval language model for ``model`` (a directory, .gguf, hub id or embedded name)."""
    from converters.hf_import import HFCheckpoint

    if backend not in BACKENDS:
        raise UserError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}", argument="backend")
    checkpoint = HFCheckpoint(model)
    if backend == "jax":
        return JaxLM(checkpoint.load_model(dtype), checkpoint.load_tokenizer(), batch_size=batch_size,
                     progress=progress)
    try:
        import torch
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise UserError(f"backend hf needs torch ({e.name} is missing): "
                        "pip install 'modegpt-jax[torch,eval]'", argument="backend") from None
    return HFLM(pretrained=str(checkpoint.directory), dtype=dtype, batch_size=batch_size, trust_remote_code=True,
                device="cuda" if torch.cuda.is_available() else "cpu")


def evaluate(model: str, tasks: str | list[str], *, backend: str = "jax", limit: int | None = None,
             task_data: str = "auto", batch_size: int = 16, dtype: str = "float32", progress: bool = True,
             log_samples: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``tasks`` (names or a comma-separated string) with lm-eval's
    ``simple_evaluate``. Returns one summary dict; with ``log_samples``, lm-eval's per-document records too."""
    lm_eval_version = require_lm_eval()
    names = parse_tasks(tasks) if isinstance(tasks, str) else parse_tasks(",".join(tasks))
    start = time.perf_counter()
    loaded = load_tasks(names, task_data)
    lm = make_lm(model, backend, batch_size=batch_size, dtype=dtype, progress=progress)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # The tasks are built already; an empty manager spares lm-eval indexing its ~15k task files (seconds).
    raw = simple_evaluate(lm, tasks=[t.task for t in loaded], limit=limit, log_samples=log_samples,
                          task_manager=TaskManager(include_defaults=False))
    results = {}
    for t in loaded:
        r = raw["results"][t.name]
        entry: dict[str, Any] = {"docs": raw["n-samples"][t.name]["effective"], "data": t.source, "split": t.split}
        for m in METRICS:
            if f"{m},none" in r:
                entry[m] = r[f"{m},none"]
                stderr = r.get(f"{m}_stderr,none")
                entry[f"{m}_stderr"] = stderr if isinstance(stderr, float) else None
        results[t.name] = entry
    summary: dict[str, Any] = {
        "model": model, "backend": backend, "lm_eval": lm_eval_version, "limit": limit, "dtype": dtype,
        "tasks": results,
        "average_acc": float(np.mean([r["acc"] for r in results.values()])),
        "seconds": round(time.perf_counter() - start, 2),
    }
    with_norm = [r["acc_norm"] for r in results.values() if "acc_norm" in r]
    if with_norm:
        summary["average_acc_norm"] = float(np.mean(with_norm))  # over the tasks that report it
    if log_samples:
        summary["samples"] = raw["samples"]
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: acc and acc_norm (+- standard error) per task."""
    def cell(r: dict[str, Any], m: str) -> str:
        if m not in r:
            return "-"
        return f"{r[m]:.4f}" + (f" +- {r[m + '_stderr']:.4f}" if r.get(m + "_stderr") is not None else "")

    rows = [("task", "acc", "acc_norm", "docs", "data (split)")]
    for name, r in summary["tasks"].items():
        rows.append((name, cell(r, "acc"), cell(r, "acc_norm"), str(r["docs"]), f"{r['data']} ({r['split']})"))
    avg_norm = summary.get("average_acc_norm")
    rows.append(("average", f"{summary['average_acc']:.4f}", "-" if avg_norm is None else f"{avg_norm:.4f}", "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths + [0])))
             .rstrip() for row in rows]
    head = f"{summary['model']}  (backend {summary['backend']}, lm-eval {summary['lm_eval']}, {summary['seconds']} s)"
    return "\n".join([head, *lines])
