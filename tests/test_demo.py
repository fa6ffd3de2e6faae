"""demo.py, plot.py and train.py's curves on a tiny trained checkpoint and generated scenes."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import av
import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import demo
import fixtures
import metrics
import plot
import salma
import testbed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (200, 150)  # W x H, not square: a swapped axis shows up as a wrong size




def run_demo(*flags, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def scene(video):
    """A generated image or video sample of SIZE."""
    dataset = testbed.SyntheticRefDataset(10, image_size=SIZE, seed=10_000, video_fraction=float(video))
    return next(s for s in (dataset[i] for i in range(10)) if s["exprs"])


# ---------------------------------------------------------------------------------------------
# train.py: curves and summary


@pytest.mark.slow
def test_short_run_writes_curves_png_and_a_summary_line(trained):
    out, stdout = trained
    curves = Image.open(os.path.join(out, "curves.png"))
    assert curves.format == "PNG" and curves.width >= 800 and curves.height >= 300
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"trained {fixtures.TRAINED_STEPS} steps") and f"checkpoint {os.path.join(out, 'ckpt.pt')}" in last
    assert all(f"{part} " in last for part in ("loss", "lm", "bce", "dice", "tmc", "bound")) and "s wall" in last


@pytest.mark.slow
def test_plot_entry_point_on_a_log(trained, tmp_path):
    out, _ = trained
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), os.path.join(out, "log.jsonl"), f"--out={tmp_path / 'c.png'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "c.png").format == "PNG" and proc.stdout.startswith(f"{fixtures.TRAINED_STEPS} steps")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(tmp_path / "missing.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]


# ---------------------------------------------------------------------------------------------
# the demo end to end


@pytest.mark.slow
def test_demo_on_a_generated_image_writes_overlay_mask_and_figure_of_its_size(trained, tmp_path):
    sample = scene(video=False)
    image, expr = sample["frames"][0], sample["exprs"][0]
    image.save(tmp_path / "scene.png")
    Image.fromarray(sample["masks"][0, 0].numpy().astype(np.uint8) * 255).save(tmp_path / "truth.png")
    proc = run_demo(f"--ckpt={trained[0]}", f"--image={tmp_path / 'scene.png'}", f"--text={expr}", "--force_seg=True",
                    "--compare", f"--truth={tmp_path / 'truth.png'}", f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    assert "answer: Sure, [SEG]." in proc.stdout
    overlay = np.array(Image.open(tmp_path / "out" / "scene.png"))
    mask = np.array(Image.open(tmp_path / "out" / "scene_mask.png"))
    assert overlay.shape == (SIZE[1], SIZE[0], 3) and mask.shape == (SIZE[1], SIZE[0])
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(overlay, plot.paint_mask(image, mask > 0, expr))  # what the file shows is the mask
    figure = Image.open(tmp_path / "out" / "scene_compare.png")
    assert figure.width == 6 * (SIZE[0] + 10) + 10  # image | SALMA | G | attention | baseline | ground truth


@pytest.mark.slow
def test_demo_on_a_generated_video_writes_per_frame_files_and_gifs(trained, tmp_path):
    sample = scene(video=True)
    frames, expr = sample["frames"], sample["exprs"][0]
    os.makedirs(tmp_path / "clip")
    for t, frame in enumerate(frames):
        frame.save(tmp_path / "clip" / f"{t:05d}.png")
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=200)
    for source, flags in ((tmp_path / "clip", ()), (tmp_path / "clip.gif", ("--compare",))):
        out = tmp_path / f"out_{source.suffix or 'dir'}"
        proc = run_demo(f"--ckpt={trained[0]}", f"--video={source}", f"--text={expr}", "--force_seg=True", f"--out_dir={out}", *flags)
        assert proc.returncode == 0, proc.stderr
        names = sorted(os.listdir(out / "clip"))
        assert [n for n in names if n.endswith("_mask.png")] == [f"{t:05d}_mask.png" for t in range(len(frames))]
        for t in range(len(frames)):
            assert Image.open(out / "clip" / f"{t:05d}.png").size == SIZE
            assert Image.open(out / "clip" / f"{t:05d}_mask.png").size == SIZE
        gif = Image.open(out / "clip.gif")
        assert gif.size == SIZE and gif.n_frames == len(frames)
    assert Image.open(out / "clip_compare.gif").n_frames == len(frames)


def write_mp4(path, frames, fps=5):
    """frames (PIL, even sides) as an MPEG-4 Part 2 video (PyAV's built-in encoder); returns the frames as PyAV decodes them."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        return [f.to_image().convert("RGB") for f in container.decode(video=0)]


def masks_of(model, tok, frames, expr):
    """segment_video's masks (teacher-forced answer) of in-memory frames, as the demo's 0/255 PNGs hold them."""
    with torch.inference_mode():
        masks = salma.segment_video(model, frames.__getitem__, len(frames), expr, tok, force_seg=True)
        return [m.numpy().astype(np.uint8) * 255 for m in masks]


@pytest.mark.slow
def test_demo_reads_mp4_with_pyav_and_refuses_a_video_over_max_frames(trained, tmp_path):
    """An .mp4 is decoded by PyAV: the demo's per-frame masks are segment_video's on the frames PyAV decodes."""
    sample = scene(video=True)
    expr = sample["exprs"][0]
    decoded = write_mp4(tmp_path / "clip.mp4", sample["frames"])
    assert len(decoded) == len(sample["frames"])
    proc = run_demo(f"--ckpt={trained[0]}", f"--video={tmp_path / 'clip.mp4'}", f"--text={expr}", "--force_seg=True",
                    f"--out_dir={tmp_path / 'out'}")
    assert proc.returncode == 0, proc.stderr
    model, tok = checkpoint.load_model(trained[0])
    for t, expected in enumerate(masks_of(model, tok, decoded, expr)):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "out" / "clip" / f"{t:05d}_mask.png")), expected)
    with zipfile.ZipFile(tmp_path / "out" / "clip_masks.zip") as archive:
        assert archive.namelist() == [f"{t:05d}_mask.png" for t in range(len(decoded))]
    proc = run_demo(f"--ckpt={trained[0]}", f"--video={tmp_path / 'clip.mp4'}", f"--text={expr}", "--max_frames=3")
    fixtures.assert_one_line_error(proc, "clip.mp4", "--max_frames")


