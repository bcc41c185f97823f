"""The PyTorch example trains, stops, resumes, and ends with the same weights."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def readme_block(heading: str, lang: str = "bash") -> str:
    """The first ``lang`` code block under ``heading`` in the README, verbatim."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index(heading):]
    start = section.index(f"```{lang}\n") + len(f"```{lang}\n")
    return section[start:section.index("\n```\n", start) + 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_atek_quickstart_runs_as_written(tmp_path):
    """The README's ATEK quickstart, run as a user runs it (only the port is a free one), prints
    what its comments say: ATEK's downloader, the local and the streamed loader."""
    pytest.importorskip("webdataset")
    pytest.importorskip("PIL")
    script = readme_block("#### ATEK quickstart")
    assert script.count("8765") == 2
    script = script.replace("8765", str(free_port()))
    os.symlink(os.path.join(ROOT, "examples"), tmp_path / "examples")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               PYTHONPATH=ROOT, TANDEM_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("4 sequences, 12 shards under data/atek_store")
    assert "9 shards: 9 downloaded, 0 already complete, 0 failed" in lines
    assert lines[-3:] == ["torch.Size([4, 2, 3, 64, 64]) 4", "12", "12"]
    with open(tmp_path / "data" / "adt" / "local_train_tars.yaml") as f:
        assert f.read().count("shards-") == 6  # 2 of the 3 sequences (0.9 of 3, rounded down), 3 shards each
    cache = tmp_path / "data" / "shard_cache"
    cached = {n: os.path.getsize(cache / n) for n in os.listdir(cache) if n.endswith(".tar")}
    assert cached and sum(cached.values()) <= 2 * 2**20 + max(cached.values()), cached  # cache_limit + one shard
