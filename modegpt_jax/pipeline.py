"""The MoDeGPT pipeline: the one place that knows the order of work.

1. Embed the calibration tokens.
2. Dense pass for block influence (``BI_l = 1 - mean cos(h_l, h_(l+1))``), then the per-layer sparsity.
3. Layer by layer, on hidden states that came out of the already-compressed layers below: statistics of the
   attention input (``C`` and the Q/K channel energies) -> key-query CR selection and value-output SVD ->
   run the compressed attention -> statistics of the MLP intermediate (``C_s``) -> Nystrom MLP -> run the
   compressed MLP -> next layer.

Only one dense block is resident at a time: blocks come from a :class:`LayerSource` (a checkpoint streamed
tensor by tensor, or a model already in memory). Compressed blocks are kept on the host until the end.
Every stage is also usable alone: :mod:`modegpt_jax.stats`, :mod:`modegpt_jax.decompose`,
:mod:`modegpt_jax.allocation`.
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
from modegpt_jax import decompose, stats
from modegpt_jax.config import LayerSpec, ModelConfig
from modegpt_jax.errors import UserError
from modegpt_jax.mesh import make_mesh, shard_batch
from modegpt_jax.model import MLP, Attention, Block, Transformer, count_params, run_block
from modegpt_jax.resume import ResumeState, fingerprint
from modegpt_jax.rope import kept_pair_frequencies

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

    def validate(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio must be in (0, 1), got {self.ratio}")
        if self.allocation not in ("bi", "uniform"):
            raise UserError(f"--allocation must be 'bi' or 'uniform', got {self.allocation!r}")
        if self.ratio > self.max_sparsity:
            raise UserError(f"--ratio {self.ratio} exceeds the maximum per-layer sparsity {self.max_sparsity}")
        if self.attention_scale < 0:
            raise UserError(f"--attention-scale must be >= 0, got {self.attention_scale}")
        if self.batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {self.batch_size}")


class LayerSource(Protocol):
    """Where the dense model comes from, one block at a time."""

    config: ModelConfig

    def load_block(self, layer: int) -> Block: ...

    def load_shell(self, cfg: ModelConfig) -> Transformer: ...


class InMemorySource:
    """A :class:`LayerSource` over a model that is already in memory (the Python API)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.config = model.config

    def load_block(self, layer: int) -> Block:
        return self.model.layers[layer]

    def load_shell(self, cfg: ModelConfig) -> Transformer:
        shell = nnx.eval_shape(lambda: Transformer(cfg, dtype=self.model.dtype, rngs=nnx.Rngs(0)))
        copy_top_level(self.model, shell)
        return shell


def copy_top_level(src: Transformer, dst: Transformer) -> None:
    """Embeddings, final norm and head of ``src`` into ``dst`` (same family; blocks untouched)."""
    dst.embed_tokens = src.embed_tokens
    dst.embed_positions = src.embed_positions
    dst.final_norm = src.final_norm
    dst.lm_head = src.lm_head


# -- jitted pieces of a block, so statistics reuse the activations the forward pass computes -----------------
@nnx.jit
def _attention_inputs(block: Block, h):
    x = block.attn_norm(h)
    q, k = block.attn.project_qk(x)
    return x, q, k


@nnx.jit
def _attention_then_mlp_input(dense: Block, attn: Attention, h, positions):
    h_mid = h + attn(dense.attn_norm(h), positions, None)
    return h_mid, dense.mlp.intermediate(dense.mlp_norm(h_mid))


@jax.jit
def _mlp_residual(h_mid, a, kept, w_down, b_down):
    """``h_mid + A[:, kept] W_D' (+ b)``: kept up/gate columns are a subset, so the dense intermediate ``A``
    already holds the compressed MLP's intermediate; no projection is recomputed."""
    y = jnp.take(a, kept, axis=-1) @ w_down
    return h_mid + (y if b_down is None else y + b_down)


