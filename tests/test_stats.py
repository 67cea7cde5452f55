"""Calibration statistics: exact against NumPy float64, and the same on 1 device, 8 devices and 2 processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modegpt_jax import stats
from modegpt_jax.errors import UserError
from modegpt_jax.mesh import make_mesh, parse_mesh_spec, replicate, shard_batch
from tests import stats_worker
from tests.processes import REPO, env_with_devices, run_distributed

SUBPROCESS_TIMEOUT_S = 120  # a hung collective fails the test instead of blocking the run


def assert_close(got, ref, what=""):
    """Equal to float32 rounding of sums: relative 2e-6 per entry, or 2e-6 of the largest entry for tiny ones."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, what
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max(), err_msg=what)


def rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------ NumPy references


def np_gram(x, mask=None):
    x = np.asarray(x, np.float64)
    if mask is not None:
        x = x[mask]
    x = x.reshape(-1, x.shape[-1])
    return x.T @ x


def np_energy(y, mask=None):
    y = np.asarray(y, np.float64)
    if mask is not None:
        y = y[mask]
    return np.square(y).reshape(-1, *y.shape[-2:]).sum(0)


def np_cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# ------------------------------------------------------------------------------------------------ single statistics


def test_gram_matches_numpy():
    x = (rng().standard_normal((3, 50, 32)) * rng(1).uniform(0.1, 4, 32) + 1.0).astype(np.float32)
    got = stats.gram(x)
    assert got.dtype == jnp.float32 and got.shape == (32, 32)
    assert_close(got, np_gram(x))


def test_wide_gram_from_its_upper_blocks_matches_numpy():
    n = stats.GRAM_BLOCK_MIN_WIDTH + 77  # blocks of unequal widths
    x = (rng().standard_normal((2, 40, n)) * rng(1).uniform(0.1, 4, n)).astype(np.float32)
    got = np.asarray(stats.gram(x))
    assert_close(got, np_gram(x))
    np.testing.assert_array_equal(got, got.T)  # the lower blocks are the upper ones transposed


def test_gram_of_bfloat16_sums_exact_products_in_float32():
    x = jnp.asarray(rng().standard_normal((4, 64, 16)), jnp.bfloat16)
    got = stats.gram(x)
    assert got.dtype == jnp.float32
    # Reference on the bf16-rounded values: only the float32 summation may differ, not a bf16 accumulation.
    assert_close(got, np_gram(np.asarray(x.astype(jnp.float32))))


def test_masked_gram_ignores_padding_even_when_it_is_nan():
    x = rng().standard_normal((3, 10, 8)).astype(np.float32)
    mask = np.arange(10)[None, :] < np.array([10, 4, 7])[:, None]
    x_padded = np.where(mask[..., None], x, np.nan).astype(np.float32)
    assert_close(stats.gram(x_padded, mask=mask), np_gram(x, mask))
    # An int 0/1 mask means the same as a bool one.
    assert_close(stats.gram(x_padded, mask=mask.astype(np.int32)), np_gram(x, mask))


def test_channel_energy_matches_numpy_flat_and_per_head():
    heads, dh = 4, 8
    y = (rng().standard_normal((2, 30, heads * dh)) * rng(1).uniform(0.1, 3, heads * dh)).astype(np.float32)
    ref = np_energy(y.reshape(2, 30, heads, dh))
    got = stats.channel_energy(y, heads)
    assert got.shape == (heads, dh)
    assert_close(got, ref)
    assert_close(stats.channel_energy(y.reshape(2, 30, heads, dh)), ref)
    mask = rng(2).random((2, 30)) < 0.6
    assert_close(stats.channel_energy(y, heads, mask=mask), np_energy(y.reshape(2, 30, heads, dh), mask))
    with pytest.raises(ValueError):
        stats.channel_energy(y, 5)  # 32 channels cannot be split into 5 heads


