"""The teacher cache of ``modegpt heal``: the teacher's last hidden states on the training windows, computed block by
block on disk, resumed after a kill, refused for another run, and training on it like on the whole teacher."""

import dataclasses
import json

import numpy as np
import pytest

from modegpt_jax import heal as healing
from modegpt_jax import model as modeling
from modegpt_jax.errors import UserError
from modegpt_jax.heal import HealSettings, heal
from modegpt_jax.teacher_cache import TeacherCache, fill_teacher_cache
from tests import test_heal
from tests.test_heal import data, params, student

pair = test_heal.pair  # the fixture: (dense checkpoint, compressed model) of a tiny Llama


#: the windows and settings of the multi-process test and its worker (tests.teacher_cache_worker)
WINDOWS = data(16, length=16)
SETTINGS = HealSettings(steps=2, batch_size=8, lr=3e-3, warmup=0, loss="kd+lm")


def cache_for(ckpt, directory, windows, dtype="float32"):
    return TeacherCache(directory, {"teacher": "tiny", "windows": healing.digest(windows), "dtype": dtype},
                        (*windows.shape, ckpt.config.hidden_size))


def test_filled_cache_holds_the_teachers_last_hidden_states(pair, tmp_path):
    ckpt, _ = pair
    windows = data(10, length=16)
    cache = cache_for(ckpt, tmp_path / "c", windows)
    fill_teacher_cache(cache, ckpt, windows, batch_size=4, progress=False)  # 4 + 4 + 2 windows
    assert cache.complete and sorted(p.name for p in cache.directory.iterdir()) == ["hidden.f32", "lock", "meta.json"]
    expected = np.asarray(healing.trunk(ckpt.load_model(), windows))
    np.testing.assert_allclose(cache.hidden, expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 0.1


def test_killed_fill_continues_to_the_same_states(pair, tmp_path, monkeypatch):
    ckpt, _ = pair
    windows = data(10, length=16)
    whole = cache_for(ckpt, tmp_path / "whole", windows)
    fill_teacher_cache(whole, ckpt, windows, batch_size=4, progress=False)

    real, calls = modeling.run_block, []

    def dies_on_the_fifth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # block 1, its second batch: block 0 and one batch of block 1 are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "run_block", dies_on_the_fifth_batch)
    killed = cache_for(ckpt, tmp_path / "killed", windows)
    with pytest.raises(KeyboardInterrupt):
        fill_teacher_cache(killed, ckpt, windows, batch_size=4, progress=False)
    meta = json.loads((tmp_path / "killed" / "meta.json").read_text())
    assert (meta["stage"], meta["rows"], meta["complete"]) == (2, 4, False)
    monkeypatch.setattr(modeling, "run_block", real)
    again = cache_for(ckpt, tmp_path / "killed", windows)  # a new process opens the same directory
    fill_teacher_cache(again, ckpt, windows, batch_size=3, progress=False)  # continues at window 4, 3 at a time
    np.testing.assert_allclose(again.hidden, whole.hidden, rtol=1e-6, atol=1e-6)


def test_a_cache_of_another_run_is_refused(pair, tmp_path):
    ckpt, _ = pair
    windows = data(4, length=16)
    cache = cache_for(ckpt, tmp_path / "c", windows)
    fill_teacher_cache(cache, ckpt, windows, progress=False)
    with pytest.raises(UserError, match=r"holds the teacher's states for another run \(other windows\)"):
        cache_for(ckpt, tmp_path / "c", windows[::-1])
    with pytest.raises(UserError, match=r"\(other dtype\)"):
        cache_for(ckpt, tmp_path / "c", windows, dtype="bfloat16")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="non-empty directory without a cache"):
        cache_for(ckpt, tmp_path / "other", windows)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine" and cache.complete
    # A second process filling the same directory at once is refused (the lock is held by the first).
    other = cache_for(ckpt, tmp_path / "busy", windows)
    with other.lock():
        with pytest.raises(UserError, match="being filled by another process"):
            fill_teacher_cache(cache_for(ckpt, tmp_path / "busy", windows), ckpt, windows, progress=False)
    (tmp_path / "c" / "meta.json").write_text("{")
    with pytest.raises(UserError, match="meta.json is unreadable"):
        cache_for(ckpt, tmp_path / "c", windows)


@pytest.mark.parametrize("loss", ["kd", pytest.param("kd+lm", marks=pytest.mark.slow)])
def test_training_on_the_cache_and_the_head_matches_the_whole_teacher(pair, tmp_path, loss):
    ckpt, _ = pair
    windows = data(8, length=16)
    cache = cache_for(ckpt, tmp_path / "c", windows)
    fill_teacher_cache(cache, ckpt, windows, progress=False)
    head_only = ckpt.load_shell(dataclasses.replace(ckpt.config, layers=()))
    settings = HealSettings(steps=2, batch_size=4, lr=1e-4, warmup=0, loss=loss)
    whole, expected = heal(student(pair), ckpt.load_model(), windows, settings, checkpoint_dir=tmp_path / "run",
                           progress=False)
    cached, report = heal(student(pair), head_only, windows, settings, teacher_hidden=cache.hidden, progress=False)
    assert [x["loss"] for x in report["history"]] == pytest.approx([x["loss"] for x in expected["history"]],
                                                                   rel=1e-5)
    start, trained = params(student(pair)), params(cached)
    for name, value in params(whole).items():
        np.testing.assert_allclose(trained[name], value, rtol=1e-5, atol=1e-6, err_msg=str(name))
    assert any(not np.array_equal(trained[name], start[name]) for name in start)
    # The run's checkpoints are found again with the cache (the teacher is the same, whether its blocks run or not).
    _, resumed = heal(student(pair), head_only, windows, settings, teacher_hidden=cache.hidden,
                      checkpoint_dir=tmp_path / "run", progress=False)
    assert resumed["resumed_from_step"] == 2
    with pytest.raises(UserError, match="teacher_hidden has shape"):
        heal(student(pair), head_only, windows[:4], settings, teacher_hidden=cache.hidden, progress=False)


