"""A plain PyTorch training loop reading Tandem data, resumable to the same final weights.

    python examples/torch_train.py --workdir /tmp/run --steps 200
    python examples/torch_train.py --workdir /tmp/run --steps 200   # again: resumes

It trains a small MLP on an HDF5 file (``--data``; by default a synthetic
classification set is written into the workdir), saving model, optimizer and
loader state every ``--save-every`` steps. Stop it anywhere (``--stop-after`` does
so on purpose); the next run resumes from the last save and ends with the same
weights as a run that never stopped. It prints the SHA-256 of the final weights.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import h5py
import numpy as np
import torch

from adapters.torch import TorchLoader
from loaders import H5Source, Sampler


def make_data(path: str, n: int = 2048, features: int = 20, classes: int = 4) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, features)) * 2
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(size=(n, features))).astype(np.float32)
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.create_dataset("x", data=x, chunks=(256, features))
        f.create_dataset("y", data=y, compression="gzip")
    os.replace(tmp, path)


def weights_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def save(path: str, model, optimizer, loader, step: int) -> None:
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "loader": loader.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default=None, help="HDF5 file with 'x' (float) and 'y' (int) (default: synthetic)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--stop-after", type=int, default=None, help="exit after this many steps (simulate preemption)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    data = args.data or os.path.join(args.workdir, "data.h5")
    if not os.path.exists(data):
        make_data(data)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    source = H5Source(data, keys=["x", "y"])
    loader = TorchLoader(source, Sampler(len(source), args.batch_size, seed=args.seed), num_workers=args.workers,
                         per_epoch=False)
    features = source.read_batch([0])["x"].shape[1]
    classes = int(h5py.File(data, "r")["y"][:].max()) + 1
    model = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    ckpt = os.path.join(args.workdir, "checkpoint.pt")
    step = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        step = state["step"]
        print(f"resumed from {ckpt} at step {step}")

    loss = None  # a rerun of a finished run trains no step
    for batch in loader:
        if step >= args.steps:
            break
        loss = torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % args.save_every == 0 or step == args.steps:
            save(ckpt, model, optimizer, loader, step)
        if args.stop_after is not None and step >= args.stop_after:
            print(f"stopping at step {step} (--stop-after)")
            return ""
    digest = weights_sha256(model)
    shown = "n/a" if loss is None else f"{loss.item():.4f}"
    print(f"step {step} loss {shown} weights sha256 {digest}")
    return digest


if __name__ == "__main__":
    main()
