"""The InternVL family of Sa2VA checkpoints: InternLM2 and InternViT-6B against transformers, every member's
official-layout directory loading and segmenting without a preset, and export round trips."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

import checkpoint
import inputs
import mllm
import salma

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_LLM = dict(vocab_size=0, llm_hidden=64, llm_layers=2, llm_heads=4, llm_intermediate=128)


def tiny_cfg(preset, **overrides):
    """A tiny model with the architecture (not the sizes) of a named preset."""
    arch = {k: v for k, v in salma.PRESETS[preset].items() if not k.startswith(("llm_", "vit_width", "vit_depth", "vit_heads", "vocab"))}
    arch.update(llm_arch=salma.PRESETS[preset].get("llm_arch", "qwen2"))
    return salma.Config.from_preset("tiny", **{**arch, **TINY_LLM, "mba": False, **overrides})


def perturb(model):
    """Norms, biases and LayerScales away from their init so every weight matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


# ---------------------------------------------------------------------------------------------
# (a) InternLM2 against transformers' Llama on the same weights, wqkv unpacked


def unpack_wqkv(w, cfg):
    """wqkv rows (or bias) laid out per key/value group as [H/KV query heads, key, value] -> q, k, v rows."""
    hd = cfg.llm_hidden // cfg.llm_heads
    w = w.reshape(cfg.llm_kv_heads, -1, hd, *w.shape[1:])  # (KV, H/KV + 2, hd, ...)
    return w[:, :-2].reshape(-1, *w.shape[3:]), w[:, -2].reshape(-1, *w.shape[3:]), w[:, -1].reshape(-1, *w.shape[3:])


def to_hf_llama(llm, cfg):
    """Our InternLM2 weights under transformers' LlamaForCausalLM names."""
    out = {"model.embed_tokens.weight": llm.tok_embeddings.weight, "model.norm.weight": llm.norm.weight, "lm_head.weight": llm.output.weight}
    for i, layer in enumerate(llm.layers):
        o = f"model.layers.{i}."
        for p in ("weight", "bias") if cfg.llm_bias else ("weight",):
            q, k, v = unpack_wqkv(getattr(layer.attention.wqkv, p), cfg)
            out.update({o + f"self_attn.q_proj.{p}": q, o + f"self_attn.k_proj.{p}": k, o + f"self_attn.v_proj.{p}": v,
                        o + f"self_attn.o_proj.{p}": getattr(layer.attention.wo, p)})
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[o + f"mlp.{theirs}.weight"] = getattr(layer.feed_forward, ours).weight
        out[o + "input_layernorm.weight"], out[o + "post_attention_layernorm.weight"] = layer.attention_norm.weight, layer.ffn_norm.weight
    return out


