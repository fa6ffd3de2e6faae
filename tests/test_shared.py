"""Shared evaluation: several expressions of one image or video answered from one prompt prefix, batched, and
decoded or tracked on one pass of SAM-2's encoder give what each expression alone gives."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import checkpoint
import fixtures
import salma
import testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPRS = ["the red square", "the small blue circle on the left", "it", "the green triangle below the large yellow square"]
# Per-pixel disagreement allowed between the shared and the per-expression path. In fp32 the two compute the same
# sums in another order (a KV-cached prefix, left padding, batched GEMMs), ~1e-6 apart, so a pixel whose logit sits
# within that of the threshold may flip; in bf16 each rounding is ~4e-3, as the suite's other bf16 checks allow.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


def model_with_mba(dtype=torch.float32):
    """A tiny model whose MBA blocks are open (gamma 0.5), so the text hidden states change the masks."""
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(salma.Config.from_preset("tiny", gamma_init=0.5, mba_dropout=0.0))
    return checkpoint.for_inference(model, "cpu", "bfloat16" if dtype == torch.bfloat16 else "float32"), tok


def wide_image():
    """A generated scene stretched to 2:1, so the MLLM sees two tiles and a thumbnail."""
    image = testbed.SyntheticRefDataset(1, video_fraction=0.0)[0]["frames"][0]
    return image.resize((2 * image.width, image.height), Image.BILINEAR)


def video(frames=8):
    """A generated video with more frames than the MLLM's five (the rest tracked by SAM-2's memory)."""
    clip = testbed.SyntheticRefDataset(1, video_fraction=1.0)[0]["frames"]
    return (list(clip) * frames)[:frames]


def disagreement(a, b):
    """Fraction of pixels where two bool masks differ."""
    return (a != b).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_image_masks_equal_each_expression_alone(dtype):
    """segment_image_many (one prefix, batches of 3 with left padding, one SAM-2 encoding) vs segment_image per expression."""
    model, tok = model_with_mba(dtype)
    image = wide_image()
    alone = [model.segment_image(image, expr, tok, force_seg=True) for expr in EXPRS]
    shared, texts, missing = model.segment_image_many(image, EXPRS, tok, force_seg=True, batch_size=3)
    assert shared.shape == (len(EXPRS), image.height, image.width) and not any(missing)
    assert any(m.any() for m in alone) and any(not m.all() for m in alone)  # the masks are not trivially empty or full
    assert max(disagreement(a, b) for a, b in zip(alone, shared)) <= TOLERANCE[dtype]
    assert texts == ["Sure, [SEG]."] * len(EXPRS)


def test_shared_answers_hold_the_same_seg_embedding_and_text_states():
    """answer_many's z_seg and MBA text states equal answer()'s, and its greedy generation (batched, left-padded
    suffixes of different lengths) gives each expression the same tokens as generating it alone."""
    model, tok = model_with_mba()
    image = wide_image()
    shared = model.answer_many([image], EXPRS, tok, force_seg=True, batch_size=4)
    for expr, (text, z_seg, hidden, valid) in zip(EXPRS, shared):
        _, z_alone, hidden_alone, valid_alone = model.answer([image], expr, tok, force_seg=True)
        torch.testing.assert_close(z_seg, z_alone, atol=1e-4, rtol=1e-4)
        last = model.mba_layers[-1]
        torch.testing.assert_close(hidden[last][0], hidden_alone[last][0][valid_alone[0]], atol=1e-4, rtol=1e-4)
        assert valid.all() and valid.shape[1] == int(valid_alone[0].sum())
    generated = model.answer_many([image], EXPRS, tok, max_new_tokens=6, batch_size=4)
    assert [a[0] for a in generated] == [model.answer([image], e, tok, max_new_tokens=6)[0] for e in EXPRS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_video_tracking_equals_each_expression_alone(dtype):
    """track() of 4 expressions in batches of 3 (one SAM-2 encoding per frame, batched memory banks) vs
    segment_video per expression, on 8 frames: 5 decoded with [SEG], 3 tracked."""
    model, tok = model_with_mba(dtype)
    frames = video(8)
    alone = [torch.stack(list(salma.segment_video(model, frames.__getitem__, len(frames), e, tok, force_seg=True))) for e in EXPRS]
    answers = model.answer_many(frames[: model.cfg.video_frames], EXPRS, tok, is_video=True, force_seg=True, batch_size=3)
    shared = torch.stack(list(salma.track(model, frames.__getitem__, len(frames), answers, batch_size=3)), dim=1)  # (E, T, H, W)
    assert shared.shape[:2] == (len(EXPRS), len(frames))
    assert any(m[model.cfg.num_cond_frames:].any() for m in alone)  # tracked frames have masks
    assert max(disagreement(a, b) for a, b in zip(alone, shared)) <= TOLERANCE[dtype]


def test_an_expression_without_seg_gets_an_empty_mask_and_the_others_are_unchanged(monkeypatch):
    """An answer with no [SEG] is missing (empty masks on every frame); it does not shift the other expressions' masks."""
    model, tok = model_with_mba()
    frames = video(6)
    answers = model.answer_many(frames[:5], EXPRS, tok, is_video=True, force_seg=True, batch_size=2)
    answers[1] = ("no", answers[1][1][:0], [h[:0] if h is not None else None for h in answers[1][2]], answers[1][3][:0])
    with_gap = torch.stack(list(salma.track(model, frames.__getitem__, len(frames), answers, batch_size=2)), dim=1)
    without = torch.stack(list(salma.track(model, frames.__getitem__, len(frames), answers[:1] + answers[2:], batch_size=2)), dim=1)
    assert not with_gap[1].any()
    assert max(disagreement(a, b) for a, b in zip(with_gap[[0, 2, 3]], without)) <= TOLERANCE[torch.float32]


