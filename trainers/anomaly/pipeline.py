"""AXOL1TL's whole pipeline around the trainer: prepare -> train -> scores -> plots -> storage -> report.

:func:`run_pipeline` is what ``python -m trainers.run`` calls: it prepares the data when
the config has a ``prepare`` section (cached: a re-run does no work), trains (resuming
from the workdir's latest checkpoint), then, when ``anomaly.enabled``, runs the stages
after training with :func:`evaluate_run`, which ``python -m trainers.report WORKDIR``
also runs on any finished run, from any of its checkpoints.

Everything after training is written into the workdir: ``results.json`` (the threshold and
efficiency tables), ``complete.h5`` (with every event's score) and ``lite.h5``, ``plots/*.png``,
``report.html`` and ``report.pdf``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..config import Config, ConfigError
from . import scores as S
from .prepare import Prepared, prepare_dataset

BUILTIN_SCORES = ("reconstruction", "reconstruction_mae", "ad_score", "kl")
BASELINES = ("isolation_forest",)


# --------------------------------------------------------------------------- prepare
def check_pipeline(config: Config) -> None:
    """Refuse settings the pipeline cannot honor, before any work (a :class:`ConfigError` naming them)."""
    pc, ac, dc = config.prepare, config.anomaly, config.data
    if pc.source is not None:
        clash = [f"data.{k}" for k in ("dataset", "train", "eval", "module") if getattr(dc, k) is not None]
        if clash:
            raise ConfigError(f"prepare.source gives the training data; leave {', '.join(clash)} unset")
        if dc.source not in ("h5", "h5_cached"):
            raise ConfigError(f"prepare writes HDF5 files: data.source must be h5 or h5_cached, got {dc.source!r}")
    if ac.enabled and pc.source is None:
        raise ConfigError("anomaly.enabled needs a prepare section (prepare.source): the scores are computed on its "
                          "test split and signal sets")
    for score in ac.scores:
        if score not in BUILTIN_SCORES and ":" not in score:
            raise ConfigError(f"anomaly.scores: unknown score {score!r} (built in: {', '.join(BUILTIN_SCORES)}; or "
                              "an import path module:function)")
    for b in ac.baselines:
        if b not in BASELINES:
            raise ConfigError(f"anomaly.baselines: unknown baseline {b!r} (known: {', '.join(BASELINES)})")
    if not ac.rates_khz or any(not 0 < r <= ac.total_rate_khz for r in ac.rates_khz):
        raise ConfigError(f"anomaly.rates_khz must be rates above 0 and at most anomaly.total_rate_khz "
                          f"({ac.total_rate_khz:g} kHz), got {ac.rates_khz}")


def prepare(config: Config, progress: bool = True) -> tuple[Config, Prepared | None]:
    """Run the ``prepare`` stage if the config has one; returns the config with ``data.train`` /
    ``data.eval`` set to the prepared train and validation files, and the :class:`Prepared` files."""
    check_pipeline(config)
    if config.prepare.source is None:
        return config, None
    prepared = prepare_dataset(config.prepare, config.prepare.cache_dir or config.data.cache_dir, progress=progress)
    data = dataclasses.replace(config.data, train=prepared.train, eval=prepared.validation, keys=config.data.keys or ["x"],
                               input_key="x")
    return dataclasses.replace(config, data=data), prepared


def run_pipeline(config: Config, workdir: str, *, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare (if configured), train, and run the stages after training (if ``anomaly.enabled``).

    Returns the training summary, with ``stages`` (seconds per stage) and, after the anomaly
    stages, ``anomaly`` (the best AUC per signal and the files written) added; the summary in
    ``workdir/summary.json`` gets the same additions.
    """
    from .. import distributed
    from ..train import train_and_evaluate

    t0 = time.perf_counter()
    config, prepared = prepare(config, progress and distributed.is_primary())
    t_prepare = time.perf_counter() - t0
    if prepared is not None and distributed.is_primary():
        how = "reused" if prepared.cached else "prepared"
        print(f"prepare: {how} {prepared.folder} ({', '.join(f'{k} {v}' for k, v in prepared.constants['events'].items())} "
              f"events) in {t_prepare:.1f} s", flush=True)
    # The work after training that needs no trained model (baselines, the input plots) runs in a
    # process of its own while training runs, where there are cores to spare; training itself is not touched.
    early = _start_early(config, prepared, workdir, beside_training=True) \
        if config.anomaly.enabled and distributed.is_primary() else None
    t1 = time.perf_counter()
    try:
        summary = train_and_evaluate(config, workdir, fresh=fresh, progress=progress)
        t_train = time.perf_counter() - t1
        if summary.get("interrupted"):
            return summary
        stages = {"prepare_s": round(t_prepare, 3), "train_s": round(t_train, 3)}
        if config.anomaly.enabled and distributed.is_primary():
            done = None
            if early is not None:
                t2 = time.perf_counter()
                done = early.result()
                stages["early_wait_s"] = round(time.perf_counter() - t2, 3)  # waiting for what ran beside training
            result = evaluate_run(workdir, config=config, prepared=prepared, summary=summary, progress=progress,
                                  stages=stages, early=done)
            summary["anomaly"] = result
    finally:
        if early is not None:
            early.close()
    if distributed.is_primary() and (prepared is not None or config.anomaly.enabled):
        summary["stages"] = stages
        overhead = sum(v for k, v in stages.items() if k != "train_s")
        summary["pipeline_overhead"] = round(overhead / max(stages["train_s"], 1e-9), 4)
        _write_json(os.path.join(workdir, "summary.json"), summary)
    return summary


