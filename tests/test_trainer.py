"""The trainer: devices, compilation, outputs, errors, and bit-for-bit resume after SIGKILL / SIGTERM."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("jax")
pytest.importorskip("grain")
pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = os.path.join(ROOT, "configs", "mnist1d_mlp.yaml")


def env(devices: int = 1) -> dict[str, str]:
    out = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return out


def command(workdir, cache, *overrides, config=MLP):
    return [sys.executable, "-m", "trainers.run", config, f"data.cache_dir={cache}", *overrides,
            "--workdir", str(workdir), "--no-progress"]


def run(workdir, cache, *overrides, devices=1, config=MLP, check=True):
    out = subprocess.run(command(workdir, cache, *overrides, config=config), capture_output=True, text=True,
                         env=env(devices), cwd=ROOT, timeout=600)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def summary(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def test_parallel_step_on_1_and_4_devices():
    """Parameters are identical on every device after a step, and the step traces once."""
    code = textwrap.dedent(
        """
        import jax, numpy as np
        from trainers import parallel
        from trainers.config import OptimizerConfig, ScheduleConfig
        from trainers.losses import build_loss
        from trainers.models import build_model
        from trainers.train import initial_state, make_optimizer, make_schedule, make_train_step
        traces = []
        def counting_loss(outputs, batch):  # Python runs only while JAX traces the step
            traces.append(1)
            return build_loss("cross_entropy", {})(outputs, batch)
        for n in (1, 4):
            traces.clear()
            devices = parallel.local_devices(n)
            tx = make_optimizer(OptimizerConfig(name="adam"), make_schedule(ScheduleConfig(lr=1e-2), 10))
            graphdef, state = initial_state(build_model("mlp", {}, (40,), 0), tx, 0)
            state = parallel.replicate(state, devices)
            step = parallel.pmapped(make_train_step(graphdef, tx, counting_loss, True), devices, donate=(0,))
            rng = np.random.default_rng(0)
            for _ in range(3):  # every device gets different data
                batch = {"x": rng.normal(size=(n, 8, 40)).astype(np.float32), "y": rng.integers(0, 10, (n, 8))}
                state, metrics = step(state, batch)
            leaves = jax.tree.leaves(jax.device_get(state["params"]))
            same = all(np.array_equal(leaf[i], leaf[0]) for leaf in leaves for i in range(n))
            print(n, len(traces), same, int(state["step"][0]), len(leaves[0]))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(4), cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["1 1 True 3 1", "4 1 True 3 4"]


def test_run_writes_outputs_and_trains_on_4_devices(tmp_path, mnist1d_dir):
    work = tmp_path / "run"
    run(work, mnist1d_dir, "train.steps=60", "train.eval_every=30", "train.checkpoint_every=20",
        "train.log_every=10", "train.devices=4", "train.keep_checkpoints=2", devices=4)
    s = summary(work)
    assert s["steps"] == 60 and s["devices"] == 4 and 0.0 <= s["accuracy"] <= 1.0
    assert len(s["params_sha256"]) == 64 and set(s["eval"]) == {"eval_loss", "eval_accuracy"}
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lr" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "accuracy", "lr", "samples_per_s", "data_wait_share"} <= set(train_rows[0])
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [30, 60]
    assert sorted(os.listdir(work / "checkpoints")) == ["40", "60"]  # the last 2 kept
    config = (work / "config.yaml").read_text()
    assert "devices: 4" in config and "steps: 60" in config
    ckpt = work / "checkpoints" / "60"
    assert json.loads((ckpt / "config" / "metadata").read_text())["train"]["devices"] == 4
    assert json.loads((ckpt / "loader" / "metadata").read_text())["step"] == 60
    assert "jax" in json.loads((ckpt / "versions" / "metadata").read_text())


def test_user_source_by_import_path(tmp_path, mnist1d_dir):
    from trainers.config import load_config
    from trainers.train import train_and_evaluate

    config = load_config(MLP, [f"data.cache_dir={mnist1d_dir}", "data.source=tests.custom_model:ScaledH5",
                               "train.steps=3", "train.eval_every=0"])
    assert train_and_evaluate(config, str(tmp_path / "run"), progress=False)["steps"] == 3


def test_user_model_and_loss_by_import_path(tmp_path, mnist1d_dir):
    run(tmp_path / "user", mnist1d_dir, "model.name=tests.custom_model:Linear", "model.kwargs=!replace {classes: 10}",
        "loss.name=tests.custom_model:squared_hinge", "train.steps=30", "train.eval_every=1000")
    s = summary(tmp_path / "user")
    assert set(s["eval"]) == {"eval_loss", "eval_accuracy"} and s["steps"] == 30
    out = run(tmp_path / "bad", mnist1d_dir, "model.name=tests.custom_model:Nope", "train.steps=3", check=False)
    assert out.returncode == 1 and "'tests.custom_model' has no attribute 'Nope'" in out.stderr


