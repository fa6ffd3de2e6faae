"""
mllm: the InternVL MLLM that salma.SALMA builds on.

  InternViT (timm; 6B blocks) -> pixel shuffle -> mlp1 -> LLM           InternVL
  the LLMs: Qwen2 / InternLM2 (RoPE scaling, packed wqkv), KV cache       Qwen2, InternLM2, build_llm
  LoRA on the LLM's linear layers                                        apply_lora, merge_lora
  oneDNN pre-packed linear weights for CPU inference                     pack_linears_for_cpu

Every size comes from a salma.Config (cfg); nothing here knows about SAM-2 or SALMA.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import VisionTransformer

from common import release_freed_memory

# ---------------------------------------------------------------------------------------------
# InternViT + pixel shuffle + mlp1


def build_vit(cfg):
    """InternViT on timm: CLS token, LayerScale, exact GELU, no final norm. InternViT-300M: timm's own blocks
    (LayerNorm, qkv bias); InternViT-6B (RMSNorm, QK normalisation, no qkv bias): InternViT6BBlock."""
    six_b = cfg.vit_qk_norm or cfg.vit_norm != "layer_norm"
    blocks = {"block_fn": partial(InternViT6BBlock, norm=cfg.vit_norm, eps=cfg.vit_eps), "qk_norm": cfg.vit_qk_norm} if six_b else {}
    return VisionTransformer(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vit_width, depth=cfg.vit_depth,
        num_heads=cfg.vit_heads, mlp_ratio=cfg.vit_mlp_ratio, qkv_bias=cfg.vit_qkv_bias, init_values=cfg.vit_ls_init,
        class_token=True, final_norm=False, global_pool="", num_classes=0, **blocks,
    )


def vit_norm(kind, dim, eps):
    """InternViT's NORM2FN: rms_norm or layer_norm."""
    return RMSNorm(dim, eps) if kind == "rms_norm" else nn.LayerNorm(dim, eps=eps)


class InternViT6BAttention(nn.Module):
    """InternAttention: qkv (bias optional), q and k each RMS-normalised over all heads together (C wide), SDPA, proj."""

    def __init__(self, dim, heads, qkv_bias, qk_norm, eps):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each (B, N, C), heads side by side
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, hd)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class InternViT6BBlock(nn.Module):
    """InternVisionEncoderLayer with timm's module names (norm1, attn, ls1, norm2, mlp, ls2), so both towers share
    one key mapping. timm's VisionTransformer passes more arguments (drop rates, all zero here): ignored."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, init_values, norm, qk_norm, eps, **_):
        super().__init__()
        self.norm1 = vit_norm(norm, dim, eps)
        self.attn = InternViT6BAttention(dim, num_heads, qkv_bias, qk_norm, eps)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = vit_norm(norm, dim, eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


def vit_features(vit, pixel_values, select_layer):
    """Hidden states (N, 1 + h*w, C) of InternViT's layer select_layer, as InternVisionModel's hidden_states[select_layer]
    (-1: the last layer's output, its last_hidden_state)."""
    layers = select_layer % (len(vit.blocks) + 1)  # hidden_states[0] is the embeddings, [i] the output of block i
    if layers == len(vit.blocks):
        return vit.forward_features(pixel_values)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixel_values))))
    return vit.blocks[:layers](x)


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
# the LLMs: Qwen2 and InternLM2 (same decoder, different names and attention projections)


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


def attend(q, k, v, cos, sin, mask, cache):
    """RoPE, KV cache and SDPA with grouped-query attention: q (B, H, L, hd), k and v (B, KV, L, hd) -> (B, L, H*hd)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        cache["k"], cache["v"] = k, v
    causal = mask is None and q.shape[2] > 1  # mask None: causal, no padding (see DecoderLM.forward)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)  # (B, H, L, hd)
    return y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


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
        return self.o_proj(attend(q, k, v, cos, sin, mask, cache))


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
    0.02; InternLM2PreTrainedModel._init_weights is the same): N(0, 0.02) weights for every Linear and Embedding, zero biases. From scratch this keeps a
    token's embedding from drowning the context its hidden state gathers (PyTorch's N(0, 1) embeddings
    make every [SEG] hidden state nearly the same vector)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class DecoderLM(nn.Module):
    """Decoder-only LM: RMSNorm, RoPE, GQA via SDPA, SwiGLU; KV cache as a list of dicts. Subclasses build
    embed_tokens, layers, norm and lm_head (InternLM2 under its own names)."""

    def rope_tables(self, positions, length, dtype):
        """cos, sin (B, 1, L, hd) for positions (B, L) in a sequence of length tokens (past included).

        RoPE scaling as InternLM2's rotary classes (modeling_internlm2.py): "linear" divides the positions by
        the factor; "dynamic" (NTK) raises the base once the sequence outgrows max_position_embeddings.
        """
        cfg, head_dim = self.cfg, self.cfg.llm_hidden // self.cfg.llm_heads
        theta, factor = cfg.rope_theta, cfg.rope_factor
        if cfg.rope_scaling == "linear":
            positions = positions / factor
        if cfg.rope_scaling == "dynamic" and length > cfg.max_positions:
            theta = theta * (factor * length / cfg.max_positions - (factor - 1)) ** (head_dim / (head_dim - 2))
        return rope_cos_sin(positions, head_dim, theta, dtype)

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
        cos, sin = self.rope_tables(positions, past + n, embeds.dtype)
        x, hidden = embeds, []
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache[i] if cache is not None else None)
            hidden.append(x)
        x = self.norm(x)
        hidden[-1] = x  # the last entry is after the final norm ([SEG] and MBA read it)
        return {"logits": self.lm_head(x[:, -1:] if last_only else x), "hidden_states": hidden if output_hidden_states else None}


class Qwen2(DecoderLM):
    """Qwen2 (transformers' Qwen2ForCausalLM): q/k/v/o projections, q/k/v with bias."""

    EMBED, HEAD = "embed_tokens", "lm_head"  # the embedding and head under their module names

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


class InternLM2Attention(nn.Module):
    """InternLM2's attention: one packed wqkv whose output is laid out per key/value group as
    [the group's H/KV query heads, its key, its value], then wo; bias on both when config.bias."""

    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads = cfg.llm_heads, cfg.llm_kv_heads
        self.head_dim = cfg.llm_hidden // cfg.llm_heads
        self.wqkv = nn.Linear(cfg.llm_hidden, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=cfg.llm_bias)
        self.wo = nn.Linear(self.heads * self.head_dim, cfg.llm_hidden, bias=cfg.llm_bias)

    def forward(self, x, cos, sin, mask, cache):
        b, n, _ = x.shape
        qkv = self.wqkv(x).view(b, n, self.kv_heads, -1, self.head_dim)  # (B, L, KV, H/KV + 2, hd)
        q = qkv[..., :-2, :].reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # head g*H/KV + j: group g's j-th
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)  # (B, KV, L, hd)
        return self.wo(attend(q, k, v, cos, sin, mask, cache))


