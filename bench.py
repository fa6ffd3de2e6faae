"""
Benchmarks: figures printed (and written to bench_out/<what>.json), never asserted.

  python bench.py table5                 # params / FLOPs per component at sa2va-1b (paper Table 5 layout)
  python bench.py overhead               # SALMA vs --mba=False wall time, same weights and inputs
  python bench.py internvl               # our InternVL forward vs transformers' on the same weights
  python bench.py train                  # training samples/s and peak memory (tiny; --real adds one 1B step)
  python bench.py video_memory           # host memory over a 200-frame generated video (must stay flat)
  python bench.py precision              # segment_image in fp32 vs bf16 (set_precision): time and mask IoU
  python bench.py memory                 # every preset: parameters and estimated training memory per GPU (DDP / FSDP2)
  python bench.py eval                   # evaluation: each expression alone vs shared + batched; items/s, peak memory

CPU fp32 by default; --preset tiny makes every benchmark quick.
"""

import argparse
import copy
import json
import os
import resource
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import checkpoint
import common
import losses
import metrics
import mllm
import salma
import testbed
import train
from inputs import BOS_EOS, IMG_CONTEXT, SEG, encode_turns, make_train_batch, media_placeholder


def interleaved_times(fns, runs):
    """Wall times [per fn][per run] over runs, calls interleaved so machine drift hits all alike (after a warm-up)."""
    times = [[] for _ in fns]
    for r in range(runs + 1):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            if r > 0:
                ts.append(time.perf_counter() - start)
    return times


def interleaved_medians(fns, runs):
    """Median wall time of each fn over interleaved runs."""
    return [statistics.median(ts) for ts in interleaved_times(fns, runs)]