def test_built_in_models_losses_and_schedules():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from trainers.config import ScheduleConfig
        from trainers.losses import build_loss
        from trainers.models import build_model
        from trainers.train import make_schedule
        key = jax.random.PRNGKey(0)
        cases = [("mlp", {}, (40,)), ("cnn1d", {}, (40,)), ("cnn2d", {"channels_first": True}, (3, 8, 8)),
                 ("autoencoder", {}, (40,)), ("vae", {}, (40,))]
        for name, kwargs, shape in cases:
            out = build_model(name, kwargs, shape, 0)(jnp.ones((2, *shape)), rng=key)
            print(name, {k: out[k].shape for k in sorted(out)} if isinstance(out, dict) else out.shape)
        batch = {"x": jnp.ones((4, 40)), "y": jnp.array([1, 2, 3, 4]), "_valid": jnp.array([1, 1, 1, 0], bool)}
        logits = jnp.zeros((4, 10)).at[:, 1].set(5.0)
        ce = build_loss("cross_entropy", {})(logits, batch)[1]
        print("ce", {k: round(float(ce[k]), 4) for k in sorted(ce)})
        print("mse", float(build_loss("mse", {})({"recon": jnp.zeros((4, 40))}, batch)[0]))
        vae = {"recon": jnp.ones((4, 40)), "mean": jnp.zeros((4, 2)), "logvar": jnp.zeros((4, 2))}
        v = build_loss("vae", {"beta": 2.0})(vae, batch)[1]
        print("vae", {k: float(v[k]) for k in sorted(v)})
        s = make_schedule(ScheduleConfig(name="cosine_restarts", lr=1.0, warmup_steps=10, cycle_steps=100,
                                         cycle_mult=2.0, peak_decay=0.5), 1000)
        print("restarts", [round(float(s(t)), 3) for t in (0, 5, 10, 60, 109, 110, 310)])
        w = make_schedule(ScheduleConfig(name="warmup_cosine", lr=1.0, warmup_steps=10, end_factor=0.1), 110)
        print("cosine", [round(float(w(t)), 3) for t in (0, 10, 60, 110)])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "mlp (2, 10)",
        "cnn1d (2, 10)",
        "cnn2d (2, 10)",
        "autoencoder {'latent': (2, 8), 'recon': (2, 40)}",
        "vae {'logvar': (2, 4), 'mean': (2, 4), 'recon': (2, 40)}",
        # the padded 4th record is left out of every mean: 1 of 3 real labels is 1
        "ce {'accuracy': 0.3333, 'loss': 3.3922}",  # (0.0588 + 2 x 5.0588) / 3
        "mse 1.0",
        "vae {'kl': 0.0, 'loss': 0.0, 'recon': 0.0}",
        "restarts [0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 0.25]",
        "cosine [0.0, 1.0, 0.55, 0.1]",
    ]


def test_vae_reports_its_loss_terms(tmp_path, mnist1d_dir):
    config = os.path.join(ROOT, "configs", "mnist1d_vae.yaml")
    out = run(tmp_path / "vae", mnist1d_dir, "train.steps=40", "train.eval_every=20", config=config)
    s = summary(tmp_path / "vae")
    assert set(s["eval"]) == {"eval_loss", "eval_recon", "eval_kl"} and s["accuracy"] is None
    assert abs(s["eval"]["eval_loss"] - s["eval"]["eval_recon"] - s["eval"]["eval_kl"]) < 1e-3
    assert "eval_kl" in out.stdout


def test_non_finite_loss_names_the_step(tmp_path, mnist1d_dir):
    out = run(tmp_path / "nan", mnist1d_dir, "optimizer.name=sgd", "optimizer.kwargs=!replace {}", "schedule.lr=1e30",
              "train.steps=50", check=False)
    assert out.returncode == 1
    assert "error: non-finite loss" in out.stderr and "at step " in out.stderr


def test_config_errors_exit_2(tmp_path, mnist1d_dir):
    out = run(tmp_path / "x", mnist1d_dir, "train.stpes=3", check=False)
    assert out.returncode == 2 and "did you mean train.'steps'?" in out.stderr
    out = run(tmp_path / "x", mnist1d_dir, "data.batch_size=30", "train.devices=4", devices=4, check=False)
    assert out.returncode == 1 and "do not split over 4 local devices" in out.stderr


# --------------------------------------------------------------------------- resume
RESUME = ["train.steps=1500", "train.checkpoint_every=25", "train.eval_every=500", "train.log_every=25",
          "data.batch_size=64"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mnist1d_dir):
    work = tmp_path_factory.mktemp("reference")
    run(work, mnist1d_dir, *RESUME)
    return summary(work)["params_sha256"]


