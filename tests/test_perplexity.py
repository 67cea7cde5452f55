"""Perplexity protocol on a tiny model: windows, token counts, agreement with a PyTorch computation."""

import json
import subprocess
import sys

import numpy as np
import pytest

from converters.hf_import import load_model
from modegpt_jax.errors import UserError
from modegpt_jax.perplexity import perplexity, token_windows
from tests.hf_models import make_hf_model, save_hf_model

torch = pytest.importorskip("torch")


def test_windows_are_non_overlapping_and_drop_the_tail():
    tokens = np.arange(1000)
    w = token_windows(tokens, 128, None)
    assert w.shape == (7, 128)
    np.testing.assert_array_equal(w.reshape(-1), tokens[: 7 * 128])
    assert token_windows(tokens, 128, 3).shape == (3, 128)
    with pytest.raises(UserError, match="fewer than one window"):
        token_windows(tokens[:100], 128)


def test_perplexity_equals_torch_cross_entropy(tmp_path):
    hf = make_hf_model("qwen2")
    model = load_model(save_hf_model(hf, tmp_path / "m"))
    windows = np.random.default_rng(1).integers(0, 128, (5, 16))
    result = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = hf(torch.as_tensor(windows)).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), torch.as_tensor(windows[:, 1:]).reshape(-1)
        ).item()
    assert result["tokens"] == 5 * 15 and result["windows"] == 5
    assert result["perplexity"] == pytest.approx(np.exp(nll), rel=1e-5)


def test_eval_cli_json_on_a_text_file(tmp_path):
    """`modegpt eval --text F --json` on a local model with a real tokenizer from the embedded checkpoint."""
    from converters.hf_import import HFCheckpoint

    tokenizer_dir = HFCheckpoint("smollm2-135m").directory
    text = tmp_path / "t.txt"
    text.write_text("Rivers carry water from the mountains to the sea. " * 60)
    proc = subprocess.run(
        [sys.executable, "-m", "modegpt_jax.cli", "eval", "--model", str(tokenizer_dir), "--text", str(text),
         "--seqlen", "64", "--max-windows", "3", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["windows"] == 3 and result["tokens"] == 3 * 63
    assert 1.0 < result["perplexity"] < 50  # repeated text is easy to predict
