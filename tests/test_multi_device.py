"""Several simulated CPU devices on the real model and at real shapes.

Tiny models hide what goes wrong at real sizes: a two-device SmolLM2 run once hung at its first value-output SVD
while every tiny multi-device test passed. Each case runs in a fresh process (the device count is fixed when JAX
starts) with a timeout, so a hang fails the test instead of stopping the suite.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _python(code: str, devices: int, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def test_factorisations_of_inputs_replicated_over_two_devices(tmp_path):
    """Value-output SVD, Nystrom and leverage scores at SmolLM2's shapes with every input replicated over a
    two-device mesh: they finish (batched LAPACK kernels on several CPU devices at once used to deadlock XLA's
    thread pool) and give exactly the one-device result."""
    out = tmp_path / "r.npz"
    proc = _python(f"""
        import numpy as np
        from modegpt_jax import decompose
        from modegpt_jax.mesh import make_mesh, replicate
        mesh = make_mesh("data=2")
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2048, 576)).astype(np.float32)
        a = np.maximum(rng.standard_normal((2048, 1536)), 0).astype(np.float32)
        w = dict(C=x.T @ x, C_s=a.T @ a, wv=rng.standard_normal((576, 192)).astype(np.float32),
                 wo=rng.standard_normal((576, 576)).astype(np.float32),
                 wu=rng.standard_normal((576, 1536)).astype(np.float32),
                 wd=rng.standard_normal((1536, 576)).astype(np.float32))
        res = {{}}
        for name, place in (("one", lambda v: v), ("rep", lambda v: replicate(v, mesh))):
            p = {{k: place(v) for k, v in w.items()}}
            vo = decompose.vo_svd(p["C"], p["wv"], p["wo"], 40, 9)
            mlp = decompose.nystrom_mlp(p["C_s"], p["wu"], p["wd"], 1000, w_gate=p["wu"])
            lev = decompose.ridge_leverage_scores(p["C_s"])
            for k, v in dict(w_v=vo["w_v"], w_o=vo["w_o"], w_down=mlp["w_down"], kept=mlp["kept"], lev=lev).items():
                res[f"{{name}}/{{k}}"] = np.asarray(v)
        np.savez("{out}", **res)
    """, devices=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as z:
        for key in ("w_v", "w_o", "w_down", "kept", "lev"):
            np.testing.assert_array_equal(z[f"rep/{key}"], z[f"one/{key}"], err_msg=key)


def _compress(out: Path, mesh: str, devices: int) -> dict:
    cmd = [sys.executable, "-m", "modegpt_jax.cli", "compress", "--model", "smollm2-135m", "--ratio", "0.3",
           "--calib-samples", "8", "--calib-seqlen", "256", "--mesh", mesh, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(devices), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_on_two_devices_matches_one_device(smollm2, tmp_path):
    """`modegpt compress` of the real SmolLM2 on two devices finishes and compresses as one device does (logits
    agree to float32 summation order over 30 layers: statistics are summed per device, then across devices)."""
    from converters.hf_import import HFCheckpoint

    one = _compress(tmp_path / "one", "data=1", devices=1)
    two = _compress(tmp_path / "two", "data=2", devices=2)
    assert two["devices"]["mesh"] == {"data": 2, "model": 1}
    assert [x["mlp_width"] for x in two["layers"]] == [x["mlp_width"] for x in one["layers"]]
    assert [x["qk_dim"] for x in two["layers"]] == [x["qk_dim"] for x in one["layers"]]
    for a, b in zip(two["layers"], one["layers"]):
        for key in ("mlp", "vo"):
            assert a["errors"][key] == pytest.approx(b["errors"][key], rel=1e-3, abs=1e-6)
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 32))
    np.testing.assert_allclose(np.asarray(HFCheckpoint(tmp_path / "two").load_model()(tokens)),
                               np.asarray(HFCheckpoint(tmp_path / "one").load_model()(tokens)), atol=1e-2, rtol=1e-3)
