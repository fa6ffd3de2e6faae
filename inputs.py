"""
inputs: everything between raw data and the model's tensors.

  tokenizers     the official ones (tokenizer.json, or Qwen's vocab.json + merges.txt) and the tiny one
  chat template  Sa2VA's Qwen-style turns; <image> -> <img><IMG_CONTEXT>*256</img> per tile (encode_turns)
  images         InternVL's dynamic 448 tiles for the MLLM (mllm_pixels), 1024 squares for SAM-2 (sam_pixels)
  prompts        Sa2VA's evaluation questions, its region prompts (<vp>), the training questions and answers
  batches        samples -> the tensors SALMA.forward reads (make_train_batch)
"""

import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import common

# ---------------------------------------------------------------------------------------------
# tokenizer and chat template

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SEG = "[SEG]"
SA2VA_TOKENS = [SEG, "<p>", "</p>", "<vp>", "</vp>"]
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT]
# What each LLM's tokenizer puts before a prompt (Sa2VA's predict_forward calls tokenizer.encode, which adds
# InternLM2's <s> and nothing for Qwen2) and its end-of-text token (generation's eos_token_id; padding).
BOS_EOS = {"qwen2": ("", "<|endoftext|>"), "internlm2": ("<s>", "</s>")}
# Sa2VA's templates.py (stop words): both are the <|im_start|> turn format, without a system turn at inference.
CHAT_TEMPLATES = {"qwen_chat": ("<|im_end|>", "<|endoftext|>"), "internlm2_chat": ("<|im_end|>",)}


def llm_specials(llm_arch):
    """The special tokens a tokenizer for this LLM must have: its end of text (and start), then the chat and image ones."""
    bos, eos = BOS_EOS[llm_arch]
    return [eos] + ([bos] if bos else []) + CHAT_SPECIALS


