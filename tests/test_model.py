"""InternVL core: parity with transformers, checkpoints in the official layout, tokenizer, generation."""

import json
import os
import re

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

import mllm
import salma
import testbed
import checkpoint
import inputs

TINY = salma.Config.from_preset("tiny")


def tiny_internvl(seed=0):
    """A random tiny InternVL and its tokenizer."""
    torch.manual_seed(seed)
    tok, cfg, ids = checkpoint.prepare_tokenizer(TINY)
    model = mllm.InternVL(cfg, ids[inputs.IMG_CONTEXT]).eval()
    with torch.no_grad():  # LayerScale and norms away from their init so every weight matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model, tok, cfg


def prompt_with_image(tok, cfg, image):
    """Token ids (1, L) of a Sa2VA-style prompt with one image, and its pixels."""
    pixels = inputs.mllm_pixels([image], cfg, is_video=False)
    media = inputs.media_placeholder(pixels.shape[0], cfg, is_video=False)
    ids, _, _ = inputs.encode_turns(tok, [("<image>\nPlease segment the red circle.", None)], "", media)
    return ids[None], pixels


def random_image(w=200, h=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


# ---------------------------------------------------------------------------------------------
# parity with transformers (an implementation we did not write)


def to_hf_qwen2(sd):
    """Our Qwen2 keys -> transformers' Qwen2ForCausalLM keys."""
    return {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in sd.items()}


def hf_qwen2_config(cfg):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.llm_hidden, num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_kv_heads,
        intermediate_size=cfg.llm_intermediate, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps,
        tie_word_embeddings=False, max_position_embeddings=4096)


def test_qwen2_matches_transformers_with_padding():
    from transformers import Qwen2ForCausalLM

    model, tok, cfg = tiny_internvl()
    llm = model.language_model
    ref = Qwen2ForCausalLM(hf_qwen2_config(cfg)).eval()
    ref.load_state_dict(to_hf_qwen2(llm.state_dict()))
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, :5] = False  # left padding on the second row
    with torch.no_grad():
        ours = llm(llm.embed_tokens(ids), mask)["logits"]
        theirs = ref(input_ids=ids, attention_mask=mask.long()).logits
    assert (ours[0] - theirs[0]).abs().max() < 1e-4
    assert (ours[1, 5:] - theirs[1, 5:]).abs().max() < 1e-4


def to_hf_internvl(model):
    """Our InternVL weights under transformers' InternVLForConditionalGeneration names."""
    sd, out = model.state_dict(), {}
    vit = {k.removeprefix("vision_model."): v for k, v in sd.items() if k.startswith("vision_model.")}
    out["model.vision_tower.embeddings.cls_token"] = vit["cls_token"]
    out["model.vision_tower.embeddings.position_embeddings"] = vit["pos_embed"]
    for p in ("weight", "bias"):
        out[f"model.vision_tower.embeddings.patch_embeddings.projection.{p}"] = vit[f"patch_embed.proj.{p}"]
    for i in range(model.cfg.vit_depth):
        b, o = f"blocks.{i}.", f"model.vision_tower.encoder.layer.{i}."
        out[o + "lambda_1"], out[o + "lambda_2"] = vit[b + "ls1.gamma"], vit[b + "ls2.gamma"]
        for p in ("weight", "bias"):
            for name, qkv in zip(("q_proj", "k_proj", "v_proj"), vit[b + f"attn.qkv.{p}"].chunk(3)):
                out[o + f"attention.{name}.{p}"] = qkv
            out[o + f"attention.projection_layer.{p}"] = vit[b + f"attn.proj.{p}"]
            out[o + f"layernorm_before.{p}"], out[o + f"layernorm_after.{p}"] = vit[b + f"norm1.{p}"], vit[b + f"norm2.{p}"]
            out[o + f"mlp.fc1.{p}"], out[o + f"mlp.fc2.{p}"] = vit[b + f"mlp.fc1.{p}"], vit[b + f"mlp.fc2.{p}"]
    for ours, theirs in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for p in ("weight", "bias"):
            out[f"model.multi_modal_projector.{theirs}.{p}"] = sd[f"mlp1.{ours}.{p}"]
    for k, v in sd.items():
        if k.startswith("language_model.") and "lm_head" not in k:
            out[f"model.{k}"] = v
    out["lm_head.weight"] = sd["language_model.lm_head.weight"]
    return out


