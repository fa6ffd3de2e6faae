"""train.py end to end on CPU: exact resume after SIGKILL (one process, FSDP2), DDP == FSDP2 == one process,
activation checkpointing changes nothing, the loss goes down."""

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import bench
import data
import losses
import salma
import train
import testbed
import checkpoint
import fixtures
import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_train(*flags, check=True):
    """Run train.py to completion; returns the completed process (raises on failure when check)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=check)


def losses_by_step(out_dir):
    """{step: loss} from log.jsonl; a step logged twice (before a kill and after resume) keeps the last."""
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("seed, steps", [(0, None), (1, 100), (2, 100), (3, 100)])
def test_every_default_run_batch_is_valid(seed, steps):
    """Every batch of `python train.py` (seed 0, all steps; --seed=1 once crashed at step 57): built, no forward."""
    train_cfg, _, preset, overrides = train.parse_args([f"--seed={seed}"])
    tokenizer, model_cfg, ids = checkpoint.prepare_tokenizer(salma.Config.from_preset(preset, **overrides))
    dataset = data.build_train_mix(train_cfg.data, train_cfg.data_root, seed=seed)
    sampler = data.DistributedResumableSampler(len(dataset), seed=seed)
    batches = train.training_batches(dataset, sampler, tokenizer, model_cfg, train_cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny tensor ops: threads only contend on a shared machine
    for step in range((steps or train_cfg.max_steps) * train_cfg.grad_accum):
        batch = next(batches)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long, step
        rows = batch["seg_index"][:, 0]
        assert rows.unique().tolist() == list(range(train_cfg.batch_size)), step  # every sample asks for a mask
        assert (batch["input_ids"][rows, batch["seg_index"][:, 1]] == ids[inputs.SEG]).all(), step
        assert len(batch["pair_seg"]) == len(batch["pair_frame"]) == len(batch["pair_masks"]) > 0, step
        assert (batch["pair_masks"].flatten(1).sum(1) > 0).all(), step  # every target is visible
        assert batch["seg_text"][batch["pair_seg"]].any(1).all(), step  # every [SEG] has its words
        assert batch["pair_frame"].max() < len(batch["sam_images"]), step
    torch.set_num_threads(threads)


def kill_after_step(cmd, out, step, envs=(None,)):
    """Start cmd (a train.py run writing to out) once per env (one process per rank); SIGKILL them all once `step` is logged."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for env in envs]
    while all(proc.poll() is None for proc in procs):  # no deadline: a slow machine only makes this wait longer
        if os.path.exists(out / "log.jsonl") and max(losses_by_step(out), default=0) >= step:
            break
        time.sleep(0.05)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return max(losses_by_step(out))


