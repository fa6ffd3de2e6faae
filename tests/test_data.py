"""data.py: generated scenes, COCO masks (pycocotools semantics), readers on fixtures built in the official layouts, sampling."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

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
    ds = data.SyntheticRefDataset(60, seed=1, video_fraction=0.3)
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
    ds = data.SyntheticRefDataset(40, seed=10_000, video_fraction=0.0, twins=True)
    for i in range(len(ds)):
        s = ds[i]
        (text,), (target,) = s["exprs"], s["targets"]
        assert text.startswith("the small ") and referents(text, s["objects"]) == [target], (s["id"], text)
        colour = next(c for c in data.COLOURS if f" {c} " in text)
        same_colour = (np.array(s["frames"][0]) == np.array(data.COLOURS[colour])).all(-1)
        mask = s["masks"][0, 0].numpy()
        assert (same_colour & mask).sum() == mask.sum() and (same_colour & ~mask).sum() > 3 * mask.sum(), s["id"]


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


def test_role_code_names_each_word_with_its_role_and_is_the_same_in_every_process():
    """data.role_code: the same words in other roles give another code; another process gives the same one."""
    import subprocess
    import sys

    width = 64
    code = data.role_code("the square left of the blue triangle", width)
    swapped = data.role_code("the triangle left of the blue square", width)  # the same bag of words
    word = data.role_code("the square", width)  # "the" is skipped: one vector
    assert 7 < word.norm() < 10  # |v| about 8.4, SAM-2's prompt-token scale
    assert (code - swapped).norm() > 0.5 * code.norm()
    assert torch.equal(data.role_code("the square left of the blue triangle", width), code)
    script = "import data; print(data.role_code('the square left of the blue triangle', 64).tolist())"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert torch.equal(torch.tensor(json.loads(other.stdout)), code)


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
    runs = uncompressed_counts(m)
    assert np.array_equal(data.coco_mask({"size": [7, 9], "counts": runs}, 7, 9).numpy(), m)
    assert not data.coco_mask([], 7, 9).any() and data.coco_mask([], 7, 9).shape == (7, 9)


def uncompressed_counts(mask):
    """COCO's uncompressed RLE counts: alternating 0/1 run lengths down the columns, starting with zeros."""
    flat = mask.T.ravel()
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


# ---------------------------------------------------------------------------------------------
# readers on fixtures built in the official layouts


def save_jpg(path, w=32, h=24, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), (value, value, value)).save(path)


