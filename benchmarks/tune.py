"""Hyperparameter sweep on the validation slice of the calibration text (never on the held-out text).

    python benchmarks/tune.py [--ratio 0.3] [--calib-samples 64] [--calib-seqlen 512] [--val-windows 40]
                              [--grid eps=0.05,0.1,0.2 alpha=0.1,1] [--json benchmarks/results/tune.json]
    python benchmarks/tune.py --model gemma3-270m --grid qkn=whole,corrected --json benchmarks/results/qk_norm.json

Calibration windows come from the embedded calibration split; perplexity is measured on the embedded validation
split (articles disjoint from both the calibration windows' articles and the held-out articles).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from record import update_results

KEYS = {"eps": "allocation_eps", "alpha": "leverage_alpha", "max": "max_sparsity", "alloc": "allocation",
        "att": "attention_scale", "qkn": "qk_norm_mode"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--val-windows", type=int, default=40)
    parser.add_argument("--grid", nargs="*", default=["eps=0.05,0.1,0.2"],
                        help="NAME=v1,v2 with NAME in eps, alpha, max, alloc, att, qkn (qk_norm_mode)")
    parser.add_argument("--json", default="benchmarks/results/tune.json")
    args = parser.parse_args()

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.pipeline import CompressionSettings, compress
    from modegpt_jax.wikipedia import embedded_text

    ckpt = HFCheckpoint(args.model)
    tok = ckpt.load_tokenizer()
    calib = calibration_windows(tok, "wikipedia", args.calib_samples, args.calib_seqlen, 0)
    val = token_windows(tokenize(tok, embedded_text("validation")), 512, args.val_windows)
    axes = []
    for item in args.grid:
        name, values = item.split("=")
        axes.append([(KEYS[name], v if name in ("alloc", "qkn") else float(v)) for v in values.split(",")])
    results = []
    dense_ppl = perplexity(ckpt.load_model(), val, progress=False)["perplexity"]
    print(f"dense validation perplexity {dense_ppl:.3f}", flush=True)
    for combo in itertools.product(*axes):
        overrides = dict(combo)
        start = time.perf_counter()
        model, report = compress(ckpt, calib, CompressionSettings(ratio=args.ratio, **overrides), progress=False)
        ppl = perplexity(model, val, progress=False)["perplexity"]
        row = {**overrides, "validation_perplexity": ppl, "ratio_to_dense": ppl / dense_ppl,
               "achieved_block_ratio": report["achieved_block_ratio"], "seconds": time.perf_counter() - start}
        results.append(row)
        print(json.dumps(row), flush=True)
    update_results(args.json, {"args": vars(args), "dense_validation_perplexity": dense_ppl, "results": results})


if __name__ == "__main__":
    main()
