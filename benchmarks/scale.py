"""Scale benchmark: compression of random models in the exact shapes of real LLMs, streamed from disk.

    python benchmarks/scale.py [--shape llama-2-7b] [--layers 2,4,8] [--full] [--per-layer-only]
                               [--mesh data=8 --mesh data=2,model=4 [--devices 8]]
                               [--ratio 0.3] [--calib-samples 16] [--calib-seqlen 1024]
                               [--workdir DIR] [--keep] [--dry-run] [--extra-args "--dtype bfloat16 ..."]
                               [--json benchmarks/results/scale.json] [--key NAME]

For each number of layers N it writes a Hugging Face model directory with random bf16 weights in the shapes of
the chosen model (its first N blocks, plus the embeddings, final norm and output head: :func:`write_checkpoint`),
then runs ``modegpt compress`` on it as a child process and records the child's peak resident memory, its wall
time and, from ``report.json``, the time of each phase and of each layer. Since the pipeline streams one block at a
time, peak memory should not grow with N (the table says whether it stays within 5%) and the seconds per layer
should not either. ``--per-layer-only`` is for models whose every layer is too big to run several of
(llama-3-70b by default): N = 1 and 2.

``--mesh SPEC`` (repeatable) runs each N once per mesh and adds, from ``report.json``, the most bytes one device
held of a dense block's weights and of one layer's statistics: with ``model=4`` both should be about 4x smaller
than with ``data`` alone. ``--devices N`` simulates N CPU devices in the child
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``); leave it out on a GPU or TPU machine.

Shapes (``SHAPES``): llama-2-7b, llama-3-8b (Llama 3.1 configuration: llama3 RoPE scaling), mistral-7b
(v0.2: vocabulary 32000, no sliding window), qwen2.5-7b (q/k/v biases), llama-3-70b; ``tiny`` is a small test
shape. The tokenizer is a byte-level BPE of 8,000 tokens trained once (cached in the work directory) on the
embedded calibration text: smaller than every model's vocabulary, so every id it produces is valid. Its special
tokens are ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, and ``config.json`` names those ids as bos/eos (the real ids of
Llama 2 and Mistral; Llama 3 and Qwen use ids outside this tokenizer's range, which would not match it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from record import update_results

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "scale.json"
MARKER = ".scale_checkpoint.json"
SHARD_BYTES = 2_000_000_000  # ~2 GB shards, like the Hub checkpoints of these models
CHUNK_ELEMENTS = 1 << 24  # generate at most 16M float32 values (64 MiB) at a time
TOKENIZER_VOCAB = 8000
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
WRITER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Shape:
    model_type: str
    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    rope_scaling: dict | None = None
    qkv_bias: bool = False
    extra: dict = dataclasses.field(default_factory=dict)  # other real config fields of the family

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

SHAPES: dict[str, Shape] = {
    "llama-2-7b": Shape("llama", "LlamaForCausalLM", 4096, 32, 32, 32, 11008, 32000, 1e-5, 10000.0, 4096,
                        extra={"pretraining_tp": 1}),
    "llama-3-8b": Shape("llama", "LlamaForCausalLM", 4096, 32, 32, 8, 14336, 128256, 1e-5, 500000.0, 131072,
                        rope_scaling=_LLAMA31_ROPE, extra={"pretraining_tp": 1}),
    "mistral-7b": Shape("mistral", "MistralForCausalLM", 4096, 32, 32, 8, 14336, 32000, 1e-5, 1000000.0, 32768,
                        extra={"sliding_window": None}),
    "qwen2.5-7b": Shape("qwen2", "Qwen2ForCausalLM", 3584, 28, 28, 4, 18944, 152064, 1e-6, 1000000.0, 131072,
                        qkv_bias=True,
                        extra={"use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28}),
    "llama-3-70b": Shape("llama", "LlamaForCausalLM", 8192, 80, 64, 8, 28672, 128256, 1e-5, 500000.0, 131072,
                         rope_scaling=_LLAMA31_ROPE, extra={"pretraining_tp": 1}),
    # A test shape: the same code path in seconds.
    "tiny": Shape("llama", "LlamaForCausalLM", 256, 4, 4, 2, 688, 8000, 1e-5, 10000.0, 2048),
}
PUBLIC_SHAPES = [name for name in SHAPES if name != "tiny"]


# --------------------------------------------------------------------------- checkpoint writer


def tensor_specs(shape: Shape, layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(Hugging Face name, shape, kind) of every tensor, in the order they are written; kind is weight/norm/bias."""
    d, hd = shape.hidden, shape.head_dim
    q, kv = shape.heads * hd, shape.kv_heads * hd
    specs = [("model.embed_tokens.weight", (shape.vocab, d), "weight")]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (d,), "norm"))
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            specs.append((p + f"self_attn.{proj}.weight", (out, d), "weight"))
            if shape.qkv_bias:
                specs.append((p + f"self_attn.{proj}.bias", (out,), "bias"))
        specs.append((p + "self_attn.o_proj.weight", (d, q), "weight"))
        specs.append((p + "post_attention_layernorm.weight", (d,), "norm"))
        specs.append((p + "mlp.gate_proj.weight", (shape.mlp, d), "weight"))
        specs.append((p + "mlp.up_proj.weight", (shape.mlp, d), "weight"))
        specs.append((p + "mlp.down_proj.weight", (d, shape.mlp), "weight"))
    specs.append(("model.norm.weight", (d,), "norm"))
    specs.append(("lm_head.weight", (shape.vocab, d), "weight"))
    return specs