QWEN_SPECIALS = llm_specials("qwen2")
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_byte_level(model):
    """A Qwen2-style tokenizer around a BPE model: Qwen's split regex, then byte-level."""
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(QWEN_PRETOKENIZE, behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


# Words of the prompts (eval_prompt, SEG_QUESTIONS, SEG_ANSWERS, REGION_QUESTION): with the generated
# scenes' words (testbed.WORDS) they make the tiny tokenizer's vocabulary, where each is one token, as a
# real BPE vocabulary gives common words, so that a 2-layer LLM reads "red circle" as two tokens rather
# than eleven bytes. Other text falls back to bytes.
PROMPT_WORDS = ("please segment the in this image video can you what is respond with segmentation mask output "
                "it sure result give me a short description region picture marked by").split()


def tiny_tokenizer(words, specials=QWEN_SPECIALS):
    """Byte-level BPE whose merges spell each of words (any case, with or without a leading space) as
    one token; other text stays bytes; + specials (the LLM's and InternVL's) and Sa2VA's. The word order does not matter."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = qwen_byte_level(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    words = [v for w in words for v in (w, " " + w, w.capitalize(), " " + w.capitalize())]
    trainer = trainers.BpeTrainer(vocab_size=10_000, min_frequency=1, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(words, trainer)  # every word occurs once: merging runs until each is one token
    tok.add_special_tokens(specials + SA2VA_TOKENS)
    return tok


def load_tokenizer(model_dir):
    """Tokenizer of an official directory: tokenizer.json, or Qwen's vocab.json + merges.txt."""
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library's own error type
            raise ValueError(f"{path}: unreadable tokenizer ({e})") from None
    elif os.path.isfile(os.path.join(model_dir, "vocab.json")):
        tok = qwen_byte_level(models.BPE.from_file(
            os.path.join(model_dir, "vocab.json"), os.path.join(model_dir, "merges.txt")))
        for token, idx in sorted(added_tokens(model_dir).items(), key=lambda kv: kv[1]):
            if tok.get_vocab_size(with_added_tokens=True) != idx:
                raise ValueError(f"{model_dir}: added token {token!r} has id {idx}, expected the next free id")
            tok.add_special_tokens([token])
    elif os.path.isfile(os.path.join(model_dir, "tokenizer.model")):  # InternLM2's sentencepiece model only
        raise FileNotFoundError(
            f"{model_dir}: only tokenizer.model (sentencepiece); write its tokenizer.json once with: python -c \"from transformers "
            f"import AutoTokenizer; AutoTokenizer.from_pretrained('{model_dir}', trust_remote_code=True).save_pretrained('{model_dir}')\"")
    else:
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json or vocab.json + merges.txt")
    return tok


def added_tokens(model_dir):
    """{token: id} from added_tokens.json and tokenizer_config.json's added_tokens_decoder."""
    tokens = {}
    path = os.path.join(model_dir, "added_tokens.json")
    if os.path.isfile(path):
        tokens.update(common.read_json_file(path))
    path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(path):
        decoder = common.read_json_file(path).get("added_tokens_decoder", {})
        tokens.update({v["content"]: int(k) for k, v in decoder.items()})
    return tokens


def add_sa2va_tokens(tok):
    """Add [SEG] and Sa2VA's <p> </p> <vp> </vp> where missing; returns the new vocab size."""
    missing = [t for t in SA2VA_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return tok.get_vocab_size(with_added_tokens=True)


def image_placeholder(num_tiles, num_image_tokens):
    """What one <image> of num_tiles tiles becomes: ONE <img>, all tiles' <IMG_CONTEXT> tokens, ONE </img>."""
    return IMG_START + IMG_CONTEXT * (num_image_tokens * num_tiles) + IMG_END


def video_placeholder(num_frames, num_image_tokens):
    """Video frames, one tile each, each in its own <img>...</img>, joined by new lines (Sa2VA)."""
    return "\n".join(image_placeholder(1, num_image_tokens) for _ in range(num_frames))


def encode_turns(tok, turns, system_prompt, media, bos=""):
    """Token ids (L,), labels (L,) (-100 but answers), and per turn the user-text positions (L,) bool.

    turns: [(user, answer | None)]; "<image>" in a user text is replaced by media (the placeholder).
    The text mask marks the words of the user turn, excluding template, image and special tokens.
    bos: the token the LLM's tokenizer starts a text with (BOS_EOS; "<s>" for InternLM2, none for Qwen2).
    """
    ids, labels, text_masks = [], [], []

    def add(text, is_answer=False, is_text=False):
        piece = tok.encode(text, add_special_tokens=False).ids if text else []
        ids.extend(piece)
        labels.extend(piece if is_answer else [-100] * len(piece))
        for m in text_masks:
            m.extend([False] * len(piece))
        if is_text and piece:
            text_masks[-1][-len(piece):] = [True] * len(piece)

    add(bos)
    if system_prompt:
        add(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
    for user, answer in turns:
        text_masks.append([False] * len(ids))
        add("<|im_start|>user\n")
        before, image, after = user.partition("<image>")
        add(before, is_text=True)
        if image:
            add(media)
        add(after, is_text=True)
        add("<|im_end|>\n<|im_start|>assistant\n")
        if answer is not None:
            add(answer + "<|im_end|>", is_answer=True)
            add("\n")
    return (torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
            torch.tensor(text_masks, dtype=torch.bool).reshape(len(turns), len(ids)))


# ---------------------------------------------------------------------------------------------
# images: 448 tiles for the MLLM (ImageNet mean/std, InternVL's dynamic tiling), squares for SAM-2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_grids(max_tiles):
    """Candidate (cols, rows) grids with 1..max_tiles tiles, fewest tiles first (InternVL's order)."""
    grids = {(i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(width, height, max_tiles, tile):
    """The grid whose aspect ratio is closest to the image's; ties go to more tiles if the image is large."""
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in tile_grids(max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def dynamic_tiles(image, max_tiles, tile):
    """Split a PIL image into a grid of tile x tile crops (+ a thumbnail when more than one)."""
    cols, rows = choose_grid(*image.size, max_tiles, tile)
    resized = image.resize((cols * tile, rows * tile), resample=3)  # bicubic
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(image.resize((tile, tile), resample=3))
    return tiles


def to_tensor(image, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL image -> (3, size, size) float, resized directly (bicubic), normalised."""
    image = image.convert("RGB").resize((size, size), resample=3)
    x = np.asarray(image, dtype=np.float32) / 255  # (S, S, 3); numpy: no thread start-up per small image
    x = (x - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def mllm_pixels(frames, cfg, is_video):
    """MLLM input (N_tiles, 3, S, S): dynamic tiles for an image, one tile per video frame."""
    if is_video:
        tiles = frames[: cfg.video_frames]
    else:
        tiles = dynamic_tiles(frames[0].convert("RGB"), cfg.max_tiles, cfg.image_size)
    return torch.stack([to_tensor(t, cfg.image_size) for t in tiles])


def media_placeholder(num_tiles, cfg, is_video):
    """The text an <image> tag expands to for these tiles."""
    if is_video:
        return video_placeholder(num_tiles, cfg.num_image_tokens)
    return image_placeholder(num_tiles, cfg.num_image_tokens)


@torch.no_grad()
def sam_pixels(frames, size, sa2va_numerics=False, dtype=torch.float32, video=False):
    """SAM-2 input (T, 3, S, S) in dtype: resized directly to S x S (bicubic, aspect not kept), /255, ImageNet mean/std.

    sa2va_numerics=False: fp32 arithmetic with the exact constants. True: as Sa2VA's predict_forward computes it:
    mean and std rounded to bf16 (its sam2.py preprocess_image builds them with dtype=torch.bfloat16), the
    arithmetic in dtype for an image and in fp32 for video frames (which it casts to dtype only afterwards).
    """
    if not sa2va_numerics:
        return torch.stack([to_tensor(f, size) for f in frames]).to(dtype)
    mean, std = (torch.tensor(v, dtype=torch.bfloat16)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    out = []
    for frame in frames:
        x = torch.from_numpy(np.array(frame.convert("RGB").resize((size, size), resample=3))).permute(2, 0, 1)
        x = (x.float() if video else x.to(dtype)) / 255.0
        out.append((x - mean) / std)  # fp32 - bf16 computes in fp32; bf16 - bf16 in bf16, as the in-place ops do there
    return torch.stack(out).to(dtype)


# ---------------------------------------------------------------------------------------------
# visual prompts: Sa2VA's region prompts (Osprey-style "describe region1")
#
# A region enters the LLM as <vp> + one <IMG_CONTEXT> per token of the image's last tile (the
# thumbnail, or the only tile) that its mask covers on the 16x16 token grid + </vp>; those tokens
# are copies of that tile's image tokens (after mlp1), taken in row-major order. No new weights.

VP_START, VP_END = "<vp>", "</vp>"
REGION_QUESTION = "Please give me a short description of the region in the picture marked by region1."


def region_grid_masks(masks, cfg):
    """Region masks (n, H, W) -> bool (n, g, g) on the tile's token grid (g = 16), nearest as Sa2VA."""
    g = int(cfg.image_size // cfg.patch_size * cfg.downsample_ratio)
    return F.interpolate(masks[None].float(), size=(g, g), mode="nearest")[0] > 0


def region_prompt(grid_masks):
    """'\nThere are n part regions in the picture: region1<vp>...</vp>, region2<vp>...</vp>.\n'."""
    regions = [f"region{i + 1}{VP_START}{IMG_CONTEXT * int(m.sum())}{VP_END}" for i, m in enumerate(grid_masks)]
    return f"\nThere are {len(regions)} part regions in the picture: " + ", ".join(regions) + ".\n"


def region_context_index(num_tiles, tokens_per_tile, grid_masks=None, first_tile=0):
    """Image token (flattened over all tiles) for each <IMG_CONTEXT> of one image: its tiles in order,
    then for each region the tokens of its last tile under the region's grid mask (row-major)."""
    start = first_tile * tokens_per_tile
    index = [torch.arange(start, start + num_tiles * tokens_per_tile)]
    last_tile = start + (num_tiles - 1) * tokens_per_tile
    for m in grid_masks if grid_masks is not None else []:
        index.append(last_tile + m.flatten().nonzero().flatten())
    return torch.cat(index)


# ---------------------------------------------------------------------------------------------
# evaluation prompts (Sa2VA's)

FORCED_ANSWER = "Sure, [SEG]."  # what --force_seg teacher-forces


def eval_prompt(expr, is_video):
    """Sa2VA's evaluation questions; a video expression that is a question (ReVOS's reasoning ones) is asked as one."""
    if is_video and "?" in expr:
        return f"<image>\n {expr} Please respond with a segmentation mask."
    if is_video:
        return f"<image>\nPlease segment {expr}."
    return f"<image>\n Please segment {expr} in this image."


# ---------------------------------------------------------------------------------------------
# training batches: samples -> the tensors SALMA.forward reads, deterministic per sample seed


def to_device(batch, device):
    """Move every tensor of a batch dict to device."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


SEG_QUESTIONS = [
    "Can you segment the {} in this image?",
    "Please segment {} in this image.",
    "What is {} in this image? Please respond with segmentation mask.",
    "What is {} in this image? Please output segmentation mask.",
]
SEG_ANSWERS = ["It is [SEG].", "Sure, [SEG].", "Sure, it is [SEG].", "Sure, the segmentation result is [SEG].", "[SEG]."]


def sample_turns(sample, rng):
    """Chat turns of a sample: its own turns, its LLaVA conversation, or one question/answer per expression."""
    if sample.get("turns"):
        return sample["turns"]
    if sample.get("conversation"):
        conv = sample["conversation"]
        return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv) - 1, 2)]
    turns = [(rng.choice(SEG_QUESTIONS).format(expr), rng.choice(SEG_ANSWERS)) for expr in sample["exprs"]]
    if turns:
        turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
    return turns


def make_train_batch(samples, tokenizer, cfg, seeds, max_tokens=8192):
    """Tensors for SALMA.forward from a list of samples (frames, exprs or turns, masks, is_video).

    The k-th [SEG] of a sample answers its k-th mask (one per expression, or one per phrase of a
    grounded caption). A conversation longer than max_tokens is cut at a turn boundary (counted).
    Samples with prompt_masks (n, H, W) get Sa2VA's region prompt after their image.
    """
    bos, eos = BOS_EOS[cfg.llm_arch]
    pad_id = tokenizer.token_to_id(eos)
    seg_id = tokenizer.token_to_id(SEG)
    low_res = cfg.sam_image_size // 4
    ids, labels, pixels, sam_frames, context_index = [], [], [], [], []
    seg_index, seg_text, pair_seg, pair_frame, pair_masks = [], [], [], [], []
    for row, (sample, seed) in enumerate(zip(samples, seeds)):
        rng = random.Random(seed)
        frames = sample["frames"][: cfg.video_frames] if sample["is_video"] else sample["frames"][:1]
        media = ""  # text-only chat (LLaVA records without an image)
        if frames:
            tiles = mllm_pixels(frames, cfg, sample["is_video"])
            media = media_placeholder(tiles.shape[0], cfg, sample["is_video"])
            grid = region_grid_masks(sample["prompt_masks"], cfg) if sample.get("prompt_masks") is not None else None
            if grid is not None:
                media += region_prompt(grid)
            first_tile = sum(len(p) for p in pixels)
            context_index.append(region_context_index(tiles.shape[0], cfg.num_image_tokens, grid, first_tile))
            pixels.append(tiles)
        encoded = encode_turns(tokenizer, sample_turns(sample, rng), cfg.system_prompt, media, bos)
        row_ids, row_labels, text_masks = cut_to_fit(encoded, tokenizer, cfg.system_prompt, max_tokens, sample["id"])
        first_frame = len(sam_frames)
        sam_frames.extend(frames)
        positions = (row_ids == seg_id).nonzero().flatten()
        if len(positions) > sample["masks"].shape[0]:
            raise ValueError(f"{sample['id']}: {len(positions)} [SEG] tokens for {sample['masks'].shape[0]} masks")
        turn_of = turn_index(row_ids, tokenizer, cfg.system_prompt)
        for k, pos in enumerate(positions.tolist()):  # the k-th [SEG] answers the k-th mask
            seg_index.append((row, pos))
            seg_text.append(text_masks[turn_of[pos]])  # the words of the question it answers
            for t in range(len(frames)):
                pair_seg.append(len(seg_index) - 1)
                pair_frame.append(first_frame + t)
                pair_masks.append(torch.nn.functional.interpolate(sample["masks"][k, t][None, None].float(), size=(low_res, low_res), mode="nearest")[0, 0])
        ids.append(row_ids)
        labels.append(row_labels)
    length = max(len(x) for x in ids)
    batch = {
        "input_ids": torch.stack([torch.nn.functional.pad(x, (0, length - len(x)), value=pad_id) for x in ids]),
        "labels": torch.stack([torch.nn.functional.pad(x, (0, length - len(x)), value=-100) for x in labels]),
        "attention_mask": torch.stack([torch.arange(length) < len(x) for x in ids]),
        "pixel_values": torch.cat(pixels) if pixels else None,
        "sam_images": sam_pixels(sam_frames, cfg.sam_image_size, cfg.sa2va_numerics, video=True) if sam_frames else torch.zeros(0, 3, cfg.sam_image_size, cfg.sam_image_size),
        "seg_index": torch.tensor(seg_index, dtype=torch.long).reshape(-1, 2),
        "seg_text": torch.stack([torch.nn.functional.pad(m, (0, length - len(m))) for m in seg_text]) if seg_text else torch.zeros(0, length, dtype=torch.bool),
        "pair_seg": torch.tensor(pair_seg, dtype=torch.long),
        "pair_frame": torch.tensor(pair_frame, dtype=torch.long),
        "pair_masks": torch.stack(pair_masks) if pair_masks else torch.zeros(0, low_res, low_res),
    }
    if any(s.get("prompt_masks") is not None for s in samples):  # else every image token once, in order
        batch["context_index"] = torch.cat(context_index)
    return batch


def turn_starts(ids, tokenizer, system_prompt):
    """Positions (n_turns,) where each user turn begins (its <|im_start|>)."""
    starts = (ids == tokenizer.token_to_id("<|im_start|>")).nonzero().flatten()
    return starts[(1 if system_prompt else 0)::2].contiguous()  # user, assistant, user, ... after the system turn


def turn_index(ids, tokenizer, system_prompt):
    """The turn each token belongs to (L,), 0-based (the system prompt counts as turn 0)."""
    starts = turn_starts(ids, tokenizer, system_prompt)
    return (torch.searchsorted(starts, torch.arange(len(ids)), right=True) - 1).clamp_min(0)


def cut_to_fit(encoded, tokenizer, system_prompt, max_tokens, sample_id):
    """Drop whole turns from the end of (ids, labels, text_masks) until it fits max_tokens (counted).

    The first turn is always kept (it holds the image); if it alone is too long, it is kept whole
    and counted as such.
    """
    ids, labels, text_masks = encoded
    if len(ids) <= max_tokens:
        return encoded
    starts = turn_starts(ids, tokenizer, system_prompt).tolist() + [len(ids)]
    keep = max([n for n in range(1, len(starts)) if starts[n] <= max_tokens], default=1)
    if starts[keep] > max_tokens:
        common.warn_once("first turn longer than the context, kept whole", f"{sample_id}: {starts[keep]} > {max_tokens} tokens")
    else:
        common.warn_once("conversation cut at a turn boundary to fit the context", f"{sample_id}: {len(ids)} > {max_tokens} tokens")
    end = starts[keep]
    return ids[:end], labels[:end], text_masks[:keep, :end]
