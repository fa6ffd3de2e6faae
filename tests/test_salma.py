"""SAM-2 grounding (against sam2's own predictor), SALMA's pre-pass / router / MBA, the full model."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import losses
import salma
import common
import checkpoint
import inputs

TINY = salma.Config.from_preset("tiny")


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model, tok = checkpoint.build_model(salma.Config.from_preset("tiny", **overrides))
    return model.eval(), tok


def scene(w=160, h=120, shift=0):
    """A white image with a red square and a blue circle, and their masks (2, H, W)."""
    image = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10 + shift, 10, 50 + shift, 60], fill="red")
    draw.ellipse([90, 60, 130, 100], fill="blue")
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 10:61, 10 + shift:51 + shift] = True
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[1] = (xx - 110) ** 2 + (yy - 80) ** 2 <= 400
    return image, masks


def sample(video=False, frames=5):
    images, masks = zip(*(scene(shift=3 * t) for t in range(frames if video else 1)))
    return {"id": "s", "frames": list(images), "exprs": ["the red square", "the blue circle"],
            "masks": torch.stack(masks, dim=1), "is_video": video, "conversation": None}


# ---------------------------------------------------------------------------------------------
# SAM-2 image path


@pytest.mark.parametrize("multimask", [True, False])
def test_image_path_matches_sam2_image_predictor(multimask):
    """Our decoder call against sam2's SAM2ImagePredictor.predict (sam2/sam2_image_predictor.py): with
    multimask (Sa2VA's call) the best-IoU of 3 masks, without it the single-mask output."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model, _ = tiny_model(sam_multimask=multimask)
    grounding = model.grounding
    with torch.no_grad():  # make the object-score head say "object present" so no mask is gated away
        grounding.sam2_model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    image, _ = scene(256, 256)  # already at the model size: the predictor's resize is the identity
    predictor = SAM2ImagePredictor(grounding.sam2_model)
    predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # the predictor assumes 1024 px
    predictor.set_image(np.array(image))
    _, iou, low_ref = predictor.predict(point_coords=np.array([[0.0, 0.0]]), point_labels=np.array([-1]),
                                        multimask_output=multimask, return_logits=True, normalize_coords=False)
    best_ref = torch.from_numpy(low_ref[iou.argmax()])
    with torch.no_grad():
        enc = grounding.encode_image(inputs.sam_pixels([image], 256))
        ours = grounding.decode(enc["image_embed"], enc["high_res_feats"])[0, 0]
    assert (ours.clamp(-32, 32) - best_ref).abs().max() < 1e-4


def test_seg_embedding_is_a_third_sparse_token():
    model, _ = tiny_model()
    seen = []
    hook = model.grounding.sam2_model.sam_mask_decoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["sparse_prompt_embeddings"].shape), with_kwargs=True)
    enc = model.grounding.encode_image(torch.randn(2, 3, 256, 256))
    with torch.no_grad():
        model.grounding.decode(enc["image_embed"], enc["high_res_feats"])
        model.grounding.decode(enc["image_embed"], enc["high_res_feats"], torch.randn(2, 64))
    hook.remove()
    assert seen == [(2, 2, 64), (2, 3, 64)]


def test_postprocess_upsamples_to_the_original_size():
    logits = torch.zeros(1, 1, 64, 64)
    logits[..., :32, :] = 5.0
    mask = salma.SAM2Grounding.postprocess(logits, 256, (30, 50))[0, 0]
    assert mask.dtype == torch.bool and mask.shape == (30, 50) and mask[:14].all() and not mask[16:].any()


def test_masks_are_thresholded_as_sa2va_does_sigmoid_over_one_half():
    """Sa2VA decides a pixel by `masks.sigmoid() > 0.5` (bytedance/Sa2VA 9832e1a,
    projects/sa2va/hf/models/modeling_sa2va_chat.py line 768), which in float32 is not `logits > 0`:
    the sigmoid of a logit up to ~3e-8 rounds to 0.5. Constant maps keep the two interpolations exact."""
    values = torch.tensor([1e-9, 2e-8, 1e-6, 0.0, -1e-9, 3.0])
    logits = values.view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    masks = salma.SAM2Grounding.postprocess(logits, 16, (5, 7))[:, 0]  # (6, 5, 7)
    official = torch.sigmoid(logits.float()) > 0.5  # the official rule on the same (constant) logits
    assert torch.equal(masks[:, 0, 0], official[:, 0, 0, 0])
    assert masks[:, 0, 0].tolist() == [False, False, True, False, False, True]  # logit > 0 would take 1e-9 and 2e-8


