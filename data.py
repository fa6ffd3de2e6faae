"""
data: the datasets in their official layouts, the rest of Sa2VA's training mix, mixing and sampling.

  from data import build_dataset, build_train_mix
  ds = build_dataset("synthetic", split="val")                      # generated (testbed.py), deterministic by seed
  ds = build_dataset("refcocog", root="data/", split="val")         # refer-API pickles + COCO images
  mix = build_train_mix("refcoco:4,mevis:4,revos:10", root="data/")  # the paper's repeat factors

Every dataset yields the same dict: {"id", "frames": [PIL RGB] (T), "exprs": [str] (N),
"masks": bool (N, T, H, W), "is_video", "conversation"}; long evaluation videos give
"frame_paths" (read lazily with load_image) and "load_masks" (None on a split without ground truth)
instead of frames and masks.
The rest of the training mix (GCG, SA-V, Osprey, Video-ChatUniVi) also gives "turns" [(question,
answer)] (the k-th [SEG] of the answers goes with the k-th mask) and, for Osprey, "prompt_masks" (n, H, W).
"""

import math
import os
import pickle
import random

import av
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import testbed
from common import load_image, read_json_file, sample_seed, warn_once
from inputs import SEG_ANSWERS


def read_json(path):
    """A dataset's JSON file; one error naming it when missing (with where to look) or malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; check --data_root and the dataset layout (docs/data.md)")
    return read_json_file(path)


# ---------------------------------------------------------------------------------------------
# COCO masks, decoded by pycocotools as the refer API, Sa2VA and the MeViS/ReVOS evaluators do


def compressed(rle):
    """A COCO RLE with its counts as pycocotools takes them: uncompressed lists converted, strings as bytes."""
    if isinstance(rle["counts"], list):
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": rle["size"], "counts": rle["counts"].encode() if isinstance(rle["counts"], str) else rle["counts"]}


def coco_mask(segmentation, h, w):
    """A COCO segmentation -> bool mask (H, W), as refer.py's getMask: frPyObjects -> decode -> union of parts.

    Polygons (a list of [x, y, ...]), one RLE or a list of RLEs (counts list or string); empty -> empty.
    """
    if not segmentation:
        warn_once("annotation with an empty segmentation (scored as an empty mask)", f"{h}x{w} image")
        return torch.zeros(h, w, dtype=torch.bool)
    if isinstance(segmentation, dict):
        segmentation = [segmentation]
    if isinstance(segmentation[0], dict):
        rles = [compressed(r) for r in segmentation]
    else:
        rles = mask_utils.frPyObjects(segmentation, h, w)
    return torch.from_numpy(mask_utils.decode(rles).any(axis=2))  # decode: (H, W, parts)


# ---------------------------------------------------------------------------------------------
# official readers


class RefCOCODataset(torch.utils.data.Dataset):
    """RefCOCO / RefCOCO+ / RefCOCOg in the refer-API layout.

    {root}/{name}/instances.json, {root}/{name}/refs(unc).p (refcocog: refs(umd).p),
    images at {root}/coco/train2014/<file_name>. per_expression=True: one item per sentence (eval);
    else one item per ref with its sentences (training).
    """

    def __init__(self, root, name="refcocog", split="val", per_expression=True, max_chars=400):
        folder = os.path.join(root, name)
        refs_path = os.path.join(folder, "refs(umd).p" if name == "refcocog" else "refs(unc).p")
        if not os.path.isfile(refs_path):
            raise FileNotFoundError(f"{refs_path}: not found; put the refer-API files of {name} under {folder}")
        with open(refs_path, "rb") as f:
            refs = [r for r in pickle.load(f) if r["split"] == split]
        if not refs:
            raise ValueError(f"{refs_path}: no refs in split {split!r}")
        instances = read_json(os.path.join(folder, "instances.json"))
        self.images = {im["id"]: im for im in instances["images"]}
        self.anns = {a["id"]: a for a in instances["annotations"]}
        self.image_dir, self.max_chars = os.path.join(root, "coco", "train2014"), max_chars
        self.items = []
        for ref in refs:
            if ref["ann_id"] not in self.anns or ref["image_id"] not in self.images:
                warn_once("annotation points at nothing", f"{refs_path}: ref {ref['ref_id']}")
                continue
            sents = [s["sent"] for s in ref["sentences"]]
            self.items += [(ref, [s]) for s in sents] if per_expression else [(ref, sents)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        ref, sents = self.items[index]
        info = self.images[ref["image_id"]]
        image = load_image(os.path.join(self.image_dir, info["file_name"]))
        mask = coco_mask(self.anns[ref["ann_id"]]["segmentation"], info["height"], info["width"])
        exprs = [truncate(s, self.max_chars) for s in sents]
        return {"id": f"{ref['ref_id']}", "frames": [image], "exprs": exprs,
                "masks": mask[None, None].expand(len(exprs), 1, -1, -1).clone(), "is_video": False, "conversation": None}


def truncate(text, max_chars):
    """Cut an over-long expression (counted) so it fits the context."""
    if len(text) > max_chars:
        warn_once("expression truncated", f"{len(text)} > {max_chars} chars")
        return text[:max_chars]
    return text


class VideoRefDataset(torch.utils.data.Dataset):
    """Referring video items (one per expression): frames sampled for training, all frames lazily for eval.

    items: dicts with id, video, exp_id, frames (names), frame_paths, expr, masks(frame_indices) -> bool
    (T, H, W) or masks = None on a split without ground truth; ReVOS items also carry type_id and
    foreground(frame_indices) -> bool (T, H, W).
    """

    def __init__(self, items, num_frames=5, train=True, seed=0):
        self.items, self.num_frames, self.train, self.seed = items, num_frames, train, seed

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        item = self.items[index]
        if not self.train:
            return {"id": item["id"], "video": item["video"], "exp_id": item["exp_id"], "frame_names": item["frames"],
                    "frame_paths": item["frame_paths"], "exprs": [item["expr"]], "load_masks": item["masks"],
                    "type_id": item.get("type_id"), "load_foreground": item.get("foreground"),
                    "is_video": True, "conversation": None}
        if item["masks"] is None:
            raise ValueError(f"{item['id']}: this split has no ground-truth masks; it cannot be used for training")
        rng = random.Random(sample_seed(self.seed, index))
        n = len(item["frame_paths"])
        chosen = sorted(rng.sample(range(n), min(self.num_frames, n)))
        frames = [load_image(item["frame_paths"][t]) for t in chosen]
        return {"id": item["id"], "frames": frames, "exprs": [item["expr"]], "masks": item["masks"](chosen)[None],
                "is_video": True, "conversation": None}


def frame_size(path):
    """(H, W) of an image, read from its header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found; check --data_root and the dataset layout (docs/data.md)")
    with Image.open(path) as image:
        return image.height, image.width