# --------------------------------------------------------------------------- after training
def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def load_params(workdir: str, config: Config, step: int | None = None) -> tuple[Any, Any, int]:
    """The model graph, its parameters at checkpoint ``step`` (default: the latest) and that step.

    The train state is rebuilt from ``config`` exactly as training built it, then restored.
    """
    from flax import nnx

    from ..checkpoints import manager, restore
    from ..data import build_sources
    from ..models import build_model
    from ..train import initial_state, make_optimizer, make_schedule

    folder = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder: train first (python -m trainers.run CONFIG "
                                f"--workdir {workdir})")
    mgr = manager(workdir, config.train.keep_checkpoints)
    try:
        steps = sorted(mgr.all_steps())
        if not steps:
            raise FileNotFoundError(f"{folder}: no complete checkpoint")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"{folder}: no checkpoint at step {step} (there are: {steps})")
        train_src, _ = build_sources(config.data, None)
        x = np.asarray(train_src.read_batch(np.array([0]))[config.data.input_key])
        model = build_model(config.model.name, config.model.kwargs, x.shape[1:], config.seed)
        tx = make_optimizer(config.optimizer, make_schedule(config.schedule, config.train.steps or 1))
        _, state = initial_state(model, tx, config.seed)
        graphdef = nnx.graphdef(model)
        restored = restore(mgr, step, state)
    finally:
        mgr.close()
    return graphdef, restored["state"]["params"], int(step)


def _outputs_fn(graphdef: Any) -> Callable:
    import jax
    from flax import nnx

    @jax.jit
    def apply(params, x):
        out = nnx.merge(graphdef, params)(x.astype("float32"))
        return out if isinstance(out, dict) else {"recon": out}

    return apply


def model_outputs(graphdef: Any, params: Any, x: np.ndarray, batch_size: int = 4096) -> dict[str, np.ndarray]:
    """The model's outputs (as numpy) for every event of ``x``, in deterministic mode (no latent
    sampling: a VAE's latent is its mean), in batches of ``batch_size`` (the last one padded,
    so one compiled shape serves every batch)."""
    apply = _outputs_fn(graphdef)
    n = len(x)
    size = batch_size
    parts: dict[str, list[np.ndarray]] = {}
    for a in range(0, n, size):
        chunk = x[a : a + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out = apply(params, chunk)
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v)[: size - pad])
    return {k: np.concatenate(v) for k, v in parts.items()}


