"""The layer-by-layer pipeline on tiny random models of every family, and the compressed directory."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf_export import save_model
from converters.hf_import import HFCheckpoint
from modegpt_jax.config import LayerSpec
from modegpt_jax.errors import UserError
from modegpt_jax.pipeline import CompressionSettings, compress
from tests.hf_models import make_hf_model, save_hf_model

FAMILIES = ["llama_gqa_untied", "qwen2", "opt", "llama_attention_bias", "qwen3", "gemma3", "phi3"]


def equal_split(**kwargs):
    """The paper's rule (one sparsity for all three modules), so every module is pruned even on tiny models."""
    return CompressionSettings(attention_scale=1.0, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return {name: HFCheckpoint(save_hf_model(make_hf_model(name), root / name)) for name in FAMILIES}


def calibration(n=16, length=24, seed=0):
    return np.random.default_rng(seed).integers(0, 128, (n, length)).astype(np.int32)


def relative_logit_error(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", FAMILIES)
def test_keeping_everything_reproduces_the_dense_model(checkpoints, name):
    ckpt = checkpoints[name]
    dense = ckpt.load_model()
    tokens = calibration()
    full = [LayerSpec(s.mlp_width, s.qk_dim, s.vo_dim) for s in ckpt.config.layers]
    model, report = compress(ckpt, tokens, equal_split(ratio=0.1), layer_specs=full, progress=False)
    np.testing.assert_allclose(np.asarray(model(tokens[:4])), np.asarray(dense(tokens[:4])), atol=1e-4, rtol=0)
    for layer in report["layers"]:
        assert layer["errors"]["mlp"] < 1e-6 and layer["errors"]["vo"] < 1e-6
        assert layer["errors"]["qk_score_dropped"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_ratio_is_reached_and_error_grows_with_it(checkpoints, name):
    ckpt = checkpoints[name]
    dense = np.asarray(ckpt.load_model()(calibration(4, 24, seed=1)))
    errors = []
    for ratio in (0.1, 0.4):
        model, report = compress(ckpt, calibration(), equal_split(ratio=ratio), progress=False)
        assert report["achieved_block_ratio"] >= ratio
        assert report["achieved_block_ratio"] < ratio + 0.05
        assert report["params_after"] < report["params_before"]
        assert 0 < report["achieved_total_ratio"] < report["achieved_block_ratio"]
        errors.append(relative_logit_error(np.asarray(model(calibration(4, 24, seed=1))), dense))
        # Widths in the report are the model's shapes.
        for layer, block in zip(report["layers"], model.layers):
            assert block.mlp.down_proj.kernel.shape[0] == layer["mlp_width"]
            assert block.attn.q_proj.kernel.shape[1] == ckpt.config.num_heads * layer["qk_dim"]
            assert block.attn.o_proj.kernel.shape[0] == ckpt.config.num_heads * layer["vo_dim"]
    assert errors[0] < errors[1]


def test_important_layers_lose_less(checkpoints):
    _, report = compress(checkpoints["llama_gqa_untied"], calibration(), equal_split(ratio=0.3),
                         progress=False)
    bi = np.array([layer["block_influence"] for layer in report["layers"]])
    phi = np.array([layer["sparsity"] for layer in report["layers"]])
    assert np.all(np.argsort(bi) == np.argsort(-phi))


def test_default_split_prunes_the_mlp_more_than_attention(checkpoints):
    ckpt = checkpoints["llama_gqa_untied"]
    _, report = compress(ckpt, calibration(), CompressionSettings(ratio=0.3), progress=False)
    assert report["achieved_block_ratio"] >= 0.3
    cfg = ckpt.config
    for layer in report["layers"]:
        if layer["sparsity"] > 0.05:
            assert layer["mlp_width"] / cfg.intermediate_size < layer["vo_dim"] / cfg.head_dim


def test_uniform_allocation_gives_every_layer_the_same_widths(checkpoints):
    _, report = compress(checkpoints["qwen2"], calibration(), equal_split(ratio=0.3, allocation="uniform"),
                         progress=False)
    widths = {(lay["mlp_width"], lay["qk_dim"], lay["vo_dim"]) for lay in report["layers"]}
    assert len(widths) == 1
    assert all(lay["block_influence"] is None for lay in report["layers"])


def test_qk_norm_family_keeps_key_query_whole_and_still_reaches_the_ratio(checkpoints):
    ckpt = checkpoints["qwen3"]
    cfg = ckpt.config
    assert cfg.qk_norm and cfg.head_dim == 24 != cfg.hidden_size // cfg.num_heads
    model, report = compress(ckpt, calibration(), equal_split(ratio=0.3), progress=False)
    assert report["achieved_block_ratio"] >= 0.3
    for layer, spec in zip(report["layers"], model.config.layers):
        assert layer["qk_dim"] == spec.qk_dim == cfg.head_dim and spec.rope_pairs is None
    assert any(layer["vo_dim"] < cfg.head_dim for layer in report["layers"])  # value-output is compressed
    dense = ckpt.load_model()
    for new, old in zip(model.layers, dense.layers):  # the q/k norms and projections are the dense ones
        np.testing.assert_array_equal(np.asarray(new.attn.q_norm.weight[...]), np.asarray(old.attn.q_norm.weight[...]))
        np.testing.assert_array_equal(np.asarray(new.attn.k_proj.kernel[...]), np.asarray(old.attn.k_proj.kernel[...]))
    specs = [LayerSpec(48, 12, 12) for _ in cfg.layers]
    with pytest.raises(UserError, match="qk_norm_mode='whole' keeps it whole"):
        compress(ckpt, calibration(), equal_split(ratio=0.3), progress=False, layer_specs=specs)
    model, _ = compress(ckpt, calibration(), equal_split(ratio=0.3, qk_norm_mode="corrected"), progress=False,
                        layer_specs=specs)
    assert [spec.qk_dim for spec in model.config.layers] == [12] * cfg.num_layers
    assert model.layers[1].attn.k_norm.weight.shape == (cfg.num_kv_heads, 12)


def test_in_memory_model_gives_the_same_result_as_streaming(checkpoints):
    ckpt = checkpoints["llama_gqa_untied"]
    settings = equal_split(ratio=0.3)
    streamed, r1 = compress(ckpt, calibration(), settings, progress=False)
    in_memory, r2 = compress(ckpt.load_model(), calibration(), settings, progress=False)
    assert [lay["mlp_width"] for lay in r1["layers"]] == [lay["mlp_width"] for lay in r2["layers"]]
    tokens = calibration(2, 24, seed=3)
    np.testing.assert_array_equal(np.asarray(streamed(tokens)), np.asarray(in_memory(tokens)))


def test_width_buckets_change_compilations_not_the_result(checkpoints):
    """One bucket pads every MLP to the dense width in the refit and the passes, 16 only to the next sixteenth:
    the kept channels and widths are the same and the weights agree to rounding."""
    ckpt = checkpoints["llama_gqa_untied"]
    one, r1 = compress(ckpt, calibration(), equal_split(ratio=0.3, width_buckets=1), progress=False)
    many, r16 = compress(ckpt, calibration(), equal_split(ratio=0.3, width_buckets=16), progress=False)
    assert [lay["mlp_width"] for lay in r1["layers"]] == [lay["mlp_width"] for lay in r16["layers"]]
    assert any(lay["mlp_width"] < ckpt.config.intermediate_size for lay in r1["layers"])
    for a, b in zip(one.layers, many.layers):
        np.testing.assert_array_equal(np.asarray(a.mlp.up_proj.kernel[...]), np.asarray(b.mlp.up_proj.kernel[...]))
        np.testing.assert_allclose(np.asarray(a.mlp.down_proj.kernel[...]), np.asarray(b.mlp.down_proj.kernel[...]),
                                   rtol=0, atol=1e-5 * float(np.abs(np.asarray(b.mlp.down_proj.kernel[...])).max()))
    for layer in r16["layers"]:  # every layer's time is split into phases; compile time is counted
        phases = layer["phase_seconds"]
        assert {"load", "attention_statistics", "attention_decomposition", "attention_pass", "mlp_decomposition",
                "mlp_pass", "errors", "write"} <= set(phases) and min(phases.values()) >= 0
        assert sum(phases.values()) == pytest.approx(layer["seconds"], abs=0.05)
        assert 0 <= layer["compile_seconds"] <= layer["seconds"]
    with pytest.raises(UserError, match="width_buckets"):
        compress(ckpt, calibration(), equal_split(ratio=0.3, width_buckets=0), progress=False)


@pytest.mark.parametrize("name", ["llama_gqa_untied", "opt", "qwen2"])
def test_compressed_directory_round_trips(checkpoints, name, tmp_path):
    ckpt = checkpoints[name]
    model, report = compress(ckpt, calibration(), equal_split(ratio=0.3), progress=False)
    out = save_model(model, tmp_path / "out", base_hf_config=ckpt.hf_config)
    config = json.loads((out / "config.json").read_text())
    assert len(config["modegpt"]["layers"]) == ckpt.config.num_layers
    again = HFCheckpoint(out)
    assert again.config == model.config
    if model.config.use_rope:  # the kept pairs' original indices travel with the model
        pruned = [spec for spec in again.config.layers if spec.qk_dim < ckpt.config.head_dim]
        assert pruned and all(spec.rope_pairs is not None for spec in pruned)
    tokens = calibration(2, 24, seed=4)
    np.testing.assert_array_equal(np.asarray(again.load_model()(tokens)), np.asarray(model(tokens)))
    assert not list(tmp_path.glob(".out.partial-*"))


def test_bad_settings_are_user_errors(checkpoints):
    for ratio in (0.0, 1.0, -0.2, 1.5):
        with pytest.raises(UserError, match="ratio"):
            compress(checkpoints["opt"], calibration(), equal_split(ratio=ratio), progress=False)
    with pytest.raises(UserError, match="allocation"):
        compress(checkpoints["opt"], calibration(), CompressionSettings(ratio=0.3, allocation="random"),
                 progress=False)


def test_nan_in_a_statistic_names_the_layer(checkpoints):
    model = checkpoints["llama_gqa_untied"].load_model()
    kernel = model.layers[1].attn_norm.weight
    kernel.set_value(kernel[...].at[3].set(jnp.nan))
    with pytest.raises(UserError, match="layer 1"):
        compress(model, calibration(), equal_split(ratio=0.3, allocation="uniform"), progress=False)


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_matmul_precision_reaches_the_calibration_passes(checkpoints, monkeypatch, precision):
    import jax

    from modegpt_jax import pipeline

    seen = []
    for name in ("_attention_statistics", "_attention_pass", "_mlp_pass", "_influence_pass"):
        fn = getattr(pipeline, name)

        def spy(*args, _fn=fn, _name=name, **kwargs):
            seen.append((_name, jax.config.jax_default_matmul_precision))
            return _fn(*args, **kwargs)

        monkeypatch.setattr(pipeline, name, spy)
    compress(checkpoints["opt"], calibration(), equal_split(ratio=0.3, matmul_precision=precision), progress=False)
    assert {name for name, _ in seen} == {"_attention_statistics", "_attention_pass", "_mlp_pass", "_influence_pass"}
    assert {p for _, p in seen} == {precision}
    with pytest.raises(UserError, match="matmul_precision"):
        compress(checkpoints["opt"], calibration(), equal_split(ratio=0.3, matmul_precision="fast"), progress=False)