def palette_masks(ann_dir, frames, obj_id):
    """Loader of (T, H, W) masks of one object id from palette PNGs (index = object id)."""
    def load(indices):
        out = []
        for t in indices:
            path = os.path.join(ann_dir, frames[t] + ".png")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: annotation not found")
            with Image.open(path) as image:
                out.append(torch.from_numpy(np.array(image) == int(obj_id)))
        return torch.stack(out)
    return load


def rle_union_masks(mask_dict, anno_ids, video, source):
    """Loader of (T, H, W) masks: per frame, the union of the RLEs of anno_ids; an absent object (None) is empty.

    mask_dict[anno_id] lists one RLE (or a list of RLEs) per frame in the order of the meta file's "frames".
    """
    for a in anno_ids:
        if str(a) not in mask_dict:
            raise ValueError(f"{source}: anno_id {a} is not in it")

    def load(indices):
        out = []
        for t in indices:
            h, w = frame_size(video["paths"][t])
            mask = torch.zeros(h, w, dtype=torch.bool)
            for a in anno_ids:
                rle = mask_dict[str(a)][video["positions"][t]]
                if rle:
                    mask |= coco_mask(rle, h, w)
            out.append(mask)
        return torch.stack(out)
    return load


def load_mask_dict(path):
    """mask_dict.json (MeViS, ReVOS) or mask_dict.pkl (Sa2VA's Ref-DAVIS17): anno_id -> one RLE per frame."""
    if path.endswith(".pkl"):
        with open(path, "rb") as f:
            return pickle.load(f)
    return read_json(path)


def video_items(meta, image_dir, masks_of, **extra_of):
    """One item per expression of a meta_expressions {"videos": ...}, frames in sorted order as the official
    loaders read them. masks_of(video, exp_id, exp) -> mask loader or None; extra_of[key](video, exp) -> value.
    video: {"vid", "frames" (sorted names), "paths", "positions" (index of each frame in the meta's list)}."""
    items = []
    for vid, entry in sorted(meta["videos"].items()):
        frames = sorted(entry["frames"])
        video = {"vid": vid, "frames": frames, "paths": [os.path.join(image_dir, vid, f + ".jpg") for f in frames],
                 "positions": [entry["frames"].index(f) for f in frames]}
        for exp_id, exp in sorted(entry["expressions"].items(), key=lambda kv: int(kv[0])):
            item = {"id": f"{vid}/{exp_id}", "video": vid, "exp_id": exp_id, "frames": frames, "frame_paths": video["paths"],
                    "expr": exp["exp"], "masks": masks_of(video, exp_id, exp)}
            item.update({key: f(video, exp) for key, f in extra_of.items()})
            items.append(item)
    return items


def expression_counter(meta):
    """{(vid, exp_id): n}: the anno_id Sa2VA/VISA's mask_dict.pkl gives each expression (videos and exp_ids
    string-sorted, counted from 0; Sa2VA tools/eval/eval_davis.py get_meta_exp)."""
    pairs = [(vid, e) for vid in sorted(meta["videos"]) for e in sorted(meta["videos"][vid]["expressions"])]
    return {pair: n for n, pair in enumerate(pairs)}


