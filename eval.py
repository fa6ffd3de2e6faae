"""
Evaluate SALMA (or the Sa2VA baseline with --mba=False on the same checkpoint).

  python eval.py                                              # generated synthetic split (no data needed)
  python eval.py --ckpt out/tiny --dataset synthetic_distractor   # small targets beside a large look-alike
  python eval.py --dataset refcocog --split val --ckpt ckpts/SALMA-1B --data_root data/
  python eval.py --dataset refcocog --split val --ckpt ckpts/SALMA-1B --data_root data/ --mba=False
  python eval.py --dataset mevis --split valid_u --ckpt ckpts/SALMA-1B --data_root data/
  python eval.py --dataset ytvos --split valid --ckpt ...      # writes the submission zip
  python eval.py --dataset gcg --split val --ckpt ... --data_root data/ --bert_dir ckpts/bert-base-uncased   # GCG
  torchrun --standalone --nproc_per_node=8 eval.py --dataset refcocog ...   # shards over ranks
  python eval.py --ckpt out/tiny --visualize 4                # PNGs: image | SALMA | G | attention | baseline | truth

--ckpt is an official-layout directory (Sa2VA / exported SALMA) or a train.py --out_dir (ckpt.pt).
Metrics are printed and written to <out_dir>/metrics.json, next to the predictions. On generated images
they also count, per expression kind, which objects each mask took (outcomes: the target alone, the
target and others, only others, none; mask_outcome).
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import time
import zipfile
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

import data
import plot
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
    """cIoU = sum I / sum U, gIoU = mean IoU (empty/empty = 1), cIoU by GT area ratio (Table 4).

    A missing prediction (None: the answer had no [SEG]) is left out of cIoU and counts 0 in gIoU, as
    Sa2VA's RES evaluation does (projects/llava_sam2/evaluation/dataset/RES.py evaluate); "missing" counts them.
    """

    BUCKETS = {"<1%": 0.01, "<2%": 0.02, "<5%": 0.05, "all": math.inf}

    def __init__(self):
        self.records = []  # (I, U, area ratio, missing)

    def add(self, pred, gt):
        """Add one expression's prediction (None = missing) and ground truth."""
        i, u = intersection_union(pred, gt)
        self.records.append((i, u, float(np.asarray(gt, dtype=bool).mean()), pred is None))

    def result(self):
        """Dict of cIoU, gIoU, N, missing and the stratified cIoU with N per bucket (percent)."""
        out = {"N": len(self.records), "missing": sum(r[3] for r in self.records)}
        if not self.records:
            return out
        inter, union, ratio, missing = map(np.array, zip(*self.records))
        iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
        scored = ~missing
        out["cIoU"] = 100 * inter[scored].sum() / max(union[scored].sum(), 1)
        out["gIoU"] = 100 * np.where(missing, 0.0, iou).mean()
        for name, limit in self.BUCKETS.items():
            keep = scored & (ratio < limit)
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
    """Per expression: mean J and mean F over all its frames; J&F = (mean J + mean F) / 2 over expressions.

    On Ref-DAVIS17 every expression of both annotators is one entry (pooled), which is exactly what Sa2VA's
    tools/eval/eval_davis.py computes; MeViS valid_u as the MeViS evaluator.
    """

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
# metrics: ReVOS, as VISA's evaluator (tools/eval_revos.py, tools/metrics.py)


def accuracy(gt, pred):
    """A: the fraction of pixels where prediction and GT agree (get_r2vos_accuracy)."""
    return float((np.asarray(gt, dtype=bool) == np.asarray(pred, dtype=bool)).mean())


def robustness(gt, pred, foreground):
    """R of one frame: max(1 - |pred and not GT| / (|foreground| + 1e-6), 0) (get_r2vos_robustness).

    foreground: every annotated object of the frame (mask_dict_foreground.json). VISA computes the false
    positives with uint8 arithmetic, (1 - gt) * pred, which counts the same pixels on 0/1 masks.
    """
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    false_positives = int((pred & ~gt).sum())
    return max(1.0 - false_positives / (int(np.asarray(foreground, dtype=bool).sum()) + 1e-6), 0.0)