def two_rank_envs():
    """The environments torchrun --standalone --nproc_per_node=2 gives its ranks (which it starts in sessions of their
    own, out of reach of a signal to it): started directly, a test can kill every rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    return [{**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(2)]


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    flags = ["--max_steps=12", "--save_every=4", "--batch_size=2", "--seed=3"]
    run_train(*flags, f"--out_dir={tmp_path / 'a'}")
    reference = losses_by_step(tmp_path / "a")

    out = tmp_path / "b"
    killed_at = kill_after_step([sys.executable, os.path.join(ROOT, "train.py"), *flags, f"--out_dir={out}"], out, 6)
    assert 6 <= killed_at < 12, "the run should be killed mid-way"
    saved = json.load(open(out / "ckpt.json"))["step"]
    assert saved in (4, 8) and not os.path.exists(out / "ckpt.pt.tmp")
    run_train(*flags, f"--out_dir={out}", "--resume")  # a bare --resume means True
    rows = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert rows == list(range(1, 13))  # one row per step: the replayed steps are not logged twice
    assert losses_by_step(out) == reference  # bit for bit, before the kill and after the resume


@pytest.mark.slow
def test_bad_flags_and_files_give_one_line_before_any_model_is_built(tmp_path):
    
    cases = [(["--topk=0"], ["--topk"]), (["--batch_size=0"], ["--batch_size"]), (["--mba_layers=9"], ["--mba_layers"]),
             (["--data=unknownset:1"], ["unknownset", "refcocog"]), (["--resume=True"], ["no checkpoint to resume from"]),
             (["--init=/nowhere"], ["--init", "/nowhere"])]
    for flags, names in cases:
        fixtures.assert_one_line_error(run_train(f"--out_dir={tmp_path}", *flags, check=False), *names)
    open(tmp_path / "sam2.pt", "wb").write(os.urandom(1000))
    fixtures.assert_one_line_error(run_train(f"--out_dir={tmp_path}", f"--sam2_ckpt={tmp_path / 'sam2.pt'}", check=False), "sam2.pt", "unreadable")
    open(tmp_path / "ckpt.pt", "wb").write(b"PK\x03\x04 truncated")
    fixtures.assert_one_line_error(run_train(f"--out_dir={tmp_path}", "--resume=True", check=False), "ckpt.pt", "unreadable")


@pytest.mark.slow
def test_two_rank_ddp_and_fsdp_equal_one_process_on_the_same_global_batch(tmp_path):
    """Two ranks of batch 1 (DDP, FSDP2) take the same first step as one process of batch 1 x 2 accumulated.

    Compared: the synchronised gradient (AdamW's first moment after one step is 0.1 x the gradient),
    per parameter to 1e-4 of its largest entry, plus 1e-6 of the model's largest for gradients that are
    summation noise around 0. Not the weights: AdamW's first step is about lr * sign(gradient),
    so where the true gradient is ~0 (SAM-2's window position embedding, attention k_proj biases that softmax
    ignores) summation-order noise alone picks the sign and the weights differ by up to 2 * lr on any CPU."""
    flags = ["--max_steps=1", "--save_every=1", "--batch_size=1", "--mba_dropout=0", "--seed=1", "--lr=1e-3",
             "--sam2_pretrain_frac=0",  # the main step is compared; each rank's pretraining is a separate process's
             "--grad_clip=1e6"]  # no clipping, which would hide a wrong gradient scale
    subprocess.run([*TORCHRUN, os.path.join(ROOT, "train.py"), *flags, f"--out_dir={tmp_path / 'ddp'}"],
                   cwd=ROOT, capture_output=True, text=True, check=True)  # raises if ranks diverge
    run_train(*flags, "--grad_accum=2", f"--out_dir={tmp_path / 'single'}")
    subprocess.run([*TORCHRUN, os.path.join(ROOT, "train.py"), *flags, "--fsdp=True", f"--out_dir={tmp_path / 'fsdp'}"],
                   cwd=ROOT, capture_output=True, text=True, check=True)  # FSDP2 on CPU with gloo
    states = {name: torch.load(tmp_path / name / "ckpt.pt", weights_only=True) for name in ("ddp", "single", "fsdp")}
    assert states["fsdp"]["optimizer"] is None  # FSDP: the optimizer state is sharded, in sharded/step_N
    dcp_to_torch_save(tmp_path / "fsdp" / "sharded" / "step_00000001", tmp_path / "fsdp.pt")
    states["fsdp"]["optimizer"] = torch.load(tmp_path / "fsdp.pt", weights_only=False)["optimizer"]
    assert states["ddp"]["model"].keys() == states["single"]["model"].keys() == states["fsdp"]["model"].keys()
    names = optimizer_names(flags)
    moments = {name: first_moments(state["optimizer"], names) for name, state in states.items()}
    single = moments["single"]
    assert len(single) > 0.5 * len(names)  # every parameter that got a gradient; SAM-2's video memory parts get none on images
    assert sum(int((m != 0).sum()) for m in single.values()) > 0.5 * sum(m.numel() for m in single.values())
    largest = max(m.abs().max() for m in single.values())
    for other in (moments["ddp"], moments["fsdp"]):
        assert other.keys() == single.keys()
        for k, m in single.items():
            assert (other[k] - m).abs().max() <= 1e-4 * m.abs().max() + 1e-6 * largest, k
    for other in ("ddp", "fsdp"):  # the weights: one AdamW step of lr 1e-3 apart at most
        weights, reference = states[other]["model"], states["single"]["model"]
        assert max((weights[k] - reference[k]).abs().max().item() for k in weights) < 2.1e-3


@pytest.mark.slow
def test_killed_and_resumed_fsdp_run_matches_an_uninterrupted_one(tmp_path):
    """Two FSDP2 ranks (gloo, CPU) killed after a sharded checkpoint and resumed log the uninterrupted run's losses bit
    for bit; the killed and resumed run also checkpoints activations, which changes no number. LoRA (the sa2va recipe)
    puts dropout inside the recomputed layers and frozen weights beside trained ones in each shard."""
    flags = ["--max_steps=6", "--save_every=2", "--batch_size=1", "--seed=3", "--sam2_pretrain_frac=0", "--recipe=sa2va",
             "--lr=1e-3", "--fsdp=True"]
    subprocess.run([*TORCHRUN, os.path.join(ROOT, "train.py"), *flags, f"--out_dir={tmp_path / 'a'}"],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    reference = losses_by_step(tmp_path / "a")

    out, cmd = tmp_path / "b", [os.path.join(ROOT, "train.py"), *flags, "--activation_checkpointing=True", f"--out_dir={tmp_path / 'b'}"]
    killed_at = kill_after_step([sys.executable, *cmd], out, 3, two_rank_envs())  # OMP_NUM_THREADS=1 as torchrun sets it
    assert 3 <= killed_at < 6, "the run should be killed mid-way"
    saved = sorted(os.listdir(out / "sharded"))
    assert saved[-1] in ("step_00000002", "step_00000004") and len([n for n in saved if not n.endswith(".tmp")]) == 1
    subprocess.run([*TORCHRUN, *cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, check=True)
    rows = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert rows == list(range(1, 7))
    assert losses_by_step(out) == reference  # bit for bit, before the kill and after the resume
    assert os.listdir(out / "sharded") == ["step_00000006"]
    fixtures.assert_one_line_error(run_train(f"--out_dir={out}", "--resume", check=False), "ckpt.pt", "--fsdp=True")


def test_activation_checkpointing_changes_no_loss_or_gradient():
    """Losses and every gradient with checkpointed blocks equal those without, bit for bit: the recomputation runs the
    same ops on the same inputs, and replays the RNG, so LoRA's dropout draws the same masks (both recipes, train mode).
    With deterministic algorithms, as train.py runs (without them SAM-2's backward on CPU differs run to run by ~1e-9)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for recipe in ("full", "sa2va"):
            train_cfg, loss_cfg, preset, overrides = train.parse_args([f"--recipe={recipe}"])
            torch.manual_seed(0)
            plain, tok = train.build_model(train_cfg, preset, overrides)
            checkpointed = copy.deepcopy(plain)
            train.checkpoint_activations(checkpointed)
            batch = inputs.make_train_batch([testbed.split("train", 1)[0]], tok, plain.cfg, seeds=[0])
            (loss_a, grads_a), (loss_b, grads_b) = (loss_and_gradients(m, batch, loss_cfg) for m in (plain, checkpointed))
            assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys(), recipe
            assert any(".blocks." in k for k in grads_a) == (recipe == "full")  # the ViT's blocks train in the full recipe
            assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a), recipe
    finally:
        torch.use_deterministic_algorithms(deterministic)


def loss_and_gradients(model, batch, loss_cfg):
    """(loss, {name: gradient}) of one training forward and backward, dropout drawn from seed 1."""
    torch.manual_seed(1)
    loss, _ = losses.total_loss(losses.salma_loss_parts(model(batch), batch, loss_cfg), loss_cfg, 1.0)
    loss.backward()
    return loss, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_help_lists_the_scaling_flags_and_bad_combinations_give_one_line(tmp_path):
    """--help shows --fsdp and --activation_checkpointing; --fsdp without torchrun and --resume=True with --fsdp=True on a
    run without a sharded checkpoint each stop with one line."""
    help_text = run_train("--help").stdout
    assert "--activation_checkpointing" in help_text and "--fsdp" in help_text
    fixtures.assert_one_line_error(run_train("--fsdp=True", f"--out_dir={tmp_path}", check=False), "--fsdp", "torchrun")
    env = {**os.environ, "RANK": "0"}  # as under torchrun: the check comes before any process group
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--fsdp=True", "--resume", f"--out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    fixtures.assert_one_line_error(proc, "sharded", "no sharded checkpoint")


def optimizer_names(flags):
    """Parameter names in train.make_optimizer's order (matrices first, then the rest), as a plain state dict numbers them."""
    train_cfg, _, preset, overrides = train.parse_args(flags)
    model, _ = train.build_model(train_cfg, preset, overrides)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [n for n, p in trained if p.ndim >= 2] + [n for n, p in trained if p.ndim < 2]


def first_moments(optimizer_state, names):
    """{parameter name: AdamW's exp_avg} of a saved optimizer state, numbered (DDP, one process) or named (FSDP)."""
    return {(names[key] if isinstance(key, int) else key): value["exp_avg"] for key, value in optimizer_state["state"].items()}


def one_object_scene(seed):
    """A generated image with a single shape and its colour-and-shape expression."""
    rng = random.Random(seed)
    size = rng.choice(list(testbed.SIZES))
    r = testbed.SIZES[size]
    obj = {"shape": rng.choice(testbed.SHAPES), "colour": rng.choice(list(testbed.COLOURS)), "size": size, "r": r,
           "cx": rng.randint(r + 1, 190 - r), "cy": rng.randint(r + 1, 190 - r), "direction": None, "speed": 0}
    image, masks = testbed.render([obj], (192, 192))
    return {"id": str(seed), "frames": [image], "exprs": [testbed.describe(obj, ("colour",))], "masks": masks[:, None],
            "is_video": False, "conversation": None}


@torch.no_grad()
def batch_iou(model, batch):
    """Mean IoU of the model's masks (answer teacher-forced, SAM-2's low-res grid) over every (expression, frame)."""
    model.eval()
    pred, truth = model(batch)["low_res"][:, 0] > 0, batch["pair_masks"] > 0.5
    model.train()
    return ((pred & truth).sum((1, 2)) / (pred | truth).sum((1, 2)).clamp_min(1)).mean().item()


def overfit(samples, steps, lr):
    """(IoU before, IoU after) `steps` of train.py's optimiser and from-scratch losses on one fixed batch of samples."""
    torch.manual_seed(0)
    train_cfg, loss_cfg, preset, overrides = train.parse_args([f"--max_steps={steps}", f"--lr={lr}"])
    model, tok = train.build_model(train_cfg, preset, overrides)
    optimizer, scheduler = train.make_optimizer(model, train_cfg)
    batch = inputs.make_train_batch(samples, tok, model.cfg, seeds=range(len(samples)))
    before = batch_iou(model, batch)
    for step in range(steps):
        out = model(batch, ramp=losses.ramp(step, steps))
        loss, _ = losses.total_loss(losses.salma_loss_parts(out, batch, loss_cfg), loss_cfg, 1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return before, batch_iou(model, batch)


@pytest.mark.slow
def test_rung_a_one_object_per_image_is_segmented():
    """Ladder rung (a): the [SEG] -> decoder -> loss path learns; 4 one-object images."""
    before, after = overfit([one_object_scene(seed) for seed in range(4)], steps=30, lr=1e-3)
    assert before < 0.3 and after > 0.6, (before, after)


@pytest.mark.parametrize("rung, kinds, video, steps", [
    ("b", ("attribute",), 0.0, 100),
    ("c", ("relation", "comparative"), 0.0, 100),
    ("d", ("motion",), 1.0, 120),
])
@pytest.mark.slow
def test_ladder_rungs_b_to_d_select_the_target_among_distractors(rung, kinds, video, steps):
    """Rungs (b) attributes among 3-6 shapes, (c) relations and comparatives, (d) motion in videos: each
    image holds several targets, one expression each, so only masks chosen by the words score."""
    scenes = testbed.SyntheticRefDataset(2, seed=7, video_fraction=video, kinds=kinds)
    samples = [scenes[i] for i in range(2)]
    assert all(testbed.expression_kind(e) in kinds for s in samples for e in s["exprs"])
    assert all(len(set(s["targets"])) >= 2 for s in samples)  # different masks for the same frames
    before, after = overfit(samples, steps=steps, lr=1e-3)  # one fixed batch: a higher lr than a run's is fine
    assert before < 0.3 and after > 0.6, (rung, before, after)


def eval_ciou(run_dir, out_dir):
    """cIoU of eval.py (answer teacher-forced) on 10 generated val images."""
    subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--ckpt", str(run_dir), "--num_samples=10", "--force_seg=True",
                    "--quiet", f"--out_dir={out_dir}"], cwd=ROOT, check=True, capture_output=True)
    return json.load(open(os.path.join(out_dir, "metrics.json")))["cIoU"]


