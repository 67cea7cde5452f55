"""PyTorch model of a decoder compressed by modegpt-jax (MoDeGPT), for ``transformers`` with trust_remote_code.

Shipped inside every exported model directory; it imports only torch and transformers. Each block has its own
widths: MLP width, kept query/key channels per head (RoPE pairs kept whole, each rotating at its *original*
frequency, per KV group), and value/output width. The softmax scale is that of the original head dimension.
Module and parameter names are those of the base family (Llama/Mistral/Qwen2 or OPT), so the tensors keep their
usual Hugging Face names.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_modegpt import ModeGPTConfig

ACTIVATIONS = {
    "silu": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": lambda x: nn.functional.gelu(x, approximate="none"),
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
}

# Base-family module names: (attn_norm, q, k, v, o, mlp_norm, gate, up, down)
LLAMA_NAMES = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "post_attention_layernorm",
               "gate_proj", "up_proj", "down_proj")
OPT_NAMES = ("self_attn_layer_norm", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
             None, "fc1", "fc2")


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg, d):
    if cfg["norm"] == "rms":
        return RMSNorm(d, cfg["norm_eps"])
    return nn.LayerNorm(d, eps=cfg["norm_eps"])


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, layer, names, layer_idx):
        super().__init__()
        d, H, G = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"]
        self.H, self.G, self.layer_idx = H, G, layer_idx
        self.qk, self.vo = layer["qk_dim"], layer["vo_dim"]
        self.scale = cfg["head_dim"] ** -0.5  # the original head dim, whatever the kept width
        self.names = names
        setattr(self, names[1], nn.Linear(d, H * self.qk, bias=cfg["qkv_bias"]))
        setattr(self, names[2], nn.Linear(d, G * self.qk, bias=cfg["qkv_bias"]))
        setattr(self, names[3], nn.Linear(d, G * self.vo, bias=cfg["qkv_bias"]))
        setattr(self, names[4], nn.Linear(H * self.vo, d, bias=cfg["o_bias"]))
        # Kept pairs' original frequencies [G, qk/2], from the configuration. Not a buffer: from_pretrained
        # materialises non-persistent buffers uninitialised. Built once per device, not on every step.
        self.rope_frequencies = layer.get("rope_frequencies")
        self._freqs_on: dict = {}

    def freqs(self, device):
        if device not in self._freqs_on:
            self._freqs_on[device] = torch.tensor(self.rope_frequencies, dtype=torch.float32, device=device)
        return self._freqs_on[device]

    def forward(self, x, position_ids, mask, cache):
        B, T, _ = x.shape
        q = getattr(self, self.names[1])(x).view(B, T, self.H, self.qk).transpose(1, 2)
        k = getattr(self, self.names[2])(x).view(B, T, self.G, self.qk).transpose(1, 2)
        v = getattr(self, self.names[3])(x).view(B, T, self.G, self.vo).transpose(1, 2)
        if self.rope_frequencies is not None:
            angles = position_ids.float()[:, None, :, None] * self.freqs(x.device)[None, :, None, :]  # [B, G, T, k]
            angles = torch.cat((angles, angles), dim=-1)
            cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
            k = k * cos + rotate_half(k) * sin
            n = self.H // self.G
            cos_q, sin_q = cos.repeat_interleave(n, dim=1), sin.repeat_interleave(n, dim=1)
            q = q * cos_q + rotate_half(q) * sin_q
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.H != self.G:
            k = k.repeat_interleave(self.H // self.G, dim=1)
            v = v.repeat_interleave(self.H // self.G, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)).float() * self.scale + mask
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, self.H * self.vo)
        return getattr(self, self.names[4])(out)


class MLP(nn.Module):
    def __init__(self, cfg, layer, names):
        super().__init__()
        d, w = cfg["hidden_size"], layer["mlp_width"]
        self.names = names
        self.act = ACTIVATIONS[cfg["activation"]]
        self.gated = cfg["gated_mlp"]
        if self.gated:
            setattr(self, names[6], nn.Linear(d, w, bias=cfg["mlp_bias"]))
        setattr(self, names[7], nn.Linear(d, w, bias=cfg["mlp_bias"]))
        setattr(self, names[8], nn.Linear(w, d, bias=cfg["mlp_bias"]))

    def forward(self, x):
        up = getattr(self, self.names[7])(x)
        a = self.act(getattr(self, self.names[6])(x)) * up if self.gated else self.act(up)
        return getattr(self, self.names[8])(a)


class Block(nn.Module):
    def __init__(self, cfg, layer, layer_idx):
        super().__init__()
        opt = cfg["model_type"] == "opt"
        names = OPT_NAMES if opt else LLAMA_NAMES
        self.names = names
        self.window = layer.get("sliding_window")
        setattr(self, names[0], make_norm(cfg, cfg["hidden_size"]))
        self.self_attn = Attention(cfg, layer, names, layer_idx)
        setattr(self, names[5], make_norm(cfg, cfg["hidden_size"]))
        mlp = MLP(cfg, layer, names)
        if opt:  # OPT keeps fc1/fc2 directly in the layer
            self.fc1, self.fc2 = getattr(mlp, "fc1"), getattr(mlp, "fc2")
            self._mlp = [mlp]  # not registered twice
        else:
            self.mlp = mlp
            self._mlp = [mlp]

    def forward(self, h, position_ids, masks, cache):
        mask = masks[self.window]
        h = h + self.self_attn(getattr(self, self.names[0])(h), position_ids, mask, cache)
        return h + self._mlp[0](getattr(self, self.names[5])(h))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["hidden_size"]
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], d)
        if cfg["learned_positions"]:
            self.embed_positions = nn.Embedding(cfg["learned_positions"], d)
        self.layers = nn.ModuleList(Block(cfg, layer, i) for i, layer in enumerate(cfg["layers"]))
        if cfg["model_type"] == "opt":
            self.final_layer_norm = make_norm(cfg, d)
        else:
            self.norm = make_norm(cfg, d)

    def final_norm(self, h):
        return self.final_layer_norm(h) if self.cfg["model_type"] == "opt" else self.norm(h)


class OPTWrapper(nn.Module):  # OPT checkpoints nest the decoder one level deeper: model.decoder.*
    def __init__(self, cfg):
        super().__init__()
        self.decoder = Decoder(cfg)


class ModeGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ModeGPTConfig
    base_model_prefix = "model"
    _supports_cache_class = True

    def __init__(self, config: ModeGPTConfig):
        super().__init__(config)
        cfg = config.modegpt
        self.model = OPTWrapper(cfg) if cfg["model_type"] == "opt" else Decoder(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        embed = "model.decoder.embed_tokens.weight" if cfg["model_type"] == "opt" else "model.embed_tokens.weight"
        self._tied_weights_keys = {"lm_head.weight": embed} if config.tie_word_embeddings else {}
        self.post_init()

    @property
    def decoder(self) -> Decoder:
        return self.model.decoder if isinstance(self.model, OPTWrapper) else self.model

    def get_input_embeddings(self):
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.decoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def _masks(self, attention_mask, B, T, past, device):
        """Additive masks [B, 1, T, past+T], one per distinct sliding window (None = full causal)."""
        S = past + T
        i = torch.arange(past, S, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        keep_keys = None if attention_mask is None else attention_mask[:, None, None, -S:].bool()
        masks = {}
        for window in {layer.window for layer in self.decoder.layers}:
            allowed = j <= i
            if window is not None:
                allowed = allowed & (j > i - window)
            allowed = allowed[None, None]
            if keep_keys is not None:
                allowed = allowed & keep_keys
            masks[window] = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(
                ~allowed, torch.finfo(torch.float32).min)
        return masks

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, past_key_values=None,
                **kwargs):
        cfg = self.config.modegpt
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        dec = self.decoder
        h = dec.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and cfg["learned_positions"]:
                m = attention_mask.long()
                position_ids = (torch.cumsum(m, dim=1) * m - 1)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=h.device)[None].expand(B, T)
        if cfg["learned_positions"]:
            h = h + dec.embed_positions(position_ids.clamp(min=-cfg["position_offset"]) + cfg["position_offset"])
        masks = self._masks(attention_mask, B, T, past, h.device)
        for layer in dec.layers:
            h = layer(h, position_ids, masks, cache if use_cache else None)
        h = dec.final_norm(h)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
