"""losses.py against hand-computed values."""

import math

import pytest
import torch
import torch.nn.functional as F

import losses


def test_dice_and_bce_hand_computed():
    logits = torch.zeros(1, 2, 2)  # p = 0.5 everywhere
    gt = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    # Dice: 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5 ; BCE: log 2 per pixel
    assert losses.dice_loss(logits, gt).item() == pytest.approx(0.5)
    assert losses.bce_loss(logits, gt).item() == pytest.approx(math.log(2))
    confident = torch.tensor([[[20.0, -20.0], [-20.0, -20.0]]])
    assert losses.dice_loss(confident, gt).item() == pytest.approx(0.0, abs=1e-6)


def test_boundary_loss_zero_for_identical_masks():
    gt = torch.zeros(2, 8, 8)
    gt[:, 2:5, 3:7] = 1
    logits = (gt * 2 - 1) * 50  # sigmoid(logits) == gt
    assert losses.boundary_loss(logits, gt).item() == pytest.approx(0.0, abs=1e-6)


def test_boundary_loss_of_a_single_pixel_by_hand():
    gt = torch.zeros(1, 5, 5)
    gt[0, 2, 2] = 1
    logits = torch.full((1, 5, 5), -100.0)  # prediction: nothing (gradient magnitude sqrt(eps) everywhere)
    # Sobel of a single pixel: gx^2 + gy^2 is 2 at the 4 diagonal neighbours, 4 at the 4 edge neighbours, 0 elsewhere
    e = 1e-6
    expected = (4 * (math.sqrt(2 + e) - math.sqrt(e)) + 4 * (math.sqrt(4 + e) - math.sqrt(e))) / 25
    assert losses.boundary_loss(logits, gt).item() == pytest.approx(expected, rel=1e-5)


def test_tmc_symmetric_random_and_aligned():
    torch.manual_seed(0)
    a, b = torch.randn(8, 256), torch.randn(8, 256)
    assert losses.tmc_loss(a, b).item() == pytest.approx(losses.tmc_loss(b, a).item(), rel=1e-6)
    assert losses.tmc_loss(a, b).item() == pytest.approx(2 * math.log(8), abs=0.5)
    aligned = torch.eye(8, 256) * 3
    assert losses.tmc_loss(aligned, aligned).item() < 0.05
    assert losses.tmc_loss(a[:1], b[:1]).item() == 0.0  # no negatives: no contrastive signal


def test_zero_area_masks_are_left_out_of_tmc_without_nan():
    torch.manual_seed(0)
    feats = torch.randn(4, 16, 8, 8, requires_grad=True)
    gt = torch.zeros(4, 32, 32)
    gt[0, :8, :8] = gt[1, 8:, 8:] = gt[3, 4:20, 4:20] = 1  # mask 2 is empty
    z_v, keep = losses.pool_mask_features(feats, gt)
    assert keep.tolist() == [True, True, False, True]
    assert torch.allclose(z_v[0], feats[0, :, :2, :2].mean((1, 2)), atol=1e-6)  # the mask covers 2x2 cells exactly
    z_seg, has_mask = losses.mean_per_seg(z_v, keep, torch.tensor([0, 1, 2, 3]), 4)
    loss = losses.tmc_loss(z_seg[has_mask], torch.randn(4, 16)[has_mask])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()


def test_mean_per_seg_averages_the_frames_of_each_seg():
    z = torch.tensor([[1.0], [3.0], [10.0], [7.0]])
    mean, has = losses.mean_per_seg(z, torch.tensor([True, True, False, True]), torch.tensor([0, 0, 1, 1]), 3)
    assert mean[:2, 0].tolist() == [2.0, 7.0] and has.tolist() == [True, True, False]


def test_point_sampling_prefers_uncertain_points():
    torch.manual_seed(0)
    logits = torch.full((2, 64, 64), 10.0)
    logits[:, :, 28:36] = 0.0  # an uncertain vertical band: 1/8 of the area
    coords = losses.sample_uncertain_points(logits, num_points=400)
    assert coords.shape == (2, 400, 2)
    in_band = ((coords[..., 0] * 64 >= 28) & (coords[..., 0] * 64 < 36)).float().mean()
    # 1200 random candidates hold ~150 band points, all of which rank among the 300 most uncertain kept;
    # uniform sampling would put 12.5% of the points in the band
    assert in_band > 0.3
    bce, dice = losses.seg_losses(logits, (logits == 0).float(), point_sampling=True)
    assert torch.isfinite(bce) and torch.isfinite(dice)


def test_lm_loss_ignores_unlabelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 7, -100]])
    manual = (F.cross_entropy(logits[0, 1], torch.tensor(3)) + F.cross_entropy(logits[0, 2], torch.tensor(7))) / 2
    assert losses.lm_loss(logits, labels).item() == pytest.approx(manual.item(), rel=1e-6)


def test_ramp_and_total_follow_eq5():
    assert [losses.ramp(s, 100) for s in (0, 2.5, 5, 50)] == [0.0, 0.5, 1.0, 1.0]
    parts = {k: torch.tensor(v) for k, v in dict(lm=1.0, bce=2.0, dice=3.0, tmc=4.0, bound=5.0).items()}
    cfg = losses.LossConfig()
    loss, logs = losses.total_loss(parts, cfg, 0.5)
    expected = 1 + 2.0 * 2 + 0.5 * 3 + 0.5 * (0.1 * 4 + 0.05 * 5)
    assert loss.item() == pytest.approx(expected) and logs["loss"] == pytest.approx(expected)
