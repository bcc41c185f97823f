"""AXOL1TL's stages as functions: exact thresholds, efficiencies, AUC (vs scikit-learn), preparation."""

import os
import re
import shutil

import numpy as np
import pytest

from trainers.anomaly.prepare import fit_normalization, normalize, quantize, saturate
from trainers.anomaly.scores import (
    LHC_RATE_KHZ,
    ad_score,
    efficiency,
    format_table,
    reconstruction_error,
    roc_auc,
    score_table,
    threshold_at_rate,
)


def test_threshold_lets_exactly_the_target_fraction_through():
    bg = np.arange(1000, dtype=float)  # scores 0..999
    # 10 kHz of 1000 kHz: 1% of 1000 events = 10 may pass: threshold is the 11th largest, 989
    t = threshold_at_rate(bg, 10, 1000)
    assert t == 989.0 and np.sum(bg > t) == 10
    assert threshold_at_rate(bg, 0.5, 1000) == 999.0  # less than one event: nothing passes
    assert threshold_at_rate(bg, 1000, 1000) == -np.inf  # everything passes
    rng = np.random.default_rng(0)
    scores = rng.exponential(size=100_000)
    for rate in (1, 3, 10):
        t = threshold_at_rate(scores, rate)
        assert np.sum(scores > t) == int(100_000 * rate / LHC_RATE_KHZ)
    with pytest.raises(ValueError, match=r"^target rate 0 kHz must be above 0 and at most the total 1000 kHz$"):
        threshold_at_rate(bg, 0, 1000)
    with pytest.raises(ValueError, match=r"^1 background score\(s\) are NaN or infinite$"):
        threshold_at_rate(np.r_[bg, np.nan], 10, 1000)


def test_ties_never_let_more_through():
    bg = np.r_[np.zeros(990), np.ones(10) * 5]  # the 10 top scores tie
    t = threshold_at_rate(bg, 5, 1000)  # 5 may pass, but they tie with 5 others: none pass
    assert np.sum(bg > t) == 0


def test_auc_equals_scikit_learn_with_ties():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    bg = np.round(rng.normal(size=3000), 1)  # rounded: many ties
    sig = np.round(rng.normal(0.7, 1.2, size=700), 1)
    labels = np.r_[np.zeros(bg.size), np.ones(sig.size)]
    assert roc_auc(bg, sig) == pytest.approx(sklearn.roc_auc_score(labels, np.r_[bg, sig]), abs=1e-12)
    assert roc_auc([0, 1], [2, 3]) == 1.0 and roc_auc([2, 3], [0, 1]) == 0.0 and roc_auc([1], [1]) == 0.5


def test_scores_and_table():
    mu = np.array([[1.0, 2.0], [0.0, 0.5]])
    np.testing.assert_array_equal(ad_score(mu), [5.0, 0.25])
    x, xh = np.array([[1.0, 2.0, 3.0]]), np.array([[1.0, 0.0, 4.0]])
    assert reconstruction_error(x, xh)[0] == pytest.approx(5 / 3)
    assert reconstruction_error(x, xh, "mae", weights=[0, 1, 1])[0] == pytest.approx(1.5)
    with pytest.raises(ValueError, match=r"^unknown reconstruction error 'huber' \(known: mse, mae\)$"):
        reconstruction_error(x, xh, "huber")
    bg = np.arange(1000, dtype=float)
    table = score_table(bg, {"heavy": np.array([995.0, 990.0, 10.0, 2.0])}, [10, 100], total_rate_khz=1000)
    assert table["thresholds"] == [989.0, 899.0]
    assert table["signals"]["heavy"]["efficiency"] == [0.5, 0.5] and efficiency([1, 2], 1.5) == 0.5
    text = format_table(table)
    assert "| heavy | 4 |" in text and "50.00%" in text and "eff @ 10 kHz" in text


