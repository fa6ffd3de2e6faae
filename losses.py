"""
SALMA's losses: small pure functions, each with its equation number (paper §3.3-3.4).

  L = L_lm + w_bce * BCE + w_dice * Dice + ramp(t) * (lambda_tmc * L_tmc + lambda_bound * L_bound)   (Eq. 5)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossConfig:
    w_bce: float = 2.0  # weight of the BCE loss: 2.0 (Sa2VA's) with --init; train.py uses 1.0 from scratch (Eq. 5 as printed)
    w_dice: float = 0.5  # weight of the Dice loss: 0.5 (Sa2VA's) with --init; train.py uses 1.0 from scratch (Eq. 5 as printed)
    lambda_tmc: float = 0.1  # weight of the text-mask contrastive loss (Eq. 3); 0 = off
    lambda_bound: float = 0.05  # weight of the Sobel boundary loss (Eq. 4); 0 = off
    tau_tmc: float = 0.15  # temperature of the TMC loss (the authors' code)
    ramp_frac: float = 0.05  # auxiliary losses and gamma rise 0 -> 1 over this fraction of steps
    point_sampling: bool = False  # Sa2VA: BCE/Dice on 12,544 uncertainty-sampled points


# From scratch (no --init) train.py weighs BCE and Dice 1:1, as Eq. 5 is printed: with Sa2VA's 2.0/0.5 a
# random decoder settles on empty masks (the background is most of every mask), with 1:1 on "every shape",
# from where it learns to pick the target.
FROM_SCRATCH_WEIGHTS = {"w_bce": 1.0, "w_dice": 1.0}


# ---------------------------------------------------------------------------------------------
# segmentation: Dice + BCE (L_seg)


def dice_loss(logits, gt, eps=1.0):
    """Dice loss (L_seg, Eq. 5): 1 - (2 sum(p g) + 1) / (sum p + sum g + 1) per mask, mean over masks."""
    p = logits.sigmoid().flatten(1)  # (N, P)
    g = gt.float().flatten(1)
    return (1 - (2 * (p * g).sum(1) + eps) / (p.sum(1) + g.sum(1) + eps)).mean()


def bce_loss(logits, gt):
    """Binary cross-entropy with logits (L_seg, Eq. 5), mean over pixels and masks."""
    return F.binary_cross_entropy_with_logits(logits.float(), gt.float())


def sample_uncertain_points(logits, num_points=12544, oversample=3.0, importance=0.75):
    """Point coords in [0,1]^2 (N, num_points, 2): most uncertain (|logit| small) + random, as Sa2VA."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample)
    coords = torch.rand(n, num_sampled, 2, device=logits.device)
    values = point_sample(logits, coords)  # (N, num_sampled)
    num_uncertain = int(importance * num_points)
    idx = (-values.abs()).topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    uncertain = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    random_pts = torch.rand(n, num_points - num_uncertain, 2, device=logits.device)
    return torch.cat([uncertain, random_pts], dim=1)


def point_sample(maps, coords):
    """Bilinear values of maps (N, H, W) at coords (N, P, 2) in [0,1] (x, y) -> (N, P)."""
    grid = 2 * coords[:, :, None, :] - 1  # (N, P, 1, 2)
    return F.grid_sample(maps[:, None].float(), grid, align_corners=False)[:, 0, :, 0]


def seg_losses(logits, gt, point_sampling=False):
    """(BCE, Dice) of low-res logits (N, h, w) against gt (N, h, w); optionally on sampled points."""
    if point_sampling:
        with torch.no_grad():
            coords = sample_uncertain_points(logits)
        logits, gt = point_sample(logits, coords), point_sample(gt.float(), coords)
    return bce_loss(logits, gt), dice_loss(logits, gt)


# ---------------------------------------------------------------------------------------------
# boundary consistency (Eq. 4)

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(x, eps=1e-6):
    """Sobel 3x3 gradient magnitude sqrt(gx^2 + gy^2 + eps) of maps (N, H, W); zero padding."""
    kx = SOBEL_X.to(x)
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    g = F.conv2d(x[:, None], kernels, padding=1)  # (N, 2, H, W)
    return (g.pow(2).sum(1) + eps).sqrt()


