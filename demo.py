"""
Segment your own image or video with a sentence, or ask the model a question about it; or serve a web page that does.

  python demo.py --image photo.jpg --text "the cup behind the laptop"              # the model of out/tiny (train.py's)
  python demo.py --image photo.jpg --text "the cup behind the laptop" --compare    # SALMA | G | attention | baseline
  python demo.py --video clip.mp4 --text "the dog running left"                    # .mp4 and other videos, GIFs, frame folders
  python demo.py --image photo.jpg --text "What is on the table?"                  # a question: prints the answer
  python demo.py --serve --ckpt ckpts/Sa2VA-1B                                      # the web app on http://127.0.0.1:7860

--ckpt is a train.py --out_dir (default out/tiny), an official Sa2VA directory or an exported SALMA one. The answer is
printed; when it holds [SEG], the mask is written to --out_dir as an overlay PNG (magenta fill, white
outline, the text as caption) and a 0/255 mask PNG, both of the input's size; a video gives one of each
per frame, an animated GIF of the overlays and a zip of the masks. --compare adds the figure of eval.py
--visualize (plot.compare). --serve answers the same requests in a Gradio page (build_app); a bad upload
or an empty sentence is answered there in one line, and the server keeps serving.
"""

import argparse
import os
import sys
import tempfile
import zipfile

import av
import numpy as np
import torch
from PIL import Image, ImageSequence

import checkpoint
import common
import plot
import mllm
import salma

