"""Recovery training of a compressed model with optax (``modegpt heal``): distillation from the dense teacher, plain
next-token loss, or both; the decoder blocks or LoRA adapters merged at the end; orbax checkpoints to resume.

The compressed model keeps its shapes: LoRA adapters (:class:`LoRALinear`) wrap the target projections during
training and are folded into their kernels by :func:`merge_lora`, so a healed model exports and loads like any
other compressed model. The data order is a function of the seed alone, so a resumed run (parameters, optimiser
state and step restored from the last checkpoint) repeats the same steps and ends at the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from modegpt_jax.errors import UserError
from modegpt_jax.mesh import DATA, global_batch, to_host
from modegpt_jax.model import Linear, Transformer
from modegpt_jax.perplexity import perplexity, token_nll
from modegpt_jax.resume import array_hash

__all__ = ["HealSettings", "LoRALinear", "LoRAParam", "add_lora", "heal", "kd_loss", "lm_loss", "merge_lora",
           "train_step"]

LOSSES = ("kd", "lm", "kd+lm")
METHODS = ("full", "lora")
DTYPES = ("float32", "bfloat16")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class HealSettings:
    """Everything that decides the result of a recovery run, and how it is computed (recorded in its report).

    ``steps`` optimiser steps, each over ``batch_size * grad_accum`` windows (gradients averaged over
    ``grad_accum`` micro-batches of ``batch_size``, :class:`optax.MultiSteps`); AdamW with linear warmup over
    ``warmup`` steps (from ``lr / (warmup + 1)``, so the first step already moves) then cosine decay to 0,
    gradients clipped to global norm ``clip_norm``. ``loss``: ``kd``
    (KL divergence from the teacher's token distributions at ``temperature``, times ``temperature**2``),
    ``lm`` (next-token cross-entropy) or ``kd+lm`` (their sum). ``method``: ``full`` (the decoder blocks and the
    final norm; the embeddings too with ``train_embeddings``) or ``lora`` (rank-``lora_rank`` adapters on
    ``lora_targets``, scaled by ``lora_alpha / lora_rank``).
    ``param_dtype``: the trained weights (the master copy the optimiser updates, and its moments; bfloat16 saves
    memory but drops every update below about 1/256 of a weight, so at small learning rates most weights do not
    move); ``dtype``: the student's forward and backward pass and the teacher's forward pass run on copies of the
    weights cast to it (``bfloat16`` with ``float32`` weights is the usual mixed precision; norms, softmax and
    losses stay float32). ``remat``: recompute each block's activations in the backward pass (one more forward
    pass of the blocks for the activation memory of one block; the result is the same, and a checkpointed run may
    resume with the other value)."""

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    # Peak learning rate. Full fine-tuning of SmolLM2-135M at 0.3 with 4 x 512-token batches: 1e-4 raised the
    # validation perplexity (51.5 -> 66.1 after 12 steps), 1e-5 lowered it (48.3 -> 41.3 after 18 steps; `modegpt heal
    # --model DIR --teacher smollm2-135m --output OUT --steps 18 --lr 1e-5 --warmup 2 --eval-every 6 --val-windows 8`).
    lr: float = 1e-5
    warmup: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    loss: str = "kd"
    temperature: float = 1.0
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = PROJECTIONS
    eval_every: int = 0  # validation perplexity every this many steps (0: at the start and the end only)
    keep_best: bool = False  # end with the weights of the best validation perplexity seen (step 0 included)
    checkpoint_every: int = 50  # orbax checkpoint every this many steps (with a checkpoint directory)
    seed: int = 0
    dtype: str = "float32"
    param_dtype: str = "float32"
    train_embeddings: bool = False  # full fine-tuning: also train the EMBEDDINGS (left whole by compression)
    remat: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}", argument=name)
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}", argument=name)
        if self.steps >= 1 and self.warmup >= self.steps:
            raise UserError(f"warmup ({self.warmup}) must be less than steps ({self.steps})",
                            argument=("warmup", "steps"))
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UserError(f"lr must be a positive number, got {self.lr}", argument="lr")
        if self.weight_decay < 0 or self.clip_norm <= 0 or self.temperature <= 0:
            raise UserError("weight_decay must be >= 0, clip_norm and temperature > 0, got "
                            f"{self.weight_decay}, {self.clip_norm}, {self.temperature}",
                            argument=("weight_decay", "clip_norm", "temperature"))
        if self.loss not in LOSSES:
            raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}", argument="loss")
        if self.method not in METHODS:
            raise UserError(f"method must be full or lora, got {self.method!r}", argument="method")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"{name} must be one of {', '.join(DTYPES)}, got {getattr(self, name)!r}",
                                argument=name)
        if self.train_embeddings and self.method != "full":
            raise UserError("train_embeddings applies to method full (LoRA adapters wrap the projections only)",
                            argument=("train_embeddings", "method"))
        unknown = sorted(set(self.lora_targets) - set(PROJECTIONS))
        if unknown or not self.lora_targets:
            raise UserError(f"lora_targets must name some of {', '.join(PROJECTIONS)}, got "
                            f"{', '.join(self.lora_targets) or 'none'}", argument="lora_targets")

    @property
    def windows_needed(self) -> int:
        return self.steps * self.batch_size * self.grad_accum


# -- LoRA ------------------------------------------------------------------------------------------------------
class LoRAParam(nnx.Param):
    """An adapter parameter: what ``method="lora"`` trains."""


class LoRALinear(nnx.Module):
    """``base(x) + (x @ a) @ b * scale`` around a frozen :class:`~modegpt_jax.model.Linear`; ``b`` starts at zero,
    so the wrapped model starts exactly where the compressed one is."""

    def __init__(self, base: Linear, rank: int, alpha: float, *, rngs: nnx.Rngs):
        d_in, d_out = base.kernel.shape
        dtype = base.kernel.dtype
        self.base = base
        self.scale = alpha / rank
        self.lora_a = LoRAParam((jax.random.normal(rngs.params(), (d_in, rank), jnp.float32) / math.sqrt(d_in))
                                .astype(dtype))
        self.lora_b = LoRAParam(jnp.zeros((rank, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + (x @ self.lora_a[...]) @ self.lora_b[...] * jnp.asarray(self.scale, x.dtype)

    def merged(self) -> Linear:
        """The base projection with the adapter folded into its kernel."""
        a = self.lora_a[...].astype(jnp.float32)
        b = self.lora_b[...].astype(jnp.float32)
        kernel = self.base.kernel[...]
        self.base.kernel.set_value((kernel.astype(jnp.float32) + a @ b * self.scale).astype(kernel.dtype))
        return self.base


def _projections(model: Transformer):
    """(module, attribute name) of every projection in the decoder blocks."""
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name in PROJECTIONS:
                if getattr(parent, name, None) is not None:
                    yield parent, name


def add_lora(model: Transformer, targets: tuple[str, ...] = PROJECTIONS, rank: int = 8, alpha: float = 16.0,
             seed: int = 0) -> Transformer:
    """Wrap the ``targets`` projections of every block in :class:`LoRALinear` (in place; returns the model)."""
    rngs = nnx.Rngs(seed)
    wrapped = 0
    for parent, name in _projections(model):
        module = getattr(parent, name)
        if name in targets and isinstance(module, Linear):
            setattr(parent, name, LoRALinear(module, rank, alpha, rngs=rngs))
            wrapped += 1
    if not wrapped:
        raise UserError(f"lora_targets {', '.join(targets)} name no projection of this model "
                        f"({', '.join(sorted({name for _, name in _projections(model)}))})", argument="lora_targets")
    return model


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its projection (in place; returns the model): the compressed shapes again."""
    for parent, name in _projections(model):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            setattr(parent, name, module.merged())
    return model


