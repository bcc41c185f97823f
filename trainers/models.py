"""Built-in Flax NNX models. Each is called as ``model(x, rng=None)``.

A config names one of ``MODELS`` or any class by import path (``package.module:Class``);
the class gets the config's keyword arguments, ``rngs``, and ``input_shape`` (one
record's shape) when its constructor accepts it.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
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


ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid,
    "elu": jax.nn.elu, "leaky_relu": jax.nn.leaky_relu, "linear": lambda x: x,
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def fake_quant(x: jnp.ndarray, total_bits: int, integer_bits: int) -> jnp.ndarray:
    """``x`` rounded to the signed fixed-point grid ``<total_bits, integer_bits>`` and saturated at its
    range (as :func:`trainers.anomaly.prepare.quantize`), with a straight-through gradient: the
    forward pass sees the quantized value, the backward pass the identity (zero where saturated)."""
    step = 2.0 ** -(total_bits - integer_bits)
    lo, hi = -(2.0 ** (integer_bits - 1)), 2.0 ** (integer_bits - 1) - step
    clipped = jnp.clip(x, lo, hi)
    return clipped + jax.lax.stop_gradient(jnp.round(clipped / step) * step - clipped)


class PartSpec:
    """One model part's settings (AXOL1TL's ``encoder_config`` / ``decoder_config``).

    ``nodes``: the hidden layer widths; ``activation``: a name in :data:`ACTIVATIONS`;
    ``dtype``: the compute precision (``float32``, ``bfloat16``, ``float16``; parameters stay
    float32); ``quant``: ``{"total_bits": 8, "integer_bits": 3}`` trains the part aware of
    fixed-point firmware: weights, biases and every layer's output are fake-quantized
    (straight-through gradients), or None.
    """

    def __init__(self, spec: dict[str, Any] | None, default_nodes: Sequence[int], where: str) -> None:
        spec = dict(spec or {})
        unknown = set(spec) - {"nodes", "activation", "dtype", "quant"}
        if unknown:
            raise ValueError(f"{where} has unknown settings {sorted(unknown)} (known: nodes, activation, dtype, quant)")
        self.nodes = [int(n) for n in spec.get("nodes", default_nodes)]
        if any(n < 1 for n in self.nodes):
            raise ValueError(f"{where}.nodes must be positive layer widths, got {self.nodes}")
        act = spec.get("activation", "relu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{where}.activation {act!r} is not one of {sorted(ACTIVATIONS)}")
        self.activation_name, self.activation = act, ACTIVATIONS[act]
        dtype = spec.get("dtype", "float32")
        if dtype not in DTYPES:
            raise ValueError(f"{where}.dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        q = spec.get("quant")
        if q is not None:
            if not isinstance(q, dict) or set(q) != {"total_bits", "integer_bits"}:
                raise ValueError(f"{where}.quant must be {{total_bits: N, integer_bits: M}}, got {q!r}")
            if not 1 < int(q["total_bits"]) <= 32 or not 0 < int(q["integer_bits"]) <= int(q["total_bits"]):
                raise ValueError(f"{where}.quant needs 1 < total_bits <= 32 and 0 < integer_bits <= total_bits, got {q}")
            q = (int(q["total_bits"]), int(q["integer_bits"]))
        self.quant = q

    def mirrored(self) -> dict[str, Any]:
        """The settings of the mirror-image part: the same, with the widths reversed."""
        quant = None if self.quant is None else {"total_bits": self.quant[0], "integer_bits": self.quant[1]}
        return {"nodes": list(reversed(self.nodes)), "activation": self.activation_name, "dtype": self.dtype_name,
                "quant": quant}

    def run(self, layers, x, *, last_activation: bool):
        """``x`` through ``layers`` in this part's precision; the activation after every layer but the
        last (and after the last too if ``last_activation``). Returns float32."""
        x = x.astype(self.dtype)
        q = self.quant
        for i, layer in enumerate(layers):
            kernel, bias = layer.kernel[...], layer.bias[...]
            if q is not None:
                kernel, bias, x = fake_quant(kernel, *q), fake_quant(bias, *q), fake_quant(x, *q)
            x = x @ kernel.astype(self.dtype) + bias.astype(self.dtype)
            if i < len(layers) - 1 or last_activation:
                x = self.activation(x)
        if q is not None:
            x = fake_quant(x, *q)
        return x.astype(jnp.float32)


def _parts(input_shape, hidden, encoder, decoder, kind):
    enc = PartSpec(encoder, hidden, f"{kind}.encoder")
    dec = PartSpec(decoder if decoder is not None else enc.mirrored(), list(reversed(enc.nodes)), f"{kind}.decoder")
    return math.prod(input_shape), enc, dec


class AutoEncoder(nnx.Module):
    """Dense encoder to ``latent`` features and a decoder back; outputs ``{"recon", "latent"}``.

    ``encoder`` / ``decoder``: each part's settings (see :class:`PartSpec`: ``nodes``,
    ``activation``, ``dtype``, ``quant``); the decoder mirrors the encoder unless given.
    ``hidden`` is the encoder's widths when ``encoder`` gives none.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (32,), latent: int = 8, *,
                 encoder: dict[str, Any] | None = None, decoder: dict[str, Any] | None = None,
                 rngs: nnx.Rngs) -> None:
        n, self.enc, self.dec = _parts(input_shape, hidden, encoder, decoder, "autoencoder")
        self.encoder = _dense_stack([n, *self.enc.nodes, latent], rngs)
        self.decoder = _dense_stack([latent, *self.dec.nodes, n], rngs)

    def __call__(self, x, rng=None):
        flat = x.reshape(x.shape[0], -1)
        z = self.enc.run(self.encoder, flat, last_activation=False)
        recon = self.dec.run(self.decoder, self.dec.activation(z), last_activation=False)
        return {"recon": recon.reshape(x.shape), "latent": z}


