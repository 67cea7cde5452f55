"""`modegpt compress` end to end on a tiny model that uses the embedded model's real tokenizer."""

import json
import shutil
import subprocess
import sys

import pytest

from tests.test_cli_errors import assert_user_error, run_cli

torch = pytest.importorskip("torch")


def make_tiny_with_tokenizer(out, smollm2, layers=3):
    """A tiny random Llama with the embedded model's vocabulary and real tokenizer files."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=smollm2.config.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.directory / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2):
    return make_tiny_with_tokenizer(tmp_path_factory.mktemp("cli") / "tiny", smollm2)


def test_compress_writes_a_directory_that_eval_reads(tiny_with_tokenizer, tmp_path):
    out = tmp_path / "compressed"
    proc = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.25", "--output", str(out),
                   "--calib-samples", "8", "--calib-seqlen", "32", "--seed", "3", "--eval-perplexity",
                   "--eval-max-windows", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    for key in ("target_ratio", "achieved_block_ratio", "achieved_total_ratio", "params_before", "params_after",
                "layers", "timings_seconds"):
        assert key in report
    assert report["target_ratio"] == 0.25 and report["achieved_block_ratio"] >= 0.25
    assert report["calibration"] == {"samples": 8, "seqlen": 32, "source": "wikipedia", "seed": 3}
    assert {"block_influence", "sparsity", "mlp_width", "qk_dim", "vo_dim", "errors"} <= set(report["layers"][0])
    assert "layer   0:" in proc.stderr + proc.stdout  # the per-layer log line
    card = (out / "README.md").read_text()
    assert f"{report['params_before']:,} -> {report['params_after']:,}" in card

    # The perplexities the run measured are those `modegpt eval` gives the dense and the written model.
    for model, key in ((out, "compressed"), (tiny_with_tokenizer, "dense")):
        ev = run_cli("eval", "--model", str(model), "--seqlen", "32", "--max-windows", "2", "--json", timeout=600)
        assert ev.returncode == 0, ev.stderr
        measured = json.loads(ev.stdout.strip().splitlines()[-1])
        assert measured["windows"] == report["perplexity"]["windows"] == 2
        assert measured["perplexity"] == pytest.approx(report["perplexity"][key], rel=1e-5)
    assert report["perplexity"]["compressed"] != report["perplexity"]["dense"]

    # The console ends with the summary table: one row per layer.
    rows = [line for line in proc.stdout.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [int(r.split()[0]) for r in rows] == [0, 1, 2]
    assert [int(r.split()[3]) for r in rows] == [x["mlp_width"] for x in report["layers"]]

    # Plots that open as images, and the resolved configuration with the library versions.
    import matplotlib.image

    for name in ("allocation", "errors", "params", "perplexity"):
        image = matplotlib.image.imread(out / "plots" / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0
    import yaml
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["ratio"] == 0.25 and saved["calib-samples"] == 8 and saved["seed"] == 3
    assert saved["attention-scale"] == report["settings"]["attention_scale"]  # defaults saved as the values used
    import jax
    import transformers
    assert saved["versions"]["jax"] == jax.__version__ == report["versions"]["jax"]
    assert saved["versions"]["transformers"] == transformers.__version__

    # A second run into the same directory is refused without --overwrite, and nothing is touched.
    before = sorted(p.name for p in out.iterdir())
    again = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.25", "--output", str(out))
    assert_user_error(again, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow  # keeps `make test` within its time budget; CI runs it in `make test-slow`
def test_saved_config_reproduces_the_run_and_the_command_line_wins(tiny_with_tokenizer, tmp_path):
    first = tmp_path / "first"
    args = ("--model", str(tiny_with_tokenizer), "--calib-samples", "4", "--calib-seqlen", "32")
    proc = run_cli("compress", *args, "--ratio", "0.2", "--output", str(first), "--seed", "1", timeout=600)
    assert proc.returncode == 0, proc.stderr
    config = first / "run_config.yaml"

    again = tmp_path / "again"
    proc = run_cli("compress", "--config", str(config), "--output", str(again), timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (again / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()

    other = tmp_path / "other"
    proc = run_cli("compress", "--config", str(config), "--output", str(other), "--ratio", "0.4", timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((other / "report.json").read_text())
    assert report["target_ratio"] == 0.4 and report["calibration"]["seed"] == 1  # flag wins, file fills the rest


@pytest.mark.parametrize("content, words", [
    ("ratio: 0.3\nratoi: 0.2\n", "unknown option 'ratoi'"),
    ("ratio: lots\n", "ratio must be float"),
    ("allocation: random\n", "allocation must be one of"),
    ("- ratio\n", "mapping"),
    ("ratio: [0.3\n", "not valid YAML"),
    ("calib-samples: 8\n", "--ratio is required"),
])
def test_bad_config_file(tiny_with_tokenizer, tmp_path, content, words):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    proc = run_cli("compress", "--config", str(config), "--output", str(tmp_path / "o"))
    assert_user_error(proc, words)
    assert not (tmp_path / "o").exists()


def test_missing_config_file(tmp_path):
    assert_user_error(run_cli("compress", "--config", str(tmp_path / "none.yaml")), "no such file")


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_ratio_outside_zero_one(tiny_with_tokenizer, tmp_path, ratio):
    proc = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", ratio, "--output",
                   str(tmp_path / "o"))
    assert_user_error(proc, "--ratio")
    assert not (tmp_path / "o").exists()


def test_too_little_calibration_text(tiny_with_tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    proc = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.3", "--output",
                   str(tmp_path / "o"), "--calib-data", str(text), "--calib-samples", "4", "--calib-seqlen", "64")
    assert_user_error(proc, "tokens")
    assert not (tmp_path / "o").exists()


def test_bad_mesh(tiny_with_tokenizer, tmp_path):
    proc = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.3", "--output",
                   str(tmp_path / "o"), "--mesh", "data=3")
    assert_user_error(proc, "mesh")


@pytest.mark.slow  # keeps `make test` within its time budget; CI runs it in `make test-slow`
def test_eight_devices_give_the_same_compressed_model(tiny_with_tokenizer, tmp_path):
    """The whole pipeline on 8 simulated CPU devices (data=8 and data=4,model=2) matches 1 device."""
    import os

    results = {}
    for mesh, devices in (("data=1", 1), ("data=8", 8), ("data=4,model=2", 8)):
        out = tmp_path / mesh.replace("=", "").replace(",", "_")
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        proc = subprocess.run(
            [sys.executable, "-m", "modegpt_jax.cli", "compress", "--model", str(tiny_with_tokenizer),
             "--ratio", "0.3", "--output", str(out), "--calib-samples", "8", "--calib-seqlen", "32",
             "--mesh", mesh], capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr
        results[mesh] = json.loads((out / "report.json").read_text())
    base = results["data=1"]["layers"]
    for mesh in ("data=8", "data=4,model=2"):
        layers = results[mesh]["layers"]
        assert [lay["mlp_width"] for lay in layers] == [lay["mlp_width"] for lay in base]
        for a, b in zip(layers, base):
            assert a["block_influence"] == pytest.approx(b["block_influence"], rel=1e-4, abs=1e-6)
            for key in ("mlp", "vo", "qk_score_dropped"):
                assert a["errors"][key] == pytest.approx(b["errors"][key], rel=1e-3, abs=1e-6)


@pytest.mark.slow  # keeps `make test` within its time budget; CI runs it in `make test-slow`
def test_two_processes_give_the_same_compressed_model(tiny_with_tokenizer, tmp_path):
    """`modegpt compress` as two jax.distributed processes (gloo on CPU) matches one process."""
    import socket

    import numpy as np

    from converters.hf_import import HFCheckpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.3", "--calib-samples", "8",
            "--calib-seqlen", "32"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    procs = [subprocess.Popen([sys.executable, "-m", "modegpt_jax.cli", *args, "--output", str(multi),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    proc = run_cli(*args, "--output", str(single), timeout=600)
    assert proc.returncode == 0, proc.stderr
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a, b = (json.loads((d / "report.json").read_text()) for d in (multi, single))
    assert a["devices"]["processes"] == 2 and a["calibration"]["samples"] == 8
    assert [x["mlp_width"] for x in a["layers"]] == [x["mlp_width"] for x in b["layers"]]
    tokens = np.random.default_rng(0).integers(0, 1000, (2, 16))
    np.testing.assert_allclose(np.asarray(HFCheckpoint(multi).load_model()(tokens)),
                               np.asarray(HFCheckpoint(single).load_model()(tokens)), atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".*.resume"))  # the resume state is gone once the output is written


def test_incomplete_multi_host_arguments(tiny_with_tokenizer, tmp_path):
    proc = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.3", "--output", str(tmp_path / "o"),
                   "--coordinator", "127.0.0.1:1")
    assert_user_error(proc, "jax.distributed.initialize failed", "--num-processes")
    assert not (tmp_path / "o").exists()