# -- losses ----------------------------------------------------------------------------------------------------
def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy: ``logits[:, t]`` predicts ``tokens[:, t + 1]``."""
    return jnp.mean(token_nll(logits[:, :-1], tokens[:, 1:]))


def kd_loss(logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``temperature**2`` times the mean over positions of ``KL(teacher || student)``, both softened by
    ``temperature`` (the usual scaling, so gradients keep their size as the temperature changes)."""
    return temperature * temperature * jnp.mean(_kl(logits, teacher_logits, temperature))


def _kl(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """``KL(teacher || student)`` of every position [...], both softened by ``temperature``."""
    t = jnp.asarray(temperature, jnp.float32)
    student = logits.astype(jnp.float32) / t
    log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    # log p_student = student - logsumexp(student) and the teacher's probabilities sum to 1, so the student's
    # log-softmax is never formed: its gradient is then softmax(student) - p_teacher in one pass (see token_nll).
    return jnp.sum(jnp.exp(log_teacher) * (log_teacher - student), axis=-1) + jax.nn.logsumexp(student, axis=-1)


def cast_weights(model: Transformer, dtype: Any) -> Transformer:
    """``model`` with its floating-point weights (:class:`nnx.Param`, adapters included) in ``dtype``: a new
    module over cast copies (inside a traced function gradients flow back through the cast to the originals), or
    ``model`` itself when every weight already has that dtype."""
    dtype = jnp.dtype(dtype)
    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
    leaves = jax.tree.leaves(weights)
    if all(x.dtype == dtype or not jnp.issubdtype(x.dtype, jnp.floating) for x in leaves):
        return model
    cast = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, weights)
    return nnx.merge(graphdef, cast, rest)


