"""Multi-process training on localhost (jax.distributed, gloo): 2 processes x 2 CPU devices.

A killed process is reported by the others and the restarted run ends with the weights
of the uninterrupted one; a checkpoint moves between 2 x 2 and 1 x 4 reading the same
global batches (the resume audit proves it). Every run is a subprocess: JAX threads in
the test process would make later tests' ``fork`` unsafe.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from trainers import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = os.path.join(ROOT, "configs", "mnist1d_mlp.yaml")
STEPS = 60
BASE = ["train.eval_every=0", "train.checkpoint_every=10", "train.log_every=10", "train.audit=true",
        "schedule.name=constant"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, cache, processes: int, devices: int, *overrides, lost_after: float = 5) -> list[subprocess.Popen]:
    """``processes`` runs of ``python -m trainers.run`` joined through a coordinator on localhost."""
    env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    cmd = [sys.executable, "-m", "trainers.run", MLP, f"data.cache_dir={cache}", f"train.steps={STEPS}", *BASE,
           *overrides, "--workdir", str(workdir), "--no-progress"]
    if processes == 1:
        return [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    multi = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", str(processes), "--lost-after", str(lost_after)]
    return [subprocess.Popen([*cmd, *multi, "--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(procs, timeout: float = 300) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:  # every thread's stack (trainers.run registers SIGUSR1), then the end
                q.send_signal(signal.SIGUSR1)
            time.sleep(2)
            for q in procs:
                q.kill()
            stacks = [q.communicate()[1] for q in procs]  # also closes the pipes
            raise AssertionError(f"a process hung for {timeout} s; stderr:\n" +
                                 "\n".join(f"--- process {i}:\n{e[-6000:]}" for i, e in enumerate(stacks))) from None
        out.append((p.returncode, stdout, stderr))
    return out


def run(workdir, cache, processes: int, devices: int, *overrides) -> dict:
    results = finish(launch(workdir, cache, processes, devices, *overrides))
    for code, stdout, stderr in results:
        assert code == 0, stdout + stderr[-3000:]
    return json.loads((workdir / "summary.json").read_text())


def losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist1d_dir):
    """The uninterrupted 2 x 2 run."""
    work = tmp_path_factory.mktemp("mp") / "reference"
    return work, run(work, mnist1d_dir, 2, 2)


# --------------------------------------------------------------------------- the audit's arithmetic
def test_audit_hashes_of_slices_add_up_to_the_whole_batch():
    rng = np.random.default_rng(0)
    idx, x, y = rng.permutation(1000)[:64], rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
    pos = np.arange(64)
    whole = audit.batch_hashes(pos, idx, [x, y])
    parts = [audit.batch_hashes(pos[s], idx[s], [x[s], y[s]]) for s in (slice(0, 16), slice(16, 40), slice(40, 64))]
    assert tuple(sum(p[k] for p in parts) % 2**64 for k in (0, 1)) == whole
    swapped = idx.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # the same records in another order is other data
    assert audit.batch_hashes(pos, swapped, [x, y])[0] != whole[0]
    x2 = x.copy()
    x2[7, 5] = np.nextafter(x2[7, 5], np.float32(np.inf))  # one bit of one value
    assert audit.batch_hashes(pos, idx, [x2, y]) == (whole[0], audit.batch_hashes(pos, idx, [x2, y])[1])
    assert audit.batch_hashes(pos, idx, [x2, y])[1] != whole[1]


def test_audit_names_the_first_step_that_differs(tmp_path, capsys):
    for run_dir, bad in (("a", None), ("b", 7)):
        os.makedirs(tmp_path / run_dir / "audit")
        for proc in range(2):
            rows = [{"step": s, "of": 2, "indices": f"{s * 10 + proc:016x}",
                     "data": f"{(s + (proc if s == bad else 0)):016x}"} for s in range(1, 11)]
            (tmp_path / run_dir / "audit" / f"process-{proc}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert audit.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert capsys.readouterr().out.strip() == "step 7: the runs read different bytes (same record indices: the data changed)"
    assert audit.main([str(tmp_path / "a"), str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.strip() == "identical data at all 10 common steps (1..10)"
    assert audit.main([str(tmp_path / "a"), str(tmp_path / "none")]) == 2
    assert "no audit/process-*.jsonl (was the run trained with train.audit=true?)" in capsys.readouterr().err


def test_an_incomplete_launch_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "trainers.run", MLP, "--workdir", str(tmp_path), "--coordinator",
                          "127.0.0.1:1234", "--num-processes", "2"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: a multi-process run needs all three of --coordinator HOST:PORT, --num-processes N and --process-id I "
        "(or --distributed, to let JAX detect SLURM / Open MPI / TPU pods)")


# --------------------------------------------------------------------------- 2 processes x 2 devices
@pytest.mark.slow
def test_two_processes_write_one_run(reference):
    work, summary = reference
    assert summary["steps"] == STEPS and summary["devices"] == 4
    assert sorted(os.listdir(work / "audit")) == ["process-0.jsonl", "process-1.jsonl"]
    assert sorted(losses(work)) == list(range(10, STEPS + 1, 10))  # one metrics file, one row per log step
    assert sorted(int(s) for s in os.listdir(work / "checkpoints")) == [40, 50, 60]
    assert len(audit.global_hashes(str(work))) == STEPS


@pytest.mark.slow
def test_a_killed_process_is_reported_and_the_restarted_run_ends_bit_identical(tmp_path, mnist1d_dir, reference):
    ref_dir, ref = reference
    work = tmp_path / "killed"
    procs = launch(work, mnist1d_dir, 2, 2, "train.log_every=1")
    kill_at = int(np.random.default_rng().integers(15, 45))
    deadline = time.time() + 240
    while time.time() < deadline:  # the step process 0 has logged
        try:
            done = max(losses(work), default=0)
        except (FileNotFoundError, ValueError):
            done = 0
        if done >= kill_at:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    t = time.time()
    (code0, _, err0), (code1, _, _) = finish(procs, timeout=60)
    waited = time.time() - t
    assert code1 == -signal.SIGKILL
    assert code0 == 3, err0[-2000:]
    assert "error: process 1 of 2 stopped responding (no heartbeat for" in err0
    assert "Start every process again with the same command (without --fresh) to resume from the last checkpoint." in err0
    assert waited < 30  # --lost-after 5: bounded, not JAX's 100 s heartbeat or a hang

    summary = run(work, mnist1d_dir, 2, 2, "train.log_every=1")
    assert summary["params_sha256"] == ref["params_sha256"]
    assert audit.compare(str(work), str(ref_dir))[0] is None


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["error", "ctrl-c"])
def test_a_failing_process_ends_the_others_at_once(tmp_path, mnist1d_dir, fault):
    """An exception or Ctrl-C in one process: it tells the others, who stop at once naming it (not after
    --lost-after, nor after JAX's 5-minute shutdown barrier)."""
    extra = ["data.source=tests.custom_model:FailsInProcessOne"] if fault == "error" else ["train.steps=100000"]
    procs = launch(tmp_path / "run", mnist1d_dir, 2, 2, *extra, lost_after=120)
    if fault == "ctrl-c":
        deadline = time.time() + 240
        while not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text():
            assert time.time() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGINT)
    (code0, _, err0), (code1, _, err1) = finish(procs, timeout=100)
    why = "injected read error" if fault == "error" else "interrupted (Ctrl-C)"
    assert code1 == (1 if fault == "error" else 130), err1[-2000:]
    assert f"[process 1/2] error: {why}" in err1
    assert code0 == 3, err0[-2000:]
    assert f"error: process 1 of 2 failed: {why}; process 0 stops at step" in err0