def event_scores(kind: str, outputs: Mapping[str, np.ndarray], x: np.ndarray, feature_weights: Any = None) -> np.ndarray:
    """Per-event anomaly scores of one kind (see :class:`trainers.config.AnomalyConfig`)."""
    if kind in ("reconstruction", "reconstruction_mae"):
        if "recon" not in outputs:
            raise ValueError(f"score {kind!r} needs the model's 'recon' output; it gives {sorted(outputs)}")
        return S.reconstruction_error(x, outputs["recon"], "mse" if kind == "reconstruction" else "mae", feature_weights)
    if kind == "ad_score":
        latent = outputs.get("mean", outputs.get("latent"))
        if latent is None:
            raise ValueError(f"score 'ad_score' needs the model's latent ('mean' or 'latent' output); it gives {sorted(outputs)}")
        return S.ad_score(latent)
    if kind == "kl":
        if "mean" not in outputs or "logvar" not in outputs:
            raise ValueError(f"score 'kl' needs a VAE's 'mean' and 'logvar' outputs; the model gives {sorted(outputs)}")
        mu, lv = (np.asarray(outputs[k], np.float64).reshape(len(x), -1) for k in ("mean", "logvar"))
        return -0.5 * np.sum(1 + lv - mu**2 - np.exp(lv), axis=1)
    from ..models import import_path

    fn = import_path(kind)
    out = np.asarray(fn(outputs, x), dtype=np.float64).reshape(-1)
    if out.shape != (len(x),):
        raise ValueError(f"score {kind!r} returned {out.size} values for {len(x)} events")
    return out


def _read_x(path: str) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        return f["x"][()]


def _history(workdir: str) -> list[dict[str, Any]]:
    rows = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and "lr" in row:  # training rows (evaluation rows have no lr)
                    rows.append(row)
    return rows


def early_work(prepared: Prepared, workdir: str, seed: int, baselines: list[str], plots: bool) -> dict[str, Any]:
    """The stages' work that needs no trained model: the baselines' scores (``{name: {set: scores}}``)
    and the input-distribution figure. :func:`run_pipeline` runs it in another process during training."""
    out: dict[str, Any] = {"baselines": {}, "figures": {}}
    if "isolation_forest" in baselines:
        sets = {"background": _read_x(prepared.test), **{k: _read_x(p) for k, p in prepared.signals.items()}}
        forest = _isolation_forest(_read_x(prepared.train), sets, seed)
        if forest is not None:
            out["baselines"]["isolation_forest (baseline)"] = forest
    if plots:
        out["figures"] = input_figure(workdir, prepared)
    return out


class _Early:
    """:func:`early_work` in a process of its own (spawned: the parent has JAX's threads running)."""

    def __init__(self, *args: Any) -> None:
        import concurrent.futures
        import multiprocessing

        self.executor = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.future = self.executor.submit(early_work, *args)

    def result(self) -> dict[str, Any]:
        return self.future.result()

    def close(self) -> None:
        """Stop waiting for it (if it still runs, let it finish its atomic writes) and end the process."""
        self.future.cancel()
        self.executor.shutdown(wait=True)


def _cores_to_spare() -> bool:
    """Whether work beside training gets cores training does not use: with an accelerator, or
    with 8 or more CPU cores. On a small CPU-only machine training uses every core, and a
    process beside it slows it by about as much as it saves (measured on 2 cores)."""
    import jax

    return jax.default_backend() != "cpu" or (os.cpu_count() or 1) >= 8


def _start_early(config: Config, prepared: Prepared | None, workdir: str, *, beside_training: bool) -> _Early | None:
    """:func:`early_work` started in a process of its own, if there is work for it (and, ``beside_training``,
    cores training does not use); else None."""
    if prepared is None or not (config.anomaly.baselines or config.anomaly.plots):
        return None
    if beside_training and not _cores_to_spare():
        return None
    return _Early(prepared, workdir, config.seed, list(config.anomaly.baselines), config.anomaly.plots)


