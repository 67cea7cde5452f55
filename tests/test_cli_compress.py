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
                   "--calib-samples", "8", "--calib-seqlen", "32", "--seed", "3", timeout=600)
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

    ev = run_cli("eval", "--model", str(out), "--seqlen", "32", "--max-windows", "4", "--json", timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert ev.stdout.strip(), ev.stderr[-2000:]
    assert json.loads(ev.stdout.strip().splitlines()[-1])["windows"] == 4

    # A second run into the same directory is refused without --overwrite, and nothing is touched.
    before = sorted(p.name for p in out.iterdir())
    again = run_cli("compress", "--model", str(tiny_with_tokenizer), "--ratio", "0.25", "--output", str(out))
    assert_user_error(again, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before


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