def trunk(model: Transformer, tokens: jax.Array, *, remat: bool = False) -> jax.Array:
    """The residual stream after the last block [B, T, d], as one traceable function (``Transformer.__call__``
    jits block by block). ``remat``: a backward pass keeps only each block's input and recomputes the block's
    activations from it (:func:`flax.nnx.remat`): one more forward pass of the blocks, for activation memory of
    one block instead of all of them."""
    positions = model.positions(tokens)
    h = model.embed(tokens, positions)

    def run(block, h):
        return block(h, positions)

    if remat:
        run = nnx.remat(run)
    for block in model.layers:
        h = run(block, h)
    return h


#: Bytes of float32 logits ``[B, positions, vocab]`` that one chunk of the losses may hold (:func:`losses`).
LOSS_CHUNK_BYTES = 512 * 2**20


def losses(model: Transformer, h: jax.Array, tokens: jax.Array, teacher: Transformer | None,
           teacher_h: jax.Array | None, *, loss: str, temperature: float, chunk: int | None = None
           ) -> dict[str, jax.Array]:
    """The training losses of ``model`` from its final residual stream ``h [B, T, d]`` (and the teacher's
    ``teacher_h`` for ``kd``): :func:`kd_loss` and :func:`lm_loss` of the two models' logits, over ``chunk``
    positions at a time (default: as many as fit :data:`LOSS_CHUNK_BYTES`). With several chunks, the output heads,
    softmaxes and their gradients of one chunk are all that exist at once (recomputed in the backward pass, which
    costs one more product of each output head), never a ``[B, T, vocab]`` array: for a 128k vocabulary and 8 x 2048
    tokens that would be 8 GiB per float32 copy."""
    B, T, _ = h.shape
    vocab = model.config.vocab_size
    chunk = max(1, min(T, chunk or LOSS_CHUNK_BYTES // (4 * B * vocab)))
    n = -(-T // chunk)
    chunk = -(-T // n)  # the same number of chunks, as even as they go: the last is padded least
    pad = n * chunk - T
    position = jnp.arange(n * chunk).reshape(n, chunk)

    def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    xs = {"h": chunks(h), "targets": chunks(jnp.pad(tokens[:, 1:], [(0, 0), (0, 1)])), "position": position}
    if teacher_h is not None:
        xs["teacher_h"] = chunks(teacher_h)

    def sums(x):
        logits = model.head(x["h"])
        out = {}
        if loss in ("kd", "kd+lm"):
            kl = _kl(logits, jax.lax.stop_gradient(teacher.head(x["teacher_h"])), temperature)
            out["kd"] = jnp.sum(jnp.where(x["position"] < T, kl, 0.0))
        if loss in ("lm", "kd+lm"):  # position t predicts token t + 1
            nll = token_nll(logits, x["targets"])
            out["lm"] = jnp.sum(jnp.where(x["position"] < T - 1, nll, 0.0))
        return out

    if n == 1:  # nothing to save: the whole window at once
        total = jax.tree.map(jnp.sum, sums(jax.tree.map(lambda x: x[0], xs)))
    else:
        total = jax.tree.map(jnp.sum, jax.lax.map(jax.checkpoint(sums), xs))
    parts = {}
    if "kd" in total:
        parts["kd"] = temperature * temperature * total["kd"] / (B * T)
    if "lm" in total:
        parts["lm"] = total["lm"] / (B * (T - 1))
    return parts


@nnx.jit(static_argnames=("dtype",))
def _teacher_trunk(teacher: Transformer, tokens: jax.Array, dtype: str) -> jax.Array:
    return trunk(cast_weights(teacher, dtype), tokens)


@nnx.jit(static_argnames=("loss", "temperature", "wrt", "dtype", "remat"))
def _step(model, optimizer, tokens, teacher, teacher_h, *, loss, temperature, wrt, dtype, remat):
    teacher = None if teacher is None else cast_weights(teacher, dtype)

    def objective(model):
        compute = cast_weights(model, dtype)
        parts = losses(compute, trunk(compute, tokens, remat=remat), tokens, teacher, teacher_h, loss=loss,
                       temperature=temperature)
        return sum(parts.values()), parts

    (value, parts), grads = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    return value, parts


def train_step(model: Transformer, optimizer: nnx.Optimizer, tokens, teacher: Transformer | None,
               settings: HealSettings, teacher_h: jax.Array | None = None) -> dict[str, float]:
    """One micro-batch: loss, gradients of the trained parameters, and the optimiser's update (with
    ``grad_accum > 1`` the update is applied every ``grad_accum`` calls). Returns the losses. ``teacher_h``: the
    teacher's final residual stream for these windows (:mod:`modegpt_jax.teacher_cache`), instead of running the
    teacher's blocks here; only its head is used then."""
    tokens = jnp.asarray(tokens)
    if settings.loss == "lm":
        teacher = teacher_h = None
    elif teacher_h is not None:
        teacher_h = jnp.asarray(teacher_h).astype(settings.dtype)
    else:
        teacher_h = _teacher_trunk(teacher, tokens, settings.dtype)
    value, parts = _step(model, optimizer, tokens, teacher, teacher_h, loss=settings.loss,
                         temperature=settings.temperature, wrt=_trained(settings), dtype=settings.dtype,
                         remat=settings.remat)
    return {"loss": float(to_host(value)), **{k: float(to_host(v)) for k, v in parts.items()}}


#: Parameters compression leaves whole: the token (and learned position) embeddings and an untied output head.
EMBEDDINGS = ("embed_tokens", "embed_positions", "lm_head")


def _trained(settings: HealSettings):
    if settings.method == "lora":
        return LoRAParam
    if settings.train_embeddings:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.Any(*(nnx.PathContains(name) for name in EMBEDDINGS))))


def make_optimizer(model: Transformer, settings: HealSettings) -> nnx.Optimizer:
    """AdamW with warmup and cosine decay, global-norm clipping, gradient accumulation."""
    schedule = optax.warmup_cosine_decay_schedule(settings.lr / (settings.warmup + 1), settings.lr, settings.warmup,
                                                  max(settings.steps, settings.warmup + 1), 0.0)
    tx = optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                     optax.adamw(schedule, weight_decay=settings.weight_decay))
    if settings.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=settings.grad_accum)
    return nnx.Optimizer(model, tx, wrt=_trained(settings))


