"""
Evaluate SALMA (or the Sa2VA baseline with --mba=False on the same checkpoint).

  python eval.py                                              # out/tiny (the quick start's) on the generated split
  python eval.py --ckpt out/tiny --dataset synthetic_distractor   # small targets beside a large look-alike
  python eval.py --dataset refcocog --split val --ckpt ckpts/SALMA-1B --data_root data/
  python eval.py --dataset refcocog --split val --ckpt ckpts/SALMA-1B --data_root data/ --mba=False
  python eval.py --dataset mevis --split valid_u --ckpt ckpts/SALMA-1B --data_root data/
  python eval.py --dataset ytvos --split valid --ckpt ...      # writes the submission zip
  python eval.py --dataset gcg --split val --ckpt ... --data_root data/ --bert_dir ckpts/bert-base-uncased   # GCG
  torchrun --standalone --nproc_per_node=8 eval.py --dataset refcocog ...   # shards over ranks
  python eval.py --dataset mevis --split valid_u ... --resume                 # a killed run continues where it stopped
  python eval.py --ckpt out/tiny --visualize 4                # PNGs: image | SALMA | G | attention | baseline | truth

--ckpt is an official-layout directory (Sa2VA / exported SALMA) or a train.py --out_dir (default out/tiny).
Metrics are printed and written to <out_dir>/metrics.json, next to the predictions. Each rank appends
every item's predictions to <out_dir>/progress.rank<r>_of_<w>.jsonl as it makes them; --resume reads them
back. On generated images they also count, per expression kind, which objects each mask took (outcomes:
the target alone, the target and others, only others, none; mask_outcome).
"""

import argparse
import json
import os
import shutil
import time
import zipfile
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import checkpoint
import common
import data
import metrics
import plot
import mllm
import salma
import testbed

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


RUN_FIELDS = ("dataset", "split", "ckpt", "mba", "limit", "num_samples", "force_seg", "max_new_tokens", "dtype", "bert_dir")


def run_items(dataset, indices, predict, args, rank, world):
    """The rows of predict(sample) for each item, in indices order. Each item's rows are appended to
    OUT_DIR/progress.rank{r}_of_{w}.jsonl as they are made; with --resume the items already there are read
    back instead of predicted again, so a killed run continues where it stopped, with the same results."""
    path = os.path.join(args.out_dir, f"progress.rank{rank}_of_{world}.jsonl")
    identity = {name: getattr(args, name) for name in RUN_FIELDS}
    done = read_progress(path, identity) if args.resume else {}
    if done and rank == 0:
        print(f"--resume: {len(done)} of {len(indices)} items read back from {path}")
    with open(path, "a" if done else "w") as f:
        if not done:
            f.write(json.dumps({"run": identity}) + "\n")
        for i in tqdm([i for i in indices if i not in done], desc="eval", disable=args.quiet, unit="item"):
            done[i] = predict(dataset[i])
            f.write(json.dumps({"item": i, "rows": done[i]}) + "\n")
            f.flush()
    return [row for i in indices for row in done[i]]