class InternLM2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.llm_hidden, cfg.llm_intermediate, bias=False)
        self.w3 = nn.Linear(cfg.llm_hidden, cfg.llm_intermediate, bias=False)
        self.w2 = nn.Linear(cfg.llm_intermediate, cfg.llm_hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.attention = InternLM2Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.feed_forward = InternLM2MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2(DecoderLM):
    """InternLM2 (Sa2VA's modeling_internlm2.py InternLM2ForCausalLM) under its own names: tok_embeddings, layers,
    norm, output; embed_tokens and lm_head name the same modules for the code shared with Qwen2."""

    EMBED, HEAD = "tok_embeddings", "output"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.llm_hidden)
        self.layers = nn.ModuleList(InternLM2Layer(cfg) for _ in range(cfg.llm_layers))
        self.norm = RMSNorm(cfg.llm_hidden, cfg.rms_eps)
        self.output = nn.Linear(cfg.llm_hidden, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.apply(qwen2_init)

    @property
    def embed_tokens(self):
        return self.tok_embeddings

    @property
    def lm_head(self):
        return self.output


LLMS = {"qwen2": Qwen2, "internlm2": InternLM2}  # cfg.llm_arch -> class


def build_llm(cfg):
    """The LLM cfg.llm_arch names."""
    if cfg.llm_arch not in LLMS:
        raise ValueError(f"llm_arch={cfg.llm_arch!r}: expected one of {sorted(LLMS)}")
    return LLMS[cfg.llm_arch](cfg)


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


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # Qwen2
                "wqkv", "wo", "w1", "w2", "w3")  # InternLM2 (Sa2VA's wrap_llm_lora targets for it)


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
    """nn.Linear for fp32 CPU inference only: it multiplies by a oneDNN pre-packed copy of its weight, and the plain
    weight is freed, so the layer still holds one copy.

    Same math as F.linear (only the summation order differs, ~1e-6 relative); measured 1.1-1.9x faster GEMMs on
    a 2-core CPU (more for decoding's one-row inputs): no repacking per call. Anything else (grad enabled,
    another device or dtype) stops with one line: build or load the model again for that.
    """

    def forward(self, x):
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
            raise RuntimeError("this model's linear layers are packed for fp32 CPU inference (pack_linears_for_cpu); "
                               "load it again to train it, move it or change its precision")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def pack_linears_for_cpu(model):
    """Turn every nn.Linear of an fp32 CPU model into a PackedLinear (in place, for inference: eval.py, demo.py and
    bench.py on CPU); each plain weight is replaced by an empty one. A model in another dtype is left as it is."""
    if not torch.backends.mkldnn.is_available() or any(p.dtype != torch.float32 for p in model.parameters()):
        return model  # bf16 runs SAM-2 and MBA under autocast, which a packed fp32 weight would bypass
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            module.weight = nn.Parameter(module.weight.new_empty(0), requires_grad=False)
            module.__class__ = PackedLinear
    release_freed_memory()
    return model


# ---------------------------------------------------------------------------------------------
# InternVL: image tokens spliced into the LLM's input embeddings


class InternVL(nn.Module):
    """InternVL2.5 / 3: InternViT -> pixel shuffle -> mlp1 -> Qwen2 or InternLM2, image tokens at <IMG_CONTEXT>."""

    def __init__(self, cfg, img_context_id):
        super().__init__()
        self.cfg, self.img_context_id = cfg, img_context_id
        self.vision_model = build_vit(cfg)
        self.mlp1 = build_mlp1(cfg)
        self.language_model = build_llm(cfg)

    def extract_feature(self, pixel_values):
        """(N_tiles, 3, S, S) -> image tokens (N_tiles, num_image_tokens, D)."""
        x = vit_features(self.vision_model, pixel_values, self.cfg.vit_select_layer)[:, 1:]  # (N, h*w, C) without CLS
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

    def forward(self, input_ids, pixel_values=None, attention_mask=None, output_hidden_states=False, context_index=None,
                last_only=False):
        """Logits (B, L, V) (last_only: (B, 1, V)) and, on request, every layer's hidden states (list of (B, L, D))."""
        embeds = self.embed(input_ids, pixel_values, context_index)
        return self.language_model(embeds, attention_mask, output_hidden_states=output_hidden_states, last_only=last_only)

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
