"""A user's model and loss, named in a config by import path (used by test_trainer)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    def __init__(self, input_shape, classes: int = 10, *, rngs: nnx.Rngs) -> None:
        self.dense = nnx.Linear(input_shape[0], classes, rngs=rngs)

    def __call__(self, x):  # no rng argument: the trainer passes none
        return self.dense(x)


def squared_hinge(outputs, batch):
    onehot = jnp.eye(outputs.shape[-1])[batch["y"]]
    loss = jnp.mean(jnp.maximum(0.0, 1.0 - (2 * onehot - 1) * outputs) ** 2)
    return loss, {"loss": loss, "accuracy": jnp.mean(outputs.argmax(-1) == batch["y"])}


class ScaledH5:
    """A user's source named by import path: the HDF5 records with ``x`` scaled by 2."""

    data_format = "hdf5"  # the built-in dataset's HDF5 files

    def __init__(self, path, keys=None, rename=None) -> None:
        from loaders import H5Source

        self.inner = H5Source(path, keys, rename=rename)

    def __len__(self) -> int:
        return len(self.inner)

    def read_batch(self, indices):
        batch = self.inner.read_batch(indices)
        return {**batch, "x": batch["x"] * 2}

    def describe(self) -> str:
        return f"ScaledH5({self.inner.describe()})"


class FailsInProcessOne:
    """The HDF5 records, but process 1 of a multi-process run fails its 20th read (used by test_multiprocess)."""

    data_format = "hdf5"

    def __init__(self, path, keys=None, rename=None) -> None:
        from loaders import H5Source

        self.inner = H5Source(path, keys, rename=rename)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.inner)

    def describe(self) -> str:
        return self.inner.describe()

    def read_batch(self, indices):
        import jax

        self.reads += 1
        if jax.process_index() == 1 and self.reads == 20:
            raise ValueError("injected read error")
        return self.inner.read_batch(indices)