def _chunks(name: str, dims: tuple[int, ...], kind: str, seed: int):
    """The tensor's values as bf16 arrays of whole rows, generated a chunk at a time from its own seed."""
    import ml_dtypes

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows = dims[0]
    cols = int(np.prod(dims[1:])) if len(dims) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x = rng.standard_normal((n, cols), dtype=np.float32)
        x *= 0.02
        if kind == "norm":
            x += 1.0  # RMSNorm weights start at 1; a little noise keeps them from being exactly uniform
        yield x.astype(ml_dtypes.bfloat16)


def _plan_shards(specs, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], str]]]:
    shards, current, size = [], [], 0
    for spec in specs:
        nbytes = 2 * int(np.prod(spec[1]))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _write_safetensors(path: Path, specs, seed: int) -> int:
    """One safetensors file written tensor by tensor (header first, then each tensor's bytes streamed)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims, _ in specs:
        nbytes = 2 * int(np.prod(dims))
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dims, kind in specs:
            for chunk in _chunks(name, dims, kind, seed):
                chunk.tofile(f)
    return 8 + len(blob) + offset


def hf_config(shape: Shape, layers: int) -> dict[str, Any]:
    """config.json in the form transformers 5 writes it (``rope_parameters``), with the family's real fields."""
    rope = {"rope_type": "default", "rope_theta": shape.rope_theta}
    if shape.rope_scaling:
        rope = {**shape.rope_scaling, "rope_theta": shape.rope_theta}
    cfg: dict[str, Any] = {
        "architectures": [shape.architecture],
        "model_type": shape.model_type,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index("<s>"),
        "eos_token_id": SPECIAL_TOKENS.index("</s>"),
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.mlp,
        "max_position_embeddings": shape.max_positions,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": shape.kv_heads,
        "rms_norm_eps": shape.rms_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": shape.vocab,
        "transformers_version": "5.24.0",
    }
    if shape.model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if shape.model_type == "qwen2":
        cfg.pop("head_dim")
        cfg["max_window_layers"] = min(shape.extra.get("max_window_layers", layers), layers)
    cfg.update({k: v for k, v in shape.extra.items() if k not in cfg})
    return dict(sorted(cfg.items()))


