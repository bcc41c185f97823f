"""Anomaly scores, thresholds at target rates, efficiencies and ROC AUC (AXOL1TL's score managers).

A trigger keeps the events whose score is above a threshold. With a total input rate
(the LHC's bunch-crossing rate, ~40 MHz, times the fraction of filled bunches) and a
target output rate in kHz, the threshold is the background score's quantile that lets
``rate / total_rate`` of the background through; each signal's efficiency is the
fraction of its events above that threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LHC_RATE_KHZ = 40_000 * 2_544 / 3_564  # bunch-crossing rate x filled fraction: 28,552 kHz


def ad_score(mu: np.ndarray) -> np.ndarray:
    """The firmware-friendly "AD score": the sum of squared latent means per event, ``Σ μ²``."""
    mu = np.asarray(mu, dtype=np.float64)
    return np.sum(mu.reshape(len(mu), -1) ** 2, axis=1)


def reconstruction_error(x: np.ndarray, x_hat: np.ndarray, kind: str = "mse", weights: np.ndarray | None = None) -> np.ndarray:
    """Per-event reconstruction error: the (weighted) mean of squared (``mse``) or absolute
    (``mae``) differences over the features. ``weights`` (per feature, 0 masks one out)."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x_hat = np.asarray(x_hat, dtype=np.float64).reshape(len(x_hat), -1)
    if x.shape != x_hat.shape:
        raise ValueError(f"inputs {x.shape} and reconstructions {x_hat.shape} differ in shape")
    diff = (x - x_hat) ** 2 if kind == "mse" else np.abs(x - x_hat) if kind == "mae" else None
    if diff is None:
        raise ValueError(f"unknown reconstruction error {kind!r} (known: mse, mae)")
    w = np.ones(x.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (x.shape[1],):
        raise ValueError(f"weights have {w.size} entries for {x.shape[1]} features")
    if w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    return diff @ w / w.sum()


def threshold_at_rate(background: np.ndarray, rate_khz: float, total_rate_khz: float = LHC_RATE_KHZ) -> float:
    """The score threshold that lets ``rate_khz`` of ``total_rate_khz`` through on ``background``.

    The ``1 - rate / total`` quantile of the background scores: at most ``rate / total``
    of the background events score strictly above it (the ``k``-th largest score, with
    ``k = floor(n * rate / total)``; ties may let fewer through, never more).
    """
    scores = np.sort(np.asarray(background, dtype=np.float64).reshape(-1))
    if scores.size == 0:
        raise ValueError("no background scores to set a threshold on")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{int(np.sum(~np.isfinite(scores)))} background score(s) are NaN or infinite")
    if not 0 < rate_khz <= total_rate_khz:
        raise ValueError(f"target rate {rate_khz} kHz must be above 0 and at most the total {total_rate_khz} kHz")
    k = int(np.floor(scores.size * rate_khz / total_rate_khz))
    if k == 0:
        return float(scores[-1])  # nothing may pass: the highest score
    return float(scores[scores.size - k - 1]) if k < scores.size else float(-np.inf)


def efficiency(scores: np.ndarray, threshold: float) -> float:
    """The fraction of events scoring strictly above ``threshold``."""
    scores = np.asarray(scores).reshape(-1)
    return float(np.mean(scores > threshold)) if scores.size else float("nan")


def roc_auc(background: np.ndarray, signal: np.ndarray) -> float:
    """Area under the ROC curve (signal positive, higher score = more anomalous): the probability
    that a random signal event outscores a random background event, ties counting half
    (the Mann-Whitney U statistic, from average ranks)."""
    b = np.asarray(background, dtype=np.float64).reshape(-1)
    s = np.asarray(signal, dtype=np.float64).reshape(-1)
    if b.size == 0 or s.size == 0:
        raise ValueError("ROC AUC needs background and signal events")
    both = np.concatenate([b, s])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    sorted_vals = both[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], both.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[b.size:].sum() - s.size * (s.size + 1) / 2.0
    return float(u / (b.size * s.size))


def score_table(background: np.ndarray, signals: Mapping[str, np.ndarray], rates_khz: Sequence[float],
                total_rate_khz: float = LHC_RATE_KHZ) -> dict[str, Any]:
    """Thresholds at each target rate and, per signal, its efficiency at each and its ROC AUC.

    Returns ``{"total_rate_khz", "rates_khz", "thresholds": [...], "signals": {name:
    {"efficiency": [...], "auc": x, "events": n}}}`` (plain floats, JSON-serializable).
    """
    thresholds = [threshold_at_rate(background, r, total_rate_khz) for r in rates_khz]
    table: dict[str, Any] = {
        "total_rate_khz": float(total_rate_khz),
        "rates_khz": [float(r) for r in rates_khz],
        "thresholds": thresholds,
        "background_events": int(np.asarray(background).size),
        "signals": {},
    }
    for name, scores in signals.items():
        table["signals"][name] = {
            "efficiency": [efficiency(scores, t) for t in thresholds],
            "auc": roc_auc(background, scores),
            "events": int(np.asarray(scores).size),
        }
    return table


def format_table(table: Mapping[str, Any]) -> str:
    """The score table as Markdown: one row per signal, AUC and the efficiency at each rate."""
    rates = table["rates_khz"]
    head = "| signal | events | ROC AUC | " + " | ".join(f"eff @ {r:g} kHz" for r in rates) + " |"
    rule = "|---|---:|---:|" + "---:|" * len(rates)
    rows = [head, rule, "| threshold | | | " + " | ".join(f"{t:.4g}" for t in table["thresholds"]) + " |"]
    for name, s in table["signals"].items():
        effs = " | ".join(f"{100 * e:.2f}%" for e in s["efficiency"])
        rows.append(f"| {name} | {s['events']} | {s['auc']:.4f} | {effs} |")
    return "\n".join(rows)