def read_progress(path, identity):
    """{item: rows} of a progress file written by the same run (same flags); {} when there is none yet."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = f.read().splitlines()
    try:
        saved = json.loads(lines[0])["run"] if lines else None
    except (ValueError, KeyError):
        saved = None
    if saved != identity:
        raise ValueError(f"--resume: {path} holds another run's predictions ({saved}); rerun without --resume or with "
                         "the same flags, or pick another --out_dir")
    done = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:  # the line a kill cut short: that item is predicted again
            continue
        done[entry["item"]] = entry["rows"]
    return done


def image_rows(model, tok, sample, args):
    """One image item -> a row per expression: id, expr, I, U, area ratio, missing (+ outcome on a generated scene)."""
    rows, object_masks = [], None  # a generated scene: its objects' masks (K, H, W), to tell which a mask took
    if sample.get("objects"):
        object_masks = testbed.render(sample["objects"], sample["frames"][0].size)[1].numpy()
    for k, expr in enumerate(sample["exprs"]):
        gt, maps = sample["masks"][k, 0].numpy(), {}
        pred = model.segment_image(sample["frames"][0], expr, tok, maps=maps, **generation(args)).cpu().numpy()
        missing = maps.get("no_seg", False)  # the answer had no [SEG]: no prediction
        inter, union = metrics.intersection_union(None if missing else pred, gt)
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
        return (lambda t: common.load_image(paths[t])), len(paths)
    return sample["frames"].__getitem__, len(sample["frames"])


def video_rows(model, tok, sample, args, submission=None):
    """One video item -> a row per expression with J and F (ReVOS: also A, R, type_id), or, on a split without
    ground truth, its masks written as submission PNGs: submission = (folder, pixel value)."""
    rows = []
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
    meter = metrics.JFMeter()
    meter.add(sample["id"], preds, list(gts))
    j, f = meter.per_expression[sample["id"]]
    scores = {"J": j, "F": f}
    if sample.get("type_id") is not None:
        scores["type_id"] = sample["type_id"]
    if sample.get("load_foreground") is not None:
        foreground = sample["load_foreground"](range(len(preds))).numpy()
        scores["A"] = float(np.mean([metrics.accuracy(g, p) for g, p in zip(gts, preds)]))
        scores["R"] = float(np.mean([metrics.robustness(g, p, fg) for g, p, fg in zip(gts, preds, foreground)]))
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
    """(folder, pixel value) where a split without ground truth writes its PNGs (emptied first, unless --resume), or None."""
    if not without_ground_truth(dataset):
        return None
    if args.dataset not in SUBMISSIONS:
        raise SystemExit(f"eval.py: {args.dataset} {args.split} under {args.data_root} has no ground truth and no "
                         f"submission server. Needs {DOWNLOAD_HINTS[args.dataset].replace('DATA', args.data_root)}.")
    root = os.path.join(args.out_dir, "submission")
    if rank == 0 and os.path.isdir(root) and not args.resume:
        shutil.rmtree(root)  # a previous run's PNGs never end up in this zip (a resumed run keeps its own)
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
        enc = model.grounding.encode_image(model.sam_input([image]))
        image_embed = enc["image_embed"].expand(n, -1, -1, -1)
        high_res = [f.expand(n, -1, -1, -1) for f in enc["high_res_feats"]]
        low_res = model.grounding.decode(model.refine(image_embed, high_res, hidden, valid), high_res, z_seg)
    return text, salma.SAM2Grounding.postprocess(low_res, model.cfg.sam_image_size, (h, w))[:, 0]


def gcg_rows(model, tok, sample, args, similarity=None):
    """Caption one image with its phrases' masks -> its row (caption, phrases, RLEs, mIoU, matches)."""
    text, masks = segment_answer(model, tok, sample["frames"][0], data.GCG_QUESTION, args.max_new_tokens)
    caption, phrases = metrics.parse_gcg_answer(text)
    pred = [m.cpu().numpy() for m in masks]
    gt = [m.numpy() for m in sample["masks"][:, 0]]
    matches = None
    if similarity is not None:
        sims = similarity(sample["labels"], phrases) if phrases and sample["labels"] else [[0.0] * len(pred)] * len(gt)
        matches = metrics.gcg_matches(gt, pred[: len(phrases)], sims) if pred and gt else 0
    return [{"id": sample["id"], "caption": caption, "phrases": phrases, "reference": sample["caption"],
             "pred_masks": [metrics.coco_rle(m) for m in pred], "miou": metrics.gcg_miou(pred, gt),
             "gt_labels": len(sample["labels"]), "matches": matches}]


def format_metrics(values):
    """One printable line: 'name value | ...', floats to 2 decimals, nested results (by_kind) in brackets."""
    def value(v):
        if isinstance(v, dict):
            return "(" + ", ".join(f"{k} {value(x)}" for k, x in v.items()) + ")"
        return f"{v:.2f}" if isinstance(v, float) else str(v)
    return " | ".join(f"{k} {value(v)}" for k, v in values.items())


def by_kind(rows, is_video):
    """The metrics of each kind of generated expression (attribute / relation / comparative / motion), with
    the count of each mask_outcome where the rows have one (generated images)."""
    kinds = [testbed.expression_kind(r["expr"]) for r in rows]
    result = {kind: metrics.summarize([r for r, k in zip(rows, kinds) if k == kind], is_video) for kind in sorted(set(kinds))}
    for kind, scores in result.items():
        taken = [r["outcome"] for r, k in zip(rows, kinds) if k == kind and "outcome" in r]
        if taken:  # how many masks took the target alone, the target and others, only others, nothing
            scores["outcomes"] = {outcome: taken.count(outcome) for outcome in OUTCOMES}
    return result


# ---------------------------------------------------------------------------------------------
# figures: SALMA with its gate G and MBA attention next to the --mba=False baseline (plot.mask_figure)


def visualize(model, tok, sample, path, options):
    """figure PNG of an image item's first expression: image | SALMA | G | attention | baseline | ground truth."""
    image, expr = sample["frames"][0], sample["exprs"][0]
    masks, maps = plot.compare(model, tok, image, expr, **options)
    fig = plot.mask_figure(image, expr, masks, *plot.figure_maps(maps), truth=sample["masks"][0, 0],
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
}
DATASETS = ("synthetic", "synthetic_video", "synthetic_distractor", "refcoco", "refcoco+", "refcocog", "davis17", "mevis", "ytvos", "revos", "gcg")
VIDEO_DATASETS = ("synthetic_video", "davis17", "mevis", "ytvos", "revos")


