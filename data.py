"""
Data: generated spatial-referring scenes (the default), readers for the official layouts, mixing.

  from data import build_dataset, build_train_mix
  ds = build_dataset("synthetic", split="val")                      # generated, deterministic by seed
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
import warnings
import zlib
from collections import Counter

import av
import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

import salma

WARNINGS = Counter()  # what was skipped or truncated, by reason; printed by train.py / eval.py


def warn_once(reason, detail):
    """Count a handled data problem; warn the first time each reason occurs."""
    if WARNINGS[reason] == 0:
        warnings.warn(f"{reason}: {detail} (further cases are counted, not printed)")
    WARNINGS[reason] += 1


def load_image(path):
    """An RGB PIL image, or one clear error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found; check --data_root and the dataset layout (README)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def read_json(path):
    """A dataset's JSON file; one error naming it when missing (with where to look) or malformed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; check --data_root and the dataset layout (README)")
    return salma.read_json_file(path)


# ---------------------------------------------------------------------------------------------
# generated spatial-referring scenes

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 24}  # half-extent in pixels
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}  # unit direction (x, y)
RELATION_MARGIN = 20  # px: "a left of b" holds when a's centre is >= 20 px further left and within 45 degrees


def relation_offset(relation, a, b):
    """(along, across): a's centre relative to b's along the relation's direction and across it (px)."""
    ux, uy = RELATIONS[relation]
    dx, dy = a["cx"] - b["cx"], a["cy"] - b["cy"]
    return ux * dx + uy * dy, abs(uy * dx - ux * dy)


def relation_holds(relation, a, b):
    """Clearly true: at least RELATION_MARGIN along the direction, no more across than along."""
    along, across = relation_offset(relation, a, b)
    return along >= RELATION_MARGIN and across <= along


def relation_arguable(relation, a, b):
    """Could be read as true by a person (same side, within ~70 degrees); such scenes are not used."""
    along, across = relation_offset(relation, a, b)
    return along > 0 and across <= 3 * along


