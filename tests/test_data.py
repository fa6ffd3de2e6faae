"""data.py: generated scenes, COCO masks (pycocotools semantics), readers on fixtures built in the official layouts, sampling."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

import data
import fixtures
import common
import checkpoint
import testbed
import inputs

# ---------------------------------------------------------------------------------------------
# generated scenes


def referents(text, objects):
    """An independent reading of an expression against the scene (written apart from data.py's)."""
    def attrs_ok(phrase, o):
        words = phrase.replace("the ", "", 1).split()
        return words[-1] == o["shape"] and all(w in (o["size"], o["colour"]) for w in words[:-1])

    if text.startswith("the larger of the two") or text.startswith("the smaller of the two"):
        colour = text.split()[-2]
        same = [o for o in objects if o["colour"] == colour]
        if len(same) != 2:
            return []
        pick = max if "larger" in text else min
        chosen = pick(same, key=lambda o: o["r"])
        return [objects.index(chosen)] if same[0]["r"] != same[1]["r"] else []
    for rel, (axis, sign) in {"left of": ("cx", -1), "right of": ("cx", 1), "above": ("cy", -1), "below": ("cy", 1)}.items():
        if f" {rel} " in text:
            head, anchor = text.split(f" {rel} ")
            anchors = [o for o in objects if attrs_ok(anchor, o)]
            if len(anchors) != 1:
                return []
            a, other = anchors[0], "cy" if axis == "cx" else "cx"
            heads = [(i, sign * (o[axis] - a[axis]), abs(o[other] - a[other])) for i, o in enumerate(objects) if o is not a and attrs_ok(head, o)]
            clear = [i for i, along, across in heads if along >= 20 and across <= along]
            borderline = [i for i, along, across in heads if 0 < along and across <= 3 * along and i not in clear]
            return [] if borderline else clear
    if " moving " in text:
        head, direction = text.split(" moving ")
        return [i for i, o in enumerate(objects) if attrs_ok(head, o) and o["direction"] == direction]
    return [i for i, o in enumerate(objects) if attrs_ok(text, o)]


def test_every_expression_identifies_exactly_its_target():
    """Relations hold with a clear margin (>= 20 px along, within 45 degrees) and no borderline candidate."""
    ds = testbed.SyntheticRefDataset(60, seed=1, video_fraction=0.3)
    kinds = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["exprs"], s["id"]
        assert 3 <= len(s["objects"]) <= 6, s["id"]
        for text, target in zip(s["exprs"], s["targets"]):
            assert referents(text, s["objects"]) == [target], (s["id"], text)
            kinds.add("relation" if any(r in text for r in (" left of ", " right of ", " above ", " below ")) else
                      "comparative" if "of the two" in text else "motion" if "moving" in text else "attribute")
    assert kinds == {"relation", "comparative", "motion", "attribute"}


def test_distractor_split_puts_a_larger_look_alike_beside_a_small_target():
    """synthetic_distractor (issue: attention drift to salient distractors): the expression names a small
    target by size and colour, and the image holds at least 3x its area more of that colour elsewhere."""
    ds = testbed.SyntheticRefDataset(40, seed=10_000, video_fraction=0.0, twins=True)
    for i in range(len(ds)):
        s = ds[i]
        (text,), (target,) = s["exprs"], s["targets"]
        assert text.startswith("the small ") and referents(text, s["objects"]) == [target], (s["id"], text)
        colour = next(c for c in testbed.COLOURS if f" {c} " in text)
        same_colour = (np.array(s["frames"][0]) == np.array(testbed.COLOURS[colour])).all(-1)
        mask = s["masks"][0, 0].numpy()
        assert (same_colour & mask).sum() == mask.sum() and (same_colour & ~mask).sum() > 3 * mask.sum(), s["id"]


def test_masks_are_exactly_the_pixels_of_the_rendered_shapes():
    ds = testbed.SyntheticRefDataset(20, seed=2, video_fraction=0.5)
    for i in range(len(ds)):
        s = ds[i]
        for k, target in enumerate(s["targets"]):
            colour = np.array(testbed.COLOURS[s["objects"][target]["colour"]])
            for t, frame in enumerate(s["frames"]):
                pixels = np.array(frame)
                mask = s["masks"][k, t].numpy()
                assert mask.sum() > 50
                assert (pixels[mask] == colour).all()  # inside: the object's colour only
                same_colour = (pixels == colour).all(-1)
                others = [testbed.moved_object(o, t) for j, o in enumerate(s["objects"]) if j != target and o["colour"] == s["objects"][target]["colour"]]
                if not others:
                    assert (same_colour == mask).all()  # no other shape of that colour: exactly the mask


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = testbed.SyntheticRefDataset(5, seed=3), testbed.SyntheticRefDataset(5, seed=3), testbed.SyntheticRefDataset(5, seed=4)
    for i in range(5):
        assert a[i]["exprs"] == b[i]["exprs"] and torch.equal(a[i]["masks"], b[i]["masks"])
    assert any(a[i]["exprs"] != c[i]["exprs"] for i in range(5))


def test_videos_move_the_target_the_stated_way():
    ds = testbed.SyntheticRefDataset(30, seed=5, video_fraction=1.0)
    for i in range(len(ds)):
        s = ds[i]
        assert s["is_video"] and len(s["frames"]) == 5
        for k, text in enumerate(s["exprs"]):
            ys, xs = [], []
            for t in range(5):
                yy, xx = s["masks"][k, t].nonzero(as_tuple=True)
                ys.append(yy.float().mean())
                xs.append(xx.float().mean())
            dx, dy = float(xs[-1] - xs[0]), float(ys[-1] - ys[0])
            direction = text.split(" moving ")[1]
            expected = {"right": dx > 8, "left": dx < -8, "down": dy > 8, "up": dy < -8}[direction]
            assert expected, (text, dx, dy)


# ---------------------------------------------------------------------------------------------
# COCO masks: pycocotools semantics


def test_coco_mask_is_the_refer_api_mask_on_coco_sized_polygons():
    """lichengunc/refer refer.py getMask: frPyObjects -> decode -> sum over parts; float polygons on a 480x640 image."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        parts = []
        for _ in range(rng.integers(1, 3)):
            centre, radius = rng.uniform(100, 380, 2), rng.uniform(20, 90)
            angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 12)))
            parts.append(np.stack([centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)], 1).ravel().tolist())
        reference = mask_utils.decode(mask_utils.frPyObjects(parts, 480, 640)).sum(axis=2) > 0
        assert np.array_equal(data.coco_mask(parts, 480, 640).numpy(), reference)


def test_coco_mask_reads_compressed_and_uncompressed_rle_and_empty():
    """pycocotools coco.py annToRLE: uncompressed counts (iscrowd) go through frPyObjects; compressed strings decode as-is."""
    m = np.zeros((7, 9), bool)
    m[1:4, 2:6] = m[6, 8] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    assert np.array_equal(data.coco_mask({"size": [7, 9], "counts": rle["counts"].decode()}, 7, 9).numpy(), m)
    assert np.array_equal(data.coco_mask(rle, 7, 9).numpy(), m)  # bytes, as Sa2VA's mask_dict.pkl stores them
    runs = fixtures.uncompressed_counts(m)
    assert np.array_equal(data.coco_mask({"size": [7, 9], "counts": runs}, 7, 9).numpy(), m)
    assert not data.coco_mask([], 7, 9).any() and data.coco_mask([], 7, 9).shape == (7, 9)


# ---------------------------------------------------------------------------------------------
# readers on fixtures built in the official layouts




def test_refcocog_reader_gives_one_item_per_sentence_with_the_refer_api_mask(tmp_path):
    """Masks as lichengunc/refer refer.py getMask (pycocotools frPyObjects -> decode -> merge)."""
    expected = fixtures.refcoco_fixture(tmp_path)
    before = common.WARNINGS["annotation points at nothing"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.build_dataset("refcocog", str(tmp_path))  # default split: val
    assert common.WARNINGS["annotation points at nothing"] == before + 1
    assert [(s["id"], s["exprs"]) for s in ds] == [("0", ["the box"]), ("0", ["grey box"]), ("1", ["nothing"]),
                                                    ("4", ["the crowd"]), ("5", ["thin strip"])]
    empty = common.WARNINGS["annotation with an empty segmentation (scored as an empty mask)"]
    for s in ds:
        assert s["masks"].shape == (1, 1, 480, 640)
        assert np.array_equal(s["masks"][0, 0].numpy(), expected[s["id"]]), s["id"]
    assert common.WARNINGS["annotation with an empty segmentation (scored as an empty mask)"] == empty + 1  # "nothing"
    train = data.build_dataset("refcocog", str(tmp_path), train=True)
    assert len(train) == 1 and train[0]["exprs"] == ["train"]


def test_missing_image_names_the_file(tmp_path):
    fixtures.refcoco_fixture(tmp_path)
    os.remove(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000001.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.build_dataset("refcocog", str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="COCO_train2014_000000000001.jpg"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="data_root"):
        data.build_dataset("refcocog", str(tmp_path / "nope"), "val")




def test_ytvos_train_reads_palette_annotations(tmp_path):
    """Ref-YouTube-VOS train: Annotations/<vid>/<frame>.png, palette index = obj_id of meta_expressions (ReferFormer datasets/ytvos.py)."""
    fixtures.ytvos_fixture(tmp_path / "ytvos")
    train = data.build_dataset("ytvos", str(tmp_path), "train", train=True)
    for k, obj in enumerate((1, 2)):
        s = train[k]
        expected = np.stack([fixtures.object_frames(t) == obj for t in range(3)])
        assert np.array_equal(s["masks"][0].numpy(), expected) and len(s["frames"]) == 3
    lazy = data.build_dataset("ytvos", str(tmp_path), "train")[0]
    assert len(lazy["frame_paths"]) == 3 and np.array_equal(lazy["load_masks"]([2])[0].numpy(), fixtures.object_frames(2) == 1)


def test_ytvos_valid_drops_the_test_videos_and_has_no_ground_truth(tmp_path):
    """ReferFormer inference_ytvos.py: valid videos = meta_expressions/valid minus meta_expressions/test (202 of 507)."""
    fixtures.ytvos_fixture(tmp_path / "ytvos")
    ds = data.build_dataset("ytvos", str(tmp_path))  # default split: valid
    assert [s["id"] for s in ds] == ["vval/0", "vval/1"]
    assert all(s["load_masks"] is None for s in ds) and all(os.path.isfile(p) for p in ds[0]["frame_paths"])
    with pytest.raises(ValueError, match="no ground-truth masks"):
        data.build_dataset("ytvos", str(tmp_path), "valid", train=True)[0]
    os.remove(tmp_path / "ytvos" / "meta_expressions" / "test" / "meta_expressions.json")
    with pytest.raises(FileNotFoundError, match="vtest: not found.*keep .*test/meta_expressions.json"):
        data.build_dataset("ytvos", str(tmp_path))


@pytest.mark.parametrize("layout", ["referformer", "sa2va"])
def test_davis17_valid_in_both_layouts(tmp_path, layout):
    """Ref-DAVIS17 valid: 2 videos with 2 and 3 objects -> 8 + 12 expressions (both annotators pooled); GT = palette == obj_id."""
    videos = fixtures.davis_fixture(tmp_path / "davis17", layout)
    ds = data.build_dataset("davis17", str(tmp_path))  # default split: valid
    assert len(ds) == 20
    for s in ds:
        vid, exp_id = s["id"].split("/")
        obj = int(videos[vid]["expressions"][exp_id]["obj_id"])
        assert s["exprs"] == [videos[vid]["expressions"][exp_id]["exp"]]
        expected = np.stack([fixtures.object_frames(t) == obj for t in range(3)])
        assert np.array_equal(s["load_masks"](range(3)).numpy(), expected), s["id"]  # object 3: absent after frame 0


def test_mevis_gt_is_the_union_of_anno_ids_and_absent_objects_are_empty(tmp_path):
    """MeViS valid_u (henghuiding/MeViS lmpm/data/datasets/mevis.py): GT = union over anno_ids of the RLEs, None = absent."""
    fixtures.mevis_fixture(tmp_path, "valid_u")
    ds = data.build_dataset("mevis", str(tmp_path))  # default split: valid_u
    assert [s["exprs"][0] for s in ds] == ["the two fish", "fish leaving", "one fish"]
    fish = [fixtures.two_fish(t) for t in range(3)]
    union = np.stack([(a if a is not None else False) | b for a, b in fish])
    assert np.array_equal(ds[0]["load_masks"](range(3)).numpy(), union)
    leaving = ds[1]["load_masks"](range(3)).numpy()
    assert leaving[0].sum() == 25 and not leaving[1:].any() and leaving.shape == (3, 24, 32)


def test_absent_objects_train_as_empty_masks(tmp_path):
    """Sa2VA sa2va_data_03_refvos.py decode_mask: a None frame of mask_dict is an all-zero mask, never a skipped sample."""
    fixtures.mevis_fixture(tmp_path, "train")
    json.dump({"7": [None, None, None], "8": [fixtures.official_rle(fixtures.two_fish(t)[1]) for t in range(3)]},
              open(tmp_path / "mevis" / "train" / "mask_dict.json", "w"))
    s = data.build_dataset("mevis", str(tmp_path), "train", train=True)[1]  # "fish leaving": absent in every frame
    assert s["masks"].shape == (1, 3, 24, 32) and not s["masks"].any()


def test_mevis_valid_has_no_ground_truth(tmp_path):
    """MeViS valid ships frames and expressions only (henghuiding/MeViS README, 'Val set')."""
    fixtures.mevis_fixture(tmp_path, "valid", with_masks=False)
    ds = data.build_dataset("mevis", str(tmp_path), "valid")
    assert len(ds) == 3 and all(s["load_masks"] is None for s in ds)


def test_revos_reads_the_official_root_layout(tmp_path):
    """ReVOS valid (cilinyan/ReVOS-api README): 3 expressions with type_id, GT = union of anno_ids, foreground per video."""
    fish, foreground = fixtures.revos_fixture(tmp_path)
    ds = data.build_dataset("revos", str(tmp_path))  # default split: valid
    assert [(s["id"], s["type_id"]) for s in ds] == [("vval/0", 0), ("vval/1", 1), ("vval/2", 0)]
    empty = np.zeros((24, 32), bool)
    assert np.array_equal(ds[0]["load_masks"](range(3)).numpy(), np.stack([fish[0][0], empty, empty]))
    assert np.array_equal(ds[2]["load_masks"](range(3)).numpy(), np.stack([(a if a is not None else empty) | b for a, b in fish]))
    assert np.array_equal(ds[1]["load_foreground"](range(3)).numpy(), np.stack(foreground))
    train = data.build_dataset("revos", str(tmp_path), train=True)
    assert len(train) == 1 and train[0]["masks"].shape == (1, 3, 24, 32)
    os.remove(tmp_path / "revos" / "mask_dict.json")  # expressions and frames only: a split to submit
    assert all(s["load_masks"] is None for s in data.build_dataset("revos", str(tmp_path)))


def test_llava_records_with_and_without_an_image(tmp_path):
    """LLaVA train.py LazySupervisedDataset: a record without "image" is text-only; preprocess_multimodal moves <image> to the front."""
    records = fixtures.llava_fixture(tmp_path)
    ds = data.build_dataset("llava", str(tmp_path), train=True)
    with_image, text_only = ds[0], ds[1]
    assert with_image["conversation"][0]["value"] == "<image>\nWhat is it?" and len(with_image["frames"]) == 1
    assert text_only["frames"] == [] and text_only["conversation"] == records[1]["conversations"]
    assert ds[2]["conversation"][0]["value"] == "<image>\nColour?"


TRAIN_MIX = "refcocog:1,ytvos:1,davis17:1,mevis:1,revos:1,llava:1"


def test_every_official_train_split_gives_training_batches(tmp_path):
    """Each item of each official-layout train split makes a batch the model trains on (loss finite, gradients flow)."""
    import losses
    import salma

    fixtures.official_fixtures(tmp_path)
    mix = data.build_train_mix(TRAIN_MIX, str(tmp_path))
    assert [len(p) for p in mix.parts] == [1, 2, 4, 3, 1, 3]  # refcocog, ytvos, davis17, mevis, revos, llava
    cfg = salma.Config.from_preset("tiny")
    model, tok = checkpoint.build_model(cfg)
    for i in range(len(mix)):
        batch = inputs.make_train_batch([mix[i]], tok, model.cfg, [i])
        loss, _ = losses.total_loss(losses.salma_loss_parts(model(batch), batch, losses.LossConfig()), losses.LossConfig(), 1.0)
        assert torch.isfinite(loss), i
        loss.backward()
    assert model.text_hidden_fcs[0].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# mixing and sampling


def test_repeat_factors_give_the_expected_counts():
    mix = data.MixedDataset([(list(range(10)), 2), (list(range(4)), 0.5), (list(range(3)), 1)])
    assert len(mix) == 20 + 2 + 3
    assert [mix.index.count((1, i)) for i in range(4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="dataset:repeat_factor"):
        data.build_train_mix("synthetic:x")


def test_sampler_shards_are_disjoint_and_cover():
    shards = [data.DistributedResumableSampler(10, 3, r, seed=1) for r in range(3)]
    got = [s.indices() for s in shards]
    assert all(len(g) == 4 for g in got)
    assert set(sum(got, [])) == set(range(10))
    single = data.DistributedResumableSampler(10, 1, 0, seed=1).indices()
    assert got[0] == single[0::3] and got[1] == single[1::3] + single[:1]  # padded with the first


def test_sampler_resumes_exactly_across_epochs():
    a = data.DistributedResumableSampler(7, seed=2)
    stream = iter(a)
    first = [next(stream) for _ in range(10)]
    b = data.DistributedResumableSampler(7, seed=2)
    b.load_state_dict(a.state_dict())
    rest_b = [x for x, _ in zip(iter(b), range(9))]
    rest_a = [next(stream) for _ in range(9)]
    assert rest_a == rest_b and sorted(first[:7]) == list(range(7))


@pytest.mark.slow
def test_train_py_runs_on_the_official_mix(tmp_path):
    """train.py --data=<every dataset> on the official-layout fixtures: steps logged, checkpoint written."""
    import subprocess
    import sys

    fixtures.official_fixtures(tmp_path / "data")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--data={TRAIN_MIX}", f"--data_root={tmp_path / 'data'}",
                           "--max_steps=4", "--batch_size=2", "--save_every=4", f"--out_dir={out}"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3, 4] and os.path.isfile(out / "ckpt.pt")