def parse_args(argv=None):
    """Command-line flags."""
    datasets = "\n".join(f"  {name:8s} {hint}" for name, hint in DOWNLOAD_HINTS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"Datasets (--data_root DATA, each read in its official layout):\n{datasets}")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="benchmark (default synthetic: generated images; synthetic_video: generated videos; synthetic_distractor: "
                        "a small target beside a larger shape of its colour and kind); the files each real one needs are listed under Datasets below")
    p.add_argument("--split", default="", help="split, by its official name (default: val for refcoco*, valid_u for mevis, valid for "
                   "ytvos, davis17, revos); a split without ground truth (ytvos valid, mevis valid) writes the official submission zip")
    p.add_argument("--ckpt", default="", help=checkpoint.CKPT_HELP)
    p.add_argument("--data_root", default="", help="folder holding the datasets (docs/data.md)")
    p.add_argument("--preset", default="tiny", choices=sorted(salma.PRESETS), help="sizes of a --ckpt random model (default tiny)")
    p.add_argument("--mba", type=common.parse_bool, default=None, metavar="BOOL", help="False: the Sa2VA baseline on the same weights")
    p.add_argument("--out_dir", default="", help="where predictions and metrics.json go (default eval_out/<dataset>_<split>)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N items (0 = all)")
    p.add_argument("--num_samples", type=int, default=50, help="size of the generated synthetic splits")
    p.add_argument("--force_seg", type=common.parse_bool, default=False, metavar="BOOL", help="teacher-force 'Sure, [SEG].' instead of generating")
    p.add_argument("--max_new_tokens", type=int, default=2048,
                   help="generation stops at <|im_end|> or after this many tokens (default 2048, as Sa2VA)")
    p.add_argument("--visualize", type=int, default=0, help="write figure PNGs (image | SALMA | gate G | MBA attention | baseline | ground truth) for the first N image items and stop")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="precision (default auto: bf16 on CUDA, and on CPUs with native bf16 matmuls (AVX-512 BF16 or AMX) for the 1B presets; "
                        "fp32 otherwise: tiny matmuls and CPUs without bf16 units are slower in bf16). bf16 puts the MLLM's weights in bf16 and runs "
                        "SAM-2 and MBA under bf16 autocast with fp32 weights")
    p.add_argument("--bert_dir", default="", help="gcg: a local bert-base-uncased directory for the phrase similarity of recall "
                   "(GLaMM's); '' = recall not computed")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same --out_dir: the items its "
                   "progress files hold are read back, the rest predicted (same flags required; the same metrics.json)")
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
        return testbed.split("val", args.num_samples, video_fraction=video, twins=args.dataset == "synthetic_distractor")
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
    overrides = {} if args.mba is None else {"mba": args.mba}
    model, tok = checkpoint.model_from_flags(args.ckpt, args.preset, device, args.dtype, **overrides)
    if device.type == "cpu":
        mllm.pack_linears_for_cpu(model)  # inference only: oneDNN pre-packed weights, faster GEMMs
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
    if args.dataset == "gcg":
        similarity = metrics.bert_similarity(args.bert_dir) if args.bert_dir else None
        predict = partial(gcg_rows, model, tok, args=args, similarity=similarity)
    elif is_video:
        predict = partial(video_rows, model, tok, args=args, submission=submission)
    else:
        predict = partial(image_rows, model, tok, args=args)
    with torch.inference_mode():
        rows = run_items(dataset, indices, predict, args, rank, world)
    rows = gather(rows)
    if rank != 0:
        return
    if submission is not None:
        result = {"submission": zip_submission(args.out_dir), "expressions": len(rows), "scored_by": SUBMISSIONS[args.dataset][2]}
    elif args.dataset == "gcg":
        result = metrics.gcg_summary(rows, dataset.mask_gt_path)
    else:
        result = metrics.summarize(rows, is_video)
        if args.dataset.startswith("synthetic"):
            result["by_kind"] = by_kind(rows, is_video)
    elapsed = time.time() - start
    result.update(dataset=args.dataset, split=args.split, ckpt=args.ckpt, mba=model.cfg.mba, items=n)
    speed = {"items_per_s": n / max(elapsed, 1e-9), "seconds": elapsed, "peak_host_gib": peak_host_memory_gib()}
    with open(os.path.join(args.out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(args.out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out_dir, "speed.json"), "w") as f:  # apart: metrics.json is the same on every re-run
        json.dump(speed, f, indent=2)
    print(format_metrics({**result, **speed}))
    print(f"wrote {os.path.join(args.out_dir, 'metrics.json')} and speed.json")
    if submission is not None:
        print(f"{args.split} has no ground truth: wrote {result['submission']} ({len(rows)} expressions); score it with {result['scored_by']}")
    if common.WARNINGS:
        print("data problems handled:", dict(common.WARNINGS))
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths, checkpoints, images or data: one line, no traceback
        raise SystemExit(f"eval.py: {e}") from None

