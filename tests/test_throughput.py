"""The throughput benchmark's runners (modegpt_jax.throughput): JAX and PyTorch decode the same greedy tokens."""

import numpy as np
import pytest

from converters.hf_export import save_model
from converters.hf_import import HFCheckpoint
from modegpt_jax.cli import main
from modegpt_jax.pipeline import compress
from modegpt_jax.throughput import (
    format_table,
    jax_runner,
    load_jax,
    load_torch,
    measure_pair,
    torch_runner,
)
from tests.hf_models import make_hf_model, save_hf_model
from tests.test_pipeline import equal_split

pytest.importorskip("torch")


def test_jax_and_torch_runners_decode_the_same_tokens(tmp_path):
    """Dense and compressed, each framework through its own KV cache: identical greedy continuations."""
    ckpt = HFCheckpoint(save_hf_model(make_hf_model("llama_gqa_untied"), tmp_path / "dense"))
    calibration = np.random.default_rng(0).integers(0, 128, (16, 24)).astype(np.int32)
    model, _ = compress(ckpt, calibration, equal_split(ratio=0.3), progress=False)
    export = save_model(model, tmp_path / "export", base_hf_config=ckpt.hf_config)
    tokens = np.random.default_rng(1).integers(0, 128, (2, 10))
    for spec in (str(tmp_path / "dense"), str(export)):
        runners = {"jax": jax_runner(load_jax(spec)), "torch": torch_runner(load_torch(spec))}
        outs = {name: run(tokens, 6) for name, run in runners.items()}
        assert all(o[0] > 0 and o[1] > 0 for o in outs.values())
        np.testing.assert_array_equal(outs["jax"][2], outs["torch"][2])
        assert outs["jax"][2].shape == (2, 6)
    timed = measure_pair(runners, tokens, 3, repeats=1)
    assert set(timed) == {"jax", "torch"} and all(r["decode_tokens_per_s"] > 0 for r in timed.values())


def test_table_has_the_ratios():
    row = {"framework": "jax", "batch": 1, "prefill_speedup": 1.3, "decode_speedup": 1.27,
           "dense": {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 40.0},
           "compressed": {"prefill_tokens_per_s": 1300.0, "decode_tokens_per_s": 50.8}}
    result = {"rows": [row], "settings": {"prompt_len": 128, "new_tokens": 64, "repeats": 5},
              "param_ratio_blocks": 1.43, "param_ratio_total": 1.31}
    table = format_table(result)
    assert "| jax | 1 | 1000 | 1300 | 1.30 | 40.0 | 50.8 | 1.27 |" in table


def test_bench_needs_a_compressed_model_or_a_ratio(capsys, tmp_path):
    assert main(["bench", "--frameworks", "jax"]) == 2
    assert "--compressed" in capsys.readouterr().err
    assert main(["bench", "--compressed", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["bench", "--ratio", "0.3", "--frameworks", "tf"]) == 2
    assert main(["bench", "--ratio", "0.3", "--batch-sizes", "1,x"]) == 2
