"""
Train SALMA (or the Sa2VA baseline with --mba=False). One file, no framework.

  python train.py                                  # tiny SALMA on generated data, CPU, 10-13.5 min on 2 cores
  python train.py --out_dir=out/tiny --resume      # continue exactly where a run stopped
  torchrun --standalone --nproc_per_node=8 train.py --preset=sa2va-1b --init=ckpts/Sa2VA-1B \\
      --data=refcoco:4,refcoco+:4,refcocog:4,mevis:4,revos:10,ytvos:4 --data_root=data/
  python train.py --export=out/tiny/export         # write the trained model in the official layout

  torchrun --standalone --nproc_per_node=8 train.py --fsdp=True --activation_checkpointing=True ...   # 8B-26B presets

Every model knob is a flag too (`python train.py --help`). Checkpoints (`ckpt.pt` + `ckpt.json`) hold
every model weight (frozen ones too, so OUT_DIR alone rebuilds exactly the trained model), the
optimizer, scheduler, step, every rank's RNG states and data position; OUT_DIR/tokenizer.json is its
tokenizer. With --fsdp=True, ckpt.pt holds the gathered weights without the optimizer (what eval.py and
demo.py read), and OUT_DIR/sharded/step_N holds the training state a resume reads: each rank's shards
of weights and optimizer (torch.distributed.checkpoint) + train_state.pt (schedule, data position, RNG).
"""

import argparse
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.utils.checkpoint import checkpoint as recompute
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import common
import data
import losses
import plot
import mllm
import salma
import testbed
from inputs import make_train_batch, to_device


@dataclass
class TrainConfig:
    out_dir: str = "out/tiny"  # where ckpt.pt, ckpt.json, tokenizer.json and log.jsonl go
    init: str = ""  # official checkpoint directory (Sa2VA / InternVL) to start from; "" = random init
    sam2_ckpt: str = ""  # SAM-2 .pt to load into the grounding part
    sam2_pretrain_frac: float = 0.75  # from scratch on generated data only: first pretrain SAM-2's image encoder for this fraction of max_steps (extra steps, ~2x cheaper than main ones) to find the objects and tell their colours, shapes and sizes, then freeze it as Sa2VA freezes the pretrained one (docs/testbed.md); 0 = off
    sam2_pretrain_lr: float = 1e-3  # learning rate of that pretraining (constant after a warm-up of 1/12 of its steps)
    data: str = "synthetic:1"  # dataset:repeat_factor list, e.g. refcoco:4,mevis:4
    data_root: str = ""  # "" = generated synthetic data
    max_steps: int = 2400  # optimizer steps
    batch_size: int = 2  # per device
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 8192  # tokens per sample (Sa2VA's); longer conversations are cut at a turn boundary (counted)
    lr: float = 0.0  # 0 = auto: 4e-5 (the recipe) with --init, 3e-4 from scratch (1e-3 leaves the tiny decoder at "every shape")
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.05  # AdamW weight decay (matrices only)
    warmup_frac: float = 0.05  # linear lr warm-up over this fraction of max_steps
    grad_clip: float = 1.0  # gradient-norm clipping
    recipe: str = "auto"  # sa2va: frozen ViT + SAM-2 encoder, LoRA LLM (auto with --init); full: everything trains (auto from scratch)
    lora_r: int = 128  # LoRA rank (sa2va recipe)
    lora_alpha: int = 256  # LoRA alpha (sa2va recipe)
    lora_dropout: float = 0.05  # LoRA dropout (sa2va recipe)
    seed: int = 0  # model init, data order and sampling
    log_every: int = 10  # progress-bar update interval in steps (log.jsonl gets every step)
    save_every: int = 100  # checkpoint interval in steps (and at the last step)
    resume: bool = False  # continue from out_dir's checkpoint (weights, optimizer, data position, RNG); --fsdp=True: from out_dir/sharded
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state with FSDP2 instead of DDP
    activation_checkpointing: bool = False  # keep only each LLM layer's and ViT block's input, recompute the rest in backward (same numbers, less memory, one more forward of each block)
    dtype: str = "auto"  # autocast precision, weights stay fp32: auto = bf16 on CUDA, and on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX) for the 1B presets; float32 otherwise (tiny matmuls and CPUs without bf16 units are slower in bf16)
    export: str = ""  # write the model of out_dir/ckpt.pt in the official layout here and exit


# ---------------------------------------------------------------------------------------------
# flags: every field of TrainConfig, the model Config and the loss weights is a --flag