def _wait_for_checkpoint(work, proc, timeout=120.0):
    deadline = time.monotonic() + timeout
    ckpts = os.path.join(work, "checkpoints")
    while time.monotonic() < deadline:
        if os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts)):
            return
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
@pytest.mark.parametrize("adapter,workers", [("grain", 0), ("grain", 2), ("torch", 0), ("torch", 2)])
def test_sigkill_then_same_command_ends_with_the_same_weights(tmp_path, mnist1d_dir, uninterrupted, adapter, workers):
    work = tmp_path / "killed"
    cmd = command(work, mnist1d_dir, *RESUME, f"data.adapter={adapter}", f"data.workers={workers}")
    # its own process group, so the kill takes its data workers too, as a preempted job's would
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
                            start_new_session=True)
    _wait_for_checkpoint(work, proc)
    delay = random.Random().uniform(0.0, 1.5)
    time.sleep(delay)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    log = proc.communicate(timeout=60)[0].decode()
    assert killed, f"the run finished before the kill ({delay:.2f} s after its first checkpoint)\n{log}"
    assert not os.path.exists(work / "summary.json")
    again = run(work, mnist1d_dir, *RESUME, f"data.adapter={adapter}", f"data.workers={workers}")
    assert "resumed from" in again.stdout
    assert summary(work)["params_sha256"] == uninterrupted, f"killed {delay:.2f} s after the first checkpoint"


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_resumes(tmp_path, mnist1d_dir, uninterrupted):
    work = tmp_path / "term"
    cmd = command(work, mnist1d_dir, *RESUME, "train.checkpoint_every=1000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env(), cwd=ROOT, text=True)
    deadline = time.monotonic() + 120
    while not (work / "metrics.jsonl").exists() or not (work / "metrics.jsonl").read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    assert "SIGTERM: saved a checkpoint at step" in log
    step = int(log.split("saved a checkpoint at step ")[1].split(";")[0])
    assert 0 < step < 1500 and os.listdir(work / "checkpoints") == [str(step)]
    again = run(work, mnist1d_dir, *RESUME, "train.checkpoint_every=1000")
    assert f"at step {step}" in again.stdout
    assert summary(work)["params_sha256"] == uninterrupted


def test_fresh_flag_starts_over(tmp_path, mnist1d_dir):
    work = tmp_path / "fresh"
    run(work, mnist1d_dir, "train.steps=20", "train.checkpoint_every=10")
    again = run(work, mnist1d_dir, "train.steps=30", "train.checkpoint_every=10")
    assert "resumed from" in again.stdout and "at step 20" in again.stdout
    cmd = command(work, mnist1d_dir, "train.steps=20", "train.checkpoint_every=10") + ["--fresh"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "resumed" not in out.stdout
    assert summary(work)["steps"] == 20


@pytest.mark.parametrize("shuffle", ["full", "block", "none"])
@pytest.mark.parametrize("source", ["h5", "h5_cached", "tar"])
def test_every_source_shuffle_and_adapter_trains(tmp_path, mnist1d_dir, source, shuffle):
    """Every combination the schema accepts trains (regression: h5_cached + block raised AttributeError),
    and both adapters feed the same batches: the same weights, bit for bit."""
    from trainers.config import load_config
    from trainers.train import train_and_evaluate

    shas = {}
    for adapter in ("grain", "torch"):
        config = load_config(MLP, [f"data.cache_dir={mnist1d_dir}", f"data.source={source}", f"data.shuffle={shuffle}",
                                   f"data.adapter={adapter}", "train.steps=4", "train.eval_every=0",
                                   "train.checkpoint_every=0", "train.log_every=2"])
        s = train_and_evaluate(config, str(tmp_path / adapter), progress=False)
        assert s["steps"] == 4 and 0.0 <= s["accuracy"] <= 1.0
        shas[adapter] = s["params_sha256"]
    assert shas["grain"] == shas["torch"]


def test_a_torch_run_needs_no_grain(tmp_path, mnist1d_dir):
    """The trainer imports only the adapter the config names (device feeding lives in adapters.jax)."""
    code = textwrap.dedent(
        f"""
        import sys
        from trainers.config import load_config
        from trainers.train import train_and_evaluate
        config = load_config({MLP!r}, ["data.cache_dir={mnist1d_dir}", "data.adapter=torch", "train.steps=2",
                                       "train.eval_every=0"])
        train_and_evaluate(config, {str(tmp_path / "run")!r}, progress=False)
        print(sorted(m for m in ("grain", "torch") if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "['torch']"
