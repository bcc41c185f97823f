"""``python -m trainers.report WORKDIR [--step N] [--no-pdf]``: the anomaly-detection stages for a finished run.

Reads the run's resolved ``config.yaml``, restores checkpoint ``N`` (default: the latest),
and writes what ``python -m trainers.run`` writes at the end of a run with ``anomaly.enabled``:
``results.json``, ``plots/``, ``complete.h5`` / ``lite.h5``, ``report.html`` and ``report.pdf``.
The config needs a ``prepare`` section (the prepared data is reused from its cache, or
prepared again); the ``anomaly`` settings apply even if the run had them off.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a run folder written by python -m trainers.run (holds config.yaml, checkpoints/)")
    parser.add_argument("overrides", nargs="*", help="anomaly.* overrides, e.g. 'anomaly.rates_khz=[1, 10]'")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint to score (default: the latest)")
    parser.add_argument("--no-pdf", action="store_true", help="write report.html only (no headless Chromium)")
    args = parser.parse_intermixed_args(argv)  # overrides may come after --step / --no-pdf

    from .anomaly.pipeline import evaluate_run
    from .config import ConfigError, load_config

    path = os.path.join(args.workdir, "config.yaml")
    if not os.path.isfile(path):
        print(f"error: {args.workdir}: no config.yaml, so not a run folder of python -m trainers.run", file=sys.stderr)
        return 2
    bad = [o for o in args.overrides if not o.startswith("anomaly.")]
    if bad:
        print(f"error: only anomaly.* settings can change for a report (they do not change training): {bad}",
              file=sys.stderr)
        return 2
    try:
        config = load_config(path, [*args.overrides, "anomaly.enabled=true"] + (["anomaly.pdf=false"] if args.no_pdf else []))
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, train=None, eval=None))
        result = evaluate_run(args.workdir, config=config, step=args.step)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    best = ", ".join(f"{name} {auc:.4f} ({kind})" for name, (kind, auc) in result["best_auc"].items())
    print(f"checkpoint {result['step']}: best ROC AUC per signal: {best}")
    print("wrote " + ", ".join(os.path.relpath(p) for p in result["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
