"""The rest of the paper's training mix: region prompts (Osprey), GCG, SA-V, video chat, multi-[SEG]."""

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data
import losses
import salma

TINY = salma.Config.from_preset("tiny")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model, tok = salma.build_salma(TINY)
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
        return torch.tensor([tok.token_to_id("<|im_end|>")]), [torch.zeros(1, input_ids.shape[1], TINY.llm_hidden)] * (TINY.llm_layers + 1)

    monkeypatch.setattr(model.mllm, "generate", fake_generate)
    question = "<image>\n" + salma.REGION_QUESTION
    assert model.describe_region(image, masks, tok) == ""
    assert seen["pixel_values"].shape[0] == 3  # 2x1 grid + thumbnail: the regions read the thumbnail
    with torch.inference_mode():
        ids, embeds, region_pixels = official_region_inputs(model, tok, seen["pixel_values"], masks, question)
    assert all(0 < k < TINY.num_image_tokens for k in region_pixels) and region_pixels[0] != region_pixels[1]
    img_end, ctx = tok.token_to_id("</img>"), tok.token_to_id("<IMG_CONTEXT>")
    after_image = lambda x: x[int((x == img_end).nonzero().max()):]  # noqa: E731  the region text and the turn
    assert torch.equal(after_image(seen["ids"]), after_image(ids))
    assert (seen["ids"] == ctx).sum() == (ids == ctx).sum() == 3 * TINY.num_image_tokens + sum(region_pixels)
    torch.testing.assert_close(seen["embeds"][seen["ids"] == ctx], embeds[ids == ctx], rtol=0, atol=0)


def test_region_tokens_are_the_thumbnail_tokens_under_each_mask():
    grid = torch.zeros(2, 4, 4, dtype=torch.bool)
    grid[0, 1, 2] = grid[0, 3, 0] = True
    grid[1, 0, 0] = True
    index = salma.region_context_index(num_tiles=3, tokens_per_tile=16, grid_masks=grid, first_tile=2)
    assert index.tolist() == list(range(32, 80)) + [64 + 6, 64 + 12] + [64 + 0]
    text = salma.region_prompt(grid)
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
    batch = data.make_train_batch([s], tok, TINY, seeds=[0])
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
    full = data.make_train_batch([s], tok, TINY, seeds=[0])
    second_turn = int((full["input_ids"][0] == tok.token_to_id("<|im_start|>")).nonzero()[2])
    before = data.WARNINGS["conversation cut at a turn boundary to fit the context"]
    cut = data.make_train_batch([s], tok, TINY, seeds=[0], max_tokens=second_turn + 3)
    assert data.WARNINGS["conversation cut at a turn boundary to fit the context"] == before + 1
    assert cut["input_ids"].shape[1] == second_turn
    assert torch.equal(cut["input_ids"][0], full["input_ids"][0, :second_turn])
    assert cut["seg_index"].shape[0] == 2 and torch.equal(cut["pair_masks"], full["pair_masks"][:2])
    assert (cut["labels"] != -100).sum() == (full["labels"][0, :second_turn] != -100).sum() > 0
