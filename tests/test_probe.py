"""probe.py: the linear probe reads a linear code and not noise; F_v is pooled over the target; the image token is the one over the target; the command writes its table and fails in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import probe
import checkpoint
import fixtures
import inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_probe_accuracy_reads_a_linear_code_and_stays_at_chance_on_noise():
    """Features that hold the label (one-hot plus noise) are read back; features independent of it are not."""
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (600,))
    noise = torch.randn(600, 16)
    coded = torch.cat([3 * torch.nn.functional.one_hot(labels, 3).float(), noise], dim=1)
    is_train = torch.arange(600) < 400
    assert probe.probe_accuracy(coded, labels, is_train, ~is_train) > 0.95
    chance = probe.majority_rate(labels[~is_train])
    assert probe.probe_accuracy(noise, labels, is_train, ~is_train) < chance + 0.12


def test_probe_table_scores_each_kind_on_held_out_expressions_only():
    """A kind whose only expressions are in the fitted part is left out; the majority rate is that of the held-out ones."""
    labels = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]] * 10)
    kinds = np.array(["attribute"] * 14 + ["relation"] * 6)
    features = torch.nn.functional.one_hot(labels[:, 0], 2).float()
    table = probe.probe_table({"coded": features}, labels, kinds, train_frac=0.7, steps=200)["coded"]
    assert list(table) == ["relation"] and table["relation"]["N"] == 6
    assert table["relation"]["colour"] == {"accuracy": 100.0, "majority": 50.0}


def run_probe(*flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "--quiet", *flags], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_probe_command_writes_its_table_and_fails_in_one_line(tmp_path):
    proc = run_probe("--ckpt=random", "--num_samples=8", "--steps=50", f"--out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    result = json.load(open(tmp_path / "probe.json"))
    assert result["expressions"] >= 8 and list(result["by_feature"]) == ["z_seg", "F_v at the target", "LLM image token at the target"]
    for by_kind in result["by_feature"].values():
        assert by_kind and set(by_kind) <= set(probe.KINDS)
        for row in by_kind.values():
            for name in probe.ATTRIBUTES:
                assert 0 <= row[name]["accuracy"] <= 100 and 0 < row[name]["majority"] <= 100
    assert "| feature | kind | N | colour | shape | size | column | row |" in proc.stdout
    assert result["image_reliance"] > 0.1  # a random LLM already mixes the image into z_seg
    fixtures.assert_one_line_error(run_probe("--ckpt=/nowhere"), "--ckpt", "/nowhere")
    fixtures.assert_one_line_error(run_probe("--train_frac=1.5"), "--train_frac")
    help_text = run_probe("--help").stdout
    assert all(f"--{flag}" in help_text for flag in ("ckpt", "num_samples", "train_frac", "steps", "out_dir"))


def test_image_reliance_is_zero_for_words_alone_and_grows_with_the_image():
    torch.manual_seed(0)
    z_seg = torch.randn(50, 8)
    assert probe.image_reliance(z_seg, z_seg.clone()) == 0  # the image changed nothing
    assert 0.05 < probe.image_reliance(z_seg, z_seg + 0.1 * torch.randn(50, 8)) < 0.2
    assert probe.image_reliance(z_seg, torch.randn(50, 8)) > 1  # as far as another expression's z_seg


def test_target_labels_place_the_centre_in_the_grid():
    obj = {"colour": "blue", "shape": "triangle", "size": "large", "cx": 150, "cy": 20}
    assert probe.target_labels(obj, (192, 192)) == [2, 2, 1, 3, 0]  # blue, triangle, large; column 3, row 0
    assert probe.target_labels({**obj, "cx": 47, "cy": 48}, (192, 192))[3:] == [0, 1]  # cells of 48 px


def random_model_and_frame():
    """The random tiny model of --ckpt random, and a 192 px noise image."""
    from PIL import Image

    model, _ = checkpoint.model_from_flags("random")
    return model, Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 192, 3), dtype=np.uint8))


def test_target_features_average_sams_image_embedding_over_each_mask():
    """F_v at the target: the whole-image mask gives the embedding's mean, the left-half mask the mean of its left half."""
    model, frame = random_model_and_frame()
    masks = torch.zeros(2, 192, 192, dtype=torch.bool)
    masks[0] = True
    masks[1, :, :96] = True
    pooled = probe.target_features(model, frame, masks)  # (2, C)
    with torch.inference_mode():
        embed = model.grounding.encode_image(inputs.sam_pixels([frame], model.cfg.sam_image_size))["image_embed"][0]  # (C, h, w)
    assert torch.allclose(pooled[0], embed.mean((1, 2)), atol=1e-5)
    assert torch.allclose(pooled[1], embed[:, :, : embed.shape[2] // 2].mean((1, 2)), atol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1], atol=1e-3)


def test_image_token_at_takes_the_llm_token_over_each_centre():
    """On the tiny model's 4x4 token grid (one tile for a square image), the centre (150, 20) of a 192 px image is
    column 3, row 0 (token 3) and (47, 100) column 0, row 2 (token 8)."""
    model, frame = random_model_and_frame()
    tokens = probe.image_token_at(model, frame, [{"cx": 150, "cy": 20}, {"cx": 47, "cy": 100}])  # (2, D)
    with torch.inference_mode():
        grid = model.mllm.extract_feature(inputs.mllm_pixels([frame], model.cfg, is_video=False))[-1]  # (16, D)
    assert len(grid) == 16
    assert torch.equal(tokens[0], grid[3]) and torch.equal(tokens[1], grid[8])
