"""The trainer vs a minimal hand-written pmap loop, and its data-wait share: ``python -m benchmarks.trainer``.

Same model (the default config's 1-D CNN), optimizer, step function and batches:

- steps/s of ``python -m trainers.run`` (each run in its own process, measured from
  its ``metrics.jsonl`` after the first logging window, so compilation is left out)
  vs a loop that feeds the same batches from device memory (goal >= 0.95x); every
  trainer run is bracketed by two runs of the loop, and its ratio is to their mean;
- the share of the loop's time spent waiting for data, Grain and torch adapters,
  reading HDF5 and tar shards (goal <= 5%): time getting the next batch while the
  device had no step left to run. The time spent reading while a step still ran
  (hidden by JAX's asynchronous dispatch) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def _windows(metrics_path: str, batch: int) -> tuple[float, float, float]:
    """(steps/s, data-wait share, input share) over the logging windows after the first."""
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if '"lr"' in line]
    rows = rows[1:]
    steps = np.diff([0] + [r["step"] for r in rows])[1:] if len(rows) > 1 else np.array([rows[0]["step"]])
    rows = rows[-len(steps):]
    secs = np.array([s * batch / r["samples_per_s"] for s, r in zip(steps, rows, strict=True)])
    wait = np.array([r["data_wait_share"] for r in rows])
    read = np.array([r["input_share"] for r in rows])
    return float(steps.sum() / secs.sum()), float((wait * secs).sum() / secs.sum()), float((read * secs).sum() / secs.sum())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "mnist1d_cnn.yaml"))
    parser.add_argument("--repeats", type=int, default=5, help="runs of each case; medians are reported")
    parser.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the config's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    import jax

    from adapters.jax import split_for_devices
    from loaders import Loader, ProcessPart, Sampler
    from trainers import parallel
    from trainers.config import load_config
    from trainers.data import build_sources
    from trainers.losses import build_loss
    from trainers.models import build_model, takes_rng
    from trainers.train import initial_state, make_optimizer, make_schedule, make_train_step

    common = [f"train.steps={args.steps}", f"train.eval_every={10 * args.steps}",
              f"train.checkpoint_every={10 * args.steps}", "train.log_every=100"]
    if args.batch_size is not None:
        common.append(f"data.batch_size={args.batch_size}")
    print(f"devices: {jax.local_devices()}", flush=True)
    # The hand-written loop: same model, step and batches, fed from device memory.
    config = load_config(args.config, common)
    devices = parallel.local_devices(config.train.devices)
    train_src, _ = build_sources(config.data, ProcessPart())
    sampler = Sampler(len(train_src), config.data.batch_size, seed=config.seed, shuffle=config.data.shuffle)
    host = [{"x": b["x"], "y": b["y"]} for _, b in zip(range(args.steps), Loader(train_src, sampler), strict=False)]
    model = build_model(config.model.name, config.model.kwargs, host[0]["x"].shape[1:], config.seed)
    tx = make_optimizer(config.optimizer, make_schedule(config.schedule, args.steps))
    graphdef, state = initial_state(model, tx, config.seed)
    state = parallel.replicate(state, devices)
    step = parallel.pmapped(make_train_step(graphdef, tx, build_loss(config.loss.name, config.loss.kwargs),
                                            takes_rng(model)), devices, donate=(0,))
    placed = [jax.device_put(split_for_devices(b, len(devices)), parallel.sharding(devices)) for b in host]
    state, m = step(state, placed[0])  # compile
    jax.device_get(m)

    def hand_loop() -> float:
        nonlocal state
        t = time.perf_counter()
        for i, batch in enumerate(placed[1:], 1):
            state, m = step(state, batch)
            if i % 100 == 0:
                jax.device_get(m)  # the trainer syncs at every log window too
        jax.device_get(m)
        return (len(placed) - 1) / (time.perf_counter() - t)

    # Alternate the hand loop and every case, so a noisy neighbour slows them alike;
    # each case's ratio is the median of its ratios to the hand loop of the same round.
    cases = [(a, s) for a in ("grain", "torch") for s in ("h5", "tar")]
    hands, runs = [], {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        hands.append(hand_loop())
        for r in range(args.repeats):
            for adapter, source in cases:
                overrides = [*common, f"data.adapter={adapter}", f"data.source={source}"]
                work = os.path.join(tmp, f"{adapter}-{source}-{r}")
                # the command a user runs, in its own process (as a fresh run would be)
                subprocess.run([sys.executable, "-m", "trainers.run", args.config, *overrides, "--workdir", work,
                                "--no-progress"], check=True, capture_output=True)
                sps, wait, read = _windows(os.path.join(work, "metrics.jsonl"), config.data.batch_size)
                # each run is bracketed by two hand-loop runs: its ratio is to their mean
                hands.append(hand_loop())
                runs[(adapter, source)].append((sps, wait, sps / ((hands[-2] + hands[-1]) / 2), read))
            print(f"  round {r + 1}: hand loop {', '.join(f'{h:,.0f}' for h in hands[-len(cases):])} steps/s; "
                  + "; ".join(f"{a}/{s} {runs[(a, s)][-1][0]:,.0f}" for a, s in cases), flush=True)
    hand = float(np.median(hands))
    results = []
    lines = ["### Trainer (python -m benchmarks.trainer)", "",
             "| case | steps/s | vs hand-written loop (goal >= 0.95x) | data-wait share (goal <= 5%) "
             "| reading share (hidden by async dispatch) |",
             "|---|---:|---:|---:|---:|"]
    lines.append(f"| hand-written pmap loop, batches in device memory | {hand:,.0f} | 1.00x | - | - |")
    for (adapter, source), measured in runs.items():
        sps, wait, ratio, read = (float(np.median([m[i] for m in measured])) for i in range(4))
        lines.append(f"| python -m trainers.run, {adapter} adapter, {source} | {sps:,.0f} | {ratio:.2f}x | "
                     f"{100 * wait:.1f}% | {100 * read:.0f}% |")
        results.append({"adapter": adapter, "source": source, "steps_per_s": sps, "ratio": ratio,
                        "data_wait_share": wait, "input_share": read})
    print()
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"hand_steps_per_s": hand, "runs": results}, f, indent=1)
    os._exit(0)  # skip interpreter teardown of Grain's worker buffers


if __name__ == "__main__":
    main()