def run_eval(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--quiet", *flags], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["synthetic", "synthetic_video"])
def test_eval_shared_and_per_expression_give_the_same_predictions(run_dir, tmp_path, dataset):
    """eval.py --share=True (default) and --share=False on the same run: every expression's I and U (images) or J and F
    (videos) agree, and the answers, generated, are the same."""
    rows = {}
    for share in ("True", "False"):
        out = tmp_path / share
        proc = run_eval(f"--ckpt={run_dir}", f"--dataset={dataset}", "--num_samples=4", f"--share={share}", "--batch_size=3",
                        f"--out_dir={out}", "--max_new_tokens=8")
        assert proc.returncode == 0, proc.stderr
        rows[share] = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [r["expr"] for r in rows["True"]] == [r["expr"] for r in rows["False"]]
    for shared, alone in zip(rows["True"], rows["False"]):
        for key in ("I", "U") if dataset == "synthetic" else ("J", "F"):
            assert shared[key] == pytest.approx(alone[key], rel=1e-2, abs=1e-2 * (alone.get("U", 1) or 1)), (key, shared, alone)
        assert shared.get("missing") == alone.get("missing")


@pytest.mark.slow
def test_bad_batch_size_gives_one_line(run_dir):
    fixtures.assert_one_line_error(run_eval(f"--ckpt={run_dir}", "--batch_size=0"), "--batch_size=0")


# ---------------------------------------------------------------------------------------------
# Sa2VA-i's inference options: uniform keyframes, tracking by a second SAM-2 from the keyframes' masks


@pytest.mark.parametrize("frames", [3, 5, 10, 30, 100, 101])
def test_uniform_keyframes_are_sa2va_i_floor_linspace(frames):
    """Sa2VA-i samples np.linspace(0, T - 1, 5, dtype=int) (kumuji/Sa2VA-i c5a809b,
    projects/llava_sam2/hf/models/modeling_sa2va_chat.py line 633; `in` tests membership, so repeats count once)."""
    import numpy as np

    assert salma.keyframe_indices(frames, 5, uniform=True) == sorted(set(np.linspace(0, frames - 1, 5, dtype=int).tolist()))
    assert salma.keyframe_indices(frames, 5) == list(range(min(5, frames)))


def test_a_propagator_tracks_from_the_keyframes_masks(tmp_path):
    """--sam2_ckpt: the keyframes' [SEG] masks (uniform: frames 0, 2, 4, 6, 9 of 10) become the propagator's mask prompts as
    SAM-2's video predictor makes them (sam2/sam2_video_predictor.py add_new_mask: bilinear antialiased resize to the
    model's size, >= 0.5) and its keyframe outputs are SAM2Base._use_mask_as_output of them (sam2_base.py, via
    track_step); the frames between are tracked; shared tracking of several expressions equals each alone."""
    model, tok = model_with_mba()
    torch.save({"model": model.grounding.sam2_model.state_dict()}, tmp_path / "sam2.pt")  # a SAM-2 .pt, as released
    propagator = checkpoint.load_propagator(str(tmp_path / "sam2.pt"), model)
    head = propagator.sam_mask_decoder.pred_obj_score_head
    (head.layers[-1] if hasattr(head, "layers") else head).bias.data.fill_(10.0)  # untrained, it would see no object anywhere
    frames, size = video(10), model.cfg.sam_image_size
    keyframes = salma.keyframe_indices(10, 5, uniform=True)
    answers = model.answer_many([frames[t] for t in keyframes], EXPRS, tok, is_video=True, force_seg=True, batch_size=3)
    shared = torch.stack(list(salma.track(model, frames.__getitem__, 10, answers, 3, uniform=True, propagator=propagator)), 1)
    with torch.inference_mode():
        for t in keyframes:
            image = model.sam_input([frames[t]], video=True)
            decoded = model.decode_prompts(model.grounding.encode_image(image), *salma.stack_answers(answers), frames[t].size[::-1])
            prompt = torch.nn.functional.interpolate(decoded[:, None].float(), size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True) >= 0.5
            _, features, _, sizes = propagator._prepare_backbone_features(propagator.forward_image(image))
            pix = features[-1].permute(1, 2, 0).reshape(1, -1, *sizes[-1]).expand(len(EXPRS), -1, -1, -1)
            high_res = [f.permute(1, 2, 0).reshape(1, -1, *s).expand(len(EXPRS), -1, -1, -1) for f, s in zip(features[:-1], sizes[:-1])]
            low_res = propagator._use_mask_as_output(pix, high_res, prompt.float())[3]
            expected = salma.SAM2Grounding.postprocess(low_res, size, frames[t].size[::-1])[:, 0]
            assert torch.equal(expected, shared[:, t])
            assert max(disagreement(a, b) for a, b in zip(decoded, shared[:, t])) <= 0.1  # the mask, smoothed at 1/4 size
    assert shared[:, [t for t in range(10) if t not in keyframes]].any()
    alone = [torch.stack(list(salma.segment_video(model, frames.__getitem__, 10, e, tok, force_seg=True, uniform=True,
                                                  propagator=propagator))) for e in EXPRS]
    assert max(disagreement(a, b) for a, b in zip(alone, shared)) <= TOLERANCE[torch.float32]


@pytest.mark.slow
def test_bad_sam2_ckpt_gives_one_line(run_dir, tmp_path):
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    for path in (tmp_path / "missing.pt", tmp_path / "bad.pt"):
        proc = run_eval(f"--ckpt={run_dir}", "--dataset=synthetic_video", "--num_samples=1", f"--sam2_ckpt={path}")
        fixtures.assert_one_line_error(proc, str(path))
