"""
salma: the models, and nothing else (the InternVL MLLM itself is in mllm.py).

  InternViT (timm) -> pixel shuffle -> mlp1 -> Qwen2/InternLM2 (KV cache) the InternVL MLLM          mllm.InternVL
  SAM-2 (the sam2 package): image encoder, mask decoder, memory         the grounding part        SAM2Grounding
  pre-pass gate G, Top-K router, Mask-Biased Attention                  SALMA's additions         prior_gate, TopKRouter,
                                                                                                  MaskBiasedAttention
  the whole: [SEG] hidden -> text_hidden_fcs -> z_seg -> SAM-2 prompt   (mba=False: Sa2VA)        SALMA, segment_video

The paper in code (losses in losses.py, the loop in train.py):

  Alg. 1, shared visual encoder    InternVL.extract_feature (448 tiles), SAM2Grounding.encode_image (F_v)
  Alg. 1, LLM hidden states h^l    InternVL.forward -> DecoderLM.forward (every layer; the last after the final norm)
  Alg. 1, pre-pass, Eq. 2 left     prior_gate: the same decoder, prompt (0,0)/label -1, no grad; G = sigmoid(M / tau)
  Eq. 1, Top-K routing             TopKRouter: s_i = MLP(t_i), keep the K best prompt words (scaled by sigmoid(s_i))
  Eq. 2, gated residual            MaskBiasedAttention.forward: F_v + gamma * (CrossAttn(Q=F_v, KV=TopK) * G)
  Alg. 1, MBA over layers          SALMA.refine (one block per layer of cfg.mba_layers)
  Alg. 1, final decode             SAM2Grounding.decode(F_v', prompt = z_seg); video: segment_video (SAM-2 memory)

  import checkpoint, salma
  model, tokenizer = checkpoint.build_model(salma.Config.from_preset("tiny"))          # random init, CPU-sized
  model, tokenizer = checkpoint.load_model("ckpts/Sa2VA-1B")                           # an official directory
"""

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import FLAG_CHOICES, autocast_for
from inputs import (BOS_EOS, FORCED_ANSWER, IMG_CONTEXT, REGION_QUESTION, SEG, encode_turns, eval_prompt, media_placeholder,
                    mllm_pixels, region_context_index, region_grid_masks, region_prompt, sam_pixels)
from mllm import InternVL, apply_lora

# ---------------------------------------------------------------------------------------------
# config: one flat dataclass, named presets, argparse flags generated from it