# ---------------------------------------------------------------------------------------------
# SALMA pieces


def test_mba_off_is_the_sa2va_baseline_bit_for_bit():
    batch = inputs.make_train_batch([sample()], checkpoint.prepare_tokenizer(TINY)[0], TINY, [7])
    salma_model, _ = tiny_model(seed=1, mba=True)
    baseline, _ = tiny_model(seed=1, mba=False)
    baseline.load_state_dict({k: v for k, v in salma_model.state_dict().items() if not k.startswith("mba.")})
    with torch.no_grad():
        out_off = baseline(batch)
        for block in salma_model.mba:
            block.gamma.fill_(0.0)  # gamma = 0: the residual adds nothing
        out_gamma0 = salma_model(batch)
    assert torch.equal(out_off["low_res"], out_gamma0["low_res"])


def test_zero_gate_or_zero_gamma_leaves_features_unchanged_else_changes_them():
    torch.manual_seed(0)
    block = salma.MaskBiasedAttention(TINY, 64).eval()
    feats, text = torch.randn(2, 64, 16, 16), torch.randn(2, 7, 64)
    valid = torch.ones(2, 7, dtype=torch.bool)
    gate = torch.rand(2, 1, 16, 16)
    assert torch.equal(block(feats, text, valid, gate)[0], feats)  # gamma_init = 0
    block.gamma.data.fill_(0.5)
    assert torch.equal(block(feats, text, valid, torch.zeros_like(gate))[0], feats)
    assert not torch.allclose(block(feats, text, valid, gate)[0], feats)
    assert torch.equal(block(feats, text, valid, gate, ramp=0.0)[0], feats)


def test_film_mode_modulates_features():
    torch.manual_seed(0)
    block = salma.MaskBiasedAttention(salma.Config.from_preset("tiny", mba_mode="film"), 64).eval()
    feats = torch.randn(1, 64, 16, 16)
    out, _ = block(feats, torch.randn(1, 5, 64), torch.ones(1, 5, dtype=torch.bool), torch.zeros(1, 1, 16, 16))
    assert not torch.allclose(out, feats)


def test_router_picks_the_k_best_valid_tokens_and_gets_gradient():
    torch.manual_seed(0)
    router = salma.TopKRouter(16, 8, k=2)
    tokens = torch.randn(3, 6, 16, requires_grad=True)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    scores = router.mlp(tokens).squeeze(-1)
    selected, idx, ok = router(tokens, valid)
    for b in range(3):
        allowed = valid[b].nonzero().flatten()
        best = allowed[scores[b, allowed].argsort(descending=True)[:2]]
        assert set(idx[b][ok[b]].tolist()) == set(best.tolist())
        assert valid[b, idx[b][ok[b]]].all()
    assert ok.tolist() == [[True, True], [True, True], [True, False]]
    selected.sum().backward()
    assert router.mlp[0].weight.grad.abs().sum() > 0


def test_pre_pass_has_no_gradient_and_uses_label_minus_one():
    model, _ = tiny_model()
    labels = []
    hook = model.grounding.sam2_model.sam_prompt_encoder.register_forward_hook(
        lambda m, args, kwargs, out: labels.append(kwargs["points"][1].clone()), with_kwargs=True)
    enc = model.grounding.encode_image(torch.randn(1, 3, 256, 256))
    feats = enc["image_embed"].detach().requires_grad_(True)
    gate = salma.prior_gate(model.grounding, feats, enc["high_res_feats"], tau_gate=1.0)
    hook.remove()
    assert not gate.requires_grad and gate.shape == (1, 1, 16, 16)
    assert ((gate > 0) & (gate < 1)).all()
    assert labels and all((l == -1).all() for l in labels)


def test_resolve_mba_layers():
    assert salma.resolve_mba_layers("last", 24) == [23]
    assert salma.resolve_mba_layers("all", 3) == [0, 1, 2]
    assert salma.resolve_mba_layers("3,-1", 24) == [3, 23]
    with pytest.raises(ValueError, match="mba_layers"):
        salma.resolve_mba_layers("first", 24)


