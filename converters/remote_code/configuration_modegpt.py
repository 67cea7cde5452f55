"""Configuration of a model compressed by modegpt-jax (MoDeGPT), for ``transformers`` with trust_remote_code.

Shipped inside every exported model directory. ``modegpt`` holds the architecture-neutral description used by
modegpt-jax (per-layer MLP width, kept query/key channels with the original RoPE frequency of every kept pair,
value/output width); the top-level fields repeat what ``transformers`` itself looks for.
"""

from transformers import PretrainedConfig


class ModeGPTConfig(PretrainedConfig):
    model_type = "modegpt"

    def __init__(self, modegpt=None, base_model_type="llama", vocab_size=32000, hidden_size=4096,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None, head_dim=None,
                 tie_word_embeddings=False, use_cache=True, **kwargs):
        self.modegpt = modegpt or {}
        self.base_model_type = base_model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
