"""Time of the blockwise causal attention core by number of query chunks (forward, and forward with backward).

    python benchmarks/attention.py [--shapes 4x512,1x2048] [--heads 9] [--kv-heads 3] [--head-dim 64]
                                   [--chunks 1,2,4,8,16] [--reps 5] [--json benchmarks/results/attention.json]

Random post-RoPE queries, keys and values in SmolLM2's attention shapes (9 query heads in 3 KV groups, head size
64) through :func:`modegpt_jax.attention.causal_attention` with ``T / chunks`` query rows per chunk; each chunk
scores only the keys up to its last row, so more chunks skip more of the causally hidden half of ``T x T``, and
compile one more branch each. Prints the first call (compilation included) and the median of ``--reps`` calls.
:func:`modegpt_jax.model.query_chunk_rows` picks the count the model uses.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from modegpt_jax.attention import causal_attention
from modegpt_jax.model import query_chunk_rows

from record import update_results


def timed(fn, args, reps: int) -> tuple[float, float]:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def measure(B: int, T: int, G: int, n: int, d: int, rows: int, reps: int) -> dict:
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, G, n, d))
    k, v = (jax.random.normal(key, (B, T, G, d)) for key in keys[1:3])
    g = jax.random.normal(keys[3], (B, T, G, n, d))
    scale = d ** -0.5

    def core(q, k, v):
        return causal_attention(q, k, v, None, scale, None, rows)

    forward = jax.jit(core)
    backward = jax.jit(lambda q, k, v: jax.vjp(core, q, k, v)[1](g))
    fwd_first, fwd = timed(forward, (q, k, v), reps)
    bwd_first, bwd = timed(backward, (q, k, v), reps)
    return {"batch": B, "seqlen": T, "rows": rows, "chunks": -(-T // rows),
            "forward_ms": round(fwd * 1e3, 1), "forward_first_ms": round(fwd_first * 1e3),
            "forward_backward_ms": round(bwd * 1e3, 1), "forward_backward_first_ms": round(bwd_first * 1e3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x512,1x2048", help="BATCHxSEQLEN, comma-separated")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunks", default="1,2,4,8,16")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    rows_out = []
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.lower().split("x"))
        default = query_chunk_rows(B, args.heads, T)
        for chunks in sorted({int(c) for c in args.chunks.split(",")} | {-(-T // default)}):
            row = measure(B, T, args.kv_heads, args.heads // args.kv_heads, args.head_dim, -(-T // chunks), args.reps)
            row["model_default"] = row["rows"] == default
            rows_out.append(row)
            print(f"{B} x {T}, {row['chunks']:>2} chunks of {row['rows']:>4} rows"
                  f"{' (the model default)' if row['model_default'] else ''}: forward {row['forward_ms']} ms "
                  f"(first {row['forward_first_ms']} ms), forward+backward {row['forward_backward_ms']} ms "
                  f"(first {row['forward_backward_first_ms']} ms)", flush=True)
    if args.json:
        update_results(args.json, {"device": str(jax.devices()[0]), "heads": args.heads, "kv_heads": args.kv_heads,
                                   "head_dim": args.head_dim, "reps": args.reps, "rows": rows_out})


if __name__ == "__main__":
    main()