@jax.jit
def _embed_arrays(table, position_table, tokens, positions, offset):
    h = jnp.take(table, tokens, axis=0)
    if position_table is not None:
        h = h + jnp.take(position_table, positions + offset, axis=0)
    return h


def _embed(shell: Transformer, tokens, positions):
    """Token (and learned position) embeddings; the shell's abstract blocks never enter the jit."""
    pos_table = None if shell.embed_positions is None else shell.embed_positions[...]
    return _embed_arrays(shell.embed_tokens[...], pos_table, tokens, positions, shell.config.position_offset)


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


# -- decompositions applied to a block ------------------------------------------------------------------------
def _value(p) -> Any:
    return None if p is None else p[...]


def compress_attention(dense: Block, out_cfg: ModelConfig, spec: LayerSpec, C: np.ndarray, energy_q: np.ndarray,
                       energy_k: np.ndarray, settings: CompressionSettings) -> tuple[Attention, LayerSpec, dict]:
    """Key-query CR selection and value-output joint SVD of one block's attention."""
    cfg = out_cfg
    attn = dense.attn
    channels, pairs = decompose.cr_qk_select(energy_q, energy_k, spec.qk_dim, rope=cfg.use_rope)
    if pairs is not None and spec.qk_dim < cfg.head_dim:  # keeping every pair is the dense layout (None)
        spec = dataclasses.replace(spec, rope_pairs=tuple(tuple(int(p) for p in row) for row in np.asarray(pairs)))
    qk = decompose.apply_qk_selection(
        attn.q_proj.kernel[...], attn.k_proj.kernel[...], channels, cfg.num_heads,
        b_q=_value(attn.q_proj.bias), b_k=_value(attn.k_proj.bias),
    )
    b_o = _value(attn.o_proj.bias)
    if attn.v_proj.bias is not None:  # fold the value bias exactly into the output bias, then drop it
        b_o = decompose.fold_value_bias(attn.v_proj.bias[...], attn.o_proj.kernel[...], b_o, cfg.num_heads,
                                        precision64=settings.precision64)
    vo = decompose.vo_svd(C, attn.v_proj.kernel[...], attn.o_proj.kernel[...], spec.vo_dim, cfg.num_heads,
                          precision64=settings.precision64)
    new = nnx.eval_shape(lambda: Attention(cfg, spec, dtype=attn.q_proj.kernel.dtype, rngs=nnx.Rngs(0)))
    new.q_proj.kernel.set_value(qk["w_q"])
    new.k_proj.kernel.set_value(qk["w_k"])
    new.v_proj.kernel.set_value(vo["w_v"])
    new.o_proj.kernel.set_value(vo["w_o"])
    if cfg.qkv_bias:
        new.q_proj.bias.set_value(qk["b_q"])
        new.k_proj.bias.set_value(qk["b_k"])
        new.v_proj.bias.set_value(jnp.zeros(new.v_proj.bias.shape, new.v_proj.bias.dtype))
    if cfg.o_bias:
        new.o_proj.bias.set_value(b_o)
    if new.rope_freqs is not None:
        new.rope_freqs.set_value(jnp.asarray(kept_pair_frequencies(cfg, spec)))
    errors = {
        "qk_score_dropped": qk_dropped_score(energy_q, energy_k, np.asarray(channels), cfg),
        "vo": vo_relative_error(C, attn, new, cfg.num_heads),
    }
    return new, spec, errors


