"""Recovery training (``modegpt heal``): the train step, the losses, LoRA, resume, and the CLI end to end."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.hf_import import HFCheckpoint
from modegpt_jax import heal as healing
from modegpt_jax.errors import UserError
from modegpt_jax.heal import HealSettings, add_lora, heal, kd_loss, lm_loss, make_optimizer, merge_lora, train_step
from modegpt_jax.pipeline import compress
from modegpt_jax.run import heal_checkpoint
from tests.heal_worker import LR as WORKER_LR
from tests.hf_models import make_hf_model, save_hf_model
from tests.test_cli_errors import assert_user_error, run_cli
from tests.test_pipeline import equal_split


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(dense checkpoint, compressed model) of a tiny Llama."""
    ckpt = HFCheckpoint(save_hf_model(make_hf_model("llama_gqa_untied"), tmp_path_factory.mktemp("heal") / "d"))
    return ckpt, compress(ckpt, data(16, seed=0), equal_split(ratio=0.4), progress=False)[0]


def data(n=32, length=24, seed=1):
    return np.random.default_rng(seed).integers(0, 128, (n, length)).astype(np.int32)


def student(pair):
    """A fresh copy of the compressed model (training changes it in place)."""
    return nnx.clone(pair[1])


def params(model):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("loss", ["lm", "kd", "kd+lm"])
def test_one_step_lowers_the_loss_on_its_batch(pair, loss):
    ckpt, _ = pair
    model, teacher = student(pair), ckpt.load_model()
    settings = HealSettings(steps=1, lr=1e-4, warmup=0, loss=loss)
    optimizer = make_optimizer(model, settings)
    batch = data(4)
    before = train_step(model, optimizer, batch, teacher, settings)["loss"]
    after = train_step(model, optimizer, batch, teacher, settings)["loss"]  # the second reports the loss after one
    assert after < before


def test_bfloat16_passes_train_the_float32_weights(pair):
    """Mixed precision: the passes run on bfloat16 copies, the gradients reach the float32 master weights."""
    ckpt, _ = pair
    batch, losses = data(4), {}
    for dtype in ("float32", "bfloat16"):
        model, teacher = student(pair), ckpt.load_model()
        settings = HealSettings(steps=1, lr=1e-3, warmup=0, loss="kd+lm", dtype=dtype)
        optimizer = make_optimizer(model, settings)
        losses[dtype] = [train_step(model, optimizer, batch, teacher, settings)["loss"] for _ in range(2)]
        assert {v.dtype for v in params(model).values()} == {np.dtype(np.float32)}
        assert {v.dtype for v in jax.tree.leaves(nnx.state(optimizer, nnx.OptState))
                if v.ndim} == {np.dtype(np.float32)}  # AdamW's moments follow the weights
    assert losses["bfloat16"][1] < losses["bfloat16"][0]
    assert losses["bfloat16"][0] != losses["float32"][0]  # the passes did run in bfloat16
    assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], rel=2e-2)


def test_bfloat16_weights_are_trained_and_kept_in_bfloat16(pair):
    _, compressed = pair
    same_batch = np.tile(data(4), (3, 1))  # every step trains on the same four windows
    model, report = heal(student(pair), None, same_batch, HealSettings(
        steps=3, batch_size=4, lr=1e-3, warmup=0, loss="lm", param_dtype="bfloat16", dtype="bfloat16"),
        progress=False)
    assert model.dtype == jnp.bfloat16
    after = params(model)
    assert {v.dtype for v in after.values()} == {np.dtype(jnp.bfloat16)}
    before = params(compressed)
    assert any(not np.array_equal(before[k].astype(after[k].dtype), after[k]) for k in before)
    losses = [row["loss"] for row in report["history"] if "loss" in row]
    assert len(losses) == 3 and losses[-1] < losses[0]
    seconds = [row["seconds"] for row in report["history"] if "loss" in row]  # since the first step began
    assert 0 < seconds[0] < seconds[1] < seconds[2] <= report["seconds_this_run"]