def hf_internvl_reference(model):
    """transformers' InternVLForConditionalGeneration configured as InternVL2.5, holding model's weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    cfg = model.cfg
    vision = InternVLVisionConfig(
        hidden_size=cfg.vit_width, num_hidden_layers=cfg.vit_depth, num_attention_heads=cfg.vit_heads,
        intermediate_size=int(cfg.vit_width * cfg.vit_mlp_ratio), image_size=[cfg.image_size] * 2,
        patch_size=[cfg.patch_size] * 2, use_qk_norm=False, use_mean_pooling=True,  # no final norm, as InternViT
        layer_scale_init_value=cfg.vit_ls_init, attention_bias=True, norm_type="layer_norm", layer_norm_eps=1e-6)
    hf_cfg = InternVLConfig(vision_config=vision, text_config=hf_qwen2_config(cfg), downsample_ratio=cfg.downsample_ratio,
                            image_token_id=model.img_context_id, projector_hidden_act="gelu", tie_word_embeddings=False)
    ref = InternVLForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(to_hf_internvl(model), strict=False)
    assert not unexpected and not [k for k in missing if "pooler" not in k]
    return ref


def test_internvl_matches_transformers_on_a_prompt_with_an_image():
    model, tok, cfg = tiny_internvl()
    ref = hf_internvl_reference(model)
    ids, pixels = prompt_with_image(tok, cfg, random_image())
    assert pixels.shape[0] == 3  # 2 tiles + thumbnail
    with torch.no_grad():
        ours = model(ids, pixels)["logits"]
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
    assert (ours - theirs).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# checkpoints in the official layout


def test_official_layout_round_trip_and_key_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok, cfg = tiny_internvl()
    checkpoint.save_official(model, tok, tmp_path, architecture="InternVLChatModel")
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "vision_model.encoder.layers.0.ls1" in names and "language_model.model.layers.1.self_attn.q_proj.bias" in names
    assert "language_model.lm_head.weight" in names and "mlp1.3.weight" in names
    assert json.load(open(tmp_path / "config.json"))["llm_config"]["num_hidden_layers"] == cfg.llm_layers
    loaded, tok2 = checkpoint.load_internvl(str(tmp_path))
    ids, pixels = prompt_with_image(tok2, cfg, random_image())
    with torch.no_grad():
        assert torch.equal(model(ids, pixels)["logits"], loaded(ids, pixels)["logits"])

    sd = load_file(tmp_path / "model.safetensors")
    del sd["mlp1.1.bias"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 keys.*mlp1.1.bias"):
        checkpoint.load_internvl(str(tmp_path))
    sd["mlp1.1.bias"] = torch.zeros(cfg.llm_hidden)
    sd["vision_model.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected 1 keys.*vision_model.extra.weight"):
        checkpoint.load_internvl(str(tmp_path))


def test_sharded_checkpoint_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok, cfg = tiny_internvl()
    checkpoint.save_official(model, tok, tmp_path, architecture="InternVLChatModel")
    sd = load_file(tmp_path / "model.safetensors")
    os.remove(tmp_path / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, tmp_path / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    json.dump(index, open(tmp_path / "model.safetensors.index.json", "w"))
    loaded, _ = checkpoint.load_internvl(str(tmp_path))
    assert torch.equal(loaded.mlp1[3].weight, model.mlp1[3].weight)


def test_internvl_checkpoint_without_sa2va_tokens_grows_the_vocabulary(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok, cfg = tiny_internvl()
    checkpoint.save_official(model, tok, tmp_path, architecture="InternVLChatModel")
    n_new = len(inputs.SA2VA_TOKENS)  # the tiny tokenizer adds them last: drop them as InternVL2.5 has none
    old = cfg.vocab_size - n_new
    sd = load_file(tmp_path / "model.safetensors")
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        sd[key] = sd[key][:old].clone()
    save_file(sd, tmp_path / "model.safetensors")
    for name, edit in (("config.json", lambda c: c["llm_config"].update(vocab_size=old)),
                       ("tokenizer.json", lambda t: t.update(added_tokens=[a for a in t["added_tokens"] if a["content"] not in inputs.SA2VA_TOKENS]))):
        content = json.load(open(tmp_path / name))
        edit(content)
        json.dump(content, open(tmp_path / name, "w"))
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id(inputs.SEG) is None

    loaded, tok2 = checkpoint.load_internvl(str(tmp_path))
    assert tok2.token_to_id(inputs.SEG) == tok.token_to_id(inputs.SEG) == old
    for key in ("embed_tokens", "lm_head"):
        weight, original = getattr(loaded.language_model, key).weight, getattr(model.language_model, key).weight
        assert weight.shape[0] == cfg.vocab_size and torch.equal(weight[:old], original[:old])
        assert torch.allclose(weight[old:], original[:old].mean(0).expand(n_new, -1))
    ids, pixels = prompt_with_image(tok2, cfg, random_image())
    with torch.no_grad():
        assert torch.equal(model(ids, pixels)["logits"][..., :old], loaded(ids, pixels)["logits"][..., :old])


def test_tied_lm_head_is_saved_once_and_tied_again_on_load(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    tok, cfg, ids = checkpoint.prepare_tokenizer(salma.Config.from_preset("tiny", tie_word_embeddings=True))
    model = mllm.InternVL(cfg, ids[inputs.IMG_CONTEXT]).eval()
    checkpoint.save_official(model, tok, tmp_path, architecture="InternVLChatModel")
    assert "language_model.lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded, _ = checkpoint.load_internvl(str(tmp_path))
    assert loaded.language_model.lm_head.weight is loaded.language_model.embed_tokens.weight
    prompt, pixels = prompt_with_image(tok, cfg, random_image())
    with torch.no_grad():
        assert torch.equal(model(prompt, pixels)["logits"], loaded(prompt, pixels)["logits"])


def test_missing_directory_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_internvl(str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_vocab_merges_tokenizer_gives_the_same_ids_as_tokenizer_json(tmp_path):
    from tokenizers import models as tok_models, trainers

    corpus = ["the small red circle left of the blue square", "please segment the largest green triangle"] * 20
    bpe = inputs.qwen_byte_level(tok_models.BPE())
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=inputs.pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(inputs.QWEN_SPECIALS)
    bpe.save(str(tmp_path / "tokenizer.json"))
    bpe.model.save(str(tmp_path))  # vocab.json + merges.txt
    specials = {t: bpe.token_to_id(t) for t in inputs.QWEN_SPECIALS}
    json.dump(specials, open(tmp_path / "added_tokens.json", "w"))
    from_json = inputs.load_tokenizer(str(tmp_path))
    os.remove(tmp_path / "tokenizer.json")
    from_files = inputs.load_tokenizer(str(tmp_path))
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nPlease segment the small red circle.<|im_end|>\n"
    assert from_json.encode(text).ids == from_files.encode(text).ids
    assert from_files.encode(text).ids[0] == specials["<|im_start|>"]
    assert from_files.decode(from_files.encode("the blue square").ids) == "the blue square"


def test_tiny_tokenizer_reads_testbed_words_as_single_tokens_and_is_reproducible():
    """Every word of the generated expressions, the training questions/answers and eval's prompts is one
    token (any case, after a space or not); other text round-trips through bytes; two builds are identical."""
    tok = inputs.tiny_tokenizer(checkpoint.TINY_WORDS)
    scenes = testbed.SyntheticRefDataset(200, seed=3)
    texts = [e for i in range(len(scenes)) for e in scenes[i]["exprs"]] + inputs.SEG_QUESTIONS + inputs.SEG_ANSWERS
    texts += [inputs.eval_prompt("the red circle", video) for video in (False, True)] + [inputs.REGION_QUESTION]
    for text in texts:
        text = text.replace("<image>\n", "").replace("[SEG]", "")
        pieces = [p.lstrip("Ġ") for p in tok.encode(text).tokens if re.search("[A-Za-z]", p)]
        assert pieces == re.findall(r"[A-Za-z]+", text), (text, pieces)
    other = "Zebra quagga, naïve façade 42!"
    assert tok.decode(tok.encode(other).ids) == other
    assert tok.to_str() == inputs.tiny_tokenizer(checkpoint.TINY_WORDS).to_str()


def test_encode_turns_marks_user_words_and_answer_labels():
    tok, cfg, ids = checkpoint.prepare_tokenizer(TINY)
    media = inputs.media_placeholder(1, cfg, is_video=False)
    input_ids, labels, text = inputs.encode_turns(tok, [("<image>\nfind the cat", "It is [SEG]."), ("and the dog", "[SEG].")], "", media)
    assert (input_ids == ids[inputs.IMG_CONTEXT]).sum() == cfg.num_image_tokens
    assert tok.decode(input_ids[text[0]].tolist()) == "\nfind the cat"
    assert tok.decode(input_ids[text[1]].tolist()) == "and the dog"
    assert not (text[0] & text[1]).any()
    answer = tok.decode(input_ids[labels != -100].tolist(), skip_special_tokens=False)
    assert answer == "It is [SEG].<|im_end|>[SEG].<|im_end|>"


# ---------------------------------------------------------------------------------------------
# generation, pixel shuffle, tiling, LoRA


def test_greedy_generate_with_kv_cache_equals_full_recompute():
    model, tok, cfg = tiny_internvl(seed=3)
    ids, pixels = prompt_with_image(tok, cfg, random_image(seed=1))
    generated, hidden = model.generate(ids, pixels, max_new_tokens=12, keep_hidden=True)
    sequence = ids[0]
    with torch.no_grad():
        for _ in range(12):
            logits = model(sequence[None], pixels)["logits"]
            sequence = torch.cat([sequence, logits[0, -1].argmax()[None]])
        full = model(sequence[None, :-1], pixels, output_hidden_states=True)["hidden_states"]
    assert generated[0].tolist() == sequence[ids.shape[1]:].tolist()
    assert (hidden[-1] - full[-1]).abs().max() < 1e-4


def test_pixel_shuffle_hand_computed():
    x = torch.arange(8).float().reshape(1, 2, 4, 1)  # (N, W, H, C) with x[w, h] = 4w + h
    y = mllm.pixel_shuffle(x, 0.5)  # (1, 1, 2, 4): each output pixel holds a 2x2 block
    # block order (w, h) = (0,0), (0,1), (1,0), (1,1)
    assert y.shape == (1, 1, 2, 4)
    assert y[0, 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("size,max_tiles,grid", [((448, 448), 12, (1, 1)), ((896, 448), 12, (2, 1)),
                                                 ((800, 600), 12, (4, 3)), ((800, 600), 6, (3, 2)),
                                                 ((100, 1000), 12, (1, 10)), ((800, 600), 1, (1, 1))])
def test_tiling_picks_the_closest_aspect_ratio(size, max_tiles, grid):
    assert inputs.choose_grid(*size, max_tiles, 448) == grid
    tiles = inputs.dynamic_tiles(Image.new("RGB", size), max_tiles, 448)
    n = grid[0] * grid[1]
    assert len(tiles) == (n + 1 if n > 1 else 1) and all(t.size == (448, 448) for t in tiles)


def test_tiles_are_crops_in_row_major_order():
    image = Image.new("RGB", (896, 448))
    image.paste((255, 0, 0), (448, 0, 896, 448))  # right half red
    left, right, thumb = inputs.dynamic_tiles(image, 12, 448)
    assert left.getpixel((10, 10)) == (0, 0, 0) and right.getpixel((10, 10)) == (255, 0, 0)
    assert thumb.getpixel((10, 10)) == (0, 0, 0) and thumb.getpixel((440, 10)) == (255, 0, 0)


def test_lora_starts_as_identity_and_trains_only_adapters():
    model, tok, cfg = tiny_internvl()
    ids = torch.randint(0, 200, (1, 9))
    with torch.no_grad():
        before = model(ids)["logits"]
        mllm.apply_lora(model.language_model, r=4, alpha=8, dropout=0.0)
        after = model(ids)["logits"]
    assert torch.equal(before, after)
    trainable = {n for n, p in model.language_model.layers.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "norm" in n for n in trainable)
    assert not any("base" in n for n in trainable)


def test_packed_linears_match_transformers_hold_one_copy_and_refuse_training():
    model, tok, cfg = tiny_internvl()
    ref = hf_internvl_reference(model)
    keys = set(model.state_dict())
    mllm.pack_linears_for_cpu(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, mllm.PackedLinear) and m.weight.numel() == 0 for m in linears)  # plain copies freed
    assert set(model.state_dict()) == keys  # same names
    ids, pixels = prompt_with_image(tok, cfg, random_image())
    with torch.no_grad():
        theirs = ref(input_ids=ids, pixel_values=pixels).logits
        assert (model(ids, pixels)["logits"] - theirs).abs().max() < 1e-4
    with pytest.raises(RuntimeError, match="packed for fp32 CPU inference"):
        model(ids, pixels)  # grad enabled
    half, _, _ = tiny_internvl()
    half.to(torch.bfloat16)
    mllm.pack_linears_for_cpu(half)
    assert not any(isinstance(m, mllm.PackedLinear) for m in half.modules())  # only an all-fp32 model is packed


# ---------------------------------------------------------------------------------------------
# the prompt the official weights saw


def sa2va_prompt_ids(tok, text):
    """Sa2VA's inference template around one user turn (no system turn), tokenized."""
    return tok.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids


def test_image_prompt_equals_transformers_internvl_processor():
    """One <image> of N tiles is ONE <img>, N x 256 <IMG_CONTEXT>, ONE </img>.

    Reference: transformers' InternVLProcessor.replace_image_token (models/internvl/processing_internvl.py)
    for the tile count its GotOcr2ImageProcessor.get_number_of_image_patches gives the same image, as
    InternVL2.5 chat() and Sa2VA predict_forward (projects/sa2va/hf/models/modeling_sa2va_chat.py) build it.
    """
    from types import SimpleNamespace

    from transformers import GotOcr2ImageProcessor, InternVLProcessor

    cfg = salma.Config.from_preset("sa2va-1b")
    tok, _, _ = checkpoint.prepare_tokenizer(TINY)
    image = random_image(w=1000, h=600)
    processor = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12)
    num_tiles = processor.get_number_of_image_patches(600, 1000)
    assert inputs.mllm_pixels([image], cfg, is_video=False).shape[0] == num_tiles > 2
    reference = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>", image_seq_length=256)
    media = InternVLProcessor.replace_image_token(reference, {"num_patches": [num_tiles]}, 0)
    question = inputs.eval_prompt("the red circle", is_video=False)
    ours, _, _ = inputs.encode_turns(tok, [(question, None)], "", inputs.media_placeholder(num_tiles, cfg, is_video=False))
    assert ours.tolist() == sa2va_prompt_ids(tok, question.replace("<image>", media))
    assert question == "<image>\n Please segment the red circle in this image."