def compress_mlp(dense: Block, out_cfg: ModelConfig, spec: LayerSpec, C_s: np.ndarray,
                 settings: CompressionSettings) -> tuple[MLP, jax.Array, dict]:
    """Nystrom selection of the MLP's intermediate channels with a least-squares refit of the down projection."""
    mlp = dense.mlp
    res = decompose.nystrom_mlp(
        C_s, mlp.up_proj.kernel[...], mlp.down_proj.kernel[...], spec.mlp_width,
        w_gate=_value(mlp.gate_proj.kernel) if mlp.gate_proj is not None else None,
        b_up=_value(mlp.up_proj.bias), alpha=settings.leverage_alpha, precision64=settings.precision64,
    )
    new = nnx.eval_shape(lambda: MLP(out_cfg, spec, dtype=mlp.up_proj.kernel.dtype, rngs=nnx.Rngs(0)))
    new.up_proj.kernel.set_value(res["w_up"])
    new.down_proj.kernel.set_value(res["w_down"])
    if new.gate_proj is not None:
        new.gate_proj.kernel.set_value(res["w_gate"])
        if new.gate_proj.bias is not None:  # Llama mlp_bias: the gate bias follows the kept channels
            new.gate_proj.bias.set_value(mlp.gate_proj.bias[...][np.asarray(res["kept"])])
    if new.up_proj.bias is not None:
        new.up_proj.bias.set_value(res["b_up"])
        new.down_proj.bias.set_value(mlp.down_proj.bias[...])
    err = mlp_relative_error(C_s, mlp.down_proj.kernel[...], np.asarray(res["kept"]), res["w_down"])
    return new, res["kept"], {"mlp": err}


# -- reconstruction errors, from the statistics alone (no extra forward pass) ------------------------------------
def mlp_relative_error(C_s, w_down, kept, w_down_new) -> float:
    """``||A W_D - A_S W_D'||^2 / ||A W_D||^2`` over the calibration tokens, from ``C_s = A^T A``."""
    C = np.asarray(C_s, np.float64)
    W = np.asarray(w_down, np.float64)
    Wn = np.asarray(w_down_new, np.float64)
    ref = np.sum(W * (C @ W))
    cross = np.sum(W * (C[:, kept] @ Wn))
    new = np.sum(Wn * (C[np.ix_(kept, kept)] @ Wn))
    return float(max(ref - 2 * cross + new, 0.0) / ref)