# ---------------------------------------------------------------------------------------------
# the whole model


@pytest.mark.parametrize("mba_layers", ["last", "all"])
def test_one_step_gives_finite_gradients_to_every_trainable_group(mba_layers):
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(salma.Config.from_preset("tiny", mba_layers=mba_layers, gamma_init=0.1))
    salma.set_trainable(model, "full")
    model.train()
    cfg = model.cfg
    batch = inputs.make_train_batch([sample(), sample(video=True)], tok, cfg, [1, 2])
    assert batch["pair_seg"].tolist() == [0, 1] + [2] * 5 + [3] * 5
    out = model(batch, ramp=1.0)
    loss, logs = losses.total_loss(losses.salma_loss_parts(out, batch, losses.LossConfig()), losses.LossConfig(), 1.0)
    assert set(logs) >= {"lm", "bce", "dice", "tmc", "bound", "loss"} and all(np.isfinite(list(logs.values())))
    loss.backward()
    groups = {"router": "mba.0.router", "mba": "mba.0.attn", "gamma": "mba.0.gamma", "text_hidden_fcs": "text_hidden_fcs",
              "decoder": "grounding.sam2_model.sam_mask_decoder", "llm": "mllm.language_model.layers",
              "sam2_encoder": "grounding.sam2_model.image_encoder"}  # from scratch it trains too (the tiny preset)
    for group, prefix in groups.items():
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), group
        assert sum(g.abs().sum() for g in grads) > 0, group
    assert len(model.mba) == (cfg.llm_layers if mba_layers == "all" else 1)


def test_segment_image_and_video_return_masks_of_the_input_size():
    model, tok = tiny_model()
    image, _ = scene()
    maps = {}
    with torch.no_grad():
        for block in model.mba:
            block.gamma.fill_(1.0)
    mask = model.segment_image(image, "the red square", tok, maps=maps, force_seg=True)
    assert mask.shape == (120, 160) and mask.dtype == torch.bool
    assert maps["gate"].shape == (1, 1, 16, 16) and maps["attention"][0].shape == (1, 256, 2)
    frames = [scene(shift=2 * t)[0] for t in range(8)]
    masks = list(salma.segment_video(model, frames.__getitem__, len(frames), "the red square", tok, force_seg=True))
    assert len(masks) == 8 and all(m.shape == (120, 160) for m in masks)


def test_video_memory_is_used_and_stays_bounded():
    model, tok = tiny_model()
    sam = model.grounding.sam2_model
    sizes = []
    original = sam._prepare_memory_conditioned_features

    def spy(**kwargs):
        sizes.append(len(kwargs["output_dict"]["non_cond_frame_outputs"]) + len(kwargs["output_dict"]["cond_frame_outputs"]))
        return original(**kwargs)

    sam._prepare_memory_conditioned_features = spy
    frames = [scene(shift=t % 7)[0] for t in range(30)]
    list(salma.segment_video(model, frames.__getitem__, 30, "the red square", tok, force_seg=True))
    keep = max(sam.num_maskmem, sam.max_obj_ptrs_in_encoder)
    assert len(sizes) == 30 - model.cfg.num_cond_frames
    assert max(sizes) <= model.cfg.num_cond_frames + keep
    # a tracked frame depends on what came before it: change frame 0 only, frame 6's logits move
    logits = []
    model.grounding.sam2_model._prepare_memory_conditioned_features = original
    hook = sam.sam_mask_decoder.register_forward_hook(lambda m, a, out: logits.append(out[0].clone()))
    for first in (frames[0], Image.new("RGB", (160, 120), "black")):
        list(salma.segment_video(model, ([first] + frames[1:8]).__getitem__, 8, "the red square", tok, force_seg=True))
    hook.remove()
    per_run = len(logits) // 2
    assert not torch.allclose(logits[per_run - 1], logits[-1])


class append_sparse_token:
    """Context: sam2's prompt encoder appends token (B, C) to its sparse output (Sa2VA's [SEG] prompt)."""

    def __init__(self, prompt_encoder, token):
        self.prompt_encoder, self.token = prompt_encoder, token

    def __enter__(self):
        self.handle = self.prompt_encoder.register_forward_hook(
            lambda m, args, out: (torch.cat([out[0], self.token[:, None]], 1), out[1]))

    def __exit__(self, *exc):
        self.handle.remove()


