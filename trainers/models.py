"""Built-in Flax NNX models. Each is called as ``model(x, rng=None)``.

A config names one of ``MODELS`` or any class by import path (``package.module:Class``);
the class gets the config's keyword arguments, ``rngs``, and ``input_shape`` (one
record's shape) when its constructor accepts it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def _dense_stack(sizes: Sequence[int], rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])


def _run(layers, x):
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


class MLP(nnx.Module):
    """Flatten, then dense layers with ReLU between them (MNIST-1D's MLP: hidden=(100, 100))."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int = 10, hidden: Sequence[int] = (100, 100), *,
                 rngs: nnx.Rngs) -> None:
        self.layers = _dense_stack([math.prod(input_shape), *hidden, num_outputs], rngs)

    def __call__(self, x, rng=None):
        return _run(self.layers, x.reshape(x.shape[0], -1))


class CNN1D(nnx.Module):
    """MNIST-1D's ConvBase: three strided 1-D convolutions with ReLU, then a dense layer.

    Input ``(batch, length)`` or ``(batch, length, channels)``.
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int = 10, channels: int = 25, *,
                 rngs: nnx.Rngs) -> None:
        length = input_shape[0]
        in_ch = input_shape[1] if len(input_shape) > 1 else 1
        self.convs = nnx.List([
            nnx.Conv(in_ch, channels, kernel_size=(5,), strides=(2,), padding=[(1, 1)], rngs=rngs),
            nnx.Conv(channels, channels, kernel_size=(3,), strides=(2,), padding=[(1, 1)], rngs=rngs),
            nnx.Conv(channels, channels, kernel_size=(3,), strides=(2,), padding=[(1, 1)], rngs=rngs),
        ])
        for k in (5, 3, 3):
            length = (length + 2 - k) // 2 + 1
        self.head = nnx.Linear(channels * length, num_outputs, rngs=rngs)

    def __call__(self, x, rng=None):
        if x.ndim == 2:
            x = x[..., None]
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        return self.head(x.reshape(x.shape[0], -1))


class CNN2D(nnx.Module):
    """Two 3x3 convolutions with 2x2 max pooling, then a dense layer. Input ``(batch, H, W, C)``;
    ``channels_first=True`` takes ``(batch, C, H, W)`` (e.g. images stored as CHW ``.npy``)."""

    def __init__(self, input_shape: Sequence[int], num_outputs: int = 10, channels: Sequence[int] = (32, 64),
                 channels_first: bool = False, *, rngs: nnx.Rngs) -> None:
        shape = list(input_shape)
        if channels_first:
            shape = shape[1:] + shape[:1]
        h, w, c = shape if len(shape) == 3 else (*shape, 1)
        self.channels_first = channels_first
        self.convs = nnx.List([nnx.Conv(a, b, kernel_size=(3, 3), rngs=rngs)
                               for a, b in zip([c, *channels[:-1]], channels, strict=True)])
        for _ in channels:
            h, w = h // 2, w // 2
        self.head = nnx.Linear(channels[-1] * h * w, num_outputs, rngs=rngs)

    def __call__(self, x, rng=None):
        if self.channels_first:
            x = jnp.moveaxis(x, 1, -1)
        if x.ndim == 3:
            x = x[..., None]
        x = x.astype(jnp.float32)
        for conv in self.convs:
            x = nnx.max_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


class AutoEncoder(nnx.Module):
    """Dense encoder to ``latent`` features and a mirrored decoder; outputs ``{"recon", "latent"}``."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (32,), latent: int = 8, *,
                 rngs: nnx.Rngs) -> None:
        n = math.prod(input_shape)
        self.encoder = _dense_stack([n, *hidden, latent], rngs)
        self.decoder = _dense_stack([latent, *reversed(hidden), n], rngs)

    def __call__(self, x, rng=None):
        flat = x.reshape(x.shape[0], -1)
        z = _run(self.encoder, flat)
        return {"recon": _run(self.decoder, jax.nn.relu(z)).reshape(x.shape), "latent": z}


class VAE(nnx.Module):
    """Variational autoencoder (AXOL1TL's anomaly-detection pattern): dense encoder to a Gaussian
    latent, reparameterized sample, dense decoder. Outputs ``{"recon", "mean", "logvar"}``."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (32, 16), latent: int = 4, *,
                 rngs: nnx.Rngs) -> None:
        n = math.prod(input_shape)
        self.encoder = _dense_stack([n, *hidden], rngs)
        self.mean = nnx.Linear(hidden[-1], latent, rngs=rngs)
        self.logvar = nnx.Linear(hidden[-1], latent, rngs=rngs)
        self.decoder = _dense_stack([latent, *reversed(hidden), n], rngs)

    def __call__(self, x, rng=None):
        flat = x.reshape(x.shape[0], -1)
        h = jax.nn.relu(_run(self.encoder, flat))
        mean, logvar = self.mean(h), self.logvar(h)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return {"recon": _run(self.decoder, z).reshape(x.shape), "mean": mean, "logvar": logvar}


MODELS: dict[str, type] = {"mlp": MLP, "cnn1d": CNN1D, "cnn2d": CNN2D, "autoencoder": AutoEncoder, "vae": VAE}


def import_path(path: str) -> Any:
    """``package.module:attr`` -> the object."""
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"{path!r} is not an import path of the form package.module:name")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"cannot import {module!r} (from {path!r}): {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no attribute {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    return obj


def resolve(name: str, table: dict[str, Any], kind: str) -> Any:
    """A built-in from ``table``, or any object named by import path ``module:attr``."""
    if ":" in name:
        return import_path(name)
    if name in table:
        return table[name]
    raise ValueError(f"unknown {kind} {name!r}: use one of {sorted(table)} or an import path module:name")


def build_model(name: str, kwargs: dict[str, Any], input_shape: Sequence[int], seed: int) -> nnx.Module:
    """A model from its config name and keyword arguments, initialized from ``seed``."""
    cls = resolve(name, MODELS, "model")
    params = inspect.signature(cls.__init__).parameters
    extra = {"input_shape": tuple(input_shape)} if "input_shape" in params else {}
    try:
        return cls(**extra, **kwargs, rngs=nnx.Rngs(seed))
    except TypeError as e:
        raise ValueError(f"model {name!r} does not take these arguments {kwargs}: {e}") from None


def takes_rng(model: nnx.Module) -> bool:
    return "rng" in inspect.signature(model.__call__).parameters