def test_saturation_normalization_quantization():
    x = np.array([[5.0, -300.0], [1.0, 2.0]])
    clipped, flags = saturate(x, [4.0, 255.0], flag=True)
    np.testing.assert_array_equal(clipped, [[4.0, -255.0], [1.0, 2.0]])
    np.testing.assert_array_equal(flags, [[True, True], [False, False]])
    train = np.array([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])
    stats = fit_normalization(train)
    np.testing.assert_allclose(stats["offset"], [3.0, 7.0])
    np.testing.assert_allclose(stats["scale"], [np.sqrt(8 / 3), 1.0])  # a constant feature keeps scale 1
    np.testing.assert_allclose(normalize(np.array([[3.0, 7.0]]), stats), [[0.0, 0.0]])
    robust = fit_normalization(np.arange(101.0)[:, None], "robust")
    assert robust["offset"][0] == 50.0 and robust["scale"][0] == 50.0
    with pytest.raises(ValueError, match=r"event 1, feature 0"):
        fit_normalization(np.array([[1.0], [np.inf]]))
    # <8, 3>: step 1/32, range [-4, 4 - 1/32]
    np.testing.assert_array_equal(quantize([0.0156, 0.0157, 10.0, -10.0, 1.04], 8, 3),
                                  np.array([0.0, 1 / 32, 4 - 1 / 32, -4.0, 33 / 32], dtype=np.float32))
    np.testing.assert_array_equal(quantize([-1.0, 300.0], 8, 8, signed=False), np.array([0.0, 255.0], dtype=np.float32))


def test_each_plot_writes_a_png_that_is_not_blank(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from trainers.anomaly import plots

    rng = np.random.default_rng(0)
    bg, sig = rng.exponential(size=5000), rng.exponential(3.0, size=500)
    table = score_table(bg, {"resonance": sig}, [1, 10, 100])
    history = [{"step": s, "loss": 1 / (s + 1), "kl": 0.1 / (s + 1), "lr": 1e-3 * (1 + np.cos(s / 10)) / 2}
               for s in range(0, 200, 5)]
    paths = [
        plots.score_histograms(bg, {"resonance": sig}, str(tmp_path / "h.png"),
                               dict(zip([1, 10, 100], table["thresholds"], strict=True))),
        plots.efficiency_vs_rate(table, str(tmp_path / "e.png")),
        plots.roc_curves(bg, {"resonance": sig}, str(tmp_path / "r.png")),
        plots.training_curves(history, str(tmp_path / "t.png")),
        plots.input_distributions(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), str(tmp_path / "i.png")),
    ]
    for p in paths:
        pixels = np.asarray(Image.open(p).convert("L"))
        assert pixels.shape[0] > 200 and pixels.std() > 10, p  # drawn, not a blank canvas
    assert sorted(f.name for f in tmp_path.iterdir()) == ["e.png", "h.png", "i.png", "r.png", "t.png"]