def _isolation_forest(train: np.ndarray, sets: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray] | None:
    try:
        from sklearn.ensemble import IsolationForest
    except ImportError:
        warnings.warn("anomaly.baselines: isolation_forest needs scikit-learn (pip install 'tandem[report]'); skipped",
                      RuntimeWarning, stacklevel=3)
        return None
    forest = IsolationForest(random_state=seed).fit(train.reshape(len(train), -1))
    return {k: -forest.score_samples(v.reshape(len(v), -1)) for k, v in sets.items()}  # higher: more anomalous


def evaluate_run(workdir: str, *, config: Config | None = None, prepared: Prepared | None = None,
                 summary: Mapping[str, Any] | None = None, step: int | None = None, progress: bool = True,
                 stages: dict[str, float] | None = None, early: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Scores -> thresholds and efficiencies -> plots -> ``complete.h5`` / ``lite.h5`` -> report, for the run
    in ``workdir`` at checkpoint ``step`` (default: the latest). ``config`` defaults to the run's
    resolved ``config.yaml``. Returns ``{"step", "best_auc": {signal: [score, auc]}, "files": {...}}``
    and adds each stage's seconds to ``stages``. ``early``: :func:`early_work`'s result, if it ran
    already (else it runs here).
    """
    from ..config import load_config

    stages = stages if stages is not None else {}
    if config is None:
        path = os.path.join(workdir, "config.yaml")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{workdir}: no config.yaml: not a Tandem run folder")
        config = load_config(path)
    if prepared is None:
        config, prepared = prepare(dataclasses.replace(config, data=dataclasses.replace(
            config.data, train=None, eval=None)) if config.prepare.source else config, progress=False)
    ac = config.anomaly
    if early is None:  # the baselines and input plots in a process of their own, beside the work here
        early = _start_early(config, prepared, workdir, beside_training=False)
    try:
        t = time.perf_counter()
        graphdef, params, step = load_params(workdir, config, step)
        sets = {"background": _read_x(prepared.test), **{k: _read_x(p) for k, p in prepared.signals.items()}}
        size = min(ac.batch_size, max(len(v) for v in sets.values()))  # one compiled shape for every set
        outputs = {k: model_outputs(graphdef, params, v, size) for k, v in sets.items()}
        weights = config.loss.kwargs.get("feature_weights")
        per_score = {kind: {k: event_scores(kind, outputs[k], v, weights) for k, v in sets.items()} for kind in ac.scores}
        tables = {kind: _table(by_set, ac) for kind, by_set in per_score.items()}
        stages["scores_s"] = round(time.perf_counter() - t, 3)
        history = _history(workdir)
        figures: dict[str, str] = {}
        if ac.plots:
            t = time.perf_counter()
            figures = make_plots(workdir, tables, per_score, history, combined=False)
            stages["plots_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        done = early.result() if isinstance(early, _Early) else early or {"baselines": {}, "figures": {}}
        stages["early_wait_s"] = round(time.perf_counter() - t, 3)
    finally:
        if isinstance(early, _Early):
            early.close()
    per_score.update(done["baselines"])
    tables.update({kind: _table(by_set, ac) for kind, by_set in done["baselines"].items()})
    best: dict[str, list[Any]] = {}
    for kind in ac.scores:
        for name, s in tables[kind]["signals"].items():
            if name not in best or s["auc"] > best[name][1]:
                best[name] = [kind, s["auc"]]
    for kind, table in tables.items():
        print(f"\n{kind} (checkpoint {step}):\n{S.format_table(table)}", flush=True)
    files: dict[str, str] = {"results": os.path.join(workdir, "results.json")}
    _write_json(files["results"], {"step": step, "tables": tables, "best_auc": best})
    if ac.plots:
        t = time.perf_counter()
        figures.update(make_plots(workdir, tables, per_score, [], kinds=list(done["baselines"])))
        figures.update(done["figures"])
        stages["plots_s"] += round(time.perf_counter() - t, 3)
        top = max(ac.scores, key=lambda k: max(s["auc"] for s in tables[k]["signals"].values()))

        def rank(caption: str) -> int:  # the report shows the best score's histogram, ROC and efficiency first
            order = [f"{top}: score distributions", "ROC", "efficiency vs rate"]
            return order.index(caption) if caption in order else 3 if "score distributions" in caption else 4

        figures = dict(sorted(figures.items(), key=lambda item: rank(item[0])))
    run = dict(summary or _read_summary(workdir))
    facts = _facts(run, step, prepared, stages, history)
    if ac.store:
        t = time.perf_counter()
        from .store import store

        files.update(store(workdir, config=config.to_dict(), tables=tables, facts=facts, history=history,
                           preprocessing=_preprocessing(prepared), scores=per_score,
                           weights=_weights(params)))
        stages["store_s"] = round(time.perf_counter() - t, 3)
    if ac.report:
        t = time.perf_counter()
        files.update(write_report(workdir, config, tables, best, figures, _display(facts, stages), pdf=ac.pdf))
        stages["report_s"] = round(time.perf_counter() - t, 3)
    return {"step": step, "best_auc": best, "files": files}


def _table(by_set: Mapping[str, np.ndarray], ac: Any) -> dict[str, Any]:
    signals = {k: v for k, v in by_set.items() if k != "background"}
    return S.score_table(by_set["background"], signals, ac.rates_khz, ac.total_rate_khz)


def _read_summary(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _facts(run: Mapping[str, Any], step: int, prepared: Prepared, stages: Mapping[str, float],
           history: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's facts as stored in ``complete.h5`` / ``lite.h5`` (numbers stay numbers)."""
    facts: dict[str, Any] = {"checkpoint_step": step, "steps": run.get("steps", step)}
    if run.get("wall_time_s") is not None:
        facts["wall_time_s"] = run["wall_time_s"]
    rows = [h for h in history if "samples_per_s" in h]
    if rows:
        facts["samples_per_s"] = float(np.mean([h["samples_per_s"] for h in rows]))
        facts["data_wait_share"] = float(np.mean([h.get("data_wait_share", 0.0) for h in rows]))
    if run.get("params_sha256"):
        facts["params_sha256"] = run["params_sha256"]
    facts.update({k: float(v) for k, v in (run.get("eval") or {}).items()})
    facts["events"] = dict(prepared.constants["events"])
    facts["prepared"] = prepared.folder
    return facts


def _display(facts: Mapping[str, Any], stages: Mapping[str, float]) -> dict[str, Any]:
    """The facts as the report's table shows them."""
    names = {"checkpoint_step": "checkpoint scored", "steps": "steps trained", "params_sha256": "params SHA-256"}
    out: dict[str, Any] = {}
    for k, v in facts.items():
        if k == "wall_time_s":
            out["training wall time"] = f"{v:.1f} s"
        elif k == "samples_per_s":
            out["samples/s (mean of the log)"] = f"{v:,.0f}"
        elif k == "data_wait_share":
            out["data-wait share"] = f"{100 * v:.2f}%"
        elif k == "events":
            out["events"] = ", ".join(f"{name} {n}" for name, n in v.items())
        elif k == "prepared":
            out["prepared data"] = os.path.basename(v)
        elif isinstance(v, float):
            out[k] = f"{v:.5g}"
        else:
            out[names.get(k, k)] = v
    if stages:
        out["stages (s)"] = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in stages.items())
    return out


