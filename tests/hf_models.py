"""Tiny random Hugging Face models, one per supported family and feature, saved for import tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 128

# name -> (config class name, config kwargs); small enough to build and run in well under a second.
TINY_CONFIGS = {
    "llama_gqa_untied": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3_rope_scaling": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=512,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_attention_bias": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=24)),
    "mistral_sliding_window": ("MistralConfig", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)),
    # q/k norms, head_dim independent of hidden/heads, biases on q/k/v/o, sliding windows on the upper layer
    "qwen3": ("Qwen3Config", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, attention_bias=True, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # Gemma 3: offset norms, sandwich norms, q/k norms, scaled embeddings, GeGLU, query_pre_attn_scalar, local
    # layers (window 5, own RoPE base) between global ones with linear RoPE scaling
    "gemma3": ("Gemma3TextConfig", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    # Phi-3: fused qkv_proj and gate_up_proj in the checkpoint, a sliding window on every layer
    "phi3": ("Phi3Config", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=5, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Phi-3 long-context: LongRoPE short factors and attention factor (sequences within the original length)
    "phi3_longrope": ("Phi3Config", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, original_max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                             short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.1],
                             long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 13.0, 18.0]))),
    "opt": ("OPTConfig", dict(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, do_layer_norm_before=True)),
}


def make_hf_model(name: str, seed: int = 0):
    """A random ``transformers`` model of the named tiny configuration, in eval mode (fp32)."""
    import torch
    import transformers

    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Non-trivial norms and biases, so a parameter loaded in the wrong place changes the logits.
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def save_hf_model(model, directory: Path, **kwargs) -> Path:
    model.save_pretrained(directory, **kwargs)
    return directory


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def random_tokens(batch: int = 2, length: int = 19, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))