def train_tokenizer(cache_dir: Path) -> Path:
    """A byte-level BPE of TOKENIZER_VOCAB tokens trained on the embedded calibration text, cached in cache_dir."""
    path = cache_dir / "tokenizer.json"
    if path.is_file():
        return path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from modegpt_jax.wikipedia import embedded_text

    text = embedded_text("calibration")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([p for p in text.split("\n") if p.strip()], trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return path


def checkpoint_bytes(shape: Shape, layers: int) -> int:
    return sum(2 * int(np.prod(dims)) for _, dims, _ in tensor_specs(shape, layers))


def write_checkpoint(shape_name: str, out_dir: str | Path, layers: int | None = None, seed: int = 0,
                     tokenizer_cache: str | Path | None = None) -> dict[str, Any]:
    """Write a Hugging Face model directory with random bf16 weights in the shapes of ``shape_name``.

    ``layers`` keeps only the first N blocks (the configuration says N layers). Weights are generated tensor by
    tensor into ~2 GB safetensors shards plus ``model.safetensors.index.json``; the tokenizer is trained once
    and cached in ``tokenizer_cache`` (default: ``out_dir``'s parent / ``tokenizer``). A directory already written
    with the same shape, layers and seed (its marker file says so) is left as it is. Returns a summary.
    """
    shape = SHAPES[shape_name]
    layers = shape.layers if layers is None else int(layers)
    if not 1 <= layers <= shape.layers:
        raise ValueError(f"{shape_name} has {shape.layers} layers; cannot write {layers}")
    out = Path(out_dir)
    identity = {"shape": shape_name, "layers": layers, "seed": seed, "writer_version": WRITER_VERSION,
                "dims": dataclasses.asdict(shape)}
    marker = out / MARKER
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("identity") == identity:
            return {**done["summary"], "cached": True}
    specs = tensor_specs(shape, layers)
    total = sum(2 * int(np.prod(dims)) for _, dims, _ in specs)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < total * 1.05 + (1 << 28):
        raise SystemExit(f"not enough disk space under {out.parent}: {shape_name} with {layers} layers needs "
                         f"{total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free")
    tok_path = train_tokenizer(Path(tokenizer_cache) if tokenizer_cache else out.parent / "tokenizer")

    start = time.perf_counter()
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = _plan_shards(specs, SHARD_BYTES)
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
    # Each tensor has its own seed, so the shards are independent: written by parallel processes where the
    # machine has the cores and the memory (each holds one 64 MiB chunk at a time).
    workers = max(1, min(len(shards), (os.cpu_count() or 1) - 1, 8))
    if workers == 1:
        for fname, shard in zip(names, shards):
            _write_safetensors(tmp / fname, shard, seed)
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_safetensors, [tmp / f for f in names], shards, [seed] * len(shards)):
                pass
    params = sum(int(np.prod(dims)) for _, dims, _ in specs)
    index = {"metadata": {"total_size": total, "total_parameters": params},
             "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = hf_config(shape, layers)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
         "transformers_version": cfg["transformers_version"]}, indent=2) + "\n")
    shutil.copy(tok_path, tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_positions,
    }, indent=2) + "\n")
    seconds = time.perf_counter() - start
    summary = {"shape": shape_name, "layers": layers, "directory": str(out), "shards": len(shards),
               "parameters": params, "weight_bytes": total, "bytes_on_disk": _disk_bytes(tmp),
               "write_seconds": round(seconds, 2)}
    (tmp / MARKER).write_text(json.dumps({"identity": identity, "summary": summary}, indent=2) + "\n")
    tmp.replace(out)
    return {**summary, "cached": False}


def _disk_bytes(directory: Path) -> int:
    """Bytes the directory's files take on disk (allocated blocks, like ``du``)."""
    return sum(p.stat().st_blocks * 512 for p in Path(directory).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- runner


def _modegpt_command() -> list[str]:
    script = Path(sys.executable).parent / "modegpt"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from modegpt_jax.cli import main; sys.exit(main())"]


_RUSAGE_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)"
)


def _portable(cmd: list[str], workdir: Path) -> list[str]:
    """``cmd`` as recorded in the results: ``modegpt`` for the executable, work-directory paths by name."""
    start = cmd.index("compress")
    return ["modegpt"] + [a[len(str(workdir)) + 1:] if a.startswith(str(workdir) + os.sep) else a
                          for a in cmd[start:]]


