"""
checkpoint: every way a model is written and read, and the one way every script gets a model.

  load_model(path)        a train.py --out_dir (ckpt.pt) or an official Sa2VA / exported directory
  build_model(cfg, init)  a preset from scratch, or Sa2VA weights (+ fresh MBA blocks) from an official directory
  save_official(...)      config.json + model.safetensors + tokenizer.json, in Sa2VA's Hugging Face layout

Official names are mapped to ours by one table of templates (KEY_TEMPLATES); every load checks names
and shapes and stops with one line naming the first bad key, file or shape.

  import checkpoint
  model, tokenizer = checkpoint.load_model("out/tiny")
  model, tokenizer = checkpoint.load_model("ckpts/Sa2VA-1B", mba=False)   # exactly Sa2VA
"""

import json
import os
import re
from dataclasses import replace

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import common
import testbed
from inputs import (CHAT_TEMPLATES, IMG_CONTEXT, SA2VA_TOKENS, PROMPT_WORDS, add_sa2va_tokens, llm_specials, load_tokenizer,
                    tiny_tokenizer)
from mllm import LLMS, InternVL
from salma import SALMA, Config, MaskBiasedAttention, SAM2Grounding, set_trainable

TINY_WORDS = sorted(set(PROMPT_WORDS) | set(testbed.WORDS))  # one token each in the tiny tokenizer

# ---------------------------------------------------------------------------------------------
# official names <-> ours, one table of templates ({i}: a number, {rest}: the rest)

KEY_TEMPLATES = [
    ("vision_model.embeddings.class_embedding", "mllm.vision_model.cls_token"),
    ("vision_model.embeddings.position_embedding", "mllm.vision_model.pos_embed"),
    ("vision_model.embeddings.patch_embedding.{rest}", "mllm.vision_model.patch_embed.proj.{rest}"),
    ("vision_model.encoder.layers.{i}.ls1", "mllm.vision_model.blocks.{i}.ls1.gamma"),
    ("vision_model.encoder.layers.{i}.ls2", "mllm.vision_model.blocks.{i}.ls2.gamma"),
    ("vision_model.encoder.layers.{i}.{rest}", "mllm.vision_model.blocks.{i}.{rest}"),
    ("mlp1.{rest}", "mllm.mlp1.{rest}"),
    ("language_model.lm_head.{rest}", "mllm.language_model.lm_head.{rest}"),  # Qwen2
    ("language_model.output.{rest}", "mllm.language_model.output.{rest}"),  # InternLM2 (its other names are ours too)
    ("language_model.model.{rest}", "mllm.language_model.{rest}"),
    ("grounding_encoder.sam2_model.memory_encoder.fuser.layers.{i}.g_weight", "grounding.sam2_model.memory_encoder.fuser.layers.{i}.gamma"),
    ("grounding_encoder.sam2_model.{rest}", "grounding.sam2_model.{rest}"),
    ("text_hidden_fcs.{rest}", "text_hidden_fcs.{rest}"),
    ("mba.{rest}", "mba.{rest}"),  # SALMA's own blocks (absent from Sa2VA checkpoints)
]


def template_regex(template):
    """'a.{i}.{rest}' -> a compiled regex with named groups i (digits) and rest (anything)."""
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{rest\}", r"(?P<rest>.+)")
    return re.compile(pattern + "$")


KEY_RULES = [(template_regex(a), a, template_regex(b), b) for a, b in KEY_TEMPLATES]


def rename_key(key, to_ours=True):
    """Official name -> ours (or back); None when no rule matches."""
    for official_re, official, ours_re, ours in KEY_RULES:
        match = (official_re if to_ours else ours_re).match(key)
        if match:
            return (ours if to_ours else official).format(**match.groupdict())
    return None


def check_keys(expected, got, source, allowed_missing=(), official=False):
    """Raise one clear error naming the first missing/unexpected keys (official names if official)."""
    missing = [k for k in expected if k not in got and not k.startswith(allowed_missing)]
    unexpected = [k for k in got if k not in expected]
    if official:
        missing = [rename_key(k, to_ours=False) or k for k in missing]
        unexpected = [rename_key(k, to_ours=False) or k.removeprefix("<unknown>") for k in unexpected]
    if missing or unexpected:
        parts = [f"missing {len(missing)} keys (first: {missing[:3]})" if missing else "",
                 f"unexpected {len(unexpected)} keys (first: {unexpected[:3]})" if unexpected else ""]
        raise ValueError(f"{source}: checkpoint does not match the model: {'; '.join(p for p in parts if p)}")