def sam2_track_step_reference(model, frames, z_seg):
    """Low-res logits per frame from sam2's own SAM2Base.track_step loop, [SEG] on conditioning frames."""
    sam, bank, outs = model.grounding.sam2_model, {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}, []
    no_point = {"point_coords": torch.zeros(1, 1, 2), "point_labels": -torch.ones(1, 1, dtype=torch.int32)}
    for t, frame in enumerate(frames):
        _, feats, pos, sizes = sam._prepare_backbone_features(sam.forward_image(inputs.sam_pixels([frame], 256)))
        is_cond = t < model.cfg.num_cond_frames
        with append_sparse_token(sam.sam_prompt_encoder, z_seg) if is_cond else torch.no_grad():
            out = sam.track_step(t, is_cond, feats, pos, sizes, no_point if is_cond else None, None, bank, len(frames))
        bank["cond_frame_outputs" if is_cond else "non_cond_frame_outputs"][t] = out
        outs.append(out["pred_masks"])
    return outs


def tracked_logits(model, tok, frames):
    """segment_video's low-res logits per frame, and the [SEG] embedding it prompted with."""
    logits, decode_heads = [], model.grounding.decode_heads

    def spy(*args):
        heads = decode_heads(*args)
        logits.append(heads["low_res"])
        return heads

    model.grounding.decode_heads = spy
    list(salma.segment_video(model, frames.__getitem__, len(frames), "the red square", tok, force_seg=True))
    del model.grounding.decode_heads
    z_seg = model.answer(frames[: model.cfg.video_frames], "the red square", tok, is_video=True, force_seg=True)[1]
    return logits, z_seg[:1]


@pytest.mark.parametrize("object_score", [20.0, -20.0])
@pytest.mark.parametrize("multimask", [True, False])
@torch.no_grad()
def test_video_tracking_equals_sam2_track_step_without_its_no_object_overwrite(object_score, multimask):
    model, tok = tiny_model(mba=False, sam_multimask=multimask)
    model.grounding.sam2_model.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(object_score)
    frames = [scene(shift=2 * t)[0] for t in range(8)]
    ours, z_seg = tracked_logits(model, tok, frames)
    reference = sam2_track_step_reference(model, frames, z_seg)
    assert len(ours) == len(reference) == 8
    if object_score > 0:  # object seen: sam2 keeps its masks, and every frame matches
        for t, (a, b) in enumerate(zip(ours, reference)):
            assert (a - b).abs().max() < 1e-4, t
    else:  # Sa2VA's heads never overwrite masks with SAM-2's no-object score (-1024); sam2's do
        assert all((b == -1024).all() for b in reference)
        assert all(a.abs().max() < 100 for a in ours)


@torch.no_grad()
def test_video_pre_pass_reads_each_frame_without_memory(monkeypatch):
    model, tok = tiny_model()
    frames = [scene(shift=2 * t)[0] for t in range(8)]
    seen, prior_gate = [], salma.prior_gate
    monkeypatch.setattr(salma, "prior_gate", lambda g, embed, *a: seen.append(embed) or prior_gate(g, embed, *a))
    list(salma.segment_video(model, frames.__getitem__, len(frames), "the red square", tok, force_seg=True))
    assert len(seen) == len(frames)
    for frame, embed in zip(frames, seen):
        expected = model.grounding.encode_image(inputs.sam_pixels([frame], 256))["image_embed"]
        assert torch.allclose(embed, expected, atol=1e-6)


def test_sam2_checkpoint_loads_and_a_wrong_key_is_named(tmp_path):
    model, _ = tiny_model(seed=0)
    other, _ = tiny_model(seed=1)
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": model.grounding.sam2_model.state_dict()}, path)
    checkpoint.load_sam2_checkpoint(other.grounding, str(path))
    assert torch.equal(other.grounding.sam2_model.no_mem_embed, model.grounding.sam2_model.no_mem_embed)
    sd = model.grounding.sam2_model.state_dict()
    sd["sam_mask_decoder.bogus"] = sd.pop("sam_mask_decoder.iou_token.weight")
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"missing 1 keys.*iou_token.*unexpected 1 keys.*bogus"):
        checkpoint.load_sam2_checkpoint(other.grounding, str(path))