@pytest.mark.parametrize("loss", ["kd", "lm", "kd+lm"])
def test_chunked_losses_equal_the_losses_of_whole_logits(pair, loss):
    ckpt, _ = pair
    model, teacher = student(pair), ckpt.load_model()
    tokens = jnp.asarray(data(3, length=21))  # 21 positions: chunks of 8 leave a padded last chunk
    teacher_h, teacher_logits = healing.trunk(teacher, tokens), teacher(tokens)

    def objective(model, chunk):
        parts = healing.losses(model, healing.trunk(model, tokens), tokens, teacher, teacher_h, loss=loss,
                               temperature=2.0, chunk=chunk)
        return sum(parts.values()), parts

    def whole(model):
        logits, parts = model.head(healing.trunk(model, tokens)), {}
        if "kd" in loss:
            parts["kd"] = kd_loss(logits, teacher_logits, 2.0)
        if "lm" in loss:
            parts["lm"] = lm_loss(logits, tokens)
        return sum(parts.values()), parts

    (_, expected), expected_grads = nnx.value_and_grad(whole, has_aux=True)(model)
    for chunk in (8, None):  # three chunks, and the default: one (these logits are far below LOSS_CHUNK_BYTES)
        (_, parts), grads = nnx.value_and_grad(lambda m: objective(m, chunk), has_aux=True)(model)
        assert parts.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(float(parts[name]), float(expected[name]), rtol=1e-5, atol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", [pytest.param("kd", marks=pytest.mark.slow), "lm"])
def test_remat_steps_equal_the_plain_steps(pair, loss):
    """Recomputing each block's activations in the backward pass changes the memory, not the training."""
    ckpt, _ = pair
    teacher, batch, trained = ckpt.load_model(), data(4), {}
    for remat in (False, True):
        model = student(pair)
        settings = HealSettings(steps=2, lr=1e-4, warmup=0, loss=loss, remat=remat)
        optimizer = make_optimizer(model, settings)
        steps = [train_step(model, optimizer, batch, teacher, settings)["loss"] for _ in range(2)]
        trained[remat] = steps, params(model)
    np.testing.assert_allclose(trained[True][0], trained[False][0], rtol=1e-4)
    start = params(student(pair))
    # AdamW moves a weight by up to lr a step whatever its gradient's size, so float rounding in a tiny gradient
    # can move it by a visible fraction of lr (2e-7 seen on one CPU): compared within 1 % of the two steps' reach.
    for name, value in trained[False][1].items():
        np.testing.assert_allclose(trained[True][1][name], value, rtol=1e-5, atol=0.01 * 2 * settings.lr,
                                   err_msg=name)
    assert any(not np.array_equal(trained[True][1][name], start[name]) for name in start)  # the weights moved


def test_kd_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 11)) * 3, rng.normal(size=(2, 5, 11)) * 3
    for temperature in (1.0, 2.0):
        def log_softmax(x):
            x = x / temperature
            return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

        p = np.exp(log_softmax(t))
        expected = temperature**2 * np.mean(np.sum(p * (log_softmax(t) - log_softmax(s)), axis=-1))
        np.testing.assert_allclose(float(kd_loss(jnp.asarray(s), jnp.asarray(t), temperature)), expected, rtol=1e-5)
    assert float(kd_loss(jnp.asarray(s), jnp.asarray(s))) == pytest.approx(0.0, abs=1e-6)
    tokens = rng.integers(0, 11, (2, 5))
    logp = s[:, :-1] - np.log(np.exp(s[:, :-1]).sum(-1, keepdims=True))
    expected_lm = -np.mean(np.take_along_axis(logp, tokens[:, 1:, None], -1))
    np.testing.assert_allclose(float(lm_loss(jnp.asarray(s), jnp.asarray(tokens))), expected_lm, rtol=1e-5)


