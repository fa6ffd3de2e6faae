"""
metrics: every score the evaluations report, each as its official evaluator computes it.

  referring images     cIoU (sum I / sum U), gIoU (mean IoU), cIoU by ground-truth area (RefSegMeter)
  videos               J & F with DAVIS-2017 semantics (JFMeter); ReVOS's A and R as VISA's evaluator
  grounded captions    GLaMM's GCG: mIoU, recall, mask AP50, METEOR / CIDEr

One IoU convention everywhere (iou): two empty masks agree (IoU 1); a missing prediction is an empty mask.
"""

import contextlib
import io
import math
import re

import numpy as np
from pycocotools import mask as mask_utils

# ---------------------------------------------------------------------------------------------
# metrics: referring image segmentation


def intersection_union(pred, gt):
    """(|pred & gt|, |pred | gt|) of two bool masks; a missing prediction (None) is an empty mask."""
    gt = np.asarray(gt, dtype=bool)
    pred = np.zeros_like(gt) if pred is None else np.asarray(pred, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    return int((pred & gt).sum()), int((pred | gt).sum())


def iou(pred, gt):
    """IoU of two bool masks; 1 when both are empty (gIoU, DAVIS's J); a missing prediction (None) is empty."""
    inter, union = intersection_union(pred, gt)
    return 1.0 if union == 0 else inter / union


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


class FrameScores:
    """One expression's scores, frame by frame: J and F (with foreground masks: ReVOS's A and R); result() = their means."""

    def __init__(self):
        self.scores = {"J": [], "F": []}

    def add(self, pred, gt, foreground=None):
        """One frame: pred (None = empty) and its GT mask (H, W); foreground: every annotated object (ReVOS)."""
        pred = np.zeros_like(gt, dtype=bool) if pred is None else pred
        frame = {"J": iou(pred, gt), "F": f_measure(gt, pred)}
        if foreground is not None:
            frame.update(A=accuracy(gt, pred), R=robustness(gt, pred, foreground))
        for name, value in frame.items():
            self.scores.setdefault(name, []).append(value)

    def result(self):
        """{name: mean over the frames added}."""
        return {name: float(np.mean(values)) for name, values in self.scores.items()}


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
        frames = FrameScores()
        for p, g in zip(preds, gts):
            frames.add(p, g)
        scores = frames.result()
        self.per_expression[key] = (scores["J"], scores["F"])

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
    return np.array([[iou(x, y) for y in b] for x in a]).reshape(len(a), len(b))


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
    import torch
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


# ---------------------------------------------------------------------------------------------
# the metrics of all rows of an evaluation


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