@dataclass
class Config:
    # InternViT (timm VisionTransformer: InternViT-300M's math; InternViT-6B's with the vit_norm/vit_qk_norm fields)
    image_size: int = 448  # InternViT tile side in pixels
    patch_size: int = 14  # InternViT patch side
    vit_width: int = 1024  # InternViT hidden size
    vit_depth: int = 24  # InternViT blocks
    vit_heads: int = 16  # InternViT attention heads
    vit_mlp_ratio: float = 4.0  # InternViT MLP width / hidden size
    vit_ls_init: float = 0.1  # InternViT LayerScale init
    vit_qkv_bias: bool = True  # InternViT qkv bias (300M: yes; 6B: no)
    vit_qk_norm: bool = False  # InternViT-6B's QK normalisation: RMSNorm over the full q and k (all heads together)
    vit_norm: str = "layer_norm"  # InternViT norm_type: layer_norm (300M) or rms_norm (6B)
    vit_eps: float = 1e-6  # InternViT layer_norm_eps (6B blocks; timm's 300M blocks use the same 1e-6)
    vit_select_layer: int = -1  # config.json select_layer: the InternViT layer whose output feeds mlp1 (-1: the last)
    downsample_ratio: float = 0.5  # pixel shuffle: 32x32x1024 -> 16x16x4096 per tile
    max_tiles: int = 12  # dynamic tiling for images (+ a thumbnail)
    video_frames: int = 5  # frames of a video given to the MLLM
    # LLM (Qwen2 or InternLM2)
    llm_arch: str = "qwen2"  # qwen2 or internlm2 (config.json llm_config.architectures: Qwen2ForCausalLM, InternLM2ForCausalLM)
    vocab_size: int = 151674  # LLM vocabulary (grown to the tokenizer's size when smaller)
    llm_hidden: int = 896  # LLM hidden size
    llm_layers: int = 24  # LLM layers
    llm_heads: int = 14  # LLM query heads
    llm_kv_heads: int = 2  # LLM key/value heads (grouped-query attention)
    llm_intermediate: int = 4864  # LLM SwiGLU width
    llm_bias: bool = False  # InternLM2 config.bias: bias on wqkv and wo (Qwen2's q/k/v always have one)
    rope_theta: float = 1e6  # RoPE base
    rope_scaling: str = ""  # llm_config.rope_scaling type: "" (none), "dynamic" (NTK, InternLM2.5) or "linear"
    rope_factor: float = 1.0  # llm_config.rope_scaling factor
    max_positions: int = 32768  # llm_config.max_position_embeddings: dynamic NTK scaling starts past it
    rms_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # InternVL forces a separate lm_head
    system_prompt: str = ""  # "" = Sa2VA's template (no system turn)
    template: str = "qwen_chat"  # config.json "template", a name in Sa2VA's templates.py: qwen_chat or internlm2_chat (CHAT_TEMPLATES)
    # SAM-2 grounding
    sam2_config: str = "configs/sam2/sam2_hiera_l.yaml"  # SAM 2.0 Hiera-L, as Sa2VA-1B
    sam2_tiny: bool = False  # shrink the packaged config (see SAM2_TINY_OVERRIDES)
    sam_image_size: int = 1024  # SAM-2 input side in pixels
    num_cond_frames: int = 5  # video: frames decoded with the [SEG] prompt, the rest tracked
    sam_multimask: bool = True  # decoder makes 3 masks and keeps the best-IoU one (Sa2VA); False: its single-mask output (tiny: an untrained IoU head would pick at random)
    sa2va_numerics: bool = True  # SAM-2 as Sa2VA's inference computes it: ImageNet mean/std rounded to bf16, tracked frames' memory features stored in bf16; False: exact constants, fp32 memory (tiny, from scratch)
    # SALMA (paper section 3.2); mba=False is exactly the Sa2VA baseline
    mba: bool = True  # SALMA's pre-pass gate + Mask-Biased Attention; False = exactly the Sa2VA baseline
    mba_layers: str = "last"  # LLM layers whose hidden states feed an MBA block: last, all, or a comma list of indices
    mba_mode: str = "gate"  # gate: the gated residual of Eq. 2; film: + FiLM (Table 3 ablation)
    topk: int = 2  # prompt words the router keeps per MBA block (Top-K, Eq. 1)
    tau_gate: float = 1.0  # temperature of the gate G = sigmoid(pre-pass logits / tau)
    gamma_init: float = 0.0  # initial gamma of the gated residual (0, as the authors' code: MBA starts closed)
    mba_heads: int = 8  # attention heads of an MBA block
    mba_dropout: float = 0.1  # dropout in an MBA block
    router_hidden: int = 128  # hidden width of the router MLP
    tmc_source: str = "post"  # F_v pooled for TMC: post = after MBA (paper); pre = before MBA, detached (authors' code)

    @classmethod
    def from_preset(cls, name, **overrides):
        """The named preset with field overrides applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)

    @property
    def num_image_tokens(self):
        """Tokens per 448 tile after pixel shuffle (256 real, 16 tiny)."""
        return int((self.image_size // self.patch_size * self.downsample_ratio) ** 2)


# Sizes of the official checkpoints (each loaded checkpoint's config.json decides; these build one from scratch).
# Sources: the published config.json of each LLM (Qwen/Qwen2.5-{0.5,1.5,3,7,14}B-Instruct, internlm/internlm2_5-{7,20}b-chat)
# and vision tower (OpenGVLab/InternViT-300M-448px-V2_5, InternViT-6B-448px-V2_5), as the InternVL2.5 / InternVL3
# checkpoints Sa2VA starts from carry them (tie_word_embeddings false there); vocabularies: InternVL's + Sa2VA's 5 tokens.
QWEN = dict(llm_arch="qwen2", template="qwen_chat", vocab_size=151679)
INTERNLM2_5 = dict(llm_arch="internlm2", template="internlm2_chat", vocab_size=92558, rms_eps=1e-5, rope_theta=1e6,
                   rope_scaling="dynamic", rope_factor=2.0, max_positions=32768)
INTERNVIT_6B = dict(vit_width=3200, vit_depth=45, vit_heads=25, vit_qkv_bias=False, vit_qk_norm=True, vit_norm="rms_norm")
PRESETS = {
    "internvl2_5-1b": dict(system_prompt=None),
    "sa2va-1b": dict(QWEN),  # Qwen2.5-0.5B: the field defaults
    "sa2va-4b": dict(QWEN, llm_hidden=2048, llm_layers=36, llm_heads=16, llm_kv_heads=2, llm_intermediate=11008),  # Qwen2.5-3B
    "sa2va-8b": dict(INTERNLM2_5, llm_hidden=4096, llm_layers=32, llm_heads=32, llm_kv_heads=8, llm_intermediate=14336),
    "sa2va-26b": dict(INTERNLM2_5, **INTERNVIT_6B, llm_hidden=6144, llm_layers=48, llm_heads=48, llm_kv_heads=8,
                      llm_intermediate=16384),  # InternLM2.5-20B
    "sa2va-internvl3-2b": dict(QWEN, llm_hidden=1536, llm_layers=28, llm_heads=12, llm_kv_heads=2, llm_intermediate=8960),
    "sa2va-internvl3-8b": dict(QWEN, llm_hidden=3584, llm_layers=28, llm_heads=28, llm_kv_heads=4, llm_intermediate=18944),
    "sa2va-internvl3-14b": dict(QWEN, llm_hidden=5120, llm_layers=48, llm_heads=40, llm_kv_heads=8, llm_intermediate=13824,
                                rms_eps=1e-5),
    "tiny": dict(
        image_size=112, vit_width=64, vit_depth=2, vit_heads=2, max_tiles=2,
        vocab_size=0, llm_hidden=128, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_intermediate=256,
        rope_theta=1e4, sam2_config="configs/sam2.1/sam2.1_hiera_t.yaml", sam2_tiny=True, sam_image_size=256,
        sam_multimask=False, sa2va_numerics=False,
    ),  # vocab_size=0: taken from the built-in tiny tokenizer
}
INTERNVL_SYSTEM_PROMPT = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
PRESETS["internvl2_5-1b"]["system_prompt"] = INTERNVL_SYSTEM_PROMPT


# ---------------------------------------------------------------------------------------------
# SAM-2 grounding (the sam2 package, called exactly as Sa2VA calls it)

SAM2_TINY_OVERRIDES = [  # a 2.3M-parameter SAM-2 for CPU tests and the tiny preset (64-d)
    "++model.image_encoder.trunk.embed_dim=32", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
    "++model.image_encoder.neck.d_model=64", "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
    "++model.memory_attention.d_model=64", "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=64", "++model.memory_attention.layer.dim_feedforward=128",
    "++model.memory_attention.layer.self_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.embedding_dim=64",
    "++model.memory_encoder.in_dim=64", "++model.memory_encoder.out_dim=64",
    "++model.memory_encoder.mask_downsampler.embed_dim=64", "++model.memory_encoder.fuser.layer.dim=64",
    "++model.memory_encoder.fuser.num_layers=1",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=64",
]


def build_sam2(cfg):
    """SAM-2 from the sam2 package's own configs, without post-processing, at cfg.sam_image_size."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    overrides = [f"++model.image_size={cfg.sam_image_size}"] + (SAM2_TINY_OVERRIDES if cfg.sam2_tiny else [])
    if not GlobalHydra.instance().is_initialized():  # importing sam2 initialises it with sam2's configs
        initialize_config_module("sam2", version_base="1.2")
    hydra_cfg = compose(config_name=cfg.sam2_config, overrides=overrides)
    OmegaConf.resolve(hydra_cfg)
    with torch.device("cpu"):  # Hiera's constructor calls .item(), so it cannot be built on the meta device
        return instantiate(hydra_cfg.model, _recursive_=True)