def _preprocessing(prepared: Prepared) -> dict[str, Any]:
    c = prepared.constants
    out: dict[str, Any] = {"events": c["events"], "source": str(c["source"])}
    for k in ("saturation", "normalization", "quantization"):
        if c.get(k):
            out[k] = {kk: (np.asarray(v) if isinstance(v, list) else v) for kk, v in c[k].items()}
    return out


def _weights(params: Any) -> dict[str, Any]:
    def walk(tree: Any) -> Any:
        if isinstance(tree, Mapping):
            return {str(k): walk(v) for k, v in tree.items()}
        return np.asarray(tree)

    return walk(params)


def make_plots(workdir: str, tables: Mapping[str, Any], per_score: Mapping[str, Mapping[str, np.ndarray]],
               history: list[dict[str, Any]], *, kinds: list[str] | None = None, combined: bool = True) -> dict[str, str]:
    """The figures of the scores and of training into ``workdir/plots``; returns ``{caption: path}``.

    A score histogram for each of ``kinds`` (default: every score, best first); with ``combined``,
    efficiency vs rate and ROC with every score of ``tables``; training curves if ``history``."""
    from . import plots

    folder = os.path.join(workdir, "plots")
    figures: dict[str, str] = {}
    ranked = sorted(per_score, key=lambda k: -max(s["auc"] for s in tables[k]["signals"].values()))  # best first
    for kind in ranked if kinds is None else kinds:
        by_set = per_score[kind]
        safe = re.sub(r"[^A-Za-z0-9-]+", "_", kind).strip("_")  # a file name, whatever the score's import path
        table = tables[kind]
        signals = {k: v for k, v in by_set.items() if k != "background"}
        lines = dict(zip(table["rates_khz"], table["thresholds"], strict=True))
        figures[f"{kind}: score distributions"] = plots.score_histograms(
            by_set["background"], signals, os.path.join(folder, f"scores_{safe}.png"), lines, title=f"Anomaly score: {kind}")
    if history:
        keys = [k for k in ("loss", "recon", "kl") if any(k in h for h in history)] or None
        figures["training curves"] = plots.training_curves(history, os.path.join(folder, "training.png"), keys)
    if not combined:
        return figures
    # every score kind on one efficiency figure and one ROC figure
    first = next(iter(tables.values()))
    merged = {"rates_khz": first["rates_khz"],
              "signals": {f"{name}, {kind}": s for kind, t in tables.items() for name, s in t["signals"].items()}}
    figures["efficiency vs rate"] = plots.efficiency_vs_rate(merged, os.path.join(folder, "efficiency.png"))
    labelled = {f"{name}, {kind}": (by_set["background"], v) for kind, by_set in per_score.items()
                for name, v in by_set.items() if name != "background"}
    figures["ROC"] = plots.roc_curves({k: b for k, (b, _) in labelled.items()}, {k: s for k, (_, s) in labelled.items()},
                                      os.path.join(folder, "roc.png"))
    return figures