def run_measured(cmd: list[str], log_lines: int = 40, env: dict | None = None) -> dict[str, Any]:
    """Run ``cmd``, echoing its output; its wall time, peak RSS (KiB, from /usr/bin/time -v or getrusage)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss", delete=False) as f:
        rss_file = f.name
    time_bin = shutil.which("time", path="/usr/bin:/bin")
    if time_bin:
        full = [time_bin, "-v", "-o", rss_file, *cmd]
    else:
        full = [sys.executable, "-c", _RUSAGE_WRAPPER, rss_file, *cmd]
    tail: list[str] = []
    start = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.strip():
            continue  # progress bars redraw with carriage returns, read here as empty lines
        sys.stdout.write("    | " + line)
        sys.stdout.flush()
        tail = (tail + [line.rstrip("\n")])[-log_lines:]
    rc = proc.wait()
    wall = time.perf_counter() - start
    text = Path(rss_file).read_text()
    os.unlink(rss_file)
    rss_kib = None
    if time_bin:
        for line in text.splitlines():
            if "Maximum resident set size" in line:
                rss_kib = int(line.rsplit(":", 1)[1])
    elif text.strip():
        rss_kib = int(text)
    return {"returncode": rc, "wall_seconds": round(wall, 2), "peak_rss_kib": rss_kib, "output_tail": tail}


def _fmt(value, spec: str) -> str:
    """``value`` formatted, or "-" right-aligned to the same width."""
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def _parse_layers(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--layers needs positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help=f"model shape: {', '.join(PUBLIC_SHAPES)} (default: llama-2-7b; "
                             "llama-3-70b with --per-layer-only)")
    parser.add_argument("--layers", type=_parse_layers, default=None,
                        help="comma-separated numbers of blocks to write and compress (default: 2,4,8)")
    parser.add_argument("--full", action="store_true", help="all layers of the shape (one run)")
    parser.add_argument("--per-layer-only", action="store_true",
                        help="for models too big to run many layers of: --layers 1,2 (shape llama-3-70b "
                             "unless --shape is given)")
    parser.add_argument("--mesh", action="append", default=None,
                        help="run every N on this mesh (repeatable), e.g. --mesh data=8 --mesh data=2,model=4")
    parser.add_argument("--devices", type=int, default=None,
                        help="simulated CPU devices for the child process (XLA_FLAGS); not for real accelerators")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=1024)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "modegpt-scale"),
                        help="where checkpoints, outputs and the cached tokenizer go (default: %(default)s)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and compressed outputs")
    parser.add_argument("--dry-run", action="store_true",
                        help="only write the checkpoints (kept) and print their sizes")
    parser.add_argument("--extra-args", default="",
                        help='passed through to modegpt compress, e.g. "--dtype bfloat16 --mesh data=2,model=4"')
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--json", default=str(DEFAULT_JSON),
                        help="results file; each shape/mode is stored under its own key (default: %(default)s)")
    parser.add_argument("--key", default=None,
                        help="the key in the results file (default: the shape, plus /per-layer or /mesh)")
    args = parser.parse_args(argv)

    shape_name = args.shape or ("llama-3-70b" if args.per_layer_only else "llama-2-7b")
    shape = SHAPES[shape_name]
    if args.full:
        layer_counts = [shape.layers]
    elif args.per_layer_only:
        layer_counts = args.layers or [1, 2]
    else:
        layer_counts = args.layers or [2, 4, 8]
    too_many = [n for n in layer_counts if n > shape.layers]
    if too_many:
        parser.error(f"{shape_name} has {shape.layers} layers; --layers asks for {too_many}")
    workdir = Path(args.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.extra_args)

    print(f"shape {shape_name}: hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / "
          f"{shape.kv_heads} KV, MLP {shape.mlp}, vocab {shape.vocab} ({shape.model_type})")
    print(f"layers {layer_counts}, workdir {workdir}, {platform.machine()} with {os.cpu_count()} CPUs")

    env = None
    if args.devices:
        env = dict(os.environ)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    meshes = args.mesh or [None]
    rows = []
    for n, mesh in [(n, m) for n in layer_counts for m in meshes]:
        ckpt_dir = workdir / f"{shape_name}-L{n}"
        print(f"\n== {shape_name}, {n} layer(s): writing {checkpoint_bytes(shape, n) / 2**30:.2f} GiB of weights "
              f"to {ckpt_dir}", flush=True)
        info = write_checkpoint(shape_name, ckpt_dir, n, seed=args.seed, tokenizer_cache=workdir / "tokenizer")
        how = "already there" if info["cached"] else f"written in {info['write_seconds']:.1f} s"
        print(f"   {info['parameters']:,} parameters, {info['shards']} shard(s), "
              f"{info['bytes_on_disk'] / 2**30:.2f} GiB on disk ({how})", flush=True)
        # recorded without this machine's paths: directories by name (relative to the work directory)
        row: dict[str, Any] = {"layers": n, "mesh": mesh, "devices": args.devices,
                               "checkpoint": {**info, "directory": ckpt_dir.name}}
        rows.append(row)
        if args.dry_run:
            continue
        out = workdir / f"{shape_name}-L{n}-out"
        # A whole run is measured: a run killed earlier must not be resumed from.
        shutil.rmtree(out.parent / f".{out.name}.resume", ignore_errors=True)
        cmd = [*_modegpt_command(), "compress", "--model", str(ckpt_dir), "--ratio", str(args.ratio),
               "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
               "--output", str(out), "--overwrite", *(["--mesh", mesh] if mesh else []), *extra]
        print("   $ " + ("" if env is None else f"XLA_FLAGS='{env['XLA_FLAGS'].strip()}' ") + shlex.join(cmd),
              flush=True)
        run = run_measured(cmd, env=env)
        row.update(command=_portable(cmd, workdir), returncode=run["returncode"], wall_seconds=run["wall_seconds"],
                   peak_rss_gib=None if run["peak_rss_kib"] is None else round(run["peak_rss_kib"] / 2**20, 3))
        report_path = out / "report.json"
        if run["returncode"] == 0 and report_path.is_file():
            report = json.loads(report_path.read_text())
            layer_secs = [x["seconds"] for x in report.get("layers", []) if "seconds" in x]
            timings = report.get("timings_seconds", {})
            row.update(timings_seconds=timings, layer_seconds=layer_secs,
                       median_layer_seconds=statistics.median(layer_secs) if layer_secs else None,
                       compile_seconds=timings.get("compile"),
                       achieved_block_ratio=report.get("achieved_block_ratio"),
                       peak_bytes_per_device=report.get("devices", {}).get("peak_bytes_per_device"),
                       device=report.get("devices", {}).get("kind"),
                       device_peak_gib=None if report.get("memory", {}).get("device_peak_bytes") is None
                       else round(report["memory"]["device_peak_bytes"] / 2**30, 3))
        else:
            row["error_tail"] = run["output_tail"][-15:]
            print(f"   modegpt compress failed (exit code {run['returncode']})", flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.parent / f".{out.name}.resume", ignore_errors=True)
            if mesh == meshes[-1]:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    if args.dry_run:
        print(f"\n{'shape':12} {'N':>3} {'params':>15} {'shards':>6} {'GiB on disk':>11} {'write s':>8}")
        for r in rows:
            c = r["checkpoint"]
            print(f"{shape_name:12} {r['layers']:>3} {c['parameters']:>15,} {c['shards']:>6} "
                  f"{c['bytes_on_disk'] / 2**30:>11.2f} {c['write_seconds']:>8.1f}")
        return 0

    rss = [r["peak_rss_gib"] for r in rows if r.get("returncode") == 0 and r.get("peak_rss_gib")
           and r.get("mesh") == meshes[0]]
    flat = None if len(rss) < 2 else max(rss) / min(rss) <= 1.05
    print(f"\n{'shape':12} {'N':>3} {'mesh':>16} {'peak RSS GiB':>12} {'wall s':>8} {'s/layer (median)':>17} "
          f"{'compile s':>9} {'block MiB/dev':>13} {'stats MiB/dev':>13} {'device peak GiB':>15}")
    for r in rows:
        per_dev = r.get("peak_bytes_per_device") or {}
        mib = {k: None if per_dev.get(k) is None else per_dev[k] / 2**20 for k in ("block", "statistics")}
        print(f"{shape_name:12} {r['layers']:>3} {r.get('mesh') or 'default':>16} "
              f"{_fmt(r.get('peak_rss_gib'), '12.2f')} "
              f"{_fmt(r.get('wall_seconds'), '8.1f')} {_fmt(r.get('median_layer_seconds'), '17.2f')} "
              f"{_fmt(r.get('compile_seconds'), '9.1f')} {_fmt(mib['block'], '13.1f')} "
              f"{_fmt(mib['statistics'], '13.1f')} {_fmt(r.get('device_peak_gib'), '15.2f')}"
              + ("" if r.get("returncode") == 0 else f"  FAILED (exit {r.get('returncode')})"))
    if flat is None:
        print("RSS flat in N: not enough successful runs to say")
    else:
        print(f"RSS flat in N (max/min within 5%): {'yes' if flat else 'no'} "
              f"(max/min = {max(rss) / min(rss):.3f})")
    for r in rows:
        if r.get("timings_seconds"):
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["timings_seconds"].items())
            print(f"  N={r['layers']}{'' if not r.get('mesh') else ', ' + r['mesh']}: {phases}")

    key = args.key or f"{shape_name}{'/per-layer' if args.per_layer_only else ''}{'/mesh' if args.mesh else ''}"
    result = {
        "shape": shape_name, "dims": dataclasses.asdict(shape),
        "settings": {"ratio": args.ratio, "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen,
                     "extra_args": extra, "seed": args.seed, "meshes": args.mesh, "devices": args.devices},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": rows, "rss_flat_within_5pct": flat,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"written to {update_results(args.json, result, key)} (key {key!r})")
    return 0 if all(r.get("returncode") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