def test_complete_and_lite_files_read_back(tmp_path):
    import h5py

    from trainers.anomaly.store import load, store

    rng = np.random.default_rng(0)
    bg, sig = rng.exponential(size=2000), rng.exponential(3.0, size=200)
    table = score_table(bg, {"resonance": sig}, [1, 10])
    weights = {"encoder": {"layers_0": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}}
    paths = store(str(tmp_path), config={"model": {"name": "vae"}}, tables={"ad_score": table},
                  facts={"steps": 400, "params_sha256": "ab" * 32, "wall_s": 12.5},
                  history=[{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "lr": 1e-3}],
                  preprocessing={"normalization": {"kind": "standard", "offset": np.zeros(3), "scale": np.ones(3)},
                                 "quantization": {"total_bits": 8, "integer_bits": 3}},
                  scores={"ad_score": {"background": bg, "resonance": sig}}, weights=weights)
    complete, lite = load(paths["complete"]), load(paths["lite"])
    assert complete["config"] == lite["config"] == {"model": {"name": "vae"}}
    assert complete["steps"] == lite["steps"] == 400 and lite["params_sha256"] == "ab" * 32
    result = lite["results"]["ad_score"]
    np.testing.assert_array_equal(result["thresholds"], table["thresholds"])
    np.testing.assert_array_equal(result["signals"]["resonance"]["efficiency"], table["signals"]["resonance"]["efficiency"])
    assert result["signals"]["resonance"]["auc"] == table["signals"]["resonance"]["auc"]
    assert result["total_rate_khz"] == LHC_RATE_KHZ and result["background_events"] == 2000
    np.testing.assert_array_equal(complete["scores"]["ad_score"]["background"], bg)
    np.testing.assert_array_equal(complete["weights"]["encoder"]["layers_0"]["kernel"], np.ones((3, 2)))
    np.testing.assert_array_equal(complete["history"]["loss"], [2.0, 1.5])
    assert np.isnan(complete["history"]["lr"][0]) and complete["preprocessing"]["quantization"]["total_bits"] == 8
    with h5py.File(paths["lite"]) as f:
        assert set(f) == {"results"}  # small: no scores, weights or history
    assert os.path.getsize(paths["lite"]) < 16_000 < os.path.getsize(paths["complete"])


def _report(tmp_path):
    from trainers.anomaly import plots
    from trainers.anomaly.report import render_html, write_html

    rng = np.random.default_rng(0)
    bg, sig = rng.exponential(size=3000), rng.exponential(3.0, size=300)
    table = score_table(bg, {"resonance": sig}, [1, 10, 100])
    figures = {
        "Score distributions": plots.score_histograms(bg, {"resonance": sig}, str(tmp_path / "h.png")),
        "ROC": plots.roc_curves(bg, {"resonance": sig}, str(tmp_path / "r.png")),
    }
    page = render_html(title="VAE <test> run", facts={"steps": 400, "params SHA-256": "ab" * 32},
                       tables={"reconstruction": table}, figures=figures, config={"model": {"name": "vae"}},
                       summary=[["reconstruction", "resonance", f"{table['signals']['resonance']['auc']:.4f}"]])
    return write_html(str(tmp_path / "report.html"), page), table


def test_report_html_is_self_contained(tmp_path):
    pytest.importorskip("matplotlib")
    path, table = _report(tmp_path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "VAE &lt;test&gt; run" in text  # escaped
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 2
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing outside the file
    assert f"{table['thresholds'][0]:.6g}" in text and "eff. @ 10 kHz" in text


def _need_browser():
    from trainers.anomaly.report import find_chromium

    if find_chromium() is None or shutil.which("pdftoppm") is None:
        pytest.skip("headless Chromium or poppler-utils not installed (apt-get install chromium poppler-utils; CI does)")


def test_report_renders_in_a_real_browser_and_prints_to_pdf(tmp_path):
    pytest.importorskip("matplotlib")
    _need_browser()
    import subprocess

    from PIL import Image

    from trainers.anomaly.report import screenshot, write_pdf

    path, _ = _report(tmp_path)
    shot = np.asarray(Image.open(screenshot(path, str(tmp_path / "shot.png"))).convert("L"))
    assert shot.shape == (1400, 1100)
    assert shot.std() > 20  # text, tables and figures drawn, not a blank page
    # the embedded figures rendered: a band of the screenshot holds many mid-grey plot pixels
    assert (shot < 200).mean() > 0.02
    pdf = write_pdf(path, str(tmp_path / "report.pdf"))
    info = subprocess.run(["pdfinfo", pdf], capture_output=True, text=True, check=True).stdout
    pages = int(re.search(r"Pages:\s+(\d+)", info).group(1))
    assert 1 <= pages <= 6
    subprocess.run(["pdftoppm", "-r", "40", "-png", pdf, str(tmp_path / "page")], check=True)
    rendered = sorted(tmp_path.glob("page-*.png"))
    assert len(rendered) == pages
    first = np.asarray(Image.open(rendered[0]).convert("L"))
    assert first.std() > 20