def input_figure(workdir: str, prepared: Prepared) -> dict[str, str]:
    """Input distributions before and after preparation (training split), into ``workdir/plots``."""
    import h5py

    from . import plots

    with h5py.File(prepared.train, "r") as f:
        n = min(len(f["x"]), 20_000)
        before, after = f["x_raw"][:n], f["x"][:n]
    path = plots.input_distributions(before, after, os.path.join(workdir, "plots", "inputs.png"),
                                     prepared.constants.get("feature_names"), features=4)
    return {"inputs before / after preparation": path}


def write_report(workdir: str, config: Config, tables: Mapping[str, Any], best: Mapping[str, Any],
                 figures: Mapping[str, str], facts: Mapping[str, Any], *, pdf: bool = True) -> dict[str, str]:
    """``report.html`` (self-contained) and, with ``pdf`` and a headless Chromium, ``report.pdf``."""
    from .report import find_chromium, render_html, write_html, write_pdf

    title = f"{config.model.name.upper()} anomaly detection: {os.path.basename(os.path.abspath(workdir))}"
    summary = [[kind, name, f"{auc:.4f}"] for name, (kind, auc) in best.items()]
    for kind, table in tables.items():
        if kind.endswith("(baseline)"):
            summary += [[kind, name, f"{s['auc']:.4f}"] for name, s in table["signals"].items()]
    page = render_html(title=title, facts=facts, tables=tables, figures=figures, config=config.to_dict(), summary=summary)
    files = {"report_html": write_html(os.path.join(workdir, "report.html"), page)}
    if pdf:
        if find_chromium() is None:
            print("report: no headless Chromium found, so no report.pdf (apt-get install chromium, or set CHROMIUM); "
                  "report.html is complete", file=sys.stderr, flush=True)
        else:
            files["report_pdf"] = write_pdf(files["report_html"], os.path.join(workdir, "report.pdf"))
    return files