def parse_args(argv=None):
    """Parse --flags generated from TrainConfig, LossConfig and the model Config."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(salma.PRESETS), help="model size preset (default tiny)")
    common.add_dataclass_flags(parser, TrainConfig(), "training")
    common.add_dataclass_flags(parser, losses.LossConfig(), "loss weights (Eq. 5)")
    common.add_dataclass_flags(parser, salma.Config.from_preset("tiny"), "model (default: the preset's value, or --init's config.json)", preset="tiny")
    args = parser.parse_args(argv)
    train_cfg = common.dataclass_from_args(TrainConfig, args)
    if train_cfg.recipe == "auto":
        train_cfg.recipe = "sa2va" if train_cfg.init else "full"
    if train_cfg.lr == 0:
        train_cfg.lr = 4e-5 if train_cfg.init else 3e-4
    loss_cfg = common.dataclass_from_args(losses.LossConfig, args)
    if not train_cfg.init:  # from scratch: the paper's Eq. 5 weights, unless given on the command line
        given = {a.split("=")[0] for a in (sys.argv[1:] if argv is None else argv)}
        for name, value in losses.FROM_SCRATCH_WEIGHTS.items():
            if f"--{name}" not in given:
                setattr(loss_cfg, name, value)
    overrides = common.given_fields(salma.Config, args)
    check_flags(train_cfg, args.preset, overrides)
    return train_cfg, loss_cfg, args.preset, overrides


def check_flags(cfg, preset, overrides):
    """Refuse bad flags and missing files before any model is built (one line naming the flag)."""
    for name in ("max_steps", "batch_size", "grad_accum", "log_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)}: must be at least 1")
    if cfg.lr < 0 or not 0 <= cfg.warmup_frac <= 1:
        raise ValueError(f"--lr={cfg.lr} / --warmup_frac={cfg.warmup_frac}: need lr >= 0 and 0 <= warmup_frac <= 1")
    if cfg.sam2_pretrain_frac < 0 or cfg.sam2_pretrain_lr <= 0:
        raise ValueError(f"--sam2_pretrain_frac={cfg.sam2_pretrain_frac} / --sam2_pretrain_lr={cfg.sam2_pretrain_lr}: "
                         "need frac >= 0 (0 = no pretraining) and lr > 0")
    data.parse_mix(cfg.data)
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.fsdp and "RANK" not in os.environ:
        raise ValueError("--fsdp=True shards the model across torchrun's ranks: start it with torchrun, or drop --fsdp")
    if cfg.resume:
        check_resume(cfg.out_dir, cfg.fsdp)
    elif cfg.export and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt}: no checkpoint to export; set --out_dir to a train.py run")
    if cfg.init and not os.path.isdir(cfg.init):
        raise FileNotFoundError(f"--init {cfg.init}: not a directory (an official Sa2VA / InternVL2.5 checkpoint)")
    model_cfg = salma.Config.from_preset(preset)
    if cfg.init:  # its config.json sets the sizes, as build_salma will
        model_cfg = checkpoint.config_from_hf(cfg.init, model_cfg)
    salma.check_config(replace(model_cfg, **overrides))
    if cfg.sam2_ckpt and not os.path.isfile(cfg.sam2_ckpt):
        raise FileNotFoundError(f"--sam2_ckpt {cfg.sam2_ckpt}: SAM-2 checkpoint not found")


def check_resume(out_dir, fsdp):
    """Refuse --resume when out_dir holds no checkpoint of the run's kind (sharded with --fsdp=True, ckpt.pt without)."""
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if fsdp and not sharded_steps(out_dir):
        how = "it trained without --fsdp: resume without it" if os.path.isfile(ckpt) else "drop --resume or set --out_dir to a --fsdp=True run"
        raise FileNotFoundError(f"{os.path.join(out_dir, SHARDED)}: no sharded checkpoint to resume from; {how}")
    if not fsdp and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from; drop --resume or set --out_dir to a train.py run")
    if not fsdp and saved_by_fsdp(out_dir):
        raise ValueError(f"{ckpt}: saved by a --fsdp=True run, whose optimizer state is in {SHARDED}/: resume with --fsdp=True")


def saved_by_fsdp(out_dir):
    """Whether out_dir's ckpt.json says the run trained with --fsdp=True."""
    try:
        with open(os.path.join(out_dir, "ckpt.json")) as f:
            return json.load(f)["train"].get("fsdp", False)
    except (OSError, ValueError, KeyError):  # no or unreadable ckpt.json: read_checkpoint reports on ckpt.pt itself
        return False


