"""PyTorch model of a decoder compressed by modegpt-jax (MoDeGPT), for ``transformers`` with trust_remote_code.

Shipped inside every exported model directory; it imports only torch and transformers. Each block has its own
widths: MLP width, kept query/key channels per head (RoPE pairs kept whole, each rotating at its *original*
frequency, per KV group), and value/output width. The softmax scale is that of the original head dimension.
Module and parameter names are those of the base family (Llama/Mistral/Qwen2/Qwen3, Gemma 3 or OPT), so the
tensors keep their usual Hugging Face names.
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
# Gemma 3: the MLP's input norm is pre_feedforward_layernorm; post_attention_layernorm follows the attention output
GEMMA3_NAMES = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "pre_feedforward_layernorm",
                "gate_proj", "up_proj", "down_proj")
SANDWICH_NAMES = ("post_attention_layernorm", "post_feedforward_layernorm")


class RMSNorm(nn.Module):
    """RMSNorm; ``offset``: the weight is stored as an offset from 1 and applied in float32 (Gemma)."""

    def __init__(self, d, eps, offset=False):
        """``d``: the normalised size, or a weight shape (one weight per head: ``(heads, size)``)."""
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(d) if offset else torch.ones(d))

    def forward(self, x, weight_shape=None):
        """``weight_shape``: the weight viewed as this shape to broadcast against ``x`` (default: as stored)."""
        weight = self.weight if weight_shape is None or self.weight.dim() == 1 else self.weight.view(weight_shape)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (1.0 + weight.float())).to(x.dtype)
        return weight * xf.to(x.dtype)


def make_norm(cfg, d):
    if cfg["norm"] in ("rms", "rms_offset"):
        return RMSNorm(d, cfg["norm_eps"], offset=cfg["norm"] == "rms_offset")
    return nn.LayerNorm(d, eps=cfg["norm_eps"])


def swap_halves(x):
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin_signed):
    """``x * cos + rotate_half(x) * sin`` with rotate_half's sign folded into the table (exact: a negation)."""
    return torch.addcmul(x * cos, swap_halves(x), sin_signed)


class RopeTables:
    """cos/sin of every layer's kept pairs, computed once per forward pass for all layers together.

    Each layer's per-group frequencies [G, k] are doubled to the rotate_half layout [G, 2k] and laid end to end;
    one product with the position ids gives every layer's angles, and each layer takes a view. The sign of
    rotate_half is folded into the sine table, so applying RoPE costs a layer no table work at all.
    """

    def __init__(self, layers, device):
        freqs, signs, self.spans = [], [], []
        start = 0
        for layer in layers:
            f = layer.get("rope_frequencies")
            if f is None:
                self.spans.append(None)
                continue
            f = torch.tensor(f, dtype=torch.float32, device=device)  # [G, k]
            G, k = f.shape
            freqs.append(torch.cat((f, f), dim=-1).reshape(-1))
            sign = torch.ones(G, 2 * k, dtype=torch.float32, device=device)
            sign[:, :k] = -1.0
            signs.append(sign.reshape(-1))
            self.spans.append((start, G, 2 * k))
            start += G * 2 * k
        self.freqs = torch.cat(freqs) if freqs else None
        self.signs = torch.cat(signs) if signs else None

    def __call__(self, position_ids, dtype):
        """Per layer: (cos, signed sin) [B, G, T, 2k] views of two [B, T, F] tables, or None (no RoPE)."""
        if self.freqs is None:
            return [None] * len(self.spans)
        angles = position_ids.float()[:, :, None] * self.freqs
        cos, sin = angles.cos().to(dtype), (angles.sin() * self.signs).to(dtype)
        B, T = position_ids.shape
        out = []
        for span in self.spans:
            if span is None:
                out.append(None)
                continue
            start, G, width = span
            out.append(tuple(t[:, :, start:start + G * width].view(B, T, G, width).transpose(1, 2)
                             for t in (cos, sin)))
        return out