def official_rle(mask):
    """A mask as MeViS/ReVOS mask_dict.json store it: pycocotools RLE, counts as str."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


POLYGON = [[100.5, 80.25, 300.75, 90.5, 280.0, 300.5, 120.25, 260.75], [400.0, 50.0, 500.5, 60.25, 450.25, 150.0]]


def refcoco_fixture(root):
    """refer-API layout (lichengunc/refer refer.py): {root}/refcocog/instances.json + refs(umd).p, COCO train2014 images.

    Returns {ref_id: GT mask} for the val refs, computed as refer.py getMask / pycocotools annToRLE do.
    """
    save_jpg(root / "coco" / "train2014" / "COCO_train2014_000000000001.jpg", 640, 480)
    crowd = np.zeros((480, 640), bool)
    crowd[200:260, 10:90] = True
    small = np.zeros((480, 640), bool)
    small[5:9, 600:630] = True
    instances = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 480, "width": 640}],
                 "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": POLYGON},
                                 {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": []},
                                 {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 1,
                                  "segmentation": {"size": [480, 640], "counts": uncompressed_counts(crowd)}},
                                 {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": official_rle(small)}],
                 "categories": [{"id": 1, "name": "thing", "supercategory": "thing"}]}

    def ref(ref_id, ann_id, split, *sents):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 1, "split": split, "category_id": 1,
                "file_name": "COCO_train2014_000000000001_%d.jpg" % ann_id, "sent_ids": list(range(len(sents))),
                "sentences": [{"sent": s, "raw": s, "tokens": s.split(), "sent_id": i} for i, s in enumerate(sents)]}

    refs = [ref(0, 10, "val", "the box", "grey box"), ref(1, 11, "val", "nothing"), ref(2, 99, "val", "dangling"),
            ref(3, 10, "train", "train"), ref(4, 12, "val", "the crowd"), ref(5, 13, "val", "thin strip")]
    os.makedirs(root / "refcocog")
    json.dump(instances, open(root / "refcocog" / "instances.json", "w"))
    pickle.dump(refs, open(root / "refcocog" / "refs(umd).p", "wb"))
    polygon = mask_utils.decode(mask_utils.frPyObjects(POLYGON, 480, 640)).sum(axis=2) > 0
    return {"0": polygon, "1": np.zeros((480, 640), bool), "4": crowd, "5": small}


def test_refcocog_reader_gives_one_item_per_sentence_with_the_refer_api_mask(tmp_path):
    """Masks as lichengunc/refer refer.py getMask (pycocotools frPyObjects -> decode -> merge)."""
    expected = refcoco_fixture(tmp_path)
    before = data.WARNINGS["annotation points at nothing"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.build_dataset("refcocog", str(tmp_path))  # default split: val
    assert data.WARNINGS["annotation points at nothing"] == before + 1
    assert [(s["id"], s["exprs"]) for s in ds] == [("0", ["the box"]), ("0", ["grey box"]), ("1", ["nothing"]),
                                                    ("4", ["the crowd"]), ("5", ["thin strip"])]
    empty = data.WARNINGS["annotation with an empty segmentation (scored as an empty mask)"]
    for s in ds:
        assert s["masks"].shape == (1, 1, 480, 640)
        assert np.array_equal(s["masks"][0, 0].numpy(), expected[s["id"]]), s["id"]
    assert data.WARNINGS["annotation with an empty segmentation (scored as an empty mask)"] == empty + 1  # "nothing"
    train = data.build_dataset("refcocog", str(tmp_path), train=True)
    assert len(train) == 1 and train[0]["exprs"] == ["train"]


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


PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756  # DAVIS/YouTube-VOS palette: index = object id


def palette_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8), mode="P")
    image.putpalette(PALETTE)
    image.save(path)


def object_frames(t, h=24, w=32):
    """Index map of frame t: object 1 moves down, object 2 fixed, object 3 only in frame 0."""
    ann = np.zeros((h, w), np.uint8)
    ann[t:t + 4, :4] = 1
    ann[10:, 10:] = 2
    if t == 0:
        ann[:3, 20:] = 3
    return ann


def write_meta(path, videos):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    json.dump({"videos": videos}, open(path, "w"))


def ytvos_fixture(root):
    """Ref-YouTube-VOS as the 2021 challenge ships it (ReferFormer inference_ytvos.py): meta_expressions/{train,valid,test},
    train/ with palette Annotations, valid/JPEGImages holding only the valid videos although
    meta_expressions/valid also lists the test videos."""
    frames = ["00000", "00005", "00010"]
    train = {"v1": {"expressions": {"0": {"exp": "a red thing", "obj_id": "1"}, "1": {"exp": "green", "obj_id": "2"}},
                    "frames": frames}}
    write_meta(root / "meta_expressions" / "train" / "meta_expressions.json", train)
    for t, f in enumerate(frames):
        save_jpg(str(root / "train" / "JPEGImages" / "v1" / f"{f}.jpg"))
        palette_png(str(root / "train" / "Annotations" / "v1" / f"{f}.png"), object_frames(t))
    valid = {"vval": {"expressions": {"0": {"exp": "a dog"}, "1": {"exp": "a cat"}}, "frames": frames[:2]},
             "vtest": {"expressions": {"0": {"exp": "a bird"}}, "frames": frames}}
    write_meta(root / "meta_expressions" / "valid" / "meta_expressions.json", valid)
    write_meta(root / "meta_expressions" / "test" / "meta_expressions.json", {"vtest": valid["vtest"]})
    for f in frames[:2]:
        save_jpg(str(root / "valid" / "JPEGImages" / "vval" / f"{f}.jpg"))
    return frames


def test_ytvos_train_reads_palette_annotations(tmp_path):
    """Ref-YouTube-VOS train: Annotations/<vid>/<frame>.png, palette index = obj_id of meta_expressions (ReferFormer datasets/ytvos.py)."""
    ytvos_fixture(tmp_path / "ytvos")
    train = data.build_dataset("ytvos", str(tmp_path), "train", train=True)
    for k, obj in enumerate((1, 2)):
        s = train[k]
        expected = np.stack([object_frames(t) == obj for t in range(3)])
        assert np.array_equal(s["masks"][0].numpy(), expected) and len(s["frames"]) == 3
    lazy = data.build_dataset("ytvos", str(tmp_path), "train")[0]
    assert len(lazy["frame_paths"]) == 3 and np.array_equal(lazy["load_masks"]([2])[0].numpy(), object_frames(2) == 1)


def test_ytvos_valid_drops_the_test_videos_and_has_no_ground_truth(tmp_path):
    """ReferFormer inference_ytvos.py: valid videos = meta_expressions/valid minus meta_expressions/test (202 of 507)."""
    ytvos_fixture(tmp_path / "ytvos")
    ds = data.build_dataset("ytvos", str(tmp_path))  # default split: valid
    assert [s["id"] for s in ds] == ["vval/0", "vval/1"]
    assert all(s["load_masks"] is None for s in ds) and all(os.path.isfile(p) for p in ds[0]["frame_paths"])
    with pytest.raises(ValueError, match="no ground-truth masks"):
        data.build_dataset("ytvos", str(tmp_path), "valid", train=True)[0]
    os.remove(tmp_path / "ytvos" / "meta_expressions" / "test" / "meta_expressions.json")
    with pytest.raises(FileNotFoundError, match="vtest: not found.*keep .*test/meta_expressions.json"):
        data.build_dataset("ytvos", str(tmp_path))


def davis_fixture(root, layout):
    """Ref-DAVIS17 train and valid in ReferFormer's layout (tools/data/convert_davis_to_ytvos.py: palette Annotations,
    4 expressions per object) or in Sa2VA's/VISA's (<split>/mask_dict.pkl, one RLE list per expression numbered over
    string-sorted videos and exp_ids, Sa2VA tools/eval/eval_davis.py get_meta_exp; RLEs as VISA
    utils/d2_datasets/refytvos_utils.py encode_anno_mask). Returns the valid videos' meta."""
    frames = ["00000", "00001", "00002"]
    for split, objects_of in (("train", {"bear": (1,)}), ("valid", {"bike-packing": (1, 2), "dogs-jump": (1, 2, 3)})):
        videos = {}
        for vid, objects in objects_of.items():
            exps = [{"exp": f"{vid} object {o} by annotator {a} ({kind})", "obj_id": str(o)}
                    for o in objects for a in (1, 2) for kind in ("first", "full")]
            videos[vid] = {"expressions": {str(i): e for i, e in enumerate(exps)}, "frames": frames}
            for t, f in enumerate(frames):
                save_jpg(str(root / split / "JPEGImages" / vid / f"{f}.jpg"))
                if layout == "referformer":
                    palette_png(str(root / split / "Annotations" / vid / f"{f}.png"), object_frames(t))
        write_meta(root / "meta_expressions" / split / "meta_expressions.json", videos)
        if layout == "sa2va":
            mask_dict, count = {}, 0
            for vid in sorted(videos):
                for exp_id in sorted(videos[vid]["expressions"]):
                    obj = int(videos[vid]["expressions"][exp_id]["obj_id"])
                    masks = [object_frames(t) == obj for t in range(3)]
                    mask_dict[str(count)] = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) if m.any() else None
                                             for m in masks]
                    count += 1
            pickle.dump(mask_dict, open(root / split / "mask_dict.pkl", "wb"))
    return videos