@pytest.mark.slow
def test_a_lost_coordinator_ends_the_others_at_once(tmp_path, mnist1d_dir):
    procs = launch(tmp_path / "run", mnist1d_dir, 2, 2, "train.steps=100000", "train.checkpoint_every=0")
    time.sleep(1)
    deadline = time.time() + 240
    while not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text():
        assert time.time() < deadline
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGKILL)
    t = time.time()
    (_, _, _), (code1, _, err1) = finish(procs, timeout=60)
    assert time.time() - t < 30
    # JAX's own error polling sees the coordinator's socket close and ends the process at once (SIGABRT),
    # before our watchdog's next beat can: its message is the one to expect. Ours is the fallback.
    if code1 == -signal.SIGABRT:
        assert "Either the leader task was preempted/died/restarted unexpectedly" in err1, err1[-2000:]
    else:
        assert code1 == 3, err1[-2000:]
        assert "error: the coordinator (process 0 of 2) no longer answers" in err1


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [((2, 2), (1, 4)), ((1, 4), (2, 2))], ids=["2x2-to-1x4", "1x4-to-2x2"])
def test_elastic_resume_reads_the_same_global_batches(tmp_path, mnist1d_dir, reference, first, then):
    ref_dir, ref = reference
    work = tmp_path / "elastic"
    run(work, mnist1d_dir, *first, "train.steps=30")
    summary = run(work, mnist1d_dir, *then)
    assert summary["steps"] == STEPS and summary["devices"] == 4
    step, report = audit.compare(str(work), str(ref_dir))
    assert step is None and report == f"identical data at all {STEPS} common steps (1..{STEPS})"
    # Not bit-exact across process counts: the gradient mean over 4 devices is summed in another order
    # (within one process, or across two through gloo). Same data, so the runs stay within rounding.
    ours, theirs = losses(work), losses(ref_dir)
    assert sorted(ours) == sorted(theirs)
    np.testing.assert_allclose([ours[s] for s in sorted(ours)], [theirs[s] for s in sorted(theirs)], rtol=1e-4)