# ---------------------------------------------------------------------------------------------
# distributed set-up (torchrun sets RANK / LOCAL_RANK / WORLD_SIZE)


def setup_distributed():
    """Start the process group under torchrun; return (rank, local_rank, world_size, device)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 0, 1, device
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return rank, local_rank, world_size, torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return rank, local_rank, world_size, torch.device("cpu")


def transformer_blocks(model):
    """The LLM's decoder layers and InternViT's blocks: the units of sharding and of activation checkpointing."""
    return [*model.mllm.language_model.layers, *model.mllm.vision_model.blocks]


def checkpoint_activations(model):
    """Make every transformer block keep only its inputs and recompute its activations in backward (non-reentrant
    torch.utils.checkpoint, which replays the RNG: dropout draws the same masks, losses and gradients stay the same)."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(recompute, block.forward, use_reentrant=False)


def wrap_model(model, device, use_fsdp):
    """Wrap for data parallelism: DDP, or FSDP2 `fully_shard` (each block, then the rest) when the model outgrows one GPU."""
    if not dist.is_initialized():
        return model
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        return fully_shard(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, checkpoints


def lr_factor(step, cfg):
    """Linear warm-up over warmup_frac of max_steps, then cosine decay to min_lr_ratio."""
    warmup = max(1, int(cfg.warmup_frac * cfg.max_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, cfg):
    """AdamW with weight decay on matrices only; returns (optimizer, LambdaLR scheduler)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    return optimizer, scheduler


def ranks_in_sync(model):
    """Whether every rank holds the same weights (checksums compared across ranks)."""
    if not dist.is_initialized():
        return True
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()[None]
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def rng_state():
    """All RNG states a resumed run needs to continue bit for bit."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]  # loadable with weights_only
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def keep_log_rows(log_path, last_step):
    """Rewrite log.jsonl with only the rows of steps <= last_step, so every step has one row after a resume."""
    if not os.path.exists(log_path):
        return
    rows = []
    with open(log_path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    rows.append(line)
            except ValueError:  # a line cut short by a crash
                continue
    with open(log_path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(log_path + ".tmp", log_path)


def rng_states():
    """Every rank's RNG states, rank r's at [r] (every rank must call)."""
    if not dist.is_initialized():
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng(states, source):
    """Set this rank's RNGs to what rng_states() saved for it."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if isinstance(states, dict):  # saved before every rank's states were kept: rank 0's
        states = [states] * world
    if len(states) != world:
        raise ValueError(f"{source}: saved by {len(states)} ranks; resume with --nproc_per_node={len(states)} (the data order depends on it)")
    set_rng_state(states[rank])


def full_weights(model, use_fsdp):
    """Every weight of the model, frozen ones included, on the CPU; under FSDP gathered whole on rank 0 only (every rank must call)."""
    if use_fsdp:
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_checkpoint(path, state, configs):
    """Write ckpt.pt atomically (temp file + rename) and a ckpt.json saying what it is."""
    tmp = path + ".tmp"
    torch.save({**state, "configs": configs}, tmp)
    os.replace(tmp, path)
    what = "every model weight + optimizer state" if state["optimizer"] is not None else f"every model weight; optimizer state in {SHARDED}/"
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump({"step": state["step"], "what": f"salma training checkpoint ({what})", **configs}, f, indent=2)


SHARDED = "sharded"  # OUT_DIR/sharded/step_N: an FSDP run's training state, the latest save only


def sharded_steps(out_dir):
    """out_dir's complete sharded checkpoints, oldest first (one being written is still named step_N.tmp)."""
    root = os.path.join(out_dir, SHARDED)
    names = sorted(n for n in os.listdir(root) if not n.endswith(".tmp")) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def save_sharded(out_dir, model, optimizer, train_state):
    """Write each rank's shards of weights and optimizer state (torch.distributed.checkpoint) + train_state.pt to
    sharded/step_N.tmp, rename it step_N, then remove the older ones: a kill never leaves a broken latest (every rank must call)."""
    path = os.path.join(out_dir, SHARDED, f"step_{train_state['step']:08d}")
    if dist.get_rank() == 0:
        shutil.rmtree(path + ".tmp", ignore_errors=True)  # left by a run killed while saving
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path + ".tmp")
    if dist.get_rank() == 0:
        torch.save(train_state, os.path.join(path + ".tmp", "train_state.pt"))
        os.replace(path + ".tmp", path)
        for old in sharded_steps(out_dir)[:-1]:
            shutil.rmtree(old)
    dist.barrier()


def load_sharded(path, model, optimizer):
    """Load a sharded checkpoint's weights and optimizer state into the FSDP model and its optimizer; return its train_state.pt."""
    model_state, optimizer_state = get_state_dict(model, optimizer)  # state for every trained weight: zeros where none was saved
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata  # flattened names: optimizer.state.<weight>.step
    optimizer_state["state"] = {k: v for k, v in optimizer_state["state"].items() if f"optimizer.state.{k}.step" in saved}
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(strict=False))  # weights that never had a gradient keep no optimizer state
    return common.torch_load(os.path.join(path, "train_state.pt"), "a train.py sharded checkpoint's state (train again)")


def resume(cfg, model, optimizer, scheduler, sampler):
    """Load out_dir's latest checkpoint into the model, optimizer, scheduler, sampler and RNGs; return its step."""
    if cfg.fsdp:
        path = sharded_steps(cfg.out_dir)[-1]
        state = load_sharded(path, model, optimizer)
    else:
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        state = checkpoint.read_checkpoint(path)
        checkpoint.load_weights(model, state["model"], path)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    restore_rng(state["rng"], path)
    return state["step"]


def save(cfg, model, optimizer, scheduler, sampler, step, configs):
    """Checkpoint: ckpt.pt (whole model) and, under FSDP, first the sharded training state (every rank must call)."""
    if not cfg.fsdp and not ranks_in_sync(model):
        raise RuntimeError(f"step {step}: ranks hold different weights; check that every rank sees the same model")
    train_state = {"scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "step": step, "rng": rng_states()}
    if cfg.fsdp:
        save_sharded(cfg.out_dir, model, optimizer, train_state)
    weights = full_weights(model, cfg.fsdp)
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {"model": weights, "optimizer": None if cfg.fsdp else optimizer.state_dict(), **train_state}
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), state, configs)


# ---------------------------------------------------------------------------------------------
# the loop


def main(argv=None):
    """Train; see the module docstring for the commands."""
    train_cfg, loss_cfg, preset, overrides = parse_args(argv)
    if train_cfg.export:
        return export(train_cfg, preset, overrides)
    start = time.time()
    rank, local_rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.use_deterministic_algorithms(True, warn_only=True)  # same flags, same numbers (README: Precision and determinism)
    torch.manual_seed(train_cfg.seed)  # same init on every rank
    random.seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    os.makedirs(train_cfg.out_dir, exist_ok=True)

    model, tokenizer = build_model(train_cfg, preset, overrides)
    model.to(device).train()
    model_cfg = model.cfg
    dataset = data.build_train_mix(train_cfg.data, train_cfg.data_root, seed=train_cfg.seed)
    sampler = data.DistributedResumableSampler(len(dataset), world_size, rank, seed=train_cfg.seed)
    if pretrains_sam2(train_cfg):
        if not train_cfg.resume:  # a resumed run loads the pretrained encoder with the rest
            steps = max(1, round(train_cfg.sam2_pretrain_frac * train_cfg.max_steps))
            report = testbed.pretrain_sam2_encoder(model, steps, train_cfg.sam2_pretrain_lr, train_cfg.seed, device)
            if master:
                save_report(report, train_cfg.out_dir)
        model.grounding.sam2_model.image_encoder.requires_grad_(False)  # frozen from here on, as in Sa2VA's recipe
    if train_cfg.activation_checkpointing:
        checkpoint_activations(model)
    ddp_model = wrap_model(model, device, train_cfg.fsdp)  # before the optimizer: FSDP2 swaps in sharded parameters
    optimizer, scheduler = make_optimizer(model, train_cfg)
    step = resume(train_cfg, model, optimizer, scheduler, sampler) if train_cfg.resume else 0
    autocast = common.autocast_for(common.resolve_dtype(train_cfg.dtype, device, model_cfg), device)  # weights stay fp32
    configs = {"train": asdict(train_cfg), "loss": asdict(loss_cfg), "model": asdict(model_cfg)}
    batches = training_batches(dataset, sampler, tokenizer, model_cfg, train_cfg)
    log_path = os.path.join(train_cfg.out_dir, "log.jsonl")
    if master:
        tokenizer.save(os.path.join(train_cfg.out_dir, "tokenizer.json"))  # out_dir alone rebuilds the model
    if master:
        keep_log_rows(log_path, step)  # a fresh run starts a fresh log; a resumed one drops the replayed steps
        if not train_cfg.resume:  # nor a sharded checkpoint of an earlier run in out_dir
            shutil.rmtree(os.path.join(train_cfg.out_dir, SHARDED), ignore_errors=True)
    bar = tqdm(total=train_cfg.max_steps, initial=step, disable=not master, desc="train")
    while step < train_cfg.max_steps:
        t0 = time.time()
        ramp = losses.ramp(step, train_cfg.max_steps, loss_cfg.ramp_frac)
        logs = {}
        for micro in range(train_cfg.grad_accum):
            batch = to_device(next(batches), device)
            last = micro == train_cfg.grad_accum - 1
            sync = nullcontext() if last or not isinstance(ddp_model, DDP) else ddp_model.no_sync()
            with sync, autocast:
                out = ddp_model(batch, ramp=ramp)
                loss, parts = losses.total_loss(losses.salma_loss_parts(out, batch, loss_cfg), loss_cfg, ramp)
            (loss / train_cfg.grad_accum).backward()
            for k, v in parts.items():
                logs[k] = logs.get(k, 0.0) + v / train_cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if master:
            logs.update(step=step, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm), ramp=ramp, sec=time.time() - t0)
            with open(log_path, "a") as f:
                f.write(json.dumps(logs) + "\n")
            if step % train_cfg.log_every == 0 or step == 1:
                bar.set_postfix({k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "lm", "bce", "dice", "tmc", "bound")})
        if step % train_cfg.save_every == 0 or step == train_cfg.max_steps:
            save(train_cfg, model, optimizer, scheduler, sampler, step, configs)
            if master:
                plot.plot_log(log_path)  # curves.png: loss parts and lr against step
    bar.close()
    if master and common.WARNINGS:  # skipped, truncated or cut samples, by reason
        print("data problems handled:", dict(common.WARNINGS))
        with open(os.path.join(train_cfg.out_dir, "data_problems.json"), "w") as f:
            json.dump(dict(common.WARNINGS), f, indent=1)
    if master:
        print(f"trained {plot.summary(log_path)} | {time.time() - start:.0f} s wall | checkpoint {os.path.join(train_cfg.out_dir, 'ckpt.pt')}")
    if dist.is_initialized():
        dist.destroy_process_group()