def read_safetensors_file(path):
    """load_file with one clear error naming a missing, truncated or corrupt file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (named in the checkpoint's index)")
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type: header too large, truncated, ...
        raise ValueError(f"{path}: unreadable safetensors file ({e}); download it again") from None


def read_safetensors(model_dir):
    """The state dict of model.safetensors or of the shards named in model.safetensors.index.json."""
    single, index = os.path.join(model_dir, "model.safetensors"), os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_safetensors_file(single)
    if os.path.isfile(index):
        shards = sorted(set(common.read_json_file(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_safetensors_file(os.path.join(model_dir, shard)).items()}
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


# What an official config.json leaves out takes the official class's default: transformers' save_pretrained
# writes only the fields that differ from it (nested configs included).
CHAT_DEFAULTS = {"downsample_ratio": 0.5, "force_image_size": None, "max_dynamic_patch": 6,  # Sa2VAChatConfig / InternVLChatConfig
                 "select_layer": -1, "template": None}
VISION_DEFAULTS = {"patch_size": 14, "image_size": 224, "hidden_size": 3200, "num_attention_heads": 25,  # InternVisionConfig
                   "intermediate_size": 12800, "num_hidden_layers": 48, "qkv_bias": False, "qk_normalization": True,
                   "norm_type": "rms_norm", "layer_norm_eps": 1e-6}
LLM_DEFAULTS = {  # per llm_config.architectures[0]
    "Qwen2ForCausalLM": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,  # Qwen2Config
                         "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                         "tie_word_embeddings": False, "rope_scaling": None, "max_position_embeddings": 32768},
    "InternLM2ForCausalLM": {"vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,  # InternLM2Config
                             "num_attention_heads": 32, "num_key_value_heads": None, "rms_norm_eps": 1e-6, "rope_theta": 10000,
                             "tie_word_embeddings": False, "rope_scaling": None, "max_position_embeddings": 2048, "bias": True},
}
ARCHS = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}  # config.json name -> cfg.llm_arch
DEFAULT_TEMPLATES = {"qwen2": "qwen_chat", "internlm2": "internlm2_chat"}  # when config.json names none of CHAT_TEMPLATES


def rope_fields(llm, path):
    """(rope_theta, scaling type, factor) from llm_config: rope_scaling (InternLM2, transformers 4) or rope_parameters (5)."""
    params = llm.get("rope_parameters") or {}
    scaling = llm.get("rope_scaling") or params
    kind = scaling.get("type") or scaling.get("rope_type") or ""
    kind = "" if kind == "default" else kind
    if kind not in ("", "dynamic", "linear"):
        raise ValueError(f"{path}: rope scaling {kind!r} is not built here (dynamic or linear)")
    return params.get("rope_theta", llm["rope_theta"]), kind, float(scaling.get("factor", 1.0))


def config_from_hf(model_dir, base):
    """Config with every size read from an official config.json (vision_config / llm_config); omitted fields take
    the official defaults; an LLM this code does not build stops with one line."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; expected an InternVL / Sa2VA checkpoint directory")
    raw = common.read_json_file(path)
    hf = {**CHAT_DEFAULTS, **raw}
    architecture = (raw.get("llm_config", {}).get("architectures") or ["Qwen2ForCausalLM"])[0]
    if architecture not in ARCHS:
        raise ValueError(f"{path}: the LLM is {architecture}; this code builds {' and '.join(ARCHS)}")
    vis, llm = {**VISION_DEFAULTS, **raw.get("vision_config", {})}, {**LLM_DEFAULTS[architecture], **raw.get("llm_config", {})}
    arch = ARCHS[architecture]
    template = (hf["template"] or "").replace("-", "_")  # Sa2VAChatModel reads it so
    rope_theta, rope_scaling, rope_factor = rope_fields(llm, path)
    return replace(
        base, image_size=hf["force_image_size"] or vis["image_size"], patch_size=vis["patch_size"],
        vit_width=vis["hidden_size"], vit_depth=vis["num_hidden_layers"], vit_heads=vis["num_attention_heads"],
        vit_mlp_ratio=vis["intermediate_size"] / vis["hidden_size"], vit_qkv_bias=vis["qkv_bias"],
        vit_qk_norm=vis["qk_normalization"], vit_norm=vis["norm_type"], vit_eps=vis["layer_norm_eps"],
        vit_select_layer=hf["select_layer"], downsample_ratio=hf["downsample_ratio"], max_tiles=hf["max_dynamic_patch"],
        llm_arch=arch, vocab_size=llm["vocab_size"], llm_hidden=llm["hidden_size"], llm_layers=llm["num_hidden_layers"],
        llm_heads=llm["num_attention_heads"], llm_kv_heads=llm["num_key_value_heads"] or llm["num_attention_heads"],
        llm_intermediate=llm["intermediate_size"], llm_bias=llm.get("bias", False), rope_theta=rope_theta,
        rope_scaling=rope_scaling, rope_factor=rope_factor, max_positions=llm["max_position_embeddings"],
        rms_eps=llm["rms_norm_eps"], tie_word_embeddings=llm["tie_word_embeddings"],
        template=template if template in CHAT_TEMPLATES else DEFAULT_TEMPLATES[arch], **raw.get("salma", {}),
    )


