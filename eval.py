"""
Evaluate SALMA (or the Sa2VA baseline with --mba=False on the same checkpoint).

  python eval.py                                              # generated synthetic split (no data needed)
  python eval.py --dataset refcocog --split val --ckpt ckpts/SALMA-1B --data_root data/
  python eval.py --dataset refcocog --split val --ckpt ckpts/SALMA-1B --data_root data/ --mba=False
  python eval.py --dataset mevis --split valid_u --ckpt ckpts/SALMA-1B --data_root data/
  python eval.py --dataset ytvos --split valid --ckpt ...      # writes the submission zip
  torchrun --standalone --nproc_per_node=8 eval.py --dataset refcocog ...   # shards over ranks
  python eval.py --ckpt out/tiny --visualize 4                # PNGs: mask, gate G, MBA attention vs baseline

--ckpt is an official-layout directory (Sa2VA / exported SALMA) or a train.py --out_dir (ckpt.pt).
Metrics are printed and written to <out_dir>/metrics.json, next to the predictions.
"""

import argparse
import json
import math
import os
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
import salma

# ---------------------------------------------------------------------------------------------
# metrics: referring image segmentation


def intersection_union(pred, gt):
    """(|pred & gt|, |pred | gt|) of two bool masks; a missing prediction (None) is an empty mask."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    return int((pred & gt).sum()), int((pred | gt).sum())


class RefSegMeter:
    """cIoU = sum I / sum U, gIoU = mean IoU (empty/empty = 1), cIoU by GT area ratio (Table 4)."""

    BUCKETS = {"<1%": 0.01, "<2%": 0.02, "<5%": 0.05, "all": math.inf}

    def __init__(self):
        self.records = []  # (I, U, area ratio)

    def add(self, pred, gt):
        """Add one expression's prediction (None counts as an empty mask) and ground truth."""
        i, u = intersection_union(pred, gt)
        self.records.append((i, u, float(np.asarray(gt, dtype=bool).mean())))

    def result(self):
        """Dict of cIoU, gIoU, N and the stratified cIoU with N per bucket (percent)."""
        out = {"N": len(self.records)}
        if not self.records:
            return out
        inter, union, ratio = map(np.array, zip(*self.records))
        out["cIoU"] = 100 * inter.sum() / max(union.sum(), 1)
        out["gIoU"] = 100 * np.where(union == 0, 1.0, inter / np.maximum(union, 1)).mean()
        for name, limit in self.BUCKETS.items():
            keep = ratio < limit
            out[f"cIoU{name}"] = 100 * inter[keep].sum() / max(union[keep].sum(), 1) if keep.any() else float("nan")
            out[f"N{name}"] = int(keep.sum())
        return out


# ---------------------------------------------------------------------------------------------
# metrics: J & F with DAVIS-2017 semantics


def db_eval_iou(gt, pred):
    """J: IoU of bool masks, 1 when both are empty."""
    inter, union = intersection_union(pred, gt)
    return 1.0 if union == 0 else inter / union