def training_batches(dataset, sampler, tokenizer, model_cfg, train_cfg):
    """Endless batches of SALMA.forward tensors in sampler order; sample i's prompt drawn from (seed, i)."""
    for samples, indices in data.batch_iterator(dataset, sampler, train_cfg.batch_size):
        yield make_train_batch(samples, tokenizer, model_cfg, seeds=[common.sample_seed(train_cfg.seed, i) for i in indices],
                               max_tokens=train_cfg.max_length)


# ---------------------------------------------------------------------------------------------
# from scratch on generated data: SAM-2's encoder is pretrained first (testbed.pretrain_sam2_encoder)


def save_report(report, out_dir):
    """Print the encoder pretraining's report and write it to out_dir/sam2_pretrain.json."""
    print(f"pretrained SAM-2's image encoder: {report}")
    with open(os.path.join(out_dir, "sam2_pretrain.json"), "w") as f:
        json.dump(report, f, indent=1)


def pretrains_sam2(cfg):
    """Whether the run pretrains (then freezes) SAM-2's image encoder: from scratch, generated data only."""
    generated = all(name.startswith("synthetic") for name, _ in data.parse_mix(cfg.data))
    return cfg.sam2_pretrain_frac > 0 and generated and not cfg.init and not cfg.sam2_ckpt


def build_model(train_cfg, preset, overrides):
    """The model to train: preset (+ flags), initialised from --init / --sam2_ckpt, groups set."""
    cfg = salma.Config.from_preset(preset)
    model, tokenizer = checkpoint.build_model(cfg, init=train_cfg.init, sam2_ckpt=train_cfg.sam2_ckpt, **overrides)
    salma.set_trainable(model, train_cfg.recipe, train_cfg.lora_r, train_cfg.lora_alpha, train_cfg.lora_dropout)
    return model, tokenizer


def export(train_cfg, preset, overrides):
    """Write out_dir/ckpt.pt's model in the official Sa2VA layout to --export (LoRA merged)."""
    model, tokenizer, step = checkpoint.load_trained(train_cfg.out_dir)
    mllm.merge_lora(model.mllm.language_model)
    checkpoint.save_official(model, tokenizer, train_cfg.export)
    print(f"exported step {step} of {train_cfg.out_dir} to {train_cfg.export}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths, flags, checkpoints or data: one line, no traceback
        raise SystemExit(f"train.py: {e}") from None