def test_cosine_sum_matches_numpy():
    a = rng().standard_normal((3, 20, 16)).astype(np.float32)
    b = (a + rng(1).standard_normal((3, 20, 16))).astype(np.float32)
    got = stats.cosine_sum(a, b)
    cos = np_cosines(a, b)
    assert int(got.count) == 60 and got.count.dtype == jnp.int32
    assert_close(got.total, cos.sum())
    mask = rng(2).random((3, 20)) < 0.5
    got = stats.cosine_sum(a, b, mask=mask)
    assert int(got.count) == mask.sum()
    assert_close(got.total, cos[mask].sum())
    assert got.mean() == pytest.approx(cos[mask].mean(), rel=1e-5)


def test_cosine_of_a_zero_vector_is_zero_not_nan():
    a = np.zeros((1, 2, 4), np.float32)
    a[0, 1] = 2.0  # token 0 is the zero vector, token 1 is parallel to its partner
    got = stats.cosine_sum(a, np.ones((1, 2, 4), np.float32))
    assert float(got.total) == pytest.approx(1.0) and int(got.count) == 2


def test_float64_statistics():
    # Values whose float32 sum loses digits: a large common offset plus small variations.
    x = (1000.0 + rng().standard_normal((2, 40, 6))).astype(np.float64)
    with pytest.raises(UserError, match="JAX_ENABLE_X64"):
        stats.gram(x.astype(np.float32), dtype="float64")
    with jax.enable_x64(True):
        got = stats.gram(x, dtype="float64")
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), np_gram(x), rtol=1e-13)
        got32 = stats.gram(x.astype(np.float32), dtype="float64")  # float32 inputs, exact float64 sums
        np.testing.assert_allclose(np.asarray(got32), np_gram(x.astype(np.float32)), rtol=1e-13)
    with pytest.raises(UserError):
        stats.gram(x, dtype="float16")


# ------------------------------------------------------------------------------------------------ accumulation


def test_accumulator_adds_batches_and_leaves_the_callers_arrays_alone():
    batches = [rng(i).standard_normal((2, 5, 6)).astype(np.float32) for i in range(3)]
    acc = stats.Accumulator()
    first = stats.gram(batches[0])
    for i, x in enumerate(batches):
        acc.add("C", first if i == 0 else stats.gram(x))
        acc.add("cos", stats.cosine_sum(x, x[::-1]))
    assert not first.is_deleted()  # the first value starts the sum but is never donated
    out = acc.finalize()
    assert acc.names == ["C", "cos"] and "C" in acc
    assert isinstance(out["C"], np.ndarray)
    assert_close(out["C"], np_gram(np.stack(batches)))
    all_cos = np.concatenate([np_cosines(x, x[::-1]).ravel() for x in batches])
    assert isinstance(out["cos"], stats.CosineSum) and int(out["cos"].count) == all_cos.size
    assert_close(out["cos"].total, all_cos.sum())
    with pytest.raises(ValueError):
        acc.add("C", stats.gram(np.ones((1, 1, 3), np.float32)))
    acc.reset()
    assert acc.finalize() == {}


def test_finalize_names_the_non_finite_statistic():
    acc = stats.Accumulator()
    acc.add("C", stats.gram(np.ones((1, 2, 3), np.float32)))
    x = np.ones((1, 2, 4), np.float32)
    x[0, 1, 2] = np.inf
    acc.add("C_s", stats.gram(x))
    with pytest.raises(UserError, match=r"'C_s' \(layer 3\)") as err:
        acc.finalize(where="layer 3")
    assert "'C'" not in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize(
    "spec, shape",
    [(None, (8, 1)), ("", (8, 1)), ("data=8", (8, 1)), ("data=4,model=2", (4, 2)), (" model = 8 ", (1, 8))],
)
def test_parse_mesh_spec(spec, shape):
    assert tuple(parse_mesh_spec(spec, 8).values()) == shape


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=4", "uses 4 devices .* but 8 are available"),
        ("data=4,model=4", "uses 16 devices"),
        ("batch=8", "unknown axis 'batch'"),
        ("data=two", "positive integer"),
        ("data=2.5", "positive integer"),
        ("data=0,model=8", "positive integer"),
        ("data8", "AXIS=SIZE"),
        ("data=4,data=2", "given twice"),
    ],
)
def test_bad_mesh_spec_is_a_one_line_user_error(spec, message):
    with pytest.raises(UserError, match=message) as err:
        parse_mesh_spec(spec, 8)
    assert "\n" not in str(err.value) and "--mesh" in str(err.value)