def boundary_loss(logits, gt):
    """Boundary loss (Eq. 4): L1 mean between Sobel magnitudes of sigmoid(logits) and gt, (N, h, w)."""
    return (sobel_magnitude(logits.float().sigmoid()) - sobel_magnitude(gt.float())).abs().mean()


def resize_gt(gt, size):
    """Nearest-neighbour resize of masks (N, H, W) to size (h, w), as float."""
    return F.interpolate(gt[:, None].float(), size=size, mode="nearest")[:, 0]


# ---------------------------------------------------------------------------------------------
# text-mask contrastive (Eq. 3)


def pool_mask_features(feats, gt):
    """Mean of feats (N, C, h, w) over gt (N, H, W) resized (area) to h x w -> (z_v (N, C), keep (N,))."""
    weights = F.adaptive_avg_pool2d(gt[:, None].float(), feats.shape[-2:])[:, 0]  # (N, h, w) soft coverage
    area = weights.flatten(1).sum(1)
    keep = area > 0  # masks with zero area are left out
    z_v = (feats * weights[:, None]).flatten(2).sum(-1) / area.clamp_min(1e-6)[:, None]
    return z_v, keep


def tmc_loss(z_v, z_t, tau=0.15):
    """Symmetric InfoNCE (Eq. 3): CE(v->t) + CE(t->v) over L2-normalised pairs (B, C); 0 if B < 2."""
    if z_v.shape[0] < 2:
        return z_v.sum() * 0 + z_t.sum() * 0
    z_v, z_t = F.normalize(z_v.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
    logits = z_v @ z_t.t() / tau  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)


# ---------------------------------------------------------------------------------------------
# language modelling and the total (Eq. 5)


def lm_loss(logits, labels):
    """Next-token cross-entropy (L_lm) over labelled (answer) tokens; labels -100 are ignored."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    if (labels != -100).sum() == 0:
        return logits.sum() * 0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def ramp(step, total_steps, frac=0.05):
    """Linear warm-up 0 -> 1 over the first frac of total_steps, then 1 (auxiliary losses, gamma)."""
    warm = frac * total_steps
    return 1.0 if warm <= 0 else min(1.0, step / warm)


def total_loss(parts, cfg, ramp_value):
    """Eq. 5: lm + w_bce*bce + w_dice*dice + ramp*(lambda_tmc*tmc + lambda_bound*bound); returns (loss, floats)."""
    loss = parts["lm"] + cfg.w_bce * parts["bce"] + cfg.w_dice * parts["dice"]
    loss = loss + ramp_value * (cfg.lambda_tmc * parts["tmc"] + cfg.lambda_bound * parts["bound"])
    logs = {k: float(v.detach()) for k, v in parts.items()}
    logs["loss"] = float(loss.detach())
    return loss, logs


def salma_loss_parts(out, batch, cfg):
    """The unweighted terms of Eq. 5 from SALMA.forward's outputs and its batch."""
    lm = lm_loss(out["logits"], batch["labels"])
    logits, gt = out["low_res"][:, 0], batch["pair_masks"]  # (P, h, w) each
    if logits.shape[0] == 0:  # a chat-only batch has no masks
        zero = out["logits"].sum() * 0
        return {"lm": lm, "bce": zero, "dice": zero, "tmc": zero, "bound": zero}
    bce, dice = seg_losses(logits, gt, cfg.point_sampling)
    z_v, keep = pool_mask_features(out["tmc_feats"], gt)  # (P, C) per (mask, frame) pair
    z_v, has_mask = mean_per_seg(z_v, keep, batch["pair_seg"], out["z_seg"].shape[0])
    tmc = tmc_loss(z_v[has_mask], out["z_seg"][has_mask], cfg.tau_tmc)
    return {"lm": lm, "bce": bce, "dice": dice, "tmc": tmc, "bound": boundary_loss(logits, gt)}


def mean_per_seg(z_pairs, keep, pair_seg, num_segs):
    """Average pair features (P, C) over the frames of each [SEG] -> (num_segs, C), has_mask (num_segs,)."""
    w = keep.to(z_pairs.dtype)
    sums = z_pairs.new_zeros(num_segs, z_pairs.shape[1]).index_add(0, pair_seg, z_pairs * w[:, None])
    counts = z_pairs.new_zeros(num_segs).index_add(0, pair_seg, w)
    return sums / counts.clamp_min(1)[:, None], counts > 0
