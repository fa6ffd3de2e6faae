"""
mllm: the InternVL MLLM that salma.SALMA builds on.

  InternViT (timm) -> pixel shuffle -> mlp1 -> LLM (Qwen2, KV cache)    InternVL
  LoRA on the LLM's linear layers                                        apply_lora, merge_lora
  oneDNN pre-packed linear weights for CPU inference                     pack_linears_for_cpu

Every size comes from a salma.Config (cfg); nothing here knows about SAM-2 or SALMA.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

# ---------------------------------------------------------------------------------------------
# InternViT + pixel shuffle + mlp1


def build_vit(cfg):
    """InternViT-300M's math on timm: qkv bias, LayerScale, exact GELU, CLS token, no final norm."""
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_width, depth=cfg.vit_depth,
        num_heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio, qkv_bias=True, init_values=cfg.vit_ls_init,
        class_token=True, final_norm=False, global_pool="", num_classes=0,
    )


def pixel_shuffle(x, scale=0.5):
    """InternVL's "v2" pixel shuffle: (N, W, H, C) -> (N, H*scale, W*scale, C/scale^2) in its token order."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3)


def build_mlp1(cfg):
    """Projector: LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D)."""
    width = int(cfg.vit_width / cfg.downsample_ratio**2)
    return nn.Sequential(nn.LayerNorm(width, eps=1e-5), nn.Linear(width, cfg.llm_hidden), nn.GELU(), nn.Linear(cfg.llm_hidden, cfg.llm_hidden))


# ---------------------------------------------------------------------------------------------
# Qwen2


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for positions (B, L) -> cos, sin (B, 1, L, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq  # (B, L, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate (B, H, L, hd) by the RoPE tables (half-split convention, as Qwen2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads = cfg.llm_heads, cfg.llm_kv_heads
        self.head_dim = cfg.llm_hidden // cfg.llm_heads
        self.q_proj = nn.Linear(cfg.llm_hidden, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.llm_hidden, self.kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.llm_hidden, self.kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.llm_hidden, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        causal = mask is None and x.shape[1] > 1  # mask None: causal, no padding (see Qwen2.forward)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)  # (B, H, L, hd)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.llm_hidden, cfg.llm_intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.llm_hidden, cfg.llm_intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.llm_intermediate, cfg.llm_hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def qwen2_init(module, std=0.02):
    """Qwen2's own initialisation (transformers' Qwen2PreTrainedModel._init_weights, initializer_range
    0.02): N(0, 0.02) weights for every Linear and Embedding, zero biases. From scratch this keeps a
    token's embedding from drowning the context its hidden state gathers (PyTorch's N(0, 1) embeddings
    make every [SEG] hidden state nearly the same vector)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Qwen2(nn.Module):
    """Qwen2 decoder-only LM: RMSNorm, RoPE, GQA via SDPA, SwiGLU; KV cache as a list of dicts."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.llm_hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.llm_layers))
        self.norm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.llm_hidden, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(qwen2_init)


    def forward(self, embeds, attention_mask=None, cache=None, output_hidden_states=False, last_only=False):
        """embeds (B, L, D), attention_mask (B, L_past + L) bool -> logits (B, L, V), hidden states.

        last_only: logits of the last position only (B, 1, V): generation needs no more, and a long
        prompt's full logits are the largest tensor of inference (1,800 tokens x 151k words).
        """
        b, n, _ = embeds.shape
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        if not padded and (past == 0 or n == 1):  # plain causal attention: SDPA's fused is_causal path
            positions = torch.arange(past, past + n, device=embeds.device).expand(b, n)
            mask = None
        else:
            if attention_mask is None:
                attention_mask = torch.ones(b, past + n, dtype=torch.bool, device=embeds.device)
            positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past:]  # (B, L) skips left padding
            causal = torch.ones(n, past + n, dtype=torch.bool, device=embeds.device).tril(past)
            mask = (causal[None] & attention_mask[:, None, :])[:, None]  # (B, 1, L, L_past + L)
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows attend everywhere (no NaN)
        cos, sin = rope_cos_sin(positions, self.layers[0].self_attn.head_dim, self.cfg.rope_theta, embeds.dtype)
        x, hidden = embeds, []
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None)
            hidden.append(x)
        x = self.norm(x)
        hidden[-1] = x  # the last entry is after the final norm ([SEG] and MBA read it)
        return {"logits": self.lm_head(x[:, -1:] if last_only else x), "hidden_states": hidden if output_hidden_states else None}


# ---------------------------------------------------------------------------------------------
# LoRA on the LLM's linear layers


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) * B(A(dropout(x))); base frozen, B starts at zero."""

    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, r, bias=False)
        self.lora_b = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.scale, self.dropout = alpha / r, nn.Dropout(dropout)
        base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.scale * self.lora_b(self.lora_a(self.dropout(x)))


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(llm, r, alpha, dropout):
    """Wrap every target nn.Linear of the LLM in LoRALinear (in place)."""
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha, dropout))