def batch_order(n_windows: int, settings: HealSettings) -> np.ndarray:
    """Window indices of every micro-batch, [steps * grad_accum, batch_size]: one shuffled pass, from the seed."""
    needed = settings.windows_needed
    if n_windows < needed:
        raise UserError(f"{settings.steps} steps of {settings.grad_accum} x {settings.batch_size} windows need "
                        f"{needed} windows, the data gives {n_windows}: fewer steps, a smaller batch, or more data",
                        argument=("steps", "batch_size"))
    order = np.random.default_rng(settings.seed).permutation(n_windows)[:needed]
    return order.reshape(settings.steps * settings.grad_accum, settings.batch_size)


# -- checkpoints -----------------------------------------------------------------------------------------------
#: Settings that change how a step is computed, not what it computes: a run may resume with other values.
RESULT_NEUTRAL = ("remat",)


def digest(array: np.ndarray) -> str:
    """``array``'s shape and :func:`~modegpt_jax.resume.array_hash`, as a heal run's fingerprint names its data."""
    return f"{list(array.shape)}:{array_hash(array)}"


@dataclasses.dataclass
class _Best:
    """The trained parameters (host copies, a pure dict) of the best validation perplexity so far."""

    step: int = -1
    perplexity: float = math.inf
    params: Any = None

    def offer(self, step: int, perplexity: float, model, wrt) -> None:
        if self.params is None or perplexity < self.perplexity:  # the first offer is kept whatever its value
            self.step, self.perplexity = step, perplexity
            self.params = jax.tree.map(to_host, nnx.to_pure_dict(nnx.state(model, wrt)))

    def restore_into(self, model, wrt) -> None:
        state = nnx.state(model, wrt)
        current = nnx.to_pure_dict(state)

        def put(new, old):  # each device takes its block of the host copy (also across processes)
            new = np.asarray(new, old.dtype)
            return jax.make_array_from_callback(new.shape, old.sharding, lambda index: new[index])

        nnx.replace_by_pure_dict(state, jax.tree.map(put, self.params, current))
        nnx.update(model, state)