class Attention(nn.Module):
    def __init__(self, cfg, layer, names, layer_idx):
        super().__init__()
        d, H, G = cfg["hidden_size"], cfg["num_heads"], cfg["num_kv_heads"]
        self.H, self.G, self.layer_idx = H, G, layer_idx
        self.qk, self.vo = layer["qk_dim"], layer["vo_dim"]
        # the dense model's scale, whatever the kept width
        self.scale = cfg.get("attn_scale") or cfg["head_dim"] ** -0.5
        self.names = names
        setattr(self, names[1], nn.Linear(d, H * self.qk, bias=cfg["qkv_bias"]))
        setattr(self, names[2], nn.Linear(d, G * self.qk, bias=cfg["qkv_bias"]))
        setattr(self, names[3], nn.Linear(d, G * self.vo, bias=cfg["qkv_bias"]))
        setattr(self, names[4], nn.Linear(H * self.vo, d, bias=cfg["o_bias"]))
        # Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3): one weight for all heads, or one per
        # head over the kept channels where key-query was compressed.
        self.q_norm = self.k_norm = None
        if cfg.get("qk_norm"):
            per_head = self.qk < cfg["head_dim"]
            self.q_norm = make_norm(cfg, (H, self.qk) if per_head else self.qk)
            self.k_norm = make_norm(cfg, (G, self.qk) if per_head else self.qk)

    def forward(self, x, rope, mask, cache):
        """``rope``: this layer's (cos, signed sin) [B, G, T, qk] from RopeTables, or None; ``mask``: additive
        [B, 1, T, S] or None (nothing to mask)."""
        B, T, _ = x.shape
        G, n = self.G, self.H // self.G
        # Query heads grouped under their KV head: [B, G, n, T, qk]. The grouped products below read the cache
        # as it is, instead of repeating its keys and values for every query head on every step.
        # Looked up on every call, not cached: quantisation and adapters (PEFT) replace these modules in place.
        q_lin, k_lin, v_lin, o_lin = (getattr(self, name) for name in self.names[1:5])
        q = q_lin(x).view(B, T, G, n, self.qk)
        k = k_lin(x).view(B, T, G, self.qk)
        if self.q_norm is not None:  # a per-head query weight [H, qk] is [G, n, qk] here
            q, k = self.q_norm(q, (G, n, self.qk)), self.k_norm(k)
        q = q.permute(0, 2, 3, 1, 4)
        k = k.transpose(1, 2)
        v = v_lin(x).view(B, T, G, self.vo).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            k = apply_rope(k, cos, sin)
            q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        S = k.shape[2]
        scores = torch.matmul(q.reshape(B, G, n * T, self.qk), k.transpose(2, 3)).view(B, G, n, T, S)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores + mask[:, :, None]
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs.view(B, G, n * T, S), v).view(B, G, n, T, self.vo)
        return o_lin(out.permute(0, 3, 1, 2, 4).reshape(B, T, self.H * self.vo))


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
        names = OPT_NAMES if opt else GEMMA3_NAMES if cfg.get("sandwich_norms") else LLAMA_NAMES
        self.names = names
        self.sandwich = bool(cfg.get("sandwich_norms"))
        if self.sandwich:
            for name in SANDWICH_NAMES:
                setattr(self, name, make_norm(cfg, cfg["hidden_size"]))
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

    def forward(self, h, rope, masks, cache):
        mask = masks[self.window]
        a = self.self_attn(getattr(self, self.names[0])(h), rope, mask, cache)
        h = h + (getattr(self, SANDWICH_NAMES[0])(a) if self.sandwich else a)
        m = self._mlp[0](getattr(self, self.names[5])(h))
        return h + (getattr(self, SANDWICH_NAMES[1])(m) if self.sandwich else m)


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
        self._rope_on: dict = {}
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

    def rope_tables(self, device):
        # Not buffers: from_pretrained materialises non-persistent buffers uninitialised. Built once per device.
        if device not in self._rope_on:
            self._rope_on[device] = RopeTables(self.config.modegpt["layers"], device)
        return self._rope_on[device]

    def _masks(self, attention_mask, B, T, past, device):
        """Additive masks [B, 1, T, past+T], one per distinct sliding window (None = full causal); a mask that
        would hide nothing (one new token, no padding, the window not reached) is None."""
        windows = {layer.window for layer in self.decoder.layers}
        if T == 1 and attention_mask is None and all(w is None or past + T <= w for w in windows):
            return dict.fromkeys(windows)
        return self._masks_full(attention_mask, B, T, past, device)

    def _masks_full(self, attention_mask, B, T, past, device):
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
        if cfg.get("embed_scale") is not None and inputs_embeds is None:  # Gemma: sqrt(hidden) in the weights' dtype
            h = h * torch.tensor(cfg["embed_scale"], dtype=h.dtype)
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
        ropes = self.rope_tables(h.device)(position_ids, h.dtype)
        for layer, rope in zip(dec.layers, ropes):
            h = layer(h, rope, masks, cache if use_cache else None)
        h = dec.final_norm(h)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