class VAE(nnx.Module):
    """Variational autoencoder (AXOL1TL's anomaly-detection model): a dense encoder to a
    Gaussian latent, a reparameterized sample (the mean when ``rng`` is None, as when
    scoring), a dense decoder. Outputs ``{"recon", "mean", "logvar"}``.

    ``encoder`` / ``decoder``: each part's settings (see :class:`PartSpec`: ``nodes``,
    ``activation``, ``dtype``, ``quant``), e.g. ``encoder: {nodes: [32, 16], dtype: bfloat16}``;
    the decoder mirrors the encoder unless given. ``hidden`` is the encoder's widths when
    ``encoder`` gives none. The latent mean and log-variance layers belong to the encoder.
    """

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (32, 16), latent: int = 4, *,
                 encoder: dict[str, Any] | None = None, decoder: dict[str, Any] | None = None,
                 rngs: nnx.Rngs) -> None:
        n, self.enc, self.dec = _parts(input_shape, hidden, encoder, decoder, "vae")
        width = self.enc.nodes[-1] if self.enc.nodes else n
        self.encoder = _dense_stack([n, *self.enc.nodes], rngs)
        self.mean = nnx.Linear(width, latent, rngs=rngs)
        self.logvar = nnx.Linear(width, latent, rngs=rngs)
        self.decoder = _dense_stack([latent, *self.dec.nodes, n], rngs)

    def __call__(self, x, rng=None):
        flat = x.reshape(x.shape[0], -1)
        h = self.enc.run(self.encoder, flat, last_activation=True) if len(self.encoder) else flat
        mean = self.enc.run([self.mean], h, last_activation=False)
        logvar = self.enc.run([self.logvar], h, last_activation=False)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return {"recon": self.dec.run(self.decoder, z, last_activation=False).reshape(x.shape), "mean": mean,
                "logvar": logvar}


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