@pytest.mark.slow
def test_train_py_runs_its_steps_and_segmentation_improves(tmp_path):
    """`python train.py` end to end (the generated mix, videos included): after 150 steps eval.py's cIoU is
    clearly above that of the same run after one step; choosing the target is asserted by the ladder rungs."""
    no_pretraining = "--sam2_pretrain_frac=0"  # SAM-2's encoder random and trained: 150 steps leave "every shape"
    run_train("--max_steps=150", "--save_every=1000", no_pretraining, f"--out_dir={tmp_path / 'run'}")
    run_train("--max_steps=1", no_pretraining, f"--out_dir={tmp_path / 'step1'}")
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 151))
    assert json.load(open(tmp_path / "run" / "ckpt.json"))["step"] == 150
    before, after = eval_ciou(tmp_path / "step1", tmp_path / "eval1"), eval_ciou(tmp_path / "run", tmp_path / "eval150")
    assert after > before + 5 and after > 12, (before, after)


@pytest.mark.slow
def test_sam2_pretraining_teaches_a_random_encoder_the_shapes():
    """From scratch on generated data, train.py first teaches SAM-2's random image encoder where the objects
    are and what they are (a random one: ~66% shape accuracy by linear probe); after 600 steps it tells the
    shapes and sizes of held-out scenes' objects almost always, and finds their pixels and shapes. Runs on other
    data, or from weights, do not pretrain."""
    torch.manual_seed(0)
    train_cfg, _, preset, overrides = train.parse_args(["--max_steps=600", "--sam2_pretrain_frac=1"])
    model, _ = train.build_model(train_cfg, preset, overrides)
    report = testbed.pretrain_sam2_encoder(model, 600, train_cfg.sam2_pretrain_lr, train_cfg.seed, torch.device("cpu"))
    scores = report["held_out"]  # after 1 step: 34 / 41 / 23 / 44
    assert report["steps"] == 600 and scores["object_shape_accuracy"] > 85 and scores["object_size_accuracy"] > 85, report
    assert scores["pixel_objectness_iou"] > 60 and scores["pixel_shape_accuracy"] > 60, report
    assert train.pretrains_sam2(train_cfg)
    for flags in (["--sam2_pretrain_frac=0"], ["--data=refcoco:1", "--data_root=data"], ["--sam2_ckpt=sam2.pt"]):
        assert not train.pretrains_sam2(train_config(flags)), flags