def flops(fn):
    """FLOPs of one call of fn, counted by torch.utils.flop_counter."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def peak_rss_gb():
    """Peak resident memory of this process (GiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def params_m(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


def real_inputs(model, tok):
    """One 448 tile + a short referring question for the MLLM, one frame for SAM-2 (random pixels)."""
    cfg = model.cfg
    media = media_placeholder(1, cfg, is_video=False)
    words = "Please segment the small carrot to the left of the large one in this image."
    ids, _, text = encode_turns(tok, [(f"<image>\n{words}", "Sure, [SEG].")], cfg.system_prompt, media, BOS_EOS[cfg.llm_arch][0])
    return {"ids": ids[None], "text": text[0], "pixels": torch.randn(1, 3, cfg.image_size, cfg.image_size),
            "sam": torch.randn(1, 3, cfg.sam_image_size, cfg.sam_image_size)}


def build(preset, **overrides):
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(salma.Config.from_preset(preset, **overrides))
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------


def salma_pipeline(model, x):
    """Everything one referring-segmentation forward does (teacher-forced answer), as a closure."""
    def run():
        out = model.mllm(x["ids"], x["pixels"], output_hidden_states=True)
        seg = (x["ids"][0] == model.token_ids[SEG]).nonzero().flatten()
        z_seg = model.text_hidden_fcs(out["hidden_states"][-1][0, seg])
        enc = model.grounding.encode_image(x["sam"])
        hidden = model.hidden_for_mba(out["hidden_states"])
        feats = model.refine(enc["image_embed"], enc["high_res_feats"], hidden, x["text"][None])
        return model.grounding.decode(feats, enc["high_res_feats"], z_seg[:1])
    return run


@torch.inference_mode()
def bench_table5(args):
    """Params and FLOPs per component, Table 5 layout."""
    model, tok = build(args.preset)
    x = real_inputs(model, tok)
    vl, g = model.mllm, model.grounding
    vit_tokens = lambda: vl.vision_model.forward_features(x["pixels"])
    vit_out = vit_tokens()[:, 1:]
    side = int(vit_out.shape[1] ** 0.5)
    shuffled = mllm.pixel_shuffle(vit_out.reshape(1, side, side, -1), model.cfg.downsample_ratio).reshape(1, -1, vit_out.shape[-1] * 4)
    out = vl(x["ids"], x["pixels"], output_hidden_states=True)
    enc = g.encode_image(x["sam"])
    z = torch.randn(1, g.width)
    hidden = model.hidden_for_mba(out["hidden_states"])
    text = x["text"][None]
    prepass_and_mba = lambda: model.refine(enc["image_embed"], enc["high_res_feats"], hidden, text)
    decoder = g.sam2_model.sam_mask_decoder
    rows = [
        ("Vision Encoder (InternViT)", params_m(vl.vision_model), flops(vit_tokens)),
        ("SAM-2 Image Encoder (Hiera)", params_m(g.sam2_model.image_encoder), flops(lambda: g.encode_image(x["sam"]))),
        ("Visual Projector (mlp1)", params_m(vl.mlp1), flops(lambda: vl.mlp1(shuffled))),
        (f"LLM ({type(vl.language_model).__name__})", params_m(vl.language_model), flops(lambda: vl(x["ids"], x["pixels"])) - flops(vit_tokens)),
        ("SAM-2 Mask Decoder (final decode)", params_m(decoder) + params_m(g.sam2_model.sam_prompt_encoder),
         flops(lambda: g.decode(enc["image_embed"], enc["high_res_feats"], z))),
        ("SALMA Pre-Pass (Gating + Decoder) + MBA", params_m(model.mba), flops(prepass_and_mba)),
    ]
    total = sum(r[2] for r in rows[:-1])
    print(f"{'Component':42s} {'Params (M)':>11s} {'FLOPs (G)':>11s}   ({args.preset}, 1 tile + {x['ids'].shape[1]} tokens, SAM-2 at {model.cfg.sam_image_size})")
    for name, p, f in rows:
        print(f"{name:42s} {p:11.1f} {f / 1e9:11.2f}")
    print(f"SALMA-specific FLOPs / Sa2VA forward: {100 * rows[-1][2] / total:.3f}%  (params of MBA: {params_m(model.mba):.2f} M;"
          " the pre-pass reuses the decoder's weights)")
    return {name: {"params_m": p, "gflops": f / 1e9} for name, p, f in rows}


def with_mba(model, layers, blocks, fn):
    """fn run with the model switched to the baseline (layers None) or to MBA on these LLM layers."""
    def run():
        model.cfg = replace(model.cfg, mba=layers is not None)
        if layers is not None:
            model.mba_layers, model.mba = salma.resolve_mba_layers(layers, model.cfg.llm_layers), blocks[layers]
        return fn()
    return run


def salma_step_times(model, x, blocks, runs):
    """Median wall time of SALMA's step alone (pre-pass gate + MBA blocks) for each mba_layers variant."""
    out = model.mllm(x["ids"], x["pixels"], output_hidden_states=True)
    enc = model.grounding.encode_image(x["sam"])
    step = lambda: model.refine(enc["image_embed"], enc["high_res_feats"], model.hidden_for_mba(out["hidden_states"]), x["text"][None])
    return {layers: interleaved_medians([with_mba(model, layers, blocks, step)], runs)[0] for layers in blocks}


@torch.inference_mode()
@torch.inference_mode()
def bench_overhead(args):
    """SALMA vs the --mba=False baseline on the same weights and inputs; also mba_layers=all.

    Runs alternate between the variants so that drift of the machine hits all of them alike.
    """
    model, tok = build(args.preset, mba=True, mba_layers="all")  # one model in memory, variants switched below
    x = real_inputs(model, tok)
    blocks = {"last": torch.nn.ModuleList([model.mba[-1]]), "all": model.mba}
    runs = {name: with_mba(model, layers, blocks, salma_pipeline(model, x))
            for name, layers in (("baseline", None), ("mba_layers=last", "last"), ("mba_layers=all", "all"))}
    gflops = {name: flops(run) / 1e9 for name, run in runs.items()}  # counted before packing: flop_counter sees aten ops
    mllm.pack_linears_for_cpu(model)  # timed as eval.py runs on CPU
    times = dict(zip(runs, interleaved_times(list(runs.values()), args.runs)))
    base = statistics.median(times["baseline"])
    steps = salma_step_times(model, x, blocks, 10 * args.runs)
    results = {}
    for name in runs:
        # per round, variant / baseline of the same round: robust to drift of a shared machine
        paired = statistics.median(t / b for t, b in zip(times[name], times["baseline"]))
        step = steps.get(name.removeprefix("mba_layers="), 0.0)
        results[name] = {"seconds": statistics.median(times[name]), "wall_overhead_pct": 100 * (paired - 1),
                         "salma_step_ms": 1e3 * step, "salma_step_pct": 100 * step / base,
                         "gflops": gflops[name], "flops_overhead_pct": 100 * (gflops[name] / gflops["baseline"] - 1)}
        r = results[name]
        print(f"{name:16s} {r['seconds']:7.3f} s ({r['wall_overhead_pct']:+6.2f}% wall, paired)  pre-pass + MBA alone "
              f"{r['salma_step_ms']:6.1f} ms ({r['salma_step_pct']:.2f}%)  {r['gflops']:8.1f} GFLOPs ({r['flops_overhead_pct']:+.3f}%)")
    print(f"  {args.preset}, fp32 CPU, packed linears; end to end: median of {args.runs} interleaved rounds; "
          f"the step alone: median of {10 * args.runs}, as a share of the baseline's {base:.3f} s")
    return results


@torch.inference_mode()
def bench_internvl(args):
    """Our InternVL forward vs transformers' InternVLForConditionalGeneration on the same weights."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from test_model import hf_internvl_reference

    torch.manual_seed(0)
    tok, cfg, ids = checkpoint.prepare_tokenizer(salma.Config.from_preset(args.preset if args.preset != "sa2va-1b" else "internvl2_5-1b"))
    ours = mllm.InternVL(cfg, ids[IMG_CONTEXT]).eval()
    theirs = hf_internvl_reference(ours)  # transformers' default attention (SDPA) on our weights
    media = torch.tensor(tok.encode(media_placeholder(1, cfg, is_video=False)).ids)
    words = torch.randint(0, 256, (64,))  # 64 text tokens around one 448 tile
    input_ids, pixels = torch.cat([words[:32], media, words[32:]])[None], torch.randn(1, 3, cfg.image_size, cfg.image_size)
    packed = mllm.pack_linears_for_cpu(copy.deepcopy(ours))  # what eval.py runs on CPU
    reference = theirs(input_ids=input_ids, pixel_values=pixels).logits
    diffs = {name: (m(input_ids, pixels)["logits"] - reference).abs().max().item() for name, m in (("plain", ours), ("packed", packed))}
    t_plain, t_packed, t_theirs = interleaved_medians([lambda: ours(input_ids, pixels), lambda: packed(input_ids, pixels),
                                                       lambda: theirs(input_ids=input_ids, pixel_values=pixels)], args.runs)
    print(f"InternVL forward ({cfg.vit_depth}-layer ViT, {cfg.llm_layers}-layer LLM, {input_ids.shape[1]} tokens, fp32 CPU, "
          f"median of {args.runs}, interleaved): transformers {t_theirs:.3f} s")
    for key, label, t in (("plain", "plain nn.Linear", t_plain), ("packed", "packed (eval.py on CPU)", t_packed)):
        print(f"  ours, {label:24s} {t:.3f} s   ratio {t / t_theirs:.3f}   max |logit diff| {diffs[key]:.2e}")
    return {"transformers_s": t_theirs, "ours_plain_s": t_plain, "ours_packed_s": t_packed,
            "ratio_plain": t_plain / t_theirs, "ratio_packed": t_packed / t_theirs,
            "max_abs_diff_plain": diffs["plain"], "max_abs_diff_packed": diffs["packed"]}


def bench_train(args):
    """Training samples/s and peak host memory: tiny preset on generated data (+ one real step with --real)."""
    results = {}
    runs = [("tiny", 2)] + ([("sa2va-1b", 1)] if args.real else [])
    for preset, batch_size in runs:
        model, tok = build(preset)
        salma.set_trainable(model, "sa2va" if preset != "tiny" else "full")
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        dataset = testbed.split("train", 1000)
        steps = args.runs if preset == "tiny" else 1
        start, seen = None, 0
        for step in range(steps + 1):
            samples = [dataset[step * batch_size + i] for i in range(batch_size)]
            batch = make_train_batch(samples, tok, model.cfg, list(range(batch_size)))
            out = model(batch, ramp=1.0)
            loss, _ = losses.total_loss(losses.salma_loss_parts(out, batch, losses.LossConfig()), losses.LossConfig(), 1.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                start = time.perf_counter()  # the first step warms up
            else:
                seen += batch_size
        rate = seen / (time.perf_counter() - start)
        print(f"train {preset}: {rate:.2f} samples/s (batch {batch_size}, fp32 CPU), peak RSS {peak_rss_gb():.2f} GiB")
        results[preset] = {"samples_per_s": rate, "peak_rss_gib": peak_rss_gb()}
    return results


@torch.inference_mode()
def bench_video_memory(args):
    """Host memory while segmenting a 200-frame generated video one frame at a time (should stay flat)."""
    model, tok = build("tiny")
    sample = testbed.split("train", 1, video_fraction=1.0)[0]
    frames = [sample["frames"][t % len(sample["frames"])] for t in range(200)]  # 200 frames, inputs shared
    rss, start = {}, time.perf_counter()
    for t, _ in enumerate(salma.segment_video(model, frames.__getitem__, len(frames), sample["exprs"][0], tok, force_seg=True)):
        if t + 1 in (10, 50, 100, 200):
            rss[t + 1] = current_rss_gb()
    fps = len(frames) / (time.perf_counter() - start)
    print("video (tiny, 200 frames): RSS after frame " + ", ".join(f"{k}: {v:.3f} GiB" for k, v in rss.items())
          + f"; growth 10->200: {1024 * (rss[200] - rss[10]):.1f} MiB; {fps:.1f} frames/s")
    return {"rss_gib_by_frame": rss, "frames_per_s": fps}


@torch.inference_mode()
def bench_precision(args):
    """segment_image on generated scenes, fp32 vs bf16 on the same weights: median time and mask agreement."""
    if args.ckpt:
        model, tok = checkpoint.load_model(args.ckpt)
    else:
        model, tok = build(args.preset, gamma_init=1.0)  # gamma 1: MBA's path counts in the comparison
    half = copy.deepcopy(model).set_precision(torch.bfloat16)
    scenes = testbed.split("train", max(args.runs, 1), seed=7, video_fraction=0.0)
    samples = [scenes[i] for i in range(len(scenes)) if scenes[i]["exprs"]]
    ious = []
    for s in samples:
        a, b = (m.segment_image(s["frames"][0], s["exprs"][0], tok, force_seg=True) for m in (model, half))
        ious.append(metrics.iou(a.numpy(), b.numpy()))
    image, expr = samples[0]["frames"][0].resize((640, 480)), samples[0]["exprs"][0]
    t32, t16 = interleaved_medians([lambda m=m: m.segment_image(image, expr, tok, force_seg=True) for m in (model, half)], args.runs)
    print(f"native bf16 matmuls on this CPU: {common.cpu_has_native_bf16()}")
    print(f"segment_image fp32 {t32:.3f} s | bf16 {t16:.3f} s ({t16 / t32:.2f}x) | mask IoU bf16 vs fp32: "
          f"mean {statistics.mean(ious):.3f}, min {min(ious):.3f} over {len(ious)} scenes")
    return {"fp32_s": t32, "bf16_s": t16, "mask_iou_mean": statistics.mean(ious), "mask_iou_min": min(ious),
            "native_bf16": common.cpu_has_native_bf16()}


# ---------------------------------------------------------------------------------------------
# evaluation: each expression alone (Sa2VA's evaluation) vs the shared, batched path (eval.py --share)

BENCH_EXPRS = ["the man in the red shirt", "a white cup on the left side of the wooden table", "dog", "the second car from the right",
               "the woman holding an umbrella", "the larger of the two plates", "the bus behind the bicycle", "a brown horse"]


def eval_sets(images, videos):
    """A RefCOCO-like set (generated scenes at COCO's 640x427: 6 tiles + thumbnail for the MLLM; 4 expressions each)
    and a MeViS-like one (12 frames at 640x360, 8 expressions each)."""
    scenes = testbed.split("train", images + videos, seed=3, video_fraction=0.0)
    image_set = [(scenes[i]["frames"][0].resize((640, 427)), BENCH_EXPRS[i % 2: i % 2 + 4]) for i in range(images)]
    video_set = [([scenes[images + v]["frames"][0].resize((640, 360)).rotate(3 * t) for t in range(12)], BENCH_EXPRS)
                 for v in range(videos)]
    return image_set, video_set


def reset_peak_rss():
    """Start a new peak-resident-memory window (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_since_reset():
    """Peak resident memory since reset_peak_rss (GiB), from /proc/self/status VmHWM."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20


def measured(fn):
    """(fn's result, seconds, peak resident GiB while it ran)."""
    reset_peak_rss()
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start, peak_rss_since_reset()


def eval_paths(model, tok, batch_size):
    """The two ways of segmenting an image's or video's expressions -> {name: fn(media, exprs) -> bool masks (E, T, H, W)}."""
    def image_alone(image, exprs):
        return torch.stack([model.segment_image(image, e, tok, force_seg=True) for e in exprs])[:, None]

    def image_shared(image, exprs):
        return model.segment_image_many(image, exprs, tok, force_seg=True, batch_size=batch_size)[0][:, None]

    def video_alone(frames, exprs):
        return torch.stack([torch.stack(list(salma.segment_video(model, frames.__getitem__, len(frames), e, tok, force_seg=True)))
                            for e in exprs])

    def video_shared(frames, exprs):
        answers = model.answer_many(frames[: model.cfg.video_frames], exprs, tok, is_video=True, force_seg=True, batch_size=batch_size)
        return torch.stack(list(salma.track(model, frames.__getitem__, len(frames), answers, batch_size)), dim=1)

    return {"image": (image_alone, image_shared), "video": (video_alone, video_shared)}


@torch.inference_mode()
def run_eval_sets(model, tok, sets, batch_size):
    """Both paths on every item, interleaved (the order alternates), -> per set: expressions/s, peak GiB, mask agreement."""
    results = {}
    for kind, items in sets.items():
        alone, shared = eval_paths(model, tok, batch_size)[kind]
        seconds, peaks, worst = [0.0, 0.0], [0.0, 0.0], 0.0
        for n, (media, exprs) in enumerate(items):
            order = (0, 1) if n % 2 == 0 else (1, 0)
            outs = {}
            for p in order:
                outs[p], t, peak = measured(lambda p=p: (alone, shared)[p](media, exprs))
                seconds[p], peaks[p] = seconds[p] + t, max(peaks[p], peak)
            worst = max(worst, (outs[0] != outs[1]).float().mean().item())
        count = sum(len(exprs) for _, exprs in items)
        results[kind] = {"expressions": count, "alone_items_per_s": count / seconds[0], "shared_items_per_s": count / seconds[1],
                         "speedup": seconds[0] / seconds[1], "alone_peak_gib": peaks[0], "shared_peak_gib": peaks[1],
                         "max_pixel_disagreement": worst}
    return results


def bench_eval(args):
    """Evaluation speed and peak memory at args.preset size (random weights, answers teacher-forced): each expression
    alone vs eval.py's shared, batched path, interleaved; bf16 (where the CPU multiplies bf16 natively) and fp32."""
    torch.manual_seed(0)
    model, tok = checkpoint.build_model(salma.Config.from_preset(args.preset))
    model.eval()
    image_set, video_set = eval_sets(args.images, args.videos)
    sets = {kind: items for kind, items in (("image", image_set), ("video", video_set)) if items}
    dtypes = (["bfloat16"] if common.cpu_has_native_bf16() else []) + ["float32"]
    results = {"native_bf16": common.cpu_has_native_bf16(), "batch_size": args.batch_size}
    for dtype in dtypes:  # bf16 first: packing (fp32) frees the plain weights
        model.set_precision(common.DTYPES[dtype])
        if dtype == "float32":
            mllm.pack_linears_for_cpu(model)  # as eval.py runs on CPU
        common.release_freed_memory()  # the weights the change of precision left behind
        results[dtype] = {"model_rss_gib": current_rss_gb(), **run_eval_sets(model, tok, sets, args.batch_size)}
    print(f"{args.preset}, random weights, answers teacher-forced, {torch.get_num_threads()} threads; images 640x427 x4 "
          f"expressions ({args.images}), videos 12 frames x8 expressions ({args.videos}); --batch_size {args.batch_size}")
    print(f"{'dtype':9s} {'set':6s} {'alone it/s':>11s} {'shared it/s':>12s} {'speedup':>8s} {'alone peak':>11s} {'shared peak':>12s} "
          f"{'model RSS':>10s} {'pixels differing':>17s}")
    for dtype in dtypes:
        r = results[dtype]
        for kind in sets:
            k = r[kind]
            print(f"{dtype:9s} {kind:6s} {k['alone_items_per_s']:11.4f} {k['shared_items_per_s']:12.4f} {k['speedup']:7.2f}x "
                  f"{k['alone_peak_gib']:9.2f} G {k['shared_peak_gib']:10.2f} G {r['model_rss_gib']:8.2f} G "
                  f"{k['max_pixel_disagreement']:16.2e}")
    return results


GIB = 2**30


def sa2va_model_on_meta(preset):
    """The preset's SALMA with the sa2va recipe's trainable set, its weights on the meta device (SAM-2's on the CPU: Hiera's
    constructor calls .item())."""
    _, cfg, ids = checkpoint.prepare_tokenizer(salma.Config.from_preset(preset))
    train_cfg = train.TrainConfig(recipe="sa2va")
    with torch.device("meta"):
        model = salma.SALMA(cfg, ids)
        salma.set_trainable(model, "sa2va", train_cfg.lora_r, train_cfg.lora_alpha, train_cfg.lora_dropout)
    return model


def param_counts(model):
    """Parameters: all, trained, and per FSDP2 unit (each transformer block; the root holds the rest)."""
    count = lambda params, trained=False: sum(p.numel() for p in params if p.requires_grad or not trained)
    blocks = train.transformer_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    return {"total": count(model.parameters()), "trainable": count(model.parameters(), True),
            "trainable_full_recipe": count(model.parameters()), "root": count(root), "root_trainable": count(root, True),
            "block_max": max(count(b.parameters()) for b in blocks),
            "block_trainable_max": max(count(b.parameters(), True) for b in blocks)}


def saved_bytes(llm, batch_size, length, fake_mode):
    """Bytes autograd keeps for backward over one training forward of the LLM (weights fake) and its next-token loss, on fake
    tensors (shapes only, nothing allocated) under bf16 autocast; inside checkpointed blocks nothing is counted (recomputed)."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with fake_mode:
        ids = torch.randint(0, llm.embed_tokens.num_embeddings, (batch_size, length))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            logits = llm(llm.embed_tokens(ids))["logits"]
            F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())  # losses.lm_loss's ops
    return sum(storages.values())


def activation_bytes(model, batch_size, length):
    """Activation memory of the sa2va recipe's training step, without and with activation checkpointing.

    Counted: what autograd keeps from the LLM's forward and loss (bf16 autocast, weights fp32: bf16 copies of frozen
    weights, fp32 residual stream and logits) for batch_size samples of `length` tokens (image tokens included). With
    checkpointing each layer keeps its fp32 input (4 bytes x batch x length x hidden) and one layer's activations exist
    again while it is recomputed in backward. Not counted: InternViT, mlp1 and SAM-2's image encoder (frozen, no
    trained weight before them: they keep nothing), SAM-2's mask decoder and the MBA blocks (small), temporaries.
    """
    llm, fake_mode = model.mllm.language_model, FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        llm.to_empty(device="cpu")
    plain = saved_bytes(llm, batch_size, length, fake_mode)
    train.checkpoint_activations(model)
    outside = saved_bytes(llm, batch_size, length, fake_mode)  # embeddings, final norm, lm_head and loss
    per_layer = (plain - outside) / len(llm.layers)
    inputs_kept = 4 * batch_size * length * model.cfg.llm_hidden * len(llm.layers)
    return plain, outside + inputs_kept + per_layer


def memory_per_gpu(counts, activations, gpus, fsdp):
    """Estimated training memory per GPU in bytes, by term, for the sa2va recipe (AdamW, fp32 weights, bf16 autocast).

    weights: 4 bytes per parameter (train.py keeps fp32 weights; no separate master copy); gradients: 4 per trained
    parameter; optimizer: AdamW's two fp32 moments, 8 per trained parameter. DDP holds all three whole, plus its gradient
    buckets (4 per trained parameter). FSDP2 shards the three over the GPUs and gathers, while they compute, the root unit's
    weights and gradients (embeddings, lm_head, SAM-2, ...: the root stays gathered through forward and backward) and two
    blocks' (the one computing and the one prefetched). activations: activation_bytes', the same under both.
    """
    shard = gpus if fsdp else 1
    terms = {"weights": 4 * counts["total"] / shard, "gradients": 4 * counts["trainable"] / shard,
             "optimizer": 8 * counts["trainable"] / shard}
    if fsdp:
        terms["gathered"] = 4 * (counts["root"] + counts["root_trainable"] + 2 * (counts["block_max"] + counts["block_trainable_max"]))
    else:
        terms["buckets"] = 4 * counts["trainable"]
    states = sum(terms.values())
    return {**terms, "total": states + activations[0], "total_checkpointed": states + activations[1]}


def bench_memory(args):
    """Every preset: parameters (exact, built on the meta device) and estimated training memory per GPU on 8 GPUs."""
    cfg, gpus = train.TrainConfig(), 8
    print(f"sa2va recipe, per GPU of {gpus}, GiB: batch {cfg.batch_size} x {cfg.max_length} tokens, AdamW, fp32 weights, "
          "bf16 autocast; activations and total without / with --activation_checkpointing")
    print(f"{'preset':15s} {'params':>7s} {'trained':>7s} {'':5s} {'weights':>7s} {'grads':>6s} {'AdamW':>6s} {'gather':>6s} "
          f"{'buckets':>7s} {'activations':>13s} {'total':>13s}")
    results = {}
    for preset in salma.PRESETS:
        model = sa2va_model_on_meta(preset)
        counts = param_counts(model)
        act = activation_bytes(model, cfg.batch_size, cfg.max_length)
        ddp, fsdp = (memory_per_gpu(counts, act, gpus, f) for f in (False, True))
        results[preset] = {"params": counts, "activations_bytes": act, "ddp_bytes": ddp, "fsdp2_bytes": fsdp}
        for name, m in (("DDP", ddp), ("FSDP2", fsdp)):
            sizes = " ".join(f"{m[k] / GIB:{w}.1f}" if k in m else f"{'-':>{w}s}" for k, w in (("weights", 7), ("gradients", 6), ("optimizer", 6),
                                                                       ("gathered", 6), ("buckets", 7)))
            pair = lambda a, b: f"{a / GIB:6.1f}/{b / GIB:6.1f}"
            head = f"{preset:15s} {counts['total'] / 1e9:6.3f}B {counts['trainable'] / 1e9:6.3f}B" if name == "DDP" else " " * 31
            print(f"{head} {name:5s} {sizes} {pair(*act)} {pair(m['total'], m['total_checkpointed'])}")
    return {"gpus": gpus, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "presets": results}


def current_rss_gb():
    """Current resident memory of this process (GiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


BENCHES = {"table5": bench_table5, "overhead": bench_overhead, "internvl": bench_internvl,
           "train": bench_train, "video_memory": bench_video_memory, "precision": bench_precision, "memory": bench_memory,
           "eval": bench_eval}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    parser.add_argument("--preset", default="sa2va-1b", choices=sorted(salma.PRESETS), help="model size (default sa2va-1b)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median) / training steps")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--real", action="store_true", help="train: also one step of the sa2va-1b preset")
    parser.add_argument("--images", type=int, default=2, help="eval: images in the RefCOCO-like set (4 expressions each)")
    parser.add_argument("--videos", type=int, default=1, help="eval: videos in the MeViS-like set (12 frames, 8 expressions each)")
    parser.add_argument("--batch_size", type=int, default=8, help="eval: the shared path's --batch_size")
    parser.add_argument("--ckpt", default="", help="precision: a train.py out_dir or official directory instead of random weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = BENCHES[args.what](args)
    os.makedirs("bench_out", exist_ok=True)
    name = args.what if args.what in ("train", "video_memory", "memory") else f"{args.what}_{args.preset}"
    path = os.path.join("bench_out", f"{name}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "results": results, "torch": torch.__version__, "threads": torch.get_num_threads()}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
