"""eval.py: metrics on hand-made masks, F against an independent formulation, end-to-end runs."""

import json
import math
import os
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fixtures
import eval as ev
import salma
import testbed
import checkpoint
import metrics
import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


# ---------------------------------------------------------------------------------------------
# cIoU / gIoU


def test_ciou_giou_hand_computed_with_edge_cases():
    """A missing prediction is left out of cIoU and counts 0 in gIoU: Sa2VA projects/llava_sam2/evaluation/dataset/RES.py evaluate."""
    meter = metrics.RefSegMeter()
    meter.add(box(10, 10, 0, 2, 0, 2), box(10, 10, 0, 2, 0, 4))  # I=4, U=8 -> 0.5
    meter.add(np.zeros((10, 10), bool), np.zeros((10, 10), bool))  # both empty -> IoU 1, I=U=0
    meter.add(None, box(10, 10, 9, 10, 9, 10))  # missing: not in cIoU, 0 in gIoU
    meter.add(box(10, 10, 0, 10, 0, 10), np.zeros((10, 10), bool))  # empty GT, full prediction -> 0, U=100
    r = meter.result()
    assert r["N"] == 4 and r["missing"] == 1
    assert r["cIoU"] == pytest.approx(100 * 4 / (8 + 0 + 100))
    assert r["gIoU"] == pytest.approx(100 * (0.5 + 1 + 0 + 0) / 4)
    assert r["Nall"] == 3


def test_ciou_by_area_buckets():
    meter = metrics.RefSegMeter()
    meter.add(box(100, 100, 0, 1, 0, 1), box(100, 100, 0, 1, 0, 1))  # area 0.01%: perfect
    meter.add(np.zeros((100, 100), bool), box(100, 100, 0, 3, 0, 5))  # 0.15%: missed (U = 15)
    meter.add(box(100, 100, 0, 10, 0, 10), box(100, 100, 0, 10, 0, 20))  # 2%: I=100, U=200
    r = meter.result()
    assert (r["N<1%"], r["N<2%"], r["N<5%"], r["Nall"]) == (2, 2, 3, 3)
    assert r["cIoU<1%"] == pytest.approx(100 * 1 / 16)
    assert r["cIoU<5%"] == pytest.approx(100 * 101 / 216) == r["cIoUall"]


# ---------------------------------------------------------------------------------------------
# J and F (DAVIS-2017 semantics)


def test_j_hand_computed():
    assert metrics.iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0
    assert metrics.iou(box(4, 4, 0, 2, 0, 2), np.zeros((4, 4), bool)) == 0.0
    assert metrics.iou(box(4, 4, 0, 2, 0, 2), box(4, 4, 0, 2, 0, 4)) == 0.5


def test_seg2bmap_of_a_square():
    b = metrics.seg2bmap(box(6, 6, 1, 4, 1, 4))  # a 3x3 square at rows/cols 1..3
    expected = np.zeros((6, 6), bool)
    # a pixel is boundary when it differs from its east, south or south-east neighbour: the pixels just
    # above/left of the square, and the square's own bottom row and right column
    expected[0, 0:4] = expected[0:4, 0] = expected[3, 1:4] = expected[1:4, 3] = True
    assert (b == expected).all()
    # a mask touching the borders: the image edge is no boundary (last row/column compare along the edge only)
    assert not metrics.seg2bmap(np.ones((3, 3), bool)).any()
    right = metrics.seg2bmap(box(3, 3, 0, 3, 1, 3))  # columns 1-2 filled: only column 0 (left of the edge) is boundary
    assert right.tolist() == [[True, False, False], [True, False, False], [True, False, False]]