class SAM2Grounding(nn.Module):
    """SAM-2 used as Sa2VA uses it: the [SEG] embedding is a third sparse prompt token."""

    def __init__(self, cfg):
        super().__init__()
        self.sam2_model = build_sam2(cfg)
        self.width = self.sam2_model.hidden_dim  # 256 real, 64 tiny
        self.sam2_model.multimask_output_in_sam = cfg.sam_multimask  # read by decode_heads and by sam2's own track_step
        self.memory_dtype = torch.bfloat16 if cfg.sa2va_numerics else None  # Sa2VA's video predictor stores memory in bf16

    def encode_image(self, images):
        """images (B, 3, S, S) -> dict(image_embed F_v (B, C, h, w) with no_mem_embed, high_res_feats, ...)."""
        sam = self.sam2_model
        backbone_out = sam.forward_image(images)
        _, vision_feats, vision_pos, feat_sizes = sam._prepare_backbone_features(backbone_out)
        b = images.shape[0]
        maps = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(vision_feats, feat_sizes)]
        image_embed = maps[-1] + sam.no_mem_embed.view(1, -1, 1, 1)  # (B, C, h, w)
        return {"image_embed": image_embed, "high_res_feats": maps[:-1], "vision_feats": vision_feats,
                "vision_pos": vision_pos, "feat_sizes": feat_sizes}

    def decode_heads(self, image_embed, high_res_feats, seg_embed=None):
        """Sa2VA's decoder call; returns low_res (B, 1, 4h, 4w) logits (best-IoU or single), token (B, C), object_score (B, 1).

        Prompt: the point (0, 0) with label -1 ("not a point", padded to two sparse tokens), no box,
        no mask (dense no_mask_embed), plus seg_embed (B, C) as a third sparse token when given.
        With cfg.sam_multimask (Sa2VA's call), multimask_output=True and the mask with the highest
        predicted IoU is kept; else the decoder's single-mask output. As in Sa2VA's copy of SAM-2's
        heads, masks are never overwritten where the object score says "no object".
        """
        sam, b = self.sam2_model, image_embed.shape[0]
        points = (image_embed.new_zeros(b, 1, 2), -torch.ones(b, 1, dtype=torch.int32, device=image_embed.device))
        sparse, dense = sam.sam_prompt_encoder(points=points, boxes=None, masks=None)
        if seg_embed is not None:
            sparse = torch.cat([sparse, seg_embed[:, None].to(sparse.dtype)], dim=1)  # (B, 3, C)
        masks, iou, tokens, object_score = sam.sam_mask_decoder(
            image_embeddings=image_embed, image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=sam.multimask_output_in_sam,
            repeat_image=False, high_res_features=high_res_feats)  # (B, M, 4h, 4w), (B, M), (B, M', C), (B, 1); M = 3 or 1
        rows, best = torch.arange(b, device=masks.device), iou.argmax(dim=1)
        token = tokens[rows, best] if tokens.shape[1] > 1 else tokens[:, 0]  # one token unless SAM-2 keeps all
        return {"low_res": masks[rows, best][:, None], "token": token, "object_score": object_score}

    def decode(self, image_embed, high_res_feats, seg_embed=None):
        """Best-IoU low-res mask logits (B, 1, 4h, 4w) of decode_heads: Sa2VA's image path."""
        return self.decode_heads(image_embed, high_res_feats, seg_embed)["low_res"]

    def object_pointer(self, heads):
        """SAM-2's object pointer (B, C) from the decoder's output token; no_obj_ptr where no object is seen."""
        sam = self.sam2_model
        pointer = sam.obj_ptr_proj(heads["token"])
        if sam.pred_obj_scores:
            score = heads["object_score"]
            appearing = score.sigmoid() if sam.soft_no_obj_ptr else (score > 0).to(pointer.dtype)  # (B, 1)
            if sam.fixed_no_obj_ptr:
                pointer = appearing * pointer
            pointer = pointer + (1 - appearing) * sam.no_obj_ptr
        return pointer

    def new_memory(self, enc, heads, is_cond):
        """Memory-bank entry of one frame: SAM-2's memory encoder on its best mask, plus its object pointer."""
        sam = self.sam2_model
        size = (sam.image_size, sam.image_size)
        masks = F.interpolate(heads["low_res"].float(), size=size, mode="bilinear", align_corners=False)
        feats, pos = sam._encode_new_memory(
            current_vision_feats=enc["vision_feats"], feat_sizes=enc["feat_sizes"], pred_masks_high_res=masks,
            object_score_logits=heads["object_score"], is_mask_from_pts=is_cond)
        if self.memory_dtype is not None:  # read back, memory attention's concatenation promotes it to the pointers' dtype
            feats = feats.to(self.memory_dtype)
        return {"maskmem_features": feats, "maskmem_pos_enc": pos, "obj_ptr": self.object_pointer(heads)}

    @staticmethod
    def postprocess(low_res_logits, size, orig_hw):
        """Low-res logits (B, 1, h, w) -> bilinear to S x S -> bilinear to orig_hw -> bool masks (B, 1, H, W).

        A pixel is in the mask where sigmoid(logit) > 0.5, as Sa2VA decides it; in float32 the sigmoid of a
        logit just above 0 rounds to 0.5, so this is not quite `logit > 0`.
        """
        x = F.interpolate(low_res_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
        return F.interpolate(x, size=orig_hw, mode="bilinear", align_corners=False).sigmoid() > 0.5


# ---------------------------------------------------------------------------------------------
# SALMA: pre-pass gate, Top-K routing, Mask-Biased Attention (paper section 3.2)


@torch.no_grad()
def prior_gate(grounding, image_embed, high_res_feats, tau_gate):
    """Pre-pass (Alg. 1 l. 7-12): decoder with only the (0,0)/-1 prompt, no grad -> G (B, 1, h, w)."""
    logits = grounding.decode(image_embed, high_res_feats, seg_embed=None)  # (B, 1, 4h, 4w)
    gate = torch.sigmoid(logits.float() / tau_gate)  # Eq. 2, left
    return F.interpolate(gate, size=image_embed.shape[-2:], mode="bilinear", align_corners=False).to(image_embed.dtype)


class TopKRouter(nn.Module):
    """Eq. 1: s_i = MLP(t_i); keep the K highest-scoring valid tokens, scaled by sigmoid(s_i).

    The scaling is our documented choice so that the router receives gradient (the paper does not
    say how it learns; without it the top-k index choice gives it none).
    """

    def __init__(self, dim, hidden, k):
        super().__init__()
        self.k = k
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))  # the authors' router

    def forward(self, tokens, valid):
        """tokens (B, L, C), valid (B, L) -> selected (B, K, C), indices (B, K), selected_valid (B, K)."""
        scores = self.mlp(tokens).squeeze(-1).float()  # (B, L)
        scores = scores.masked_fill(~valid, float("-inf"))
        k = min(self.k, tokens.shape[1])
        top, idx = scores.topk(k, dim=1)  # (B, K)
        selected_valid = torch.isfinite(top)  # fewer than K valid tokens: the rest are masked out
        weight = torch.sigmoid(top.masked_fill(~selected_valid, 0.0)).to(tokens.dtype)
        selected = torch.gather(tokens, 1, idx[..., None].expand(-1, -1, tokens.shape[-1])) * weight[..., None]
        return selected, idx, selected_valid


