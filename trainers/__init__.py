"""Tandem's JAX/Flax/optax trainer: ``python -m trainers.run [config.yaml] [dotted.key=value ...]``.

From Python, :func:`main` runs the same pipeline with a config file or dict and nested overrides.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mnist1d_cnn.yaml")


def main(config: str | dict[str, Any] | None = None, overrides: dict[str, Any] | list[str] | None = None,
         workdir: str | None = None, *, fresh: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train: ``config`` a YAML path or a dict (None: the built-in default, MNIST-1D with a
    1-D CNN), ``overrides`` a nested dict deep-merged over it with the same rules as
    ``extends:`` and the command line (or ``dotted.key=value`` strings), e.g.
    ``main(overrides={"model": {"kwargs": {"channels": 16}}})``. Returns the run's summary.

    ``workdir`` defaults to ``runs/<config file name>`` (``runs/config`` for a dict).
    """
    from .anomaly.pipeline import run_pipeline
    from .config import load_config

    path = DEFAULT_CONFIG if config is None else config
    cfg = load_config(path, overrides or ())
    if workdir is None:
        workdir = os.path.join("runs", os.path.splitext(os.path.basename(path))[0] if isinstance(path, str) else "config")
    return run_pipeline(cfg, workdir, fresh=fresh, progress=progress)