def draw_shape(draw, obj, fill):
    """Draw one object (shape, cx, cy, r) with PIL; the same call renders image and mask."""
    cx, cy, r = obj["cx"], obj["cy"], obj["r"]
    if obj["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def render(objects, size):
    """(image, masks (K, H, W) bool) of non-overlapping objects on a light background."""
    w, h = size
    image = Image.new("RGB", size, (235, 235, 228))
    draw = ImageDraw.Draw(image)
    masks = []
    for obj in objects:
        draw_shape(draw, obj, COLOURS[obj["colour"]])
        mask = Image.new("L", size, 0)
        draw_shape(ImageDraw.Draw(mask), obj, 255)
        masks.append(torch.from_numpy(np.array(mask) > 0))
    return image, torch.stack(masks)


def describe(obj, words):
    """'the small red circle' with only the attribute words asked for."""
    parts = [obj["size"] if "size" in words else "", obj["colour"] if "colour" in words else "", obj["shape"]]
    return "the " + " ".join(p for p in parts if p)


def objects_matching(text, objects):
    """Indices of the objects a generated expression refers to (parsed from its words)."""
    words = text.split()
    if text.startswith(("the larger of the two", "the smaller of the two")):
        colour = words[-2]
        group = [i for i, o in enumerate(objects) if o["colour"] == colour]
        if len(group) != 2 or objects[group[0]]["size"] == objects[group[1]]["size"]:
            return []
        want = "large" if words[1] == "larger" else "small"
        return [i for i in group if objects[i]["size"] == want]
    for relation in RELATIONS:
        if f" {relation} " in text:
            head, anchor_text = text.split(f" {relation} ")
            anchors = objects_matching(anchor_text, objects)
            if len(anchors) != 1:
                return []
            anchor = objects[anchors[0]]
            heads = [i for i in objects_matching(head, objects) if i != anchors[0]]
            if any(relation_arguable(relation, objects[i], anchor) and not relation_holds(relation, objects[i], anchor) for i in heads):
                return []  # a borderline candidate makes the expression ambiguous
            return [i for i in heads if relation_holds(relation, objects[i], anchor)]
    if " moving " in text:
        head, direction = text.split(" moving ")
        return [i for i in objects_matching(head, objects) if objects[i].get("direction") == direction]
    wanted = {w for w in words if w in SIZES or w in COLOURS or w in SHAPES}
    return [i for i, o in enumerate(objects) if wanted <= {o["size"], o["colour"], o["shape"]} and words[-1] in SHAPES]


ROLE_SWITCH_WORDS = ("left", "right", "above", "below")  # a relation's (or motion's) direction: its anchor follows
ROLE_SKIPPED_WORDS = ("the", "of", "two")


def role_code(expr, width):
    """A fixed random code (width,) of a generated expression, the sum of one vector per (word, part).

    Part 0 holds the words before a direction word ("the square"), part 1 the direction and the words after
    it ("left of the blue triangle"), so a word says which role it plays. Each vector is N(0, 8.4^2 / width)
    per channel (|v| about 8.4, SAM-2's prompt-token scale), drawn from a seed of the word and its part:
    the same in every process. train.py's decoder pretraining prompts SAM-2's decoder with it, and
    --lambda_code pulls z_seg towards it (README: What the testbed shows).
    """
    code, part = torch.zeros(width), 0
    for word in expr.split():
        part = 1 if word in ROLE_SWITCH_WORDS else part
        if word not in ROLE_SKIPPED_WORDS:
            generator = torch.Generator().manual_seed(zlib.crc32(f"{part}:{word}".encode()))
            code += torch.randn(width, generator=generator) * 8.4 / width ** 0.5
    return code


def role_codes(exprs, width):
    """role_code of each expression -> (len(exprs), width)."""
    return torch.stack([role_code(expr, width) for expr in exprs])


IMAGE_KINDS = ("attribute", "relation", "comparative")  # expression kinds of generated images (videos: "motion")


def expression_kind(text):
    """What a generated expression asks to resolve: 'attribute', 'relation', 'comparative' or 'motion'."""
    if " moving " in text:
        return "motion"
    if " of the two " in text:
        return "comparative"
    if any(f" {relation} " in text for relation in RELATIONS):
        return "relation"
    return "attribute"


def pick_expression(objects, target, rng, video, kinds=None):
    """An expression that picks out exactly the target; the kind (attribute, relation, comparative) first.

    kinds: the kinds allowed (None = all; the ladder tests train on one kind at a time).
    """
    obj = objects[target]
    if video:
        texts = {"motion": [describe(obj, w) + f" moving {obj['direction']}" for w in ((), ("colour",), ("size", "colour"))]}
    else:
        texts = {"attribute": [describe(obj, w) for w in ((), ("colour",), ("size",), ("size", "colour"))],
                 "relation": [f"{describe(obj, ())} {relation} {describe(anchor, w)}"
                              for anchor in objects for relation in RELATIONS for w in (("colour",), ("size", "colour"))],
                 "comparative": [f"the {'larger' if obj['size'] == 'large' else 'smaller'} of the two {obj['colour']} shapes"]}
    choices = [[t for t in group if objects_matching(t, objects) == [target]] for kind, group in texts.items()
               if kinds is None or kind in kinds]
    choices = [group for group in choices if group]
    return rng.choice(rng.choice(choices)) if choices else None


class SyntheticRefDataset(torch.utils.data.Dataset):
    """Generated scenes of shapes with distractors; sample i is a pure function of (seed, i)."""

    def __init__(self, num_samples=10_000, image_size=(192, 192), seed=0, video_fraction=0.25, num_frames=5,
                 max_exprs=3, twins=False, kinds=None):
        self.num_samples, self.size, self.seed = num_samples, image_size, seed
        self.video_fraction, self.num_frames, self.max_exprs = video_fraction, num_frames, max_exprs
        self.twins = twins  # the distractor split: a small target beside a large twin (see twin_expression)
        self.kinds = kinds  # expression kinds allowed (None = all), see pick_expression

    def __len__(self):
        return self.num_samples

    def place(self, rng, video):
        """3-6 objects that never overlap (in any frame of a video); with twins, the first two are a small
        object and a large one of the same colour and shape."""
        w, h = self.size
        objects, wanted = [], rng.randint(3, 6)
        for _ in range(200):
            if len(objects) == wanted:
                break
            size = rng.choice(list(SIZES))
            if self.twins and len(objects) < 2:
                size = ("small", "large")[len(objects)]
            r = SIZES[size]
            direction = rng.choice(list(DIRECTIONS)) if video else None
            speed = rng.randint(3, 6) if video else 0
            steps = self.num_frames - 1 if video else 0
            dx, dy = DIRECTIONS[direction] if video else (0, 0)
            x0, y0 = rng.randint(r + 1, w - r - 2), rng.randint(r + 1, h - r - 2)
            x1, y1 = x0 + dx * speed * steps, y0 + dy * speed * steps
            if not (r < x1 < w - r - 1 and r < y1 < h - r - 1):
                continue
            obj = {"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "size": size, "r": r,
                   "cx": x0, "cy": y0, "direction": direction, "speed": speed}
            if self.twins and len(objects) == 1:
                obj.update(shape=objects[0]["shape"], colour=objects[0]["colour"])
            if all(not paths_touch(obj, o, steps) for o in objects):
                objects.append(obj)
        return objects

    @staticmethod
    def twin_expression(objects):
        """The distractor split's one expression: the small object by size and colour (its large twin
        is the more salient look-alike), or none when another object also fits."""
        text = describe(objects[0], ("size", "colour"))
        return ([text], [0]) if objects_matching(text, objects) == [0] else ([], [])

    def expressions(self, objects, rng, video):
        """Up to max_exprs (expression, target index) pairs, targets in random order."""
        order = list(range(len(objects)))
        rng.shuffle(order)
        exprs, targets = [], []
        for i in order:
            text = pick_expression(objects, i, rng, video, self.kinds)
            if text and len(exprs) < self.max_exprs:
                exprs.append(text)
                targets.append(i)
        return exprs, targets

    def __getitem__(self, index):
        rng = random.Random(self.seed * 1_000_003 + index)
        video = rng.random() < self.video_fraction
        exprs = []
        while not exprs:  # a scene where no object can be singled out is drawn again
            objects = self.place(rng, video)
            exprs, targets = self.twin_expression(objects) if self.twins else self.expressions(objects, rng, video)
        frames, masks = [], []
        for t in range(self.num_frames if video else 1):
            moved = [moved_object(o, t) for o in objects]
            image, object_masks = render(moved, self.size)
            frames.append(image)
            masks.append(object_masks[targets])
        return {"id": f"synthetic-{self.seed}-{index}", "frames": frames, "exprs": exprs,
                "masks": torch.stack(masks, dim=1), "is_video": video, "conversation": None,
                "objects": objects, "targets": targets}


def moved_object(obj, t):
    """The object at frame t of a video (linear motion)."""
    dx, dy = DIRECTIONS[obj["direction"]] if obj["direction"] else (0, 0)
    return {**obj, "cx": obj["cx"] + dx * obj["speed"] * t, "cy": obj["cy"] + dy * obj["speed"] * t}


def paths_touch(a, b, steps):
    """Whether two objects come within 3 px of each other's bounding boxes in any frame."""
    for t in range(steps + 1):
        ma, mb = moved_object(a, t), moved_object(b, t)
        if abs(ma["cx"] - mb["cx"]) <= ma["r"] + mb["r"] + 3 and abs(ma["cy"] - mb["cy"]) <= ma["r"] + mb["r"] + 3:
            return True
    return False


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
        rng = random.Random(self.seed * 1_000_003 + index)
        n = len(item["frame_paths"])
        chosen = sorted(rng.sample(range(n), min(self.num_frames, n)))
        frames = [load_image(item["frame_paths"][t]) for t in chosen]
        return {"id": item["id"], "frames": frames, "exprs": [item["expr"]], "masks": item["masks"](chosen)[None],
                "is_video": True, "conversation": None}


def frame_size(path):
    """(H, W) of an image, read from its header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found; check --data_root and the dataset layout (README)")
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
        return SyntheticRefDataset(n, seed=seed if train else seed + 10_000, video_fraction=0.25 if name == "synthetic" else 0.0)
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"--data_root {root!r} is not a directory; {name} needs its files there (README: Data)")
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
        raise FileNotFoundError(f"{path}: video not found; check --data_root and the dataset layout (README)")
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
        raise FileNotFoundError(f"{path}: video not found; check --data_root and the dataset layout (README)")
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
        rng = random.Random(self.seed * 1_000_003 + index)
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
        rng = random.Random(self.seed * 1_000_003 + index)
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
        rng = random.Random(self.seed * 1_000_003 + index)
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
        rng = random.Random(self.seed * 1_000_003 + index)
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


# ---------------------------------------------------------------------------------------------
# training batches: samples -> the tensors SALMA.forward reads, deterministic per sample seed

SEG_QUESTIONS = [
    "Can you segment the {} in this image?",
    "Please segment {} in this image.",
    "What is {} in this image? Please respond with segmentation mask.",
    "What is {} in this image? Please output segmentation mask.",
]
SEG_ANSWERS = ["It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG]."]


def sample_turns(sample, rng):
    """Chat turns of a sample: its own turns, its LLaVA conversation, or one question/answer per expression."""
    if sample.get("turns"):
        return sample["turns"]
    if sample.get("conversation"):
        conv = sample["conversation"]
        return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
    turns = [(rng.choice(SEG_QUESTIONS).format(expr), rng.choice(SEG_ANSWERS)) for expr in sample["exprs"]]
    if turns:
        turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
    return turns


def make_train_batch(samples, tokenizer, cfg, seeds, max_tokens=8192):
    """Tensors for SALMA.forward from a list of samples (frames, exprs or turns, masks, is_video).

    The k-th [SEG] of a sample answers its k-th mask (one per expression, or one per phrase of a
    grounded caption). A conversation longer than max_tokens is cut at a turn boundary (counted).
    Samples with prompt_masks (n, H, W) get Sa2VA's region prompt after their image.
    """
    pad_id = tokenizer.token_to_id("<|endoftext|>")
    seg_id = tokenizer.token_to_id(salma.SEG)
    low_res = cfg.sam_image_size // 4
    ids, labels, pixels, sam_frames, context_index = [], [], [], [], []
    seg_index, seg_text, pair_seg, pair_frame, pair_masks = [], [], [], [], []
    for row, (sample, seed) in enumerate(zip(samples, seeds)):
        rng = random.Random(seed)
        frames = sample["frames"][: cfg.video_frames] if sample["is_video"] else sample["frames"][:1]
        media = ""  # text-only chat (LLaVA records without an image)
        if frames:
            tiles = salma.mllm_pixels(frames, cfg, sample["is_video"])
            media = salma.media_placeholder(tiles.shape[0], cfg, sample["is_video"])
            grid = salma.region_grid_masks(sample["prompt_masks"], cfg) if sample.get("prompt_masks") is not None else None
            if grid is not None:
                media += salma.region_prompt(grid)
            first_tile = sum(len(p) for p in pixels)
            context_index.append(salma.region_context_index(tiles.shape[0], cfg.num_image_tokens, grid, first_tile))
            pixels.append(tiles)
        encoded = salma.encode_turns(tokenizer, sample_turns(sample, rng), cfg.system_prompt, media)
        row_ids, row_labels, text_masks = cut_to_fit(encoded, tokenizer, cfg.system_prompt, max_tokens, sample["id"])
        first_frame = len(sam_frames)
        sam_frames.extend(frames)
        positions = (row_ids == seg_id).nonzero().flatten()
        if len(positions) > sample["masks"].shape[0]:
            raise ValueError(f"{sample['id']}: {len(positions)} [SEG] tokens for {sample['masks'].shape[0]} masks")
        turn_of = turn_index(row_ids, tokenizer, cfg.system_prompt)
        for k, pos in enumerate(positions.tolist()):  # the k-th [SEG] answers the k-th mask
            seg_index.append((row, pos))
            seg_text.append(text_masks[turn_of[pos]])  # the words of the question it answers
            for t in range(len(frames)):
                pair_seg.append(len(seg_index) - 1)
                pair_frame.append(first_frame + t)
                pair_masks.append(torch.nn.functional.interpolate(sample["masks"][k, t][None, None].float(), size=(low_res, low_res), mode="nearest")[0, 0])
        ids.append(row_ids)
        labels.append(row_labels)
    length = max(len(x) for x in ids)
    batch = {
        "input_ids": torch.stack([torch.nn.functional.pad(x, (0, length - len(x)), value=pad_id) for x in ids]),
        "labels": torch.stack([torch.nn.functional.pad(x, (0, length - len(x)), value=-100) for x in labels]),
        "attention_mask": torch.stack([torch.arange(length) < len(x) for x in ids]),
        "pixel_values": torch.cat(pixels) if pixels else None,
        "sam_images": salma.sam_pixels(sam_frames, cfg.sam_image_size) if sam_frames else torch.zeros(0, 3, cfg.sam_image_size, cfg.sam_image_size),
        "seg_index": torch.tensor(seg_index, dtype=torch.long).reshape(-1, 2),
        "seg_text": torch.stack([torch.nn.functional.pad(m, (0, length - len(m))) for m in seg_text]) if seg_text else torch.zeros(0, length, dtype=torch.bool),
        "pair_seg": torch.tensor(pair_seg, dtype=torch.long),
        "pair_frame": torch.tensor(pair_frame, dtype=torch.long),
        "pair_masks": torch.stack(pair_masks) if pair_masks else torch.zeros(0, low_res, low_res),
        "seg_exprs": [expr for sample in samples for expr in sample.get("exprs") or []],  # generated data: one per [SEG]
    }
    if any(s.get("prompt_masks") is not None for s in samples):  # else every image token once, in order
        batch["context_index"] = torch.cat(context_index)
    return batch


def turn_starts(ids, tokenizer, system_prompt):
    """Positions (n_turns,) where each user turn begins (its <|im_start|>)."""
    starts = (ids == tokenizer.token_to_id("<|im_start|>")).nonzero().flatten()
    return starts[(1 if system_prompt else 0)::2].contiguous()  # user, assistant, user, ... after the system turn


def turn_index(ids, tokenizer, system_prompt):
    """The turn each token belongs to (L,), 0-based (the system prompt counts as turn 0)."""
    starts = turn_starts(ids, tokenizer, system_prompt)
    return (torch.searchsorted(starts, torch.arange(len(ids)), right=True) - 1).clamp_min(0)


def cut_to_fit(encoded, tokenizer, system_prompt, max_tokens, sample_id):
    """Drop whole turns from the end of (ids, labels, text_masks) until it fits max_tokens (counted).

    The first turn is always kept (it holds the image); if it alone is too long, it is kept whole
    and counted as such.
    """
    ids, labels, text_masks = encoded
    if len(ids) <= max_tokens:
        return encoded
    starts = turn_starts(ids, tokenizer, system_prompt).tolist() + [len(ids)]
    keep = max([n for n in range(1, len(starts)) if starts[n] <= max_tokens], default=1)
    if starts[keep] > max_tokens:
        warn_once("first turn longer than the context, kept whole", f"{sample_id}: {starts[keep]} > {max_tokens} tokens")
    else:
        warn_once("conversation cut at a turn boundary to fit the context", f"{sample_id}: {len(ids)} > {max_tokens} tokens")
    end = starts[keep]
    return ids[:end], labels[:end], text_masks[:keep, :end]
