"""Compression benchmark: wall time of each phase against one plain forward pass over the same tokens.

    python benchmarks/compress.py [--model smollm2-135m] [--ratio 0.3] [--calib-samples 64] [--calib-seqlen 512]
                                  [--activation-dtype float32|bfloat16] [--json benchmarks/results/compress.json]

Prints a table and writes JSON: wall time per phase, compile time (tracing, lowering and XLA compilation, from
``jax.monitoring``), peak resident memory and, where the backend reports it, peak device memory. Each measurement
runs in its own child process, one for the plain forward pass and one for the compression (the run
``modegpt compress`` makes, :func:`modegpt_jax.run.compress_checkpoint`: streamed, finished blocks to a staging
directory, then the export), so neither inflates the other. The compression's seconds are its phases up to the
export; the wall time with the export is recorded too.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import time

from record import update_results


def _forward(args, queue):
    import jax
    import numpy as np

    from converters.hf_import import HFCheckpoint
    from modegpt_jax.calibration import calibration_windows
    from modegpt_jax.mesh import make_mesh, shard_batch
    from modegpt_jax.model import run_block
    from modegpt_jax.pipeline import _embed

    ckpt = HFCheckpoint(args.model)
    tokens = calibration_windows(ckpt.load_tokenizer(), "wikipedia", args.calib_samples, args.calib_seqlen, 0)
    mesh = make_mesh(None)
    start = time.perf_counter()
    shell = ckpt.load_shell(ckpt.config)
    pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), (args.batch_size, tokens.shape[1]))
    posj = shard_batch(pos, mesh)
    hs = [_embed(shell, shard_batch(tokens[i : i + args.batch_size], mesh), posj, mesh, "float32")
          for i in range(0, len(tokens), args.batch_size)]
    for layer in range(ckpt.config.num_layers):  # streamed, like the pipeline: one block resident
        block = ckpt.load_block(layer)
        hs = [run_block(block, h, posj) for h in hs]
    jax.block_until_ready(hs)
    seconds = time.perf_counter() - start
    queue.put({"seconds": seconds, "tokens": int(tokens.size),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _compress(args, queue):
    import tempfile

    from modegpt_jax.pipeline import CompressionSettings
    from modegpt_jax.run import RunSettings, compress_checkpoint

    settings = CompressionSettings(ratio=args.ratio, batch_size=args.batch_size,
                                   activation_dtype=args.activation_dtype)
    run = RunSettings(calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen)
    with tempfile.TemporaryDirectory() as out:  # the run `modegpt compress` makes, export included
        start = time.perf_counter()
        report = compress_checkpoint(args.model, f"{out}/model", settings, run, progress=False)
        wall = time.perf_counter() - start
    phases = report["timings_seconds"]
    queue.put({"seconds": phases["total"], "wall_with_export_seconds": wall,
               "tokens": args.calib_samples * args.calib_seqlen,
               "phases": phases, "achieved_block_ratio": report["achieved_block_ratio"],
               "resume_seconds": sum(x["resume_seconds"] for x in report["layers"]),
               "device_peak_mib": report["memory"].get("device_peak_bytes", 0) / 2**20 or None,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def _run(target, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--activation-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default="benchmarks/results/compress.json")
    args = parser.parse_args()

    # Warm the converted-checkpoint cache so neither measurement pays for the GGUF conversion.
    from converters.hf_import import HFCheckpoint

    HFCheckpoint(args.model)
    forward = _run(_forward, args)
    comp = _run(_compress, args)
    rows = [
        ("plain forward pass (streamed)", forward["seconds"], forward["tokens"] / forward["seconds"],
         forward["peak_rss_mib"]),
        ("MoDeGPT compression (all phases)", comp["seconds"], comp["tokens"] / comp["seconds"], comp["peak_rss_mib"]),
    ]
    print(f"{args.model}, ratio {args.ratio}, {args.calib_samples} x {args.calib_seqlen} calibration tokens, "
          f"{platform.machine()} with {__import__('os').cpu_count()} CPUs")
    print(f"{'':36} {'seconds':>9} {'tokens/s':>10} {'peak RSS MiB':>13}")
    for name, sec, tps, rss in rows:
        print(f"{name:36} {sec:9.1f} {tps:10.0f} {rss:13.0f}")
    for phase, sec in comp["phases"].items():
        print(f"  phase {phase:28} {sec:9.1f}")
    print(f"  of which writing resume checkpoints {comp['resume_seconds']:9.1f}")
    if comp["device_peak_mib"]:
        print(f"peak device memory {comp['device_peak_mib']:.0f} MiB")
    print(f"compression / forward: {comp['seconds'] / forward['seconds']:.2f}x")
    out = update_results(args.json, {"args": vars(args), "forward": forward, "compress": comp,
                                     "ratio_to_forward": comp["seconds"] / forward["seconds"]})
    print(f"written to {out}")


if __name__ == "__main__":
    main()