def test_video_prompt_equals_sa2va_predict_forward():
    """Frames: each its own <img> + 256 <IMG_CONTEXT> + </img>, joined by a new line.

    Reference, quoted from Sa2VA projects/sa2va/hf/models/modeling_sa2va_chat.py (predict_forward):
        image_token_str = f'{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * num_image_tokens}{IMG_END_TOKEN}'
        image_token_str = image_token_str + '\\n'
        image_token_str = image_token_str * num_frames
        image_token_str = image_token_str.strip()
    with num_image_tokens = patch_token (256) for a video, and the question "<image>\\nPlease segment {expr}.".
    """
    cfg = salma.Config.from_preset("sa2va-1b")
    tok, _, _ = checkpoint.prepare_tokenizer(TINY)
    official = (("<img>" + "<IMG_CONTEXT>" * 256 + "</img>") + "\n") * 5
    official = official.strip()
    question = inputs.eval_prompt("the cat jumping", is_video=True)
    ours, _, _ = inputs.encode_turns(tok, [(question, None)], "", inputs.media_placeholder(5, cfg, is_video=True))
    assert ours.tolist() == sa2va_prompt_ids(tok, question.replace("<image>", official))
    assert question == "<image>\nPlease segment the cat jumping."


def test_video_questions_are_asked_as_sa2vas_evaluation_asks_them():
    """A video expression with '?' (ReVOS's reasoning expressions) is asked as a question.

    Reference, quoted from bytedance/Sa2VA 9832e1a, projects/sa2va/evaluation/dataset/refVOS.py lines 13-14 and 99:
        SEG_PROMPT = "<image>\\nPlease segment {}."
        SEG_PROMPT_QUESTION = "<image>\\n {} Please respond with a segmentation mask."
        data_dict['text_prompt'] = SEG_PROMPT.format(exp) if '?' not in exp else SEG_PROMPT_QUESTION.format(exp)
    """
    seg_prompt, seg_prompt_question = "<image>\nPlease segment {}.", "<image>\n {} Please respond with a segmentation mask."
    for exp in ("the dog running to the left", "which object moves to the right?", "why is the man holding the cup?"):
        official = seg_prompt.format(exp) if "?" not in exp else seg_prompt_question.format(exp)
        assert inputs.eval_prompt(exp, is_video=True) == official
    assert inputs.eval_prompt("the cup?", is_video=False) == "<image>\n Please segment the cup? in this image."  # images: RES.py line 186