def test_sa2va_checkpoint_round_trip_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tok = tiny_model(seed=0, mba=False)
    checkpoint.save_official(model, tok, tmp_path)
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight" in names
    assert "text_hidden_fcs.2.weight" in names and "language_model.lm_head.weight" in names
    loaded, _ = checkpoint.build_model(salma.Config.from_preset("tiny"), init=str(tmp_path))  # SALMA on Sa2VA weights
    assert loaded.cfg.mba is False  # the checkpoint's config says what it is
    salma_on_sa2va, _ = checkpoint.build_model(salma.Config.from_preset("tiny"), init=str(tmp_path), mba=True)
    assert all(b.gamma.item() == 0.0 for b in salma_on_sa2va.mba)  # fresh MBA, residual closed
    batch = inputs.make_train_batch([sample()], tok, model.cfg, [3])
    with torch.no_grad():
        assert torch.equal(model(batch)["low_res"], loaded(batch)["low_res"])
        assert torch.equal(model(batch)["low_res"], salma_on_sa2va(batch)["low_res"])
    sd = load_file(tmp_path / "model.safetensors")
    sd["grounding_encoder.sam2_model.extra"] = sd.pop("text_hidden_fcs.0.bias")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"text_hidden_fcs.0.bias.*grounding_encoder.sam2_model.extra"):
        checkpoint.build_model(salma.Config.from_preset("tiny"), init=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# bf16: every entry point runs and agrees with fp32 (bf16 is what a GPU run uses; on CPU it is a flag)


def iou(a, b):
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.float().flatten(), b.float().flatten()]))[0, 1].item()


def test_inference_in_bf16_agrees_with_fp32():
    import copy

    model, tok = tiny_model(gamma_init=1.0)
    half = copy.deepcopy(model).set_precision(torch.bfloat16)
    assert half.mllm.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert half.grounding.sam2_model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    image, _ = scene()
    maps32, maps16 = {}, {}
    mask32 = model.segment_image(image, "the red square", tok, maps=maps32, force_seg=True)
    mask16 = half.segment_image(image, "the red square", tok, maps=maps16, force_seg=True)
    assert mask16.shape == mask32.shape and correlation(maps16["low_res"], maps32["low_res"]) > 0.99
    assert iou(mask16, mask32) > 0.9
    frames = [scene(shift=2 * t)[0] for t in range(7)]
    video32 = list(salma.segment_video(model, frames.__getitem__, 7, "the red square", tok, force_seg=True))
    video16 = list(salma.segment_video(half, frames.__getitem__, 7, "the red square", tok, force_seg=True))
    assert len(video16) == 7 and min(iou(a, b) for a, b in zip(video16, video32)) > 0.8
    ids = torch.tensor(tok.encode("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n").ids)[None]
    logits32, logits16 = model.mllm(ids)["logits"], half.mllm(ids)["logits"]
    assert logits16.dtype == torch.bfloat16 and correlation(logits16, logits32) > 0.99
    generated, hidden = half.mllm.generate(ids, None, 6, keep_hidden=True)
    assert generated.shape == (1, 6) and all(torch.isfinite(h).all() for h in hidden)


def test_a_training_step_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(salma.Config.from_preset("tiny", gamma_init=0.1, mba_dropout=0.0))
    salma.set_trainable(model, "full")
    batch = inputs.make_train_batch([sample(), sample(video=True)], tok, model.cfg, [1, 2])
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        with common.autocast_for(dtype, "cpu"):
            out = model(batch, ramp=1.0)
            loss, _ = losses.total_loss(losses.salma_loss_parts(out, batch, losses.LossConfig()), losses.LossConfig(), 1.0)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.item(), grad, out["low_res"].dtype))
    (loss32, grad32, _), (loss16, grad16, low_dtype) = results
    assert low_dtype == torch.bfloat16 and torch.isfinite(grad16).all()
    assert abs(loss16 - loss32) < 0.02 * abs(loss32) and correlation(grad16, grad32) > 0.95


