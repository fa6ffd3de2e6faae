"""
common: the small helpers every script shares.

  flags        a --flag per dataclass field, with its comment as help (add_dataclass_flags)
  precision    --dtype auto|float32|bfloat16 resolved for the device and model (resolve_dtype)
  files        JSON, images and torch files read with one clear error naming the file
  data         handled data problems, counted (warn_once); the per-sample seed (sample_seed)
"""

import argparse
import ctypes
import inspect
import json
import os
import re
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import fields

import torch
from PIL import Image

# ---------------------------------------------------------------------------------------------
# flags: argparse flags generated from dataclasses

FLAG_CHOICES = {"recipe": ("auto", "sa2va", "full"), "mba_mode": ("gate", "film"), "tmc_source": ("post", "pre"),
                "dtype": ("auto", "float32", "bfloat16")}


def field_comments(cls):
    """{field: the comment after it in cls's source}: the dataclasses document their fields there."""
    source = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.M))


def add_dataclass_flags(parser, instance, title, preset=""):
    """A --field flag per dataclass field, its help from the field's comment; with preset, the default
    is None (= the preset's value, or the checkpoint's) and the help shows the preset's value."""
    group = parser.add_argument_group(title)
    comments = field_comments(type(instance))
    for f in fields(instance):
        value = getattr(instance, f.name)
        kind = parse_bool if isinstance(value, bool) else type(value)
        default = f"preset {preset}: {value!r}" if preset else f"default {value!r}"
        extra = {"nargs": "?", "const": True} if kind is parse_bool else {}  # bare --resume means True
        group.add_argument(f"--{f.name}", type=kind, default=None if preset else value, choices=FLAG_CHOICES.get(f.name),
                           metavar=None if f.name in FLAG_CHOICES else ("BOOL" if kind is parse_bool else kind.__name__.upper()),
                           help=f"{comments.get(f.name, '')} ({default})".strip(), **extra)


def parse_bool(text):
    """argparse type for True/False flags."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def dataclass_from_args(cls, args):
    """Build cls from the parsed flags of its fields."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def given_fields(cls, args):
    """{field: value} of the cls flags given on the command line (the rest come from a preset or a checkpoint)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}


# ---------------------------------------------------------------------------------------------
# precision


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX); without it bf16 matmuls are slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


BF16_CPU_MIN_WIDTH = 512  # auto: on a CPU, bf16 only pays when the matmuls are wide (see resolve_dtype)


def resolve_dtype(choice, device, cfg):
    """'auto' -> bf16 on CUDA, and on CPUs with native bf16 matmuls for a model whose LLM is at least
    BF16_CPU_MIN_WIDTH wide (the 1B presets); else fp32. Or 'float32' / 'bfloat16'.

    Measured on an AVX-512 BF16 CPU: a tiny-preset training step (64-128 wide matmuls) is 1.3x slower
    in bf16 than in fp32, while 1024-wide bf16 matmuls run ~2.6x faster than fp32 ones.
    """
    if choice == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_native_bf16() and cfg.llm_hidden >= BF16_CPU_MIN_WIDTH else torch.float32
    if choice not in DTYPES:
        raise ValueError(f"--dtype={choice!r}: expected auto, float32 or bfloat16")
    return DTYPES[choice]


def autocast_for(dtype, device):
    """bf16 autocast on device (SAM-2's fp32 inputs meet bf16 weights there), or nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# files: one clear error naming a missing, truncated or foreign file


def read_json_file(path):
    """json.load with one clear error naming a missing or malformed file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_image(path):
    """An RGB PIL image, or one clear error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found; check --data_root and the dataset layout (docs/data.md)")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None


def torch_load(path, what):
    """torch.load (tensors and plain Python only) with one clear error for a truncated or foreign file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled objects: all mean "not the file we need"
        raise ValueError(f"{path}: unreadable ({type(e).__name__}); it is truncated or not {what}") from None


# ---------------------------------------------------------------------------------------------
# data: handled problems are counted, never silent; sampling is a pure function of (seed, index)

WARNINGS = Counter()  # what was skipped or truncated, by reason; printed by train.py / eval.py


def warn_once(reason, detail):
    """Count a handled data problem; warn the first time each reason occurs."""
    if WARNINGS[reason] == 0:
        warnings.warn(f"{reason}: {detail} (further cases are counted, not printed)")
    WARNINGS[reason] += 1


def sample_seed(seed, index):
    """The seed of sample `index` of a run seeded `seed`: every random choice about a sample draws from it."""
    return seed * 1_000_003 + index


def release_freed_memory():
    """Hand memory freed by glibc's allocator back to the system (malloc_trim), so that resident memory is what is in
    use after a model changes precision or packs its weights; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