def free_port():
    """A TCP port nothing on this machine listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def web_app(trained):
    """demo.py --serve on a free local port with the tiny trained model (answers teacher-forced); yields its URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "demo.py"), "--serve", f"--ckpt={trained[0]}", f"--port={port}",
                               "--force_seg=True"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):  # the model loads, then Gradio starts: poll until it answers (or the server died)
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_web_app_answers_like_the_command_line_and_keeps_serving_after_a_bad_upload(web_app, trained, tmp_path):
    """Through real HTTP (gradio_client): an image and a video give the masks demo.py writes for the same inputs;
    a file that is no image, and an empty sentence, give one clear message; the next good request still works."""
    from gradio_client import Client, handle_file

    client = Client(web_app, verbose=False)
    image_sample, video_sample = scene(video=False), scene(video=True)
    image_sample["frames"][0].save(tmp_path / "scene.png")
    frames = video_sample["frames"]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=200)
    cases = [(tmp_path / "scene.png", image_sample["exprs"][0]), (tmp_path / "clip.gif", video_sample["exprs"][0])]
    for source, expr in cases:
        answer, overlay, figure, masks = client.predict(handle_file(str(source)), expr, True, api_name="/segment")
        assert answer == "Sure, [SEG]." and overlay and figure and masks
        proc = run_demo(f"--ckpt={trained[0]}", f"--{'video' if source.suffix == '.gif' else 'image'}={source}", f"--text={expr}",
                        "--force_seg=True", f"--out_dir={tmp_path / 'cli'}")
        assert proc.returncode == 0, proc.stderr
        if source.suffix == ".gif":
            with zipfile.ZipFile(masks) as archive:
                assert archive.namelist() == [f"{t:05d}_mask.png" for t in range(len(frames))]
                for name in archive.namelist():
                    served = np.array(Image.open(archive.open(name)))
                    np.testing.assert_array_equal(served, np.array(Image.open(tmp_path / "cli" / "clip" / name)))
            assert Image.open(overlay).n_frames == len(frames)  # the video's overlay plays
        else:
            np.testing.assert_array_equal(np.array(Image.open(masks)), np.array(Image.open(tmp_path / "cli" / "scene_mask.png")))
    (tmp_path / "notes.png").write_text("not an image")
    for upload, text, message in ((tmp_path / "notes.png", "the red circle", "not an image file"),
                                  (tmp_path / "scene.png", "  ", "the sentence is empty")):
        with pytest.raises(Exception, match=message):
            client.predict(handle_file(str(upload)), text, False, api_name="/segment")
    answer, overlay, figure, masks = client.predict(handle_file(str(tmp_path / "scene.png")), "the red circle", False, api_name="/segment")
    assert answer == "Sure, [SEG]." and masks and figure is None


