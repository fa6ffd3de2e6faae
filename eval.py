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


def item_groups(dataset, n):
    """The first n items grouped by the image or video they share (RefCOCO's sentences of one image, a video's
    expressions), in order of first appearance; every other item is its own group."""
    groups = {}
    for i in range(n):
        if isinstance(dataset, data.RefCOCODataset):
            key = ("image", dataset.items[i][0]["image_id"])
        elif isinstance(dataset, data.VideoRefDataset):
            key = ("video", dataset.items[i]["video"])
        else:
            key = ("item", i)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def gather(obj):
    """All ranks' {item: rows} merged (identity without torchrun)."""
    if not dist.is_initialized():
        return obj
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return {i: rows for part in parts for i, rows in part.items()}


RUN_FIELDS = ("dataset", "split", "ckpt", "mba", "limit", "num_samples", "force_seg", "max_new_tokens", "dtype", "bert_dir",
              "share", "batch_size", "keyframes", "sam2_ckpt")


def run_items(dataset, groups, predict, args, rank, world):
    """{item: rows} for this rank's groups (every world-th, from rank), predict(samples) giving each sample's rows.
    Each item's rows are appended to OUT_DIR/progress.rank{r}_of_{w}.jsonl as they are made; with --resume the
    items already there are read back instead of predicted again, so a killed run continues where it stopped."""
    path = os.path.join(args.out_dir, f"progress.rank{rank}_of_{world}.jsonl")
    identity = {name: getattr(args, name) for name in RUN_FIELDS}
    done = read_progress(path, identity) if args.resume else {}
    mine = groups[rank::world]
    if done and rank == 0:
        print(f"--resume: {len(done)} of {sum(map(len, mine))} items read back from {path}")
    with open(path, "a" if done else "w") as f, tqdm(total=sum(map(len, mine)), desc="eval", disable=args.quiet, unit="item") as bar:
        if not done:
            f.write(json.dumps({"run": identity}) + "\n")
        bar.update(sum(i in done for group in mine for i in group))
        for group in mine:
            todo = [i for i in group if i not in done]
            if not todo:
                continue
            for i, rows in zip(todo, predict([dataset[i] for i in todo])):
                done[i] = rows
                f.write(json.dumps({"item": i, "rows": rows}) + "\n")
            f.flush()
            bar.update(len(todo))
    return {i: done[i] for group in mine for i in group}


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


def image_rows(model, tok, samples, args):
    """Items of one image -> per item a row per expression: id, expr, I, U, area ratio, missing (+ outcome on a generated scene).

    --share: the expressions share the image's work (SALMA.segment_image_many); else each runs alone (segment_image).
    """
    image, exprs = samples[0]["frames"][0], [expr for sample in samples for expr in sample["exprs"]]
    if args.share:
        preds, _, missing = model.segment_image_many(image, exprs, tok, batch_size=args.batch_size, **generation(args))
    else:
        preds, missing = [], []
        for expr in exprs:
            maps = {}
            preds.append(model.segment_image(image, expr, tok, maps=maps, **generation(args)))
            missing.append(maps.get("no_seg", False))  # the answer had no [SEG]: no prediction
    results, e = [], 0
    for sample in samples:
        rows, object_masks = [], None  # a generated scene: its objects' masks (K, H, W), to tell which a mask took
        if sample.get("objects"):
            object_masks = testbed.render(sample["objects"], image.size)[1].numpy()
        for k, expr in enumerate(sample["exprs"]):
            gt, pred, lost = sample["masks"][k, 0].numpy(), preds[e].cpu().numpy(), bool(missing[e])
            inter, union = metrics.intersection_union(None if lost else pred, gt)
            rows.append({"id": sample["id"], "expr": expr, "I": inter, "U": union, "area": float(gt.mean()), "missing": lost})
            if object_masks is not None:
                rows[-1]["outcome"] = mask_outcome(pred & (not lost), object_masks, sample["targets"][k])
            e += 1
        results.append(rows)
    return results


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


def video_rows(model, tok, samples, args, submission=None, propagator=None):
    """Items of one video -> per item a row per expression with J and F (ReVOS: also A, R, type_id), or, on a split
    without ground truth, its masks written as submission PNGs: submission = (folder, pixel value).

    Frames stream: each frame's masks are scored or written as they are made, never all held. --share: the
    expressions share the video's work (SALMA.answer_many + salma.track); else each runs alone (segment_video).
    --keyframes and propagator (--sam2_ckpt's SAM-2) choose Sa2VA's or Sa2VA-i's video protocol (salma.track).
    """
    load_frame, num_frames = video_frames(samples[0])
    uniform = args.keyframes == "uniform"
    pairs = [(sample, k) for sample in samples for k in range(len(sample["exprs"]))]  # (item, its k-th expression)
    exprs = [sample["exprs"][k] for sample, k in pairs]
    scores = [metrics.FrameScores() for _ in pairs]
    if args.share:
        keyframes = [load_frame(t) for t in salma.keyframe_indices(num_frames, model.cfg.video_frames, uniform)]
        answers = model.answer_many(keyframes, exprs, tok, is_video=True, batch_size=args.batch_size, **generation(args))
        del keyframes
        for t, masks in enumerate(salma.track(model, load_frame, num_frames, answers, args.batch_size, uniform=uniform,
                                              propagator=propagator)):
            for (sample, k), score, mask in zip(pairs, scores, masks):
                score_frame(sample, k, t, mask.numpy(), score, submission)
    else:
        for (sample, k), score, expr in zip(pairs, scores, exprs):
            frames = salma.segment_video(model, load_frame, num_frames, expr, tok, uniform=uniform, propagator=propagator, **generation(args))
            for t, mask in enumerate(frames):
                score_frame(sample, k, t, mask.numpy(), score, submission)
    rows = {id(sample): [] for sample in samples}
    for (sample, k), score in zip(pairs, scores):
        row = {"id": f"{sample['id']}/{k}", "expr": sample["exprs"][k]}
        if submission is not None:
            row["frames"] = num_frames
        else:
            row.update(score.result())
            if sample.get("type_id") is not None:
                row["type_id"] = sample["type_id"]
        rows[id(sample)].append(row)
    return [rows[id(sample)] for sample in samples]


