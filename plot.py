"""
Figures of what SALMA does, and training curves.

  python plot.py out/tiny/log.jsonl          # out/tiny/curves.png (loss parts and lr against step) + a summary line

paint_mask()   one mask on its image: a magenta fill and a white outline edged in black, visible on any
               object colour; optional caption band. demo.py's overlays (same size as the input).
mask_figure()  labelled columns  image | SALMA | gate G | MBA attention | baseline | ground truth, the
               expression and each mask's IoU in the title, colour bars for G and the attention.
               eval.py --visualize and demo.py --compare.
compare()      SALMA's mask, its maps and the --mba=False baseline's mask on one image (for mask_figure).
plot_log()     curves.png next to a train.py log.jsonl (train.py writes it at every checkpoint).
"""

import argparse
import json
import os
import textwrap

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

import metrics

FILL = np.array([255, 0, 255])  # magenta: none of the generated scenes' colours, distinct on all of them
FILL_ALPHA = 0.45
HEAT_CMAP = "viridis"  # perceptual, readable in grey and by colour-blind readers
DPI = 100
MAX_PANEL = 512  # larger images are shown scaled down to this long side

# ---------------------------------------------------------------------------------------------
# one mask on its image


def as_bool(mask):
    """A (H, W) bool numpy array from a torch tensor or array."""
    return (mask.cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)).astype(bool)


def boundary_band(mask, radius):
    """Pixels within radius of the mask's boundary, inside or outside (dilation minus erosion)."""
    return metrics.dilate(mask, radius) & metrics.dilate(~mask, radius)


def paint_mask(image, mask, caption=None):
    """uint8 (H, W, 3): the image with the mask filled in magenta, outlined white on black, caption on top."""
    pixels = np.array(image.convert("RGB"), dtype=np.float32)
    mask = as_bool(mask)
    width = max(1, round(min(mask.shape) / 200))  # outline half-width in pixels, grows with the image
    pixels[mask] = (1 - FILL_ALPHA) * pixels[mask] + FILL_ALPHA * FILL
    edge_white = boundary_band(mask, width)
    edge_black = boundary_band(mask, width + 1) & ~edge_white
    pixels[edge_black] = 0
    pixels[edge_white] = 255
    out = Image.fromarray(pixels.astype(np.uint8))
    if caption:
        draw_caption(out, caption)
    return np.array(out)


