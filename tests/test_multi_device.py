"""Several simulated CPU devices on the real model and at real shapes.

Tiny models hide what goes wrong at real sizes: a two-device SmolLM2 run once hung at its first value-output SVD
while every tiny multi-device test passed. Each case runs in a fresh process (the device count is fixed when JAX
starts) with a timeout, so a hang fails the test instead of stopping the suite.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.processes import REPO, env_with_devices, run_distributed

TIMEOUT_S = 600


def _python(code: str, devices: int, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env_with_devices(devices),
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
    proc = subprocess.run(cmd, cwd=REPO, env=env_with_devices(devices), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def smollm2_one_device(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "one"
    return out, _compress(out, "data=1", devices=1)


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("mesh", ["data=2", "model=2"])
def test_smollm2_on_two_devices_matches_one_device(smollm2_one_device, mesh, tmp_path):
    """`modegpt compress` of the real SmolLM2 on two devices, data parallel or tensor parallel, finishes and
    compresses as one device does (logits agree to float32 summation order over 30 layers)."""
    from converters.hf_import import HFCheckpoint

    one_dir, one = smollm2_one_device
    two = _compress(tmp_path / "two", mesh, devices=2)
    axis, size = mesh.split("=")
    assert two["devices"]["mesh"] == {"data": 1, "model": 1, axis: int(size)}
    assert [x["mlp_width"] for x in two["layers"]] == [x["mlp_width"] for x in one["layers"]]
    assert [x["qk_dim"] for x in two["layers"]] == [x["qk_dim"] for x in one["layers"]]
    for a, b in zip(two["layers"], one["layers"]):
        for key in ("mlp", "vo"):
            assert a["errors"][key] == pytest.approx(b["errors"][key], rel=1e-3, abs=1e-6)
    tokens = np.random.default_rng(0).integers(0, 49152, (2, 32))
    np.testing.assert_allclose(np.asarray(HFCheckpoint(tmp_path / "two").load_model()(tokens)),
                               np.asarray(HFCheckpoint(one_dir).load_model()(tokens)), atol=1e-2, rtol=1e-3)


# -- tensor parallelism on a tiny Llama whose every width divides by 4 -------------------------------------------
MESH = "data=2,model=4"
SPLIT = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "gate_proj": 1, "up_proj": 1, "o_proj": 0, "down_proj": 0}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tp") / "tiny"
    transformers.AutoModelForCausalLM.from_config(config).eval().save_pretrained(out)
    return out


def _worker(out: Path, checkpoint: Path, mesh: str, devices: int) -> Path:
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_worker", str(out), str(checkpoint), mesh], cwd=REPO,
                          env=env_with_devices(devices), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def one_device_run(tiny_checkpoint, tmp_path_factory):
    return _worker(tmp_path_factory.mktemp("tp") / "one", tiny_checkpoint, "data=1", 1)


@pytest.fixture(scope="module")
def tensor_parallel_run(tiny_checkpoint, tmp_path_factory):
    return _worker(tmp_path_factory.mktemp("tp") / "eight", tiny_checkpoint, MESH, 8)


def _layout(run: Path, process: int = 0) -> list[dict]:
    return json.loads((run / f"process_{process}.json").read_text())["layout"]


def _dense_block_weights(layout):
    """(pass, name, description) of every dense block weight a pass received (argument 1 is the dense block)."""
    for entry in layout:
        if entry["pass"] == "_mlp_pass":
            continue  # its modules are the compressed ones
        for key, desc in entry["weights"].items():
            arg, name = key.split(":", 1)
            if arg == "1":
                yield entry["pass"], name, desc


def test_no_block_weight_is_whole_on_every_device(tensor_parallel_run):
    """With model > 1 every projection of a dense block reaches the passes split over "model": 1/4 of its split
    dimension on each device, never a full copy; norms and RoPE tables are whole."""
    seen = 0
    for name_pass, name, desc in _dense_block_weights(_layout(tensor_parallel_run)):
        owner = name.split(".")[-2] if "." in name else ""
        if owner in SPLIT and name.endswith("kernel"):
            axis = SPLIT[owner]
            assert not desc["replicated"], (name_pass, name, desc)
            assert desc["shard_shape"][axis] * 4 == desc["shape"][axis], (name_pass, name, desc)
            assert desc["shard_shape"][1 - axis] == desc["shape"][1 - axis], (name_pass, name, desc)
            seen += 1
        else:
            assert desc["replicated"], (name_pass, name, desc)
    assert seen >= 3 * 7 * 3  # three passes over three layers, seven projections each


def test_statistics_are_split_over_model_and_hidden_states_over_data(tensor_parallel_run):
    layout = _layout(tensor_parallel_run)
    grams = [(e["outputs"]["['C']"] if e["pass"] == "_attention_statistics" else e["outputs"]["[1]"])
             for e in layout if e["pass"] in ("_attention_statistics", "_attention_pass")]
    assert len(grams) >= 6
    for desc in grams:  # C [64, 64] and C_s [96, 96]: rows split over the four model devices
        assert desc["spec"].startswith("PartitionSpec('model'") or desc["spec"].startswith("P('model'"), desc
        assert desc["shard_shape"] == [desc["shape"][0] // 4, desc["shape"][1]], desc
    hidden = [e["outputs"]["[0]"] for e in layout if e["pass"] in ("_attention_pass", "_influence_pass")]
    hidden += [e["outputs"][""] for e in layout if e["pass"] == "_mlp_pass"]
    for desc in hidden:  # [8, 24, 64]: rows split over the two data positions, whole over model
        assert desc["shard_shape"] == [desc["shape"][0] // 2, *desc["shape"][1:]], desc


def _replica_groups(text: str) -> list[set[frozenset[int]]]:
    """The replica groups of every all-reduce in HLO text (explicit ``{{0,4},...}`` or iota ``[4,2]<=[2,4]T(1,0)``)."""
    import re

    out = []
    for line in text.splitlines():
        if " all-reduce(" not in line and "all-reduce-start(" not in line:
            continue
        m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
        if m:
            out.append({frozenset(int(v) for v in g.split(",") if v) for g in re.findall(r"\{([\d,]*)\}", m.group(1))})
            continue
        m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
        if m:
            dims = [int(v) for v in m.group(3).split(",")]
            ids = np.arange(int(np.prod(dims))).reshape(dims)
            if m.group(4):
                ids = ids.transpose([int(v) for v in m.group(4).split(",")])
            out.append({frozenset(row.tolist()) for row in ids.reshape(int(m.group(1)), int(m.group(2)))})
    return out


def test_statistics_step_sums_over_data_with_one_all_reduce(tensor_parallel_run):
    """The compiled attention statistics step adds the data shards' sums with an all-reduce among the devices
    that share a model position (mesh positions (d, m) are devices 4 d + m)."""
    over_data = {frozenset({m, 4 + m}) for m in range(4)}
    groups = _replica_groups((tensor_parallel_run / "attention_statistics.hlo").read_text())
    assert over_data in groups, groups


def test_tensor_parallel_result_matches_one_device(tensor_parallel_run, one_device_run):
    with np.load(tensor_parallel_run / "weights.npz") as a, np.load(one_device_run / "weights.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in b.files:
            assert a[key].shape == b[key].shape, key
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_two_processes_hold_the_same_weights(tiny_checkpoint, tensor_parallel_run, tmp_path):
    """Two jax.distributed processes (gloo) with four devices each, data=2,model=4: both end with bitwise the
    same compressed blocks (checksums), and the model written equals the one-process eight-device result."""
    run_distributed("tests.mesh_worker", lambda port, i: [tmp_path, tiny_checkpoint, MESH, port, i, 2], processes=2,
                    devices_per_process=4, timeout=TIMEOUT_S)
    records = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    assert records[0]["processes"] == 2 and records[0]["mesh"] == {"data": 2, "model": 4}
    assert records[0]["checksums"] == records[1]["checksums"]
    assert len(records[0]["checksums"]) == 3
    with np.load(tmp_path / "weights.npz") as a, np.load(tensor_parallel_run / "weights.npz") as b:
        for key in b.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_model_axis_divides_the_bytes_each_device_holds(tensor_parallel_run, one_device_run):
    """report.json's bytes per device: the largest statistic is a quarter of the one-device one, a dense block
    little more than a quarter (its norms and RoPE tables are whole everywhere)."""
    tp, one = (json.loads((run / "process_0.json").read_text())["peak_bytes_per_device"]
               for run in (tensor_parallel_run, one_device_run))
    assert one["statistics"] == 96 * 96 * 4 and tp["statistics"] * 4 == one["statistics"]
    assert one["block"] / 4 < tp["block"] < one["block"] / 4 * 1.1


def test_a_sharded_model_in_memory_compresses_like_the_checkpoint(tiny_checkpoint, tensor_parallel_run, tmp_path):
    """The Python API with a model the caller already sharded on the mesh, rather than a checkpoint to stream."""
    run = _worker(tmp_path, tiny_checkpoint, MESH + "@memory", 8)
    assert json.loads((run / "process_0.json").read_text())["checksums"] == json.loads(
        (tensor_parallel_run / "process_0.json").read_text())["checksums"]
    assert not any(d["replicated"] for _, name, d in _dense_block_weights(_layout(run)) if name.endswith("proj.kernel"))
