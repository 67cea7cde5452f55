"""Compressed models in llama.cpp: file size, prompt and decoding speed, held-out perplexity, dense side by side.

    python benchmarks/llamacpp.py [--model smollm2-135m] [--ratio 0.3] [--types f16,q8_0,q4_0,q4_1]
                                  [--threads 2] [--prompt 256] [--decode 128] [--repeats 9] [--ppl-windows 8]
                                  [--compressed NAME=DIR ...] [--json benchmarks/results/llamacpp.json]

Unless ``--compressed`` names them, two compressed models are made first, each with
``modegpt compress --model M --ratio R --width-multiple 32 --output DIR`` (every width a whole number of 32-value
quantisation blocks): ``default`` (the default layout: key-query and value-output narrowed too, padded back to the
full head dimension in the file) and ``mlp-only`` (``--attention-scale 0``: nothing to pad). Each model, the dense one
included, is written with ``modegpt export-gguf --type T`` for every type and run in llama.cpp (llama-cpp-python,
``--threads`` threads): prompt processing of ``--prompt`` tokens in one batch and decoding of ``--decode`` tokens one
at a time, the same tokens of the held-out text for every file. The files of one type are timed in turns
(``--repeats`` rounds, each loading every file in rotating order for a warm-up run and a timed run); a speed is
the median over the rounds, a speed-up the median over the rounds of the ratio to the dense file's run of the same
round (with its range over the rounds), so that a slow spell of the machine cancels out. Perplexity is measured on
``--ppl-windows`` held-out windows of 512 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from record import update_results

os.environ["HF_HUB_OFFLINE"] = "1"


def modegpt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "modegpt_jax.cli", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--types", default="f16,q8_0,q4_0,q4_1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--compressed", nargs="*", default=None, metavar="NAME=DIR",
                        help="compressed directories to use instead of making them")
    parser.add_argument("--json", default="benchmarks/results/llamacpp.json")
    args = parser.parse_args()

    from converters import llamacpp
    from converters.hf_import import HFCheckpoint
    from modegpt_jax.perplexity import token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    work = Path(tempfile.mkdtemp(prefix="llamacpp-bench-"))
    if args.compressed is None:
        compressed = {"default": str(work / "default"), "mlp-only": str(work / "mlp-only")}
        for name, extra in (("default", []), ("mlp-only", ["--attention-scale", "0"])):
            modegpt("compress", "--model", args.model, "--ratio", str(args.ratio), "--width-multiple", "32",
                    "--output", compressed[name], *extra)
    else:
        compressed = dict(item.split("=", 1) for item in args.compressed)
    models = {"dense": args.model, **{f"{args.ratio} {name}": d for name, d in compressed.items()}}

    tokens = tokenize(HFCheckpoint(args.model).load_tokenizer(), embedded_text("heldout"))
    prompt = [int(t) for t in tokens[: args.prompt]]
    decode = [int(t) for t in tokens[args.prompt: args.prompt + args.decode]]
    windows = token_windows(tokens, 512, args.ppl_windows)
    rows = []
    for kind in args.types.split(","):
        paths = [work / f"{name.replace(' ', '_')}.{kind}.gguf" for name in models]
        for source, path in zip(models.values(), paths):
            modegpt("export-gguf", "--model", source, "--output", str(path), "--type", kind)
        timed = llamacpp.speed(paths, prompt, decode, args.threads, args.repeats)
        dense = timed[0]["rounds"]
        for name, path, fast in zip(models, paths, timed):
            row = {"model": name, "type": kind, "mib": round(path.stat().st_size / 2**20, 1),
                   "prompt_tokens_per_s": round(fast["prompt_tokens_per_s"], 1),
                   "decode_tokens_per_s": round(fast["decode_tokens_per_s"], 1),
                   "heldout_perplexity": round(llamacpp.perplexity(path, windows, args.threads), 3)}
            for i, what in enumerate(("prompt", "decode")):  # within each round, against the dense file's run
                ratios = [mine[i] / theirs[i] for mine, theirs in zip(fast["rounds"], dense)]
                row[f"{what}_speedup"] = round(statistics.median(ratios), 3)
                row[f"{what}_speedup_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
            rows.append(row)
            print(json.dumps(row), flush=True)
        for path in paths:
            path.unlink()

    import llama_cpp

    out = update_results(args.json, {"args": vars(args), "compressed": compressed, "rows": rows,
                                     "llama_cpp_python": llama_cpp.__version__,
                                     "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()})
    print(f"written {out}")


if __name__ == "__main__":
    main()
