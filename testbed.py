"""
testbed: the generated spatial-referring data that trains and tests the tiny SALMA on a CPU.

Scenes of 3-6 coloured shapes, each expression picking out exactly one ("the small red circle",
"the square left of the blue triangle", "the larger of the two green shapes"), and 5-frame videos of
moving shapes ("the circle moving right"). Sample i of a split is a pure function of (seed, i); the
splits differ by their seed offset (SPLIT_SEEDS). Also here: the words of the tiny tokenizer
(WORDS), and the SAM-2 encoder pretraining that runs from scratch start with (pretrain_sam2_encoder).

  import testbed
  val = testbed.split("val", 50)                    # what eval.py --dataset synthetic scores
  sample = val[0]    # {"frames": [PIL], "exprs": [str], "masks": (N, T, H, W), "objects": [...], "targets": [...]}
"""

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import common
import losses
import metrics
from inputs import sam_pixels

# ---------------------------------------------------------------------------------------------
# scenes: objects, relations, expressions


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 12, "large": 24}  # half-extent in pixels
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
RELATIONS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}  # unit direction (x, y)
RELATION_MARGIN = 20  # px: "a left of b" holds when a's centre is >= 20 px further left and within 45 degrees


SPLIT_SEEDS = {"train": 0, "val": 10_000, "held_out": 20_000}  # offsets added to the run's seed
TEMPLATE_WORDS = ("the", "of", "two", "shapes", "larger", "smaller", "moving")  # the expressions' other words
WORDS = sorted({*COLOURS, *SHAPES, *SIZES, *DIRECTIONS, *" ".join(RELATIONS).split(), *TEMPLATE_WORDS})


def split(name, num_samples, seed=0, **options):
    """The generated split `name` (SPLIT_SEEDS) of a run seeded `seed`; options go to SyntheticRefDataset."""
    return SyntheticRefDataset(num_samples, seed=seed + SPLIT_SEEDS[name], **options)


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
        rng = random.Random(common.sample_seed(self.seed, index))
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
# SAM-2 encoder pretraining: runs from scratch first teach a random SAM-2 encoder the objects


ATTRIBUTES = (tuple(COLOURS), SHAPES, tuple(SIZES))  # what the encoder pretraining names


def object_attributes(scene):
    """Masks (K, H, W) of a generated image's objects and their labels (K, 3): colour, shape, size index."""
    _, masks = render(scene["objects"], scene["frames"][0].size)
    labels = [[names.index(o[key]) for names, key in zip(ATTRIBUTES, ("colour", "shape", "size"))] for o in scene["objects"]]
    return masks, torch.tensor(labels)


def split_attributes(logits, count):
    """Logits (N, class counts of the last `count` ATTRIBUTES summed) -> one (N, classes) part per attribute."""
    return logits.split([len(names) for names in ATTRIBUTES[-count:]], dim=1)


def attribute_losses(logits, labels):
    """Sum of the cross-entropies of logits (N, sum of the attributes' class counts) against labels (N, A)."""
    return sum(F.cross_entropy(part, labels[:, i]) for i, part in enumerate(split_attributes(logits, labels.shape[1])))