@pytest.mark.parametrize("scaling", ["", "dynamic", "linear"])
def test_internlm2_matches_transformers_llama_on_unpacked_wqkv(scaling):
    """Logits and every hidden state equal transformers' LlamaForCausalLM (5.25) holding the same weights, wqkv split
    as Sa2VA's modeling_internlm2.py (bytedance/Sa2VA 9832e1a, projects/sa2va/hf/models/) lines 374-386 read it:
    rearrange 'b q (h gs d) -> b q h gs d', queries [..., :gs-2], key [..., -2], value [..., -1]. RoPE scaling as its
    lines 198-244 (linear: t / factor; dynamic NTK past max_position_embeddings: base * (factor * L / max - (factor - 1))
    ** (dim / (dim - 2))), which transformers' modeling_rope_utils.py _compute_dynamic_ntk_parameters computes alike;
    41 tokens past max_position_embeddings=16. Row 1 is left-padded (as the Qwen2 parity test)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_cfg("sa2va-8b", vocab_size=300, llm_kv_heads=1 if scaling else 2, llm_bias=True, rms_eps=1e-5,
                   rope_scaling=scaling, rope_factor=2.0, max_positions=16)
    llm = perturb(mllm.InternLM2(cfg)).eval()
    rope = {"rope_type": scaling or "default", "rope_theta": cfg.rope_theta, **({"factor": 2.0} if scaling else {})}
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
        num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_kv_heads,
        rms_norm_eps=cfg.rms_eps, max_position_embeddings=16, attention_bias=True, rope_parameters=rope,
        tie_word_embeddings=False)).eval()
    ref.load_state_dict(to_hf_llama(llm, cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 41))
    mask = torch.ones(2, 41, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        ours = llm(llm.embed_tokens(ids[:1]), output_hidden_states=True)
        theirs = ref(input_ids=ids[:1], output_hidden_states=True)
        assert (ours["logits"] - theirs.logits).abs().max() < 1e-5
        assert len(ours["hidden_states"]) == cfg.llm_layers  # theirs: embeddings first, then each layer (last normed)
        for a, b in zip(ours["hidden_states"], theirs.hidden_states[1:]):
            assert (a - b).abs().max() < 1e-5
        if not scaling:  # transformers' dynamic NTK reads max(position_ids) + 1, the official code the key length
            padded = llm(llm.embed_tokens(ids), mask)["logits"]
            assert (padded[1, 4:] - ref(input_ids=ids, attention_mask=mask.long()).logits[1, 4:]).abs().max() < 1e-5


def test_internlm2_dynamic_ntk_tables_equal_the_official_construction():
    """cos/sin written from Sa2VA's modeling_internlm2.py lines 228-244 (InternLM2DynamicNTKScalingRotaryEmbedding.
    _set_cos_sin_cache, base from Python floats) for a sequence past max_position_embeddings, and unscaled within it."""
    cfg = tiny_cfg("sa2va-8b", vocab_size=50, rope_theta=1e6, rope_scaling="dynamic", rope_factor=2.0, max_positions=16)
    llm, dim = mllm.InternLM2(cfg), cfg.llm_hidden // cfg.llm_heads
    for seq_len in (12, 40):
        base = cfg.rope_theta
        if seq_len > cfg.max_positions:
            base = base * ((cfg.rope_factor * seq_len / cfg.max_positions) - (cfg.rope_factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        freqs = torch.einsum("i,j->ij", torch.arange(seq_len).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = llm.rope_tables(torch.arange(seq_len)[None], seq_len, torch.float32)
        assert torch.equal(cos[0, 0], emb.cos()) and torch.equal(sin[0, 0], emb.sin())


# ---------------------------------------------------------------------------------------------
# (b) InternViT-6B blocks against transformers' InternVLVisionModel


def to_hf_vision(vit, depth):
    """Our InternViT-6B-style tower under transformers' InternVLVisionModel names (models/internvl/modeling_internvl.py)."""
    sd, out = vit.state_dict(), {}
    out["embeddings.cls_token"], out["embeddings.position_embeddings"] = sd["cls_token"], sd["pos_embed"]
    for p in ("weight", "bias"):
        out[f"embeddings.patch_embeddings.projection.{p}"] = sd[f"patch_embed.proj.{p}"]
    for i in range(depth):
        b, o = f"blocks.{i}.", f"encoder.layer.{i}."
        out[o + "lambda_1"], out[o + "lambda_2"] = sd[b + "ls1.gamma"], sd[b + "ls2.gamma"]
        for name, w in zip(("q_proj", "k_proj", "v_proj"), sd[b + "attn.qkv.weight"].chunk(3)):
            out[o + f"attention.{name}.weight"] = w
        out[o + "attention.q_norm.weight"], out[o + "attention.k_norm.weight"] = sd[b + "attn.q_norm.weight"], sd[b + "attn.k_norm.weight"]
        out[o + "layernorm_before.weight"], out[o + "layernorm_after.weight"] = sd[b + "norm1.weight"], sd[b + "norm2.weight"]
        for p in ("weight", "bias"):
            out[o + f"attention.projection_layer.{p}"] = sd[b + f"attn.proj.{p}"]
            out[o + f"mlp.fc1.{p}"], out[o + f"mlp.fc2.{p}"] = sd[b + f"mlp.fc1.{p}"], sd[b + f"mlp.fc2.{p}"]
    return out


