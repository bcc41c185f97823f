"""Losses: plain functions ``(outputs, batch) -> (loss, metrics)``; one that also takes
``step`` gets the training step (e.g. the VAE's beta warmup).

``batch`` holds ``"x"`` (the input), ``"y"`` (the label, when the data has one) and,
on padded evaluation batches, ``"_valid"`` (False for padding). Every loss and
metric is a mean over valid records, so evaluation over padded batches is exact.
"""

from __future__ import annotations

import inspect
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


def _recon_terms(pred, target, kind: str, weights) -> jnp.ndarray:
    """Per-record reconstruction error, summed over features with per-feature ``weights`` (0 masks one out)."""
    diff = pred.reshape(pred.shape[0], -1) - target.reshape(target.shape[0], -1).astype(pred.dtype)
    if kind == "mse":
        err = diff**2
    elif kind == "mae":
        err = jnp.abs(diff)
    else:
        raise ValueError(f"unknown reconstruction error {kind!r} (known: mse, mae)")
    if weights is not None:
        w = jnp.asarray(weights, dtype=err.dtype).reshape(-1)
        if w.shape[0] != err.shape[1]:
            raise ValueError(f"loss feature_weights has {w.shape[0]} entries for {err.shape[1]} features")
        err = err * w
    return err.sum(axis=1)


def beta_at(step, beta: float, beta_start: float = 0.0, beta_warmup_steps: int = 0):
    """The KL weight at ``step``: ``beta_start`` rising linearly to ``beta`` over ``beta_warmup_steps``
    (KL annealing), then ``beta``; ``beta`` itself when ``step`` is None (evaluation) or no warmup."""
    if step is None or not beta_warmup_steps:
        return beta
    frac = jnp.minimum(jnp.asarray(step, jnp.float32) / beta_warmup_steps, 1.0)
    return beta_start + (beta - beta_start) * frac


def reconstruction(outputs, batch, reconstruction: str = "mse", feature_weights=None):
    """An autoencoder's loss: the reconstruction error of ``outputs["recon"]`` against the input,
    ``mse`` or ``mae``, summed over features weighted by ``feature_weights`` (one per feature;
    0 masks a feature out, e.g. padding slots), averaged over records."""
    pred = outputs["recon"] if isinstance(outputs, dict) else outputs
    loss = _mean(_recon_terms(pred, batch["x"], reconstruction, feature_weights), batch)
    return loss, {"loss": loss}


def vae(outputs, batch, beta: float = 1.0, *, reconstruction: str = "mse", feature_weights=None,
        beta_start: float = 0.0, beta_warmup_steps: int = 0, step=None):
    """The VAE objective: reconstruction error (``mse`` or ``mae``, summed over features, weighted by
    ``feature_weights``) + beta x KL(q(z|x) || N(0, 1)). With ``beta_warmup_steps``, beta rises
    linearly from ``beta_start`` (KL annealing); metrics ``loss``, ``recon``, ``kl``, ``beta``."""
    recon = _mean(_recon_terms(outputs["recon"], batch["x"], reconstruction, feature_weights), batch)
    mean, logvar = outputs["mean"], outputs["logvar"]
    kl = _mean(-0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1), batch)
    b = beta_at(step, beta, beta_start, beta_warmup_steps)
    loss = recon + b * kl
    metrics = {"loss": loss, "recon": recon, "kl": kl}
    if beta_warmup_steps and step is not None:  # training: the current beta; evaluation uses beta itself
        metrics["beta"] = jnp.asarray(b, jnp.float32)
    return loss, metrics


LOSSES: dict[str, Callable] = {"cross_entropy": cross_entropy, "mse": mse, "reconstruction": reconstruction, "vae": vae}


def takes_step(fn: Callable) -> bool:
    """Whether a loss takes the training step (``step=``, e.g. for a beta schedule)."""
    try:
        return "step" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_loss(name: str, kwargs: dict[str, Any]) -> LossFn:
    """The loss named in the config, with its keyword arguments bound, called as
    ``loss(outputs, batch, step=None)``: the step reaches losses that take ``step``
    (None in evaluation)."""
    fn = resolve(name, LOSSES, "loss")
    try:
        inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as e:
        raise ValueError(f"loss {name!r} does not take these arguments {kwargs}: {e}") from None
    with_step = takes_step(fn)

    def bound(outputs, batch, step=None):
        return fn(outputs, batch, **kwargs, step=step) if with_step else fn(outputs, batch, **kwargs)

    return bound