def test_f_edge_cases():
    empty, square = np.zeros((20, 20), bool), box(20, 20, 5, 10, 5, 10)
    assert metrics.f_measure(empty, empty) == 1.0
    assert metrics.f_measure(square, empty) == 0.0  # no predicted boundary: precision 1, recall 0
    assert metrics.f_measure(empty, square) == 0.0  # no GT boundary: precision 0, recall 1
    assert metrics.f_measure(square, square) == 1.0
    pixel = box(20, 20, 19, 20, 19, 20)  # a one-pixel object in the corner: its 3 up/left neighbours are boundary
    assert metrics.seg2bmap(pixel).sum() == 3 and metrics.f_measure(pixel, pixel) == 1.0
    far = box(20, 20, 0, 1, 0, 1)  # radius ceil(0.008 * 28.3) = 1 px: far-apart pixels do not match
    assert metrics.f_measure(pixel, far) == 0.0


def f_by_distances(gt, pred, bound_th=0.008):
    """F written differently: a boundary pixel matches if one of the other's lies within the disk radius."""
    radius = math.ceil(bound_th * math.hypot(*gt.shape))
    pb, gb = np.argwhere(metrics.seg2bmap(pred)), np.argwhere(metrics.seg2bmap(gt))
    if len(pb) == 0 and len(gb) == 0:
        return 1.0
    if len(pb) == 0 or len(gb) == 0:
        return 0.0
    d2 = ((pb[:, None, :] - gb[None, :, :]) ** 2).sum(-1)
    precision = (d2.min(1) <= radius * radius).mean()
    recall = (d2.min(0) <= radius * radius).mean()
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_f_measure_matches_a_per_pixel_distance_formulation():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(20, 200, 2)
        gt = np.zeros((h, w), bool)
        pred = np.zeros((h, w), bool)
        for m in (gt, pred):
            for _ in range(rng.integers(0, 3)):
                y, x = rng.integers(0, h), rng.integers(0, w)
                m[y:y + rng.integers(1, h // 2 + 2), x:x + rng.integers(1, w // 2 + 2)] = True
        assert metrics.f_measure(gt, pred) == pytest.approx(f_by_distances(gt, pred), abs=1e-12)


def test_jf_meter_averages_per_expression_over_all_frames():
    meter = metrics.JFMeter()
    sq = box(20, 20, 5, 10, 5, 10)
    meter.add("a", [sq, None], [sq, sq])  # J: 1, 0 ; F: 1, 0
    meter.add("b", [sq], [sq])
    r = meter.result()
    assert r["J"] == pytest.approx(100 * (0.5 + 1) / 2) and r["F"] == pytest.approx(75.0) and r["J&F"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="2 predicted frames for 1"):
        meter.add("c", [sq, sq], [sq])


# ---------------------------------------------------------------------------------------------
# ReVOS: A and R as VISA's evaluator


def visa_accuracy_robustness(gt, pred, foreground):
    """VISA tools/metrics.py get_r2vos_accuracy / get_r2vos_robustness, on uint8 0/1 masks as tools/eval_revos.py builds them."""
    gt, pred, foreground = (m.astype(np.uint8) for m in (gt, pred, foreground))
    neg = ((1 - gt) * pred).sum()
    return np.mean(gt == pred), max(1 - neg / (foreground.sum() + 1e-6), 0.0)


def test_accuracy_and_robustness_match_visa():
    rng = np.random.default_rng(0)
    for _ in range(50):
        gt = rng.random((20, 30)) < 0.2
        foreground = gt | (rng.random((20, 30)) < rng.random())
        pred = rng.random((20, 30)) < rng.random() * 0.5
        a, r = visa_accuracy_robustness(gt, pred, foreground)
        assert metrics.accuracy(gt, pred) == pytest.approx(a) and metrics.robustness(gt, pred, foreground) == pytest.approx(r)
    assert metrics.robustness(box(10, 10, 0, 2, 0, 2), box(10, 10, 0, 10, 0, 10), box(10, 10, 0, 2, 0, 5)) == 0.0  # clipped at 0


def test_revos_summary_averages_the_two_subsets():
    """VISA tools/eval_revos.py: per subset (type_id 0 referring, 1 reasoning) means; overall = mean of the two subset means."""
    rows = [{"type_id": 0, "J": 0.2, "F": 0.4, "A": 0.9, "R": 0.5}, {"type_id": 0, "J": 0.4, "F": 0.6, "A": 0.7, "R": 0.7},
            {"type_id": 1, "J": 0.9, "F": 1.0, "A": 1.0, "R": 1.0}]
    r = metrics.summarize(rows, is_video=True)
    assert r["referring_J"] == pytest.approx(30) and r["referring_J&F"] == pytest.approx(40) and r["reasoning_R"] == pytest.approx(100)
    assert r["J"] == pytest.approx((30 + 90) / 2) and r["J&F"] == pytest.approx((40 + 95) / 2) and r["R"] == pytest.approx((60 + 100) / 2)
    assert (r["N"], r["N_referring"], r["N_reasoning"]) == (3, 2, 1)


# ---------------------------------------------------------------------------------------------
# end to end: a tiny trained checkpoint on synthetic, RefCOCOg and MeViS fixtures, the YTVOS zip


def run_eval(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--quiet", *flags], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_eval_synthetic_images_and_videos_write_every_field(run_dir, tmp_path):
    for dataset, fields in (("synthetic", {"cIoU", "gIoU", "cIoU<1%", "cIoU<2%", "cIoU<5%", "cIoUall", "N"}),
                            ("synthetic_video", {"J", "F", "J&F", "N"})):
        out = tmp_path / dataset
        proc = run_eval(f"--dataset={dataset}", f"--ckpt={run_dir}", "--num_samples=3", f"--out_dir={out}", "--force_seg=True")
        assert proc.returncode == 0, proc.stderr
        metrics = json.load(open(out / "metrics.json"))
        assert fields | {"dataset", "mba"} <= set(metrics) and metrics["N"] >= 3
        assert "items_per_s" in json.load(open(out / "speed.json"))
        assert len(open(out / "predictions.jsonl").readlines()) == metrics["N"]
        if dataset == "synthetic":  # every image expression's mask is classed by the objects it took
            assert all(sum(kind["outcomes"].values()) == kind["N"] for kind in metrics["by_kind"].values())


def test_mask_outcome_names_the_objects_a_mask_took():
    """On a generated scene: the target's own mask, it with a neighbour, a neighbour alone, and a sliver."""
    scene = testbed.SyntheticRefDataset(1, video_fraction=0.0)[0]
    _, objects = testbed.render(scene["objects"], scene["frames"][0].size)
    objects = objects.numpy()
    target, other = scene["targets"][0], (scene["targets"][0] + 1) % len(objects)
    assert ev.mask_outcome(objects[target], objects, target) == "target"
    assert ev.mask_outcome(objects[target] | objects[other], objects, target) == "target+others"
    assert ev.mask_outcome(objects[other], objects, target) == "others"
    rows = np.flatnonzero(objects[target].any(1))
    sliver = objects[target].copy()
    sliver[rows[len(rows) // 4]:] = False  # the top quarter of its rows: under half of its pixels
    assert ev.mask_outcome(sliver, objects, target) == "none"
    assert ev.mask_outcome(np.zeros_like(sliver), objects, target) == "none"


@pytest.mark.slow
def test_a_killed_eval_resumed_ends_with_the_same_metrics_json(run_dir, tmp_path):
    """eval.py writes each item's predictions as it makes them; killed and rerun with --resume it predicts only
    the rest and writes metrics.json byte for byte as an uninterrupted run; other flags on --resume: one line."""
    flags = [f"--ckpt={run_dir}", "--num_samples=60", "--force_seg=True"]
    whole = run_eval(*flags, f"--out_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.stderr
    progress = tmp_path / "cut" / "progress.rank0_of_1.jsonl"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), "--quiet", *flags, f"--out_dir={tmp_path / 'cut'}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (progress.exists() and len(progress.read_text().splitlines()) >= 4):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "cut" / "metrics.json").exists()  # killed before the end
    done = len(progress.read_text().splitlines()) - 1  # the header, then one line per item
    resumed = run_eval(*flags, f"--out_dir={tmp_path / 'cut'}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume: {done} of 60 items read back" in resumed.stdout or f"--resume: {done - 1} of 60" in resumed.stdout
    assert (tmp_path / "cut" / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()
    assert len(progress.read_text().splitlines()) == 61
    other = run_eval(f"--ckpt={run_dir}", "--num_samples=5", f"--out_dir={tmp_path / 'cut'}", "--resume")
    fixtures.assert_one_line_error(other, "--resume", "progress.rank0_of_1.jsonl")


@pytest.mark.slow
def test_a_checkpoint_evaluates_and_exports_the_same_every_time(run_dir, tmp_path):
    """Every weight, the frozen SAM-2 image encoder included, comes back from the run directory."""
    runs = []
    for name in ("a", "b"):
        proc = run_eval(f"--ckpt={run_dir}", "--num_samples=4", f"--out_dir={tmp_path / name}", "--force_seg=True")
        assert proc.returncode == 0, proc.stderr
        runs.append((open(tmp_path / name / "metrics.json").read(), open(tmp_path / name / "predictions.jsonl").read()))
    assert runs[0] == runs[1]
    for name in ("x", "y"):
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={run_dir}", f"--export={tmp_path / name}"],
                       cwd=ROOT, check=True, capture_output=True)
    x, y = (load_file(tmp_path / name / "model.safetensors") for name in ("x", "y"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    state = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)["model"]
    encoder = [k for k in state if k.startswith("grounding.sam2_model.image_encoder.")]
    assert encoder and all(torch.equal(state[k], x[checkpoint.rename_key(k, to_ours=False)]) for k in encoder)


@pytest.mark.slow
def test_eval_refcocog_fixture_and_baseline_on_the_same_checkpoint(run_dir, tmp_path):

    fixtures.refcoco_fixture(tmp_path)
    for mba in ("True", "False"):
        out = tmp_path / f"out_{mba}"
        proc = run_eval("--dataset=refcocog", f"--data_root={tmp_path}", f"--ckpt={run_dir}", f"--mba={mba}", f"--out_dir={out}",
                        "--max_new_tokens=24")  # generated, as Sa2VA evaluates; a 30-step model rarely stops by itself
        assert proc.returncode == 0, proc.stderr
        metrics = json.load(open(out / "metrics.json"))
        rows = [json.loads(line) for line in open(out / "predictions.jsonl")]
        assert metrics["N"] == 5 and metrics["mba"] == (mba == "True") and 0 <= metrics["cIoU"] <= 100
        assert metrics["missing"] == sum(r["missing"] for r in rows)  # generated answers without [SEG], counted


@pytest.mark.slow
def test_eval_mevis_fixture(run_dir, tmp_path):

    fixtures.mevis_fixture(tmp_path, "valid_u")
    proc = run_eval("--dataset=mevis", f"--data_root={tmp_path}", f"--ckpt={run_dir}", f"--out_dir={tmp_path / 'out'}", "--force_seg=True")
    assert proc.returncode == 0, proc.stderr
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert metrics["N"] == 3 and {"J", "F", "J&F"} <= set(metrics)


def zip_contents(path):
    """{name: set of pixel values} of the PNGs in a submission zip."""
    from PIL import Image

    with zipfile.ZipFile(path) as z:
        return {name: set(np.unique(np.array(Image.open(z.open(name)))).tolist()) for name in z.namelist()}


@pytest.mark.slow
def test_eval_ytvos_valid_writes_the_challenge_zip(run_dir, tmp_path):
    """Ref-YouTube-VOS valid (ReferFormer inference_ytvos.py): the test videos are dropped; the zip holds
    Annotations/<video>/<exp_id>/<frame>.png with 0/255 masks."""

    frames = fixtures.ytvos_fixture(tmp_path / "ytvos")
    proc = run_eval("--dataset=ytvos", f"--data_root={tmp_path}", f"--ckpt={run_dir}", f"--out_dir={tmp_path / 'out'}", "--force_seg=True")
    assert proc.returncode == 0, proc.stderr
    contents = zip_contents(tmp_path / "out" / "submission.zip")
    assert sorted(contents) == [f"Annotations/vval/{e}/{f}.png" for e in ("0", "1") for f in frames[:2]]
    assert set().union(*contents.values()) <= {0, 255}
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    assert "N" not in metrics and metrics["expressions"] == 2 and "submission.zip" in proc.stdout


@pytest.mark.slow
def test_eval_mevis_valid_writes_the_codalab_zip(run_dir, tmp_path):
    """MeViS valid (henghuiding/MeViS README, CodaLab guideline): <video>/<exp_id>/<frame>.png at the zip root."""

    fixtures.mevis_fixture(tmp_path, "valid", with_masks=False)
    proc = run_eval("--dataset=mevis", "--split=valid", f"--data_root={tmp_path}", f"--ckpt={run_dir}", f"--out_dir={tmp_path / 'out'}", "--force_seg=True")
    assert proc.returncode == 0, proc.stderr
    contents = zip_contents(tmp_path / "out" / "submission.zip")
    assert sorted(contents) == [f"v/{e}/{f:05d}.png" for e in ("0", "1", "2") for f in range(3)]
    assert set().union(*contents.values()) <= {0, 255} and "submission.zip" in proc.stdout


@pytest.mark.slow
def test_eval_davis17_sa2va_layout(run_dir, tmp_path):
    """Ref-DAVIS17 valid from Sa2VA's valid/mask_dict.pkl, scored per expression over all frames (Sa2VA tools/eval/eval_davis.py)."""

    fixtures.davis_fixture(tmp_path / "davis17", "sa2va")
    proc = run_eval("--dataset=davis17", f"--data_root={tmp_path}", f"--ckpt={run_dir}", f"--out_dir={tmp_path / 'out'}",
                    "--force_seg=True", "--limit=3")
    assert proc.returncode == 0, proc.stderr
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert metrics["N"] == 3 and metrics["split"] == "valid"
    assert metrics["J&F"] == pytest.approx(100 * (np.mean([r["J"] for r in rows]) + np.mean([r["F"] for r in rows])) / 2)


@pytest.mark.slow
def test_eval_revos_scores_both_subsets_with_robustness(run_dir, tmp_path):
    """ReVOS valid in the released layout (cilinyan/ReVOS-api), scored as VISA tools/eval_revos.py."""

    fixtures.revos_fixture(tmp_path)
    proc = run_eval("--dataset=revos", f"--data_root={tmp_path}", f"--ckpt={run_dir}", f"--out_dir={tmp_path / 'out'}", "--force_seg=True")
    assert proc.returncode == 0, proc.stderr
    metrics = json.load(open(tmp_path / "out" / "metrics.json"))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert (metrics["N"], metrics["N_referring"], metrics["N_reasoning"]) == (3, 2, 1)
    assert [r["type_id"] for r in rows] == [0, 1, 0] and all(0 <= r["R"] <= 1 for r in rows)
    referring = np.mean([r["R"] for r in rows if r["type_id"] == 0])
    assert metrics["R"] == pytest.approx(100 * (referring + rows[1]["R"]) / 2)


@pytest.mark.slow
def test_eval_without_data_says_what_to_download():
    proc = run_eval("--dataset=mevis", "--data_root=/nonexistent")
    assert proc.returncode != 0
    assert "mask_dict.json" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_visualize_writes_side_by_side_figures(run_dir, tmp_path):
    proc = run_eval(f"--ckpt={run_dir}", "--visualize=1", f"--out_dir={tmp_path}", "--force_seg=True")
    assert proc.returncode == 0, proc.stderr
    from PIL import Image

    figure = Image.open(tmp_path / "figure_0.png")
    assert figure.width == 6 * (192 + 10) + 10  # image | SALMA | gate | attention | baseline | ground truth, native 192 px


@pytest.mark.slow
def test_eval_runs_in_bf16_with_masks_close_to_fp32(run_dir, tmp_path):
    preds = {}
    for dtype in ("float32", "bfloat16"):
        proc = run_eval(f"--ckpt={run_dir}", "--num_samples=4", f"--out_dir={tmp_path / dtype}", "--force_seg=True", f"--dtype={dtype}")
        assert proc.returncode == 0, proc.stderr
        preds[dtype] = [json.loads(line) for line in open(tmp_path / dtype / "predictions.jsonl")]
    assert len(preds["float32"]) == len(preds["bfloat16"]) >= 4
    for a, b in zip(preds["float32"], preds["bfloat16"]):
        assert abs(a["U"] - b["U"]) <= 0.1 * max(a["U"], 1) and abs(a["I"] - b["I"]) <= 0.1 * max(a["U"], 1)


# ---------------------------------------------------------------------------------------------
# bad inputs end with one line naming the file or flag, a non-zero exit, no traceback




@pytest.mark.slow
def test_bad_checkpoints_images_and_flags_give_one_line(run_dir, tmp_path):
    import shutil


    truncated = tmp_path / "truncated"
    shutil.copytree(run_dir, truncated)
    data_bytes = open(truncated / "ckpt.pt", "rb").read()
    open(truncated / "ckpt.pt", "wb").write(data_bytes[: len(data_bytes) // 2])
    fixtures.assert_one_line_error(run_eval(f"--ckpt={truncated}"), "ckpt.pt", "unreadable")
    official = tmp_path / "official"
    os.makedirs(official)
    json.dump(checkpoint.hf_config(salma.Config.from_preset("tiny"), "Sa2VAChatModel"), open(official / "config.json", "w"))
    inputs.tiny_tokenizer(checkpoint.TINY_WORDS).save(str(official / "tokenizer.json"))
    open(official / "model.safetensors", "wb").write(os.urandom(4096))
    fixtures.assert_one_line_error(run_eval(f"--ckpt={official}"), "model.safetensors", "unreadable")
    fixtures.refcoco_fixture(tmp_path)
    image = tmp_path / "coco" / "train2014" / "COCO_train2014_000000000001.jpg"
    open(image, "wb").write(b"not a jpeg")
    fixtures.assert_one_line_error(run_eval("--dataset=refcocog", f"--data_root={tmp_path}", f"--ckpt={run_dir}"), image.name)
    os.remove(image)
    fixtures.assert_one_line_error(run_eval("--dataset=refcocog", f"--data_root={tmp_path}", f"--ckpt={run_dir}"), image.name, "not found")
    fixtures.assert_one_line_error(run_eval("--split=nonsense"), "--split")
    fixtures.assert_one_line_error(run_eval(f"--ckpt={tmp_path / 'nowhere'}"), "nowhere")


@pytest.mark.slow
def test_ablate_writes_table_2_with_every_configuration_and_the_distractor_split(tmp_path):
    """ablate.py at a toy budget: every configuration of Table 2 is run_dir, scored on both generated splits,
    and written to results.json, table.md and chart.png (the numbers themselves are in the README)."""
    out = tmp_path / "ablate"
    subprocess.run([sys.executable, os.path.join(ROOT, "ablate.py"), "--seeds=1", "--max_steps=2", "--num_samples=2",
                    f"--out_dir={out}"], cwd=ROOT, check=True, capture_output=True)
    results = json.load(open(out / "results.json"))["per_seed"]
    assert list(results) == ["baseline", "+MBA", "+MBA+TMC", "+MBA+TMC+Bound", "full, MBA off at eval"]
    assert all(0 <= s["all"] <= 100 and 0 <= s["distractor"] <= 100 for runs in results.values() for s in runs)
    table = open(out / "table.md").read().splitlines()
    assert "cIoU distractor split" in table[0] and len(table) == 2 + len(results)
    assert (out / "chart.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# an official directory loads from its config.json alone


def without_defaults(config):
    """config.json as the official save_pretrained writes it: nested fields equal to their class's default left out.

    Defaults: Sa2VAChatConfig.__init__ (bytedance/Sa2VA 9832e1a, projects/sa2va/hf/models/configuration_sa2va_chat.py,
    force_image_size=None, downsample_ratio=0.5, max_dynamic_patch=6), InternVisionConfig.__init__ (configuration_intern_vit.py
    lines 64-85: patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200, num_attention_heads=25,
    intermediate_size=12800, qk_normalization=True, num_hidden_layers=48, norm_type='rms_norm', layer_norm_eps=1e-6),
    and transformers' own Qwen2Config() for the LLM."""
    from transformers import Qwen2Config

    chat = {"force_image_size": None, "downsample_ratio": 0.5, "max_dynamic_patch": 6}
    vision = {"patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200, "num_attention_heads": 25,
              "intermediate_size": 12800, "qk_normalization": True, "num_hidden_layers": 48, "norm_type": "rms_norm",
              "layer_norm_eps": 1e-6}
    qwen2 = Qwen2Config()
    llm = {k: getattr(qwen2, k) for k in config["llm_config"] if hasattr(qwen2, k) and getattr(qwen2, k) is not None}
    llm["rope_theta"] = qwen2.rope_parameters["rope_theta"] if getattr(qwen2, "rope_parameters", None) else qwen2.rope_theta
    out = {k: v for k, v in config.items() if chat.get(k, object()) != v}
    out["vision_config"] = {k: v for k, v in config["vision_config"].items() if vision.get(k, object()) != v}
    out["llm_config"] = {k: v for k, v in config["llm_config"].items() if llm.get(k, object()) != v}
    return out


def test_an_official_directory_loads_without_a_preset_even_when_its_config_omits_defaults(tmp_path):
    """eval.py --ckpt DIR on a Sa2VA-layout directory needs no --preset; a config.json without its default-valued
    fields (here: patch_size, rms_norm_eps, rope_theta, tie_word_embeddings...) builds the same model."""
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(salma.Config.from_preset("tiny", mba=False))
    checkpoint.save_official(model, tok, str(tmp_path / "full"))
    config = json.load(open(tmp_path / "full" / "config.json"))
    sparse = without_defaults(config)
    assert "patch_size" not in sparse["vision_config"] and "rms_norm_eps" not in sparse["llm_config"]
    os.makedirs(tmp_path / "sparse")
    for name in ("model.safetensors", "tokenizer.json"):
        os.link(tmp_path / "full" / name, tmp_path / "sparse" / name)
    json.dump(sparse, open(tmp_path / "sparse" / "config.json", "w"))
    full, _ = checkpoint.load_model(str(tmp_path / "full"))
    loaded, _ = checkpoint.load_model(str(tmp_path / "sparse"))
    assert loaded.cfg == full.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    runs = {}
    for name in ("full", "sparse"):
        proc = run_eval(f"--ckpt={tmp_path / name}", "--num_samples=2", "--force_seg=True", f"--out_dir={tmp_path / ('eval_' + name)}")
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.load(open(tmp_path / f"eval_{name}" / "metrics.json"))
        runs[name].pop("ckpt")
    assert runs["full"] == runs["sparse"]
    sparse["llm_config"]["architectures"] = ["LlamaForCausalLM"]  # an LLM no Sa2VA checkpoint uses
    json.dump(sparse, open(tmp_path / "sparse" / "config.json", "w"))
    fixtures.assert_one_line_error(run_eval(f"--ckpt={tmp_path / 'sparse'}"), "config.json", "LlamaForCausalLM")
