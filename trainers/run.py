"""``python -m trainers.run CONFIG.yaml [dotted.key=value ...] [--workdir DIR] [--fresh]``.

Parses the command line, joins a multi-process run when told to (``--coordinator``,
``--num-processes``, ``--process-id``; or ``--distributed`` to let JAX detect SLURM,
Open MPI or a TPU pod), and calls :func:`trainers.anomaly.pipeline.run_pipeline`: the
config's ``prepare`` stage if it has one, :func:`trainers.train.train_and_evaluate`, then the
anomaly-detection stages if ``anomaly.enabled``.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import threading
import traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.run",
        description="Train a Tandem config. Running again in the same workdir resumes from its latest checkpoint.",
    )
    parser.add_argument("config", nargs="?", default=None,
                        help="YAML config file (may 'extends: base.yaml'); none: the built-in default, configs/mnist1d_cnn.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.steps=100 data.adapter=torch")
    parser.add_argument("--workdir", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--fresh", action="store_true", help="ignore and delete this workdir's checkpoints; start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = parser.add_argument_group(
        "multi-process runs (jax.distributed)",
        "start the same command in every process, each with its --process-id; all share one --workdir "
        "(a shared file system across hosts). data.batch_size is the global batch: each process reads its slice.")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, which coordinates the run")
    multi.add_argument("--num-processes", type=int, metavar="N", help="how many processes the run has")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    multi.add_argument("--distributed", action="store_true",
                       help="join a run JAX detects by itself (SLURM, Open MPI, TPU pods, Kubernetes)")
    multi.add_argument("--lost-after", type=float, default=60.0, metavar="SECONDS",
                       help="end every process this long after another one stops responding (default: 60)")
    args = parser.parse_args(argv)
    if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid>: every thread's stack, on stderr

    from . import DEFAULT_CONFIG
    from .config import ConfigError, load_config

    if args.config is not None and "=" in args.config and not os.path.exists(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None  # only overrides were given
    if args.config is None:
        args.config = DEFAULT_CONFIG
        print(f"no config given: running the built-in default, {os.path.relpath(DEFAULT_CONFIG)} "
              "(MNIST-1D, 1-D CNN)", flush=True)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])

    from . import distributed

    launch = distributed.Launch(args.coordinator, args.num_processes, args.process_id, args.distributed, args.lost_after)
    try:
        distributed.initialize(launch)
    except (ValueError, RuntimeError) as e:  # an incomplete launch; no cluster found; the coordinator unreachable
        print(f"error: {e}", file=sys.stderr)
        return 2

    from .anomaly.pipeline import run_pipeline

    multi = launch.wanted and distributed.process_count() > 1
    label = distributed.process_label() if multi else ""
    try:
        summary = run_pipeline(config, workdir, fresh=args.fresh, progress=not args.no_progress)
    except ConfigError as e:  # e.g. resuming a checkpoint with a config that changes its state or data
        code, message = 2, str(e)
    except (FloatingPointError, ValueError, KeyError, FileNotFoundError) as e:
        code, message = 1, str(e)
    except BaseException as e:
        if not multi:
            raise
        if type(e).__name__ == "JaxRuntimeError":  # a collective failed: most likely another process ended
            distributed.await_verdict()  # its watchdog then ends this process, naming that one
        # One process failing must not leave the others blocked in a collective: tell them and end now.
        traceback.print_exc()
        code, message = (130, "interrupted (Ctrl-C)") if isinstance(e, KeyboardInterrupt) else (1, repr(e))
    else:
        code, message = 0, ""
    if code:
        print(f"{label}error: {message}", file=sys.stderr)
        if multi:
            distributed.fail(message.splitlines()[0] if message else "", code)
        return code
    if summary.get("interrupted") or label:
        return 0
    ev = ", ".join(f"{k} {v:.4f}" for k, v in summary["eval"].items())
    print(f"done: {summary['steps']} steps in {summary['wall_time_s']} s; {ev}")
    print(f"params sha256 {summary['params_sha256']}")
    print(f"wrote {os.path.join(summary['workdir'], 'summary.json')}, metrics.jsonl, config.yaml, checkpoints/")
    if "anomaly" in summary:
        best = ", ".join(f"{name} {auc:.4f} ({kind})" for name, (kind, auc) in summary["anomaly"]["best_auc"].items())
        print(f"best ROC AUC per signal: {best}")
        print("wrote " + ", ".join(os.path.relpath(p) for p in summary["anomaly"]["files"].values()))
    if "stages" in summary:
        print("stages (s): " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in summary["stages"].items())
              + f"; the stages around training add {100 * summary['pipeline_overhead']:.1f}% to its wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