class _Checkpoints:
    """orbax checkpoints of the trained parameters, the optimiser state and the history, every K steps."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any]):
        """``fingerprint``: what must be the same for a run to continue another (settings, data, models)."""
        import orbax.checkpoint as ocp

        self._ocp = ocp
        fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))  # as it reads back (tuples as lists)
        self.directory = Path(directory).absolute()
        self.run_file = self.directory / "heal_run.json"
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=1))
        if self.manager.latest_step() is not None and self.run_file.exists():
            saved = json.loads(self.run_file.read_text())
            changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            if changed:
                raise UserError(f"checkpoint directory {self.directory} holds a run with other {', '.join(changed)}: "
                                "rerun with the same ones to resume it, or delete that directory to start over")
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.run_file.write_text(json.dumps(fingerprint, sort_keys=True))

    def restore(self, model, optimizer, wrt, best: _Best | None) -> tuple[int, list]:
        """Load the latest checkpoint into ``model``, ``optimizer`` (and ``best``); returns (step, history)."""
        step = self.manager.latest_step()
        if step is None:
            return 0, []
        ocp = self._ocp
        params, opt = nnx.state(model, wrt), nnx.state(optimizer)
        items = dict(params=ocp.args.StandardRestore(nnx.to_pure_dict(params)),
                     optimizer=ocp.args.StandardRestore(nnx.to_pure_dict(opt)), history=ocp.args.JsonRestore())
        if best is not None:
            items["best"] = ocp.args.StandardRestore(nnx.to_pure_dict(params))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        nnx.replace_by_pure_dict(params, restored["params"])
        nnx.replace_by_pure_dict(opt, restored["optimizer"])
        nnx.update(model, params)
        nnx.update(optimizer, opt)
        record = restored["history"]
        if best is not None:
            best.step, best.perplexity = record["best_step"], record["best_perplexity"]
            best.params = jax.tree.map(np.asarray, restored["best"])
        return step, record["history"]

    def save(self, step: int, model, optimizer, wrt, history: list, best: _Best | None) -> None:
        ocp = self._ocp
        record = {"history": history}
        items = dict(params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, wrt))),
                     optimizer=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))))
        if best is not None:
            items["best"] = ocp.args.StandardSave(best.params)
            record.update(best_step=best.step, best_perplexity=best.perplexity)
        self.manager.save(step, args=ocp.args.Composite(history=ocp.args.JsonSave(record), **items))
        self.manager.wait_until_finished()

    @property
    def latest(self) -> int | None:
        return self.manager.latest_step()


# -- the run ---------------------------------------------------------------------------------------------------
def check_run(settings: HealSettings, validating: bool, mesh: jax.sharding.Mesh | None) -> None:
    """The refusals of :func:`heal` that need neither model nor data (so a caller can make them before long work:
    filling a teacher cache, loading checkpoints)."""
    if settings.keep_best and not validating:
        raise UserError("keep_best needs validation windows to choose by", argument="keep_best")
    if jax.process_count() > 1 and mesh is None:
        raise UserError("a multi-process run trains on a mesh: pass one", argument="mesh")
    if mesh is not None and settings.batch_size % mesh.shape[DATA]:
        raise UserError(f"batch_size {settings.batch_size} must be a multiple of the mesh's data axis "
                        f"({mesh.shape[DATA]})", argument=("batch_size", "mesh"))


def heal(model: Transformer, teacher: Transformer | None, tokens: np.ndarray, settings: HealSettings, *,
         val_tokens: np.ndarray | None = None, checkpoint_dir: str | Path | None = None,
         mesh: jax.sharding.Mesh | None = None, progress: bool = True, teacher_hidden: np.ndarray | None = None
         ) -> tuple[Transformer, dict[str, Any]]:
    """Train ``model`` (in place) on ``tokens [N, seqlen]`` and return it with its report.

    ``teacher``: the dense model, for the ``kd`` losses (its logits are computed on the fly, never stored).
    ``teacher_hidden``: the teacher's final residual stream for every window ``[N, seqlen, hidden]`` (e.g. a
    :class:`~modegpt_jax.teacher_cache.TeacherCache`'s ``hidden``); then only the teacher's head is used, so
    ``teacher`` may be a model without blocks.
    ``val_tokens``: windows for validation perplexity at the start, every ``eval_every`` steps and at the end.
    ``checkpoint_dir``: orbax checkpoints every ``checkpoint_every`` steps; a run given the same directory and
    settings resumes from its last checkpoint. With ``method="lora"`` the adapters are merged before returning.
    ``mesh``: train on it (:func:`modegpt_jax.mesh.make_mesh`): every micro-batch split over ``"data"``, weights
    and optimiser state split over ``"model"`` as :mod:`modegpt_jax.sharding` places them; the gradient
    reductions follow from those shardings. In a ``jax.distributed`` run every process calls this with the same
    arguments (all the data) and places the rows of each batch that its devices take, so a ``"model"`` axis may
    span processes too."""
    settings.validate()
    if settings.loss != "lm" and teacher is None:
        raise UserError(f"loss {settings.loss!r} needs a teacher (the dense model)", argument="loss")
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise UserError(f"teacher has a vocabulary of {teacher.config.vocab_size} tokens, the model one of "
                        f"{model.config.vocab_size}", argument="teacher")
    tokens = np.asarray(tokens, np.int32)
    if teacher_hidden is not None and settings.loss != "lm" and (
            teacher_hidden.shape != (*tokens.shape, teacher.config.hidden_size)):
        raise UserError(f"teacher_hidden has shape {tuple(teacher_hidden.shape)}, the windows and the teacher need "
                        f"{(*tokens.shape, teacher.config.hidden_size)}", argument="teacher_hidden")
    order = batch_order(len(tokens), settings)
    check_run(settings, val_tokens is not None, mesh)
    checkpoints = None
    if checkpoint_dir is not None:  # refuses a directory of another run before the model is touched
        checkpoints = _Checkpoints(Path(checkpoint_dir), {
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in RESULT_NEUTRAL},
            "data": digest(tokens),
            "validation": None if val_tokens is None else digest(np.asarray(val_tokens, np.int32)),
            "model": model.config.to_json(), "dtype": str(model.dtype),
            # without its blocks: a teacher cache hands heal a teacher without them (only its head is used)
            "teacher": None if teacher is None else dataclasses.replace(teacher.config, layers=()).to_json()})
    cast = cast_weights(model, settings.param_dtype)
    if cast is not model:  # the master weights in param_dtype (the adapters follow their base kernels)
        nnx.update(model, nnx.state(cast, nnx.Param))
        model.dtype = jnp.dtype(settings.param_dtype)
    if settings.method == "lora":
        add_lora(model, settings.lora_targets, settings.lora_rank, settings.lora_alpha, settings.seed)
    if mesh is not None:
        from modegpt_jax.sharding import place

        place(model, mesh)
        if teacher is not None:
            place(teacher, mesh)
    optimizer = make_optimizer(model, settings)
    wrt = _trained(settings)
    best = _Best() if settings.keep_best else None
    start_step, history = (0, []) if checkpoints is None else checkpoints.restore(model, optimizer, wrt, best)

    def validate_at(step: int) -> None:
        if val_tokens is not None:
            ppl = perplexity(model, np.asarray(val_tokens), progress=False, mesh=mesh)["perplexity"]
            if jax.process_count() > 1:  # one value everywhere: keeping the best gathers weights, a collective
                from jax.experimental import multihost_utils

                ppl = float(multihost_utils.broadcast_one_to_all(np.float64(ppl)))
            history.append({"step": step, "validation_perplexity": ppl})
            if best is not None:
                best.offer(step, ppl, model, wrt)

    if start_step == 0:
        validate_at(0)
    began = time.perf_counter()
    window_tokens = tokens.shape[1]
    bar = tqdm(total=settings.steps, initial=start_step, desc="heal", unit="step", disable=not progress)
    for step in range(start_step, settings.steps):
        losses = []
        for micro in range(settings.grad_accum):
            picked = order[step * settings.grad_accum + micro]
            rows = tokens[picked]
            teacher_h = None if teacher_hidden is None or settings.loss == "lm" else teacher_hidden[picked]
            if mesh is not None:  # every process holds every row and places the ones its devices take
                rows = global_batch(rows, mesh)
                teacher_h = None if teacher_h is None else global_batch(teacher_h, mesh)
            losses.append(train_step(model, optimizer, rows, teacher, settings, teacher_h))
        seconds = time.perf_counter() - began
        row = {"step": step + 1, **{k: float(np.mean([x[k] for x in losses])) for k in losses[0]},
               "seconds": round(seconds, 3)}  # since this run's first step began
        if not math.isfinite(row["loss"]):
            kept = "" if checkpoints is None or checkpoints.latest is None else (
                f"; the last good checkpoint is step {checkpoints.latest} in {checkpoints.directory} (delete it to "
                "start again with other settings)")
            raise UserError(f"the loss became {row['loss']} at step {step + 1} (lr {settings.lr} too high?){kept}",
                            argument="lr")
        history.append(row)
        done = step + 1 - start_step
        bar.set_postfix(loss=f"{row['loss']:.4f}",
                        tok_s=f"{done * settings.grad_accum * settings.batch_size * window_tokens / seconds:.0f}")
        bar.update(1)
        if settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < settings.steps:
            validate_at(step + 1)
        if checkpoints is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
            checkpoints.save(step + 1, model, optimizer, wrt, history, best)
    bar.close()
    seconds = time.perf_counter() - began
    if not history or history[-1].get("step") != settings.steps or "validation_perplexity" not in history[-1]:
        validate_at(settings.steps)
    if best is not None and best.step != settings.steps:
        best.restore_into(model, wrt)
    if settings.method == "lora":
        merge_lora(model)
    trained_tokens = (settings.steps - start_step) * settings.grad_accum * settings.batch_size * window_tokens
    vals = [x for x in history if "validation_perplexity" in x]
    report = {
        "settings": dataclasses.asdict(settings),
        "history": history,
        "tokens_seen": settings.windows_needed * window_tokens,
        "seconds_this_run": round(seconds, 3),
        "tokens_per_second": trained_tokens / seconds if seconds > 0 and trained_tokens else None,
        "resumed_from_step": start_step,
        "validation_perplexity": {"before": vals[0]["validation_perplexity"], "after":
                                  vals[-1]["validation_perplexity"]} if len(vals) >= 2 else None,
        "kept_step": settings.steps if best is None else best.step,
    }
    if best is not None:
        report["validation_perplexity"]["after"] = best.perplexity
    return model, report