class MaskBiasedAttention(nn.Module):
    """One MBA block: F_v <- F_v + gamma * ramp * (CrossAttn(Q=LN(F_v), KV=TopK(F_t)) * G)  (Eq. 2)."""

    def __init__(self, cfg, dim):
        super().__init__()
        self.router = TopKRouter(dim, cfg.router_hidden, cfg.topk)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, cfg.mba_heads, dropout=cfg.mba_dropout, batch_first=True)
        self.gamma = nn.Parameter(torch.full((1,), float(cfg.gamma_init)))  # 1-D: FSDP2 shards no scalars
        self.film = nn.Linear(dim, 2 * dim) if cfg.mba_mode == "film" else None  # Table 3 ablation

    def forward(self, feats, text, valid, gate, ramp=1.0):
        """feats F_v (B, C, h, w), text F_t (B, L, C), valid (B, L), gate G (B, 1, h, w) -> F_v', attention (B, hw, K)."""
        b, c, h, w = feats.shape
        selected, _, selected_valid = self.router(text, valid)  # (B, K, C)
        query = self.norm(feats.flatten(2).transpose(1, 2))  # (B, hw, C)
        pad = ~selected_valid
        pad[:, 0] &= selected_valid.any(1)  # a sample with no valid token attends to a zero token
        o_attn, attn_map = self.attn(query, selected, selected, key_padding_mask=pad, need_weights=True)
        o_attn = o_attn * selected_valid.any(1)[:, None, None]  # no words, no injection
        o_attn = o_attn.transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        feats = feats + self.gamma * ramp * (o_attn * gate)  # Eq. 2
        if self.film is not None:
            mean_token = (selected * selected_valid[..., None]).sum(1) / selected_valid.sum(1, keepdim=True).clamp_min(1)
            scale, shift = self.film(mean_token).chunk(2, dim=-1)  # (B, C) each
            feats = (1 + scale[..., None, None]) * feats + shift[..., None, None]
        return feats, attn_map


def check_config(cfg):
    """One clear error for model settings that cannot build a model (before any weight is made)."""
    if cfg.topk < 1:
        raise ValueError(f"--topk={cfg.topk}: MBA keeps at least one prompt word; use --topk >= 1")
    if cfg.mba_mode not in FLAG_CHOICES["mba_mode"] or cfg.tmc_source not in FLAG_CHOICES["tmc_source"]:
        raise ValueError(f"--mba_mode={cfg.mba_mode!r} / --tmc_source={cfg.tmc_source!r}: expected gate|film / post|pre")
    if cfg.tau_gate <= 0:
        raise ValueError(f"--tau_gate={cfg.tau_gate}: must be > 0")
    resolve_mba_layers(cfg.mba_layers, cfg.llm_layers)


def resolve_mba_layers(spec, num_layers):
    """'last' -> [L-1], 'all' -> [0..L-1], '3,7' -> [3, 7] (negative indices count from the end)."""
    if spec == "last":
        return [num_layers - 1]
    if spec == "all":
        return list(range(num_layers))
    try:
        layers = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--mba_layers={spec!r}: expected 'last', 'all' or a comma list of layer indices") from None
    if not all(-num_layers <= i < num_layers for i in layers):
        raise ValueError(f"--mba_layers={spec!r}: the LLM has {num_layers} layers (indices {-num_layers}..{num_layers - 1})")
    return [i % num_layers for i in layers]


# ---------------------------------------------------------------------------------------------
# the SALMA model (mba=False: the Sa2VA baseline)