@pytest.mark.parametrize("layout", ["referformer", "sa2va"])
def test_davis17_valid_in_both_layouts(tmp_path, layout):
    """Ref-DAVIS17 valid: 2 videos with 2 and 3 objects -> 8 + 12 expressions (both annotators pooled); GT = palette == obj_id."""
    videos = davis_fixture(tmp_path / "davis17", layout)
    ds = data.build_dataset("davis17", str(tmp_path))  # default split: valid
    assert len(ds) == 20
    for s in ds:
        vid, exp_id = s["id"].split("/")
        obj = int(videos[vid]["expressions"][exp_id]["obj_id"])
        assert s["exprs"] == [videos[vid]["expressions"][exp_id]["exp"]]
        expected = np.stack([object_frames(t) == obj for t in range(3)])
        assert np.array_equal(s["load_masks"](range(3)).numpy(), expected), s["id"]  # object 3: absent after frame 0


def two_fish(t):
    """Frame t of a MeViS/ReVOS fixture video: fish 7 leaves after frame 0, fish 8 stays."""
    a, b = np.zeros((24, 32), bool), np.zeros((24, 32), bool)
    a[:5, :5], b[10:15, 10 + t:15 + t] = True, True
    return a if t == 0 else None, b


def mevis_fixture(root, split, with_masks=True):
    """MeViS (henghuiding/MeViS README): <split>/JPEGImages, meta_expressions.json, mask_dict.json of pycocotools
    RLEs per anno_id and frame, None where the object is absent (valid: no mask_dict.json)."""
    folder = root / "mevis" / split
    frames = ["00000", "00001", "00002"]
    meta = {"v": {"expressions": {"0": {"exp": "the two fish", "obj_id": [0, 1], "anno_id": [7, 8]},
                                  "1": {"exp": "fish leaving", "obj_id": [0], "anno_id": [7]},
                                  "2": {"exp": "one fish", "obj_id": [1], "anno_id": [8]}}, "frames": frames}}
    if not with_masks:
        meta = {"v": {"expressions": {k: {"exp": e["exp"]} for k, e in meta["v"]["expressions"].items()}, "frames": frames}}
    write_meta(folder / "meta_expressions.json", meta)
    if with_masks:
        fish = [two_fish(t) for t in range(3)]
        json.dump({"7": [official_rle(a) if a is not None else None for a, _ in fish],
                   "8": [official_rle(b) for _, b in fish]}, open(folder / "mask_dict.json", "w"))
    for f in frames:
        save_jpg(str(folder / "JPEGImages" / "v" / f"{f}.jpg"))