def seg2bmap(seg):
    """Boundary map of a bool mask as the DAVIS evaluator computes it (one-pixel, right/bottom side)."""
    seg = np.asarray(seg, dtype=bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def disk_offsets(radius):
    """(dy, dx) of a disk footprint x^2 + y^2 <= r^2 (skimage's disk)."""
    r = int(radius)
    return [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx <= r * r]


def dilate(mask, radius):
    """Binary dilation of a bool mask by a disk."""
    h, w = mask.shape
    r = int(radius)
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy, dx in disk_offsets(r):
        out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def f_measure(gt, pred, bound_th=0.008):
    """F: boundary F-measure, boundaries matched within ceil(bound_th * image diagonal) pixels."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape))
    pred_b, gt_b = seg2bmap(pred), seg2bmap(gt)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    if n_pred == 0 and n_gt == 0:
        return 1.0
    if n_pred == 0:
        return 0.0  # precision 1, recall 0
    if n_gt == 0:
        return 0.0  # precision 0, recall 1
    precision = (pred_b & dilate(gt_b, radius)).sum() / n_pred
    recall = (gt_b & dilate(pred_b, radius)).sum() / n_gt
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


class JFMeter:
    """Per expression: mean J and mean F over all its frames; J&F = (mean J + mean F) / 2 over expressions."""

    def __init__(self):
        self.per_expression = {}

    def add(self, key, preds, gts):
        """One expression's frames: preds (None = empty) and GT masks, same length."""
        if len(preds) != len(gts):
            raise ValueError(f"{key}: {len(preds)} predicted frames for {len(gts)} annotated frames")
        js = [db_eval_iou(g, p if p is not None else np.zeros_like(g)) for p, g in zip(preds, gts)]
        fs = [f_measure(g, p if p is not None else np.zeros_like(g)) for p, g in zip(preds, gts)]
        self.per_expression[key] = (float(np.mean(js)), float(np.mean(fs)))

    def result(self):
        """Dict of J, F, J&F (percent) and N."""
        if not self.per_expression:
            return {"N": 0}
        j, f = map(np.array, zip(*self.per_expression.values()))
        return {"J": 100 * j.mean(), "F": 100 * f.mean(), "J&F": 100 * (j.mean() + f.mean()) / 2, "N": len(j)}


# ---------------------------------------------------------------------------------------------
# loading a model to evaluate


def load_model(ckpt, preset="tiny", device="cpu", **overrides):
    """(model, tokenizer) from an official-layout directory or a train.py out_dir; "" = random tiny."""
    if not ckpt:
        return salma.build_salma(salma.Config.from_preset(preset), device=device, **overrides)
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt}: not a directory (an official Sa2VA/SALMA directory or a train.py --out_dir)")
    if not os.path.isfile(os.path.join(ckpt, "ckpt.pt")):
        return salma.build_salma(salma.Config.from_preset(preset), init=ckpt, device=device, **overrides)
    model, tok, _ = salma.load_trained(ckpt, **overrides)
    return model.to(device).eval(), tok


# ---------------------------------------------------------------------------------------------
# runners


def peak_host_memory_gib():
    """Peak resident memory of this process so far (GiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def shard(n, rank, world):
    """This rank's item indices."""
    return list(range(rank, n, world))


def gather(obj):
    """All ranks' lists concatenated (identity without torchrun)."""
    if not dist.is_initialized():
        return obj
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return [x for part in parts for x in part]


def run_images(model, tok, dataset, indices, args):
    """Predict every expression of image items -> list of (id, expr, I, U, area ratio)."""
    rows = []
    for i in tqdm(indices, desc="eval", disable=args.quiet, unit="img"):
        sample = dataset[i]
        for k, expr in enumerate(sample["exprs"]):
            gt = sample["masks"][k, 0].numpy()
            pred = model.segment_image(sample["frames"][0], expr, tok, force_seg=args.force_seg).cpu().numpy()
            inter, union = intersection_union(pred, gt)
            rows.append({"id": sample["id"], "expr": expr, "I": inter, "U": union, "area": float(gt.mean())})
    return rows


def video_frames(sample):
    """(load_frame(t), num_frames) for a synthetic (in memory) or a lazily read video."""
    if "frame_paths" in sample:
        paths = sample["frame_paths"]
        return (lambda t: data.load_image(paths[t])), len(paths)
    return sample["frames"].__getitem__, len(sample["frames"])


def run_videos(model, tok, dataset, indices, args, write_dir=None):
    """Predict every expression of video items -> list of per-expression (id, J, F); masks to PNG if asked."""
    rows = []
    for i in tqdm(indices, desc="eval", disable=args.quiet, unit="video"):
        sample = dataset[i]
        load_frame, num_frames = video_frames(sample)
        for k, expr in enumerate(sample["exprs"]):
            preds = [m.cpu().numpy() for m in salma.segment_video(model, load_frame, num_frames, expr, tok, force_seg=args.force_seg)]
            if write_dir is not None:
                write_submission_masks(write_dir, sample, preds)
            if "masks" not in sample and sample["load_masks"] is None:
                continue  # a split without annotations (Ref-YouTube-VOS valid): submission only
            gts = sample["masks"][k].numpy() if "masks" in sample else sample["load_masks"](range(num_frames)).numpy()
            meter = JFMeter()
            meter.add(sample["id"], preds, list(gts))
            j, f = meter.per_expression[sample["id"]]
            rows.append({"id": f"{sample['id']}/{k}", "expr": expr, "J": j, "F": f})
    return rows


def write_submission_masks(out_dir, sample, preds):
    """Ref-YouTube-VOS submission layout: Annotations/<vid>/<exp_id>/<frame>.png with 0/255."""
    vid, exp_id = sample["id"].split("/")
    names = [os.path.splitext(os.path.basename(p))[0] for p in sample["frame_paths"]]
    folder = os.path.join(out_dir, "Annotations", vid, exp_id)
    os.makedirs(folder, exist_ok=True)
    for name, mask in zip(names, preds):
        Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(folder, name + ".png"))