def draw_caption(image, text):
    """Write text in white on a translucent dark band across the top of a PIL image (in place)."""
    w, h = image.size
    size = max(10, h // 18)
    font = ImageFont.load_default(size=size)
    while font.getlength(text) > w - 8 and len(text) > 4:
        text = text[:-4] + "..."
    band = Image.new("RGBA", (w, size + 8), (0, 0, 0, 150))
    image.paste(band, (0, 0), band)
    ImageDraw.Draw(image).text((4, 3), text, font=font, fill=(255, 255, 255))


# ---------------------------------------------------------------------------------------------
# labelled columns: image | masks | gate | attention | ground truth


def mask_figure(image, expression, masks, gate=None, attention=None, truth=None, subtitle=None):
    """Figure: image | each mask (gate G and MBA attention after the first) | ground truth, labelled.

    masks: {column label: bool (H, W)} in column order, e.g. {"SALMA": m, "baseline (mba=False)": b};
    gate, attention: (h, w) maps in [0, 1] at feature resolution, drawn stretched over the image with a
    colour bar and their range; truth: the ground-truth mask, which adds a column and each mask's IoU;
    subtitle: a line under the expression (the model's answer, a frame number).
    """
    w, h = image.size
    scale = min(1.0, MAX_PANEL / max(w, h))
    pw, ph = round(w * scale), round(h * scale)  # panel size in pixels
    truth = as_bool(truth) if truth is not None else None
    columns = [("image", lambda ax: ax.imshow(image), None)]  # (label, draw(ax) -> artist, colour bar label or None)
    scores = []  # "SALMA 0.71" per mask when the ground truth is known
    for i, (label, mask) in enumerate(masks.items()):
        mask = as_bool(mask)
        if truth is not None:
            scores.append(f"{label} {metrics.iou(mask, truth):.2f}")
        columns.append((label, lambda ax, m=mask: ax.imshow(paint_mask(image, m)), None))
        if i == 0 and gate is not None:
            columns.append(("gate G (pre-pass)", *heat(gate, w, h)))
        if i == 0 and attention is not None:
            columns.append(("MBA attention\n(on the top word)", *heat(attention, w, h)))
    if truth is not None:
        columns.append(("ground truth", lambda ax: ax.imshow(paint_mask(image, truth)), None))

    pad, label_h = 10, 34
    bar_h = 44 if any(bar for _, _, bar in columns) else pad  # room for colour bars and their ranges
    fig_w = len(columns) * (pw + pad) + pad
    lines = [f'"{expression}"', "IoU with the ground truth: " + ", ".join(scores) if scores else "", subtitle or ""]
    title = "\n".join(textwrap.fill(line, width=max(30, fig_w // 8)) for line in lines if line)  # ~8 px a character
    fig_h = 18 * (title.count("\n") + 1) + 10 + label_h + ph + bar_h
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI)
    fig.text(0.5, 1 - 6 / fig_h, title, ha="center", va="top", fontsize=11)
    for i, (label, draw, bar_label) in enumerate(columns):
        x, y = pad + i * (pw + pad), bar_h
        ax = fig.add_axes((x / fig_w, y / fig_h, pw / fig_w, ph / fig_h))
        artist = draw(ax)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9, pad=3)
        if bar_label is not None:
            inset = min(16, pw // 8)  # room for the tick labels between neighbouring bars
            cax = fig.add_axes(((x + inset) / fig_w, 32 / fig_h, (pw - 2 * inset) / fig_w, 7 / fig_h))
            bar = fig.colorbar(artist, cax=cax, orientation="horizontal", ticks=[0, 0.5, 1])
            bar.ax.tick_params(labelsize=7, length=2, pad=1)
            fig.text((x + pw / 2) / fig_w, 3 / fig_h, bar_label, ha="center", va="bottom", fontsize=7)
    return fig


def heat(values, w, h):
    """(draw(ax), "min .. max" label) of a (h', w') map in [0, 1] stretched over a w x h image."""
    values = values.float().cpu().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=np.float32)
    draw = lambda ax: ax.imshow(values, cmap=HEAT_CMAP, vmin=0, vmax=1, extent=(0, w, h, 0), interpolation="bilinear")
    return draw, f"min {values.min():.3f}, max {values.max():.3f}"


def save_figure(fig, path):
    """Write a figure to a PNG at its pixel size; returns path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


# ---------------------------------------------------------------------------------------------
# SALMA next to the --mba=False baseline on the same weights (eval.py --visualize, demo.py --compare)


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
    with model.as_baseline():
        baseline = model.segment_image(image, expr, tok, **options)
    return {"SALMA": mask, "baseline (mba=False)": baseline}, maps


# ---------------------------------------------------------------------------------------------
# training curves


NOT_LOSSES = {"step", "lr", "grad_norm", "ramp", "sec"}


def read_log(path):
    """The rows of a train.py log.jsonl; a step logged twice (a resumed run) keeps its last row."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such log (train.py writes OUT_DIR/log.jsonl)")
    try:
        rows = [json.loads(line) for line in open(path) if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a train.py log.jsonl ({e})") from None
    if not rows or not all(isinstance(r, dict) and "step" in r for r in rows):
        raise ValueError(f"{path}: no training steps logged")
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def smooth(values, window):
    """Trailing moving average (the first points average what exists so far)."""
    sums = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (sums[idx] - sums[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def plot_log(log_path, out_path=None):
    """curves.png next to log.jsonl: every loss part (log scale, raw + moving average) and lr against step."""
    rows = read_log(log_path)
    steps = [r["step"] for r in rows]
    parts = [k for k in rows[-1] if k not in NOT_LOSSES]
    window = max(1, len(rows) // 20)
    fig = Figure(figsize=(11, 4), dpi=DPI)
    ax, ax_lr = fig.subplots(1, 2, width_ratios=[2, 1])
    for i, key in enumerate(parts):
        values = [r.get(key, np.nan) for r in rows]
        colour = "k" if key == "loss" else f"C{i}"  # the total in black, its parts in colour
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth(values, window), color=colour, linewidth=1.8 if key == "loss" else 1.2, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"loss parts (faint: per step; solid: mean of {window} steps)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3, which="both")
    ax_lr.plot(steps, [r["lr"] for r in rows], color="k")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate", fontsize=10)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"{log_path}: {len(rows)} steps", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_path or os.path.join(os.path.dirname(log_path) or ".", "curves.png"))


def summary(log_path, last=10):
    """One line: steps and each loss part averaged over the last steps of a log.jsonl."""
    rows = read_log(log_path)
    tail = rows[-last:]
    parts = " ".join(f"{k} {np.mean([r[k] for r in tail]):.3f}" for k in rows[-1] if k not in NOT_LOSSES)
    return f"{rows[-1]['step']} steps | {parts} (mean of the last {len(tail)} steps)"


def main(argv=None):
    """python plot.py LOG.jsonl: write the curves PNG and print the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="a train.py log.jsonl (OUT_DIR/log.jsonl)")
    p.add_argument("--out", default="", help="PNG to write (default: curves.png next to the log)")
    args = p.parse_args(argv)
    try:
        path = plot_log(args.log, args.out or None)
        print(summary(args.log))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"plot.py: {e}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
