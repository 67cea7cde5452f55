"""The MoDeGPT pipeline: the one place that knows the order of work.

1. Embed the calibration tokens.
2. Dense pass for block influence (``BI_l = 1 - mean cos(h_l, h_(l+1))``), then the per-layer sparsity.
3. Layer by layer, on hidden states that came out of the already-compressed layers below: statistics of the
   attention input (``C`` and the Q/K channel energies) -> key-query CR selection and value-output SVD ->
   run the compressed attention -> statistics of the MLP intermediate (``C_s``) -> Nystrom MLP -> run the
   compressed MLP -> next layer.

What is resident does not grow with depth: one dense block (from a :class:`LayerSource`: a checkpoint streamed
tensor by tensor, or a model already in memory), one set of calibration hidden states (each pass replaces a
batch's array by its successor; on accelerators they are parked in host memory when they would crowd the device,
see :mod:`modegpt_jax.activations`) and the current layer's statistics. A finished compressed block goes to the
staging directory (:mod:`modegpt_jax.staging`) and leaves memory; :func:`compress_streamed` returns where they
are, and the Hugging Face directory is assembled from them (:func:`converters.hf_export.save_staged_model`).
:func:`compress` keeps small models' blocks in memory instead and returns the model itself.
Every stage is also usable alone: :mod:`modegpt_jax.stats`, :mod:`modegpt_jax.decompose` (applied to a block's
modules by :mod:`modegpt_jax.block_compression`), :mod:`modegpt_jax.reconstruction`, :mod:`modegpt_jax.allocation`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from modegpt_jax import allocation as alloc
from modegpt_jax import decompose, reconstruction, sharding, staging, stats
from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.activations import HiddenStates, should_park
from modegpt_jax.block_compression import bucketed_attention, bucketed_mlp, compress_attention, compress_mlp, zero_pad
from modegpt_jax.mesh import MODEL, batch_sharding, bytes_per_device, make_mesh, shard_batch, to_compute_device
from modegpt_jax.model import Block, Transformer, count_params, scale_embeddings
from modegpt_jax.resume import ResumeState, fingerprint

log = logging.getLogger("modegpt_jax")


@dataclasses.dataclass(frozen=True)
class CompressionSettings:
    """Everything that decides the result of a compression run (recorded in the report)."""

    ratio: float
    allocation: str = "bi"  # "bi" (block influence) or "uniform"
    allocation_eps: float = alloc.DEFAULT_EPS
    max_sparsity: float = alloc.DEFAULT_MAX_SPARSITY
    leverage_alpha: float = decompose.DEFAULT_LEVERAGE_ALPHA
    # Key-query and value-output lose this times the layer's sparsity and the MLP makes up the rest; 1.0 is the
    # paper's rule of one fraction for all three modules. Deviation, tuned on the validation split (SmolLM2-135M,
    # ratio 0.3): per parameter removed the attention modules cost about 3x more perplexity than the MLP, and 0.25
    # gives 44.5 validation perplexity against 60.3 for 1.0 (benchmarks/results/tune.json). See
    # allocation.split_block_sparsity.
    attention_scale: float = 0.25
    width_multiple: int = 1
    batch_size: int = 8  # calibration sequences per device step (all processes together)
    # Sequences used for block influence (a token mean of cosines: a few thousand tokens estimate it well);
    # None = all.
    bi_samples: int | None = 16
    precision64: bool | None = None  # decompositions in float64 (None: unless on TPU)
    # Calibration hidden states between passes: float32, or bfloat16 to halve them (statistics stay float32).
    activation_dtype: str = "float32"
    # Hidden states parked in host memory between uses; None: only when they would crowd an accelerator.
    activations_on_host: bool | None = None
    # Matmuls of the calibration passes: "highest" (float32) or the backend's "default" (a single bfloat16 pass on
    # TPU, TF32 on recent GPUs). The statistics themselves always multiply at HIGHEST and sum in float32.
    matmul_precision: str = "highest"
    # Key-query in models with per-head q/k norms (Qwen3, Gemma 3), whose norm covers the whole head:
    # "whole" leaves it uncompressed (its share of the budget goes to value-output and the MLP); "corrected"
    # keeps the pairs with the most post-norm energy and normalises over the kept channels with a per-head gain
    # folded into the norm weight (corrected_qk_norms). "whole" won on Gemma 3 270M's validation split at ratio
    # 0.3 (benchmarks/results/qk_norm.json).
    qk_norm_mode: str = "whole"
    # The MLP's kept width is padded (with exact zeros) up to one of this many evenly spaced sizes in the refit and
    # the calibration passes, so layers whose widths share a size share compilations. None: 16 on CPU, 4 on GPUs
    # and TPUs, where a compilation costs more than the padded work (a new MLP size cost ~25 s per layer on an
    # H200 with Llama-2-7B shapes, against ~1 s of extra matmuls at 4).
    width_buckets: int | None = None

    def mlp_buckets(self) -> int:
        """:attr:`width_buckets`, or the backend's default."""
        if self.width_buckets is not None:
            return self.width_buckets
        return 16 if jax.default_backend() == "cpu" else 4

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"ratio must be in (0, 1), got {self.ratio}", argument="ratio")
        if self.allocation not in ("bi", "uniform"):
            raise UserError(f"allocation must be 'bi' or 'uniform', got {self.allocation!r}", argument="allocation")
        if self.ratio > self.max_sparsity:
            raise UserError(f"ratio {self.ratio} exceeds the maximum per-layer sparsity max_sparsity "
                            f"{self.max_sparsity}", argument=("ratio", "max_sparsity"))
        if self.attention_scale < 0:
            raise UserError(f"attention_scale must be >= 0, got {self.attention_scale}", argument="attention_scale")
        if self.activation_dtype not in ("float32", "bfloat16"):
            raise UserError(f"activation_dtype must be float32 or bfloat16, got {self.activation_dtype!r}",
                            argument="activation_dtype")
        if self.matmul_precision not in ("highest", "default"):
            raise UserError(f"matmul_precision must be highest or default, got {self.matmul_precision!r}",
                            argument="matmul_precision")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {self.batch_size}", argument="batch_size")
        if self.qk_norm_mode not in ("whole", "corrected"):
            raise UserError(f"qk_norm_mode must be whole or corrected, got {self.qk_norm_mode!r}",
                            argument="qk_norm_mode")
        if self.width_buckets is not None and self.width_buckets < 1:
            raise UserError(f"width_buckets must be at least 1, got {self.width_buckets}", argument="width_buckets")