def test_mevis_gt_is_the_union_of_anno_ids_and_absent_objects_are_empty(tmp_path):
    """MeViS valid_u (henghuiding/MeViS lmpm/data/datasets/mevis.py): GT = union over anno_ids of the RLEs, None = absent."""
    mevis_fixture(tmp_path, "valid_u")
    ds = data.build_dataset("mevis", str(tmp_path))  # default split: valid_u
    assert [s["exprs"][0] for s in ds] == ["the two fish", "fish leaving", "one fish"]
    fish = [two_fish(t) for t in range(3)]
    union = np.stack([(a if a is not None else False) | b for a, b in fish])
    assert np.array_equal(ds[0]["load_masks"](range(3)).numpy(), union)
    leaving = ds[1]["load_masks"](range(3)).numpy()
    assert leaving[0].sum() == 25 and not leaving[1:].any() and leaving.shape == (3, 24, 32)


def test_absent_objects_train_as_empty_masks(tmp_path):
    """Sa2VA sa2va_data_03_refvos.py decode_mask: a None frame of mask_dict is an all-zero mask, never a skipped sample."""
    mevis_fixture(tmp_path, "train")
    json.dump({"7": [None, None, None], "8": [official_rle(two_fish(t)[1]) for t in range(3)]},
              open(tmp_path / "mevis" / "train" / "mask_dict.json", "w"))
    s = data.build_dataset("mevis", str(tmp_path), "train", train=True)[1]  # "fish leaving": absent in every frame
    assert s["masks"].shape == (1, 3, 24, 32) and not s["masks"].any()


def test_mevis_valid_has_no_ground_truth(tmp_path):
    """MeViS valid ships frames and expressions only (henghuiding/MeViS README, 'Val set')."""
    mevis_fixture(tmp_path, "valid", with_masks=False)
    ds = data.build_dataset("mevis", str(tmp_path), "valid")
    assert len(ds) == 3 and all(s["load_masks"] is None for s in ds)


