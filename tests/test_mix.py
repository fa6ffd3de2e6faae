"""The rest of the paper's training mix: region prompts (Osprey), GCG, SA-V, video chat, multi-[SEG]."""

import json
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

import data
import eval as eval_module
import losses
import salma
import fixtures
import common
import checkpoint
import inputs
import metrics

TINY = salma.Config.from_preset("tiny")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model, tok = checkpoint.build_model(TINY)
    return model.eval(), tok


def two_regions(w=224, h=112):
    """An image (two tiles + thumbnail in the tiny preset) and two region masks (2, H, W)."""
    image = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(image).rectangle([0, 0, 100, 111], fill="red")
    ImageDraw.Draw(image).ellipse([130, 30, 200, 100], fill="blue")
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, :, :101] = True
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[1] = (xx - 165) ** 2 + (yy - 65) ** 2 <= 35 ** 2
    return image, masks


# ---------------------------------------------------------------------------------------------
# region prompts


def official_region_inputs(model, tok, pixel_values, masks, question):
    """Sa2VA's region prompt built as its code builds it, for comparison with ours.

    Written from bytedance/Sa2VA projects/llava_sam2/hf/models/modeling_sa2va_chat.py
    (commit d01bf3f): predict_forward(mask_prompts=...) builds the text (vp_token_str) and
    _llm_forward builds vp_embeds (every tile's tokens, then per object the thumbnail tile's
    tokens under the object's mask) and writes them into the <IMG_CONTEXT> rows.
    """
    g = int(TINY.image_size // TINY.patch_size * TINY.downsample_ratio)
    mask_prompts = [F.interpolate(masks.float().unsqueeze(0), size=(g, g), mode="nearest").squeeze(0)]
    region_pixels = [m.bool().to(torch.int64).sum() for m in mask_prompts[0]]
    vp_token_str = "\nThere are {} part regions in the picture: ".format(len(mask_prompts[0]))
    for i in range(len(mask_prompts[0])):
        vp_token_str = vp_token_str + f"region{i + 1}" + "<vp>" + "<IMG_CONTEXT>" * region_pixels[i] + "</vp>"
        vp_token_str = vp_token_str + (".\n" if i == len(mask_prompts[0]) - 1 else ", ")
    num_image_tokens = pixel_values.shape[0] * TINY.num_image_tokens
    image_token_str = ("<img>" + "<IMG_CONTEXT>" * num_image_tokens + "</img>" + "\n").strip()
    text = question.replace("<image>", image_token_str + vp_token_str)
    input_text = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n".format(input=text)
    ids = torch.tensor(tok.encode(input_text, add_special_tokens=False).ids)

    vit_embeds = model.mllm.extract_feature(pixel_values)  # (n_tiles, hw, C)
    C = vit_embeds.shape[-1]
    vp_overall_mask = torch.tensor([False] * (len(pixel_values) - 1) + [True])
    overall_tile_vit_embeds = vit_embeds[vp_overall_mask]
    prompt_masks = [mask_prompts[0].bool()]
    vp_embeds, i_vp_img = [], 0
    for i_img in range(len(vit_embeds)):
        vp_embeds.append(vit_embeds[i_img].reshape(-1, C))
        if vp_overall_mask[i_img]:
            tile_vit_embeds = overall_tile_vit_embeds[i_vp_img].reshape(-1, C)
            n_obj = len(prompt_masks[i_vp_img])
            tile_vit_embeds = tile_vit_embeds.unsqueeze(0).repeat(n_obj, 1, 1)
            vp_embeds.append(tile_vit_embeds[prompt_masks[i_vp_img].reshape(n_obj, -1)])
            i_vp_img += 1
    vp_embeds = torch.cat(vp_embeds, dim=0)
    input_embeds = model.mllm.language_model.embed_tokens(ids).clone()
    input_embeds[ids == tok.token_to_id("<IMG_CONTEXT>")] = vp_embeds
    return ids, input_embeds, region_pixels


def test_region_prompt_layout_and_tokens_match_sa2va(monkeypatch):
    model, tok = tiny_model()
    image, masks = two_regions()
    seen = {}

    def fake_generate(input_ids, pixel_values=None, max_new_tokens=32, stop_ids=(), keep_hidden=False, context_index=None):
        seen.update(ids=input_ids[0], pixel_values=pixel_values, embeds=model.mllm.embed(input_ids, pixel_values, context_index)[0])
        return torch.tensor([[tok.token_to_id("<|im_end|>")]]), [torch.zeros(1, input_ids.shape[1], TINY.llm_hidden)] * (TINY.llm_layers + 1)

    monkeypatch.setattr(model.mllm, "generate", fake_generate)
    question = "<image>\n" + inputs.REGION_QUESTION
    assert model.describe_region(image, masks, tok) == ""
    assert seen["pixel_values"].shape[0] == 3  # 2x1 grid + thumbnail: the regions read the thumbnail
    with torch.inference_mode():
        ids, embeds, region_pixels = official_region_inputs(model, tok, seen["pixel_values"], masks, question)
    assert all(0 < k < TINY.num_image_tokens for k in region_pixels) and region_pixels[0] != region_pixels[1]
    assert torch.equal(seen["ids"], ids)
    assert (ids == tok.token_to_id("<IMG_CONTEXT>")).sum() == 3 * TINY.num_image_tokens + sum(region_pixels)
    torch.testing.assert_close(seen["embeds"], embeds, rtol=0, atol=0)


def test_region_tokens_are_the_thumbnail_tokens_under_each_mask():
    grid = torch.zeros(2, 4, 4, dtype=torch.bool)
    grid[0, 1, 2] = grid[0, 3, 0] = True
    grid[1, 0, 0] = True
    index = inputs.region_context_index(num_tiles=3, tokens_per_tile=16, grid_masks=grid, first_tile=2)
    assert index.tolist() == list(range(32, 80)) + [64 + 6, 64 + 12] + [64 + 0]
    text = inputs.region_prompt(grid)
    assert text == ("\nThere are 2 part regions in the picture: region1<vp>" + "<IMG_CONTEXT>" * 2 + "</vp>, "
                    "region2<vp><IMG_CONTEXT></vp>.\n")


# ---------------------------------------------------------------------------------------------
# several [SEG] in one answer (GCG), long conversations


def gcg_sample():
    """One grounded caption with two phrases (two [SEG] in one answer) and a second one-[SEG] turn."""
    image, masks = two_regions()
    third = torch.zeros_like(masks[0])
    third[:20, 180:] = True
    turns = [("<image>\nPlease briefly describe the contents of the image.",
              "<p> A red box </p> [SEG] beside <p> a blue ball </p> [SEG]."),
             ("Please segment the top right corner.", "Sure, [SEG].")]
    return {"id": "gcg", "frames": [image], "exprs": [], "turns": turns,
            "masks": torch.cat([masks, third[None]])[:, None], "is_video": False, "conversation": None}


def test_every_seg_of_a_caption_supervises_its_own_mask_and_question():
    _, tok = tiny_model()
    s = gcg_sample()
    batch = inputs.make_train_batch([s], tok, TINY, seeds=[0])
    low = TINY.sam_image_size // 4
    assert batch["seg_index"][:, 0].tolist() == [0, 0, 0] and batch["pair_seg"].tolist() == [0, 1, 2]
    for k in range(3):
        want = F.interpolate(s["masks"][k, 0][None, None].float(), size=(low, low), mode="nearest")[0, 0]
        assert torch.equal(batch["pair_masks"][k], want)
    words = lambda k: tok.decode(batch["input_ids"][0][batch["seg_text"][k]].tolist())  # noqa: E731
    assert words(0) == words(1) == "\nPlease briefly describe the contents of the image."
    assert words(2) == "Please segment the top right corner."
    # TMC: features that carry the identity of each mask pool to the k-th one-hot under the k-th mask
    h = 16  # F_v's side in the tiny preset
    region_maps = F.adaptive_avg_pool2d(batch["pair_masks"][:, None], h)[:, 0] > 0.5  # (3, h, h)
    feats = torch.zeros(3, 64, h, h)
    feats[:, :3] = region_maps.float()[None]
    z = torch.eye(3, 64)
    out = {"logits": torch.zeros(1, batch["input_ids"].shape[1], tok.get_vocab_size()), "low_res": torch.zeros(3, 1, low, low), "tmc_feats": feats}
    cfg = losses.LossConfig()
    aligned = losses.salma_loss_parts({**out, "z_seg": z}, batch, cfg)["tmc"]
    swapped = losses.salma_loss_parts({**out, "z_seg": z[[1, 0, 2]]}, batch, cfg)["tmc"]
    torch.testing.assert_close(aligned, losses.tmc_loss(z, z, cfg.tau_tmc))
    assert aligned < swapped - 1


def test_long_conversations_are_cut_at_turn_boundaries_and_counted():
    _, tok = tiny_model()
    s = gcg_sample()
    full = inputs.make_train_batch([s], tok, TINY, seeds=[0])
    second_turn = int((full["input_ids"][0] == tok.token_to_id("<|im_start|>")).nonzero()[2])
    before = common.WARNINGS["conversation cut at a turn boundary to fit the context"]
    cut = inputs.make_train_batch([s], tok, TINY, seeds=[0], max_tokens=second_turn + 3)
    assert common.WARNINGS["conversation cut at a turn boundary to fit the context"] == before + 1
    assert cut["input_ids"].shape[1] == second_turn
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :second_turn])
    assert cut["seg_index"].shape[0] == 2 and torch.equal(cut["pair_masks"], full["pair_masks"][:2])
    assert (cut["labels"] != -100).sum() == (full["labels"][0, :second_turn] != -100).sum() > 0


