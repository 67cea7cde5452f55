"""User-caused failures: one line on stderr naming the problem, exit code 2."""

import json
import subprocess
import sys

import pytest

from tests.hf_models import make_hf_model, save_hf_model


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "modegpt_jax.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama_gqa_untied"), tmp_path_factory.mktemp("tiny") / "m")


def test_path_that_does_not_exist(tmp_path):
    assert_user_error(run_cli("eval", "--model", str(tmp_path / "nope")), "not found")


def test_unknown_model_type(tmp_path, tiny_dir):
    d = tmp_path / "gpt2"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("eval", "--model", str(d)), "unsupported model_type 'gpt2'")


def test_missing_weights(tmp_path, tiny_dir):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    assert_user_error(run_cli("eval", "--model", str(d)), "no weights")


def test_corrupt_weights(tmp_path, tiny_dir):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    assert_user_error(run_cli("eval", "--model", str(d)), "corrupt")


def test_truncated_shard(tmp_path, tiny_dir):
    d = tmp_path / "truncated"
    d.mkdir()
    (d / "config.json").write_text((tiny_dir / "config.json").read_text())
    data = (tiny_dir / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run_cli("eval", "--model", str(d)), "model.safetensors")


def test_wrong_family_weights(tmp_path, tiny_dir):
    d = tmp_path / "mislabelled"
    d.mkdir()
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["hidden_size"] = 32  # the weights no longer fit the configuration
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").write_bytes((tiny_dir / "model.safetensors").read_bytes())
    assert_user_error(run_cli("eval", "--model", str(d)), "shape")


def test_unsupported_opt_variant(tmp_path):
    d = tmp_path / "opt350"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "opt", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
        "ffn_dim": 128, "vocab_size": 100, "do_layer_norm_before": False}))
    assert_user_error(run_cli("eval", "--model", str(d)), "do_layer_norm_before=False")


def test_missing_text_file(tmp_path):
    assert_user_error(run_cli("eval", "--text", str(tmp_path / "missing.txt")), "no such file")


def test_hub_id_offline_is_a_clear_error(tmp_path):
    env_proc = subprocess.run(
        [sys.executable, "-m", "modegpt_jax.cli", "eval", "--model", "some-org/some-model"],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)},
    )
    assert_user_error(env_proc, "some-org/some-model", "Hugging Face Hub")
