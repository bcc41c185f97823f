"""What depends on the machine: where worker slots are sound, and which mmap flags a span may use."""

from __future__ import annotations

import mmap
import platform
import sys

import numpy as np
import pytest

from adapters._slots import use_slots
from loaders import TarSource
from loaders._span import map_span, mmap_flags

REFUSED = (
    "shared_slots=True needs an x86-64 machine, and this one is {0!r}: the slots detect a batch overwritten while it "
    "is read only if each process's memory stores and loads stay in program order, which x86-64 guarantees and {0!r} "
    "does not without memory barriers (Python cannot issue them), so a wrong batch could pass unnoticed. "
    "Use shared_slots=None (here: the framework's own hand-off) or False."
)


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "amd64"])
def test_slots_are_used_on_x86_64(machine, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert use_slots(None) is True
    assert use_slots(True) is True
    assert use_slots(False) is False


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "armv7l", "ppc64le", "riscv64", ""])
def test_slots_are_not_used_elsewhere_and_refused_when_asked_for(machine, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert use_slots(None) is False
    assert use_slots(False) is False
    with pytest.raises(ValueError) as e:
        use_slots(True)
    assert str(e.value) == REFUSED.format(machine)


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="Linux x86-64 values")
def test_span_flags_on_linux_x86_64():
    flags = mmap_flags()
    assert (flags.prot_none, flags.prot_read) == (0, mmap.PROT_READ) == (0, 0x1)
    assert flags.reserve == 0x02 | 0x20 | 0x4000  # MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
    assert flags.file == 0x01 | 0x10  # MAP_SHARED | MAP_FIXED


@pytest.mark.parametrize("machine", ["riscv64", "ppc64le", "mips"])
def test_span_is_refused_where_its_flags_are_unknown(machine, wds_shards, records, monkeypatch):
    """No guessed mmap flags: the tar reader falls back to one map per shard and reads the same records."""
    if mmap_flags() is None:
        pytest.skip("this platform has no span anyway")
    with_span = TarSource(wds_shards)
    assert with_span._all_shards() is not None
    monkeypatch.setattr(platform, "machine", lambda: machine)
    assert mmap_flags() is None and map_span(wds_shards) is None
    src = TarSource(wds_shards)
    assert src._all_shards() is None
    order = np.random.default_rng(1).permutation(len(src))
    batch = src.read_batch(order)
    x, y = records
    np.testing.assert_array_equal(batch["npy"], x[order])
    np.testing.assert_array_equal(batch["cls"], y[order])
    expected = with_span.read_batch(order)
    for k in expected:
        assert batch[k].dtype == expected[k].dtype
        np.testing.assert_array_equal(batch[k], expected[k])


def test_slots_need_dev_shm(monkeypatch):
    import os

    isdir = os.path.isdir
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(os.path, "isdir", lambda p: False if p == "/dev/shm" else isdir(p))
    assert use_slots(None) is False
    with pytest.raises(ValueError, match=r"^shared_slots=True needs /dev/shm \(Linux\), which this machine lacks"):
        use_slots(True)