REVOS_SUBSETS = {0: "referring", 1: "reasoning"}  # type_id in meta_expressions_valid_.json


def revos_summary(rows):
    """VISA's table: per subset the mean J, F, A, R over its expressions (percent) and J&F = (J + F) / 2;
    the overall numbers are the mean of the two subsets (not of all expressions). VISA rounds each
    expression's percentages to 2 decimals before averaging; these are the unrounded means."""
    out = {"N": len(rows)}
    keys = [k for k in ("J", "F", "A", "R") if rows and k in rows[0]]
    subsets = {}
    for type_id, name in REVOS_SUBSETS.items():
        chosen = [r for r in rows if r["type_id"] == type_id]
        subsets[name] = {k: 100 * float(np.mean([r[k] for r in chosen])) if chosen else float("nan") for k in keys}
        subsets[name]["J&F"] = (subsets[name]["J"] + subsets[name]["F"]) / 2
        out[f"N_{name}"] = len(chosen)
    for k in keys + ["J&F"]:
        out[k] = (subsets["referring"][k] + subsets["reasoning"][k]) / 2
        out.update({f"{name}_{k}": subsets[name][k] for name in REVOS_SUBSETS.values()})
    return out


# ---------------------------------------------------------------------------------------------
# metrics: grounded caption generation (GLaMM's GCG evaluation, as Sa2VA runs it)

def parse_gcg_answer(text):
    """(caption, phrases) of a GCG answer: '<p> phrase </p> [SEG]' marks and other tags removed, spaces joined."""
    text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "").replace("\n", "").replace("  ", " ")
    phrases = [p.strip() for p in re.findall(r"<p>(.*?)</p>", text)]
    caption = " ".join(re.sub(r"<.*?>", "", text).replace("[SEG]", "").split()).strip("'").strip()
    return caption, phrases


def iou_matrix(a, b):
    """IoU (len(a), len(b)) between two lists of bool masks (H, W)."""
    out = np.zeros((len(a), len(b)))
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            union = np.logical_or(x, y).sum()
            out[i, j] = np.logical_and(x, y).sum() / union if union else 0.0
    return out


def coco_rle(mask):
    """A bool mask (H, W) as a compressed COCO RLE with str counts (JSON-ready), by pycocotools."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def gcg_miou(pred_masks, gt_masks):
    """Mean IoU of one-to-one pairs taken greedily by highest IoU (while > 0); 0 without pairs (GLaMM)."""
    ious, paired = iou_matrix(pred_masks, gt_masks), []
    while ious.size and ious.max() > 0:
        i, j = np.unravel_index(ious.argmax(), ious.shape)
        paired.append(ious[i, j])
        ious = np.delete(np.delete(ious, i, axis=0), j, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def gcg_matches(gt_masks, pred_masks, text_sims, iou_th=0.5, sim_th=0.5):
    """Ground-truth phrases recalled: one-to-one pairs by highest IoU while IoU >= iou_th and the phrase
    similarity (G, P) >= sim_th; the first pair failing either ends the search (GLaMM)."""
    ious, sims, found = iou_matrix(gt_masks, pred_masks), np.array(text_sims, dtype=float).reshape(len(gt_masks), len(pred_masks)), 0
    while ious.size:
        i, j = np.unravel_index(ious.argmax(), ious.shape)
        if ious[i, j] < iou_th or sims[i, j] < sim_th:
            break
        found += 1
        ious[i, :], ious[:, j], sims[i, :], sims[:, j] = 0, 0, 0, 0
    return found


def bert_similarity(bert_dir):
    """Phrase similarity as GLaMM measures it: cosine of mean last-layer BERT states (a local bert-base-uncased)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, bert = AutoTokenizer.from_pretrained(bert_dir), AutoModel.from_pretrained(bert_dir).eval()

    @torch.inference_mode()
    def embed(text):
        inputs = tokenizer(text, return_tensors="pt", max_length=512, truncation=True)
        return bert(**inputs).last_hidden_state[0].mean(0)

    def similarity(gt_labels, pred_labels):
        a, b = [embed(t) for t in gt_labels], [embed(t) for t in pred_labels]
        return [[float(torch.nn.functional.cosine_similarity(x, y, dim=0)) for y in b] for x in a]
    return similarity