def ytvos_items(root, split):
    """Ref-YouTube-VOS / Ref-DAVIS17: {root}/meta_expressions/{split}/meta_expressions.json,
    {root}/{split}/JPEGImages/<vid>/<frame>.jpg and the ground truth either as palette PNGs
    {root}/{split}/Annotations/<vid>/<frame>.png (the challenge's and ReferFormer's layout) or as
    {root}/{split}/mask_dict.pkl (Sa2VA's and VISA's). Ref-YouTube-VOS valid: the challenge's file also lists
    the test videos; those of meta_expressions/test are dropped, as ReferFormer's inference_ytvos.py does."""
    meta = read_json(os.path.join(root, "meta_expressions", split, "meta_expressions.json"))
    pkl_path, ann_root = os.path.join(root, split, "mask_dict.pkl"), os.path.join(root, split, "Annotations")
    if os.path.isfile(pkl_path):
        mask_dict, anno_ids = load_mask_dict(pkl_path), expression_counter(meta)  # counted over the whole file
        masks_of = lambda video, exp_id, exp: rle_union_masks(mask_dict, [anno_ids[video["vid"], exp_id]], video, pkl_path)
    else:
        has_masks = lambda video, exp: os.path.isdir(os.path.join(ann_root, video["vid"])) and "obj_id" in exp
        masks_of = lambda video, exp_id, exp: (palette_masks(os.path.join(ann_root, video["vid"]), video["frames"], exp["obj_id"])
                                               if has_masks(video, exp) else None)
    test_path = os.path.join(root, "meta_expressions", "test", "meta_expressions.json")
    if split != "test" and os.path.isfile(test_path):
        test_videos = set(read_json(test_path)["videos"])
        meta = {"videos": {v: x for v, x in meta["videos"].items() if v not in test_videos}}
    image_dir = os.path.join(root, split, "JPEGImages")
    absent = [v for v in sorted(meta["videos"]) if not os.path.isdir(os.path.join(image_dir, v))]
    if absent:
        raise FileNotFoundError(f"{os.path.join(image_dir, absent[0])}: not found, nor the frames of {len(absent) - 1} other "
                                f"videos; Ref-YouTube-VOS valid also lists the test videos: keep {test_path} so they are dropped")
    return video_items(meta, image_dir, masks_of)


def anno_masks(mask_path):
    """masks_of for MeViS/ReVOS: the union over an expression's anno_ids from mask_path, None when it is absent."""
    mask_dict = load_mask_dict(mask_path) if os.path.isfile(mask_path) else None
    return lambda video, exp_id, exp: rle_union_masks(mask_dict, exp["anno_id"], video, mask_path) if mask_dict else None


def mevis_items(root, split):
    """MeViS: {root}/{split}/meta_expressions.json, mask_dict.json (train, valid_u; valid has none) and
    JPEGImages/<vid>/<frame>.jpg; an expression's ground truth is the union over its anno_ids."""
    folder = os.path.join(root, split)
    meta = read_json(os.path.join(folder, "meta_expressions.json"))
    return video_items(meta, os.path.join(folder, "JPEGImages"), anno_masks(os.path.join(folder, "mask_dict.json")))


def revos_items(root, split):
    """ReVOS as released (cilinyan/ReVOS-api README): {root}/JPEGImages/, mask_dict.json,
    mask_dict_foreground.json and meta_expressions_{split}_.json at the root. Items carry type_id
    (0 referring, 1 reasoning) and foreground(frame_indices): the video's foreground masks, for R."""
    meta = read_json(os.path.join(root, f"meta_expressions_{split}_.json"))
    fg_path = os.path.join(root, "mask_dict_foreground.json")
    foreground = read_json(fg_path) if os.path.isfile(fg_path) else None

    def foreground_of(video, exp):
        if foreground is None:
            return None
        if video["vid"] not in foreground:
            raise ValueError(f"{fg_path}: video {video['vid']} is not in it")
        return rle_union_masks({"fg": foreground[video["vid"]]["masks_rle"]}, ["fg"], video, fg_path)

    return video_items(meta, os.path.join(root, "JPEGImages"), anno_masks(os.path.join(root, "mask_dict.json")),
                       type_id=lambda video, exp: exp.get("type_id"), foreground=foreground_of)


class LLaVAChatDataset(torch.utils.data.Dataset):
    """LLaVA-1.5 instruction data as released: llava_v1_5_mix665k.json, a list of {"id", "image" (optional),
    "conversations": [{"from", "value"}]}, images relative to image_root (coco/train2017, gqa/images, ...).

    As LLaVA's train.py: a record without "image" is text-only chat (no frames); in a record with one, the
    "<image>" tag goes to the front of the first turn (where the released file has it; added if absent). No masks.
    """

    def __init__(self, json_path, image_root):
        self.records, self.image_root = read_json(json_path), image_root

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        rec = self.records[index]
        conversation = [dict(turn) for turn in rec["conversations"]]
        frames = []
        if "image" in rec:
            frames = [load_image(os.path.join(self.image_root, rec["image"]))]
            for turn in conversation:
                turn["value"] = turn["value"].replace("<image>", "").strip()
            conversation[0]["value"] = "<image>\n" + conversation[0]["value"]
        h, w = (frames[0].height, frames[0].width) if frames else (1, 1)
        return {"id": str(rec.get("id", index)), "frames": frames, "exprs": [],
                "masks": torch.zeros(0, len(frames), h, w, dtype=torch.bool), "is_video": False,
                "conversation": conversation}