def llm_config(cfg):
    """The llm_config block of config.json for cfg (Qwen2Config or InternLM2Config fields)."""
    architecture = {v: k for k, v in ARCHS.items()}[cfg.llm_arch]
    out = {"architectures": [architecture], "vocab_size": cfg.vocab_size, "hidden_size": cfg.llm_hidden,
           "num_hidden_layers": cfg.llm_layers, "num_attention_heads": cfg.llm_heads, "num_key_value_heads": cfg.llm_kv_heads,
           "intermediate_size": cfg.llm_intermediate, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
           "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_positions,
           "rope_scaling": {"type": cfg.rope_scaling, "factor": cfg.rope_factor} if cfg.rope_scaling else None}
    if cfg.llm_arch == "internlm2":
        out["bias"] = cfg.llm_bias
    return out


def hf_config(cfg, architecture):
    """The official config.json layout for cfg (our extra fields under "salma")."""
    return {
        "architectures": [architecture], "downsample_ratio": cfg.downsample_ratio, "force_image_size": cfg.image_size,
        "max_dynamic_patch": cfg.max_tiles, "ps_version": "v2", "select_layer": cfg.vit_select_layer, "template": cfg.template,
        "use_thumbnail": True,
        "vision_config": {"hidden_size": cfg.vit_width, "num_hidden_layers": cfg.vit_depth, "num_attention_heads": cfg.vit_heads,
                          "intermediate_size": int(cfg.vit_width * cfg.vit_mlp_ratio), "image_size": cfg.image_size,
                          "patch_size": cfg.patch_size, "qkv_bias": cfg.vit_qkv_bias, "qk_normalization": cfg.vit_qk_norm,
                          "norm_type": cfg.vit_norm, "layer_norm_eps": cfg.vit_eps},
        "llm_config": llm_config(cfg),
        "salma": {k: getattr(cfg, k) for k in SALMA_FIELDS},
    }


SALMA_FIELDS = ("sam2_config", "sam2_tiny", "sam_image_size", "sam_multimask", "sa2va_numerics", "num_cond_frames", "mba", "mba_layers", "mba_mode",
                "topk", "tau_gate", "gamma_init", "mba_heads", "mba_dropout", "router_hidden", "tmc_source", "system_prompt")


def official_state_dict(model):
    """Our state dict under official names (LoRA merged into a copy first)."""
    prefix = "mllm." if isinstance(model, InternVL) else ""  # a bare InternVL is SALMA's .mllm
    head_key = llm_keys(model.cfg)[1]
    sd = {}
    for key, value in model.state_dict().items():
        if prefix + key == head_key and model.cfg.tie_word_embeddings:
            continue  # tied: the embedding is saved once, as the official checkpoints do
        name = rename_key(prefix + key, to_ours=False)
        if name is None:
            raise ValueError(f"no official name for {key}; merge LoRA before exporting")
        sd[name] = value.contiguous()
    return sd


def save_official(model, tokenizer, out_dir, architecture="Sa2VAChatModel"):
    """Write config.json, model.safetensors and tokenizer.json in the official layout."""
    os.makedirs(out_dir, exist_ok=True)
    sd = official_state_dict(model)
    save_file(sd, os.path.join(out_dir, "model.safetensors"))
    json.dump(hf_config(model.cfg, architecture), open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))


def load_sam2_checkpoint(grounding, path):
    """Load a SAM-2 / SAM-2.1 .pt ({"model": state_dict}) into the grounding part, keys checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: SAM-2 checkpoint not found")
    sd = common.torch_load(path, "a SAM-2 .pt (download it again)")
    if not isinstance(sd, dict) or "model" not in sd:
        raise ValueError(f"{path}: expected a SAM-2 .pt holding {{'model': state_dict}}")
    check_keys(grounding.sam2_model.state_dict(), sd["model"], path)
    grounding.sam2_model.load_state_dict(sd["model"])


def load_propagator(path, model):
    """A second SAM-2 with model's SAM-2 settings and the weights of a SAM-2 .pt (e.g. the original sam2_hiera_large.pt),
    on model's device, to track videos from keyframe masks (salma.track, Sa2VA-i)."""
    grounding = SAM2Grounding(model.cfg)
    load_sam2_checkpoint(grounding, path)
    return grounding.sam2_model.to(model.device).eval()