def caption_scores(references, predictions):
    """METEOR and CIDEr over {id: caption} as pycocoevalcap computes them (PTB tokenised); None without it."""
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        return {"METEOR": None, "CIDEr": None}
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    return {"METEOR": float(Meteor().compute_score(gts, res)[0]), "CIDEr": float(Cider().compute_score(gts, res)[0])}


# ---------------------------------------------------------------------------------------------
# loading a model to evaluate


def load_model(ckpt, preset="tiny", device="cpu", dtype="float32", **overrides):
    """(model, tokenizer) in eval mode from an official-layout directory or a train.py out_dir; "" = random tiny.

    dtype: a --dtype choice (auto, float32, bfloat16), resolved for the loaded model's config."""
    if ckpt and not os.path.isdir(ckpt):
        raise FileNotFoundError(f"--ckpt {ckpt}: not a directory (an official Sa2VA/SALMA directory or a train.py --out_dir)")
    if ckpt and os.path.isfile(os.path.join(ckpt, "ckpt.pt")):
        model, tok, _ = salma.load_trained(ckpt, **overrides)
    else:
        model, tok = salma.build_salma(salma.Config.from_preset(preset), init=ckpt, device=device, **overrides)
    return model.to(device).set_precision(salma.resolve_dtype(dtype, device, model.cfg)).eval(), tok


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
    """Predict every expression of image items -> list of (id, expr, I, U, area ratio, missing)."""
    rows = []
    for i in tqdm(indices, desc="eval", disable=args.quiet, unit="img"):
        sample = dataset[i]
        object_masks = None  # a generated scene: its objects' masks (K, H, W), to tell which a mask took
        if sample.get("objects"):
            object_masks = data.render(sample["objects"], sample["frames"][0].size)[1].numpy()
        for k, expr in enumerate(sample["exprs"]):
            gt, maps = sample["masks"][k, 0].numpy(), {}
            pred = model.segment_image(sample["frames"][0], expr, tok, maps=maps, **generation(args)).cpu().numpy()
            missing = maps.get("no_seg", False)  # the answer had no [SEG]: no prediction
            inter, union = intersection_union(None if missing else pred, gt)
            rows.append({"id": sample["id"], "expr": expr, "I": inter, "U": union, "area": float(gt.mean()), "missing": missing})
            if object_masks is not None:
                rows[-1]["outcome"] = mask_outcome(pred & (not missing), object_masks, sample["targets"][k])
    return rows


OUTCOMES = ("target", "target+others", "others", "none")  # what a mask on a generated image took (mask_outcome)


def mask_outcome(pred, object_masks, target):
    """Which objects of a generated scene a mask (H, W) takes, object_masks (K, H, W): one of OUTCOMES.

    An object counts as taken when the mask covers over half of it.
    """
    taken = [j for j, mask in enumerate(object_masks) if (pred & mask).sum() * 2 > mask.sum()]
    if not taken:
        return "none"
    if taken == [target]:
        return "target"
    return "target+others" if target in taken else "others"


def generation(args):
    """How the answer is produced: generated (up to --max_new_tokens) or teacher-forced (--force_seg)."""
    return {"force_seg": args.force_seg, "max_new_tokens": args.max_new_tokens}


def video_frames(sample):
    """(load_frame(t), num_frames) for a synthetic (in memory) or a lazily read video."""
    if "frame_paths" in sample:
        paths = sample["frame_paths"]
        return (lambda t: data.load_image(paths[t])), len(paths)
    return sample["frames"].__getitem__, len(sample["frames"])


