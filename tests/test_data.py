"""data.py: generated scenes, COCO masks, readers on fixtures in the official layouts, sampling."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data

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
            a = anchors[0]
            return [i for i, o in enumerate(objects) if o is not a and attrs_ok(head, o) and sign * (o[axis] - a[axis]) > 0]
    if " moving " in text:
        head, direction = text.split(" moving ")
        return [i for i, o in enumerate(objects) if attrs_ok(head, o) and o["direction"] == direction]
    return [i for i, o in enumerate(objects) if attrs_ok(text, o)]


def test_every_expression_identifies_exactly_its_target():
    ds = data.SyntheticRefDataset(60, seed=1, video_fraction=0.3)
    kinds = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["exprs"], s["id"]
        for text, target in zip(s["exprs"], s["targets"]):
            assert referents(text, s["objects"]) == [target], (s["id"], text)
            kinds.add("relation" if any(r in text for r in (" left of ", " right of ", " above ", " below ")) else
                      "comparative" if "of the two" in text else "motion" if "moving" in text else "attribute")
    assert kinds == {"relation", "comparative", "motion", "attribute"}


def test_masks_are_exactly_the_pixels_of_the_rendered_shapes():
    ds = data.SyntheticRefDataset(20, seed=2, video_fraction=0.5)
    for i in range(len(ds)):
        s = ds[i]
        for k, target in enumerate(s["targets"]):
            colour = np.array(data.COLOURS[s["objects"][target]["colour"]])
            for t, frame in enumerate(s["frames"]):
                pixels = np.array(frame)
                mask = s["masks"][k, t].numpy()
                assert mask.sum() > 50
                assert (pixels[mask] == colour).all()  # inside: the object's colour only
                same_colour = (pixels == colour).all(-1)
                others = [data.moved_object(o, t) for j, o in enumerate(s["objects"]) if j != target and o["colour"] == s["objects"][target]["colour"]]
                if not others:
                    assert (same_colour == mask).all()  # no other shape of that colour: exactly the mask


def test_same_seed_same_samples_other_seed_other_samples():
    a, b, c = data.SyntheticRefDataset(5, seed=3), data.SyntheticRefDataset(5, seed=3), data.SyntheticRefDataset(5, seed=4)
    for i in range(5):
        assert a[i]["exprs"] == b[i]["exprs"] and torch.equal(a[i]["masks"], b[i]["masks"])
    assert any(a[i]["exprs"] != c[i]["exprs"] for i in range(5))


def test_videos_move_the_target_the_stated_way():
    ds = data.SyntheticRefDataset(30, seed=5, video_fraction=1.0)
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
# COCO masks


def test_rle_matches_pycocotools_both_ways():
    mask_utils = pytest.importorskip("pycocotools.mask")  # listed in requirements.txt; present in CI
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 40, 2)
        m = rng.random((h, w)) < rng.random()
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert data.rle_encode(torch.from_numpy(m))["counts"] == ref["counts"].decode()
        assert (data.rle_decode({"size": [int(h), int(w)], "counts": ref["counts"].decode()}).numpy() == m).all()


def test_rle_uncompressed_counts_are_column_major():
    mask = data.rle_decode({"size": [2, 3], "counts": [1, 2, 3]})  # 1 zero, 2 ones, 3 zeros down the columns
    assert mask.tolist() == [[False, True, False], [True, False, False]]


def test_polygons_union_and_empty():
    square = [[1, 1, 4, 1, 4, 4, 1, 4]]
    m = data.coco_mask(square + [[6, 6, 8, 6, 8, 8, 6, 8]], 10, 10)
    assert m[2, 2] and m[7, 7] and not m[0, 0] and not m[5, 5]
    assert not data.coco_mask([], 10, 10).any()


# ---------------------------------------------------------------------------------------------
# readers on fixtures in the official layouts


def save_jpg(path, w=32, h=24, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), (value, value, value)).save(path)


def refcoco_fixture(root):
    save_jpg(root / "coco" / "train2014" / "COCO_train2014_000000000001.jpg")
    instances = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 24, "width": 32}],
                 "annotations": [{"id": 10, "image_id": 1, "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]},
                                 {"id": 11, "image_id": 1, "segmentation": []}],
                 "categories": [{"id": 1, "name": "thing"}]}
    refs = [{"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "val", "sentences": [{"sent": "the box"}, {"sent": "grey box"}]},
            {"ref_id": 1, "ann_id": 11, "image_id": 1, "split": "val", "sentences": [{"sent": "nothing"}]},
            {"ref_id": 2, "ann_id": 99, "image_id": 1, "split": "val", "sentences": [{"sent": "dangling"}]},
            {"ref_id": 3, "ann_id": 10, "image_id": 1, "split": "train", "sentences": [{"sent": "train"}]}]
    os.makedirs(root / "refcocog")
    json.dump(instances, open(root / "refcocog" / "instances.json", "w"))
    pickle.dump(refs, open(root / "refcocog" / "refs(umd).p", "wb"))


def test_refcocog_reader(tmp_path):
    refcoco_fixture(tmp_path)
    before = data.WARNINGS["annotation points at nothing"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.build_dataset("refcocog", str(tmp_path), "val")
    assert data.WARNINGS["annotation points at nothing"] == before + 1
    assert len(ds) == 3  # one item per sentence; the dangling ref is skipped and counted
    first = ds[0]
    assert first["exprs"] == ["the box"] and first["masks"].shape == (1, 1, 24, 32)
    assert first["masks"][0, 0, 2:10, 2:10].all() and first["masks"].sum() == 81
    assert not ds[2]["masks"].any()  # empty segmentation -> empty mask


def test_missing_image_names_the_file(tmp_path):
    refcoco_fixture(tmp_path)
    os.remove(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000001.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.build_dataset("refcocog", str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="COCO_train2014_000000000001.jpg"):
        ds[0]
    with pytest.raises(FileNotFoundError, match="data_root"):
        data.build_dataset("refcocog", str(tmp_path / "nope"), "val")


def palette_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    image.save(path)


def test_ytvos_reader_and_lazy_eval_items(tmp_path):
    root = tmp_path / "ytvos"
    frames = ["00000", "00005", "00010"]
    meta = {"videos": {"v1": {"expressions": {"0": {"exp": "a red thing", "obj_id": "1"}, "1": {"exp": "green", "obj_id": "2"}},
                              "frames": frames}}}
    os.makedirs(root / "meta_expressions" / "train")
    json.dump(meta, open(root / "meta_expressions" / "train" / "meta_expressions.json", "w"))
    for t, f in enumerate(frames):
        save_jpg(str(root / "train" / "JPEGImages" / "v1" / f"{f}.jpg"))
        ann = np.zeros((24, 32))
        ann[t:t + 4, :4] = 1
        ann[10:, 10:] = 2
        palette_png(str(root / "train" / "Annotations" / "v1" / f"{f}.png"), ann)
    train = data.build_dataset("ytvos", str(tmp_path), "train", train=True)
    s = train[0]
    assert s["masks"].shape == (1, 3, 24, 32) and s["masks"][0, :, :, :4].sum() == 48
    assert s["masks"][0, 1, 1:5, :4].all()
    assert train[1]["masks"][0, 0, 10:, 10:].all()
    lazy = data.build_dataset("ytvos", str(tmp_path), "train")[0]
    assert len(lazy["frame_paths"]) == 3 and lazy["load_masks"]([2])[0, 2:6, :4].all()


def test_mevis_reader_gt_is_the_union_of_anno_ids(tmp_path):
    folder = tmp_path / "mevis" / "valid_u"
    frames = ["0", "1"]
    a, b = np.zeros((24, 32), bool), np.zeros((24, 32), bool)
    a[:5, :5], b[10:15, 10:15] = True, True
    mask_dict = {"7": [data.rle_encode(a), None], "8": [data.rle_encode(b), data.rle_encode(b)]}
    meta = {"videos": {"v": {"expressions": {"0": {"exp": "the two fish", "obj_id": [0, 1], "anno_id": [7, 8]},
                                             "1": {"exp": "one fish", "obj_id": [1], "anno_id": [8]}}, "frames": frames}}}
    os.makedirs(folder)
    json.dump(meta, open(folder / "meta_expressions.json", "w"))
    json.dump(mask_dict, open(folder / "mask_dict.json", "w"))
    for f in frames:
        save_jpg(str(folder / "JPEGImages" / "v" / f"{f}.jpg"))
    ds = data.build_dataset("mevis", str(tmp_path), "valid_u")
    masks = ds[0]["load_masks"]([0, 1])
    assert masks.shape == (2, 24, 32)
    assert torch.equal(masks[0], torch.from_numpy(a | b)) and torch.equal(masks[1], torch.from_numpy(b))
    assert ds[1]["exprs"] == ["one fish"]
    json.dump({"7": [None, None]}, open(folder / "mask_dict.json", "w"))
    with pytest.raises(ValueError, match="anno_id 8"):
        data.build_dataset("mevis", str(tmp_path), "valid_u")


def test_llava_chat_reader(tmp_path):
    save_jpg(str(tmp_path / "llava" / "images" / "a.jpg"))
    convo = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A grey square."}]
    json.dump([{"id": "x", "image": "a.jpg", "conversations": convo}], open(tmp_path / "llava" / "train.json", "w"))
    s = data.build_dataset("llava", str(tmp_path), "train")[0]
    assert s["conversation"] == convo and s["masks"].shape[0] == 0


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
