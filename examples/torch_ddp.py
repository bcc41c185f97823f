"""Data-parallel PyTorch (DDP, gloo on CPU) reading Tandem data, resumable across kills and world sizes.

    torchrun --nproc_per_node=2 examples/torch_ddp.py --workdir /tmp/ddp --steps 200
    torchrun --nproc_per_node=2 examples/torch_ddp.py --workdir /tmp/ddp --steps 200   # again: resumes
    python examples/torch_ddp.py --workdir /tmp/ddp --steps 300    # one process resumes the 2-rank run

The multi-process twin of ``torch_train.py`` (same data, model and weights SHA-256).
Every rank reads its slice of the same *global* batch (``ProcessPart`` mode
``"global"``, rank and world size from ``torch.distributed``), so the sequence of
global batches does not depend on the number of ranks. Rank 0 writes model,
optimizer and loader state atomically every ``--save-every`` steps; every rank
reads it back on start. Kill any rank (even ``kill -9``), relaunch, and the run
ends with the same weights as one that never stopped.

What is exact (measured on CPU with torch 2.13, the default synthetic data):
- Same world size: the final weights are bit-identical (same SHA-256) whether the
  run was killed and relaunched or not. One process (``python``, or torchrun with
  one rank) ends with the same SHA-256 as ``torch_train.py``.
- Another world size: the same global batches, step for step, but not bit-identical
  weights. DDP averages the ranks' gradients, each a mean over the rank's slice; one
  rank takes the mean over the whole batch: the same sum, rounded in another order
  (the batch sum inside the weight-gradient matmul is split in two). After one step
  10 of the 1604 weights differ, by 1 to 4 float32 ulps; after 60 Adam steps by at
  most 3e-8, after 200 by 4.5e-8 (tests/test_torch_ddp.py allows 1e-6).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import sys
import time

import h5py
import torch
import torch.distributed as dist
from torch_train import make_data, weights_sha256  # the single-process example, next to this file

from adapters.torch import TorchLoader
from loaders import H5Source, ProcessPart, Sampler, StateMismatchError


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically: a kill at any point leaves the old file or the new one, whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)  # and the rename itself survives a power cut
    finally:
        os.close(fd)


def record_ids(x: torch.Tensor) -> list[str]:
    """A short content hash per record: which samples a rank read, without an id column in the data."""
    return [hashlib.sha256(row.tobytes()).hexdigest()[:12] for row in x.numpy()]


def gather(obj, world: int) -> list:
    """``obj`` from every rank, in rank order (just ``[obj]`` without a process group)."""
    if world == 1 and not dist.is_initialized():
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def loss_fn(logits: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None, world: int) -> torch.Tensor:
    """This rank's share of the mean loss over the global batch's real records.

    DDP averages gradients over ranks. Without padding, each rank's mean is right. With
    the padded last batch of ``--keep-remainder`` (``_valid`` False for padding), a
    rank may hold few or no real records: weight by the global count of real records,
    times ``world`` to undo DDP's average. A rank of pure padding still runs backward
    (zero gradients), so every rank joins every all-reduce.
    """
    if valid is None:
        return torch.nn.functional.cross_entropy(logits, y)
    per_record = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    count = valid.sum()
    if dist.is_initialized():
        dist.all_reduce(count)
    return (per_record * valid).sum() * world / count


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", default=None, help="HDF5 file with 'x' (float) and 'y' (int) (default: synthetic)")
    p.add_argument("--records", type=int, default=2048, help="records in the synthetic data (when --data is not given)")
    p.add_argument("--steps", type=int, default=200, help="global steps to train (fewer if --epochs ends first)")
    p.add_argument("--epochs", type=int, default=None, help="stop at the end of this many epochs (default: endless stream)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="GLOBAL batch size, summed over ranks; must divide by the world size (each rank reads batch/world)")
    p.add_argument("--keep-remainder", action="store_true",
                   help="pad the last batch of an epoch (masked out of the loss) instead of dropping the records left over")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--stop-after", type=int, default=None, help="exit after this many steps (simulate preemption)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120,
                   help="seconds a collective waits for the other ranks before failing (gloo's default is 30 min)")
    p.add_argument("--batch-log", default=None,
                   help="rank 0 appends 'step world digest' per step: the digest of the global batch's records, in rank order")
    p.add_argument("--throttle", type=float, default=0, help="sleep this long after each step (to watch or interrupt a run)")
    args = p.parse_args(argv)

    # torchrun sets RANK / WORLD_SIZE; run as plain `python`, this is one process without a process group.
    launched = "WORLD_SIZE" in os.environ
    env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch_size < 1 or args.batch_size % env_world:
        # The same on every rank: refuse before anyone waits for anyone.
        if env_rank == 0:
            print(f"error: --batch-size {args.batch_size} is the global batch and must be a positive multiple of the "
                  f"world size {env_world}", file=sys.stderr)
        sys.exit(2)

    if launched:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    try:
        return train(args, rank, world)
    except StateMismatchError as e:  # every rank reads the same checkpoint, so every rank gets here
        if rank == 0:
            print(f"error: cannot resume from {os.path.join(args.workdir, 'checkpoint.pt')}: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int) -> str:
    os.makedirs(args.workdir, exist_ok=True)
    data = args.data or os.path.join(args.workdir, "data.h5")
    if rank == 0 and not os.path.exists(data):
        make_data(data, n=args.records)
    if dist.is_initialized():
        dist.barrier()  # the data exists before anyone opens it
    source = H5Source(data, keys=["x", "y"])
    sampler = Sampler(len(source), args.batch_size, seed=args.seed, drop_remainder=not args.keep_remainder,
                      part=ProcessPart(rank, world, "global"), num_epochs=args.epochs)
    # pad_last: every rank takes same-shaped batches and weights the loss by the _valid mask
    loader = TorchLoader(source, sampler, num_workers=args.workers, per_epoch=False, pad_last=True)
    ckpt = os.path.join(args.workdir, "checkpoint.pt")
    state = None
    if os.path.exists(ckpt):
        # Every rank reads the file itself; none can have moved on and rewritten it yet, as
        # rank 0 saves only after a step that needs every rank (DDP's all-reduce).
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        loader.load_state_dict(state["loader"])  # a checkpoint of other data fails here, before anything is built

    # Determinism: the same initial weights on every rank (DDP would broadcast rank 0's anyway),
    # one thread, deterministic kernels: a rerun at the same world size repeats every bit.
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    features = source.read_batch([0])["x"].shape[1]
    with h5py.File(data, "r") as f:
        classes = int(f["y"][:].max()) + 1
    model = torch.nn.Sequential(torch.nn.Linear(features, 64), torch.nn.ReLU(), torch.nn.Linear(64, classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {step} (saved by {state['world_size']} rank(s), now {world})", flush=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if dist.is_initialized() else model

    last = args.steps if sampler.total_steps is None else min(args.steps, sampler.total_steps)
    taken, loss = 0, None
    log = open(args.batch_log, "a") if args.batch_log and rank == 0 else None  # closed in the finally below
    try:
        for batch in loader:
            if step >= last:
                break
            valid = batch.get("_valid")
            loss = loss_fn(ddp(batch["x"]), batch["y"], valid, world)
            optimizer.zero_grad()
            loss.backward()  # DDP: all-reduces (averages) the gradients of every rank
            optimizer.step()
            step += 1
            taken += 1
            if args.batch_log:
                ids = gather(record_ids(batch["x"]), world)
                if log is not None:
                    digest = hashlib.sha256(",".join(i for part in ids for i in part).encode()).hexdigest()[:16]
                    log.write(f"{step} {world} {digest}\n")
                    log.flush()
            if step % args.save_every == 0 or step == last:
                if dist.is_initialized():
                    dist.barrier()  # every rank has finished this step: the checkpoint is a state all agree on
                if rank == 0:
                    save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                           "loader": loader.state_dict(), "step": step, "world_size": world})
            if args.throttle:
                time.sleep(args.throttle)
            if args.stop_after is not None and step >= args.stop_after:
                if rank == 0:
                    print(f"stopping at step {step} (--stop-after)", flush=True)
                return ""
    finally:
        if log is not None:
            log.close()

    # Every rank says how many batches it took (equal, or DDP would have hung), and the
    # replicas must agree bit for bit (DDP keeps them in step; this checks it).
    print(f"rank {rank}/{world}: {taken} batches", flush=True)
    digest = weights_sha256(model)
    digests = gather(digest, world)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights differ: {digests}")
    if loss is not None and dist.is_initialized():
        loss = loss.detach()
        dist.all_reduce(loss)  # the last step's loss over the global batch (each rank holds its share times world)
        loss /= world
    if rank == 0:
        shown = "n/a" if loss is None else f"{loss.item():.4f}"
        print(f"step {step} loss {shown} weights sha256 {digest}", flush=True)
    return digest


if __name__ == "__main__":
    main()