def vo_relative_error(C, dense: Attention, new: Attention, n_heads: int) -> float:
    """``sum_i ||x (W_V W_O,i - V' O'_i)||^2 / sum_i ||x W_V W_O,i||^2`` over the calibration tokens."""
    C = np.asarray(C, np.float64)

    def per_head_products(attn: Attention) -> np.ndarray:  # [H, d, d]: W_V,g(i) W_O,i
        wv = np.asarray(attn.v_proj.kernel[...], np.float64)
        wo = np.asarray(attn.o_proj.kernel[...], np.float64)
        d, G = wv.shape[0], attn.num_kv_heads
        wv = wv.reshape(d, G, -1).transpose(1, 0, 2)  # [G, d, r]
        wo = wo.reshape(n_heads, -1, wo.shape[1])  # [H, r, d]
        return np.einsum("hdr,hre->hde", np.repeat(wv, n_heads // G, axis=0), wo)

    ref = per_head_products(dense)
    diff = ref - per_head_products(new)

    def energy(m: np.ndarray) -> float:  # sum_h tr(m_h^T C m_h), as one BLAS matmul
        flat = m.transpose(1, 0, 2).reshape(C.shape[0], -1)  # [d, H*d]
        return float(np.sum(flat * (C @ flat)))

    return max(energy(diff), 0.0) / energy(ref)


def qk_dropped_score(energy_q, energy_k, channels: np.ndarray, cfg: ModelConfig) -> float:
    """Fraction of the CR score mass ``sum_j sum_i sqrt(E_q,i(j) E_k,g(j))`` on the dropped channels."""
    eq = np.asarray(energy_q, np.float64).reshape(cfg.num_kv_heads, cfg.group_size, -1)
    ek = np.asarray(energy_k, np.float64)[:, None, :]
    score = np.sqrt(eq * ek).sum(axis=1)  # [G, dh]
    kept = np.take_along_axis(score, channels, axis=1).sum()
    return float(1.0 - kept / score.sum())


# -- the pipeline ------------------------------------------------------------------------------------------------
def block_influence(source: LayerSource, batches: list, settings: CompressionSettings, mesh, progress: bool):
    """``BI_l = 1 - mean cos(h_l, h_(l+1))`` on a dense pass over the first ``settings.bi_samples`` sequences."""
    rows = batches[0][1].shape[0]  # global sequences per batch
    n_bi = len(batches) if settings.bi_samples is None else max(1, -(-settings.bi_samples // rows))
    hs = [h for _, h in batches[:n_bi]]
    sums, counts = [], []
    for i in tqdm(range(source.config.num_layers), desc="block influence", unit="layer", disable=not progress):
        block = source.load_block(i)
        acc = stats.Accumulator()
        for j, (pos, _) in enumerate(batches[:n_bi]):
            h_out = run_block(block, hs[j], pos)
            acc.add("cos", stats.cosine_sum(hs[j], h_out, mesh=mesh))
            hs[j] = h_out
        cos = acc.finalize(where=f"layer {i}")["cos"]
        sums.append(float(cos.total))
        counts.append(float(cos.count))
    return alloc.block_importance(sums, counts)


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


def compress(source: LayerSource | Transformer, tokens: np.ndarray, settings: CompressionSettings, *,
             mesh: jax.sharding.Mesh | None = None, progress: bool = True,
             layer_specs: list[LayerSpec] | None = None, resume_dir: str | Path | None = None,
             on_layer: Callable[[dict], None] | None = None) -> tuple[Transformer, dict]:
    """Compress a model with MoDeGPT on calibration ``tokens`` [N, L] (this process's rows).

    ``layer_specs`` overrides the allocation with explicit per-layer widths (their ``rope_pairs`` are ignored:
    the CR selection chooses them); ``settings.ratio`` is then only recorded.

    ``resume_dir``: checkpoint the state after every finished layer there (orbax), and resume from it when it
    holds an unfinished run of the same configuration; the caller deletes it once the result is safely stored.

    Returns the compressed model (every block replaced) and a report: target and achieved ratios, parameter
    counts, per-layer block influence, sparsity, widths and reconstruction errors, and the time of each phase.
    """
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

    # The compressed model's configuration: folding a value bias needs an output bias (Qwen2 has none).
    out_cfg = dataclasses.replace(dense, o_bias=dense.o_bias or dense.qkv_bias)
    shell = source.load_shell(dense)
    positions_local = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    batches = []
    for rows in _batches(tokens, settings.batch_size, mesh.shape["data"]):
        tok = shard_batch(rows, mesh)
        pos = shard_batch(positions_local[: len(rows)], mesh)
        batches.append((pos, _embed(shell, tok, pos)))
    timings["embed"] = time.perf_counter() - t0

    resume = None
    if resume_dir is not None:
        resume = ResumeState(resume_dir, fingerprint(
            settings=dataclasses.asdict(settings), tokens=tokens, config=dense.to_json(), dtype=str(shell.dtype),
            mesh=dict(mesh.shape), processes=jax.process_count(),
            layer_specs=None if layer_specs is None else [x.to_dict() for x in layer_specs],
        ))

    if resume is not None and "plan" in resume.state:
        plan = resume.state["plan"]
        bi = None if plan["bi"] is None else np.asarray(plan["bi"])
        phi, counts = np.asarray(plan["sparsity"]), plan["counts"]
        specs = [LayerSpec.from_dict(x) for x in plan["specs"]]
        timings.update(resume.state.get("timings", {}))
        log.info("resuming from %s: %d of %d layers already compressed", resume.directory,
                 resume.finished_layers, dense.num_layers)
    else:
        bi = None
        if settings.allocation == "bi" and layer_specs is None:
            t = time.perf_counter()
            bi = block_influence(source, batches, settings, mesh, progress)
            timings["block_influence"] = time.perf_counter() - t
        if layer_specs is None:
            phi, specs, counts = plan_widths(dense, out_cfg, settings, bi)
        else:
            specs = [dataclasses.replace(x, rope_pairs=None) for x in layer_specs]
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

    t = time.perf_counter()
    hs = [h for _, h in batches]
    new_blocks, final_specs, layer_reports = [], [], []
    start = 0 if resume is None else resume.finished_layers
    for i, done in enumerate(resume.state["layers"] if start else []):
        spec = LayerSpec.from_dict(done["spec"])
        block = nnx.eval_shape(lambda: Block(out_cfg, spec, dtype=shell.dtype, rngs=nnx.Rngs(0)))
        nnx.update(block, resume.restore_block(i, nnx.state(block)))
        new_blocks.append(block)
        final_specs.append(spec)
        layer_reports.append(done["report"])
    if start:
        hs = resume.restore_hidden(start - 1, [jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=h.sharding)
                                               for h in hs])
    bar = tqdm(range(start, dense.num_layers), desc="compress", unit="layer", disable=not progress,
               initial=start, total=dense.num_layers)
    for i in bar:
        lt = time.perf_counter()
        block = source.load_block(i)
        acc = stats.Accumulator()
        for h in hs:
            x, q, k = _attention_inputs(block, h)
            acc.add("C", stats.gram(x, mesh=mesh))
            acc.add("E_q", stats.channel_energy(q, mesh=mesh))
            acc.add("E_k", stats.channel_energy(k, mesh=mesh))
        s = acc.finalize(where=f"layer {i}")
        attn, spec, errors = compress_attention(block, out_cfg, specs[i], s["C"], s["E_q"], s["E_k"], settings)

        acc = stats.Accumulator()
        mids = []
        for (pos, _), h in zip(batches, hs):
            h_mid, a = _attention_then_mlp_input(block, attn, h, pos)
            acc.add("C_s", stats.gram(a, mesh=mesh))
            mids.append((h_mid, a))
        s = acc.finalize(where=f"layer {i}")
        mlp, kept, mlp_errors = compress_mlp(block, out_cfg, spec, s["C_s"], settings)
        errors.update(mlp_errors)
        b_down = _value(mlp.down_proj.bias)
        hs = [_mlp_residual(h_mid, a, kept, mlp.down_proj.kernel[...], b_down) for h_mid, a in mids]

        new = nnx.eval_shape(lambda: Block(out_cfg, spec, dtype=shell.dtype, rngs=nnx.Rngs(0)))
        new.attn_norm, new.mlp_norm, new.attn, new.mlp = block.attn_norm, block.mlp_norm, attn, mlp
        new_blocks.append(new)
        final_specs.append(spec)
        del block
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
            "seconds": round(time.perf_counter() - lt, 3),
        }
        layer_reports.append(entry)
        if resume is not None:
            resume.save_layer(i, nnx.state(new), hs, {"spec": spec.to_dict(), "report": entry})
        msg = (f"layer {i:>3}: sparsity {phi[i]:.3f}  mlp {spec.mlp_width}/{dense.intermediate_size}  "
               f"qk {spec.qk_dim}/{dense.head_dim}  vo {spec.vo_dim}/{dense.head_dim}  |  rel. error "
               f"mlp {errors['mlp']:.4f}  vo {errors['vo']:.4f}  qk score dropped {errors['qk_score_dropped']:.4f}")
        log.info(msg)
        if progress:
            bar.write(msg)
        if on_layer is not None:
            on_layer(entry)
    # On resume, the finished layers' own times count too.
    timings["compress"] = time.perf_counter() - t + sum(r["seconds"] for r in layer_reports[:start])

    final_cfg = out_cfg.with_layers(final_specs)
    model = nnx.eval_shape(lambda: Transformer(final_cfg, dtype=shell.dtype, rngs=nnx.Rngs(0)))
    copy_top_level(shell, model)
    model.layers = nnx.List(new_blocks)
    timings["total"] = time.perf_counter() - t0

    total_before = count_params(shell)  # the dense shell's blocks are shapes only, but they count
    total_after = count_params(model)
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
        "devices": {"mesh": dict(mesh.shape), "processes": jax.process_count()},
        "layers": layer_reports,
        "timings_seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    return model, report