def encoder_pretraining_pass(grounding, heads, scenes, sam_size):
    """SAM-2's embedding of the scenes' images read by both heads -> (loss, pretraining_scores of this pass).

    Per object: shape and size from the embedding averaged over its mask (object_head). Per pixel of the
    decoder's low-res grid: object or background, and the colour, shape and size of the object under it
    (pixel_head, a 1x1 convolution upsampled 4x as the decoder upsamples).
    """
    object_head, pixel_head = heads
    pixels = torch.cat([sam_pixels(scene["frames"][:1], sam_size) for scene in scenes])
    embed = grounding.encode_image(pixels.to(object_head.weight.device))["image_embed"]  # (B, C, h, w)
    pixel_logits = F.interpolate(pixel_head(embed), scale_factor=4, mode="bilinear", align_corners=False)  # (B, 10, 4h, 4w)
    pixel_loss, object_logits, object_labels, found, pixel_hits = 0.0, [], [], [], []
    for b, scene in enumerate(scenes):
        masks, labels = object_attributes(scene)  # (K, H, W), (K, 3)
        labels = labels.to(embed.device)
        object_feats, _ = losses.pool_mask_features(embed[b].expand(len(masks), -1, -1, -1), masks.to(embed.device))  # (K, C)
        object_logits.append(object_head(object_feats))
        object_labels.append(labels[:, 1:])
        on_grid = losses.resize_gt(masks, pixel_logits.shape[-2:]).to(embed.device)  # (K, 4h, 4w)
        foreground = on_grid.amax(0) > 0
        pixel_labels = labels[on_grid.argmax(0)][foreground]  # (P, 3): the object's labels at each of its pixels
        pixel_loss = pixel_loss + F.binary_cross_entropy_with_logits(pixel_logits[b, 0], foreground.float())
        object_pixel_logits = pixel_logits[b, 1:].permute(1, 2, 0)[foreground]  # (P, 9)
        pixel_loss = pixel_loss + attribute_losses(object_pixel_logits, pixel_labels)
        found.append((pixel_logits[b, 0] > 0, foreground))
        _, pixel_shape_logits, _ = split_attributes(object_pixel_logits.detach(), len(ATTRIBUTES))
        pixel_hits.append(pixel_shape_logits.argmax(1) == pixel_labels[:, 1])
    object_logits, object_labels = torch.cat(object_logits), torch.cat(object_labels)
    loss = attribute_losses(object_logits, object_labels) + pixel_loss / len(scenes)
    return loss, pretraining_scores(object_logits, object_labels, found, pixel_hits)


def pretraining_scores(object_logits, object_labels, found, pixel_hits):
    """Per object: shape and size accuracy; per pixel: objectness IoU and the shape accuracy on objects (%)."""
    shape_logits, size_logits = split_attributes(object_logits.detach(), 2)
    predicted, actual = (torch.cat([pair[i].flatten() for pair in found]) for i in range(2))
    scores = {"object_shape_accuracy": (shape_logits.argmax(1) == object_labels[:, 0]).float().mean(),
              "object_size_accuracy": (size_logits.argmax(1) == object_labels[:, 1]).float().mean(),
              "pixel_objectness_iou": torch.tensor(metrics.iou(predicted.cpu().numpy(), actual.cpu().numpy())),
              "pixel_shape_accuracy": torch.cat(pixel_hits).float().mean()}
    return {name: round(100 * value.item(), 1) for name, value in scores.items()}


def pretrain_sam2_encoder(model, steps, lr, seed, device):
    """Teach a random SAM-2 image encoder where the generated objects are and what they are; returns what it reached.

    The real recipe starts from a pretrained SAM-2. A random tiny one tells shapes apart at ~66% (linear
    probe) and the mask loss does not teach it, so the decoder can only select by colour (docs/testbed.md). Two heads on its embedding (encoder_pretraining_pass) learn the objects' shapes and sizes
    and, per pixel, objectness, colour, shape and size: 2 scenes a step, AdamW at lr after a warm-up of
    1/12 of the steps, on the training split of seed. Reports pretraining_scores on 30 held-out scenes.
    """
    grounding, sam_size = model.grounding, model.cfg.sam_image_size
    encoder = grounding.sam2_model.image_encoder
    scenes = split("train", 2 * steps, seed, video_fraction=0.0)
    held_out = split("held_out", 30, seed, video_fraction=0.0)
    heads = torch.nn.ModuleList([torch.nn.Linear(grounding.width, len(SHAPES) + len(SIZES)),
                                 torch.nn.Conv2d(grounding.width, 1 + sum(map(len, ATTRIBUTES)), 1)]).to(device)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr)
    start = time.time()
    for step in tqdm(range(steps), desc="pretrain SAM-2 encoder"):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, steps // 12))
        loss, _ = encoder_pretraining_pass(grounding, heads, [scenes[2 * step], scenes[2 * step + 1]], sam_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)  # the pass also left gradients on parts the main run trains
    with torch.no_grad():
        _, scores = encoder_pretraining_pass(grounding, heads, [held_out[i] for i in range(30)], sam_size)
    return {"steps": steps, "held_out": scores, "seconds": round(time.time() - start, 1)}
