"""Quality table: held-out perplexity of the embedded SmolLM2-135M compressed at several ratios.

    python benchmarks/quality.py [--ratios 0.1 0.2 0.3 0.4] [--uniform 0.3] [--out runs/quality]
                                 [--json benchmarks/results/quality.json]

Each row runs the same commands a user would:
    modegpt compress --model smollm2-135m --ratio R --calib-samples 64 --calib-seqlen 512 --output DIR
    modegpt eval --model DIR --json
(held-out Wikipedia articles, 512-token windows, never the calibration text). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from record import update_results


def run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "modegpt_jax.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"modegpt {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def evaluate(model: str) -> float:
    return json.loads(run("eval", "--model", model, "--json").strip().splitlines()[-1])["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--uniform", type=float, nargs="*", default=[0.3])
    parser.add_argument("--out", default="runs/quality")
    parser.add_argument("--json", default="benchmarks/results/quality.json")
    args = parser.parse_args()

    rows = [{"ratio": 0.0, "allocation": "dense", "perplexity": evaluate(args.model)}]
    print(f"dense: {rows[0]['perplexity']:.2f}", flush=True)
    runs = [(r, "bi") for r in args.ratios] + [(r, "uniform") for r in args.uniform]
    for ratio, allocation in runs:
        out = Path(args.out) / f"{allocation}-{ratio}"
        run("compress", "--model", args.model, "--ratio", str(ratio), "--allocation", allocation,
            "--calib-samples", "64", "--calib-seqlen", "512", "--output", str(out), "--overwrite")
        report = json.loads((out / "report.json").read_text())
        ppl = evaluate(str(out))
        rows.append({"ratio": ratio, "allocation": allocation, "perplexity": ppl,
                     "achieved_block_ratio": report["achieved_block_ratio"],
                     "achieved_total_ratio": report["achieved_total_ratio"],
                     "params_after": report["params_after"],
                     "compress_seconds": report["timings_seconds"]["wall"]})
        print(json.dumps(rows[-1]), flush=True)
    dense = rows[0]["perplexity"]
    print("\n| ratio (blocks) | allocation | achieved blocks / whole model | held-out perplexity | x dense |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        if row["allocation"] == "dense":
            print(f"| 0 | dense | - | {dense:.2f} | 1.00 |")
            continue
        print(f"| {row['ratio']} | {row['allocation']} | {row['achieved_block_ratio']:.3f} / "
              f"{row['achieved_total_ratio']:.3f} | {row['perplexity']:.2f} | {row['perplexity'] / dense:.2f} |")
    update_results(args.json, {"model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