@pytest.mark.real_model
def test_heal_command_fills_the_cache_once_and_reuses_it(tmp_path, tiny_compressed):
    from modegpt_jax.run import heal_checkpoint

    dense, compressed = tiny_compressed
    settings = HealSettings(steps=2, batch_size=2, lr=1e-4, warmup=0)
    kwargs = dict(seqlen=32, val_windows=0, progress=False)
    plain = heal_checkpoint(compressed, dense, tmp_path / "plain", settings, **kwargs)
    first = heal_checkpoint(compressed, dense, tmp_path / "first", settings, teacher_cache=tmp_path / "cache",
                            **kwargs)
    again = heal_checkpoint(compressed, dense, tmp_path / "again", dataclasses.replace(settings, lr=2e-4),
                            teacher_cache=tmp_path / "cache", **kwargs)
    assert plain["teacher_cache"] is None
    assert (first["teacher_cache"]["reused"], again["teacher_cache"]["reused"]) == (False, True)
    assert [x["loss"] for x in first["history"]] == pytest.approx([x["loss"] for x in plain["history"]], rel=1e-5)
    assert again["history"][0]["loss"] == pytest.approx(first["history"][0]["loss"], rel=1e-6)  # the same batch
    assert again["history"][1]["loss"] != pytest.approx(first["history"][1]["loss"], rel=1e-6)  # after other steps
    with pytest.raises(UserError, match="holds the teacher's states for another run"):
        heal_checkpoint(compressed, dense, tmp_path / "x", dataclasses.replace(settings, seed=1),
                        teacher_cache=tmp_path / "cache", **kwargs)
    with pytest.raises(UserError, match="loss lm uses no teacher"):
        heal_checkpoint(compressed, dense, tmp_path / "x", dataclasses.replace(settings, loss="lm"),
                        teacher_cache=tmp_path / "cache", **kwargs)
    with pytest.raises(UserError, match="keep_best needs validation windows"):  # before a new cache is filled
        heal_checkpoint(compressed, dense, tmp_path / "x", dataclasses.replace(settings, keep_best=True),
                        teacher_cache=tmp_path / "new-cache", **kwargs)
    assert not (tmp_path / "x").exists() and not (tmp_path / "new-cache").exists()


@pytest.mark.slow  # two runs of two jax.distributed processes: about a minute
def test_processes_share_a_cache_process_0_fills(pair, tmp_path):
    """Two jax.distributed processes of 4 devices each: process 0 fills one cache directory while the other waits,
    both train on it (mesh data=2,model=4), and the weights equal one device's with the whole teacher. A directory
    one process sees without the other's cache in it stops both, before any fill."""
    from tests.processes import run_distributed
    from tests.test_heal import assert_same_weights, student_dir

    ckpt, _ = pair
    model, _ = heal(student(pair), ckpt.load_model(), WINDOWS, SETTINGS, progress=False)
    want = {".".join(map(str, k)): np.asarray(v) for k, v in params(model).items()}

    def run(out, cache):
        args = [out, student_dir(pair, tmp_path), ckpt.directory, cache]
        run_distributed("tests.teacher_cache_worker", lambda port, i: [*args, port, i, 2], processes=2,
                        devices_per_process=4, timeout=600)

    out = tmp_path / "shared.npz"
    run(out, tmp_path / "cache")
    got = dict(np.load(out))
    assert not bool(got.pop("reused"))
    assert json.loads((tmp_path / "cache" / "meta.json").read_text())["complete"]
    assert_same_weights(got, want, SETTINGS.lr)

    alone = tmp_path / "alone.npz"
    run(alone, tmp_path / "cache-{process}")  # each process its own directory: process 1 sees no cache in its own
    for i in range(2):
        assert "every process sees at the same path" in (tmp_path / f"alone.npz.error-{i}").read_text()
    assert not alone.exists() and not (tmp_path / "cache-0" / "hidden.f32").exists()

    # A fill process 0 cannot do (another process holds the directory) stops the waiting process too, not a hang.
    shape = (*WINDOWS.shape, ckpt.config.hidden_size)
    busy = TeacherCache(tmp_path / "busy", {"windows": healing.digest(WINDOWS)}, shape)
    with busy.lock():
        run(tmp_path / "busy.npz", tmp_path / "busy")
    assert "being filled by another process" in (tmp_path / "busy.npz.error-0").read_text()
    assert "process 0 stopped filling it" in (tmp_path / "busy.npz.error-1").read_text()