def test_lora_merged_weights_give_the_adapters_logits(pair):
    model = add_lora(student(pair), rank=4, seed=3)
    adapters = nnx.state(model, healing.LoRAParam)
    keys = iter(jax.random.split(jax.random.key(5), 1000))
    nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), adapters))
    tokens = data(2, seed=7)
    unmerged = np.asarray(model(tokens))
    assert not np.allclose(unmerged, np.asarray(pair[1](tokens)), atol=1e-4)  # the adapters do something
    merged = merge_lora(model)
    assert not nnx.state(merged, healing.LoRAParam)  # no adapter left: the compressed shapes
    assert {k: v.shape for k, v in params(merged).items()} == {k: v.shape for k, v in params(pair[1]).items()}
    np.testing.assert_allclose(np.asarray(merged(tokens)), unmerged, atol=2e-5, rtol=0)


def test_lora_trains_only_the_adapters(pair):
    ckpt, compressed = pair
    model, report = heal(student(pair), ckpt.load_model(), data(), HealSettings(
        steps=3, batch_size=4, lr=1e-2, warmup=0, method="lora", lora_rank=2, lora_targets=("q_proj", "down_proj")),
        progress=False)
    before, after = params(compressed), params(model)
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed and all(k[-2] in ("q_proj", "down_proj") and k[-1] == "kernel" for k in changed)


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_full_fine_tuning_trains_the_embeddings_only_when_asked(pair, train_embeddings):
    ckpt, compressed = pair
    model, _ = heal(student(pair), ckpt.load_model(), data(), HealSettings(
        steps=2, batch_size=4, lr=1e-3, warmup=0, train_embeddings=train_embeddings), progress=False)
    before, after = params(compressed), params(model)
    changed = {k[0] for k in before if not np.array_equal(before[k], after[k])}
    assert {"layers", "final_norm"} <= changed
    assert ({"embed_tokens", "lm_head"} <= changed) == train_embeddings
    assert not ({"embed_tokens", "lm_head"} & changed) or train_embeddings


