"""Losses: plain functions ``(outputs, batch) -> (loss, metrics)``.

``batch`` holds ``"x"`` (the input), ``"y"`` (the label, when the data has one) and,
on padded evaluation batches, ``"_valid"`` (False for padding). Every loss and
metric is a mean over valid records, so evaluation over padded batches is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from .models import resolve

LossFn = Callable[[Any, dict[str, Any]], tuple[jnp.ndarray, dict[str, jnp.ndarray]]]


def _mean(values: jnp.ndarray, batch: dict[str, Any]) -> jnp.ndarray:
    valid = batch.get("_valid")
    if valid is None:
        return values.mean()
    w = valid.astype(values.dtype)
    return (values * w).sum() / jnp.maximum(w.sum(), 1.0)


def _per_record(x: jnp.ndarray) -> jnp.ndarray:
    return x.reshape(x.shape[0], -1).sum(axis=1) if x.ndim > 1 else x


def cross_entropy(outputs, batch):
    """Softmax cross-entropy on integer labels; metrics ``loss`` and ``accuracy``."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs
    labels = batch["y"].astype(jnp.int32)
    loss = _mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels), batch)
    accuracy = _mean((logits.argmax(-1) == labels).astype(jnp.float32), batch)
    return loss, {"loss": loss, "accuracy": accuracy}


def mse(outputs, batch):
    """Mean squared error of ``outputs["recon"]`` (or ``outputs``) against the input (or ``"target"``)."""
    pred = outputs["recon"] if isinstance(outputs, dict) else outputs
    target = batch.get("target", batch["x"]).astype(pred.dtype)
    err = (pred - target) ** 2
    loss = _mean(err.reshape(err.shape[0], -1).mean(axis=1), batch)
    return loss, {"loss": loss}


def vae(outputs, batch, beta: float = 1.0):
    """The VAE objective: reconstruction MSE (summed over features) + ``beta`` x KL(q(z|x) || N(0, 1))."""
    target = batch["x"].astype(outputs["recon"].dtype)
    recon = _mean(_per_record((outputs["recon"] - target) ** 2), batch)
    mean, logvar = outputs["mean"], outputs["logvar"]
    kl = _mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1), batch)
    loss = recon + beta * kl
    return loss, {"loss": loss, "recon": recon, "kl": kl}


LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy, "mse": mse, "vae": vae}


def build_loss(name: str, kwargs: dict[str, Any]) -> LossFn:
    """The loss named in the config, with its keyword arguments bound."""
    fn = resolve(name, LOSSES, "loss")
    if not kwargs:
        return fn

    def bound(outputs, batch):
        return fn(outputs, batch, **kwargs)

    return bound