class SALMA(nn.Module):
    """InternVL + SAM-2 grounding; [SEG] hidden -> text_hidden_fcs -> sparse prompt; MBA on F_v."""

    def __init__(self, cfg, token_ids):
        super().__init__()
        check_config(cfg)
        self.cfg, self.token_ids = cfg, token_ids
        self.mllm = InternVL(cfg, token_ids[IMG_CONTEXT])
        self.grounding = SAM2Grounding(cfg)
        d = self.grounding.width
        self.text_hidden_fcs = nn.Sequential(nn.Linear(cfg.llm_hidden, cfg.llm_hidden), nn.ReLU(), nn.Linear(cfg.llm_hidden, d), nn.Dropout(0.0))
        # From scratch, z_seg starts at the scale of SAM-2's other prompt tokens (N(0, 1) per channel, as sam2
        # initialises its point and mask-token embeddings): on the RMS-normed last hidden state, fcs[0]'s default
        # init and the ReLU leave a second moment of 1/6 per channel, so fcs[2] gets std sqrt(6 / fan_in). With
        # nn.Linear's default, |z_seg| is ~4x smaller than its neighbours and the decoder learns to ignore it.
        nn.init.normal_(self.text_hidden_fcs[2].weight, std=(6 / cfg.llm_hidden) ** 0.5)
        self.mba_layers = resolve_mba_layers(cfg.mba_layers, cfg.llm_layers)
        self.mba = nn.ModuleList(MaskBiasedAttention(cfg, d) for _ in self.mba_layers) if cfg.mba else nn.ModuleList()

    def refine(self, image_embed, high_res_feats, hidden, text_valid, ramp=1.0, maps=None, prior_embed=None):
        """SALMA's step between encoder and decoder: gate from the pre-pass, then each MBA block.

        image_embed (P, C, h, w); hidden: per LLM layer (P, L, D); text_valid (P, L). The pre-pass
        reads prior_embed (default image_embed; a tracked video frame passes its F_v without memory).
        With mba=False F_v is returned as it is (the Sa2VA baseline).
        """
        if not self.cfg.mba:
            return image_embed
        prior = image_embed if prior_embed is None else prior_embed
        gate = prior_gate(self.grounding, prior, high_res_feats, self.cfg.tau_gate)  # (P, 1, h, w)
        feats = image_embed
        for layer, block in zip(self.mba_layers, self.mba):
            text = self.text_hidden_fcs(hidden[layer])  # F_t (P, L, C)
            feats, attn = block(feats, text, text_valid, gate, ramp)
            if maps is not None:
                maps.setdefault("attention", []).append(attn)
        if maps is not None:
            maps["gate"] = gate
        return feats

    def forward(self, batch, ramp=1.0):
        """Teacher-forced training pass. Returns logits, low-res mask logits (P, 1, 4h, 4w), z_seg, z_v.

        batch (see make_train_batch): input_ids/attention_mask/labels (B, L), pixel_values, sam_images
        (F, 3, S, S), seg_index (N_seg, 2) = (row, position) of each [SEG], seg_text (N_seg, L) bool,
        pair_seg / pair_frame (P,): which [SEG] and which SAM frame each (mask, frame) pair uses.
        """
        out = self.mllm(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], output_hidden_states=True,
                        context_index=batch.get("context_index"))
        rows, cols = batch["seg_index"].unbind(1)
        z_seg = self.text_hidden_fcs(out["hidden_states"][-1][rows, cols])  # (N_seg, C)
        seg, frame = batch["pair_seg"], batch["pair_frame"]
        if seg.numel() == 0:  # chat-only batch (text-only records too): nothing to segment, no SAM-2 pass
            side = self.cfg.sam_image_size // 16  # SAM-2's image embedding grid
            low = z_seg.new_zeros(0, 1, 4 * side, 4 * side)
            return {"logits": out["logits"], "low_res": low, "z_seg": z_seg, "tmc_feats": z_seg.new_zeros(0, self.grounding.width, side, side)}
        encoder_trains = any(p.requires_grad for p in self.grounding.sam2_model.image_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoder_trains):  # frozen in the sa2va recipe
            enc = self.grounding.encode_image(batch["sam_images"])
        image_embed = enc["image_embed"][frame]  # (P, C, h, w)
        high_res = [f[frame] for f in enc["high_res_feats"]]
        hidden = [h[rows[seg]] if h is not None else None for h in self.hidden_for_mba(out["hidden_states"])]
        feats = self.refine(image_embed, high_res, hidden, batch["seg_text"][seg], ramp)
        low_res = self.grounding.decode(feats, high_res, z_seg[seg])
        pooled = feats if self.cfg.tmc_source == "post" else image_embed.detach()
        return {"logits": out["logits"], "low_res": low_res, "z_seg": z_seg, "tmc_feats": pooled}

    def hidden_for_mba(self, hidden_states):
        """Hidden states indexed by LLM layer, None where no MBA block reads (saves gathers)."""
        wanted = set(self.mba_layers) if self.cfg.mba else set()
        return [h if i in wanted else None for i, h in enumerate(hidden_states)]

    # --- inference

    @torch.inference_mode()
    def answer(self, frames, expr, tokenizer, is_video=False, force_seg=False, max_new_tokens=2048, regions=None, question=None):
        """MLLM on Sa2VA's eval prompt -> (text, z_seg (N, C), hidden per layer (N, L, D), text_valid (N, L)).

        Greedy generation as Sa2VA evaluates; force_seg=True instead teacher-forces the answer
        "Sure, [SEG]." (one forward, for models not yet trained to answer with [SEG]).
        question: the whole user text ("<image>\n..."), instead of the segmentation prompt for expr.
        regions: bool masks (n, H, W) on an image, given as Sa2VA's region prompt (predict_forward's
        mask_prompts) after the image, referred to as region1..regionN in the question.
        """
        with self.autocast():
            cfg = self.cfg
            pixel_values = mllm_pixels(frames, cfg, is_video).to(self.device)
            media = media_placeholder(pixel_values.shape[0], cfg, is_video)
            question, context_index = question or eval_prompt(expr, is_video), None
            if regions is not None:
                if is_video:
                    raise ValueError("region prompts are for images (as in Sa2VA), not videos")
                grid = region_grid_masks(regions, cfg)
                media += region_prompt(grid)
                context_index = region_context_index(pixel_values.shape[0], cfg.num_image_tokens, grid)
            turn = (question, FORCED_ANSWER if force_seg else None)
            ids, _, text_mask = encode_turns(tokenizer, [turn], cfg.system_prompt, media, BOS_EOS[cfg.llm_arch][0])
            if force_seg:
                out = self.mllm(ids[None].to(self.device), pixel_values, output_hidden_states=True, context_index=context_index,
                                last_only=True)  # no logits needed: a 1,800-token prompt's would take 1.1 GB in fp32
                sequence, hidden, text = ids, out["hidden_states"], FORCED_ANSWER
            else:
                stop = self.stop_ids
                generated, hidden = self.mllm.generate(ids[None].to(self.device), pixel_values, max_new_tokens, stop, keep_hidden=True,
                                                       context_index=context_index)
                sequence = torch.cat([ids, generated[0].cpu()])[: hidden[-1].shape[1]]  # hidden covers all but the last token
                text = tokenizer.decode([i for i in generated[0].tolist() if i not in stop], skip_special_tokens=False)  # [SEG] kept
            seg_pos = (sequence == self.token_ids[SEG]).nonzero().flatten().to(self.device)
            z_seg = self.text_hidden_fcs(hidden[-1][0, seg_pos])  # (N, C)
            n = len(seg_pos)
            valid = torch.zeros(n, sequence.shape[0], dtype=torch.bool, device=self.device)
            valid[:, : text_mask.shape[1]] = text_mask[0].to(self.device)
            hidden = [h.expand(n, -1, -1) if h is not None else None for h in self.hidden_for_mba(hidden)]
            return text, z_seg, hidden, valid

    @property
    def stop_ids(self):
        """Token ids that end an answer: the template's <|im_end|> and the LLM's end of text."""
        return {self.token_ids["<|im_end|>"], self.token_ids[BOS_EOS[self.cfg.llm_arch][1]]}

    def describe_region(self, image, masks, tokenizer, question=REGION_QUESTION, max_new_tokens=64):
        """Text about the regions masks (n, H, W) of a PIL image ("region1", ... in the question)."""
        text = self.answer([image], "", tokenizer, max_new_tokens=max_new_tokens, regions=masks, question="<image>\n" + question)[0]
        return text.replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()

    @torch.inference_mode()
    def segment_image(self, image, expr, tokenizer, maps=None, force_seg=False, max_new_tokens=2048, question=None):
        """Referring segmentation of one PIL image: bool mask (H, W), or an empty mask without [SEG].

        maps, when given, receives the answer text, the gate, the MBA attention and the mask logits;
        force_seg, max_new_tokens and question go to answer().
        """
        text, z_seg, hidden, valid = self.answer([image], expr, tokenizer, force_seg=force_seg, max_new_tokens=max_new_tokens,
                                                 question=question)
        if maps is not None:
            maps["answer"] = text
        w, h = image.size
        if z_seg.shape[0] == 0:
            if maps is not None:
                maps["no_seg"] = True  # evaluations count a missing prediction apart from an empty one
            return torch.zeros(h, w, dtype=torch.bool)
        with self.autocast():
            enc = self.grounding.encode_image(self.sam_input([image]))
            return self.decode_prompts(enc, *stack_answers([(text, z_seg, hidden, valid)]), (h, w), maps)[0]

    @torch.inference_mode()
    def answer_many(self, frames, exprs, tokenizer, is_video=False, force_seg=False, max_new_tokens=2048, batch_size=8):
        """answer() for several expressions of the same frames, sharing their work.

        InternViT and the projector run once; the LLM runs the prompt prefix every expression shares
        (everything before the expression) once into a KV cache, and each batch of batch_size
        expressions continues it, left-padded, in one forward (force_seg) or one greedy generation.
        Returns answer()'s tuple per expression, except that hidden and text_valid hold only the
        prompt's text tokens (all that MBA reads): (N, T_text, D) and (N, T_text).
        """
        with self.autocast():
            cfg, llm = self.cfg, self.mllm.language_model
            pixel_values = mllm_pixels(frames, cfg, is_video).to(self.device)
            media = media_placeholder(pixel_values.shape[0], cfg, is_video)
            turns = [(eval_prompt(expr, is_video), FORCED_ANSWER if force_seg else None) for expr in exprs]
            prompts = [encode_turns(tokenizer, [turn], cfg.system_prompt, media, BOS_EOS[cfg.llm_arch][0]) for turn in turns]
            ids, text_masks = [p[0].to(self.device) for p in prompts], [p[2][0].to(self.device) for p in prompts]
            n_prefix = common_prefix_length(ids)
            cache = [{} for _ in llm.layers]  # the prefix's keys and values, shared by every expression
            prefix = llm(self.mllm.embed(ids[0][None, :n_prefix], pixel_values), cache=cache, output_hidden_states=True,
                         last_only=True)["hidden_states"]  # per layer (1, n_prefix, D)
            answers = []
            for start in range(0, len(exprs), batch_size):
                rows = range(start, min(start + batch_size, len(exprs)))
                answers += self.continue_prefix([ids[i] for i in rows], [text_masks[i] for i in rows], prefix, cache,
                                                tokenizer, force_seg, max_new_tokens)
            return answers

    def continue_prefix(self, ids, text_masks, prefix, cache, tokenizer, force_seg, max_new_tokens):
        """answer()'s tuples (text tokens only, see answer_many) for prompts ids [(L_i,)] that all start with the
        prefix whose hidden states (per layer (1, P, D)) and KV cache are given: one batch, left-padded."""
        llm, n_prefix, b = self.mllm.language_model, prefix[0].shape[1], len(ids)
        suffixes = [x[n_prefix:] for x in ids]
        pads = [max(len(x) for x in suffixes) - len(x) for x in suffixes]
        eos = self.token_ids[BOS_EOS[self.cfg.llm_arch][1]]
        batch = torch.stack([F.pad(x, (pad, 0), value=eos) for x, pad in zip(suffixes, pads)])
        real = torch.stack([torch.arange(batch.shape[1], device=self.device) >= pad for pad in pads])  # (B, W)
        mask = torch.cat([real.new_ones(b, n_prefix), real], dim=1)  # (B, P + W)
        batch_cache = [{"k": c["k"].expand(b, -1, -1, -1), "v": c["v"].expand(b, -1, -1, -1)} for c in cache]
        stop = self.stop_ids
        if force_seg:
            hidden = llm(llm.embed_tokens(batch), mask, batch_cache, output_hidden_states=True, last_only=True)["hidden_states"]
            generated = [torch.zeros(0, dtype=torch.long)] * b
        else:
            tokens, hidden = self.mllm.generate(batch, None, max_new_tokens, stop, keep_hidden=True, attention_mask=mask, cache=batch_cache)
            generated = [first_stop(row, stop) for row in tokens.cpu()]
        wanted = [i for i, h in enumerate(self.hidden_for_mba(hidden)) if h is not None]
        answers = []
        for row, (x, text_mask, pad, new) in enumerate(zip(ids, text_masks, pads, generated)):
            sequence = torch.cat([x, new.to(self.device)])[: len(x) + max(len(new) - 1, 0)]  # hidden covers all but the last token
            layer = lambda i: torch.cat([prefix[i][0], hidden[i][row, pad:]])  # (len(sequence), D)
            seg_pos = (sequence == self.token_ids[SEG]).nonzero().flatten()
            z_seg = self.text_hidden_fcs(layer(-1)[seg_pos])  # (N, C)
            text_pos = text_mask.nonzero().flatten()
            per_layer = [layer(i)[text_pos].expand(len(seg_pos), -1, -1) if i in wanted else None for i in range(len(hidden))]
            text = FORCED_ANSWER if force_seg else tokenizer.decode([i for i in new.tolist() if i not in stop], skip_special_tokens=False)
            answers.append((text, z_seg, per_layer, text_pos.new_ones(len(seg_pos), len(text_pos), dtype=torch.bool)))
        return answers

    @torch.inference_mode()
    def segment_image_many(self, image, exprs, tokenizer, force_seg=False, max_new_tokens=2048, batch_size=8):
        """segment_image() for several expressions of one PIL image, sharing its work (answer_many; SAM-2's
        encoder once, the decoder batched) -> (bool masks (E, H, W), answer texts, missing: no [SEG] per expression)."""
        answers = self.answer_many([image], exprs, tokenizer, force_seg=force_seg, max_new_tokens=max_new_tokens, batch_size=batch_size)
        w, h = image.size
        masks, with_seg = torch.zeros(len(exprs), h, w, dtype=torch.bool), [i for i, a in enumerate(answers) if a[1].shape[0]]
        if with_seg:
            with self.autocast():
                enc = self.grounding.encode_image(self.sam_input([image]))
                for start in range(0, len(with_seg), batch_size):
                    rows = with_seg[start: start + batch_size]
                    masks[rows] = self.decode_prompts(enc, *stack_answers([answers[i] for i in rows]), (h, w))
        return masks, [a[0] for a in answers], [a[1].shape[0] == 0 for a in answers]

    def decode_prompts(self, enc, z_seg, hidden, valid, size, maps=None):
        """Bool masks (n, H, W) of n prompts on one encoded image: z_seg (n, C), MBA's hidden per layer (n, L, D), valid (n, L)."""
        n = z_seg.shape[0]
        image_embed, high_res = enc["image_embed"][:1].expand(n, -1, -1, -1), [f[:1].expand(n, -1, -1, -1) for f in enc["high_res_feats"]]
        feats = self.refine(image_embed, high_res, hidden, valid, maps=maps)
        low_res = self.grounding.decode(feats, high_res, z_seg)
        if maps is not None:
            maps["low_res"] = low_res
        return SAM2Grounding.postprocess(low_res, self.cfg.sam_image_size, size)[:, 0]

    def sam_input(self, frames, video=False):
        """SAM-2's input (T, 3, S, S) for PIL frames, on the model's device, in its dtype (sam_pixels; cfg.sa2va_numerics)."""
        return sam_pixels(frames, self.cfg.sam_image_size, self.cfg.sa2va_numerics, self.dtype, video).to(self.device)

    @property
    def device(self):
        return self.text_hidden_fcs[0].weight.device

    @property
    def dtype(self):
        """The MLLM's weight dtype: the model's precision (the rest keeps fp32 weights, see set_precision)."""
        return self.mllm.language_model.embed_tokens.weight.dtype

    def set_precision(self, dtype):
        """bf16: the MLLM's weights in bf16 (the bulk of the memory), SAM-2, text_hidden_fcs and MBA keep
        fp32 weights and compute under bf16 autocast, so sam2's fp32-only inputs (point coordinates,
        LayerNorms on CPU) meet fp32 parameters. fp32: everything fp32, no autocast."""
        for part in self.children():  # part by part: a bf16 MLLM is never copied to fp32 on the way
            part.to(dtype if part is self.mllm else torch.float32)
        return self

    def autocast(self):
        """bf16 autocast when the model runs in bf16, else nothing (see autocast_for)."""
        return autocast_for(self.dtype, self.device)

    @contextmanager
    def as_baseline(self):
        """The same weights with MBA switched off: the Sa2VA baseline (--mba=False)."""
        cfg = self.cfg
        self.cfg = replace(cfg, mba=False)
        try:
            yield self
        finally:
            self.cfg = cfg