# ---------------------------------------------------------------------------------------------
# readers on fixtures in Sa2VA's layouts; masks against pycocotools, turns against Sa2VA's text


def rle_of(mask):
    """A compressed COCO RLE (counts as str, as the JSON files hold them) of a bool (H, W) array."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def box(h, w, x0, y0, x1, y1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def save_image(path, w=64, h=48, colour=(90, 120, 150)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def save_video(path, num_frames, w=64, h=48):
    """An mp4 whose frame t is a flat grey of level 7 t (to tell frames apart after decoding)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for t in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 7 * t, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_numbers(frames, video_path):
    """Which frame of the video each PIL frame is (nearest grey level of a reference decode with PyAV)."""
    with av.open(video_path) as container:
        levels = np.array([f.to_ndarray(format="rgb24").mean() for f in container.decode(video=0)])
    return [int(np.abs(levels - np.asarray(f).mean()).argmin()) for f in frames]


def json_dump(obj, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


POLY_A, POLY_B = [4, 4, 30, 4, 30, 20, 4, 20], [40, 30, 60, 30, 50, 44]


def gcg_fixture(root):
    """The four GCG files of glamm_data/ (layouts read by Sa2VA's GCG_Dataset.py / gcg_process.py)."""
    g = root / "glamm_data"
    save_image(str(g / "images/coco2014/train2014/COCO_train2014_000000000123.jpg"))
    json_dump([{"123": {"img_file_name": "COCO_train2014_000000000123.jpg",
                        "caption": '"A man riding a horse near a tree."',
                        "refs": [{"sentence": "a man riding", "bbox": [0, 0, 1, 1], "segmentation": [POLY_A, POLY_B]},
                                 {"sentence": "riding a horse", "bbox": [0, 0, 1, 1], "segmentation": [POLY_B]},
                                 {"sentence": "a dog", "bbox": [0, 0, 1, 1], "segmentation": [POLY_A]}]}}],
              str(g / "annotations/RefCOCOg_GCG_train.json"))
    for folder, ann, name in (("grandf/train", "GranDf_HA_GCG_train.json", "g1.jpg"), ("coco2017", "OpenPsgGCG_train.json", "p1.jpg")):
        save_image(str(g / "images" / folder / name))
        json_dump([{"file_name": name, "height": 48, "width": 64, "image_id": name[:2], "caption": "A cat on a mat.",
                    "groundings": {"a mat": {"token_positives": [9, 14], "rle_masks": [rle_of(box(48, 64, 0, 40, 64, 48)), rle_of(box(48, 64, 0, 30, 10, 48))]},
                                   "A cat": {"token_positives": [0, 5], "rle_masks": [rle_of(box(48, 64, 20, 10, 40, 35))]},
                                   "nothing": None}}], str(g / "annotations" / ann))
    save_image(str(g / "images/flickr30k/Flickr30K/1000.jpg"))
    json_dump({"images": [{"id": 1, "file_name": "1000.jpg", "height": 48, "width": 64, "caption": "Two dogs play in the snow."},
                          {"id": 2, "file_name": "1001.jpg", "height": 48, "width": 64, "caption": "Dogs."}],
               "annotations": [{"id": 1, "image_id": 1, "bbox": [40, 0, 20, 20], "area": 400, "tokens_positive": [[19, 25]],
                                "sam_mask": rle_of(box(48, 64, 40, 0, 60, 20))},
                               {"id": 2, "image_id": 1, "bbox": [0, 20, 30, 20], "area": 600, "tokens_positive": [[0, 8]],
                                "sam_mask": rle_of(box(48, 64, 0, 20, 30, 40))},
                               {"id": 3, "image_id": 1, "bbox": [70, 60, 5, 5], "area": 25, "tokens_positive": [[9, 13]],
                                "sam_mask": rle_of(box(48, 64, 0, 0, 1, 1))}],
               "categories": [{"id": 1, "name": "object"}]}, str(g / "annotations/flickr_mergedGT_GCG_train.json"))


def official_gcg_answer(caption, spans):
    """Sa2VA's GCG answer, written from bytedance/Sa2VA projects/llava_sam2/datasets/gcg_process.py
    (commit d01bf3f, refcocog_parse_annotations / grandf_conversation's tag_caption)."""
    for start, end in sorted(spans, key=lambda x: x[0], reverse=True):
        caption = f"{caption[:start]}<p> {caption[start:end]} </p> [SEG]{caption[end:]}"
    return caption


def test_gcg_readers_in_sa2va_layouts(tmp_path):
    gcg_fixture(tmp_path)
    mix = data.build_dataset("gcg", str(tmp_path), split="train", train=True)
    # one caption per file (Flickr's 3-word caption left out); GranDf repeated 10x as in Sa2VA's configs
    # (projects/llava_sam2/configs/sa2va_1b.py, commit d01bf3f: glamm_grandf_dataset repeats=10, the other three 1)
    assert len(mix) == 1 + 10 + 1 + 1
    refcocog, grandf, flickr, psg = mix[0], mix[1], mix[11], mix[12]
    assert all(mix[i]["turns"] == grandf["turns"] for i in range(2, 11))
    # RefCOCOg-GCG: lower-cased caption; "a man riding" overlaps "riding a horse" and ends before it
    caption = "a man riding a horse near a tree."
    assert refcocog["turns"][0][1] == official_gcg_answer(caption, [[0, 5], [6, 20]])
    assert refcocog["turns"][0][1] == "<p> a man </p> [SEG] <p> riding a horse </p> [SEG] near a tree."
    poly = lambda polys: sum(mask_utils.decode(mask_utils.frPyObjects([p], 48, 64)) for p in polys).squeeze(-1) > 0  # noqa: E731
    assert torch.equal(refcocog["masks"][:, 0], torch.from_numpy(np.stack([poly([POLY_A, POLY_B]), poly([POLY_B])])))
    for s in (grandf, psg):  # groundings sorted by position; each mask the sum of its RLEs
        assert s["turns"][0][1] == "<p> A cat </p> [SEG] on <p> a mat </p> [SEG]."
        assert torch.equal(s["masks"][1, 0], torch.from_numpy(box(48, 64, 0, 40, 64, 48) | box(48, 64, 0, 30, 10, 48)))
    assert flickr["turns"][0][1] == official_gcg_answer("Two dogs play in the snow.", [[0, 8], [19, 25]])
    assert torch.equal(flickr["masks"][0, 0], torch.from_numpy(box(48, 64, 0, 20, 30, 40)))
    for s in (refcocog, grandf, flickr, psg):
        question = s["turns"][0][0]
        assert question.startswith("<image>\n") and question[len("<image>\n"):] in data.GCG_QUESTIONS
        assert s["turns"][0][1].count("[SEG]") == s["masks"].shape[0] == 2
    _, tok = tiny_model()
    batch = inputs.make_train_batch([refcocog], tok, TINY, seeds=[0])
    low = TINY.sam_image_size // 4
    assert batch["pair_seg"].tolist() == [0, 1]
    for k in range(2):
        assert torch.equal(batch["pair_masks"][k], F.interpolate(refcocog["masks"][k, 0][None, None].float(), size=(low, low))[0, 0])


def sav_fixture(root, num_frames=32):
    """video_datas/Ref-SAV.json + video_datas/sam_v_full/ (Sa2VA's README data/ tree and its configs'
    VIDEO_DATA_ROOT paths; layout read by Sa2VA's ReSAM2_Dataset.py: the entry's paths repeat 'sav_000/' before
    'sav_train/', which Sa2VA's sam2_path_patch in projects/sa2va/datasets/data_utils.py drops)."""
    folder = root / "video_datas" / "sam_v_full" / "sav_train" / "sav_000"
    save_video(str(folder / "sav_000001.mp4"), num_frames)
    masklet = [[rle_of(box(48, 64, t, 0, t + 10, 10)), rle_of(box(48, 64, 0, 20 + t // 4, 15, 30 + t // 4))]
               for t in range(0, num_frames, 4)]  # SA-V annotates every 4th frame; one RLE per object
    json_dump({"masklet": masklet, "video_id": "sav_000001"}, str(folder / "sav_000001_manual.json"))
    json_dump({"sav_000001": {"video_path": "sav_000/sav_train/sav_000/sav_000001.mp4",
                              "anno_path": "sav_000/sav_train/sav_000/sav_000001_manual.json",
                              "objects": {"0": {"formated": "A square sliding right.", "short_caps": ["square"]},
                                          "1": {"formated": "A bar moving down.", "short_caps": ["bar"]}}}},
              str(root / "video_datas" / "Ref-SAV.json"))
    return masklet


def test_sav_reader_samples_objects_and_annotated_frames(tmp_path):
    masklet = sav_fixture(tmp_path)
    ds = data.build_dataset("sav", str(tmp_path), split="train", train=True)
    assert len(ds) == 1
    s = ds[0]
    assert s["masks"].shape == (5, 5, 48, 64) and len(s["frames"]) == 5 and len(s["turns"]) == 5
    objects = {"A square sliding right.": 0, "A bar moving down.": 1}
    raw = frame_numbers(s["frames"], str(tmp_path / "video_datas/sam_v_full/sav_train/sav_000/sav_000001.mp4"))
    assert raw == sorted(raw) and all(t % 4 == 0 for t in raw) and len(set(raw)) == 5
    for k, (question, answer) in enumerate(s["turns"]):
        expr = question.removeprefix("<image>").removeprefix("Please segment the object according to the description: ")
        assert question.startswith("<image>Please segment" if k == 0 else "Please segment") and answer in inputs.SEG_ANSWERS
        for j, t in enumerate(raw):
            want = mask_utils.decode(compressed(masklet[t // 4]))[:, :, objects[expr]] > 0  # Sa2VA's decode_masklet
            assert torch.equal(s["masks"][k, j], torch.from_numpy(want))
    assert data.build_dataset("sav", str(tmp_path), split="train", train=True)[0]["exprs"] == s["exprs"]  # deterministic
    # the same file under the name Sa2VA's first configs give it (bytedance/Sa2VA issues #17 and #55)
    os.rename(tmp_path / "video_datas/Ref-SAV.json", tmp_path / "video_datas/sam_v_final_v3.json")
    assert data.build_dataset("sav", str(tmp_path), split="train", train=True)[0]["exprs"] == s["exprs"]


def compressed(rles):
    return [{"size": r["size"], "counts": r["counts"].encode()} for r in rles]


def osprey_fixture(root):
    """osprey-724k/Osprey-724K/*.json + osprey-724k/coco/<split>/ (layout read by Sa2VA's Osprey_Dataset.py)."""
    save_image(str(root / "osprey-724k/coco/train2017/000000000009.jpg"), w=224, h=112)
    regions = [{"segmentation": [[0, 0, 100, 0, 100, 111, 0, 111]], "bbox": [0, 0, 100, 111]},
               {"segmentation": rle_of(box(112, 224, 150, 40, 200, 90)), "bbox": [150, 40, 50, 50]}]
    record = {"id": 9, "file_name": "000000000009.jpg", "height": 112, "width": 224, "annotation": regions}
    conversation = [{"from": "human", "value": "What is <region1>?"}, {"from": "gpt", "value": "A <red> box."},
                    {"from": "human", "value": "And <region2>?"}, {"from": "gpt", "value": "A ball."}]
    for name in data.OSPREY_FILES:
        extra = {"description": ["A red box.", "A blue ball."]} if name == "osprey_detail_description.json" else {"conversations": conversation}
        json_dump([{**record, **extra}], str(root / "osprey-724k/Osprey-724K" / name))
    return regions


def official_osprey_text(n_tiles, region_pixels, conversation):
    """The Osprey sample's text as Sa2VA builds it, written from bytedance/Sa2VA
    projects/llava_sam2/datasets/Osprey_Dataset.py (commit d01bf3f: _process_conversation,
    replace_image_str) and xtuner's qwen_chat template (INSTRUCTION, SUFFIX '<|im_end|>', SEP '\\n')."""
    start_region_str = "<image> There are {} part regions in the picture: ".format(len(region_pixels))
    for i in range(len(region_pixels)):
        start_region_str += f"region{i + 1}<vp>" + "<IMG_CONTEXT>" * region_pixels[i] + "</vp>"
        start_region_str += ".\n" if i == len(region_pixels) - 1 else ", "
    turns, question = [], ""
    for i, item in enumerate(conversation):
        value = item["value"].replace("<", "").replace(">", "")
        if i == 0:
            value = start_region_str + value
        if item["from"] == "human":
            if "<image>" in value:
                value = ("<image>" + "\n" + value.replace("<image>", "").strip()).strip()
            question += value
        else:
            turns.append((question, value))
            question = ""
    image = "<img>" + "<IMG_CONTEXT>" * (n_tiles * TINY.num_image_tokens) + "</img>"
    turns[0] = (turns[0][0].replace("<image>", image), turns[0][1])
    return "".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in turns)


def test_osprey_reader_region_prompts_and_text_match_sa2va(tmp_path):
    regions = osprey_fixture(tmp_path)
    mix = data.build_dataset("osprey", str(tmp_path), split="train", train=True)
    assert len(mix) == 5
    s = mix[0]
    official = np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(regions[0]["segmentation"], 112, 224))),
                         mask_utils.decode(compressed([regions[1]["segmentation"]])[0])]) > 0  # Sa2VA's annToMask
    assert torch.equal(s["prompt_masks"], torch.from_numpy(official))
    assert s["turns"] == [("<image>What is region1?", "A red box."), ("And region2?", "A ball.")]
    _, tok = tiny_model()
    batch = inputs.make_train_batch([s], tok, TINY, seeds=[0])
    grid = F.interpolate(s["prompt_masks"].float()[None], size=(4, 4), mode="nearest")[0]
    n_tiles = batch["pixel_values"].shape[0]
    text = official_osprey_text(n_tiles, [int(m.sum()) for m in grid], json.load(open(tmp_path / "osprey-724k/Osprey-724K/osprey_conversation.json"))[0]["conversations"])
    assert torch.equal(batch["input_ids"][0], torch.tensor(tok.encode(text, add_special_tokens=False).ids))
    assert batch["context_index"].tolist() == list(range(n_tiles * 16)) + [(n_tiles - 1) * 16 + int(i) for m in grid for i in m.flatten().nonzero()]
    described = mix[1]  # the detailed descriptions: one Osprey question per region
    assert [a for _, a in described["turns"]] == ["A red box.", "A blue ball."]
    assert described["turns"][1][0].replace("region2", "<region>") in data.DETAILED_QUESTIONS
    short = mix[2]
    assert short["turns"][0][0].endswith("region1?" + data.OSPREY_SHORT)


def test_video_chat_reader_samples_one_frame_per_segment(tmp_path):
    save_video(str(tmp_path / "video_datas/chat_univi/Activity_Videos/v_abc.mp4"), 23)
    json_dump([{"id": "v_abc", "video": "v_abc.mkv", "conversations": [
        {"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "Nothing moves."},
        {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Grey."}]}], str(tmp_path / "video_datas/chat_univi/video_chat.json"))
    ds = data.build_dataset("video_chat", str(tmp_path), split="train", train=True)
    s = ds[0]
    bounds = np.linspace(0, 23, num=6, dtype=int)  # Sa2VA's ChatUniVi_Dataset._get_rawvideo_dec
    raw = frame_numbers(s["frames"], str(tmp_path / "video_datas/chat_univi/Activity_Videos/v_abc.mp4"))
    assert len(raw) == 5 and all(bounds[i] <= t < bounds[i + 1] for i, t in enumerate(raw))
    assert s["turns"] == [("<image>\nWhat happens?", "Nothing moves."), ("What colour is it?", "Grey.")]
    assert s["masks"].shape == (0, 5, 48, 64) and s["is_video"]
    _, tok = tiny_model()
    batch = inputs.make_train_batch([s], tok, TINY, seeds=[0])
    frames = "\n".join(["<img>" + "<IMG_CONTEXT>" * 16 + "</img>"] * 5)  # prepare_text: frame tokens joined by '\n', stripped
    text = (f"<|im_start|>user\n{frames}\nWhat happens?<|im_end|>\n<|im_start|>assistant\nNothing moves.<|im_end|>\n"
            "<|im_start|>user\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\nGrey.<|im_end|>\n")
    assert torch.equal(batch["input_ids"][0], torch.tensor(tok.encode(text, add_special_tokens=False).ids))


# ---------------------------------------------------------------------------------------------
# training on each source and on the paper's whole mix

FULL_MIX = "refcoco:4,refcoco+:4,refcocog:4,gcg:1,mevis:4,revos:10,ytvos:4,davis17:4,sav:4,llava:1,video_chat:1,osprey:1"


def full_mix_fixtures(root):
    """Every source of the paper's training mix under one --data_root, each in its official layout."""
    fixtures.official_fixtures(root)
    for name in ("refcoco", "refcoco+"):  # the refer-API layout of RefCOCO/+ : refs(unc).p
        shutil.copytree(root / "refcocog", root / name)
        os.rename(root / name / "refs(umd).p", root / name / "refs(unc).p")
    gcg_fixture(root)
    sav_fixture(root)
    osprey_fixture(root)
    save_video(str(root / "video_datas/chat_univi/Activity_Videos/v_abc.mp4"), 12)
    json_dump([{"video": "v_abc.mp4", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                                        {"from": "gpt", "value": "Nothing."}]}], str(root / "video_datas/chat_univi/video_chat.json"))


def test_one_training_step_on_each_new_source_trains_every_group(tmp_path):
    full_mix_fixtures(tmp_path)
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(TINY)
    salma.set_trainable(model, "full")
    model.train()
    for name in ("gcg", "sav", "osprey", "video_chat"):
        model.zero_grad()
        ds = data.build_dataset(name, str(tmp_path), train=True)
        batch = inputs.make_train_batch([ds[0], ds[len(ds) - 1]], tok, TINY, seeds=[0, 1])
        parts = losses.salma_loss_parts(model(batch, ramp=1.0), batch, losses.LossConfig())
        loss, logs = losses.total_loss(parts, losses.LossConfig(), 1.0)
        loss.backward()
        assert all(np.isfinite(list(logs.values()))), name
        assert model.mllm.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0, name
        has_masks = name in ("gcg", "sav")
        assert (logs["dice"] > 0) == has_masks and (logs["tmc"] > 0) == has_masks, (name, logs)
        if has_masks:
            assert model.grounding.sam2_model.sam_mask_decoder.iou_token.weight.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_train_py_runs_the_papers_whole_mix(tmp_path):
    """train.py --data=<the paper's mix with its repeat factors> on official-layout fixtures of every source."""
    full_mix_fixtures(tmp_path / "data")
    mix = data.build_train_mix(FULL_MIX, str(tmp_path / "data"))
    assert len(mix.parts) == 12 and all(len(p) > 0 for p in mix.parts)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), f"--data={FULL_MIX}", f"--data_root={tmp_path / 'data'}",
                           "--max_steps=3", "--batch_size=3", "--save_every=3", "--max_length=200", f"--out_dir={out}"],
                          cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]
    problems = json.load(open(out / "data_problems.json"))  # video and GCG samples are over 200 tokens here
    assert sum(v for k, v in problems.items() if "context" in k) > 0 and "data problems handled" in proc.stdout


# ---------------------------------------------------------------------------------------------
# GCG evaluation (GLaMM's metrics, as Sa2VA runs them)


def test_gcg_answer_parsing_miou_and_matching_by_hand():
    """GLaMM's rules, written from bytedance/Sa2VA projects/llava_sam2/evaluation/gcg_eval.py
    (process_and_save_output) and metrics_gcg.py (compute_miou, find_best_matches), commit d01bf3f."""
    caption, phrases = metrics.parse_gcg_answer("<p> A cat </p> [SEG] on <p> a mat </p> [SEG].<|im_end|>")
    assert caption == "A cat on a mat ." and phrases == ["A cat", "a mat"]  # "[SEG]." leaves " ." as in Sa2VA
    a, b, half_a = box(10, 10, 0, 0, 4, 5), box(10, 10, 5, 0, 10, 10), box(10, 10, 0, 0, 2, 5)
    assert metrics.gcg_miou([a, half_a], [a, b]) == 1.0  # after (a, a) only IoU 0 is left: pairing stops
    assert metrics.gcg_miou([half_a], [a, b]) == 0.5
    assert metrics.gcg_miou([], [a]) == 0.0
    assert metrics.gcg_matches([a, b], [a, b], [[0.9, 0.0], [0.0, 0.9]]) == 2
    assert metrics.gcg_matches([a, b], [b, a], [[0.0, 0.9], [0.9, 0.0]]) == 2  # pairs by IoU, not by order
    assert metrics.gcg_matches([a, b], [a, b], [[0.1, 0.0], [0.0, 0.9]]) == 0  # the best-IoU pair fails: search ends
    assert metrics.gcg_matches([a, b], [half_a, b], [[0.9, 0.0], [0.0, 0.9]]) == 2  # IoU 0.5 counts
    assert metrics.gcg_matches([a], [box(10, 10, 0, 0, 1, 5)], [[0.9]]) == 0  # IoU 0.25 does not


GCG_EVAL = [("A cat on a mat.", ["A cat", "a mat"], [(0, 0, 20, 20), (0, 30, 64, 48)], (200, 30, 30)),
            ("A red ball.", ["A red ball"], [(30, 10, 50, 30)], (30, 200, 30))]


def gcg_eval_fixture(root):
    """glamm_data/annotations/gcg_val_test/val_gcg_coco_{caption,mask}_gt.json + images/grandf/val_test/
    (GLaMM's GranDf evaluation files, read as Sa2VA's metrics_gcg.py reads them)."""
    images, captions, masks = [], [], []
    for i, (caption, labels, boxes, colour) in enumerate(GCG_EVAL):
        save_image(str(root / f"glamm_data/images/grandf/val_test/sa_{i}.jpg"), colour=colour)
        images.append({"id": f"sa_{i}", "file_name": f"sa_{i}.jpg", "height": 48, "width": 64})
        captions.append({"id": i, "image_id": f"sa_{i}", "caption": caption, "labels": labels})
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            m = box(48, 64, x0, y0, x1, y1)
            masks.append({"id": 10 * i + k + 1, "image_id": f"sa_{i}", "category_id": 1, "iscrowd": 0, "area": int(m.sum()),
                          "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle_of(m)})
    folder = root / "glamm_data/annotations/gcg_val_test"
    json_dump({"images": images, "annotations": captions}, str(folder / "val_gcg_coco_caption_gt.json"))
    json_dump({"images": images, "annotations": masks, "categories": [{"id": 1, "name": "object"}]}, str(folder / "val_gcg_coco_mask_gt.json"))


@pytest.mark.slow
def test_eval_gcg_scores_the_ground_truth_answer_perfectly_and_a_wrong_mask_lower(tmp_path, monkeypatch):
    gcg_eval_fixture(tmp_path)
    calls = []

    def answer_with(wrong):
        def segment(model, tok, image, question, max_new_tokens):
            calls.append(question)
            i = 0 if np.asarray(image)[0, 0, 0] > 100 else 1  # which fixture image (by its colour)
            caption, labels, boxes, _ = GCG_EVAL[i]
            if wrong and i == 0:
                boxes = [boxes[0], (0, 30, 20, 48)]  # IoU 20/64 with the mat
            answer = caption
            for label in labels:
                answer = answer.replace(label, f"<p> {label} </p> [SEG]")
            return answer, torch.from_numpy(np.stack([box(48, 64, *bx) for bx in boxes]))
        return segment

    monkeypatch.setattr(checkpoint, "model_from_flags", lambda *a, **k: tiny_model())
    monkeypatch.setattr(metrics, "bert_similarity", lambda path: lambda gt, pred: [[float(g == p) for p in pred] for g in gt])
    scores = {}
    for wrong in (False, True):
        monkeypatch.setattr(eval_module, "segment_answer", answer_with(wrong))
        out = tmp_path / f"out_{wrong}"
        scores[wrong] = eval_module.main(["--dataset=gcg", f"--data_root={tmp_path}", "--ckpt=given", f"--out_dir={out}",
                                           "--bert_dir=stub", "--quiet"])
        assert json.load(open(out / "metrics.json"))["mIoU"] == scores[wrong]["mIoU"]
    assert calls[0] == data.GCG_QUESTION and len(calls) == 4
    right, wrong = scores[False], scores[True]
    assert right["mIoU"] == 1.0 and right["recall"] == 1.0 and right["AP50"] == 1.0 and right["METEOR"] > 0.9
    assert abs(wrong["mIoU"] - (1 + 20 / 64) / 2 / 2 - 0.5) < 1e-9  # image 0: (1 + 20/64) / 2, image 1: 1
    assert abs(wrong["recall"] - 2 / 3) < 1e-9 and wrong["AP50"] < 1.0