@pytest.mark.slow
def test_a_question_without_seg_prints_the_answer_and_writes_nothing(trained, tmp_path, monkeypatch, capsys):
    model, tok = checkpoint.load_model(trained[0])
    seg, period = tok.token_to_id("[SEG]"), tok.encode(".").ids[0]
    real_generate, prompts = model.mllm.generate, []

    def never_seg(input_ids, *args, **kwargs):  # the model as it is, except that it never answers [SEG]
        prompts.append(tok.decode(input_ids[0].tolist()))
        ids, hidden = real_generate(input_ids, *args, **kwargs)
        return torch.where(ids == seg, period, ids), hidden

    monkeypatch.setattr(model.mllm, "generate", never_seg)
    monkeypatch.setattr(checkpoint, "model_from_flags", lambda *args, **kwargs: (model, tok))
    scene(video=False)["frames"][0].save(tmp_path / "scene.png")
    demo.main([f"--ckpt={trained[0]}", f"--image={tmp_path / 'scene.png'}", "--text=What colour is the circle?",
               f"--out_dir={tmp_path / 'out'}"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("answer: ") and "[SEG]" not in printed[0]
    assert printed[1:] == ["no [SEG] in the answer: nothing to segment"]
    assert "What colour is the circle?" in prompts[0] and "segment" not in prompts[0]  # asked as written
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_bad_inputs_and_missing_checkpoint_give_one_line(trained, tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    image = tmp_path / "scene.png"
    scene(video=False)["frames"][0].save(image)
    cases = {
        "no such file": [f"--ckpt={trained[0]}", f"--image={tmp_path / 'missing.jpg'}", "--text=the red circle"],
        "not an image file": [f"--ckpt={trained[0]}", f"--image={tmp_path / 'notes.jpg'}", "--text=the red circle"],
        "not a directory": [f"--ckpt={tmp_path / 'no_ckpt'}", f"--image={image}", "--text=the red circle"],
        "config.json": [f"--ckpt={tmp_path}", f"--image={image}", "--text=the red circle"],  # a folder with no model
        "pass --ckpt": [f"--image={image}", "--text=the red circle"],
        "no such file or folder": [f"--ckpt={trained[0]}", f"--video={tmp_path / 'missing'}", "--text=the red circle"],
    }
    for expected, flags in cases.items():
        proc = run_demo(*flags, cwd=tmp_path)  # a folder without out/tiny: no default checkpoint there
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0] and lines[0].startswith("demo.py: "), (flags, proc.stderr)


@pytest.mark.slow
def test_help_documents_every_flag():
    proc = run_demo("--help")
    assert proc.returncode == 0
    for flag in ("--ckpt", "--image", "--video", "--text", "--prompt", "--mba", "--compare", "--truth", "--force_seg",
                 "--max_new_tokens", "--out_dir", "--fps", "--preset", "--device", "--dtype", "--max_frames", "--serve", "--host",
                 "--port"):
        assert flag in proc.stdout


# ---------------------------------------------------------------------------------------------
# the figure function


def test_mask_figure_has_labelled_panels_titles_with_iou_and_the_painted_masks(tmp_path):
    sample = scene(video=False)
    image, truth = sample["frames"][0], sample["masks"][0, 0]
    shifted = torch.roll(truth, 4, dims=1)
    expected_iou = (shifted & truth).sum().item() / (shifted | truth).sum().item()
    gate, attention = torch.rand(16, 16), torch.rand(16, 16)
    fig = plot.mask_figure(image, "the thing", {"SALMA": shifted, "baseline (mba=False)": torch.zeros_like(truth)},
                           gate, attention, truth=truth, subtitle="answer: Sure, [SEG].")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["image", "SALMA", "gate G (pre-pass)", "MBA attention\n(on the top word)",
                                                 "baseline (mba=False)", "ground truth"]
    title = fig.texts[0].get_text()
    assert '"the thing"' in title and f"SALMA {expected_iou:.2f}" in title and "baseline (mba=False) 0.00" in title
    assert len(fig.axes) == len(panels) + 2  # one colour bar each for G and the attention
    # each mask panel shows paint_mask of its mask, pixel for pixel, at the image's native size
    rendered = np.array(Image.open(plot.save_figure(fig, str(tmp_path / "figure.png"))).convert("RGB"))
    for ax, mask in ((panels[1], shifted), (panels[5], truth)):
        box = ax.get_window_extent()
        top, left = round(fig.bbox.height - box.y1), round(box.x0)
        assert (round(box.width), round(box.height)) == image.size
        shown = rendered[top:top + image.height, left:left + image.width].astype(int)
        inside = (slice(1, -1), slice(1, -1))  # the axes' frame covers the border pixels
        assert np.abs(shown[inside] - plot.paint_mask(image, mask)[inside]).mean() < 1


def test_painted_mask_stays_visible_on_every_scene_colour():
    for name, colour in testbed.COLOURS.items():
        image = Image.new("RGB", (40, 40), colour)
        mask = np.zeros((40, 40), bool)
        mask[10:30, 10:30] = True
        painted = plot.paint_mask(image, mask).astype(int)
        fill = painted[20, 20]
        assert np.abs(fill - np.array(colour)).sum() > 100, name  # the fill is far from the object's colour
        edge = plot.boundary_band(mask, 2)
        assert (painted[edge] == 255).all(-1).any() and (painted[edge] == 0).all(-1).any(), name  # white and black
        assert (painted[~metrics.dilate(mask, 3)] == colour).all(), name  # untouched away from the mask
