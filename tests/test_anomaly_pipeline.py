"""AXOL1TL's pipeline as configured stages: prepare (cached), models with precision and QAT, losses,
then scores -> plots -> storage -> report, one command, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from trainers.anomaly.prepare import PrepareError, fit_normalization, normalize, prepare_dataset, quantize, saturate
from trainers.config import ConfigError, PrepareConfig, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANOMALY = os.path.join(ROOT, "configs", "anomaly_vae.yaml")


def _raw(path, n=500, features=6, seed=0, nan_at=None):
    """A raw event file as a physics group would write it: gzip-compressed, odd chunks, float64."""
    import h5py

    rng = np.random.default_rng(seed)
    x = rng.exponential(20.0, size=(n, features)) * rng.choice([-1, 1], size=(n, features))
    if nan_at is not None:
        x[nan_at] = np.nan
    y = rng.integers(0, 5, n)
    with h5py.File(path, "w") as f:
        f.create_dataset("events", data=x, chunks=(37, 5 if features > 5 else features), compression="gzip",
                         compression_opts=4, shuffle=True)
        f.create_dataset("label", data=y, chunks=(53,), compression="gzip")
    return x, y


def _cfg(source, **kw):
    base = {"source": str(source), "features": "events", "labels": "label", "signals": {"three": [3]},
            "split": [0.5, 0.2, 0.3], "saturation": {"maxima": [40.0] * 6, "flag": True},
            "normalization": "standard", "quantization": {"total_bits": 16, "integer_bits": 6}}
    base.update(kw)
    return PrepareConfig(**base)


def _read(path):
    import h5py

    with h5py.File(path) as f:
        return {k: f[k][()] for k in f}


# --------------------------------------------------------------------------- prepare
def test_prepare_selects_splits_and_transforms_exactly(tmp_path):
    x, y = _raw(tmp_path / "raw.h5")
    sig_x, _ = _raw(tmp_path / "other.h5", n=70, seed=1)
    cfg = _cfg(tmp_path / "raw.h5", signals={"three": [3], "other": str(tmp_path / "other.h5")})
    p = prepare_dataset(cfg, str(tmp_path / "cache"), progress=False)
    assert not p.cached and sorted(p.signals) == ["other", "three"]
    bg_rows = np.flatnonzero(y != 3)
    n = len(bg_rows)
    order = np.random.default_rng(0).permutation(n)
    train_rows = bg_rows[order[: int(n * 0.5)]]
    assert p.constants["events"] == {"train": int(n * 0.5), "validation": int(n * 0.2), "test": int(n * 0.3),
                                     "signal-three": int((y == 3).sum()), "signal-other": 70}
    train = _read(p.train)
    np.testing.assert_array_equal(train["row"], train_rows)
    sat, hits = saturate(x[train_rows], 40.0, flag=True)
    stats = fit_normalization(sat)  # from the training split only
    np.testing.assert_array_equal(train["x"], quantize(normalize(sat, stats), 16, 6))
    np.testing.assert_array_equal(train["saturated"], hits.sum(axis=1))
    np.testing.assert_array_equal(train["x_raw"], x[train_rows])
    np.testing.assert_allclose(p.constants["normalization"]["offset"], stats["offset"])
    test = _read(p.test)
    assert not set(test["row"]) & set(train_rows) and set(test["row"]) <= set(bg_rows)
    np.testing.assert_array_equal(test["x"], quantize(normalize(saturate(x[test["row"]], 40.0), stats), 16, 6))
    other = _read(p.signals["other"])
    np.testing.assert_array_equal(other["row"], np.arange(70))
    np.testing.assert_array_equal(other["x"], quantize(normalize(saturate(sig_x, 40.0), stats), 16, 6))
    three = _read(p.signals["three"])
    np.testing.assert_array_equal(three["row"], np.flatnonzero(y == 3))
    # values sit on the <16, 6> grid: multiples of 2**-10
    assert np.all(train["x"] * 1024 == np.round(train["x"] * 1024))
    with open(os.path.join(p.folder, "constants.json")) as f:
        assert json.load(f)["quantization"] == {"total_bits": 16, "integer_bits": 6}


def test_prepare_reads_webdataset_shards_as_it_reads_hdf5(tmp_path):
    import webdataset as wds

    x, y = _raw(tmp_path / "raw.h5")
    os.makedirs(tmp_path / "shards")
    with wds.ShardWriter(str(tmp_path / "shards" / "events-%04d.tar"), maxcount=120, verbose=0) as sink:
        for i in range(len(x)):
            sink.write({"__key__": f"event{i:06d}", "x.npy": x[i], "y.cls": int(y[i])})
    from_h5 = prepare_dataset(_cfg(tmp_path / "raw.h5"), str(tmp_path / "cache"), progress=False)
    from_tar = prepare_dataset(_cfg(str(tmp_path / "shards" / "events-{0000..0004}.tar"), features="x.npy", labels="y.cls"),
                               str(tmp_path / "cache"), progress=False)
    assert from_tar.folder != from_h5.folder and from_tar.constants["events"] == from_h5.constants["events"]
    for a, b in [(from_h5.train, from_tar.train), (from_h5.test, from_tar.test),
                 (from_h5.signals["three"], from_tar.signals["three"])]:
        ra, rb = _read(a), _read(b)
        np.testing.assert_array_equal(ra["x"], rb["x"])
        np.testing.assert_array_equal(ra["row"], rb["row"])  # a sample's index in shard order is its row
    with pytest.raises(PrepareError, match=r"prepare\.source .*events-\{0000\.\.0004\}\.tar'"):
        prepare_dataset(_cfg(str(tmp_path / "shards" / "events-{0000..0004}.tar"), features="x.npz", labels="y.cls"),
                        str(tmp_path / "cache"), progress=False)


def test_prepare_is_cached_by_its_inputs_and_settings(tmp_path, monkeypatch):
    from trainers.anomaly import prepare as stage

    _raw(tmp_path / "raw.h5")
    first = prepare_dataset(_cfg(tmp_path / "raw.h5"), str(tmp_path / "cache"), progress=False)

    def no_reading(*args, **kwargs):
        raise AssertionError("a cached preparation read the raw data")

    with monkeypatch.context() as m:
        m.setattr(stage, "_read_dataset", no_reading)
        again = prepare_dataset(_cfg(tmp_path / "raw.h5"), str(tmp_path / "cache"), progress=False)
    assert again.cached and again.folder == first.folder
    robust = prepare_dataset(_cfg(tmp_path / "raw.h5", normalization="robust"), str(tmp_path / "cache"), progress=False)
    assert not robust.cached and robust.folder != first.folder
    time.sleep(0.01)
    _raw(tmp_path / "raw.h5", seed=5)  # new raw data at the same path
    renewed = prepare_dataset(_cfg(tmp_path / "raw.h5"), str(tmp_path / "cache"), progress=False)
    assert not renewed.cached and renewed.folder != first.folder
    assert sorted(os.listdir(tmp_path / "cache" / "prepared")) == sorted(
        [".lock", *(os.path.basename(p.folder) for p in (first, robust, renewed))])  # no temporary folder left


@pytest.mark.parametrize(
    "change, message",
    [
        ({"features": "x"}, r"raw\.h5: no dataset 'x' for the features \(prepare\.features\) \(datasets in the file: "
                            r"\['events', 'label'\]\)"),
        ({"feature_names": ["pt", "eta"]}, r"^prepare\.feature_names lists 2 names; .*raw\.h5:events has 6 features per event"),
        ({"signals": {"../evil": [3]}}, r"^prepare\.signals: '\.\./evil' cannot name a signal"),
        ({"signals": {"seven": [7]}}, r"^prepare\.signals\.seven: no event of .*raw\.h5 has a 'label' value in \[7\] "
                                      r"\(values found: \[0, 1, 2, 3, 4\]\)"),
        ({"split": [0.8, 0.3, 0.1]}, r"^prepare\.split must be three positive fractions"),
        ({"saturation": {"maxima": [1.0, 2.0]}}, r"^prepare\.saturation\.maxima has 2 values for 6 features$"),
        ({"quantization": {"bits": 8}}, r"^prepare\.quantization must be \{total_bits: N, integer_bits: M\}"),
    ],
)
def test_prepare_refuses_bad_settings_clearly(tmp_path, change, message):
    _raw(tmp_path / "raw.h5")
    with pytest.raises(PrepareError, match=message):
        prepare_dataset(_cfg(tmp_path / "raw.h5", **change), str(tmp_path / "cache"), progress=False)


def test_prepare_refuses_nan_and_mismatched_signal_files(tmp_path):
    _raw(tmp_path / "raw.h5", nan_at=(17, 4))
    nan = r"raw\.h5:events holds 1 NaN or infinite value\(s\) \(first: event 17, feature 4: nan\)"
    with pytest.raises(PrepareError, match=nan):
        prepare_dataset(_cfg(tmp_path / "raw.h5"), str(tmp_path / "cache"), progress=False)
    _raw(tmp_path / "good.h5")
    _raw(tmp_path / "narrow.h5", features=5)
    with pytest.raises(PrepareError, match=r"narrow\.h5:events: signal 'narrow' events have shape \(5,\), the "
                                           r"background's \(6,\) \(the feature lists do not match\)"):
        prepare_dataset(_cfg(tmp_path / "good.h5", signals={"narrow": str(tmp_path / "narrow.h5")}),
                        str(tmp_path / "cache"), progress=False)
    assert not os.path.exists(tmp_path / "cache" / "prepared" / "DONE")


def test_pipeline_settings_are_checked_before_any_work(tmp_path):
    from trainers.anomaly.pipeline import check_pipeline

    with pytest.raises(ConfigError, match=r"^anomaly\.enabled needs a prepare section"):
        check_pipeline(load_config(None, ["anomaly.enabled=true"]))
    with pytest.raises(ConfigError, match=r"^prepare\.source gives the training data; leave data\.train unset$"):
        check_pipeline(load_config(ANOMALY, ["data.train=x.h5"]))
    with pytest.raises(ConfigError, match=r"^anomaly\.scores: unknown score 'recon'"):
        check_pipeline(load_config(ANOMALY, ["anomaly.scores=[recon]"]))
    with pytest.raises(ConfigError, match=r"anomaly\.rates_khz must be rates above 0 and at most"):
        check_pipeline(load_config(ANOMALY, ["anomaly.rates_khz=[50000]"]))


# --------------------------------------------------------------------------- models and losses
def test_encoder_decoder_configs_precision_and_mirroring():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from trainers.models import VAE, AutoEncoder, build_model

    vae = build_model("vae", {"latent": 3, "encoder": {"nodes": [28, 64, 128]}}, (57,), 0)
    assert isinstance(vae, VAE)
    assert [layer.kernel.shape for layer in vae.encoder] == [(57, 28), (28, 64), (64, 128)]
    assert vae.mean.kernel.shape == (128, 3)
    assert [layer.kernel.shape for layer in vae.decoder] == [(3, 128), (128, 64), (64, 28), (28, 57)]  # mirrored
    own = build_model("vae", {"latent": 3, "encoder": {"nodes": [16]}, "decoder": {"nodes": [8, 32], "activation": "tanh"}},
                      (10,), 0)
    assert [layer.kernel.shape for layer in own.decoder] == [(3, 8), (8, 32), (32, 10)]
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 10))
    full = build_model("autoencoder", {"latent": 2, "encoder": {"nodes": [16]}}, (10,), 0)
    half = build_model("autoencoder", {"latent": 2, "encoder": {"nodes": [16], "dtype": "bfloat16"}}, (10,), 0)
    a, b = full(x)["recon"], half(x)["recon"]
    assert a.dtype == b.dtype == jnp.float32  # outputs in float32 whatever the parts compute in
    assert not np.array_equal(a, b) and np.allclose(a, b, atol=0.1)  # bf16 arithmetic: close, not equal
    assert isinstance(full, AutoEncoder)
    with pytest.raises(ValueError, match=r"vae\.encoder\.dtype 'float8' is not one of"):
        build_model("vae", {"encoder": {"dtype": "float8"}}, (10,), 0)
    with pytest.raises(ValueError, match=r"vae\.decoder has unknown settings \['width'\]"):
        build_model("vae", {"decoder": {"width": 3}}, (10,), 0)


def test_quantization_aware_training_has_straight_through_gradients():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from trainers.models import build_model, fake_quant

    x = jnp.array([0.0156, 0.0157, 10.0, -10.0, 1.04])
    np.testing.assert_array_equal(fake_quant(x, 8, 3), quantize(np.asarray(x), 8, 3))  # the same grid as the data's
    grad = jax.grad(lambda v: fake_quant(v, 8, 3).sum())(x)
    np.testing.assert_array_equal(grad, [1, 1, 0, 0, 1])  # identity inside the range, zero where it saturates
    q = {"total_bits": 8, "integer_bits": 3}
    model = build_model("vae", {"latent": 2, "encoder": {"nodes": [8], "quant": q}}, (6,), 0)
    out = model(jax.random.normal(jax.random.PRNGKey(1), (5, 6)))
    for k in ("mean", "logvar", "recon"):  # the decoder mirrors the encoder's quantization too
        assert np.all(np.asarray(out[k]) * 32 == np.round(np.asarray(out[k]) * 32)), k


def test_reconstruction_losses_weights_and_beta_warmup():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    from trainers.losses import beta_at, build_loss

    outputs = {"recon": jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), "mean": jnp.zeros((2, 2)),
               "logvar": jnp.zeros((2, 2))}
    batch = {"x": jnp.array([[1.0, 0.0, 4.0], [1.0, 1.0, 1.0]])}
    loss, m = build_loss("vae", {"reconstruction": "mae", "feature_weights": [1.0, 0.0, 2.0]})(outputs, batch)
    assert float(m["recon"]) == pytest.approx(((0 + 0 + 2) + (1 + 0 + 2)) / 2) and float(m["kl"]) == 0.0
    loss, m = build_loss("reconstruction", {})(outputs, batch)
    assert float(loss) == pytest.approx(((0 + 4 + 1) + 3) / 2)
    assert [float(beta_at(s, 1.0, 0.2, 100)) for s in (0, 50, 100, 500)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert beta_at(None, 1.0, 0.2, 100) == 1.0  # evaluation: beta itself
    warm = build_loss("vae", {"beta": 1.0, "beta_warmup_steps": 10})
    outputs["mean"] = jnp.ones((2, 2))
    _, at0 = warm(outputs, batch, step=jnp.int32(0))
    _, at5 = warm(outputs, batch, step=jnp.int32(5))
    assert float(at0["loss"]) == float(at0["recon"]) and float(at5["beta"]) == 0.5
    with pytest.raises(ValueError, match=r"^loss 'vae' does not take these arguments \{'gamma': 1\}"):
        build_loss("vae", {"gamma": 1})


# --------------------------------------------------------------------------- the whole pipeline
SHORT = ["train.steps=600", "train.eval_every=300", "train.checkpoint_every=300", "train.log_every=50",
         "schedule.warmup_steps=50", "schedule.cycle_steps=200", "loss.kwargs.beta_warmup_steps=100"]


def test_one_command_runs_every_stage_and_the_report_command_rescores(tmp_path, mnist1d_dir):
    pytest.importorskip("jax")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    import shutil

    import trainers
    from trainers.anomaly.report import find_chromium
    from trainers.anomaly.store import load

    browser = find_chromium() is not None and shutil.which("pdfinfo") is not None  # CI installs both
    work = tmp_path / "run"
    overrides = {"data": {"cache_dir": mnist1d_dir}, "anomaly": {"pdf": browser}}
    config = load_config(ANOMALY, SHORT)
    summary = trainers.main(config.to_dict(), overrides, workdir=str(work), progress=False)
    assert summary["steps"] == 600 and set(summary["anomaly"]["best_auc"]) == {"digit_8", "digit_9"}
    assert set(summary["stages"]) >= {"prepare_s", "train_s", "scores_s", "plots_s", "store_s", "report_s"}
    results = json.loads((work / "results.json").read_text())
    assert results["step"] == 600
    assert set(results["tables"]) == {"reconstruction", "ad_score", "kl", "isolation_forest (baseline)"}
    complete, lite = load(str(work / "complete.h5")), load(str(work / "lite.h5"))
    assert complete["params_sha256"] == summary["params_sha256"] == lite["params_sha256"]
    assert lite["steps"] == 600 and 0 <= lite["data_wait_share"] < 1 and lite["events"]["test"] == 1200
    for kind, table in results["tables"].items():
        got = lite["results"][kind]
        np.testing.assert_array_equal(got["thresholds"], table["thresholds"])
        for name, s in table["signals"].items():
            assert got["signals"][name]["auc"] == s["auc"]
    # every event of the test split and of each signal is scored: 1200 background, 500 of each digit
    assert {k: v.shape for k, v in complete["scores"]["reconstruction"].items()} == {
        "background": (1200,), "digit_8": (500,), "digit_9": (500,)}
    assert complete["preprocessing"]["quantization"]["total_bits"] == 16
    assert complete["history"]["step"][-1] == 600 and "weights" in complete
    page = (work / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 8  # 4 score kinds, efficiency, ROC, training, inputs
    assert summary["params_sha256"] in page and "isolation_forest (baseline)" in page
    if browser:  # the run printed its report to PDF with headless Chromium
        info = subprocess.run(["pdfinfo", str(work / "report.pdf")], capture_output=True, text=True, check=True).stdout
        assert 2 <= int(info.split("Pages:")[1].split()[0]) <= 12
    assert sorted(os.listdir(work / "plots")) == [
        "efficiency.png", "inputs.png", "roc.png", "scores_ad_score.png", "scores_isolation_forest_baseline.png",
        "scores_kl.png", "scores_reconstruction.png", "training.png"]

    # python -m trainers.report: any checkpoint of the finished run, scored again
    out = subprocess.run([sys.executable, "-m", "trainers.report", str(work), "--step", "300", "--no-pdf",
                          "anomaly.scores=[reconstruction]", "anomaly.baselines=[]"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "checkpoint 300: best ROC AUC per signal: digit_8 " in out.stdout
    again = json.loads((work / "results.json").read_text())
    assert again["step"] == 300 and set(again["tables"]) == {"reconstruction"}
    assert again["tables"]["reconstruction"] != results["tables"]["reconstruction"]  # other weights, other scores
    bad = subprocess.run([sys.executable, "-m", "trainers.report", str(work), "--step", "7", "--no-pdf"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 1 and "no checkpoint at step 7 (there are: [300, 600])" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "trainers.report", str(work), "train.steps=5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "only anomaly.* settings can change" in bad.stderr


@pytest.mark.slow
def test_pipeline_killed_during_training_resumes_bit_exact(tmp_path, mnist1d_dir):
    pytest.importorskip("jax")
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "trainers.run", ANOMALY, *SHORT, "train.steps=1500", "train.checkpoint_every=250",
           f"data.cache_dir={mnist1d_dir}", "anomaly.pdf=false", "anomaly.baselines=[]", "--no-progress"]
    env = {**os.environ, "TANDEM_CACHE_DIR": str(tmp_path / "cache")}
    whole = subprocess.run([*cmd, "--workdir", str(tmp_path / "whole")], capture_output=True, text=True, cwd=ROOT,
                           timeout=600, env=env)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen([*cmd, "--workdir", str(tmp_path / "killed")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    ckpt = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt / "500").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists()  # killed during training
    resumed = subprocess.run([*cmd, "--workdir", str(tmp_path / "killed")], capture_output=True, text=True, cwd=ROOT,
                             timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert a["params_sha256"] == b["params_sha256"]
    ra = json.loads((tmp_path / "whole" / "results.json").read_text())
    rb = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert ra == rb  # the same scores, thresholds, efficiencies and AUCs
