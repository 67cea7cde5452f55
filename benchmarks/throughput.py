"""Throughput benchmark: prefill and decode tokens/s of SmolLM2-135M and its 0.3 compression, JAX and PyTorch.

    python benchmarks/throughput.py [--model smollm2-135m] [--ratio 0.3 | --compressed DIR]
                                    [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 64] [--repeats 5]
                                    [--threads N] [--json benchmarks/results/throughput.json]

Without --compressed the model is compressed first with the default settings (as `modegpt compress --ratio 0.3`,
about 2-3 minutes on a 2-core CPU). Dense and compressed are measured side by side in one process with the same
prompt tokens (held-out Wikipedia), greedy decoding through a KV cache in both frameworks; see
modegpt_jax/throughput.py for what is timed. Prints the table and the four compressed/dense ratios (prefill and
decode, JAX and PyTorch, at batch 1) and writes JSON.
"""

from __future__ import annotations

import argparse
import sys

from modegpt_jax.throughput import (
    BenchSettings,
    compressed_model,
    format_table,
    parse_int_list,
    run_benchmark,
)

from record import update_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=None, help="compress --model at this ratio (default: 0.3)")
    parser.add_argument("--compressed", default=None, help="an existing export of `modegpt compress` instead")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: one per core)")
    parser.add_argument("--json", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    ratio = args.ratio if args.ratio is not None or args.compressed else 0.3
    settings = BenchSettings(batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"),
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                             threads=args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with compressed_model(args.model, args.compressed, ratio if not args.compressed else None, log) as compressed:
        result = run_benchmark(args.model, compressed, settings, log)
    result["compressed"] = args.compressed or f"{args.model} compressed at ratio {ratio} (default settings)"
    print(format_table(result))
    first = min(settings.batch_sizes)
    print(f"\ncompressed / dense at batch {first}:")
    for row in result["rows"]:
        if row["batch"] == first:
            print(f"  {row['framework']:>5}: prefill {row['prefill_speedup']:.2f}x  "
                  f"decode {row['decode_speedup']:.2f}x")
    if result["greedy_tokens_equal_jax_torch"]:
        print("greedy tokens equal in JAX and PyTorch:",
              ", ".join(f"{k} {v:.0%}" for k, v in result["greedy_tokens_equal_jax_torch"].items()))
    print(f"written to {update_results(args.json, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
