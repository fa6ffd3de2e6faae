"""
Where does a trained model lose the target? Linear probes of both sides of the [SEG] -> SAM-2 hand-over
and of the image tokens the LLM reads.

  python probe.py --ckpt out/tiny              # the target's colour / shape / size / place read from z_seg, F_v and the image tokens

On generated scenes (testbed.py's held-out split: the scenes whose SAM-2 pretraining report train.py prints), for every expression the answer "Sure, [SEG]." is
teacher-forced and three features recorded: z_seg, the prompt the LLM hands to SAM-2; F_v at the target,
SAM-2's image embedding averaged over the target's mask (what the decoder has to find); and the LLM's image
token at the target (after mlp1, the token over its centre: what the LLM can fetch). One logistic
regression per attribute of the target (colour, shape, size, and the column and row of its centre in a
4x4 grid of the image) and per feature is fit on 70% of the expressions and scored on the other 30%, per
expression kind, next to the majority-class rate. Reading it: an attribute F_v does not tell apart cannot be
segmented by it; an attribute z_seg does not carry (at the majority rate) means the LLM did not resolve which
object is meant; a place (column, row) the image token does not tell is one attention cannot fetch, since
attention moves token contents, not token positions. Image reliance says whether the LLM looks at the image
at all: how far z_seg moves when the scene's image is swapped for the next scene's (same words), over how
far z_seg lies from its mean across expressions (0: z_seg comes from the words alone). Writes
OUT_DIR/probe.json and a table.
"""

import argparse
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import losses
import testbed
from inputs import mllm_pixels

GRID = 4  # column and row of the target's centre in a GRID x GRID grid of the image (the tiny LLM's 16 image tokens)
ATTRIBUTES = {"colour": list(testbed.COLOURS), "shape": list(testbed.SHAPES), "size": list(testbed.SIZES),
              "column": list(range(GRID)), "row": list(range(GRID))}
KINDS = testbed.IMAGE_KINDS


def parse_args(argv=None):
    """Parse the probe's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help=checkpoint.CKPT_HELP + " (a random model is seeded: the same every run)")
    p.add_argument("--num_samples", type=int, default=300, help="generated scenes to probe, 3 expressions each at most (default 300)")
    p.add_argument("--train_frac", type=float, default=0.7, help="fraction of the expressions the regressions are fit on; the rest are scored (default 0.7)")
    p.add_argument("--steps", type=int, default=500, help="full-batch Adam steps per logistic regression (default 500)")
    p.add_argument("--out_dir", default="probe_out", help="where probe.json goes (default probe_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.num_samples < 2 or not 0 < args.train_frac < 1 or args.steps < 1:
        raise ValueError(f"--num_samples={args.num_samples} / --train_frac={args.train_frac} / --steps={args.steps}: "
                         "need at least 2 scenes, 0 < train_frac < 1 and at least 1 step")
    return args


@torch.inference_mode()
def target_features(model, frame, masks):
    """F_v at each target: SAM-2's image embedding (1, C, h, w) averaged over each mask of masks (E, H, W) -> (E, C)."""
    pixels = model.sam_input([frame])
    image_embed = model.grounding.encode_image(pixels)["image_embed"].float()
    pooled, _ = losses.pool_mask_features(image_embed.expand(len(masks), -1, -1, -1), masks)
    return pooled


