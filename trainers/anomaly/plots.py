"""AXOL1TL's plot managers: one function per figure, each usable alone, drawn with matplotlib (Agg).

Every function takes plain arrays (or the dict of :func:`trainers.anomaly.scores.score_table`),
writes a PNG to ``path`` and returns ``path``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.png"
    fig.tight_layout()  # cheaper than bbox_inches="tight", which draws the figure twice
    fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def score_histograms(background: np.ndarray, signals: Mapping[str, np.ndarray], path: str,
                     thresholds: Mapping[float, float] | None = None, bins: int = 80, title: str = "Anomaly score") -> str:
    """Score histograms (normalized, log y) of the background and each signal, with a dashed
    line per threshold (``{rate_khz: threshold}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    everything = np.concatenate([np.ravel(background), *[np.ravel(s) for s in signals.values()]])
    finite = everything[np.isfinite(everything)]
    edges = np.linspace(finite.min(), np.quantile(finite, 0.999), bins + 1) if finite.size else bins
    ax.hist(np.ravel(background), bins=edges, density=True, histtype="stepfilled", alpha=0.35, color="grey", label="background")
    for name, scores in signals.items():
        ax.hist(np.ravel(scores), bins=edges, density=True, histtype="step", linewidth=1.6, label=name)
    for rate, t in (thresholds or {}).items():
        if np.isfinite(t):
            ax.axvline(t, linestyle="--", color="black", linewidth=0.9)
            ax.annotate(f"{rate:g} kHz", (t, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def efficiency_vs_rate(table: Mapping[str, Any], path: str) -> str:
    """Each signal's efficiency at each target rate (log x), from a score table."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rates = table["rates_khz"]
    for name, s in table["signals"].items():
        ax.plot(rates, [100 * e for e in s["efficiency"]], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("background rate (kHz)")
    ax.set_ylabel("signal efficiency (%)")
    ax.set_title("Efficiency at the trigger's rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_curves(background: np.ndarray | Mapping[str, np.ndarray], signals: Mapping[str, np.ndarray], path: str) -> str:
    """ROC curves (signal efficiency vs background efficiency, log x) with each AUC in the legend.
    ``background``: one array for every curve, or ``{label: array}`` with the label of each signal
    (curves of different scores on one figure)."""
    from .scores import roc_auc

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, scores in signals.items():
        b = np.ravel(background[name] if isinstance(background, Mapping) else background)
        s = np.ravel(scores)
        cuts = np.unique(np.quantile(np.r_[b, s], np.linspace(0, 1, 400)))
        fpr = (b[None, :] > cuts[:, None]).mean(axis=1)
        tpr = (s[None, :] > cuts[:, None]).mean(axis=1)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(b, s):.3f})")
    ax.plot([1e-5, 1], [1e-5, 1], linestyle=":", color="grey")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_xlabel("background efficiency")
    ax.set_ylabel("signal efficiency")
    ax.set_title("ROC")
    ax.legend(fontsize=7)
    return _save(fig, path)


def training_curves(history: Sequence[Mapping[str, Any]], path: str, keys: Sequence[str] | None = None) -> str:
    """Loss terms per step (one panel) and the learning rate (another: cosine restarts show),
    from the trainer's ``metrics.jsonl`` records (``step`` plus numbers)."""
    plt = _pyplot()
    steps = [h["step"] for h in history]
    keys = list(keys) if keys is not None else sorted({k for h in history for k in h
                                                        if k not in ("step", "lr", "time") and isinstance(h[k], int | float)})
    fig, (ax, lr_ax) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for k in keys:
        ax.plot(steps, [h.get(k, np.nan) for h in history], label=k)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Training")
    if any("lr" in h for h in history):
        lr_ax.plot(steps, [h.get("lr", np.nan) for h in history], color="tab:purple")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    return _save(fig, path)


def input_distributions(before: np.ndarray, after: np.ndarray, path: str, names: Sequence[str] | None = None,
                        features: int = 6) -> str:
    """Histograms of the first ``features`` input features before and after preparation."""
    plt = _pyplot()
    before = np.asarray(before).reshape(len(before), -1)
    after = np.asarray(after).reshape(len(after), -1)
    n = min(features, before.shape[1])
    fig, axes = plt.subplots(2, n, figsize=(2.4 * n, 4.2), squeeze=False)
    for j in range(n):
        label = names[j] if names is not None else f"feature {j}"
        for row, data, color in ((0, before[:, j], "tab:blue"), (1, after[:, j], "tab:green")):
            counts, edges = np.histogram(data, bins=50)
            axes[row, j].stairs(counts, edges, fill=True, color=color)
        axes[0, j].set_title(label, fontsize=8)
        for a in axes[:, j]:
            a.set_yscale("log")
            a.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("raw")
    axes[1, 0].set_ylabel("prepared")
    return _save(fig, path)