def train_config(flags):
    """TrainConfig of the flags, without train.py's checks of files."""
    cfg = train.TrainConfig()
    for flag in flags:
        name, value = flag[2:].split("=")
        setattr(cfg, name, type(getattr(cfg, name))(value))
    return cfg


@pytest.mark.slow
def test_train_py_keeps_the_pretrained_encoder_frozen(tmp_path):
    """train.py pretrains SAM-2's encoder (3 steps in both runs here), then freezes it: the runs' checkpoints
    after 3 and after 6 main steps hold the same encoder, bit for bit, and not the random one they started
    from, while their mask decoders differ."""
    saved = {}
    for steps, frac in ((3, "1"), (6, "0.5")):
        out_dir = tmp_path / str(steps)
        run_train(f"--max_steps={steps}", f"--sam2_pretrain_frac={frac}", f"--save_every={steps}", f"--out_dir={out_dir}")
        assert json.load(open(out_dir / "sam2_pretrain.json"))["steps"] == 3
        saved[steps] = checkpoint.read_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model"]
    torch.manual_seed(0)
    train_cfg, _, preset, overrides = train.parse_args(["--max_steps=6"])
    initial = train.build_model(train_cfg, preset, overrides)[0].state_dict()
    encoder = [k for k in initial if ".image_encoder." in k]
    decoder = [k for k in initial if ".sam_mask_decoder." in k]
    assert encoder and all(torch.equal(saved[3][k], saved[6][k]) for k in encoder)
    assert any(not torch.equal(saved[3][k], initial[k]) for k in encoder)
    assert any(not torch.equal(saved[3][k], saved[6][k]) for k in decoder)

def test_memory_estimate_counts_the_built_model_and_shards_over_the_gpus():
    """bench.py memory: its meta-device parameter counts are those of a built tiny model under the sa2va recipe; FSDP2 holds
    1/8 of DDP's weights, gradients and optimizer state on 8 GPUs; checkpointing keeps fewer activations (sanity only)."""
    model = bench.sa2va_model_on_meta("tiny")
    counts = bench.param_counts(model)
    built = salma.set_trainable(checkpoint.build_model(salma.Config.from_preset("tiny"))[0], "sa2va")
    assert counts["total"] == sum(p.numel() for p in built.parameters())
    assert counts["trainable"] == sum(p.numel() for p in built.parameters() if p.requires_grad) < counts["total"]
    activations = bench.activation_bytes(model, 1, 64)
    assert 0 < activations[1] < activations[0]
    ddp, fsdp = (bench.memory_per_gpu(counts, activations, 8, sharded) for sharded in (False, True))
    assert all(fsdp[k] == ddp[k] / 8 for k in ("weights", "gradients", "optimizer"))
    assert fsdp["total"] < ddp["total"] and ddp["total"] - ddp["total_checkpointed"] == activations[0] - activations[1]