def test_internvit_6b_matches_transformers_internvl_vision_model():
    """RMSNorm blocks, QK RMSNorm over all heads together (q_norm/k_norm of width C, as Sa2VA's modeling_intern_vit.py
    lines 136-152), no qkv bias: equal to transformers' InternVLVisionModel (5.25, use_qk_norm=True, norm_type='rms_norm',
    attention_bias=False, use_mean_pooling=True: no final norm) on the same weights; the last layer's output and, for
    select_layer=-2, hidden_states[-2] (Sa2VA's modeling_sa2va_chat.py lines 222-233)."""
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLVisionModel

    torch.manual_seed(0)
    cfg = tiny_cfg("sa2va-26b", vit_depth=3)
    vit = perturb(mllm.build_vit(cfg)).eval()
    ref = InternVLVisionModel(InternVLVisionConfig(
        hidden_size=cfg.vit_width, num_hidden_layers=cfg.vit_depth, num_attention_heads=cfg.vit_heads,
        intermediate_size=int(cfg.vit_width * cfg.vit_mlp_ratio), image_size=[cfg.image_size] * 2,
        patch_size=[cfg.patch_size] * 2, use_qk_norm=True, use_mean_pooling=True, attention_bias=False,
        norm_type="rms_norm", layer_norm_eps=1e-6)).eval()
    missing, unexpected = ref.load_state_dict(to_hf_vision(vit, cfg.vit_depth), strict=False)
    assert not unexpected and not missing
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        theirs = ref(pixels, output_hidden_states=True)
        assert (mllm.vit_features(vit, pixels, -1) - theirs.last_hidden_state).abs().max() < 1e-5
        assert (mllm.vit_features(vit, pixels, -2) - theirs.hidden_states[-2]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# (c) every family member: an official-layout directory loads without a preset and segments

FAMILY = ["sa2va-1b", "sa2va-4b", "sa2va-8b", "sa2va-26b", "sa2va-internvl3-2b", "sa2va-internvl3-8b", "sa2va-internvl3-14b"]
# InternLM2Config.__init__ defaults (Sa2VA 9832e1a, projects/sa2va/hf/models/configuration_internlm2.py lines 77-98)
INTERNLM2_DEFAULTS = {"vocab_size": 103168, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": None, "max_position_embeddings": 2048,
                      "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bias": True, "rope_theta": 10000, "rope_scaling": None}


def official_mllm_keys(cfg):
    """The MLLM's state-dict names in Sa2VAChatModel: InternVisionModel (modeling_intern_vit.py lines 67-229), mlp1
    (modeling_sa2va_chat.py lines 144-149), InternLM2ForCausalLM (modeling_internlm2.py lines 265-280, 316-322, 625-634,
    830-833, 1010-1012) or transformers' Qwen2ForCausalLM."""
    v = "vision_model."
    keys = {v + "embeddings.class_embedding", v + "embeddings.position_embedding", v + "embeddings.patch_embedding.weight",
            v + "embeddings.patch_embedding.bias"}
    norm = ("weight", "bias") if cfg.vit_norm == "layer_norm" else ("weight",)
    for i in range(cfg.vit_depth):
        b = f"{v}encoder.layers.{i}."
        keys |= {b + "ls1", b + "ls2", b + "attn.qkv.weight", b + "attn.proj.weight", b + "attn.proj.bias"}
        keys |= {b + f"{m}.{p}" for m in ("mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
        keys |= {b + f"{n}.{p}" for n in ("norm1", "norm2") for p in norm}
        keys |= {b + "attn.qkv.bias"} if cfg.vit_qkv_bias else set()
        keys |= {b + "attn.q_norm.weight", b + "attn.k_norm.weight"} if cfg.vit_qk_norm else set()
    keys |= {f"mlp1.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    m = "language_model.model."
    if cfg.llm_arch == "internlm2":
        keys |= {m + "tok_embeddings.weight", m + "norm.weight", "language_model.output.weight"}
        for i in range(cfg.llm_layers):
            b = f"{m}layers.{i}."
            keys |= {b + n for n in ("attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight",
                                     "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")}
            keys |= {b + "attention.wqkv.bias", b + "attention.wo.bias"} if cfg.llm_bias else set()
    else:
        keys |= {m + "embed_tokens.weight", m + "norm.weight"} | (set() if cfg.tie_word_embeddings else {"language_model.lm_head.weight"})
        for i in range(cfg.llm_layers):
            b = f"{m}layers.{i}."
            keys |= {b + f"self_attn.{n}_proj.{p}" for n in "qkv" for p in ("weight", "bias")} | {b + "self_attn.o_proj.weight"}
            keys |= {b + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
            keys |= {b + "input_layernorm.weight", b + "post_attention_layernorm.weight"}
    return keys


def sparse_config(config):
    """config.json as save_pretrained writes it: llm_config fields equal to the official class's default left out
    (InternLM2Config above, transformers' Qwen2Config), and vision / chat fields as test_eval.without_defaults does."""
    from test_eval import without_defaults

    out = without_defaults(config)
    if config["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]:
        out["llm_config"] = {k: v for k, v in config["llm_config"].items() if INTERNLM2_DEFAULTS.get(k, object()) != v}
    return out


def family_model(preset, seed=0):
    """A random tiny SALMA (mba=False: Sa2VA) of a family member's architecture, perturbed, and its tokenizer."""
    torch.manual_seed(seed)
    model, tok = checkpoint.build_model(tiny_cfg(preset))
    return perturb(model).eval(), tok


@pytest.mark.parametrize("preset", FAMILY)
def test_each_family_member_loads_from_its_official_layout_and_segments(preset, tmp_path):
    """save_official writes exactly the official MLLM names; the directory, its config.json stripped of default-valued
    fields, loads with no preset into the same model, segments an image ((H, W) bool) and answers as the original."""
    model, tok = family_model(preset)
    checkpoint.save_official(model, tok, str(tmp_path))
    names = {k for k in load_file(tmp_path / "model.safetensors") if k.startswith(("vision_model.", "mlp1.", "language_model."))}
    assert names == official_mllm_keys(model.cfg)
    config = json.load(open(tmp_path / "config.json"))
    sparse = sparse_config(config)
    assert len(sparse["llm_config"]) < len(config["llm_config"]) and len(sparse["vision_config"]) < len(config["vision_config"])
    json.dump(sparse, open(tmp_path / "config.json", "w"))
    loaded, tok2 = checkpoint.load_model(str(tmp_path))
    assert loaded.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    image = Image.new("RGB", (150, 100), (90, 140, 200))
    mask = loaded.segment_image(image, "the blue square", tok2, force_seg=True)
    assert mask.shape == (100, 150) and mask.dtype == torch.bool
    text, _, _, _ = loaded.answer([image], "the blue square", tok2, max_new_tokens=4)
    assert text == model.answer([image], "the blue square", tok, max_new_tokens=4)[0]


def test_eval_py_runs_an_internlm2_internvit_6b_directory_without_a_preset(tmp_path):
    """The Sa2VA-26B layout (InternLM2 + InternViT-6B) through eval.py --ckpt DIR, as a user runs it."""
    model, tok = family_model("sa2va-26b")
    checkpoint.save_official(model, tok, str(tmp_path / "ckpt"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--quiet", f"--ckpt={tmp_path / 'ckpt'}",
                           "--dataset=synthetic", "--limit=1", "--force_seg=True", f"--out_dir={tmp_path / 'eval'}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(tmp_path / "eval" / "metrics.json"))


def test_internlm2_prompts_start_with_bos_and_generation_stops_at_its_end_of_text():
    """Sa2VA's predict_forward encodes the prompt with tokenizer.encode (modeling_sa2va_chat.py line 718), which puts
    InternLM2's <s> first and nothing for Qwen2; internlm2_chat's stop word is <|im_end|> (templates.py lines 20-27),
    and generation stops at the tokenizer's eos (</s>) as well."""
    for preset, first in (("sa2va-8b", "<s>"), ("sa2va-1b", "<|im_start|>")):
        tok, cfg, ids = checkpoint.prepare_tokenizer(tiny_cfg(preset))
        bos = inputs.BOS_EOS[cfg.llm_arch][0]
        encoded, _, _ = inputs.encode_turns(tok, [("hello", None)], "", "", bos)
        assert tok.id_to_token(int(encoded[0])) == first
    model, tok = family_model("sa2va-8b")
    eos, vocab = tok.token_to_id("</s>"), model.cfg.vocab_size
    model.mllm.language_model.output = EosHead(eos, vocab)
    text, _, _, _ = model.answer([Image.new("RGB", (64, 64))], "x", tok, max_new_tokens=5)
    assert text == ""  # stopped at once, the stop token not in the text


class EosHead(torch.nn.Module):
    """An LM head whose logits always pick one token."""

    def __init__(self, token, vocab):
        super().__init__()
        self.token, self.vocab = token, vocab

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.full(x.shape[:-1], self.token), self.vocab).to(x.dtype)


def test_tokenizer_model_alone_is_one_line_naming_the_conversion(tmp_path):
    """An InternLM2 directory that ships only tokenizer.model (sentencepiece) stops with the command that writes tokenizer.json."""
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(FileNotFoundError, match="tokenizer.model.*save_pretrained"):
        inputs.load_tokenizer(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# (d) export round trips, training included


@pytest.mark.parametrize("preset", ["sa2va-1b", "sa2va-8b", "sa2va-26b"])
def test_export_round_trip_is_exact_after_lora_training(preset, tmp_path):
    """load -> save_official -> load gives identical state dicts and outputs (InternLM2's packed wqkv bit for bit);
    a Sa2VA-recipe model (LoRA on wqkv/wo/w1-3 for InternLM2, Sa2VA's wrap_llm_lora targets) after one optimiser
    step, merged and exported, gives the trained model's logits."""
    model, tok = family_model(preset)
    checkpoint.save_official(model, tok, str(tmp_path / "a"))
    first, _ = checkpoint.load_model(str(tmp_path / "a"))
    checkpoint.save_official(first, tok, str(tmp_path / "b"))
    second, _ = checkpoint.load_model(str(tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(first.mllm(ids)["logits"], second.mllm(ids)["logits"])

    salma.set_trainable(model, "sa2va", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_a" in n]
    assert lora and (preset != "sa2va-8b" or any("wqkv" in n for n in lora))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    model.train()
    model.mllm(ids)["logits"].logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        trained = model.mllm(ids)["logits"]
    mllm.merge_lora(model.mllm.language_model)
    checkpoint.save_official(model, tok, str(tmp_path / "c"))
    exported, _ = checkpoint.load_model(str(tmp_path / "c"))
    with torch.no_grad():
        assert (exported.mllm(ids)["logits"] - trained).abs().max() < 1e-4
    assert math.isfinite(float(trained.abs().max()))