def revos_fixture(root):
    """ReVOS as released (cilinyan/ReVOS-api README 'File Structure'): JPEGImages/, mask_dict.json,
    mask_dict_foreground.json ({vid: {"masks_rle": [RLE per frame]}}) and meta_expressions_{train,valid}_.json at the
    root; expressions carry anno_id, obj_id and type_id (0 referring, 1 reasoning; VISA tools/eval_revos.py)."""
    root = root / "revos"
    frames = ["00000", "00001", "00002"]
    fish = [two_fish(t) for t in range(3)]
    expressions = {"0": {"exp": "the fish that swims away", "obj_id": [0], "anno_id": [7], "type_id": 0},
                   "1": {"exp": "which fish would a cat catch first?", "obj_id": [1], "anno_id": [8], "type_id": 1},
                   "2": {"exp": "all the fish", "obj_id": [0, 1], "anno_id": [7, 8], "type_id": 0}}
    write_meta(root / "meta_expressions_valid_.json", {"vval": {"expressions": expressions, "frames": frames}})
    write_meta(root / "meta_expressions_train_.json", {"vtrain": {"expressions": {"0": expressions["2"]}, "frames": frames}})
    json.dump({"7": [official_rle(a) if a is not None else None for a, _ in fish],
               "8": [official_rle(b) for _, b in fish]}, open(root / "mask_dict.json", "w"))
    foreground = [(a if a is not None else False) | b for a, b in fish]
    foreground[1] = foreground[1].copy()
    foreground[1][20:, 20:] = True  # an object no expression refers to
    json.dump({v: {"masks_rle": [official_rle(m) for m in foreground]} for v in ("vval", "vtrain")},
              open(root / "mask_dict_foreground.json", "w"))
    for vid in ("vval", "vtrain"):
        for f in frames:
            save_jpg(str(root / "JPEGImages" / vid / f"{f}.jpg"))
    return fish, foreground


def test_revos_reads_the_official_root_layout(tmp_path):
    """ReVOS valid (cilinyan/ReVOS-api README): 3 expressions with type_id, GT = union of anno_ids, foreground per video."""
    fish, foreground = revos_fixture(tmp_path)
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


def llava_fixture(root):
    """LLaVA-1.5 (haotian-liu/LLaVA README, Visual Instruction Tuning): llava_v1_5_mix665k.json + image folders such as
    coco/train2017; some records have no "image" (text-only conversations)."""
    save_jpg(str(root / "llava" / "coco" / "train2017" / "000000000009.jpg"))
    records = [{"id": "img", "image": "coco/train2017/000000000009.jpg",
                "conversations": [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A grey square."}]},
               {"id": "txt", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
               {"id": "untagged", "image": "coco/train2017/000000000009.jpg",
                "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]}]
    json.dump(records, open(root / "llava" / "llava_v1_5_mix665k.json", "w"))
    return records


def test_llava_records_with_and_without_an_image(tmp_path):
    """LLaVA train.py LazySupervisedDataset: a record without "image" is text-only; preprocess_multimodal moves <image> to the front."""
    records = llava_fixture(tmp_path)
    ds = data.build_dataset("llava", str(tmp_path), train=True)
    with_image, text_only = ds[0], ds[1]
    assert with_image["conversation"][0]["value"] == "<image>\nWhat is it?" and len(with_image["frames"]) == 1
    assert text_only["frames"] == [] and text_only["conversation"] == records[1]["conversations"]
    assert ds[2]["conversation"][0]["value"] == "<image>\nColour?"


def official_fixtures(root):
    """Every dataset's fixture under one --data_root, each in its official layout."""
    refcoco_fixture(root)
    ytvos_fixture(root / "ytvos")
    davis_fixture(root / "davis17", "referformer")
    mevis_fixture(root, "train")
    revos_fixture(root)
    llava_fixture(root)


TRAIN_MIX = "refcocog:1,ytvos:1,davis17:1,mevis:1,revos:1,llava:1"


def test_every_official_train_split_gives_training_batches(tmp_path):
    """Each item of each official-layout train split makes a batch the model trains on (loss finite, gradients flow)."""
    import losses
    import salma

    official_fixtures(tmp_path)
    mix = data.build_train_mix(TRAIN_MIX, str(tmp_path))
    assert [len(p) for p in mix.parts] == [1, 2, 4, 3, 1, 3]  # refcocog, ytvos, davis17, mevis, revos, llava
    cfg = salma.Config.from_preset("tiny")
    model, tok = salma.build_salma(cfg)
    for i in range(len(mix)):
        batch = data.make_train_batch([mix[i]], tok, model.cfg, [i])
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


def test_train_py_runs_on_the_official_mix(tmp_path):
    """train.py --data=<every dataset> on the official-layout fixtures: steps logged, checkpoint written."""
    import subprocess
    import sys

    official_fixtures(tmp_path / "data")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--data={TRAIN_MIX}", f"--data_root={tmp_path / 'data'}",
                           "--max_steps=4", "--batch_size=2", "--save_every=4", f"--out_dir={out}"],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3, 4] and os.path.isfile(out / "ckpt.pt")