# the official name of each dataset's evaluation split (and its files)
EVAL_SPLITS = {"synthetic": "val", "synthetic_images": "val", "refcoco": "val", "refcoco+": "val", "refcocog": "val", "ytvos": "valid",
               "davis17": "valid", "mevis": "valid_u", "revos": "valid", "llava": "train"}
LLAVA_FILE = "llava_v1_5_mix665k.json"


def build_dataset(name, root="", split="", train=False, seed=0, num_samples=None):
    """One dataset by name: synthetic, synthetic_images, refcoco, refcoco+, refcocog, ytvos, davis17, mevis, revos, llava, or MIX_NAMES.

    split "" = the official evaluation split (EVAL_SPLITS), or train with train=True.
    """
    if name not in EVAL_SPLITS and name not in MIX_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose {', '.join([*EVAL_SPLITS, *MIX_NAMES])}")
    if name in ("synthetic", "synthetic_images"):  # synthetic_images: no videos (a quarter are videos otherwise)
        n = num_samples or (10_000 if train else 200)
        return testbed.split("train" if train else "val", n, seed, video_fraction=0.25 if name == "synthetic" else 0.0)
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"--data_root {root!r} is not a directory; {name} needs its files there (docs/data.md)")
    if name in MIX_NAMES:  # training sets only
        return build_mix_dataset(name, root, seed)
    split = split or ("train" if train else EVAL_SPLITS[name])
    if name in ("refcoco", "refcoco+", "refcocog"):
        return RefCOCODataset(root, name, split, per_expression=not train)
    if name == "llava":
        return LLaVAChatDataset(os.path.join(root, "llava", LLAVA_FILE), os.path.join(root, "llava"))
    readers = {"ytvos": ytvos_items, "davis17": ytvos_items, "mevis": mevis_items, "revos": revos_items}
    return VideoRefDataset(readers[name](os.path.join(root, name), split), train=train, seed=seed)


# ---------------------------------------------------------------------------------------------
# the rest of Sa2VA's training mix, in Sa2VA's layouts under --data_root: grounded captions (GCG),
# SA-V masklets with object expressions, Osprey-724k region conversations, Video-ChatUniVi


def read_video_frames(path, indices):
    """RGB PIL frames at the given decode-order indices of a video file (PyAV), or one clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video not found; check --data_root and the dataset layout (docs/data.md)")
    wanted, got, count = set(indices), {}, 0
    try:
        with av.open(path) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 in wanted:
                    got[count - 1] = frame.to_image()
                if len(got) == len(wanted):
                    break
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot read video ({e})") from None
    if len(got) < len(wanted):
        raise ValueError(f"{path}: {count} frames, but frame {max(wanted)} is needed")
    return [got[t] for t in indices]


def count_video_frames(path):
    """Number of frames of a video file (from the stream header, else by counting packets)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video not found; check --data_root and the dataset layout (docs/data.md)")
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            return stream.frames or sum(1 for p in container.demux(stream) if p.size)
    except av.error.FFmpegError as e:
        raise ValueError(f"{path}: cannot read video ({e})") from None


def merged_turns(messages, first_prefix="<image>"):
    """[(user, answer)] of LLaVA-style messages as Sa2VA joins them: leading answers dropped,
    consecutive questions concatenated; first_prefix opens the first question."""
    turns, question = [], ""
    while messages and messages[0]["from"] == "gpt":
        messages = messages[1:]
    for msg in messages:
        if msg["from"] == "human":
            question += msg["value"]
        else:
            turns.append((question, msg["value"]))
            question = ""
    if turns:
        turns[0] = (first_prefix + turns[0][0], turns[0][1])
    return turns


# --- grounded caption generation (GLaMM's GCG sets, as Sa2VA trains on them)

GCG_QUESTIONS = [
    "Could you please give me a brief description of the image? Please respond with interleaved segmentation masks for the corresponding parts of the answer.",
    "Can you provide a brief description of the this image? Please output with interleaved segmentation masks for the corresponding phrases.",
    "Please briefly describe the contents of the image. Please respond with interleaved segmentation masks for the corresponding parts of the answer.",
    "Could you give a brief explanation of what can be found within this picture? Please output with interleaved segmentation masks for the corresponding phrases.",
    "Could you give me an brief explanation of this picture? Please respond with interleaved segmentation masks for the corresponding phrases.",
    "Could you provide me with a briefly analysis of this photo? Please output with interleaved segmentation masks for the corresponding parts of the answer.",
]
# Sa2VA's GCG evaluation asks the first question, with five spaces inside it (a line continuation in its string)
GCG_QUESTION = GCG_QUESTIONS[0].replace("interleaved segmentation", "interleaved     segmentation")
GCG_FILES = {  # name: (annotation file, image folder, repeats within gcg) under glamm_data/, as Sa2VA's configs
    "gcg_refcocog": ("annotations/RefCOCOg_GCG_train.json", "images/coco2014/train2014", 1),
    "gcg_grandf": ("annotations/GranDf_HA_GCG_train.json", "images/grandf/train", 10),  # GranDf 10x the others
    "gcg_flickr": ("annotations/flickr_mergedGT_GCG_train.json", "images/flickr30k/Flickr30K", 1),
    "gcg_psg": ("annotations/OpenPsgGCG_train.json", "images/coco2017", 1),
}