def merge_lora(llm):
    """Fold LoRA updates into the base weights and unwrap (for export in the official layout)."""
    for module in list(llm.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                delta = child.scale * child.lora_b.weight @ child.lora_a.weight
                child.base.weight.data += delta.to(child.base.weight.dtype)
                setattr(module, name, child.base)


# ---------------------------------------------------------------------------------------------
# CPU inference: nn.Linear weights pre-packed by oneDNN


class PackedLinear(nn.Linear):
    """nn.Linear that, for fp32 CPU inference, multiplies by a oneDNN pre-packed copy of its weight.

    Same math as F.linear (only the summation order differs, ~1e-6 relative); measured 1.1-1.9x
    faster GEMMs on a 2-core CPU (more for decoding's one-row inputs): no repacking per call. With grad enabled, off the CPU or in another
    dtype it is a plain nn.Linear. The packed copy is a snapshot: pack again after changing weights.
    """

    def forward(self, x):
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linears_for_cpu(model):
    """Turn every fp32 CPU nn.Linear of model into a PackedLinear (in place; state_dict unchanged).

    For inference only (eval.py and bench.py call it on CPU); costs one more copy of those weights.
    """
    if not torch.backends.mkldnn.is_available():
        return model
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            module.__class__ = PackedLinear
    return model


# ---------------------------------------------------------------------------------------------
# InternVL: image tokens spliced into the LLM's input embeddings


class InternVL(nn.Module):
    """InternVL2.5: InternViT -> pixel shuffle -> mlp1 -> Qwen2, image tokens at <IMG_CONTEXT>."""

    def __init__(self, cfg, img_context_id):
        super().__init__()
        self.cfg, self.img_context_id = cfg, img_context_id
        self.vision_model = build_vit(cfg)
        self.mlp1 = build_mlp1(cfg)
        self.language_model = Qwen2(cfg)

    def extract_feature(self, pixel_values):
        """(N_tiles, 3, S, S) -> image tokens (N_tiles, num_image_tokens, D)."""
        x = self.vision_model.forward_features(pixel_values)[:, 1:]  # (N, h*w, C) without CLS
        side = int(x.shape[1] ** 0.5)
        x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), self.cfg.downsample_ratio)
        return self.mlp1(x.reshape(x.shape[0], -1, x.shape[-1]))

    def embed(self, input_ids, pixel_values=None, context_index=None):
        """Token embeddings (B, L, D) with the <IMG_CONTEXT> rows replaced by image tokens in order.

        context_index (N_ctx,): which image token (flattened over tiles) fills each <IMG_CONTEXT>;
        None = every token once, in order (region prompts repeat tokens: region_context_index).
        """
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        image_tokens = self.extract_feature(pixel_values.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        if context_index is not None:
            image_tokens = image_tokens[context_index.to(image_tokens.device)]
        is_image = input_ids == self.img_context_id
        if int(is_image.sum()) != image_tokens.shape[0]:
            raise ValueError(f"{int(is_image.sum())} <IMG_CONTEXT> tokens for {image_tokens.shape[0]} image tokens")
        return embeds.masked_scatter(is_image[..., None], image_tokens.to(embeds.dtype))

    def forward(self, input_ids, pixel_values=None, attention_mask=None, output_hidden_states=False, context_index=None):
        """Logits (B, L, V) and, on request, every layer's hidden states (list of (B, L, D))."""
        embeds = self.embed(input_ids, pixel_values, context_index)
        return self.language_model(embeds, attention_mask, output_hidden_states=output_hidden_states)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=32, stop_ids=(), keep_hidden=False, context_index=None,
                 attention_mask=None, cache=None):
        """Greedy decoding of prompts (B, L) with the KV cache.

        attention_mask (B, L_past + L): False on left padding; cache: the KV cache of a prefix every row
        continues (None: a fresh one). Returns (generated ids (B, T): a row that stops early repeats its
        stop id; hidden states of prompt + generated tokens (list per layer of (B, L + T - 1, D)) when
        keep_hidden, else None). A row stops after a stop id; all stop after max_new_tokens.
        """
        llm = self.language_model
        cache = [{} for _ in llm.layers] if cache is None else cache
        out = llm(self.embed(input_ids, pixel_values, context_index), attention_mask, cache, keep_hidden, last_only=True)
        hidden = [[h] for h in out["hidden_states"]] if keep_hidden else None
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=input_ids.device)
        generated, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            next_id = out["logits"][:, -1].argmax(-1)  # (B,)
            if generated:
                next_id = torch.where(done, generated[-1], next_id)
            generated.append(next_id)
            done |= torch.isin(next_id, stop)
            if bool(done.all()) or len(generated) == max_new_tokens:
                break
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(next_id), 1)], dim=1)
            out = llm(llm.embed_tokens(next_id[:, None]), attention_mask, cache, keep_hidden, last_only=True)
            if keep_hidden:
                for per_layer, h in zip(hidden, out["hidden_states"]):
                    per_layer.append(h)
        if keep_hidden:
            hidden = [torch.cat(h, dim=1) for h in hidden]
        return torch.stack(generated, dim=1), hidden
