"""Imported Flax models compute the same logits as transformers' PyTorch models."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from converters.hf_import import HFCheckpoint, load_model
from modegpt_jax.model import count_params
from tests.hf_models import TINY_CONFIGS, make_hf_model, random_tokens, save_hf_model, torch_logits

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf = make_hf_model(name)
    directory = save_hf_model(hf, tmp_path / name)
    model = load_model(directory)
    tokens = random_tokens(length=23)  # longer than the Mistral test window
    ours = np.asarray(model(tokens))
    ref = torch_logits(hf, tokens)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # Same number of parameters (tied embeddings counted once, as in PyTorch).
    assert count_params(model) == sum(p.numel() for p in hf.parameters())


def test_every_family_has_a_tiny_model_under_test():
    """A family module is not finished without a tiny model in ``TINY_CONFIGS`` (parity, pipeline, export)."""
    import transformers

    from modegpt_jax.families import FAMILIES

    tested = {getattr(transformers, cls_name).model_type for cls_name, _ in TINY_CONFIGS.values()}
    assert set(FAMILIES) <= tested, sorted(set(FAMILIES) - tested)


def test_padding_mask_matches_transformers(tmp_path):
    hf = make_hf_model("opt")
    model = load_model(save_hf_model(hf, tmp_path / "opt"))
    tokens = random_tokens(length=12)
    mask = np.ones_like(tokens)
    mask[0, :4] = 0  # left padding: OPT positions count only real tokens
    ours = np.asarray(model(tokens, attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask)).logits.numpy()
    np.testing.assert_allclose(ours[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)


def test_sharded_safetensors_and_bin(tmp_path):
    hf = make_hf_model("llama_gqa_untied")
    tokens = random_tokens()
    ref = torch_logits(hf, tokens)
    sharded = save_hf_model(hf, tmp_path / "sharded", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    np.testing.assert_allclose(np.asarray(load_model(sharded)(tokens)), ref, atol=1e-4, rtol=0)

    # pytorch_model.bin, written the way older checkpoints are: a plain torch state dict.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")
    np.testing.assert_allclose(np.asarray(load_model(bin_dir)(tokens)), ref, atol=1e-4, rtol=0)


def test_bfloat16_close_to_float32(tmp_path):
    hf = make_hf_model("llama_gqa_untied")
    directory = save_hf_model(hf, tmp_path / "m")
    tokens = random_tokens()
    f32 = np.asarray(load_model(directory, "float32")(tokens))
    bf16_model = load_model(directory, "bfloat16")
    assert bf16_model.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_model(tokens))
    assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()


def test_block_streaming_equals_full_model(tmp_path):
    hf = make_hf_model("qwen2")
    ckpt = HFCheckpoint(save_hf_model(hf, tmp_path / "m"))
    model = ckpt.load_model()
    block = ckpt.load_block(1)
    for a, b in zip(
        (block.attn.q_proj.kernel, block.attn.q_proj.bias, block.mlp.down_proj.kernel),
        (model.layers[1].attn.q_proj.kernel, model.layers[1].attn.q_proj.bias, model.layers[1].mlp.down_proj.kernel),
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))


def test_config_round_trips_through_json(tmp_path):
    hf = make_hf_model("llama3_rope_scaling")
    cfg = HFCheckpoint(save_hf_model(hf, tmp_path / "m")).config
    from modegpt_jax.config import ModelConfig

    again = ModelConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and hash(again) == hash(cfg)


def test_phi3_legacy_su_scaling_reads_as_longrope_and_partial_rotary_is_refused():
    from modegpt_jax.errors import UserError
    from modegpt_jax.families import config_from_hf

    hf = make_hf_model("phi3_longrope").config.to_dict()
    longrope = config_from_hf(hf)
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    legacy["rope_scaling"] = {**{k: v for k, v in hf["rope_parameters"].items() if k != "rope_type"}, "type": "su"}
    assert config_from_hf(legacy) == longrope
    assert longrope.max_position_embeddings == 32 and longrope.attn_scale > 16**-0.5
    with pytest.raises(UserError, match="partial_rotary_factor"):
        config_from_hf({**hf, "rope_parameters": {**hf["rope_parameters"], "partial_rotary_factor": 0.75}})


def test_fused_tensor_of_the_wrong_size_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    from modegpt_jax.errors import UserError

    directory = save_hf_model(make_hf_model("phi3"), tmp_path / "phi3")
    tensors = load_file(directory / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    assert name in tensors and "model.layers.1.self_attn.q_proj.weight" not in tensors
    tensors[name] = tensors[name][:-8]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="qkv_proj.weight' has 120 rows, the configuration implies 128"):
        load_model(directory)