def tag_caption(caption, spans):
    """The GCG answer: each phrase (start, end) becomes '<p> phrase </p> [SEG]' in the caption."""
    for start, end in sorted(spans, reverse=True):
        caption = f"{caption[:start]}<p> {caption[start:end]} </p> [SEG]{caption[end:]}"
    return caption


def refcocog_gcg_records(path):
    """RefCOCOg-GCG: [{id: {img_file_name, caption, refs: [{sentence, segmentation (polygons)}]}}].

    The caption is lower-cased, a phrase is kept where it occurs in it, and a phrase overlapping
    the next one ends one character before it, as Sa2VA's parser does (in caption order here).
    """
    records = []
    for entry in read_json(path):
        (image_id, rec), = entry.items()
        caption = rec["caption"].strip('"').strip().lower()
        phrases = []
        for ref in rec["refs"]:
            start = caption.find(ref["sentence"].lower())
            if start >= 0:
                phrases.append([start, start + len(ref["sentence"]), ref["segmentation"]])
        phrases.sort(key=lambda p: p[0])
        for a, b in zip(phrases, phrases[1:]):
            if a[1] >= b[0]:
                a[1] = b[0] - 1
        records.append({"id": image_id, "image": rec["img_file_name"], "caption": caption, "phrases": phrases})
    return records


def grandf_gcg_records(path):
    """GranDf / OpenPSG GCG: [{file_name, caption, groundings: {phrase: {token_positives, rle_masks}}}]."""
    records = []
    for rec in read_json(path):
        phrases = [[*g["token_positives"], g["rle_masks"]] for g in rec["groundings"].values() if g is not None]
        records.append({"id": str(rec.get("image_id", rec["file_name"])), "image": rec["file_name"],
                        "caption": rec["caption"].strip('"').strip(), "phrases": sorted(phrases, key=lambda p: p[0])})
    return records