# ---------------------------------------------------------------------------------------------
# building and loading


def prepare_tokenizer(cfg, model_dir=""):
    """(tokenizer, cfg with vocab_size covering it, {token: id} of the special tokens)."""
    tok = load_tokenizer(model_dir) if model_dir else tiny_tokenizer(TINY_WORDS, llm_specials(cfg.llm_arch))
    size = add_sa2va_tokens(tok)
    cfg = replace(cfg, vocab_size=max(cfg.vocab_size, size))
    ids = {t: tok.token_to_id(t) for t in llm_specials(cfg.llm_arch) + SA2VA_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"{model_dir or 'tokenizer'}: tokens {missing} are missing; is this an InternVL / Sa2VA tokenizer?")
    return tok, cfg, ids


def load_internvl(model_dir, dtype=None, device="cpu"):
    """An official InternVL2.5 directory -> (InternVL, tokenizer); built on meta, loaded with assign."""
    tok, cfg, ids = prepare_tokenizer(config_from_hf(model_dir, Config.from_preset("internvl2_5-1b")), model_dir)
    with torch.device("meta"):
        model = InternVL(cfg, ids[IMG_CONTEXT])
    ours = {rename_key(k) or f"<unknown>{k}": v for k, v in read_safetensors(model_dir).items()}
    finish_load(model, ours, model_dir, prefix="mllm.")  # a bare InternVL is SALMA's .mllm
    return model.to(device, dtype or common.resolve_dtype("auto", device, cfg)).eval(), tok


def llm_keys(cfg):
    """Our names of the LLM's embedding and head weights (InternLM2 keeps its own: tok_embeddings, output)."""
    llm = LLMS[cfg.llm_arch]
    return f"mllm.language_model.{llm.EMBED}.weight", f"mllm.language_model.{llm.HEAD}.weight"


def finish_load(model, ours, source, allowed_missing=(), prefix=""):
    """Check names (ours = SALMA names, model's own names + prefix) and shapes, then load with assign=True.

    An embedding / lm_head with fewer rows than the tokenizer needs (InternVL2.5, before [SEG] and
    Sa2VA's tokens are added) grows: each new row starts as the mean of the existing rows. A tied
    lm_head (config.json's tie_word_embeddings) is not in the checkpoint and is tied again after loading.
    """
    llm = (model if isinstance(model, InternVL) else model.mllm).language_model
    expected = {prefix + k: v for k, v in model.state_dict().items()}
    embed_key, head_key = llm_keys(llm.cfg)
    if llm.cfg.tie_word_embeddings:
        del expected[head_key]
    check_keys(expected, ours, source, allowed_missing, official=True)
    for key in (embed_key, head_key):
        rows = expected[key].shape[0] if key in expected else 0
        if key in ours and ours[key].shape[0] < rows:
            weight = ours[key]
            ours[key] = torch.cat([weight, weight.mean(0, keepdim=True).expand(rows - weight.shape[0], -1)])
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{source}: {rename_key(k, to_ours=False)} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict({k.removeprefix(prefix): v for k, v in ours.items()}, strict=False, assign=True)
    if llm.cfg.tie_word_embeddings:
        llm.lm_head.weight = llm.embed_tokens.weight


def build_model(cfg, init="", sam2_ckpt="", device="cpu", dtype=torch.float32, **overrides):
    """SALMA (Sa2VA with mba=False): random init, or an official Sa2VA directory in init.

    Sizes come from the checkpoint's config.json; overrides (e.g. mba=True) are applied last. dtype:
    the weights' dtype (bf16 weights run inference under bf16 autocast, as Sa2VA runs on GPU).
    """
    if init:
        tok, cfg, ids = prepare_tokenizer(replace(config_from_hf(init, cfg), **overrides), init)
        with torch.device("meta"):
            model = SALMA(cfg, ids)
        ours = {rename_key(k) or f"<unknown>{k}": v for k, v in read_safetensors(init).items()}
        has_mba = any(k.startswith("mba.") for k in ours)
        finish_load(model, ours, init, allowed_missing=() if has_mba else ("mba.",))
        del ours  # the model holds the tensors now: a change of precision below frees each as it converts it
        if cfg.mba and not has_mba:  # SALMA on Sa2VA weights: fresh MBA blocks
            model.mba = nn.ModuleList(MaskBiasedAttention(cfg, model.grounding.width) for _ in model.mba_layers)
    else:
        tok, cfg, ids = prepare_tokenizer(replace(cfg, **overrides))
        model = SALMA(cfg, ids)
    if sam2_ckpt:
        load_sam2_checkpoint(model.grounding, sam2_ckpt)
    return model.to(device).set_precision(dtype), tok