def test_make_mesh_on_this_process():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": jax.device_count(), "model": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(UserError):
        make_mesh(f"data={jax.device_count() + 1}")
    x = np.arange(24, dtype=np.float32).reshape(jax.device_count() * 2, -1)
    sharded = shard_batch(x, mesh)
    assert sharded.sharding.spec == jax.sharding.PartitionSpec("data", None)
    np.testing.assert_array_equal(np.asarray(sharded), x)
    # Without mesh=, a statistic runs on the mesh its input is sharded on and comes back replicated there.
    c = stats.gram(sharded[:, None, :])
    assert c.sharding.mesh == mesh and c.sharding.is_fully_replicated
    assert_close(c, np_gram(x))
    rep = replicate(x, mesh)
    assert rep.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(rep), x)


# ------------------------------------------------------------------------------------------------ devices, processes


@pytest.fixture(scope="module")
def one_device_result():
    """The worker's statistics computed in this process, checked against NumPy float64 first."""
    result = stats_worker.compute(make_mesh())
    batches = [stats_worker.batch(i) for i in range(stats_worker.BATCHES)]
    cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    heads_q = cat["q"].reshape(*cat["q"].shape[:2], stats_worker.HEADS, stats_worker.DH)
    cos = np_cosines(cat["h_in"], cat["h_out"])
    expected = {
        "C": np_gram(cat["x"]),
        "C_model": np_gram(cat["x"]),
        "C_s_masked": np_gram(cat["a"], cat["mask"]),
        "E_q": np_energy(heads_q),
        "E_q_masked": np_energy(heads_q, cat["mask"]),
        "cos.total": cos.sum(),
        "cos.count": cos.size,
        "cos_masked.total": cos[cat["mask"]].sum(),
        "cos_masked.count": cat["mask"].sum(),
    }
    for name, ref in expected.items():
        assert_close(result[name], ref, name)
    return result


def _compare(saved: Path, specs: list[str], reference: dict, devices: int):
    with np.load(saved) as z:
        for spec in specs:
            for name, ref in reference.items():
                if not name.startswith("layout/"):
                    assert_close(z[f"{spec}/{name}"], ref, f"{spec}: {name}")
            assert int(z[f"{spec}/layout/devices"]) == devices
            assert bool(z[f"{spec}/layout/C_replicated"])
            model = parse_mesh_spec(spec, devices)["model"]
            # shard_model=True splits the sum over "model" (jit drops a size-1 axis from the spec).
            assert str(z[f"{spec}/layout/C_model_spec"]) == ("P('model',)" if model > 1 else "P()")


def test_eight_devices_match_one_device(one_device_result, tmp_path):
    specs = ["data=8", "data=4,model=2"]
    out = tmp_path / "eight.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.stats_worker", "devices", str(out), *specs],
        cwd=REPO, env=env_with_devices(8), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _compare(out, specs, one_device_result, devices=8)


def test_two_processes_match_one_device(one_device_result, tmp_path):
    # Two processes with two CPU devices each: "data=2,model=2" also reads a "model"-sharded sum across processes.
    specs = ["data=4", "data=2,model=2"]
    out = tmp_path / "two.npz"
    run_distributed("tests.stats_worker", lambda port, i: ["distributed", out, port, i, 2, *specs], processes=2,
                    devices_per_process=2, timeout=SUBPROCESS_TIMEOUT_S)
    _compare(out, specs, one_device_result, devices=4)
