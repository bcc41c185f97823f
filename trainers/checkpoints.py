"""Checkpoints through orbax: train state + LoaderState + resolved config + library versions.

orbax writes each step to a temporary folder and renames it when complete, so a
process killed mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import orbax.checkpoint as ocp

LIBRARIES = ("jax", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "h5py", "torch", "tandem")


def versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """The manager of ``workdir/checkpoints``, keeping the last ``keep``; it knows each item's handler,
    so one item can be restored alone (:func:`saved_config`)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "loader": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "versions": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
                                 item_handlers=handlers)


def save(mgr: ocp.CheckpointManager, step: int, state: Any, loader: dict, config: dict) -> None:
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=ocp.args.JsonSave(loader),
            config=ocp.args.JsonSave(config),
            versions=ocp.args.JsonSave(versions()),
        ),
        force=True,
    )
    mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, step: int, like: Any) -> dict[str, Any]:
    """Checkpoint ``step``, its train state shaped like ``like``."""
    return mgr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(like),
            loader=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
            versions=ocp.args.JsonRestore(),
        ),
    )


def saved_config(mgr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """The resolved config checkpoint ``step`` was saved with (nothing else is read)."""
    return mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
