"""Reliability under hostile input and hard kills: resume with another config, a torn metrics line,
malformed loader states, a killed MNIST-1D generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from loaders import LoaderState, StateMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = os.path.join(ROOT, "configs", "mnist1d_cnn.yaml")
MLP = os.path.join(ROOT, "configs", "mnist1d_mlp.yaml")


def cli(capsys, config, workdir, cache, *overrides) -> tuple[int, str, str]:
    """``python -m trainers.run`` in a subprocess (JAX threads in this process would make later
    tests' ``fork`` unsafe): exit code, stdout, stderr."""
    out = subprocess.run([sys.executable, "-m", "trainers.run", config, f"data.cache_dir={cache}", *overrides,
                          "--workdir", str(workdir), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    return out.returncode, out.stdout, out.stderr


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- resume with another config
def test_resume_refuses_a_changed_model_and_notes_harmless_changes(tmp_path, mnist1d_dir, capsys):
    work = tmp_path / "run"
    base = ["model.kwargs.channels=8", "train.steps=10", "train.checkpoint_every=10", "train.eval_every=0"]
    assert cli(capsys, CNN, work, mnist1d_dir, *base)[0] == 0

    code, out, err = cli(capsys, CNN, work, mnist1d_dir, *base, "model.kwargs.channels=4", "schedule.lr=0.02",
                         "train.steps=20")
    assert code == 2, out + err
    assert "model.kwargs.channels: 8 -> 4" in err and "schedule.lr: 0.01 -> 0.02" in err and "--fresh" in err
    assert "train.steps: 10 -> 20" in err  # the harmless change is listed too, apart
    assert os.listdir(work / "checkpoints") == ["10"]
    assert json.loads((work / "checkpoints" / "10" / "config" / "metadata").read_text())["model"]["kwargs"]["channels"] == 8

    code, out, err = cli(capsys, CNN, work, mnist1d_dir, *base, "train.steps=20", "data.adapter=torch",
                         "train.log_every=5", "train.keep_checkpoints=1")
    assert code == 0, out + err
    assert "resumed from" in out and "at step 10" in out
    note = [line for line in err.splitlines() if "train.steps: 10 -> 20" in line]
    assert len(note) == 1 and 'data.adapter: "grain" -> "torch"' in note[0] and "train.log_every: 50 -> 5" in note[0]

    code, out, err = cli(capsys, CNN, work, mnist1d_dir, *base, "train.steps=5")
    assert code == 2 and "checkpoints/20" in err and "5 steps" in err, out + err


# --------------------------------------------------------------------------- metrics.jsonl torn by a kill
def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, mnist1d_dir, capsys):
    work = tmp_path / "run"
    args = ["train.steps=20", "train.checkpoint_every=10", "train.log_every=5", "train.eval_every=0"]
    assert cli(capsys, MLP, work, mnist1d_dir, *args)[0] == 0
    # as if killed while writing the row after step 20's, before its checkpoint was complete
    import shutil

    shutil.rmtree(work / "checkpoints" / "20")
    os.remove(work / "summary.json")
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "loss": 0.1')

    code, out, err = cli(capsys, MLP, work, mnist1d_dir, *args)
    assert code == 0, out + err
    assert "at step 10" in out and f"{work / 'metrics.jsonl'}" in err and "warning" in err
    train = [r["step"] for r in rows(work) if "lr" in r]
    assert train == [5, 10, 15, 20]
    assert [r["step"] for r in rows(work) if "lr" not in r] == [20]  # the final evaluation, once

    assert cli(capsys, MLP, work, mnist1d_dir, *args)[0] == 0  # a finished run, run again
    assert [r["step"] for r in rows(work) if "lr" not in r] == [20]


def test_trim_metrics_keeps_intact_rows_and_ends_every_line(tmp_path, capsys):
    from trainers.train import _trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "lr": 1}\n{"step": 10, "lr": 1}\n[1, 2]\n{"step": 10, "eval_loss": 1}')
    _trim_metrics(str(path), 10)
    assert path.read_text() == '{"step": 5, "lr": 1}\n{"step": 10, "lr": 1}\n{"step": 10, "eval_loss": 1}\n'
    assert f"{path} line 3" in capsys.readouterr().err


# --------------------------------------------------------------------------- malformed loader states
GOOD = {"step": 3, "seed": 0, "fingerprint": "0123456789abcdef", "source": "S", "sampler": "P", "version": 1}


@pytest.mark.parametrize(
    "state,message",
    [
        ([GOOD], r"a loader state must be a dict, got list"),
        ("{not json", r"a loader state string must be JSON"),
        ({k: v for k, v in GOOD.items() if k != "seed"}, r"loader state is missing seed"),
        ({**GOOD, "epoch": 2}, r"loader state has unknown field\(s\) epoch \(expected: step, seed, "),
        ({**GOOD, "step": "5"}, r"loader state field 'step' must be an int, got '5' \(str\)"),
        ({**GOOD, "step": 5.5}, r"loader state field 'step' must be an int, got 5\.5 \(float\)"),
        ({**GOOD, "step": 5.0}, r"loader state field 'step' must be an int, got 5\.0 \(float\)"),
        ({**GOOD, "step": True}, r"loader state field 'step' must be an int, got True \(bool\)"),
        ({**GOOD, "step": -1}, r"loader state field 'step' must be at least 0, got -1"),
        ({**GOOD, "seed": None}, r"loader state field 'seed' must be an int, got None \(NoneType\)"),
        ({**GOOD, "fingerprint": 5}, r"loader state field 'fingerprint' must be a str, got 5 \(int\)"),
        ({**GOOD, "version": True}, r"loader state version True is not supported \(this Tandem reads 1\)"),
    ],
)
def test_a_malformed_loader_state_is_refused(state, message):
    with pytest.raises(StateMismatchError, match=message):
        LoaderState.from_dict(state)


def test_a_well_formed_loader_state_round_trips():
    assert LoaderState.from_dict(json.dumps(GOOD)).to_dict() == GOOD


# --------------------------------------------------------------------------- a killed MNIST-1D generation
def test_mnist1d_generation_replaces_what_a_killed_run_left(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    pytest.importorskip("mnist1d")
    import mnist1d.data

    from trainers import data

    rng = np.random.default_rng(0)
    fake = {"x": rng.normal(size=(300, 40)), "y": rng.integers(0, 10, 300),
            "x_test": rng.normal(size=(100, 40)), "y_test": rng.integers(0, 10, 100)}
    monkeypatch.setattr(mnist1d.data, "make_dataset", lambda args: fake)  # small and fast; the format is the same
    cache = tmp_path / "cache"
    leftover = cache / ".mnist1d-k1ll3d"  # a killed run's temporary folder, half written
    leftover.mkdir(parents=True)
    (leftover / "train.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (cache / ".mnist1d-stray").write_bytes(b"partial")
    partial = cache / "mnist1d"  # a folder without DONE: an older, non-atomic writer's half-written output
    partial.mkdir()
    (partial / "train.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the kill: nothing after it runs

    with monkeypatch.context() as m:
        m.setattr(data, "_write_tar", killed)
        with pytest.raises(KeyboardInterrupt):
            data.prepare_mnist1d(str(cache), shard_size=100)

    paths = data.prepare_mnist1d(str(cache), shard_size=100)
    assert (partial / "DONE").exists()
    with h5py.File(paths["h5_train"]) as f:
        assert f["x"].shape == (300, 40)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".mnist1d-")) == []
    assert sorted(os.listdir(partial)) == ["DONE", "test-000000.tar", "test.h5", "train-000000.tar", "train-000001.tar",
                                           "train-000002.tar", "train.h5"]