@pytest.mark.parametrize("keep_best", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_weights(pair, tmp_path, monkeypatch, keep_best):
    ckpt, _ = pair
    settings = HealSettings(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup=1, checkpoint_every=2,
                            eval_every=2, keep_best=keep_best, method="lora" if keep_best else "full")
    tokens, val = data(), data(4, seed=9)
    whole, report = heal(student(pair), ckpt.load_model(), tokens, settings, val_tokens=val,
                         checkpoint_dir=tmp_path / "a", progress=False)

    real_step, calls = healing.train_step, []

    def dies_in_step_five(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8:  # micro-batches 9.. belong to step 5: killed after the step-4 checkpoint
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(healing, "train_step", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        heal(student(pair), ckpt.load_model(), tokens, settings, val_tokens=val, checkpoint_dir=tmp_path / "b",
             progress=False)
    monkeypatch.setattr(healing, "train_step", real_step)
    resumed, again = heal(student(pair), ckpt.load_model(), tokens, settings, val_tokens=val,
                          checkpoint_dir=tmp_path / "b", progress=False)
    assert again["resumed_from_step"] == 4
    assert again["kept_step"] == report["kept_step"] and (keep_best or report["kept_step"] == 6)
    for (k, a), b in zip(params(whole).items(), params(resumed).values()):
        np.testing.assert_array_equal(a, b, err_msg=str(k))
    assert [x.get("loss") for x in again["history"]] == [x.get("loss") for x in report["history"]]
    # How a step is computed is not part of the run: with remat on, the finished run is found again.
    _, same = heal(student(pair), ckpt.load_model(), tokens, dataclasses.replace(settings, remat=True),
                   val_tokens=val, checkpoint_dir=tmp_path / "b", progress=False)
    assert same["resumed_from_step"] == 6
    # Another run's settings or data do not continue this one (and leave the caller's model untouched).
    fresh = student(pair)
    with pytest.raises(UserError, match="holds a run with other settings"):
        heal(fresh, ckpt.load_model(), tokens, HealSettings(steps=5, batch_size=2, warmup=1, method="lora"),
             checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(UserError, match="holds a run with other data"):
        heal(fresh, ckpt.load_model(), tokens[::-1], settings, val_tokens=val, checkpoint_dir=tmp_path / "b",
             progress=False)
    assert not nnx.state(fresh, healing.LoRAParam)


def test_keep_best_ends_with_the_best_validated_weights(pair):
    ckpt, compressed = pair
    settings = HealSettings(steps=3, batch_size=4, lr=0.5, warmup=0, eval_every=1, keep_best=True, clip_norm=1e9,
                            train_embeddings=True)
    model, report = heal(student(pair), ckpt.load_model(), data(), settings, val_tokens=data(4, seed=9),
                         progress=False)
    vals = [x["validation_perplexity"] for x in report["history"] if "validation_perplexity" in x]
    assert len(vals) == 4 and min(vals) == vals[0] < vals[-1]  # a learning rate that only makes things worse
    assert report["kept_step"] == 0 and report["validation_perplexity"]["after"] == vals[0]
    for (k, a), b in zip(params(compressed).items(), params(model).values()):
        np.testing.assert_array_equal(a, b, err_msg=str(k))
    with pytest.raises(UserError, match="keep_best needs validation windows"):
        heal(student(pair), ckpt.load_model(), data(), settings, progress=False)


def test_bad_input_is_refused(pair, tmp_path):
    ckpt, _ = pair
    with pytest.raises(UserError, match="need 400 windows, the data gives 32"):
        heal(student(pair), ckpt.load_model(), data(), HealSettings(steps=100, batch_size=4), progress=False)
    other_vocab = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=64))
    with pytest.raises(UserError, match="teacher has a vocabulary of 64 tokens, the model one of 128"):
        heal(student(pair), other_vocab, data(), HealSettings(steps=1, warmup=0), progress=False)
    with pytest.raises(UserError, match="needs a teacher"):
        heal(student(pair), None, data(), HealSettings(steps=1, warmup=0), progress=False)
    with pytest.raises(UserError, match="lr must be"):
        HealSettings(lr=0.0).validate()
    with pytest.raises(UserError, match="train_embeddings applies to method full"):
        HealSettings(method="lora", train_embeddings=True).validate()
    with pytest.raises(UserError, match="param_dtype must be one of float32, bfloat16, got 'float16'"):
        HealSettings(param_dtype="float16").validate()
    with pytest.raises(UserError, match=r"warmup \(10\) must be less than steps \(4\)"):
        HealSettings(steps=4, warmup=10).validate()
    with pytest.raises(UserError, match="lora_targets nothing name no projection of this model"):
        add_lora(nnx.clone(pair[1]), ("nothing",))
    two_data_shards = types.SimpleNamespace(shape={"data": 2, "model": 4})  # all that the checks read of a mesh
    with pytest.raises(UserError, match=r"batch_size 3 must be a multiple of the mesh's data axis \(2\)"):
        heal(student(pair), ckpt.load_model(), data(), HealSettings(steps=1, warmup=0, batch_size=3),
             mesh=two_data_shards, progress=False)
    from modegpt_jax.mesh import global_batch

    with pytest.raises(UserError, match="a batch of 3 rows cannot be split evenly over the mesh's 2 data shards"):
        global_batch(data()[:3], two_data_shards)
    with pytest.raises(UserError, match="data wikipedia-validation is the text validation perplexity"):
        heal_checkpoint("unused", "unused", tmp_path / "out", HealSettings(), data="wikipedia-validation")
    settings = HealSettings(steps=4, batch_size=4, lr=1e30, warmup=0, loss="lm", checkpoint_every=1, clip_norm=1e30)
    with pytest.raises(UserError, match="the loss became (nan|inf|-inf) at step .*the last good checkpoint is step"):
        heal(student(pair), None, data() * 0 + 5, settings, checkpoint_dir=tmp_path / "c", progress=False)


def test_a_student_is_any_narrower_model_of_the_teachers_shape(pair):
    from modegpt_jax.config import LayerSpec
    from modegpt_jax.run import architecture_differences

    ckpt, compressed = pair
    dense = ckpt.config
    assert architecture_differences(compressed.config, dense) == []
    # an MLP-only export keeps the stock architecture with a smaller intermediate_size: still a student
    stock = dataclasses.replace(dense, intermediate_size=48).with_layers(
        [LayerSpec(48, dense.head_dim, dense.head_dim) for _ in dense.layers])
    assert architecture_differences(stock, dense) == []
    narrow_teacher = dense.with_layers([LayerSpec(40, 8, 8)] * 2)
    assert architecture_differences(dense, narrow_teacher) == [
        f"layer {i} {name} {dense.intermediate_size if name == 'mlp_width' else dense.head_dim} > "
        f"{40 if name == 'mlp_width' else 8}" for i in range(2) for name in ("mlp_width", "qk_dim", "vo_dim")]
    assert architecture_differences(dataclasses.replace(dense, hidden_size=32), dense) == ["hidden_size 32 vs 64"]


@pytest.mark.real_model
def test_heal_command_writes_a_model_that_transformers_loads(tmp_path, smollm2, tiny_compressed):
    from tests.test_cli_compress import make_tiny_with_tokenizer
    from tests.test_export import load_in_clean_process

    dense, compressed = tiny_compressed
    out = tmp_path / "healed"
    proc = run_cli("heal", "--model", str(compressed), "--teacher", str(dense), "--output", str(out),
                   "--seqlen", "32", "--batch-size", "2", "--steps", "4", "--lr", "1e-3", "--warmup", "1",
                   "--val-windows", "2", "--eval-every", "2", "--checkpoint-every", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "validation perplexity" in proc.stdout
    report = json.loads((out / "heal_report.json").read_text())
    assert [x["step"] for x in report["history"] if "validation_perplexity" in x] == [0, 2, 4]
    assert report["tokens_seen"] == 4 * 2 * 32 and (out / "plots" / "heal.png").stat().st_size > 1000
    assert not (tmp_path / ".healed.heal").exists()  # the checkpoints go once the output is written
    healed = HFCheckpoint(out).load_model()
    before = HFCheckpoint(compressed).load_model()
    assert healed.config == before.config  # the compressed shapes
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 12))
    assert not np.allclose(np.asarray(healed(tokens)), np.asarray(before(tokens)))
    result, logits = load_in_clean_process(out, tokens, tmp_path)
    np.testing.assert_allclose(logits, np.asarray(healed(tokens)), atol=1e-4, rtol=0)

    # A teacher that is not the student's dense model: one line, exit 2, nothing written.
    other = make_tiny_with_tokenizer(tmp_path / "other", smollm2, layers=3)
    proc = run_cli("heal", "--model", str(compressed), "--teacher", str(other), "--output", str(tmp_path / "x"),
                   "--steps", "1", "--warmup", "0")
    assert_user_error(proc, "--model is not a compressed version of --teacher", "num_layers 2 vs 3")
    assert not (tmp_path / "x").exists()


MESH = "data=2,model=4"


def student_dir(pair, tmp_path):
    """The compressed student saved as a Hugging Face directory under ``tmp_path`` (written once)."""
    from converters.hf_export import save_model

    ckpt, compressed = pair
    student = tmp_path / "student"
    if not student.exists():
        save_model(compressed, student, base_hf_config=ckpt.hf_config)
    return student


def worker_weights(pair, tmp_path, spec: str, method: str, processes: int = 1) -> tuple[dict, bool]:
    """The trained weights of ``tests.heal_worker`` on mesh ``spec`` (8 devices in all: one fresh process, or
    ``processes`` jax.distributed ones), and whether a model group spanned processes."""
    import subprocess
    import sys

    from tests.processes import REPO, env_with_devices, run_distributed

    ckpt, compressed = pair
    out = tmp_path / f"{spec.replace(',', '_').replace('=', '')}-{method}-{processes}.npz"
    args = [out, student_dir(pair, tmp_path), ckpt.directory, spec, method]
    if processes == 1:
        proc = subprocess.run([sys.executable, "-m", "tests.heal_worker", *map(str, args)], cwd=REPO,
                              env=env_with_devices(8), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        run_distributed("tests.heal_worker", lambda port, i: [*args, port, i, processes], processes=processes,
                        devices_per_process=8 // processes, timeout=600)
    result = dict(np.load(out))
    spans = bool(result.pop("model_spans_processes"))
    changed = sum(not np.allclose(result[".".join(map(str, k))], v) for k, v in params(compressed).items())
    assert changed > 0  # the comparisons are of trained weights
    return result, spans


def assert_same_weights(got: dict, want: dict, lr: float, outliers: float = 1e-3):
    """Trained weights of two runs (of peak learning rate ``lr``) agree: every entry within float tolerance, except
    at most a fraction ``outliers`` of all entries, each within ``2 lr``. AdamW divides every gradient entry by its
    own running magnitude, so an entry whose gradient is close to zero moves by a fair part of ``lr`` whatever its
    last bits are, and a sharded run sums its gradients in another order (one such entry of 3,840, off by 6e-5 at
    lr 3e-3, was seen between 2 processes of 4 devices and one device). A wrong shard or a missed all-reduce moves
    far more entries than that."""
    assert got.keys() == want.keys()
    loose, total = [], 0
    for name in want:
        assert got[name].shape == want[name].shape, name
        diff = np.abs(got[name].astype(np.float64) - want[name])
        off = diff > 2e-5 + 1e-4 * np.abs(want[name])
        assert np.all(diff[off] <= 2 * lr), f"{name}: an entry differs by {diff.max():.3g}, more than 2 lr"
        loose += [(name, int(off.sum()), float(diff.max()))] if off.any() else []
        total += want[name].size
    assert sum(n for _, n, _ in loose) <= outliers * total, f"entries off by more than float tolerance: {loose}"


def test_training_on_a_mesh_matches_one_device(pair, tmp_path):
    """Both losses with accumulation, keep-best and checkpoints, in fresh processes: LoRA with batches split over data
    and weights over model, on 8 devices and on 2 processes, gives the same weights as on one device."""
    one, _ = worker_weights(pair, tmp_path, "none", "lora")
    many, spans = worker_weights(pair, tmp_path, MESH, "lora")
    assert not spans
    assert_same_weights(many, one, WORKER_LR)

    # Two jax.distributed processes of 4 devices each, data across them and model within each: the same weights.
    two, spans = worker_weights(pair, tmp_path, MESH, "lora", processes=2)
    assert not spans
    assert (tmp_path / "data2_model4-lora-2.npz.checkpoints").is_dir()  # orbax checkpoints written by both
    assert_same_weights(two, one, WORKER_LR)


@pytest.mark.slow
def test_model_groups_spanning_processes_match_one_device(pair, tmp_path):
    """Four processes of 2 devices each on the mesh data=2,model=4: every model group spans two processes, so the
    trained weights (full fine-tuning) and their optimiser state are split across processes; the same weights as
    full fine-tuning on one device."""
    one, _ = worker_weights(pair, tmp_path, "none", "full")
    four, spans = worker_weights(pair, tmp_path, MESH, "full", processes=4)
    assert spans
    assert_same_weights(four, one, WORKER_LR)