class LayerSource(Protocol):
    """Where the dense model comes from, one block at a time."""

    config: ModelConfig

    def load_block(self, layer: int, mesh: jax.sharding.Mesh | None = None) -> Block:
        """Block ``layer``, its weights placed on ``mesh`` as :mod:`modegpt_jax.sharding` says."""

    def load_shell(self, cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Transformer:
        """A model of ``cfg`` with the dense embeddings, final norm and head (on ``mesh``) and abstract blocks."""


class InMemorySource:
    """A :class:`LayerSource` over a model that is already in memory (the Python API)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.config = model.config

    def load_block(self, layer: int, mesh: jax.sharding.Mesh | None = None) -> Block:
        block = self.model.layers[layer]
        return block if mesh is None else sharding.place(nnx.clone(block), mesh)  # the caller's model unchanged

    def load_shell(self, cfg: ModelConfig, mesh: jax.sharding.Mesh | None = None) -> Transformer:
        shell = nnx.eval_shape(lambda: Transformer(cfg, dtype=self.model.dtype, rngs=nnx.Rngs(0)))
        copy_top_level(self.model, shell)
        return shell if mesh is None else sharding.place(nnx.clone(shell), mesh)  # the caller's model unchanged


def copy_top_level(src: Transformer, dst: Transformer) -> None:
    """Embeddings, final norm and head of ``src`` into ``dst`` (same family; blocks untouched)."""
    dst.embed_tokens = src.embed_tokens
    dst.embed_positions = src.embed_positions
    dst.final_norm = src.final_norm
    dst.lm_head = src.lm_head


# -- jitted passes over one calibration batch ------------------------------------------------------------------
# Modules enter as (graphdef, state): the graphdef is static, so blocks of equal shapes share one compilation.
# The hidden states are donated: each pass's output takes the place of its input. On a mesh the weights arrive
# sharded (modegpt_jax.sharding), hidden states leave every pass split over "data" only, and Gram matrices are
# summed with their rows split over "model" when it has several devices (no device holds a whole one).
def _hidden(h, mesh):
    return jax.lax.with_sharding_constraint(h, batch_sharding(mesh, h.ndim))


def _gram(x, mesh):
    model = mesh.shape[MODEL]
    return stats.gram(x, mesh=mesh, shard_model=model > 1 and x.shape[-1] % model == 0)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"))
def _attention_statistics(graphdef, state, h, *, mesh):
    """``C`` of the attention input and the pre-RoPE query/key channel energies of one batch."""
    block = nnx.merge(graphdef, state)
    x = block.attn_norm(h)
    q, k = block.attn.project_qk(x)
    return {"C": _gram(x, mesh), "E_q": stats.channel_energy(q, mesh=mesh),
            "E_k": stats.channel_energy(k, mesh=mesh)}


@functools.partial(jax.jit, static_argnames=("block_def", "attn_def", "mesh"), donate_argnames=("h",))
def _attention_pass(block_def, block_state, attn_def, attn_state, h, positions, *, mesh):
    """The compressed attention's residual ``h_mid`` (in the hidden states' dtype) and ``C_s`` of the dense MLP
    intermediate on it; the intermediate itself never leaves the step."""
    dense, attn = nnx.merge(block_def, block_state), nnx.merge(attn_def, attn_state)
    h_mid = _hidden((h + dense.attention_branch(h, positions, None, attn=attn)).astype(h.dtype), mesh)
    return h_mid, _gram(dense.mlp.intermediate(dense.mlp_norm(h_mid)), mesh)


@functools.partial(jax.jit, static_argnames=("block_def", "mlp_def", "mesh"), donate_argnames=("h_mid",))
def _mlp_pass(block_def, block_state, mlp_def, mlp_state, h_mid, *, mesh):
    """``h_mid + MLP'(norm(h_mid))`` with the compressed MLP: the block's output, recomputed from ``h_mid`` so
    no batch's intermediate has to be kept while the MLP statistics are gathered. Of the dense block only the
    norms are used."""
    block, mlp = nnx.merge(block_def, block_state), nnx.merge(mlp_def, mlp_state)
    return _hidden((h_mid + block.mlp_branch(h_mid, mlp=mlp)).astype(h_mid.dtype), mesh)


@functools.partial(jax.jit, static_argnames=("graphdef", "mesh"), donate_argnames=("h",))
def _influence_pass(graphdef, state, h, positions, *, mesh):
    """The dense block's output and ``sum cos(h_in, h_out)`` of one batch (block influence)."""
    h_out = _hidden(nnx.merge(graphdef, state)(h, positions).astype(h.dtype), mesh)
    return h_out, stats.cosine_sum(h, h_out, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("mesh", "dtype", "cfg"))