def run_videos(model, tok, dataset, indices, args, submission=None):
    """Predict every expression of video items -> per-expression rows with J and F (ReVOS: also A, R, type_id),
    or, on a split without ground truth, write the masks as submission PNGs: submission = (folder, pixel value)."""
    rows = []
    for i in tqdm(indices, desc="eval", disable=args.quiet, unit="video"):
        sample = dataset[i]
        load_frame, num_frames = video_frames(sample)
        for k, expr in enumerate(sample["exprs"]):
            preds = [m.cpu().numpy() for m in salma.segment_video(model, load_frame, num_frames, expr, tok, **generation(args))]
            row = {"id": f"{sample['id']}/{k}", "expr": expr}
            if submission is not None:
                write_submission_masks(*submission, sample, preds)
                rows.append({**row, "frames": num_frames})
                continue
            gts = sample["masks"][k].numpy() if "masks" in sample else sample["load_masks"](range(num_frames)).numpy()
            rows.append({**row, **video_scores(preds, gts, sample)})
    return rows


def video_scores(preds, gts, sample):
    """J and F of one expression (means over its frames); ReVOS adds A, R (with its foreground masks) and type_id."""
    meter = JFMeter()
    meter.add(sample["id"], preds, list(gts))
    j, f = meter.per_expression[sample["id"]]
    scores = {"J": j, "F": f}
    if sample.get("type_id") is not None:
        scores["type_id"] = sample["type_id"]
    if sample.get("load_foreground") is not None:
        foreground = sample["load_foreground"](range(len(preds))).numpy()
        scores["A"] = float(np.mean([accuracy(g, p) for g, p in zip(gts, preds)]))
        scores["R"] = float(np.mean([robustness(g, p, fg) for g, p, fg in zip(gts, preds, foreground)]))
    return scores


# the official submission of each video benchmark whose split ships no ground truth:
# dataset -> (folder inside the zip, PNG value of a mask pixel, who scores it)
SUBMISSIONS = {
    "ytvos": ("Annotations", 255, "the Ref-YouTube-VOS challenge server (CodaLab)"),
    "mevis": ("", 255, "the MeViS CodaLab server (codalab.lisn.upsaclay.fr/competitions/15094)"),
    "revos": ("", 1, "VISA's tools/eval_revos.py (0/1 PNGs, as its A and R arithmetic expects)"),
}


def without_ground_truth(dataset):
    """Whether an official video split ships no masks (Ref-YouTube-VOS valid, MeViS valid, ReVOS without mask_dict.json)."""
    return isinstance(dataset, data.VideoRefDataset) and all(item["masks"] is None for item in dataset.items)


def submission_target(args, dataset, rank):
    """(folder, pixel value) where a split without ground truth writes its PNGs (emptied first), or None."""
    if not without_ground_truth(dataset):
        return None
    if args.dataset not in SUBMISSIONS:
        raise SystemExit(f"eval.py: {args.dataset} {args.split} under {args.data_root} has no ground truth and no "
                         f"submission server. Needs {DOWNLOAD_HINTS[args.dataset].replace('DATA', args.data_root)}.")
    root = os.path.join(args.out_dir, "submission")
    if rank == 0 and os.path.isdir(root):
        shutil.rmtree(root)  # a previous run's PNGs never end up in this zip
    if dist.is_initialized():
        dist.barrier()
    inside, value, _ = SUBMISSIONS[args.dataset]
    return os.path.join(root, inside), value


def write_submission_masks(folder, value, sample, preds):
    """One expression's masks as folder/<video>/<exp_id>/<frame>.png (single-channel, 0 / value)."""
    out = os.path.join(folder, sample["video"], sample["exp_id"])
    os.makedirs(out, exist_ok=True)
    for name, mask in zip(sample["frame_names"], preds):
        Image.fromarray(mask.astype(np.uint8) * value).save(os.path.join(out, name + ".png"))