def read_checkpoint(path):
    """The dict train.py wrote to ckpt.pt; one clear error for a missing, truncated or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no training checkpoint here (train.py writes OUT_DIR/ckpt.pt)")
    state = common.torch_load(path, "a train.py checkpoint (restore it or train again)")
    if not isinstance(state, dict) or not {"model", "configs", "step"} <= state.keys():
        raise ValueError(f"{path}: not a train.py checkpoint (it lacks 'model', 'configs' or 'step')")
    return state


def load_weights(model, sd, source, allowed_missing=()):
    """Load a full state dict in our names; one error naming the first bad key or shape."""
    expected = model.state_dict()
    check_keys(expected, sd, source, allowed_missing)
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=False)


def load_trained(run_dir, **overrides):
    """(model, tokenizer, step) exactly as train.py left run_dir: every weight, frozen ones included.

    overrides: model fields to change (mba=False drops the MBA blocks: the Sa2VA baseline on the
    same weights; mba=True on a baseline run adds fresh blocks with gamma = 0, i.e. the same outputs).
    """
    path = os.path.join(run_dir, "ckpt.pt")
    state = read_checkpoint(path)
    saved = {"sa2va_numerics": False, **state["configs"]["model"]}  # runs saved before the field trained with exact numerics
    train_cfg, cfg = state["configs"]["train"], replace(Config(**saved), **overrides)
    tok, cfg, ids = prepare_tokenizer(cfg, run_dir)
    model = SALMA(cfg, ids)  # its random weights are all replaced below
    set_trainable(model, train_cfg["recipe"], train_cfg["lora_r"], train_cfg["lora_alpha"], train_cfg["lora_dropout"])
    weights = {k: v for k, v in state["model"].items() if cfg.mba or not k.startswith("mba.")}
    load_weights(model, weights, path, allowed_missing=() if any(k.startswith("mba.") for k in weights) else ("mba.",))
    return model, tok, state["step"]


def load_model(path, device="cpu", dtype="float32", **overrides):
    """(model, tokenizer) in eval mode from a train.py --out_dir (its ckpt.pt) or an official-layout directory.

    dtype: a --dtype choice (auto, float32, bfloat16), resolved for the loaded model's config. An
    official directory's sizes come from its config.json; what it does not say is Sa2VA-1B's.
    overrides: model fields, e.g. mba=False (the Sa2VA baseline on the same weights).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (an official Sa2VA / exported SALMA directory or a train.py --out_dir)")
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        model, tok, _ = load_trained(path, **overrides)
    else:
        model, tok = build_model(Config.from_preset("sa2va-1b"), init=path, **overrides)
    return for_inference(model, device, dtype), tok


def for_inference(model, device, dtype):
    """The model on device in eval mode, at the precision a --dtype choice resolves to for it."""
    model = model.to(device).set_precision(common.resolve_dtype(dtype, device, model.cfg)).eval()
    common.release_freed_memory()  # the weights a change of precision left behind
    return model


DEFAULT_RUN = "out/tiny"  # train.py's default --out_dir: what eval.py and demo.py load without --ckpt
CKPT_HELP = (f"a train.py --out_dir, an official Sa2VA / exported SALMA directory, or 'random' (an untrained --preset "
             f"model); default {DEFAULT_RUN} (the quick start's run) when it exists")


def model_from_flags(ckpt, preset="tiny", device="cpu", dtype="float32", **overrides):
    """The model a script's --ckpt names: a directory, 'random' (a fresh preset model), or '' = DEFAULT_RUN."""
    if ckpt == "random":
        model, tok = build_model(Config.from_preset(preset), **overrides)
        return for_inference(model, device, dtype), tok
    if not ckpt and not os.path.isfile(os.path.join(DEFAULT_RUN, "ckpt.pt")):
        raise FileNotFoundError(f"no --ckpt given and {DEFAULT_RUN}/ckpt.pt does not exist: run `python train.py` first, "
                                "or pass --ckpt DIR (--ckpt random for an untrained model)")
    if ckpt and not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt}: not a directory; give a train.py --out_dir, an official Sa2VA / exported "
                                "SALMA directory, or 'random'")
    return load_model(ckpt or DEFAULT_RUN, device, dtype, **overrides)
