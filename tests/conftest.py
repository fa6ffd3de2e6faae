"""Shared pytest set-up: the project's flat modules importable from any working directory, the `slow`
marker, and one tiny trained run that the eval and demo tests share."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/fixtures.py

import pytest  # noqa: E402

from fixtures import TRAINED_STEPS  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains or runs a command end to end; `-m 'not slow'` is the quick edit-test loop")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A train.py --out_dir after TRAINED_STEPS steps of the default run (checkpoints every 10), and what it printed."""
    out = tmp_path_factory.mktemp("trained")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--max_steps={TRAINED_STEPS}", "--save_every=10",
                           f"--out_dir={out}"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=900)
    return str(out), proc.stdout


@pytest.fixture
def run_dir(trained):
    """The shared tiny trained run's --out_dir (trained)."""
    return trained[0]
