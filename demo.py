"""
Segment your own image or video with a sentence, or ask the model a question about it.

  python demo.py --ckpt out/tiny --image photo.jpg --text "the cup behind the laptop"
  python demo.py --ckpt out/tiny --image photo.jpg --text "the cup behind the laptop" --compare   # SALMA | G | attention | baseline
  python demo.py --ckpt out/tiny --video frames/ --text "the dog running left"     # a folder of frames or an animated GIF
  python demo.py --ckpt out/tiny --image photo.jpg --text "What is on the table?"  # a question: prints the answer

--ckpt is a train.py --out_dir (default out/tiny), an official Sa2VA directory or an exported SALMA one. The answer is
printed; when it holds [SEG], the mask is written to --out_dir as an overlay PNG (magenta fill, white
outline, the text as caption) and a 0/255 mask PNG, both of the input's size; a video gives one of each
per frame and an animated GIF of the overlays. --compare adds the figure of eval.py --visualize (plot.compare).
"""

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageSequence

import checkpoint
import common
import plot
import salma

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help=f"the model: {checkpoint.CKPT_HELP}")
    p.add_argument("--image", default="", help="an image file (JPEG, PNG, ...)")
    p.add_argument("--video", default="", help="a folder of frames (sorted by name) or an animated GIF/WebP/PNG; "
                   "for an .mp4, extract frames first: ffmpeg -i in.mp4 frames/%%05d.jpg")
    p.add_argument("--text", default="", help="what to segment ('the cup behind the laptop'), or a question ending in '?'")
    p.add_argument("--prompt", default="auto", choices=("auto", "segment", "chat"),
                   help="segment: ask Sa2VA's 'Please segment TEXT in this image.'; chat: send TEXT as written; "
                        "auto (default): chat when TEXT ends with '?', else segment")
    p.add_argument("--mba", type=common.parse_bool, default=None, metavar="BOOL",
                   help="False: the Sa2VA baseline on the same weights (default: as the checkpoint)")
    p.add_argument("--compare", type=common.parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="also write figures: image | SALMA | gate G | MBA attention | baseline (mba=False) [| ground truth]")
    p.add_argument("--truth", default="", help="image only: a ground-truth mask PNG (non-zero = object) for --compare's IoU column")
    p.add_argument("--force_seg", type=common.parse_bool, default=False, metavar="BOOL",
                   help="teacher-force the answer 'Sure, [SEG].' instead of generating (for barely trained models)")
    p.add_argument("--max_new_tokens", type=int, default=2048, help="generation stops at <|im_end|> or after this many tokens (default 2048, as Sa2VA)")
    p.add_argument("--out_dir", default="demo_out", help="where the PNGs and GIFs go (default demo_out)")
    p.add_argument("--fps", type=float, default=5.0, help="frames per second of the video GIFs (default 5)")
    p.add_argument("--preset", default="tiny", choices=sorted(salma.PRESETS), help="sizes of a --ckpt random model (default tiny)")
    p.add_argument("--device", default="", choices=("", "cpu", "cuda"), help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="precision (default auto: bf16 where the device computes it natively, as eval.py)")
    args = p.parse_args(argv)
    if bool(args.image) == bool(args.video):
        p.exit(2, "demo.py: pass exactly one of --image FILE or --video FOLDER_OR_GIF, and --text.\n")
    if not args.text.strip():
        p.exit(2, "demo.py: pass --text, e.g. --text \"the red circle\" or a question ending in '?'.\n")
    if args.compare and args.mba is False:
        p.exit(2, "demo.py: --compare already shows the baseline next to SALMA; drop --mba=False.\n")
    if args.truth and not args.image:
        p.exit(2, "demo.py: --truth goes with --image.\n")
    if args.fps <= 0 or args.max_new_tokens < 1:
        p.exit(2, "demo.py: --fps and --max_new_tokens must be positive.\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "demo.py: --device=cuda but no CUDA device is visible; drop --device to run on the CPU.\n")
    return args


# ---------------------------------------------------------------------------------------------
# reading the inputs (each failure is one line)


def read_image(path, flag="--image"):
    """An RGB PIL image, or ValueError/FileNotFoundError naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError:
        raise ValueError(f"{flag} {path}: not an image file (JPEG, PNG, ... that Pillow can read)") from None


def read_video(path):
    """(frame names, frames as PIL images) of a folder of images or a multi-frame image file."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise FileNotFoundError(f"--video {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return [os.path.splitext(n)[0] for n in names], [read_image(os.path.join(path, n), "--video") for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--video {path}: no such file or folder")
    try:
        with Image.open(path) as video:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(video)]
    except OSError:
        raise ValueError(f"--video {path}: not a folder of frames or an animated GIF/WebP/PNG; "
                         "extract the frames first, e.g. ffmpeg -i in.mp4 frames/%05d.jpg") from None
    return [f"{t:05d}" for t in range(len(frames))], frames


def answer_options(args):
    """segment_image / segment_video keywords: the chat question (None: Sa2VA's segmentation prompt), force_seg, max_new_tokens."""
    chat = args.prompt == "chat" or (args.prompt == "auto" and args.text.strip().endswith("?"))
    question = f"<image>\n{args.text.strip()}" if chat else None
    return {"question": question, "force_seg": args.force_seg, "max_new_tokens": args.max_new_tokens}


# ---------------------------------------------------------------------------------------------
# writing


def save_mask_pngs(folder, name, image, mask, caption):
    """name.png (overlay) and name_mask.png (0/255), both of the image's size; returns the overlay path."""
    os.makedirs(folder, exist_ok=True)
    overlay = os.path.join(folder, f"{name}.png")
    Image.fromarray(plot.paint_mask(image, mask, caption)).save(overlay)
    Image.fromarray(plot.as_bool(mask).astype(np.uint8) * 255).save(os.path.join(folder, f"{name}_mask.png"))
    return overlay


def save_gif(paths, path, fps):
    """An endlessly looping animated GIF of PNG files (Pillow's GIF writer)."""
    frames = [Image.open(p).convert("RGB") for p in paths]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path


def has_seg(answer):
    """Whether the answer asks for a mask."""
    return "[SEG]" in answer


# ---------------------------------------------------------------------------------------------
# image and video


def read_truth(path, size):
    """A ground-truth mask PNG as bool (H, W) at the image's size (non-zero = object)."""
    return np.array(read_image(path, "--truth").convert("L").resize(size, Image.NEAREST)) > 0


def run_image(model, tok, image, truth, args):
    """Answer about one image; overlay + mask PNG (and the comparison figure) when it says [SEG]."""
    name = os.path.splitext(os.path.basename(args.image))[0]
    if args.compare:
        masks, maps = plot.compare(model, tok, image, args.text, **answer_options(args))
    else:
        maps = {}
        masks = {"mask": model.segment_image(image, args.text, tok, maps=maps, **answer_options(args))}
    print(f"answer: {maps['answer']}")
    if not has_seg(maps["answer"]):
        print("no [SEG] in the answer: nothing to segment")
        return
    mask = plot.as_bool(next(iter(masks.values())))
    written = [save_mask_pngs(args.out_dir, name, image, mask, args.text)]
    if args.compare:
        fig = plot.mask_figure(image, args.text, masks, *plot.figure_maps(maps), truth=truth, subtitle=f"answer: {maps['answer']}")
        written.append(plot.save_figure(fig, os.path.join(args.out_dir, f"{name}_compare.png")))
    print(f"mask: {int(mask.sum())} pixels ({100 * mask.mean():.1f}% of the image)")
    for path in written:
        print(f"wrote {path}")


def video_masks(model, tok, frames, args, per_frame_maps=None):
    """(answer, masks (list of (H, W) bool)) of segment_video on in-memory frames."""
    maps = {}
    maps_for = per_frame_maps.__getitem__ if per_frame_maps is not None else None
    masks = list(salma.segment_video(model, frames.__getitem__, len(frames), args.text, tok, maps_for=maps_for, maps=maps,
                                     **answer_options(args)))
    return maps["answer"], masks


def run_video(model, tok, names, frames, args):
    """Answer about a video; per-frame overlays, masks and a GIF (and comparison figures) when it says [SEG]."""
    stem = os.path.basename(os.path.normpath(args.video))
    stem = os.path.splitext(stem)[0] if os.path.isfile(args.video) else stem
    per_frame = [{} for _ in frames] if args.compare and model.cfg.mba else None
    answer, masks = video_masks(model, tok, frames, args, per_frame)
    print(f"answer: {answer}")
    if not has_seg(answer):
        print("no [SEG] in the answer: nothing to segment")
        return
    folder = os.path.join(args.out_dir, stem)
    overlays = [save_mask_pngs(folder, n, f, m, args.text) for n, f, m in zip(names, frames, masks)]
    written = [folder + os.sep, save_gif(overlays, os.path.join(args.out_dir, f"{stem}.gif"), args.fps)]
    if args.compare:
        columns = {"SALMA": masks} if model.cfg.mba else {}
        with model.as_baseline():
            columns["baseline (mba=False)"] = video_masks(model, tok, frames, args)[1]
        figures = []
        for t, (n, frame) in enumerate(zip(names, frames)):
            gate, attention = plot.figure_maps(per_frame[t]) if per_frame else (None, None)
            fig = plot.mask_figure(frame, args.text, {k: v[t] for k, v in columns.items()}, gate, attention,
                                   subtitle=f"frame {n} | answer: {answer}")
            figures.append(plot.save_figure(fig, os.path.join(folder, f"{n}_compare.png")))
        written.append(save_gif(figures, os.path.join(args.out_dir, f"{stem}_compare.gif"), args.fps))
    print(f"{len(frames)} frames, mask on {sum(bool(m.any()) for m in masks)} of them")
    for path in written:
        print(f"wrote {path}")


def main(argv=None):
    """Run the demo; see the module docstring."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if args.image:  # bad inputs fail before the model loads
            image = read_image(args.image)
            truth = read_truth(args.truth, image.size) if args.truth else None
        else:
            names, frames = read_video(args.video)
        overrides = {} if args.mba is None else {"mba": args.mba}
        model, tok = checkpoint.model_from_flags(args.ckpt, args.preset, device, args.dtype, **overrides)
        if device.type == "cpu":
            salma.pack_linears_for_cpu(model)  # inference only: oneDNN pre-packed weights, faster GEMMs
        with torch.inference_mode():
            if args.image:
                run_image(model, tok, image, truth, args)
            else:
                run_video(model, tok, names, frames, args)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"demo.py: {e}")


if __name__ == "__main__":
    main()