def set_trainable(model, recipe, lora_r=128, lora_alpha=256, lora_dropout=0.05):
    """recipe 'full': everything trains (from scratch nothing is pretrained); 'sa2va': Sa2VA's recipe (frozen InternViT, mlp1 and
    SAM-2 image encoder; LoRA on the LLM; new-token embeddings, lm_head, text_hidden_fcs, the SAM-2 decoder and MBA train)."""
    if recipe not in ("full", "sa2va"):
        raise ValueError(f"--recipe={recipe!r}: expected 'full' or 'sa2va'")
    model.requires_grad_(True)
    if recipe == "sa2va":
        model.grounding.sam2_model.image_encoder.requires_grad_(False)
        model.mllm.vision_model.requires_grad_(False)
        model.mllm.mlp1.requires_grad_(False)
        llm = model.mllm.language_model
        apply_lora(llm, lora_r, lora_alpha, lora_dropout)
        llm.norm.requires_grad_(False)
        llm.embed_tokens.requires_grad_(True)  # new-token rows ([SEG], ...) and lm_head rows train
        llm.lm_head.requires_grad_(True)
    return model


def common_prefix_length(sequences):
    """How many leading tokens all sequences (1-D tensors) share, at most the shortest's length - 1 (each keeps one of its own)."""
    n = min(len(x) for x in sequences) - 1
    for x in sequences[1:]:
        n = int((x[:n] == sequences[0][:n]).long().cumprod(0).sum())
    return n


