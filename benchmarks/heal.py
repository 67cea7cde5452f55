"""Recovery training benchmark: a compressed model healed by distillation for a few wall-clock budgets.

    python benchmarks/heal.py [--model smollm2-135m] [--ratio 0.3] [--budgets 5,10,20] [--methods full,lora]
                              [--seqlen 512] [--batch-size 4] [--lr 1e-5] [--lora-lr 1e-4] [--piqa-limit 300]
                              [--loss kd|lm|kd+lm] [--train-embeddings] [--dtype float32|bfloat16]
                              [--no-baselines] [--probe-only --key KEY] [--json benchmarks/results/heal.json]

The compressed model is made first with ``modegpt compress --model M --ratio R --output DIR`` (skipped when
``--compressed DIR`` is given). A budget of B minutes is the wall time of the run's training loop (the
``seconds_this_run`` of its report: compilation, checkpoints and any validation between steps included; the
validation before the first step and after the last one, and loading, are not). It becomes a step count from a
short probe: the median time of a training step (steps 3 to ``PROBE_STEPS``) and what the first two steps took
beyond it (their compilation), with ``CHECKPOINTS`` checkpoints priced at ``CHECKPOINT_SECONDS`` each; at most one pass over the
training text. Each row records the loop's measured seconds next to its budget. Each (method, budget) pair is one run of
    modegpt heal --model DIR --teacher M --output OUT --steps N --method METHOD ...
through :func:`modegpt_jax.run.heal_checkpoint`, so the schedule (warmup, cosine decay) fits the budget as it would
for a user. Every row reports held-out perplexity (the embedded held-out text, never trained or validated on) and
zero-shot PIQA accuracy (lm-eval, ``--piqa-limit`` documents) of the healed model, next to the dense and compressed
ones, plus training tokens/s. Training text is the embedded calibration split; validation is the validation split.
``--probe-only`` stops after the probe: each method's seconds per step and compilation seconds, without training runs.
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
import time
from pathlib import Path

from record import update_results

os.environ["HF_HUB_OFFLINE"] = "1"


def held_out(model_dir: str | Path, seqlen: int, windows: int) -> float:
    from converters.hf_import import HFCheckpoint
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    ckpt = HFCheckpoint(model_dir)
    data = token_windows(tokenize(ckpt.load_tokenizer(), embedded_text("heldout")), seqlen, windows)
    return perplexity(ckpt.load_model(), data, progress=False)["perplexity"]


def piqa(model_dir: str | Path, limit: int | None) -> float | None:
    if limit == 0:
        return None
    from modegpt_jax.zeroshot import evaluate

    return evaluate(str(model_dir), "piqa", limit=limit, progress=False)["tasks"]["piqa"]["acc"]


#: What one orbax checkpoint of SmolLM2's trained blocks and AdamW moments adds to a step on this project's 2-core
#: CPU (the steps after a checkpoint took about 8 s longer than their neighbours, from the elapsed seconds per step
#: in a heal report).
CHECKPOINT_SECONDS = 8.0
#: Steps of the probe that prices a step (the median of steps 3 to this). With steps 3-6 alone the price of a
#: SmolLM2 step was 4 to 6% off the run's median on this CPU, either way, so a budget's run ended 3% over or 6% under.
PROBE_STEPS = 12
#: A run checkpoints every ``ceil(steps / CHECKPOINTS)`` steps and after its last step: at most ``CHECKPOINTS`` in all.
CHECKPOINTS = 4


def step_seconds(compressed: str, teacher: str, args, method: str) -> tuple[float, float]:
    """(seconds per training step: the median of steps 3 to ``PROBE_STEPS`` of a short run, seconds the first two
    steps took beyond that: their compilation)."""
    from converters.hf_import import HFCheckpoint
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.heal import HealSettings, add_lora, make_optimizer, train_step

    student, dense = HFCheckpoint(compressed), HFCheckpoint(teacher)
    settings = HealSettings(steps=PROBE_STEPS, batch_size=args.batch_size, warmup=1, method=method, loss=args.loss,
                            dtype=args.dtype, train_embeddings=args.train_embeddings)
    windows = PROBE_STEPS * args.batch_size
    tokens = calibration_windows(student.load_tokenizer(), "wikipedia", windows, args.seqlen, 0)
    model, teacher_model = student.load_model(), dense.load_model()
    if method == "lora":
        add_lora(model)
    optimizer = make_optimizer(model, settings)
    times = []
    for i in range(PROBE_STEPS):
        start = time.perf_counter()
        train_step(model, optimizer, tokens[i * args.batch_size:(i + 1) * args.batch_size], teacher_model, settings)
        times.append(time.perf_counter() - start)
    steady = statistics.median(times[2:])
    return steady, max(0.0, times[0] + times[1] - 2 * steady)


def record(args, fields: dict) -> None:
    """Write ``fields`` with the run's arguments into ``--json`` (under ``--key`` if given) and say where. A
    ``--compressed`` directory is recorded as the command that makes one (a path of the machine that ran it means
    nothing elsewhere)."""
    recorded = dict(vars(args))
    if args.compressed is not None:
        recorded["compressed"] = f"DIR (modegpt compress --model {args.model} --ratio {args.ratio} --output DIR)"
    out = update_results(args.json, {"args": recorded, **fields}, args.key)
    print(f"written to {out}" + (f" (key {args.key!r})" if args.key else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--compressed", default=None, help="a directory written by modegpt compress")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--budgets", default="5,10,20", help="training minutes, comma-separated")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate of full fine-tuning")
    parser.add_argument("--lora-lr", type=float, default=1e-4, help="peak learning rate of LoRA")
    parser.add_argument("--loss", default="kd", choices=["kd", "lm", "kd+lm"])
    parser.add_argument("--train-embeddings", action="store_true",
                        help="full fine-tuning also trains the embeddings (default: the decoder blocks only)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the passes (the weights stay float32)")
    parser.add_argument("--heldout-windows", type=int, default=40)
    parser.add_argument("--piqa-limit", type=int, default=300, help="PIQA documents (0: skip PIQA)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip the dense and compressed rows (held-out perplexity and PIQA before healing)")
    parser.add_argument("--probe-only", action="store_true",
                        help="print (and record) each method's step time from the probe, then stop: no training runs")
    parser.add_argument("--json", default="benchmarks/results/heal.json")
    parser.add_argument("--key", default=None, help="store this run's args and rows under KEY in the results file "
                        "(default: its top-level args and rows); every other record in the file stays")
    args = parser.parse_args()
    if args.probe_only and not args.key:
        parser.error("--probe-only records under --key KEY (the top-level record is the training runs')")

    work = Path(tempfile.mkdtemp(prefix="heal-bench-"))
    compressed = args.compressed or str(work / "compressed")
    if args.compressed is None:
        subprocess.run([sys.executable, "-m", "modegpt_jax.cli", "compress", "--model", args.model, "--ratio",
                        str(args.ratio), "--output", compressed], check=True)
    if args.probe_only:
        probes = []
        for method in args.methods.split(","):
            seconds, compile_seconds = step_seconds(compressed, args.model, args, method)
            probes.append({"method": method, "seconds_per_step": seconds, "compile_seconds": compile_seconds,
                           "tokens_per_second": args.batch_size * args.seqlen / seconds})
            print(f"{method}: {seconds:.2f} s a step (median of steps 3-{PROBE_STEPS}), "
                  f"{probes[-1]['tokens_per_second']:.0f} tokens/s, compilation {compile_seconds:.1f} s", flush=True)
        record(args, {"probes": probes})
        return
    rows = [] if args.no_baselines else [
        {"model": "dense", "heldout_perplexity": held_out(args.model, args.seqlen, args.heldout_windows),
         "piqa_acc": piqa(args.model, args.piqa_limit)},
        {"model": f"compressed {args.ratio}", "heldout_perplexity": held_out(compressed, args.seqlen,
                                                                             args.heldout_windows),
         "piqa_acc": piqa(compressed, args.piqa_limit)}]
    for row in rows:
        print(json.dumps(row), flush=True)
    from modegpt_jax.heal import HealSettings
    from modegpt_jax.run import heal_checkpoint

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.calibration import calibration_tokens, load_calibration_text

    text_tokens = len(calibration_tokens(HFCheckpoint(compressed).load_tokenizer(), load_calibration_text("wikipedia")))
    most_steps = text_tokens // args.seqlen // args.batch_size  # one pass over the training text
    for method in args.methods.split(","):
        seconds, compile_seconds = step_seconds(compressed, args.model, args, method)
        fixed = compile_seconds + CHECKPOINTS * CHECKPOINT_SECONDS
        for budget in (float(b) for b in args.budgets.split(",")):
            steps = min(most_steps, max(2, int((budget * 60 - fixed) / seconds)))
            settings = HealSettings(steps=steps, batch_size=args.batch_size, loss=args.loss, dtype=args.dtype,
                                    train_embeddings=args.train_embeddings,
                                    lr=args.lora_lr if method == "lora" else args.lr,
                                    warmup=max(1, steps // 20), method=method,
                                    checkpoint_every=-(-steps // CHECKPOINTS))
            out = work / f"healed-{method}-{budget:g}"
            start = time.perf_counter()
            report = heal_checkpoint(compressed, args.model, out, settings, seqlen=args.seqlen, progress=False)
            row = {"model": f"healed ({method}, {budget:g} min budget)", "method": method, "budget_minutes": budget,
                   "steps": steps, "tokens": report["tokens_seen"], "seconds_per_step_measured": seconds,
                   "compile_seconds_measured": compile_seconds, "train_seconds": report["seconds_this_run"],
                   "within_budget": report["seconds_this_run"] <= budget * 60,
                   "wall_seconds": time.perf_counter() - start,
                   "tokens_per_second": report["tokens_per_second"],
                   "validation_perplexity": report["validation_perplexity"],
                   "heldout_perplexity": held_out(out, args.seqlen, args.heldout_windows),
                   "piqa_acc": piqa(out, args.piqa_limit)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.model} at {args.ratio}, {platform.machine()} with {os.cpu_count()} CPUs, loss {args.loss}, "
          f"{args.batch_size} x {args.seqlen} tokens per step, lr {args.lr} (LoRA {args.lora_lr})")
    print(f"{'model':36} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'held-out ppl':>13} {'PIQA':>6}")
    for r in rows:
        acc = "-" if r["piqa_acc"] is None else f"{r['piqa_acc']:.3f}"
        tps = "-" if r.get("tokens_per_second") is None else f"{r['tokens_per_second']:.0f}"
        print(f"{r['model']:36} {r.get('steps', '-'):>6} {r.get('tokens', '-'):>9} {tps:>7} "
              f"{r['heldout_perplexity']:13.2f} {acc:>6}")
    record(args, {"rows": rows})


if __name__ == "__main__":
    main()