def test_auto_precision_is_fp32_for_tiny_models_on_cpu_and_bf16_on_cuda(monkeypatch):
    """--dtype auto: bf16 on CUDA; on a CPU with native bf16 units only for the 1B-wide models (a tiny step is slower in bf16)."""
    tiny, wide = salma.Config.from_preset("tiny"), salma.Config.from_preset("sa2va-1b")
    assert common.resolve_dtype("auto", "cuda", tiny) == torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr(common, "cpu_has_native_bf16", lambda: native)
        assert common.resolve_dtype("auto", "cpu", tiny) == torch.float32
        assert common.resolve_dtype("auto", "cpu", wide) == (torch.bfloat16 if native else torch.float32)
    assert common.resolve_dtype("bfloat16", "cpu", tiny) == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Sa2VA's own SAM-2 numerics (cfg.sa2va_numerics)


def sa2va_sam_input(image, size, dtype, video):
    """SAM-2's input of one PIL image as Sa2VA's predict_forward builds it, written from bytedance/Sa2VA 9832e1a:
    projects/sa2va/hf/models/modeling_sa2va_chat.py lines 653-658 (an image: uint8 -> torch_dtype, then
    preprocess_image) and 633-643 (video frames: uint8 into preprocess_image, then .to(torch_dtype)),
    DirectResize lines 78-86 (PIL's resize with its default filter), and projects/sa2va/hf/models/sam2.py
    preprocess_image, lines 366-374 (mean and std built with dtype=torch.bfloat16, subtracted and divided in place)."""
    g_image = torch.from_numpy(np.array(image.resize((size, size)))).permute(2, 0, 1).contiguous()
    if not video:
        g_image = g_image.to(dtype)
    image = g_image / 255.
    img_mean = torch.tensor((0.485, 0.456, 0.406), dtype=torch.bfloat16)[:, None, None]
    img_std = torch.tensor((0.229, 0.224, 0.225), dtype=torch.bfloat16)[:, None, None]
    image -= img_mean
    image /= img_std
    return image.to(dtype)


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sam2_input_is_sa2vas_to_the_bit(dtype, video):
    """With sa2va_numerics SAM-2's input equals Sa2VA's construction exactly, in fp32 and bf16, for an image
    and for video frames; the exact constants (the tiny preset's default) differ from it."""
    image, _ = scene(333, 157)
    ours = inputs.sam_pixels([image], 64, sa2va_numerics=True, dtype=dtype, video=video)[0]
    official = sa2va_sam_input(image, 64, dtype, video)
    assert ours.dtype == official.dtype == dtype and torch.equal(ours, official)
    exact = inputs.sam_pixels([image], 64, dtype=dtype, video=video)[0]
    assert (exact.float() - official.float()).abs().max() > 1e-3


def test_tracked_memory_is_stored_in_bf16_as_sa2vas_video_predictor_does():
    """Sa2VA's video predictor stores each frame's maskmem_features in bf16 (bytedance/Sa2VA 9832e1a,
    projects/sa2va/hf/models/sam2.py lines 3535 and 3869: maskmem_features.to(torch.bfloat16)); memory attention
    reads them back promoted to fp32. With sa2va_numerics the conditioning frames' memory is what fp32 storage
    holds, rounded to bf16, and the tracked frames' features stay fp32."""
    frames = [scene(shift=2 * t)[0] for t in range(7)]
    memories = {}
    for bf16_memory in (False, True):
        model, tok = tiny_model(seed=3, sa2va_numerics=True)
        if not bf16_memory:
            model.grounding.memory_dtype = None  # the same run with the memory kept in fp32
        sam, seen = model.grounding.sam2_model, []
        original = sam._prepare_memory_conditioned_features

        def spy(**kwargs):
            out = original(**kwargs)
            seen.append((dict(kwargs["output_dict"]["cond_frame_outputs"]), out.dtype))
            return out

        sam._prepare_memory_conditioned_features = spy
        list(salma.segment_video(model, frames.__getitem__, len(frames), "the red square", tok, force_seg=True))
        memories[bf16_memory] = seen
    exact, sa2va = memories[False][0][0], memories[True][0][0]  # the 5 conditioning frames' entries at frame 5
    assert sorted(exact) == sorted(sa2va) == list(range(5))
    for t in range(5):
        assert sa2va[t]["maskmem_features"].dtype == torch.bfloat16 and exact[t]["maskmem_features"].dtype == torch.float32
        assert torch.equal(sa2va[t]["maskmem_features"], exact[t]["maskmem_features"].to(torch.bfloat16))
        assert sa2va[t]["obj_ptr"].dtype == torch.float32
    assert all(dtype == torch.float32 for _, dtype in memories[True])  # promoted back when read
