"""Shared test helpers: the official dataset layouts written small (each with the ground truth the
official tools give), and the check that a command failed with one clear line."""

import json
import os
import pickle

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

POLYGON = [[100.5, 80.25, 300.75, 90.5, 280.0, 300.5, 120.25, 260.75], [400.0, 50.0, 500.5, 60.25, 450.25, 150.0]]
TRAINED_STEPS = 30  # steps of conftest's shared tiny run
PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756  # DAVIS/YouTube-VOS palette: index = object id

def uncompressed_counts(mask):
    """COCO's uncompressed RLE counts: alternating 0/1 run lengths down the columns, starting with zeros."""
    flat = mask.T.ravel()
    edges = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs

def save_jpg(path, w=32, h=24, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), (value, value, value)).save(path)

def official_rle(mask):
    """A mask as MeViS/ReVOS mask_dict.json store it: pycocotools RLE, counts as str."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}

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

def official_fixtures(root):
    """Every dataset's fixture under one --data_root, each in its official layout."""
    refcoco_fixture(root)
    ytvos_fixture(root / "ytvos")
    davis_fixture(root / "davis17", "referformer")
    mevis_fixture(root, "train")
    revos_fixture(root)
    llava_fixture(root)

def assert_one_line_error(proc, *names):
    """The process failed, printed no traceback, and its last line names what was wrong."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert all(name in last for name in names), last