def centre_cell(obj, image_size, side):
    """(column, row) of a generated object's centre in a side x side grid over an image of image_size (w, h)."""
    return min(side - 1, obj["cx"] * side // image_size[0]), min(side - 1, obj["cy"] * side // image_size[1])


@torch.inference_mode()
def image_token_at(model, frame, objects):
    """The LLM's image token (after mlp1) over each object's centre, on the image's last tile (the thumbnail or the
    only tile, which show the whole image) -> (E, D)."""
    pixels = mllm_pixels([frame], model.cfg, is_video=False).to(model.device)
    tokens = model.mllm.extract_feature(pixels)[-1].float()  # (g*g, D), row-major on the tile's g x g token grid
    side = int(len(tokens) ** 0.5)
    cells = [centre_cell(o, frame.size, side) for o in objects]
    return tokens[[row * side + column for column, row in cells]]


def target_labels(obj, image_size):
    """Class index of each of ATTRIBUTES for a generated object in an image of image_size (w, h)."""
    place = dict(zip(("column", "row"), centre_cell(obj, image_size, GRID)))
    return [values.index(place[name] if name in place else obj[name]) for name, values in ATTRIBUTES.items()]


def z_seg_of(model, tokenizer, frames, expr):
    """z_seg (C,) of an expression on frames, the answer "Sure, [SEG]." teacher-forced."""
    _, z_seg, _, _ = model.answer(frames, expr, tokenizer, force_seg=True)
    return z_seg[0].float().numpy()


@torch.inference_mode()
def collect(model, tokenizer, dataset, quiet=False):
    """Features {z_seg, F_v at the target, the LLM's image token at the target} (N, C) each, target labels
    (N, len(ATTRIBUTES)), kinds (N,) of every image expression, and z_seg with the next scene's image in place
    of its own (N, C)."""
    z_segs, swapped, f_vs, image_tokens, labels, kinds = [], [], [], [], [], []
    other = dataset[0]
    for i in tqdm(range(len(dataset)), desc="probe", disable=quiet, unit="img"):
        sample, other = other, dataset[(i + 1) % len(dataset)]  # each scene is generated once (the first twice)
        f_vs.append(target_features(model, sample["frames"][0], sample["masks"][:, 0]).numpy())
        targets = [sample["objects"][t] for t in sample["targets"]]
        image_tokens.append(image_token_at(model, sample["frames"][0], targets).numpy())
        for expr, target in zip(sample["exprs"], sample["targets"]):
            z_segs.append(z_seg_of(model, tokenizer, sample["frames"], expr))
            swapped.append(z_seg_of(model, tokenizer, other["frames"], expr))
            labels.append(target_labels(sample["objects"][target], sample["frames"][0].size))
            kinds.append(testbed.expression_kind(expr))
    features = {"z_seg": np.stack(z_segs), "F_v at the target": np.concatenate(f_vs),
                "LLM image token at the target": np.concatenate(image_tokens)}
    features = {name: torch.from_numpy(f) for name, f in features.items()}  # plain tensors: the regressions need grad
    return features, torch.tensor(labels), np.array(kinds), torch.from_numpy(np.stack(swapped))


def image_reliance(z_seg, z_swapped):
    """Mean distance of z_seg (N, C) to z_seg with another image (N, C), over z_seg's mean distance to its mean."""
    return ((z_seg - z_swapped).norm(dim=1).mean() / (z_seg - z_seg.mean(0)).norm(dim=1).mean().clamp_min(1e-12)).item()


def probe_accuracy(features, labels, is_train, is_test, steps=500, seed=0):
    """Accuracy on is_test of a logistic regression fit on is_train (features standardised on is_train)."""
    mean, std = features[is_train].mean(0), features[is_train].std(0) + 1e-6
    x = (features - mean) / std  # (N, C)
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(x.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier(x[is_train]), labels[is_train]).backward()
        optimizer.step()
    with torch.no_grad():
        return (classifier(x[is_test]).argmax(1) == labels[is_test]).float().mean().item()


def majority_rate(labels):
    """Share of the most frequent class: what a probe that ignores its input scores."""
    return torch.bincount(labels).max().item() / len(labels)


def probe_table(features, labels, kinds, train_frac=0.7, steps=500):
    """{feature name: {kind: {N, attribute: {accuracy, majority}}}} on the held-out expressions of each kind."""
    n = len(labels)
    is_train = torch.arange(n) < int(train_frac * n)
    table = {}
    for feature_name, feats in features.items():
        table[feature_name] = {}
        for kind in KINDS:
            is_test = ~is_train & torch.from_numpy(kinds == kind)
            if not is_test.any():
                continue
            row = table[feature_name][kind] = {"N": int(is_test.sum())}
            for a, name in enumerate(ATTRIBUTES):
                y = labels[:, a]
                row[name] = {"accuracy": round(100 * probe_accuracy(feats, y, is_train, is_test, steps), 1),
                             "majority": round(100 * majority_rate(y[is_test]), 1)}
    return table


def format_table(table):
    """Markdown: one row per feature and kind, 'accuracy (majority)' per attribute, in %."""
    lines = ["| feature | kind | N | " + " | ".join(ATTRIBUTES) + " |", "| --- | --- | --- |" + " --- |" * len(ATTRIBUTES)]
    for feature_name, by_kind in table.items():
        for kind, row in by_kind.items():
            cells = [f"{row[name]['accuracy']:.1f} ({row[name]['majority']:.1f})" for name in ATTRIBUTES]
            lines.append(f"| {feature_name} | {kind} | {row['N']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    """Probe --ckpt's z_seg, F_v and image tokens; print the table and write probe.json."""
    args = parse_args(argv)
    torch.manual_seed(0)  # --ckpt random builds the same random model on every run
    model, tokenizer = checkpoint.model_from_flags(args.ckpt)
    dataset = testbed.split("held_out", args.num_samples, video_fraction=0.0)
    features, labels, kinds, z_swapped = collect(model, tokenizer, dataset, args.quiet)
    table = probe_table(features, labels, kinds, args.train_frac, args.steps)
    reliance = round(image_reliance(features["z_seg"], z_swapped), 3)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "probe.json")
    with open(path, "w") as f:
        json.dump({"ckpt": args.ckpt, "num_samples": args.num_samples, "expressions": len(labels),
                   "image_reliance": reliance, "by_feature": table}, f, indent=2)
    print(f"linear probes of the target's attributes (column, row: its centre in a {GRID}x{GRID} grid): "
          "held-out accuracy % (majority-class rate %)")
    print(format_table(table))
    print(f"image reliance of z_seg: {reliance} (its move when the image is swapped for another scene's, over its "
          "spread across expressions; 0 = from the words alone)")
    print(f"wrote {path}")
    return table


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad flags or checkpoints: one line, no traceback
        raise SystemExit(f"probe.py: {e}") from None