def zip_submission(out_dir):
    """Zip out_dir/submission/ into out_dir/submission.zip, paths relative to submission/ (sorted)."""
    root, path = os.path.join(out_dir, "submission"), os.path.join(out_dir, "submission.zip")
    files = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for full in files:
            z.write(full, os.path.relpath(full, root))
    return path


def segment_answer(model, tok, image, question, max_new_tokens):
    """Answer a question about a PIL image by generation -> (text, bool masks (N, H, W), one per [SEG])."""
    text, z_seg, hidden, valid = model.answer([image], "", tok, max_new_tokens=max_new_tokens, question="<image>\n" + question)
    w, h = image.size
    n = z_seg.shape[0]
    if n == 0:
        return text, torch.zeros(0, h, w, dtype=torch.bool)
    with model.autocast():
        enc = model.grounding.encode_image(salma.sam_pixels([image], model.cfg.sam_image_size).to(model.device, z_seg.dtype))
        image_embed = enc["image_embed"].expand(n, -1, -1, -1)
        high_res = [f.expand(n, -1, -1, -1) for f in enc["high_res_feats"]]
        low_res = model.grounding.decode(model.refine(image_embed, high_res, hidden, valid), high_res, z_seg)
    return text, salma.SAM2Grounding.postprocess(low_res, model.cfg.sam_image_size, (h, w))[:, 0] > 0


def run_gcg(model, tok, dataset, indices, args, similarity=None):
    """Caption every image with its phrases' masks -> per-image rows (caption, phrases, RLEs, mIoU, matches)."""
    rows = []
    for i in tqdm(indices, desc="gcg", disable=args.quiet, unit="img"):
        sample = dataset[i]
        text, masks = segment_answer(model, tok, sample["frames"][0], data.GCG_QUESTION, args.max_new_tokens)
        caption, phrases = parse_gcg_answer(text)
        pred = [m.cpu().numpy() for m in masks]
        gt = [m.numpy() for m in sample["masks"][:, 0]]
        matches = None
        if similarity is not None:
            sims = similarity(sample["labels"], phrases) if phrases and sample["labels"] else [[0.0] * len(pred)] * len(gt)
            matches = gcg_matches(gt, pred[: len(phrases)], sims) if pred and gt else 0
        rows.append({"id": sample["id"], "caption": caption, "phrases": phrases, "reference": sample["caption"],
                     "pred_masks": [coco_rle(m) for m in pred], "miou": gcg_miou(pred, gt),
                     "gt_labels": len(sample["labels"]), "matches": matches})
    return rows


