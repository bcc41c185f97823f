"""AXOL1TL's ``store_axo``: a run's results as two plain HDF5 files.

``complete.h5`` holds everything needed to study or redeploy the run; ``lite.h5`` only
what a summary needs (kilobytes). Layout (every array a dataset, every scalar or text an
attribute, nested dicts as groups):

- ``/`` attributes: ``config`` (the resolved config as JSON), ``kind`` (``complete`` or
  ``lite``), ``params_sha256``, ``steps`` and every other run fact given as ``facts``.
- ``/results/<score>`` (one group per score kind, e.g. ``reconstruction``, ``ad_score``):
  datasets ``rates_khz`` and ``thresholds`` (one per rate), attributes ``total_rate_khz``
  and ``background_events``; ``/results/<score>/signals/<name>``: dataset ``efficiency``
  (one per rate), attributes ``auc`` and ``events``.
- complete only: ``/history/<metric>`` (one value per logged step, with ``step``),
  ``/preprocessing/...`` (saturation maxima, normalization offset/scale, bit widths),
  ``/scores/<score>/<dataset>`` (the score of every event), ``/weights/<module path>`` (the
  model's parameters, path components joined by ``/``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _write_tree(group: Any, tree: Mapping[str, Any]) -> None:
    for key, value in tree.items():
        key = str(key)
        if isinstance(value, Mapping):
            _write_tree(group.require_group(key), value)
        elif isinstance(value, str | bytes | bool | int | float) or value is None:
            group.attrs[key] = "null" if value is None else value
        else:
            group.create_dataset(key, data=np.asarray(value))


def _history_columns(history: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return {k: np.array([h.get(k, np.nan) for h in history], dtype=np.float64) for k in keys}


def store(folder: str, *, config: Mapping[str, Any], tables: Mapping[str, Mapping[str, Any]], facts: Mapping[str, Any],
          history: Sequence[Mapping[str, Any]] = (), preprocessing: Mapping[str, Any] | None = None,
          scores: Mapping[str, Mapping[str, np.ndarray]] | None = None,
          weights: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write ``complete.h5`` and ``lite.h5`` into ``folder`` (each atomically); returns their paths.

    ``tables``: ``{score kind: score_table(...)}`` (:func:`trainers.anomaly.scores.score_table`);
    ``facts``: run facts (steps, wall time, params SHA-256, ...); ``scores``: ``{score kind:
    {dataset: per-event scores}}``; ``weights``: a nested dict of arrays.
    """
    import h5py

    os.makedirs(folder, exist_ok=True)
    paths = {}
    for kind in ("complete", "lite"):
        path = os.path.join(folder, f"{kind}.h5")
        tmp = path + ".tmp"
        with h5py.File(tmp, "w") as f:
            f.attrs["config"] = json.dumps(config, sort_keys=True, default=str)
            f.attrs["kind"] = kind
            _write_tree(f, {k: v for k, v in facts.items()})
            results = f.create_group("results")
            for score, table in tables.items():
                g = results.create_group(score)
                g.attrs["total_rate_khz"] = table["total_rate_khz"]
                g.attrs["background_events"] = table["background_events"]
                g.create_dataset("rates_khz", data=np.asarray(table["rates_khz"], dtype=np.float64))
                g.create_dataset("thresholds", data=np.asarray(table["thresholds"], dtype=np.float64))
                sig = g.create_group("signals")
                for name, s in table["signals"].items():
                    h = sig.create_group(name)
                    h.create_dataset("efficiency", data=np.asarray(s["efficiency"], dtype=np.float64))
                    h.attrs["auc"], h.attrs["events"] = s["auc"], s["events"]
            if kind == "complete":
                if history:
                    _write_tree(f.create_group("history"), _history_columns(history))
                if preprocessing:
                    _write_tree(f.create_group("preprocessing"), preprocessing)
                if scores:
                    _write_tree(f.create_group("scores"),
                                {k: {d: np.asarray(v) for d, v in per.items()} for k, per in scores.items()})
                if weights:
                    _write_tree(f.create_group("weights"), weights)
        os.replace(tmp, path)
        paths[kind] = path
    return paths


def load(path: str) -> dict[str, Any]:
    """Read a file :func:`store` wrote back into nested dicts (attributes and arrays)."""
    import h5py

    def read(group: Any) -> dict[str, Any]:
        out: dict[str, Any] = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in group.attrs.items()}
        for k, v in group.items():
            out[k] = read(v) if isinstance(v, h5py.Group) else v[()]
        return out

    with h5py.File(path, "r") as f:
        out = read(f)
    out["config"] = json.loads(out["config"])
    return out