def _embed_arrays(table, position_table, tokens, positions, offset, *, mesh, dtype, cfg):
    h = scale_embeddings(jnp.take(table, tokens, axis=0), cfg)
    if position_table is not None:
        h = h + jnp.take(position_table, positions + offset, axis=0)
    return _hidden(h.astype(dtype), mesh)


def _embed(shell: Transformer, tokens, positions, mesh, dtype):
    """Token (and learned position) embeddings; the shell's abstract blocks never enter the jit."""
    pos_table = None if shell.embed_positions is None else shell.embed_positions[...]
    return _embed_arrays(shell.embed_tokens[...], pos_table, tokens, positions, shell.config.position_offset,
                         mesh=mesh, dtype=jnp.dtype(dtype), cfg=shell.config)


# -- widths ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)  # plan_widths asks for the same shapes on every step of its search
def block_param_count(cfg: ModelConfig, spec: LayerSpec) -> int:
    """Parameters of one block of these widths (from shapes alone; nothing is allocated)."""
    return count_params(nnx.eval_shape(lambda: Block(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0))))


@functools.lru_cache(maxsize=4096)
def module_param_counts(cfg: ModelConfig, spec: LayerSpec) -> tuple[int, int]:
    """(attention, MLP) parameters of one block, from shapes alone."""
    block = nnx.eval_shape(lambda: Block(cfg, spec, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return count_params(block.attn), count_params(block.mlp)


def plan_layers(dense: ModelConfig, sparsity: np.ndarray, settings: CompressionSettings) -> list[LayerSpec]:
    """Per-layer widths for the given per-layer sparsities (RoPE pairs are chosen later, per layer)."""
    specs = []
    for i, phi in enumerate(sparsity):
        attn_params, mlp_params = module_param_counts(dense, dense.layers[i])
        phi_attn, phi_mlp = alloc.split_block_sparsity(float(phi), settings.attention_scale, attn_params, mlp_params)
        kw = dict(rope=dense.use_rope, multiple=settings.width_multiple)
        mlp, _, _ = alloc.layer_widths(phi_mlp, dense.intermediate_size, dense.head_dim, **kw)
        _, qk, vo = alloc.layer_widths(phi_attn, dense.intermediate_size, dense.head_dim, **kw)
        if dense.qk_norm and settings.qk_norm_mode == "whole":  # plan_widths makes up the budget elsewhere
            qk = dense.head_dim
        specs.append(LayerSpec(mlp, qk, vo, None, dense.layers[i].sliding_window))
    return specs


def plan_widths(dense: ModelConfig, out: ModelConfig, settings: CompressionSettings,
                bi: np.ndarray | None) -> tuple[np.ndarray, list[LayerSpec], dict[str, int]]:
    """Sparsities and widths whose decoder-block parameters shrink by at least ``settings.ratio``.

    Widths are whole channels and norms (and biases) do not shrink, so the allocation's own average is raised
    in small steps until the achieved block ratio is at or above the target.
    """
    before = sum(block_param_count(dense, spec) for spec in dense.layers)
    aim = settings.ratio
    for _ in range(200):
        if settings.allocation == "bi":
            phi = alloc.allocate_sparsity(bi, aim, eps=settings.allocation_eps,
                                               max_sparsity=settings.max_sparsity)
        else:
            phi = alloc.uniform_sparsity(dense.num_layers, aim)
        specs = plan_layers(dense, phi, settings)
        after = sum(block_param_count(out, spec) for spec in specs)
        if 1.0 - after / before >= settings.ratio:
            return phi, specs, {"block_params_before": before, "block_params_after": after}
        aim = min(aim + 0.0025, settings.max_sparsity)
    raise UserError(
        f"cannot reach ratio {settings.ratio} with max sparsity {settings.max_sparsity} and width multiple "
        f"{settings.width_multiple}: lower the ratio or the multiple"
    )


# -- the pipeline ------------------------------------------------------------------------------------------------
class _CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, summed over the process (for the report)."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    seconds = 0.0
    _registered = False

    @classmethod
    def now(cls) -> float:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True
        return cls.seconds

    @classmethod
    def _listen(cls, event: str, duration: float, **_: Any) -> None:
        if event in cls.EVENTS:
            cls.seconds += duration


class _Phases:
    """Seconds spent in each phase of one layer, measured to the moment the phase's results are ready (the
    dispatch is asynchronous, so a phase is timed up to ``jax.block_until_ready`` of what it produced)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str, *outputs: Any) -> None:
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now


def _device_peak_bytes() -> int | None:
    """The most bytes any local device has held so far, where the backend reports it (GPUs, TPUs; not CPUs)."""
    try:
        peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    except Exception:
        return None
    return int(max(peaks)) if peaks and all(p is not None for p in peaks) else None


def _peak_memory() -> dict[str, int]:
    """Peak resident memory of this process and, where the backend reports it, of each local device."""
    import resource

    out = {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    device_peak = _device_peak_bytes()
    if device_peak is not None:
        out["device_peak_bytes"] = device_peak
    return out


def _batches(tokens: np.ndarray, batch_size: int, data_shards: int) -> list[np.ndarray]:
    n = len(tokens)
    local_shards = max(1, data_shards // jax.process_count())
    if n % local_shards:
        raise UserError(
            f"{n} calibration sequences per process cannot be split over {local_shards} local data shards: "
            "use a multiple of the data axis size for --calib-samples"
        )
    per_process = max(local_shards, (batch_size // jax.process_count()) // local_shards * local_shards)
    return [tokens[i : i + per_process] for i in range(0, n, per_process)]


class _Calibration:
    """The calibration batches as token rows on the mesh; hidden states are made from them when needed."""

    def __init__(self, shell: Transformer, tokens: np.ndarray, settings: CompressionSettings, mesh):
        self.shell, self.mesh = shell, mesh
        self.hidden_size = shell.config.hidden_size
        self.dtype = jnp.dtype(settings.activation_dtype)
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        self.tokens, self.positions = [], []
        for rows in _batches(tokens, settings.batch_size, mesh.shape["data"]):
            self.tokens.append(shard_batch(rows, mesh))
            self.positions.append(shard_batch(positions[: len(rows)], mesh))

    def __len__(self) -> int:
        return len(self.tokens)

    def embed(self, j: int) -> jax.Array:
        if self.shell is None:
            raise RuntimeError("the embeddings were released (release_embeddings)")
        return _embed(self.shell, self.tokens[j], self.positions[j], self.mesh, self.dtype)

    def release_embeddings(self) -> None:
        """Drop the model's top level (embeddings, final norm, head) once every batch has been embedded: it is
        not needed again until the output is assembled, and for a 7B model it is 1 GB in float32."""
        self.shell = None

    def bytes_per_device(self) -> int:
        rows = sum(t.shape[0] for t in self.tokens) // self.mesh.shape["data"]
        return rows * self.tokens[0].shape[1] * self.hidden_size * self.dtype.itemsize


def block_influence(source: LayerSource, calib: _Calibration, settings: CompressionSettings, mesh, progress: bool):
    """``BI_l = 1 - mean cos(h_l, h_(l+1))`` on a dense pass over the first ``settings.bi_samples`` sequences."""
    rows = calib.tokens[0].shape[0]  # global sequences per batch
    n_bi = len(calib) if settings.bi_samples is None else min(len(calib), max(1, -(-settings.bi_samples // rows)))
    hs = [calib.embed(j) for j in range(n_bi)]
    sums, counts = [], []
    for i in tqdm(range(source.config.num_layers), desc="block influence", unit="layer", disable=not progress):
        graphdef, state = nnx.split(source.load_block(i, mesh=mesh))
        acc = stats.Accumulator()
        for j in range(n_bi):
            hs[j], cos = _influence_pass(graphdef, state, hs[j], calib.positions[j], mesh=mesh)
            acc.add("cos", cos)
        del state
        cos = acc.finalize(where=f"layer {i}")["cos"]
        sums.append(float(cos.total))
        counts.append(float(cos.count))
    return alloc.block_importance(sums, counts)


@dataclasses.dataclass
class CompressionResult:
    """What a compression run produced: the compressed configuration, the dense model's top level (embeddings,
    final norm, head; its blocks are shapes only), the report, and where the compressed blocks are: in memory,
    or one file per layer in ``staging_dir`` (see :mod:`modegpt_jax.staging`)."""

    config: ModelConfig
    shell: Transformer
    report: dict
    staging_dir: Path | None = None
    blocks: dict[int, Block] | None = None

    def block(self, layer: int) -> Block:
        if self.blocks is not None:
            return self.blocks[layer]
        return staging.read_block(self.staging_dir, layer, self.config, self.config.layers[layer], self.shell.dtype)

    def load_model(self) -> Transformer:
        """The whole compressed model in memory (for models that fit)."""
        model = nnx.eval_shape(lambda: Transformer(self.config, dtype=self.shell.dtype, rngs=nnx.Rngs(0)))
        copy_top_level(self.shell, model)
        model.layers = nnx.List([self.block(i) for i in range(self.config.num_layers)])
        return model


def compress(source: LayerSource | Transformer, tokens: np.ndarray, settings: CompressionSettings, *,
             mesh: jax.sharding.Mesh | None = None, progress: bool = True,
             layer_specs: list[LayerSpec] | None = None, resume_dir: str | Path | None = None,
             on_layer: Callable[[dict], None] | None = None) -> tuple[Transformer, dict]:
    """Compress a model with MoDeGPT on calibration ``tokens`` [N, L] (this process's rows) and return the
    compressed model, in memory, with the report. For models whose compressed blocks should not all be in
    memory at once, use :func:`compress_streamed`.

    ``layer_specs`` overrides the allocation with explicit per-layer widths (their ``rope_pairs`` are ignored:
    the CR selection chooses them; so is ``sliding_window``: it is the model's); ``settings.ratio`` is then only
    recorded.

    ``resume_dir``: stage every finished layer there (its block, the hidden states after it; see
    :mod:`modegpt_jax.resume`), and resume from it when it holds an unfinished run of the same configuration;
    the caller deletes it once the result is safely stored.

    The report holds target and achieved ratios, parameter counts, per-layer block influence, sparsity, widths,
    reconstruction errors and seconds, the time of each phase, compile time and peak memory.
    """
    settings.validate()
    with jax.default_matmul_precision(settings.matmul_precision):
        result = _run(source, tokens, settings, mesh=mesh, progress=progress, layer_specs=layer_specs,
                      staging_dir=resume_dir, on_layer=on_layer)
    return result.load_model(), result.report


def compress_streamed(source: LayerSource | Transformer, tokens: np.ndarray, settings: CompressionSettings,
                      staging_dir: str | Path, *, mesh: jax.sharding.Mesh | None = None, progress: bool = True,
                      layer_specs: list[LayerSpec] | None = None,
                      on_layer: Callable[[dict], None] | None = None) -> CompressionResult:
    """:func:`compress` for models of any size: every finished block is written to ``staging_dir`` and leaves
    memory, so what is resident does not grow with depth. The run resumes from ``staging_dir`` when it holds an
    unfinished run of the same configuration. Write the result with
    :func:`converters.hf_export.save_staged_model`, or ``result.load_model()`` when it fits in memory."""
    settings.validate()
    with jax.default_matmul_precision(settings.matmul_precision):
        return _run(source, tokens, settings, mesh=mesh, progress=progress, layer_specs=layer_specs,
                    staging_dir=staging_dir, on_layer=on_layer)


def _plan(source, dense, out_cfg, calib, settings, layer_specs, resume, mesh, progress, timings):
    """Per-layer sparsities, widths and parameter counts: from the resume state, explicit specs or the
    allocation (block influence first when it needs it)."""
    if resume is not None and "plan" in resume.state:
        plan = resume.state["plan"]
        timings.update(resume.state.get("timings", {}))
        log.info("resuming from %s: %d of %d layers already compressed", resume.directory,
                 resume.finished_layers, dense.num_layers)
        return (None if plan["bi"] is None else np.asarray(plan["bi"]), np.asarray(plan["sparsity"]),
                [LayerSpec.from_dict(x) for x in plan["specs"]], plan["counts"])
    bi = None
    if settings.allocation == "bi" and layer_specs is None:
        t = time.perf_counter()
        bi = block_influence(source, calib, settings, mesh, progress)
        timings["block_influence"] = time.perf_counter() - t
    if layer_specs is None:
        phi, specs, counts = plan_widths(dense, out_cfg, settings, bi)
    else:
        if len(layer_specs) != dense.num_layers:
            raise UserError(f"layer_specs has {len(layer_specs)} entries for a model of {dense.num_layers} layers")
        # widths only: the kept pairs are chosen per layer, and the attention window belongs to the model
        specs = [dataclasses.replace(x, rope_pairs=None, sliding_window=d.sliding_window)
                 for x, d in zip(layer_specs, dense.layers)]
        out_cfg.with_layers(specs).validate()  # widths the model can take, before any work
        if dense.qk_norm and settings.qk_norm_mode == "whole" and any(x.qk_dim < dense.head_dim for x in specs):
            raise UserError("layer_specs compress key-query (qk_dim < head_dim) in a model with q/k norms, where "
                            "qk_norm_mode='whole' keeps it whole: set qk_norm_mode='corrected' or qk_dim = "
                            f"head_dim = {dense.head_dim}", argument="qk_norm_mode")
        before = sum(block_param_count(dense, x) for x in dense.layers)
        after = [block_param_count(out_cfg, x) for x in specs]
        phi = np.asarray([1.0 - a / block_param_count(dense, d) for a, d in zip(after, dense.layers)])
        counts = {"block_params_before": before, "block_params_after": sum(after)}
    if resume is not None:
        resume.write_state(
            plan={"bi": None if bi is None else bi.tolist(), "sparsity": phi.tolist(), "counts": counts,
                  "specs": [x.to_dict() for x in specs]},
            timings=timings,
        )
    return bi, phi, specs, counts


def _compress_layer(block: Block, hs: HiddenStates, calib: _Calibration, out_cfg: ModelConfig, spec: LayerSpec,
                    settings: CompressionSettings, mesh, where: str) -> tuple[Block, LayerSpec, dict, dict, dict]:
    """One layer: attention statistics -> key-query and value-output -> compressed attention over every batch
    (with the MLP statistics) -> Nystrom MLP -> compressed MLP over every batch. ``hs`` ends as the layer's
    output. The passes and error metrics run on width-bucketed copies of the compressed modules (exact zero
    padding), so layers of similar widths share compilations. Also returns the most bytes one device held of the
    dense block and of the largest statistic, and the seconds of each phase (:class:`_Phases`)."""
    clock = _Phases()
    graphdef, state = nnx.split(block)
    acc = stats.Accumulator()
    for j in range(len(hs)):
        acc.add("s", _attention_statistics(graphdef, state, hs.get(j), mesh=mesh))
    device_bytes = {"block": bytes_per_device(nnx.state(block)), "statistics": bytes_per_device(acc.get("s")["C"])}
    s = acc.finalize(where=where)["s"]
    clock.lap("attention_statistics", s)
    attn, spec, errors = compress_attention(block, out_cfg, spec, s["C"], s["E_q"], s["E_k"],
                                            precision64=settings.precision64)
    padded_attn = sharding.place(bucketed_attention(attn, out_cfg, spec), mesh)
    clock.lap("attention_decomposition", nnx.state(padded_attn))
    errors["vo"] = float(reconstruction.vo_relative_error(*map(to_compute_device, (
        s["C"], block.attn.v_proj.kernel[...], block.attn.o_proj.kernel[...], padded_attn.v_proj.kernel[...],
        padded_attn.o_proj.kernel[...])), out_cfg.num_heads))
    clock.lap("errors")
    del s

    attn_def, attn_state = nnx.split(padded_attn)
    acc = stats.Accumulator()
    for j in range(len(hs)):
        h_mid, c_s = _attention_pass(graphdef, state, attn_def, attn_state, hs.get(j), calib.positions[j], mesh=mesh)
        hs.set(j, h_mid)
        acc.add("C_s", c_s)
    del attn_state, padded_attn
    device_bytes["statistics"] = max(device_bytes["statistics"], bytes_per_device(acc.get("C_s")))
    C_s = acc.finalize(where=where)["C_s"]
    clock.lap("attention_pass", C_s)
    mlp, kept = compress_mlp(block, out_cfg, spec, C_s, alpha=settings.leverage_alpha,
                             precision64=settings.precision64, buckets=settings.mlp_buckets())
    padded_mlp = sharding.place(bucketed_mlp(mlp, out_cfg, spec, settings.mlp_buckets()), mesh)
    clock.lap("mlp_decomposition", nnx.state(padded_mlp))
    slots = padded_mlp.down_proj.kernel.shape[0]
    errors["mlp"] = float(reconstruction.mlp_relative_error(*map(to_compute_device, (  # zero rows add nothing
        C_s, block.mlp.down_proj.kernel[...], zero_pad(kept, 0, slots), padded_mlp.down_proj.kernel[...]))))
    clock.lap("errors")
    del C_s

    mlp_def, mlp_state = nnx.split(padded_mlp)
    for j in range(len(hs)):
        hs.set(j, _mlp_pass(graphdef, state, mlp_def, mlp_state, hs.get(j), mesh=mesh))
    clock.lap("mlp_pass", *(hs.get(j) for j in range(len(hs)) if not hs.on_host))

    new = nnx.eval_shape(lambda: Block(out_cfg, spec, dtype=block.attn_norm.weight.dtype, rngs=nnx.Rngs(0)))
    new.attn_norm, new.mlp_norm, new.attn, new.mlp = block.attn_norm, block.mlp_norm, attn, mlp
    new.attn_post_norm, new.mlp_post_norm = block.attn_post_norm, block.mlp_post_norm
    return new, spec, errors, device_bytes, clock.seconds


def _check_same_on_every_process(digest: str, layer: int) -> None:
    """Every process computed compressed block ``layer`` itself (the factorisations run on each process's own
    device from the same statistics); refuse to go on if the results differ anywhere."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
    differ = [p for p in range(len(every)) if not np.array_equal(every[p], every[0])]
    if differ:
        raise RuntimeError(f"layer {layer}: processes {differ} computed different compressed weights than process 0 "
                           "(checksums differ); the hosts must run the same software on the same kind of device")


def _run(source: LayerSource | Transformer, tokens: np.ndarray, settings: CompressionSettings, *, mesh, progress,
         layer_specs, staging_dir, on_layer) -> CompressionResult:
    settings.validate()
    if isinstance(source, Transformer):
        source = InMemorySource(source)
    dense = source.config
    if not dense.is_dense:
        log.warning("the model is already compressed; its current widths are the starting point")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(f"calibration tokens must be [samples, seqlen >= 2], got shape {tokens.shape}")
    n_tokens = tokens.size * jax.process_count()
    widest = max(dense.hidden_size, dense.intermediate_size)
    if n_tokens < widest:
        log.warning("only %d calibration tokens for statistics of width %d: the fits are underdetermined and "
                    "will not generalise (perplexity explodes); give at least %d tokens (--calib-samples x "
                    "--calib-seqlen), the default 64 x 512 is safe", n_tokens, widest, 4 * widest)
    mesh = mesh if mesh is not None else make_mesh(None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    compile0 = _CompileClock.now()

    # The compressed model's configuration: folding a value bias needs an output bias (Qwen2 has none).
    out_cfg = dataclasses.replace(dense, o_bias=dense.o_bias or dense.qkv_bias)
    shell = source.load_shell(dense, mesh=mesh)
    calib = _Calibration(shell, tokens, settings, mesh)
    on_host = settings.activations_on_host
    if on_host is None:
        on_host = should_park(calib.bytes_per_device())
    timings["embed"] = time.perf_counter() - t0

    resume = None
    if staging_dir is not None:
        resume = ResumeState(staging_dir, fingerprint(
            settings=dataclasses.asdict(settings), tokens=tokens, config=dense.to_json(), dtype=str(shell.dtype),
            mesh=dict(mesh.shape), processes=jax.process_count(),
            layer_specs=None if layer_specs is None else [x.to_dict() for x in layer_specs],
        ))
    bi, phi, specs, counts = _plan(source, dense, out_cfg, calib, settings, layer_specs, resume, mesh, progress,
                                   timings)

    t = time.perf_counter()
    start = 0 if resume is None else resume.finished_layers
    blocks: dict[int, Block] | None = None if resume is not None else {}
    final_specs, layer_reports = [], []
    for done in (resume.state["layers"] if start else []):
        final_specs.append(LayerSpec.from_dict(done["spec"]))
        layer_reports.append(done["report"])
    if start:
        abstract = [jax.ShapeDtypeStruct((len(tok_rows), tokens.shape[1], dense.hidden_size), calib.dtype,
                                         sharding=batch_sharding(mesh, 3)) for tok_rows in calib.tokens]
        hs = HiddenStates(resume.restore_hidden(start - 1, abstract), on_host=on_host)
    else:  # the embeddings become the first hidden states: nothing else keeps them
        hs = HiddenStates((calib.embed(j) for j in range(len(calib))), on_host=on_host)
    del shell  # the top level is read again for the result: the layers do not need it
    calib.release_embeddings()
    bar = tqdm(range(start, dense.num_layers), desc="compress", unit="layer", disable=not progress,
               initial=start, total=dense.num_layers)
    try:
        for i in bar:
            lt, compile_before = time.perf_counter(), _CompileClock.now()
            dense_block = source.load_block(i, mesh=mesh)
            load_seconds = round(time.perf_counter() - lt, 3)
            new, spec, errors, device_bytes, phases = _compress_layer(
                dense_block, hs, calib, out_cfg, specs[i], settings, mesh, where=f"layer {i}")
            del dense_block  # before the next layer's is read
            final_specs.append(spec)
            arrays = staging.block_arrays(new)
            digest = staging.checksum(arrays)
            _check_same_on_every_process(digest, i)
            if blocks is not None:
                blocks[i] = new
            else:
                staging.write_block(staging_dir, i, arrays)
            del new, arrays
            seconds = round(time.perf_counter() - lt, 3)
            phases = {"load": load_seconds, **phases}
            # the checksum, the check across processes and the staging write (in memory: keeping the block)
            phases["write"] = round(seconds - sum(phases.values()), 3)
            entry = {
                "layer": i,
                "block_influence": None if bi is None else float(bi[i]),
                "sparsity": float(phi[i]),
                "mlp_width": spec.mlp_width,
                "qk_dim": spec.qk_dim,
                "vo_dim": spec.vo_dim,
                "params_before": dict(zip(("attention", "mlp"), module_param_counts(dense, dense.layers[i]))),
                "params_after": dict(zip(("attention", "mlp"), module_param_counts(out_cfg, spec))),
                "errors": errors,
                "checksum": digest,
                "bytes_per_device": device_bytes,
                "seconds": seconds,
                # compilations happen inside the phases: their seconds are part of the phases' too
                "compile_seconds": round(_CompileClock.now() - compile_before, 3),
                "phase_seconds": phases,
                "device_peak_bytes": _device_peak_bytes(),
            }
            if resume is not None:
                # What resuming costs the run: the hidden states copied off for writing (the write itself overlaps
                # the next layer), stored in the entry as "resume_seconds".
                resume.save_layer(i, hs, {"spec": spec.to_dict(), "report": entry})
            layer_reports.append(entry)
            msg = (f"layer {i:>3}: sparsity {phi[i]:.3f}  mlp {spec.mlp_width}/{dense.intermediate_size}  "
                   f"qk {spec.qk_dim}/{dense.head_dim}  vo {spec.vo_dim}/{dense.head_dim}  |  rel. error "
                   f"mlp {errors['mlp']:.4f}  vo {errors['vo']:.4f}  qk score dropped {errors['qk_score_dropped']:.4f}"
                   f"  |  {entry['seconds']:.1f} s (compile {entry['compile_seconds']:.1f} s)"
                   + ("" if entry["device_peak_bytes"] is None
                      else f", device peak {entry['device_peak_bytes'] / 2**30:.1f} GiB"))
            log.info(msg)
            if progress:
                bar.write(msg)
            if on_layer is not None:
                on_layer(entry)
    finally:
        if resume is not None:
            resume.wait()  # the last hidden states are on disk and recorded, also when the run was interrupted
    del hs
    # On resume, the finished layers' own times count too.
    timings["compress"] = time.perf_counter() - t + sum(r["seconds"] for r in layer_reports[:start])
    timings["compile"] = _CompileClock.now() - compile0
    timings["total"] = time.perf_counter() - t0

    final_cfg = out_cfg.with_layers(final_specs)
    shell = source.load_shell(dense, mesh=mesh)
    total_before = count_params(shell)  # the dense shell's blocks are shapes only, but they count
    total_after = count_params(nnx.eval_shape(lambda: Transformer(final_cfg, dtype=shell.dtype, rngs=nnx.Rngs(0))))
    report = {
        "method": "MoDeGPT",
        "target_ratio": settings.ratio,
        "achieved_block_ratio": 1.0 - counts["block_params_after"] / counts["block_params_before"],
        "achieved_total_ratio": 1.0 - total_after / total_before,
        "params_before": int(total_before),
        "params_after": int(total_after),
        "block_params_before": int(counts["block_params_before"]),
        "block_params_after": int(counts["block_params_after"]),
        "settings": dataclasses.asdict(settings),
        "calibration": {"samples": int(len(tokens) * jax.process_count()), "seqlen": int(tokens.shape[1])},
        "devices": {"mesh": dict(mesh.shape), "processes": jax.process_count(),
                    "kind": jax.local_devices()[0].device_kind, "platform": jax.default_backend(),
                    "activations_on_host": bool(on_host),
                    # the most one device held of a dense block's weights and of one layer's Gram matrices
                    "peak_bytes_per_device": {k: max((r.get("bytes_per_device", {}).get(k, 0) for r in layer_reports),
                                                     default=0) for k in ("block", "statistics")}},
        "layers": layer_reports,
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
        "memory": _peak_memory(),
    }
    return CompressionResult(final_cfg, shell, report, None if blocks is not None else Path(staging_dir), blocks)