def first_stop(tokens, stop):
    """A generated row (T,) cut after its first stop id (generate repeats it to the end)."""
    hits = [t for t, token in enumerate(tokens.tolist()) if token in stop]
    return tokens[: hits[0] + 1] if hits else tokens


def stack_answers(answers):
    """The first [SEG] of each answer() tuple as one batch: z_seg (n, C), hidden per layer (n, L, D) and text_valid (n, L),
    right-padded to the longest L (padding is not valid, so MBA never reads it)."""
    width = max(a[3].shape[1] for a in answers)

    def pad(x):  # (1, L, ...) -> (1, width, ...), zeros after L
        out = x.new_zeros(1, width, *x.shape[2:])
        out[:, : x.shape[1]] = x
        return out

    hidden = [None if h is None else torch.cat([pad(a[2][i][:1]) for a in answers]) for i, h in enumerate(answers[0][2])]
    return torch.cat([a[1][:1] for a in answers]), hidden, torch.cat([pad(a[3][:1]) for a in answers])


# ---------------------------------------------------------------------------------------------
# video: conditioning frames decoded with [SEG], the rest tracked by SAM-2's memory


def keyframe_indices(num_frames, count, uniform=False):
    """The frames a video's MLLM sees and SAM-2 decodes with [SEG]: the first count (Sa2VA), or count spread evenly
    from the first frame to the last, floor(linspace) as Sa2VA-i samples them (uniform; repeats on short videos dropped)."""
    if not uniform:
        return list(range(min(count, num_frames)))
    return sorted({int(t) for t in torch.linspace(0, num_frames - 1, count, dtype=torch.float64)})


@torch.inference_mode()
def segment_video(model, load_frame, num_frames, expr, tokenizer, maps_for=None, force_seg=False, max_new_tokens=2048,
                  question=None, maps=None, uniform=False, propagator=None):
    """Masks of a video for one expression, one frame at a time: yields bool masks (H, W) (see track).

    load_frame(t) -> PIL image; the MLLM sees the keyframes (keyframe_indices; uniform: Sa2VA-i's). maps_for(t) -> a
    dict receiving frame t's gate and MBA attention; maps receives the answer text; force_seg, max_new_tokens and
    question go to SALMA.answer(); propagator: see track.
    """
    keyframes = keyframe_indices(num_frames, model.cfg.video_frames, uniform)
    answer = model.answer([load_frame(t) for t in keyframes], expr, tokenizer, is_video=True, force_seg=force_seg,
                          max_new_tokens=max_new_tokens, question=question)
    if maps is not None:
        maps["answer"] = answer[0]
    for masks in track(model, load_frame, num_frames, [answer], maps_for=maps_for, uniform=uniform, propagator=propagator):
        yield masks[0]