def zip_submission(out_dir):
    """Zip out_dir/Annotations into out_dir/submission.zip."""
    path = os.path.join(out_dir, "submission.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for folder, _, files in os.walk(os.path.join(out_dir, "Annotations")):
            for name in files:
                full = os.path.join(folder, name)
                z.write(full, os.path.relpath(full, out_dir))
    return path


def summarize(rows, is_video):
    """The metrics of all rows (after gathering)."""
    if is_video:
        meter = JFMeter()
        meter.per_expression = {r["id"]: (r["J"], r["F"]) for r in rows}
        return meter.result()
    meter = RefSegMeter()
    meter.records = [(r["I"], r["U"], r["area"]) for r in rows]
    return meter.result()


# ---------------------------------------------------------------------------------------------
# figures: predicted mask, pre-pass gate G and MBA attention, SALMA vs the --mba=False baseline


def overlay(image, mask, colour):
    """uint8 (3, H, W) image with a translucent mask drawn by torchvision."""
    from torchvision.utils import draw_segmentation_masks

    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return draw_segmentation_masks(pixels, mask[None].bool(), alpha=0.5, colors=colour)


def heatmap(values, size):
    """A (h, w) map in [0, 1] resized to size -> uint8 (3, H, W) grey image."""
    v = torch.nn.functional.interpolate(values[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    v = (v - v.min()) / (v.max() - v.min() + 1e-6)
    return (v * 255).byte()[None].expand(3, -1, -1)


def visualize(model, tok, sample, expr, path, force_seg):
    """One PNG: image | SALMA mask | gate G | MBA attention | baseline (mba=False) mask."""
    from dataclasses import replace

    from torchvision.utils import make_grid, save_image

    image = sample["frames"][0]
    size = (image.height, image.width)
    maps = {}
    mask = model.segment_image(image, expr, tok, maps=maps, force_seg=force_seg)
    salma_cfg = model.cfg
    model.cfg = replace(salma_cfg, mba=False)  # the same weights without MBA: the Sa2VA baseline
    baseline = model.segment_image(image, expr, tok, force_seg=force_seg)
    model.cfg = salma_cfg
    h = w = int(math.sqrt(maps["attention"][-1].shape[1])) if "attention" in maps else 1
    tiles = [torch.from_numpy(np.array(image)).permute(2, 0, 1), overlay(image, mask, "red")]
    if "gate" in maps:
        tiles.append(heatmap(maps["gate"][0, 0], size))
        tiles.append(heatmap(maps["attention"][-1][0].sum(-1).reshape(h, w), size))
    tiles.append(overlay(image, baseline, "blue"))
    save_image(make_grid(tiles, nrow=len(tiles), padding=4).float() / 255, path)
    return path


# ---------------------------------------------------------------------------------------------
# command line

DOWNLOAD_HINTS = {
    "refcoco": "RefCOCO/+/g: the refer-API files (instances.json, refs(unc).p / refs(umd).p) in DATA/refcoco*/ and COCO train2014 images in DATA/coco/train2014/",
    "ytvos": "Ref-YouTube-VOS: meta_expressions/<split>/meta_expressions.json and <split>/JPEGImages (+ Annotations for train) in DATA/ytvos/",
    "davis17": "Ref-DAVIS17 in the Ref-YouTube-VOS layout in DATA/davis17/",
    "mevis": "MeViS: <split>/meta_expressions.json, <split>/mask_dict.json, <split>/JPEGImages in DATA/mevis/",
    "ckpt": "a checkpoint: an official Sa2VA-1B directory (config.json, model.safetensors, tokenizer files), an exported SALMA one, or a train.py --out_dir",
}
DATASETS = ("synthetic", "synthetic_video", "refcoco", "refcoco+", "refcocog", "davis17", "mevis", "ytvos")
VIDEO_DATASETS = ("synthetic_video", "davis17", "mevis", "ytvos")


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synthetic", choices=DATASETS, help="benchmark (default synthetic)")
    p.add_argument("--split", default="", help="split (default: the official evaluation split: val for refcoco*, valid_u for mevis, valid for ytvos, davis17, revos)")
    p.add_argument("--ckpt", default="", help="official-layout directory or train.py --out_dir ('' = random tiny model)")
    p.add_argument("--data_root", default="", help="folder holding the datasets (README: Data)")
    p.add_argument("--preset", default="tiny", choices=sorted(salma.PRESETS), help="preset for sizes not in the checkpoint")
    p.add_argument("--mba", type=salma.parse_bool, default=None, metavar="BOOL", help="False: the Sa2VA baseline on the same weights")
    p.add_argument("--out_dir", default="", help="where predictions and metrics.json go (default eval_out/<dataset>_<split>)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items (0 = all)")
    p.add_argument("--num_samples", type=int, default=50, help="size of the generated synthetic splits")
    p.add_argument("--force_seg", type=salma.parse_bool, default=False, metavar="BOOL", help="teacher-force 'Sure, [SEG].' instead of generating")
    p.add_argument("--visualize", type=int, default=0, help="write figures for the first N image items and stop")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.split = args.split or data.EVAL_SPLITS.get(args.dataset, "val")
    args.out_dir = args.out_dir or os.path.join("eval_out", f"{args.dataset}_{args.split}" + ("_baseline" if args.mba is False else ""))
    return args


def build_eval_dataset(args):
    """The dataset to evaluate, with one line on what to download when it is not there."""
    if args.dataset.startswith("synthetic"):
        video = 1.0 if args.dataset == "synthetic_video" else 0.0
        return data.SyntheticRefDataset(args.num_samples, seed=10_000, video_fraction=video)
    hint = DOWNLOAD_HINTS["refcoco" if args.dataset.startswith("refcoco") else args.dataset]
    if not args.data_root or not os.path.isdir(args.data_root):
        raise SystemExit(f"eval.py: --data_root {args.data_root!r} is not a directory. Needs {hint.replace('DATA', '<data_root>')}.")
    try:
        return data.build_dataset(args.dataset, args.data_root, args.split)
    except FileNotFoundError as e:
        raise SystemExit(f"eval.py: {e}. Needs {hint.replace('DATA', args.data_root)}.") from None


def main(argv=None):
    """Evaluate; see the module docstring for the commands."""
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    dataset = build_eval_dataset(args)
    if not args.ckpt and not args.dataset.startswith("synthetic"):
        raise SystemExit(f"eval.py: --ckpt is required for {args.dataset}: {DOWNLOAD_HINTS['ckpt']}.")
    try:
        overrides = {} if args.mba is None else {"mba": args.mba}
        model, tok = load_model(args.ckpt, args.preset, device, **overrides)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: {e}") from None
    model.eval()
    if device.type == "cpu":
        salma.pack_linears_for_cpu(model)  # inference only: oneDNN pre-packed weights, faster GEMMs
    os.makedirs(args.out_dir, exist_ok=True)
    n = min(len(dataset), args.limit) if args.limit else len(dataset)
    if args.visualize:
        for i in range(min(args.visualize, n)):
            sample = dataset[i]
            path = visualize(model, tok, sample, sample["exprs"][0], os.path.join(args.out_dir, f"figure_{i}.png"), args.force_seg)
            print(f"wrote {path}")
        return
    is_video = args.dataset in VIDEO_DATASETS
    start = time.time()
    indices = shard(n, rank, world)
    with torch.inference_mode():
        if is_video:
            rows = run_videos(model, tok, dataset, indices, args, write_dir=args.out_dir if args.dataset == "ytvos" else None)
        else:
            rows = run_images(model, tok, dataset, indices, args)
    rows = gather(rows)
    if rank != 0:
        return
    metrics = summarize(rows, is_video)
    elapsed = time.time() - start
    metrics.update(dataset=args.dataset, split=args.split, ckpt=args.ckpt, mba=model.cfg.mba, items=n)
    speed = {"items_per_s": n / max(elapsed, 1e-9), "seconds": elapsed, "peak_host_gib": peak_host_memory_gib()}
    if args.dataset == "ytvos":
        metrics["submission"] = zip_submission(args.out_dir)
    with open(os.path.join(args.out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(args.out_dir, "speed.json"), "w") as f:  # apart: metrics.json is the same on every re-run
        json.dump(speed, f, indent=2)
    print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in {**metrics, **speed}.items()))
    print(f"wrote {os.path.join(args.out_dir, 'metrics.json')} and speed.json")
    if data.WARNINGS:
        print("data problems handled:", dict(data.WARNINGS))
    return metrics


if __name__ == "__main__":
    main()