def flickr_gcg_records(path):
    """Flickr30k GCG (COCO layout): images with a caption; annotations with tokens_positive and sam_mask.

    As Sa2VA: captions under 3 words and images under 32 px are left out, boxes outside the image
    or of no area are skipped, each box grounds its first span.
    """
    coco = read_json(path)
    anns = {}
    for ann in coco["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    records = []
    for info in coco["images"]:
        h, w = int(info["height"]), int(info["width"])
        if len(info["caption"].split(" ")) < 3 or min(h, w) < 32:
            warn_once("GCG image left out (short caption or tiny image)", f"{path}: image {info['id']}")
            continue
        phrases = []
        for ann in anns.get(info["id"], []):
            x, y, bw, bh = ann["bbox"]
            inside = max(0, min(x + bw, w) - max(x, 0)) * max(0, min(y + bh, h) - max(y, 0))
            if ann.get("ignore", False) or inside == 0 or ann["area"] <= 0 or bw < 1 or bh < 1:
                continue
            phrases.append([*ann["tokens_positive"][0], [ann["sam_mask"]]])
        records.append({"id": str(info["id"]), "image": info["file_name"], "caption": info["caption"],
                        "phrases": sorted(phrases, key=lambda p: p[0])})
    return records


class GCGDataset(torch.utils.data.Dataset):
    """Grounded captions: one question, a caption whose phrases are each followed by their [SEG],
    one mask per phrase (the union of its parts) in caption order."""

    def __init__(self, records, image_dir, source, seed=0):
        self.records = [r for r in records if r["phrases"]]
        if len(self.records) < len(records):
            warn_once("GCG caption without grounded phrases left out", f"{source}: {len(records) - len(self.records)} captions")
        self.image_dir, self.seed = image_dir, seed

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        rec = self.records[index]
        rng = random.Random(sample_seed(self.seed, index))
        image = load_image(os.path.join(self.image_dir, rec["image"]))
        masks = torch.stack([coco_mask(parts, image.height, image.width) for _, _, parts in rec["phrases"]])
        answer = tag_caption(rec["caption"], [(s, e) for s, e, _ in rec["phrases"]])
        return {"id": rec["id"], "frames": [image], "exprs": [rec["caption"][s:e] for s, e, _ in rec["phrases"]],
                "masks": masks[:, None], "is_video": False, "conversation": None,
                "turns": [("<image>\n" + rng.choice(GCG_QUESTIONS), answer)]}


def build_gcg(name, root, seed):
    """One GCG set (gcg_refcocog, gcg_grandf, gcg_flickr, gcg_psg) from {root}/glamm_data/."""
    ann, images, _ = GCG_FILES[name]
    path = os.path.join(root, "glamm_data", ann)
    parse = {"gcg_refcocog": refcocog_gcg_records, "gcg_flickr": flickr_gcg_records}.get(name, grandf_gcg_records)
    return GCGDataset(parse(path), os.path.join(root, "glamm_data", images), path, seed)


class GCGEvalDataset(torch.utils.data.Dataset):
    """GranDf's GCG val/test as GLaMM / Sa2VA evaluate it: glamm_data/annotations/gcg_val_test/
    {split}_gcg_coco_caption_gt.json (images; one caption + phrase labels each) and
    {split}_gcg_coco_mask_gt.json (COCO RLE masks), images in glamm_data/images/grandf/val_test/."""

    def __init__(self, root, split="val"):
        folder = os.path.join(root, "glamm_data", "annotations", "gcg_val_test")
        self.mask_gt_path = os.path.join(folder, f"{split}_gcg_coco_mask_gt.json")
        captions, masks = read_json(os.path.join(folder, f"{split}_gcg_coco_caption_gt.json")), read_json(self.mask_gt_path)
        self.images = captions["images"]
        self.captions = {a["image_id"]: a for a in captions["annotations"]}
        self.masks = {}
        for ann in masks["annotations"]:
            self.masks.setdefault(ann["image_id"], []).append(ann["segmentation"])
        self.image_dir = os.path.join(root, "glamm_data", "images", "grandf", "val_test")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        info = self.images[index]
        image = load_image(os.path.join(self.image_dir, info.get("file_name", f"{info['id']}.jpg")))
        gt = [coco_mask(rle, image.height, image.width) for rle in self.masks.get(info["id"], [])]
        caption = self.captions[info["id"]]
        return {"id": info["id"], "frames": [image], "exprs": [], "is_video": False, "conversation": None,
                "caption": caption["caption"], "labels": caption["labels"],
                "masks": torch.stack(gt)[:, None] if gt else torch.zeros(0, 1, image.height, image.width, dtype=torch.bool)}


# --- SA-V masklets with object expressions (Sa2VA's Ref-SAV.json, named sam_v_final_v3.json in its first configs)

SAV_QUESTION = "Please segment the object according to the description: {}"


def sav_paths(video_dir, entry):
    """The video and masklet files of an entry; Sa2VA's files repeat 'sav_xxx/' before 'sav_train/', dropped if absent."""
    paths = [entry["video_path"], entry["anno_path"]]
    parts = paths[0].split("/")
    if not os.path.isfile(os.path.join(video_dir, paths[0])) and "sav_train" in parts:
        i = parts.index("sav_train")
        if 0 < i < len(parts) - 1 and parts[i - 1] == parts[i + 1]:
            paths = ["/".join(p.split("/")[:i - 1] + p.split("/")[i:]) for p in paths]
    return [os.path.join(video_dir, p) for p in paths]


class SAVDataset(torch.utils.data.Dataset):
    """SA-V as Sa2VA trains on it: per video, 5 objects drawn with replacement, one question per object
    on its long expression ("formated"), 5 of the annotated frames (every 4th video frame)."""

    def __init__(self, expression_file, video_dir, seed=0, num_objects=5, num_frames=5):
        self.videos = read_json(expression_file)
        self.ids = list(self.videos)
        self.video_dir, self.seed, self.num_objects, self.num_frames = video_dir, seed, num_objects, num_frames

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        entry = self.videos[self.ids[index]]
        rng = random.Random(sample_seed(self.seed, index))
        video_path, anno_path = sav_paths(self.video_dir, entry)
        masklet = read_json(anno_path)["masklet"]  # per annotated frame, one RLE per object
        objects = [rng.choice(list(entry["objects"])) for _ in range(self.num_objects)]
        n = len(masklet)
        chosen = sorted(rng.sample(range(n), self.num_frames) if n > self.num_frames + 1 else rng.choices(range(n), k=self.num_frames))
        frames = read_video_frames(video_path, [4 * t for t in chosen])
        masks = torch.stack([torch.stack([coco_mask(masklet[t][int(o)], frames[0].height, frames[0].width) for t in chosen])
                             for o in objects])  # (objects, T, H, W)
        exprs = [entry["objects"][o]["formated"] for o in objects]
        turns = [(SAV_QUESTION.format(e), rng.choice(SEG_ANSWERS)) for e in exprs]
        turns[0] = ("<image>" + turns[0][0], turns[0][1])
        return {"id": self.ids[index], "frames": frames, "exprs": exprs, "masks": masks, "is_video": True,
                "conversation": None, "turns": turns}


# --- Osprey-724k: region conversations through Sa2VA's region prompts

OSPREY_FILES = {  # file under osprey-724k/Osprey-724K/: how its records read, as Sa2VA's configs
    "osprey_conversation.json": "conversation", "osprey_detail_description.json": "description",
    "osprey_short_form.json": "short", "osprey_part_level.json": "conversation",
    "osprey_lvis_positive_negative.json": "conversation",
}
OSPREY_IMAGE_DIRS = ["coco/train2014", "coco/val2014", "coco/train2017", "coco/val2017"]
OSPREY_SHORT = " Answer the question using a single word or phrase."
DETAILED_QUESTIONS = [  # Osprey's questions for its detailed descriptions (<region> -> region{i})
    "Can you provide me with a detailed description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail?",
    "What details can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image.",
    "Can you give me a detailed account of the region labeled as <region> in the picture?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail?",
    "What is the region outlined by <region> in the picture like? Could you give me a detailed description?",
    "Can you provide me with a detailed description of the region in the picture marked by <region>, please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail, please?",
    "What can you tell me about the region indicated by <region> in the image, exactly?",
    "I'd like to know more about the area in the photo labeled <region>, please. Can you give me a detailed description?",
    "Could you describe the region shown as <region> in the picture in great detail, please?",
    "What details can you give me about the region outlined by <region> in the photo, please?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image, please.",
    "Can you give me a detailed account of the region labeled as <region> in the picture, please?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail, please?",
    "What is the region outlined by <region> in the picture like, please? Could you give me a detailed description?",
    "Please describe the region <region> in the image in detail.",
    "Can you offer a thorough analysis of the region <region> in the image?",
    "Could you elaborate on the region highlighted by <region> in the picture provided?",
    "Please share more information about the zone emphasized with <region> in the photo.",
    "What insights can you give about the area denoted by <region> in the image presented?",
    "Can you share a comprehensive rundown of the region denoted by <region> in the presented image?",
    "I'd like to know more about the region highlighted by <region> in the picture provided.",
    "Work through the important details of the area <region> in the image.",
    "Illustrate the area represented by <region> through a descriptive explanation.",
    "Examine the region <region> closely and share its details.",
]


def no_angles(text):
    """Osprey's texts with '<' and '>' removed ('<region1>' -> 'region1'), as Sa2VA reads them."""
    return text.replace("<", "").replace(">", "")


class OspreyDataset(torch.utils.data.Dataset):
    """Osprey-724k records {file_name, height, width, annotation: [{segmentation}], conversations |
    description}: the regions enter as prompt_masks (Sa2VA's region prompt after the image)."""

    def __init__(self, json_path, image_dirs, kind, seed=0):
        self.records, self.image_dirs, self.kind, self.seed = read_json(json_path), image_dirs, kind, seed

    def __len__(self):
        return len(self.records)

    def turns(self, rec, rng):
        """(question, answer) turns; the first question opens with <image> (its region prompt follows it)."""
        if self.kind == "description":
            messages = []
            for i, text in enumerate(rec["description"]):
                question = rng.choice(DETAILED_QUESTIONS).strip().replace("<region>", f"region{i + 1}")
                messages += [{"from": "human", "value": question}, {"from": "gpt", "value": no_angles(text)}]
        else:
            limit = OSPREY_SHORT if self.kind == "short" else ""
            messages = [{"from": m["from"], "value": no_angles(m["value"]) + (limit if m["from"] == "human" else "")}
                        for m in rec["conversations"]]
        return merged_turns(messages)

    def __getitem__(self, index):
        rec = self.records[index]
        rng = random.Random(sample_seed(self.seed, index))
        paths = [os.path.join(d, rec["file_name"]) for d in self.image_dirs]
        image = load_image(next((p for p in paths if os.path.isfile(p)), paths[0]))
        h, w = rec["height"], rec["width"]
        regions = [a["segmentation"] for a in rec["annotation"]]
        prompt_masks = torch.stack([coco_mask(s, h, w) for s in regions])
        return {"id": str(rec.get("id", index)), "frames": [image], "exprs": [], "is_video": False, "conversation": None,
                "masks": torch.zeros(0, 1, image.height, image.width, dtype=torch.bool),
                "prompt_masks": prompt_masks, "turns": self.turns(rec, rng)}


# --- Video-ChatUniVi: video conversations, 5 frames sampled as Sa2VA does


def chat_frame_indices(num_frames, k, rng):
    """All frames if there are at most k, else one random frame in each of k equal segments (Sa2VA)."""
    if num_frames <= k:
        return list(range(num_frames))
    bounds = np.linspace(0, num_frames, num=k + 1, dtype=int)
    return [rng.randrange(bounds[i], bounds[i + 1]) for i in range(k)]


class VideoChatDataset(torch.utils.data.Dataset):
    """Video-ChatUniVi's video_chat.json [{video, conversations}] with its videos; no masks."""

    def __init__(self, json_path, video_dir, seed=0, num_frames=5):
        self.records, self.video_dir, self.seed, self.num_frames = read_json(json_path), video_dir, seed, num_frames

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        rec = self.records[index]
        rng = random.Random(sample_seed(self.seed, index))
        path = os.path.join(self.video_dir, rec["video"])
        if not os.path.isfile(path) and os.path.isfile(path.replace("mkv", "mp4")):
            path = path.replace("mkv", "mp4")  # as Sa2VA
        frames = read_video_frames(path, chat_frame_indices(count_video_frames(path), self.num_frames, rng))
        questions = [m["value"].replace("<image>", "") for m in rec["conversations"] if m["from"] == "human"]
        answers = [m["value"] for m in rec["conversations"] if m["from"] != "human"]
        if len(questions) != len(answers):
            raise ValueError(f"{self.video_dir}: video {rec['video']} has {len(questions)} questions for {len(answers)} answers")
        turns = list(zip(questions, answers))
        turns[0] = ("<image>" + turns[0][0], turns[0][1])
        return {"id": rec.get("id", rec["video"]), "frames": frames, "exprs": [], "is_video": True, "conversation": None,
                "masks": torch.zeros(0, len(frames), frames[0].height, frames[0].width, dtype=torch.bool), "turns": turns}


MIX_NAMES = ["gcg", *GCG_FILES, "sav", "osprey", "video_chat"]
SAV_EXPRESSION_FILES = ["Ref-SAV.json", "sam_v_final_v3.json"]  # under video_datas/: the first one present is read


def build_mix_dataset(name, root, seed=0):
    """Training sets of the rest of the mix by name (MIX_NAMES) in Sa2VA's data/ layout; gcg and osprey join their parts."""
    if name == "gcg":
        return MixedDataset([(build_gcg(n, root, seed), repeats) for n, (_, _, repeats) in GCG_FILES.items()])
    if name in GCG_FILES:
        return build_gcg(name, root, seed)
    videos = os.path.join(root, "video_datas")
    if name == "sav":
        paths = [os.path.join(videos, f) for f in SAV_EXPRESSION_FILES]
        return SAVDataset(next((p for p in paths if os.path.isfile(p)), paths[0]), os.path.join(videos, "sam_v_full"), seed)
    if name == "osprey":
        folder = os.path.join(root, "osprey-724k")
        dirs = [os.path.join(folder, d) for d in OSPREY_IMAGE_DIRS]
        return MixedDataset([(OspreyDataset(os.path.join(folder, "Osprey-724K", f), dirs, kind, seed), 1) for f, kind in OSPREY_FILES.items()])
    if name == "video_chat":
        folder = os.path.join(videos, "chat_univi")
        return VideoChatDataset(os.path.join(folder, "video_chat.json"), os.path.join(folder, "Activity_Videos"), seed)
    raise ValueError(f"unknown dataset {name!r}; choose one of {MIX_NAMES}")


# ---------------------------------------------------------------------------------------------
# mixing, a resumable distributed sampler, batches


class MixedDataset(torch.utils.data.Dataset):
    """Datasets visited with repeat factors (fractional allowed): [(dataset, factor), ...]."""

    def __init__(self, parts):
        self.index = []  # (part, item) pairs, deterministic
        self.parts = [d for d, _ in parts]
        for p, (dataset, factor) in enumerate(parts):
            n = len(dataset)
            whole, frac = int(factor), factor - int(factor)
            self.index += [(p, i) for _ in range(whole) for i in range(n)]
            self.index += [(p, i) for i in range(int(round(frac * n)))]

    def __len__(self):
        return len(self.index)

    def __getitem__(self, index):
        part, item = self.index[index]
        return self.parts[part][item]


def parse_mix(spec):
    """'refcoco:4,mevis:4' -> [('refcoco', 4.0), ('mevis', 4.0)]; one clear error for a bad entry."""
    parts = []
    for entry in spec.split(","):
        name, _, factor = entry.partition(":")
        try:
            factor = float(factor or 1)
        except ValueError:
            raise ValueError(f"--data={spec!r}: {entry!r} is not dataset:repeat_factor") from None
        if name not in EVAL_SPLITS and name not in MIX_NAMES:
            raise ValueError(f"--data={spec!r}: unknown dataset {name!r}; known: {', '.join([*EVAL_SPLITS, *MIX_NAMES])}")
        if factor <= 0:
            raise ValueError(f"--data={spec!r}: the repeat factor of {name} must be > 0")
        parts.append((name, factor))
    return parts


def build_train_mix(spec, root="", seed=0):
    """'refcoco:4,mevis:4,revos:10' -> MixedDataset of the train splits; 'synthetic:1' needs no root."""
    return MixedDataset([(build_dataset(name, root, split="train", train=True, seed=seed), factor)
                         for name, factor in parse_mix(spec)])


class DistributedResumableSampler:
    """Shuffled indices sharded across ranks (rank r takes every world-th), resumable mid-epoch."""

    def __init__(self, dataset_len, num_replicas=1, rank=0, seed=0, shuffle=True):
        self.n, self.world, self.rank, self.seed, self.shuffle = dataset_len, num_replicas, rank, seed, shuffle
        self.epoch, self.position = 0, 0  # position: how many of this rank's indices were handed out

    def indices(self):
        """This rank's indices for the current epoch (padded so every rank has the same count)."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist() if self.shuffle else list(range(self.n))
        per_rank = math.ceil(self.n / self.world)
        order += order[: per_rank * self.world - self.n]
        return order[self.rank::self.world]

    def __iter__(self):
        while True:
            mine = self.indices()
            while self.position < len(mine):
                self.position += 1
                yield mine[self.position - 1]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


def batch_iterator(dataset, sampler, batch_size):
    """Endless (samples, indices) batches in sampler order; the sampler's state is the data position."""
    stream = iter(sampler)
    while True:
        indices = [next(stream) for _ in range(batch_size)]
        yield [dataset[i] for i in indices], indices
