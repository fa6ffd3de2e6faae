"""
Train SALMA (or the Sa2VA baseline with --mba=False). One file, no framework.

  python train.py                                  # tiny SALMA on generated data, CPU, 10-13.5 min on 2 cores
  python train.py --out_dir=out/tiny --resume      # continue exactly where a run stopped
  torchrun --standalone --nproc_per_node=8 train.py --preset=sa2va-1b --init=ckpts/Sa2VA-1B \\
      --data=refcoco:4,refcoco+:4,refcocog:4,mevis:4,revos:10,ytvos:4 --data_root=data/
  python train.py --export=out/tiny/export         # write the trained model in the official layout

Every model knob is a flag too (`python train.py --help`). Checkpoints (`ckpt.pt` + `ckpt.json`) hold
every model weight (frozen ones too, so OUT_DIR alone rebuilds exactly the trained model), the
optimizer, scheduler, step, RNG states and data position; OUT_DIR/tokenizer.json is its tokenizer.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
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
    resume: bool = False  # continue from out_dir/ckpt.pt (weights, optimizer, data position, RNG)
    fsdp: bool = False  # under torchrun: shard with FSDP2 instead of DDP
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
    if cfg.resume and cfg.fsdp:
        raise ValueError("--resume with --fsdp=True is not supported yet (the checkpoint holds the whole model and optimizer "
                         "state, but loading them into sharded parameters is not written); resume with DDP")
    if (cfg.resume or cfg.export) and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"{ckpt}: no checkpoint to {'resume from' if cfg.resume else 'export'}; "
                                f"{'drop --resume or ' if cfg.resume else ''}set --out_dir to a train.py run")
    if cfg.init and not os.path.isdir(cfg.init):
        raise FileNotFoundError(f"--init {cfg.init}: not a directory (an official Sa2VA / InternVL2.5 checkpoint)")
    model_cfg = salma.Config.from_preset(preset)
    if cfg.init:  # its config.json sets the sizes, as build_salma will
        model_cfg = checkpoint.config_from_hf(cfg.init, model_cfg)
    salma.check_config(replace(model_cfg, **overrides))
    if cfg.sam2_ckpt and not os.path.isfile(cfg.sam2_ckpt):
        raise FileNotFoundError(f"--sam2_ckpt {cfg.sam2_ckpt}: SAM-2 checkpoint not found")


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


def wrap_model(model, device, use_fsdp):
    """Wrap for data parallelism: DDP, or FSDP2 `fully_shard` when the model outgrows one GPU."""
    if not dist.is_initialized():
        return model
    if use_fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.mllm.language_model.layers:
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


def full_weights(model):
    """Every weight of the model, frozen ones included, gathered whole when FSDP shards them (every rank must call)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in model.state_dict().items()}


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


def full_optimizer_state(model, optimizer, use_fsdp):
    """The optimizer's state dict; under FSDP gathered whole on rank 0 and keyed by parameter name (every rank must call)."""
    if not use_fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path, weights, optimizer_state, scheduler, sampler, step, configs):
    """Write ckpt.pt atomically (temp file + rename) and a ckpt.json saying what it is."""
    state = {
        "model": weights,
        "optimizer": optimizer_state,  # FSDP: keyed by parameter name (full_optimizer_state)
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "step": step,
        "rng": rng_state(),
        "configs": configs,
    }
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    info = {"step": step, "what": "salma training checkpoint (every model weight + optimizer state)", **configs}
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(info, f, indent=2)


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
    ddp_model = wrap_model(model, device, train_cfg.fsdp)  # before the optimizer: FSDP2 swaps in sharded parameters
    optimizer, scheduler = make_optimizer(model, train_cfg)
    ckpt_path = os.path.join(train_cfg.out_dir, "ckpt.pt")
    step = 0
    if train_cfg.resume:
        state = checkpoint.read_checkpoint(ckpt_path)
        checkpoint.load_weights(model, state["model"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        step = state["step"]
    autocast = common.autocast_for(common.resolve_dtype(train_cfg.dtype, device, model_cfg), device)  # weights stay fp32
    configs = {"train": asdict(train_cfg), "loss": asdict(loss_cfg), "model": asdict(model_cfg)}
    batches = training_batches(dataset, sampler, tokenizer, model_cfg, train_cfg)
    log_path = os.path.join(train_cfg.out_dir, "log.jsonl")
    if master:
        tokenizer.save(os.path.join(train_cfg.out_dir, "tokenizer.json"))  # out_dir alone rebuilds the model
    if master:
        keep_log_rows(log_path, step)  # a fresh run starts a fresh log; a resumed one drops the replayed steps
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
            if not train_cfg.fsdp and not ranks_in_sync(model):  # every rank must call this collective
                raise RuntimeError(f"step {step}: ranks hold different weights; check that every rank sees the same model")
            weights, optimizer_state = full_weights(model), full_optimizer_state(model, optimizer, train_cfg.fsdp)  # collectives under FSDP
            if master:
                save_checkpoint(ckpt_path, weights, optimizer_state, scheduler, sampler, step, configs)
                plot.plot_log(log_path)  # curves.png: loss parts and lr against step
    bar.close()
    if master and common.WARNINGS:  # skipped, truncated or cut samples, by reason
        print("data problems handled:", dict(common.WARNINGS))
        with open(os.path.join(train_cfg.out_dir, "data_problems.json"), "w") as f:
            json.dump(dict(common.WARNINGS), f, indent=1)
    if master:
        print(f"trained {plot.summary(log_path)} | {time.time() - start:.0f} s wall | checkpoint {ckpt_path}")
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