def gcg_summary(rows, mask_gt_path):
    """mIoU, recall (with --bert_dir), mask AP50 (pycocotools COCOeval) and METEOR / CIDEr of all rows."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    metrics = {"mIoU": float(np.mean([r["miou"] for r in rows])) if rows else 0.0, "images": len(rows)}
    if rows and rows[0]["matches"] is not None:
        metrics["recall"] = sum(r["matches"] for r in rows) / max(1, sum(r["gt_labels"] for r in rows))
    else:
        metrics["recall"] = None  # needs phrase similarity: --bert_dir
    preds = [{"image_id": r["id"], "category_id": 1, "segmentation": rle, "score": 1.0} for r in rows for rle in r["pred_masks"]]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(mask_gt_path)
        gt.dataset["images"] = [im for im in gt.dataset["images"] if im["id"] in {r["id"] for r in rows}]
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(preds) if preds else COCO(), "segm")
        evaluator.params.catIds, evaluator.params.imgIds = [1], [r["id"] for r in rows]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    metrics["AP50"] = float(evaluator.stats[1])
    metrics.update(caption_scores({r["id"]: [r["reference"]] for r in rows}, {r["id"]: r["caption"] for r in rows}))
    return metrics


def summarize(rows, is_video):
    """The metrics of all rows (after gathering)."""
    if is_video and rows and "type_id" in rows[0]:
        return revos_summary(rows)
    if is_video:
        meter = JFMeter()
        meter.per_expression = {r["id"]: (r["J"], r["F"]) for r in rows}
        return meter.result()
    meter = RefSegMeter()
    meter.records = [(r["I"], r["U"], r["area"], r["missing"]) for r in rows]
    return meter.result()


def format_metrics(metrics):
    """One printable line: 'name value | ...', floats to 2 decimals, nested results (by_kind) in brackets."""
    def value(v):
        if isinstance(v, dict):
            return "(" + ", ".join(f"{k} {value(x)}" for k, x in v.items()) + ")"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {value(v)}" for k, v in metrics.items())


def by_kind(rows, is_video):
    """The metrics of each kind of generated expression (attribute / relation / comparative / motion), with
    the count of each mask_outcome where the rows have one (generated images)."""
    kinds = [data.expression_kind(r["expr"]) for r in rows]
    result = {kind: summarize([r for r, k in zip(rows, kinds) if k == kind], is_video) for kind in sorted(set(kinds))}
    for kind, metrics in result.items():
        taken = [r["outcome"] for r, k in zip(rows, kinds) if k == kind and "outcome" in r]
        if taken:  # how many masks took the target alone, the target and others, only others, nothing
            metrics["outcomes"] = {outcome: taken.count(outcome) for outcome in OUTCOMES}
    return result


# ---------------------------------------------------------------------------------------------
# figures: SALMA with its gate G and MBA attention next to the --mba=False baseline (plot.mask_figure)


@contextmanager
def as_baseline(model):
    """The same weights with MBA switched off: the Sa2VA baseline (--mba=False)."""
    cfg = model.cfg
    model.cfg = replace(cfg, mba=False)
    try:
        yield model
    finally:
        model.cfg = cfg


def figure_maps(maps):
    """(gate G (h, w), MBA attention on the router's top-ranked word (h, w)) of a segmentation's maps."""
    if "gate" not in maps:
        return None, None  # the baseline: no MBA
    gate = maps["gate"][0, 0]
    attention = maps["attention"][-1][0, :, 0].reshape(gate.shape)  # (hw, K): TopK sorts, word 0 scores highest
    return gate, attention


def compare(model, tok, image, expr, **options):
    """({"SALMA": mask, "baseline (mba=False)": mask}, SALMA's maps) on one image; a baseline model gives one mask.

    options: segment_image's force_seg, max_new_tokens and question.
    """
    maps = {}
    mask = model.segment_image(image, expr, tok, maps=maps, **options)
    if not model.cfg.mba:
        return {"baseline (mba=False)": mask}, maps
    with as_baseline(model):
        baseline = model.segment_image(image, expr, tok, **options)
    return {"SALMA": mask, "baseline (mba=False)": baseline}, maps


def visualize(model, tok, sample, path, options):
    """figure PNG of an image item's first expression: image | SALMA | G | attention | baseline | ground truth."""
    image, expr = sample["frames"][0], sample["exprs"][0]
    masks, maps = compare(model, tok, image, expr, **options)
    fig = plot.mask_figure(image, expr, masks, *figure_maps(maps), truth=sample["masks"][0, 0],
                          subtitle=f"answer: {maps['answer']}")
    return plot.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# command line

DOWNLOAD_HINTS = {
    "refcoco": "RefCOCO/+/g in the refer-API layout (github.com/lichengunc/refer): DATA/refcoco*/instances.json and refs(unc).p / refs(umd).p, COCO train2014 images in DATA/coco/train2014/",
    "ytvos": "the Ref-YouTube-VOS 2021 challenge files (youtube-vos.org/dataset/rvos): DATA/ytvos/meta_expressions/{train,valid,test}/meta_expressions.json, DATA/ytvos/<split>/JPEGImages (+ Annotations for train)",
    "davis17": "Ref-DAVIS17 as ReferFormer's tools/data/convert_davis_to_ytvos.py writes it (DATA/davis17/meta_expressions/valid/meta_expressions.json, valid/JPEGImages, valid/Annotations) or as Sa2VA ships it (valid/mask_dict.pkl instead of Annotations)",
    "mevis": "MeViS from its CodaLab page (github.com/henghuiding/MeViS): DATA/mevis/<split>/meta_expressions.json, JPEGImages and mask_dict.json (train, valid_u)",
    "revos": "ReVOS as released (github.com/cilinyan/ReVOS-api): DATA/revos/JPEGImages, mask_dict.json, mask_dict_foreground.json, meta_expressions_{train,valid}_.json",
    "gcg": "GLaMM's GranDf GCG evaluation files as Sa2VA reads them: DATA/glamm_data/annotations/gcg_val_test/{val,test}_gcg_coco_{caption,mask}_gt.json and images in DATA/glamm_data/images/grandf/val_test/",
    "ckpt": "a checkpoint: an official Sa2VA-1B directory (config.json, model.safetensors, tokenizer files), an exported SALMA one, or a train.py --out_dir",
}
DATASETS = ("synthetic", "synthetic_video", "synthetic_distractor", "refcoco", "refcoco+", "refcocog", "davis17", "mevis", "ytvos", "revos", "gcg")
VIDEO_DATASETS = ("synthetic_video", "davis17", "mevis", "ytvos", "revos")


def parse_args(argv=None):
    """Command-line flags."""
    datasets = "\n".join(f"  {name:8s} {hint}" for name, hint in DOWNLOAD_HINTS.items() if name != "ckpt")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Datasets (--data_root DATA, each read in its official layout):\n{datasets}")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="benchmark (default synthetic: generated images; synthetic_video: generated videos; synthetic_distractor: "
                        "a small target beside a larger shape of its colour and kind); the files each real one needs are listed under Datasets below")
    p.add_argument("--split", default="", help="split, by its official name (default: val for refcoco*, valid_u for mevis, valid for "
                   "ytvos, davis17, revos); a split without ground truth (ytvos valid, mevis valid) writes the official submission zip")
    p.add_argument("--ckpt", default="", help="official-layout directory or train.py --out_dir ('' = random tiny model)")
    p.add_argument("--data_root", default="", help="folder holding the datasets (README: Data)")
    p.add_argument("--preset", default="tiny", choices=sorted(salma.PRESETS), help="preset for sizes not in the checkpoint")
    p.add_argument("--mba", type=salma.parse_bool, default=None, metavar="BOOL", help="False: the Sa2VA baseline on the same weights")
    p.add_argument("--out_dir", default="", help="where predictions and metrics.json go (default eval_out/<dataset>_<split>)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items (0 = all)")
    p.add_argument("--num_samples", type=int, default=50, help="size of the generated synthetic splits")
    p.add_argument("--force_seg", type=salma.parse_bool, default=False, metavar="BOOL", help="teacher-force 'Sure, [SEG].' instead of generating")
    p.add_argument("--max_new_tokens", type=int, default=2048,
                   help="generation stops at <|im_end|> or after this many tokens (default 2048, as Sa2VA)")
    p.add_argument("--visualize", type=int, default=0, help="write figure PNGs (image | SALMA | gate G | MBA attention | baseline | ground truth) for the first N image items and stop")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision (default auto: bf16 on CUDA, and on CPUs with native bf16 matmuls (AVX-512 BF16 or AMX) for the 1B presets; "
                        "fp32 otherwise: tiny matmuls and CPUs without bf16 units are slower in bf16). bf16 puts the MLLM's weights in bf16 and runs "
                        "SAM-2 and MBA under bf16 autocast with fp32 weights")
    p.add_argument("--bert_dir", default="", help="gcg: a local bert-base-uncased directory for the phrase similarity of recall "
                   "(GLaMM's); '' = recall not computed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.split = args.split or data.EVAL_SPLITS.get(args.dataset, "val")
    if args.dataset.startswith("synthetic") and args.split != "val":
        p.error(f"--split={args.split}: the generated sets have one split, val")
    for name, least in (("num_samples", 1), ("limit", 0), ("visualize", 0), ("max_new_tokens", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name}={getattr(args, name)}: must be at least {least}")
    args.out_dir = args.out_dir or os.path.join("eval_out", f"{args.dataset}_{args.split}" + ("_baseline" if args.mba is False else ""))
    return args


def build_eval_dataset(args):
    """The dataset to evaluate, with one line on what to download when it is not there."""
    if args.dataset.startswith("synthetic"):
        video = 1.0 if args.dataset == "synthetic_video" else 0.0
        return data.SyntheticRefDataset(args.num_samples, seed=10_000, video_fraction=video, twins=args.dataset == "synthetic_distractor")
    hint = DOWNLOAD_HINTS["refcoco" if args.dataset.startswith("refcoco") else args.dataset]
    if not args.data_root or not os.path.isdir(args.data_root):
        raise SystemExit(f"eval.py: --data_root {args.data_root!r} is not a directory. Needs {hint.replace('DATA', '<data_root>')}.")
    try:
        if args.dataset == "gcg":
            return data.GCGEvalDataset(args.data_root, args.split)
        return data.build_dataset(args.dataset, args.data_root, args.split)
    except (FileNotFoundError, ValueError) as e:
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
    overrides = {} if args.mba is None else {"mba": args.mba}
    model, tok = load_model(args.ckpt, args.preset, device, args.dtype, **overrides)
    if device.type == "cpu":
        salma.pack_linears_for_cpu(model)  # inference only: oneDNN pre-packed weights, faster GEMMs
    os.makedirs(args.out_dir, exist_ok=True)
    n = min(len(dataset), args.limit) if args.limit else len(dataset)
    if args.visualize and args.dataset == "gcg":
        raise SystemExit("eval.py: --visualize draws referring expressions; gcg has none")
    if args.visualize:
        for i in range(min(args.visualize, n)):
            path = visualize(model, tok, dataset[i], os.path.join(args.out_dir, f"figure_{i}.png"), generation(args))
            print(f"wrote {path}")
        return
    is_video = args.dataset in VIDEO_DATASETS
    submission = submission_target(args, dataset, rank)
    start = time.time()
    indices = shard(n, rank, world)
    with torch.inference_mode():
        if args.dataset == "gcg":
            rows = run_gcg(model, tok, dataset, indices, args, bert_similarity(args.bert_dir) if args.bert_dir else None)
        elif is_video:
            rows = run_videos(model, tok, dataset, indices, args, submission)
        else:
            rows = run_images(model, tok, dataset, indices, args)
    rows = gather(rows)
    if rank != 0:
        return
    if submission is not None:
        metrics = {"submission": zip_submission(args.out_dir), "expressions": len(rows), "scored_by": SUBMISSIONS[args.dataset][2]}
    elif args.dataset == "gcg":
        metrics = gcg_summary(rows, dataset.mask_gt_path)
    else:
        metrics = summarize(rows, is_video)
        if args.dataset.startswith("synthetic"):
            metrics["by_kind"] = by_kind(rows, is_video)
    elapsed = time.time() - start
    metrics.update(dataset=args.dataset, split=args.split, ckpt=args.ckpt, mba=model.cfg.mba, items=n)
    speed = {"items_per_s": n / max(elapsed, 1e-9), "seconds": elapsed, "peak_host_gib": peak_host_memory_gib()}
    with open(os.path.join(args.out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(args.out_dir, "speed.json"), "w") as f:  # apart: metrics.json is the same on every re-run
        json.dump(speed, f, indent=2)
    print(format_metrics({**metrics, **speed}))
    print(f"wrote {os.path.join(args.out_dir, 'metrics.json')} and speed.json")
    if submission is not None:
        print(f"{args.split} has no ground truth: wrote {metrics['submission']} ({len(rows)} expressions); score it with {metrics['scored_by']}")
    if data.WARNINGS:
        print("data problems handled:", dict(data.WARNINGS))
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths, checkpoints, images or data: one line, no traceback
        raise SystemExit(f"eval.py: {e}") from None