@torch.inference_mode()
def track(model, load_frame, num_frames, answers, batch_size=8, maps_for=None, uniform=False, propagator=None):
    """Masks of a video for several answers (answer() / answer_many() tuples): yields bool masks (E, H, W) per frame.

    The keyframes (keyframe_indices(num_frames, cfg.num_cond_frames, uniform)) are decoded with each answer's first
    [SEG] and no memory, the other frames tracked with SAM-2's memory attention, memory encoder and object pointers
    (Sa2VA). With a propagator (a SAM-2 model, e.g. the original weights: Sa2VA-i) the keyframes' masks are made
    first and given to it as mask prompts; it tracks every other frame with its own decoder and memory.
    SAM-2's image encoder runs once per frame for every answer; batch_size answers share one batched decode and
    memory bank (held: each bank's recent frames only, never all frames at SAM-2 size). An answer without [SEG]
    gets empty masks. maps_for(t) -> a dict receiving frame t's gate and MBA attention (one answer, Sa2VA's tracking).
    """
    with_seg = [i for i, a in enumerate(answers) if a[1].shape[0]]
    groups = [with_seg[i: i + batch_size] for i in range(0, len(with_seg), batch_size)]
    prompts = [stack_answers([answers[i] for i in group]) for group in groups]
    banks = [{"cond_frame_outputs": {}, "non_cond_frame_outputs": {}} for _ in groups]
    keyframes = keyframe_indices(num_frames, model.cfg.num_cond_frames, uniform)
    if propagator is not None and groups:
        prompt_keyframes(model, propagator, load_frame, num_frames, keyframes, prompts, banks)
    for t in range(num_frames):
        frame = load_frame(t)
        w, h = frame.size
        masks, low_res = torch.zeros(len(answers), h, w, dtype=torch.bool), []
        if groups:
            with model.autocast():  # per frame: the caller's code between frames runs outside it
                if propagator is not None:
                    features = None if t in keyframes else propagator_features(model, propagator, frame)  # once per frame
                    low_res = [propagate_frame(propagator, features, t, num_frames, bank) for bank in banks]
                else:
                    enc = model.grounding.encode_image(model.sam_input([frame], video=True))
                    maps = maps_for(t) if maps_for else None
                    low_res = [track_frame(model, enc, t, t in keyframes, num_frames, prompt, bank, maps)
                               for prompt, bank in zip(prompts, banks)]
        for group, low in zip(groups, low_res):
            masks[group] = SAM2Grounding.postprocess(low, model.cfg.sam_image_size, (h, w))[:, 0]
        yield masks


def track_frame(model, enc, t, is_cond, num_frames, prompt, bank, maps=None):
    """Frame t of one batch of prompts (stack_answers) -> low-res mask logits (n, 1, 4h, 4w); adds the frame to bank."""
    sam = model.grounding.sam2_model
    z_seg, hidden, valid = prompt
    enc = expand_encoding(enc, z_seg.shape[0])
    if is_cond:
        pix = enc["image_embed"]
    else:
        pix = sam._prepare_memory_conditioned_features(
            frame_idx=t, is_init_cond_frame=False, current_vision_feats=enc["vision_feats"][-1:],
            current_vision_pos_embeds=enc["vision_pos"][-1:], feat_sizes=enc["feat_sizes"][-1:],
            output_dict=bank, num_frames=num_frames)  # (n, C, h, w) fused with the memory bank
    feats = model.refine(pix, enc["high_res_feats"], hidden, valid, maps=maps, prior_embed=enc["image_embed"])  # pre-pass: no memory
    heads = model.grounding.decode_heads(feats, enc["high_res_feats"], z_seg if is_cond else None)
    bank["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = model.grounding.new_memory(enc, heads, is_cond)
    forget_old_frames(sam, bank, t)
    return heads["low_res"]


def forget_old_frames(sam, bank, t):
    """Drop the tracked frame that memory attention will never read again (SAM-2 reads the last num_maskmem frames
    and the last max_obj_ptrs_in_encoder pointers)."""
    keep = max(sam.num_maskmem * sam.memory_temporal_stride_for_eval, sam.max_obj_ptrs_in_encoder)
    bank["non_cond_frame_outputs"].pop(t - keep, None)


def prompt_keyframes(model, propagator, load_frame, num_frames, keyframes, prompts, banks):
    """Sa2VA-i's first pass: each keyframe's masks from [SEG] (the model's decoder and MBA, no memory), thresholded
    and given to the propagator as mask prompts at SAM-2 size (SAM-2's add_new_mask), into each bank's conditioning frames."""
    size = model.cfg.sam_image_size
    for t in keyframes:
        frame = load_frame(t)
        with model.autocast():
            enc = model.grounding.encode_image(model.sam_input([frame], video=True))
            masks = [model.decode_prompts(enc, *prompt, (frame.height, frame.width)) for prompt in prompts]  # (n, H, W) each
            features = propagator_features(model, propagator, frame)
            for bank, mask in zip(banks, masks):
                mask_input = F.interpolate(mask[:, None].float(), size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=True) >= 0.5  # (n, 1, S, S), as SAM-2's add_new_mask
                bank["cond_frame_outputs"][t] = propagator_step(propagator, features, t, num_frames, bank, mask_input.float())


def propagate_frame(propagator, features, t, num_frames, bank):
    """Frame t under the propagator: a keyframe's stored output, else SAM-2's tracking step on its memory bank."""
    out = bank["cond_frame_outputs"].get(t)
    if out is None:
        out = bank["non_cond_frame_outputs"][t] = propagator_step(propagator, features, t, num_frames, bank)
        forget_old_frames(propagator, bank, t)
    return out["pred_masks"]


def propagator_features(model, propagator, frame):
    """The propagator's image features of one PIL frame: (vision feats, their positions, sizes), SAM-2's (HW, 1, C) layout."""
    return propagator._prepare_backbone_features(propagator.forward_image(model.sam_input([frame], video=True)))[1:]


def propagator_step(propagator, features, t, num_frames, bank, mask_input=None):
    """SAM-2's own track_step on frame t (features: propagator_features) for every object of bank (mask_input (n, 1, S, S):
    a keyframe's prompt)."""
    n = next(iter(bank["cond_frame_outputs"].values()))["obj_ptr"].shape[0] if mask_input is None else mask_input.shape[0]
    feats, pos, sizes = features
    out = propagator.track_step(
        frame_idx=t, is_init_cond_frame=mask_input is not None, current_vision_feats=[f.expand(-1, n, -1) for f in feats],
        current_vision_pos_embeds=[p.expand(-1, n, -1) for p in pos], feat_sizes=sizes, point_inputs=None,
        mask_inputs=mask_input, output_dict=bank, num_frames=num_frames)
    out["maskmem_features"] = out["maskmem_features"].to(torch.bfloat16)  # as SAM-2's video predictor stores it
    return out


def expand_encoding(enc, n):
    """encode_image's output for one frame, repeated (as views) for a batch of n prompts."""
    if n == 1:
        return enc
    rows = lambda x: x.expand(n, *x.shape[1:])
    cols = lambda x: x.expand(x.shape[0], n, *x.shape[2:])  # SAM-2's (HW, B, C) sequences
    return {"image_embed": rows(enc["image_embed"]), "high_res_feats": [rows(f) for f in enc["high_res_feats"]],
            "vision_feats": [cols(f) for f in enc["vision_feats"]], "vision_pos": [cols(p) for p in enc["vision_pos"]],
            "feat_sizes": enc["feat_sizes"]}