def score_frame(sample, k, t, pred, score, submission):
    """Frame t's predicted mask (H, W) for a video item's k-th expression: scored against its ground truth, or written
    as a submission PNG (folder/<video>/<exp_id>/<frame>.png, single-channel 0 / value)."""
    if submission is not None:
        folder, value = submission
        out = os.path.join(folder, sample["video"], sample["exp_id"])
        os.makedirs(out, exist_ok=True)
        Image.fromarray(pred.astype(np.uint8) * value).save(os.path.join(out, sample["frame_names"][t] + ".png"))
        return
    gt = sample["masks"][k, t].numpy() if "masks" in sample else sample["load_masks"]([t])[0].numpy()
    foreground = sample["load_foreground"]([t])[0].numpy() if sample.get("load_foreground") is not None else None
    score.add(pred, gt, foreground)


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
    if z_seg.shape[0] == 0:
        return text, torch.zeros(0, h, w, dtype=torch.bool)
    with model.autocast():
        enc = model.grounding.encode_image(model.sam_input([image]))
        return text, model.decode_prompts(enc, z_seg, hidden, valid, (h, w))


def gcg_rows(model, tok, samples, args, similarity=None):
    """Caption each image with its phrases' masks -> per item its row (caption, phrases, RLEs, mIoU, matches)."""
    return [[gcg_row(model, tok, sample, args, similarity)] for sample in samples]


def gcg_row(model, tok, sample, args, similarity=None):
    """Caption one image with its phrases' masks -> its row."""
    text, masks = segment_answer(model, tok, sample["frames"][0], data.GCG_QUESTION, args.max_new_tokens)
    caption, phrases = metrics.parse_gcg_answer(text)
    pred = [m.cpu().numpy() for m in masks]
    gt = [m.numpy() for m in sample["masks"][:, 0]]
    matches = None
    if similarity is not None:
        sims = similarity(sample["labels"], phrases) if phrases and sample["labels"] else [[0.0] * len(pred)] * len(gt)
        matches = metrics.gcg_matches(gt, pred[: len(phrases)], sims) if pred and gt else 0
    return {"id": sample["id"], "caption": caption, "phrases": phrases, "reference": sample["caption"],
            "pred_masks": [metrics.coco_rle(m) for m in pred], "miou": metrics.gcg_miou(pred, gt),
            "gt_labels": len(sample["labels"]), "matches": matches}


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
DEFAULT_BATCH = 8  # --batch_size: see README, Evaluation speed
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
    p.add_argument("--share", type=common.parse_bool, default=True, metavar="BOOL",
                   help="the expressions of one image or video share its work: InternViT, the prompt's KV cache and SAM-2's "
                        "encoder run once for all (default True); False: each expression alone, as Sa2VA's evaluation runs")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH, help=f"--share: expressions answered, decoded and tracked "
                   f"together (default {DEFAULT_BATCH}; 1: one at a time, still sharing)")
    p.add_argument("--keyframes", default="first", choices=["first", "uniform"],
                   help="video frames the MLLM sees and SAM-2 decodes with [SEG]: the first five (default, Sa2VA) or five "
                        "spread over the video (uniform, Sa2VA-i)")
    p.add_argument("--sam2_ckpt", default="", help="a SAM-2 .pt (e.g. the original sam2_hiera_large.pt) that tracks videos: the "
                   "keyframes' [SEG] masks become its mask prompts (Sa2VA-i); '' = the model's own SAM-2 tracks (Sa2VA)")
    p.add_argument("--resume", action="store_true", help="continue a killed run in the same --out_dir: the items its "
                   "progress files hold are read back, the rest predicted (same flags required; the same metrics.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.split = args.split or data.EVAL_SPLITS.get(args.dataset, "val")
    if args.dataset.startswith("synthetic") and args.split != "val":
        p.error(f"--split={args.split}: the generated sets have one split, val")
    for name, least in (("num_samples", 1), ("limit", 0), ("visualize", 0), ("max_new_tokens", 1), ("batch_size", 1)):
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
    if args.dataset == "gcg":
        similarity = metrics.bert_similarity(args.bert_dir) if args.bert_dir else None
        predict = partial(gcg_rows, model, tok, args=args, similarity=similarity)
    elif is_video:
        propagator = checkpoint.load_propagator(args.sam2_ckpt, model) if args.sam2_ckpt else None
        predict = partial(video_rows, model, tok, args=args, submission=submission, propagator=propagator)
    else:
        predict = partial(image_rows, model, tok, args=args)
    with torch.inference_mode():
        done = gather(run_items(dataset, item_groups(dataset, n), predict, args, rank, world))
    rows = [row for i in sorted(done) for row in done[i]]  # item order: the same metrics on any number of ranks
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

