"""The PyTorch example trains, stops, resumes, and ends with the same weights."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def run(*args):
    out = subprocess.run([sys.executable, "examples/torch_train.py", *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_torch_example_resumes_to_the_same_weights(tmp_path):
    common = ["--steps", "45", "--save-every", "10"]
    straight = run("--workdir", str(tmp_path / "a"), *common)
    data = str(tmp_path / "a" / "data.h5")
    first = run("--workdir", str(tmp_path / "b"), "--data", data, "--stop-after", "27", "--workers", "2", *common)
    assert "stopping at step 27" in first
    second = run("--workdir", str(tmp_path / "b"), "--data", data, *common)  # 0 workers now
    assert "resumed from" in second and "at step 20" in second
    digest = re.compile(r"step 45 loss [\d.]+ weights sha256 ([0-9a-f]{64})")
    assert digest.search(straight).group(1) == digest.search(second).group(1)