ROOT = os.path.dirname(os.path.abspath(__file__))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi", ".webm")  # decoded by PyAV


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="", help=f"the model: {checkpoint.CKPT_HELP}")
    p.add_argument("--image", default="", help="an image file (JPEG, PNG, ...)")
    p.add_argument("--video", default="", help="a video file (.mp4, .mkv, .mov, .avi, .webm), a folder of frames (sorted by name) "
                   "or an animated GIF/WebP/PNG")
    p.add_argument("--max_frames", type=int, default=200, help="a longer video is refused with one line (default 200): every frame "
                   "is held in memory and goes through SAM-2")
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
    p.add_argument("--serve", action="store_true", help="start the web app (Gradio) instead of answering one --image/--video")
    p.add_argument("--host", default="127.0.0.1", help="--serve: the address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=7860, help="--serve: the port (default 7860)")
    args = p.parse_args(argv)
    if args.fps <= 0 or args.max_new_tokens < 1 or args.max_frames < 1:
        p.exit(2, "demo.py: --fps, --max_new_tokens and --max_frames must be positive.\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.exit(2, "demo.py: --device=cuda but no CUDA device is visible; drop --device to run on the CPU.\n")
    if args.serve:
        if args.image or args.video or args.text or args.truth:
            p.exit(2, "demo.py: --serve takes its images, videos and sentences in the page; drop --image/--video/--text/--truth.\n")
        return args
    if bool(args.image) == bool(args.video):
        p.exit(2, "demo.py: pass exactly one of --image FILE or --video FOLDER_OR_GIF, and --text.\n")
    if not args.text.strip():
        p.exit(2, "demo.py: pass --text, e.g. --text \"the red circle\" or a question ending in '?'.\n")
    if args.compare and args.mba is False:
        p.exit(2, "demo.py: --compare already shows the baseline next to SALMA; drop --mba=False.\n")
    if args.truth and not args.image:
        p.exit(2, "demo.py: --truth goes with --image.\n")
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


def read_video(path, max_frames):
    """(frame names, frames as PIL images) of a folder of images, a video file (PyAV) or a multi-frame image file."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise FileNotFoundError(f"--video {path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        check_length(path, len(names), max_frames)
        return [os.path.splitext(n)[0] for n in names], [read_image(os.path.join(path, n), "--video") for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--video {path}: no such file or folder")
    frames = decode_video(path, max_frames) if path.lower().endswith(VIDEO_SUFFIXES) else image_frames(path, max_frames)
    return [f"{t:05d}" for t in range(len(frames))], frames


def decode_video(path, max_frames):
    """The frames of a video file, decoded by PyAV; more than max_frames is an error."""
    frames = []
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                check_length(path, len(frames) + 1, max_frames)
                frames.append(frame.to_image().convert("RGB"))
    except av.error.FFmpegError as e:
        raise ValueError(f"--video {path}: not a video PyAV can decode ({e})") from None
    if not frames:
        raise ValueError(f"--video {path}: the video has no frames")
    return frames


def image_frames(path, max_frames):
    """The frames of an animated GIF / WebP / PNG; more than max_frames is an error."""
    try:
        with Image.open(path) as video:
            check_length(path, getattr(video, "n_frames", 1), max_frames)
            return [f.convert("RGB") for f in ImageSequence.Iterator(video)]
    except OSError:
        raise ValueError(f"--video {path}: not a folder of frames, a video file ({', '.join(VIDEO_SUFFIXES)}) "
                         "or an animated GIF/WebP/PNG") from None


def check_length(path, num_frames, max_frames):
    """One clear error for a video longer than --max_frames."""
    if num_frames > max_frames:
        raise ValueError(f"--video {path}: more than {max_frames} frames (--max_frames); trim the video or raise --max_frames")


def is_video(path):
    """Whether an upload is a video: a video file, a folder of frames or a multi-frame image."""
    if os.path.isdir(path) or path.lower().endswith(VIDEO_SUFFIXES):
        return True
    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1) > 1
    except OSError:
        return False  # read_image names the problem


def read_media(path, max_frames, video=None, truth_path=""):
    """The request's input: {"stem", "image", "truth"} or {"stem", "names", "frames"}; video None: decided by the file."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if is_video(path) if video is None else video:
        names, frames = read_video(path, max_frames)
        return {"stem": stem, "names": names, "frames": frames}
    image = read_image(path)
    return {"stem": stem, "image": image, "truth": read_truth(truth_path, image.size) if truth_path else None}


def request_options(args, text):
    """segment_image / segment_video keywords: the chat question (None: Sa2VA's segmentation prompt), force_seg, max_new_tokens."""
    chat = args.prompt == "chat" or (args.prompt == "auto" and text.strip().endswith("?"))
    question = f"<image>\n{text.strip()}" if chat else None
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
# one request: media + text -> answer and files (the command line and the web app share it)


def read_truth(path, size):
    """A ground-truth mask PNG as bool (H, W) at the image's size (non-zero = object)."""
    return np.array(read_image(path, "--truth").convert("L").resize(size, Image.NEAREST)) > 0


def run_image(model, tok, image, name, text, options, out_dir, compare=False, truth=None):
    """Answer about one image -> {"answer", and when it says [SEG]: "mask" (H, W), "overlay", "masks" (mask PNG), "compare"}."""
    if compare:
        masks, maps = plot.compare(model, tok, image, text, **options)
    else:
        maps = {}
        masks = {"mask": model.segment_image(image, text, tok, maps=maps, **options)}
    result = {"answer": maps["answer"]}
    if not has_seg(maps["answer"]):
        return result
    mask = plot.as_bool(next(iter(masks.values())))
    result.update(mask=mask, overlay=save_mask_pngs(out_dir, name, image, mask, text),
                  masks=os.path.join(out_dir, f"{name}_mask.png"))
    if compare:
        fig = plot.mask_figure(image, text, masks, *plot.figure_maps(maps), truth=truth, subtitle=f"answer: {maps['answer']}")
        result["compare"] = plot.save_figure(fig, os.path.join(out_dir, f"{name}_compare.png"))
    return result


def video_masks(model, tok, frames, text, options, per_frame_maps=None):
    """(answer, masks (list of (H, W) bool)) of segment_video on in-memory frames."""
    maps = {}
    maps_for = per_frame_maps.__getitem__ if per_frame_maps is not None else None
    masks = list(salma.segment_video(model, frames.__getitem__, len(frames), text, tok, maps_for=maps_for, maps=maps, **options))
    return maps["answer"], masks


def run_video(model, tok, names, frames, stem, text, options, out_dir, compare=False, fps=5.0):
    """Answer about a video -> {"answer", and when it says [SEG]: "mask" (list of (H, W)), "overlay" (GIF), "folder"
    (per-frame overlays and masks), "masks" (a zip of the mask PNGs), "compare" (GIF)}."""
    per_frame = [{} for _ in frames] if compare and model.cfg.mba else None
    answer, masks = video_masks(model, tok, frames, text, options, per_frame)
    result = {"answer": answer}
    if not has_seg(answer):
        return result
    folder = os.path.join(out_dir, stem)
    overlays = [save_mask_pngs(folder, n, f, m, text) for n, f, m in zip(names, frames, masks)]
    result.update(mask=[plot.as_bool(m) for m in masks], folder=folder + os.sep,
                  overlay=save_gif(overlays, os.path.join(out_dir, f"{stem}.gif"), fps),
                  masks=zip_masks(folder, names, os.path.join(out_dir, f"{stem}_masks.zip")))
    if compare:
        columns = {"SALMA": masks} if model.cfg.mba else {}
        with model.as_baseline():
            columns["baseline (mba=False)"] = video_masks(model, tok, frames, text, options)[1]
        figures = []
        for t, (n, frame) in enumerate(zip(names, frames)):
            gate, attention = plot.figure_maps(per_frame[t]) if per_frame else (None, None)
            fig = plot.mask_figure(frame, text, {k: v[t] for k, v in columns.items()}, gate, attention,
                                   subtitle=f"frame {n} | answer: {answer}")
            figures.append(plot.save_figure(fig, os.path.join(folder, f"{n}_compare.png")))
        result["compare"] = save_gif(figures, os.path.join(out_dir, f"{stem}_compare.gif"), fps)
    return result


def zip_masks(folder, names, path):
    """A zip of the folder's NAME_mask.png files, in frame order."""
    with zipfile.ZipFile(path, "w") as archive:
        for n in names:
            archive.write(os.path.join(folder, f"{n}_mask.png"), f"{n}_mask.png")
    return path


def run(model, tok, media, text, options, out_dir, compare=False, fps=5.0):
    """One request on read_media's input -> run_image's or run_video's result."""
    if not text.strip():
        raise ValueError("the sentence is empty: type what to segment ('the red circle') or a question ending in '?'")
    if "frames" in media:
        return run_video(model, tok, media["names"], media["frames"], media["stem"], text, options, out_dir, compare, fps)
    return run_image(model, tok, media["image"], media["stem"], text, options, out_dir, compare, media["truth"])


def report(result):
    """The command line's account of a request: the answer, the mask's size, the files written."""
    print(f"answer: {result['answer']}")
    if "mask" not in result:
        print("no [SEG] in the answer: nothing to segment")
        return
    if isinstance(result["mask"], list):
        print(f"{len(result['mask'])} frames, mask on {sum(bool(m.any()) for m in result['mask'])} of them")
        written = [result["folder"], result["overlay"], result["masks"]]
    else:
        mask = result["mask"]
        print(f"mask: {int(mask.sum())} pixels ({100 * mask.mean():.1f}% of the image)")
        written = [result["overlay"], result["masks"]]
    for path in written + ([result["compare"]] if "compare" in result else []):
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# the web app (--serve): the same requests through Gradio


EXAMPLES = [["docs/demo_scene.png", "the small red circle", True], ["docs/demo_clip.gif", "the blue square moving right", False],
            ["docs/demo_scene.png", "What is in this picture?", False]]


def build_app(model, tok, args):
    """A Gradio Blocks app: media + sentence (+ compare) -> answer, overlay, comparison figure, masks; errors in the page."""
    import gradio as gr

    def respond(media, text, compare):
        if not media:
            raise gr.Error("upload an image (JPEG, PNG, ...) or a video (.mp4, .gif) first")
        out_dir = tempfile.mkdtemp(prefix="salma_demo_")
        try:
            with torch.inference_mode():
                request = read_media(media, args.max_frames)
                result = run(model, tok, request, text or "", request_options(args, text or ""), out_dir, compare, args.fps)
        except (FileNotFoundError, ValueError) as e:
            message = str(e).replace(media, os.path.basename(media)).replace("--image ", "").replace("--video ", "")
            raise gr.Error(message) from None  # shown in the page; the server goes on
        return result["answer"], result.get("overlay"), result.get("compare"), result.get("masks")

    with gr.Blocks(title="salma: referring segmentation") as app:
        gr.Markdown(f"## salma: referring segmentation\nModel: `{args.ckpt or checkpoint.DEFAULT_RUN}`. Upload an image or a "
                    f"video (.mp4, .gif; at most {args.max_frames} frames), type what to segment or a question ending in '?'.")
        with gr.Row():
            with gr.Column():
                media = gr.File(label="image or video", file_types=["image", "video", ".gif"], type="filepath")
                text = gr.Textbox(label="sentence", placeholder="the small red circle")
                compare = gr.Checkbox(label="compare: SALMA | gate G | MBA attention | baseline (mba=False)", value=False)
                button = gr.Button("Segment", variant="primary")
            with gr.Column():
                answer = gr.Textbox(label="answer")
                overlay = gr.Image(label="mask (a video: animated)", type="filepath", format="png")
                figure = gr.Image(label="comparison", type="filepath", format="png")
                masks = gr.File(label="mask PNG (a video: zip of per-frame PNGs)")
        gr.Examples([[os.path.join(ROOT, p), t, c] for p, t, c in EXAMPLES], [media, text, compare])
        button.click(respond, [media, text, compare], [answer, overlay, figure, masks], api_name="segment")
    return app


def serve(model, tok, args):
    """Start the web app on --host:--port and block; each bad request is answered in the page, the server keeps going."""
    app = build_app(model, tok, args)
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, show_error=True)


def main(argv=None):
    """Run the demo (one request, or the web app with --serve); see the module docstring."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        if not args.serve:  # bad inputs fail before the model loads
            media = read_media(args.image or args.video, args.max_frames, video=bool(args.video), truth_path=args.truth)
        overrides = {} if args.mba is None else {"mba": args.mba}
        model, tok = checkpoint.model_from_flags(args.ckpt, args.preset, device, args.dtype, **overrides)
        if device.type == "cpu":
            mllm.pack_linears_for_cpu(model)  # inference only: oneDNN pre-packed weights, faster GEMMs
        if args.serve:
            return serve(model, tok, args)
        with torch.inference_mode():
            report(run(model, tok, media, args.text, request_options(args, args.text), args.out_dir, args.compare, args.fps))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"demo.py: {e}")


if __name__ == "__main__":
    main()
