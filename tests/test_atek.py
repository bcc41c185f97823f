"""``create_native_atek_dataloader`` on ATEK-style shards (written here with webdataset's ShardWriter,
as ATEK's own writer does) gives what ATEK's reader gives: webdataset's ``decode("torchrgb8")``,
then ATEK's per-sample processing (``*_N.jpeg`` frames restacked to ``[F, C, H, W]``, float64
tensors made float32, ``gt_data#...`` tensors merged into ``gt_data``, semidense points unpacked),
then ``dict_key_mapping``; with ATEK's collation, callable node splitters and iterator adaptors.
"""

from __future__ import annotations

import gc
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
wds = pytest.importorskip("webdataset")
pytest.importorskip("PIL")

from adapters.torch import atek_default_collation_fn, create_native_atek_dataloader  # noqa: E402
from loaders import ProcessPart  # noqa: E402

from .test_wds_parity import same  # noqa: E402

H, W, FRAMES = 6, 8, 2
RGB = "mfcd#camera-rgb+images"
SLAM = "mfcd#camera-slam-left+images"


def atek_sample(i: int, rng: np.random.Generator) -> dict:
    """One sample as ATEK's writer lays it out for webdataset's ShardWriter."""
    n_obj = i % 3 + 1
    lengths = torch.tensor([i % 2 + 1, 2])
    sample = {"__key__": f"seq_AtekDataSample_{i:06}"}
    for f in range(FRAMES):
        sample[f"{RGB}_{f}.jpeg"] = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        sample[f"{SLAM}_{f}.jpeg"] = rng.integers(0, 256, (H, W), dtype=np.uint8)  # single channel: an L JPEG
    sample.update({
        "mfcd#camera-rgb+projection_params.pth": torch.tensor([600.0 + i, 601.0, 320.0, 240.0], dtype=torch.float64),
        "mfcd#camera-rgb+frame_ids.pth": torch.arange(FRAMES, dtype=torch.int64) + 10 * i,
        "mtd#ts_world_device.pth": torch.from_numpy(rng.normal(size=(FRAMES, 3, 4)).astype(np.float32)),
        "sequence_name.txt": f"seq{i // 4}",
        "gt_data.json": {"obb3_gt": {"camera-rgb": {"category_names": ["chair"] * n_obj}}, "scale": 1.5},
        "gt_data#obb3_gt+camera-rgb+category_ids.pth": torch.arange(n_obj, dtype=torch.int32),
        "gt_data#obb3_gt+camera-rgb+object_dimensions.pth": torch.from_numpy(rng.random((n_obj, 3)).astype(np.float32)),
        "msdpd#points_world+stacked.pth": torch.from_numpy(rng.random((int(lengths.sum()), 3)).astype(np.float32)),
        "msdpd#points_world_lengths.pth": lengths,
        "obj_ids.pth": torch.arange(n_obj),  # a tensor whose shape differs between samples
    })
    return sample


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("atek")
    rng = np.random.default_rng(0)
    with wds.ShardWriter(os.path.join(str(folder), "shards-%04d.tar"), maxcount=3, verbose=0) as sink:
        for i in range(7):
            sink.write(atek_sample(i, rng))
    return sorted(os.path.join(str(folder), f) for f in os.listdir(folder) if f.endswith(".tar"))


def atek_reference(shards: list[str], mapping: dict | None = None) -> list[dict]:
    """What ATEK's reader yields for ``shards``, sample by sample, rebuilt from its documented steps
    on top of webdataset's own decoding (ATEK itself needs projectaria_tools)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode(wds.imagehandler("torchrgb8"))
        decoded = list(ds)
        del ds
        gc.collect()
    out = []
    for s in decoded:
        sample, frames = {"__key__": s["__key__"], "__url__": s["__url__"]}, {}
        for k, v in s.items():
            if k.startswith("__"):
                continue
            stem, ext = k.rsplit(".", 1)
            if ext == "jpeg":
                root, index = stem.split("_")[0], int(stem.split("_")[1])
                frames.setdefault(root, {})[index] = v if "rgb" in root else v[0:1]
            elif ext == "pth":
                sample[stem] = v.float() if v.dtype == torch.float64 else v
            else:
                sample[stem] = v
        for root, by_index in frames.items():
            sample[root] = torch.stack([by_index[i] for i in sorted(by_index)])
        if "msdpd#points_world+stacked" in sample:
            lengths = sample["msdpd#points_world_lengths"].tolist()
            sample["msdpd#points_world"] = list(torch.split(sample["msdpd#points_world+stacked"], lengths))
        for key in [k for k in sample if k.startswith("gt_data#")]:
            node = sample["gt_data"]
            *path, leaf = key[len("gt_data#"):].split("+")
            for p in path:
                node = node.setdefault(p, {})
            node[leaf] = sample.pop(key)
        if mapping is not None:
            sample = {mapping.get(k, k): v for k, v in sample.items() if k in ("__key__", "__url__") or k in mapping}
        out.append(sample)
    return out


# --------------------------------------------------------------------------- samples
def test_samples_match_atek_reader(shards):
    expected = atek_reference(shards)
    got = list(create_native_atek_dataloader(shards))
    assert len(got) == len(expected) == 7
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        same(a, b, f"sample {i}")
    first = got[0]
    assert first[RGB].shape == (FRAMES, 3, H, W) and first[RGB].dtype == torch.uint8
    assert first[SLAM].shape == (FRAMES, 1, H, W)
    assert first["mfcd#camera-rgb+projection_params"].dtype == torch.float32
    assert isinstance(first["msdpd#points_world"], list) and len(first["msdpd#points_world"]) == 2
    assert first["gt_data"]["obb3_gt"]["camera-rgb"]["category_ids"].dtype == torch.int32
    assert first["__key__"] == "seq_AtekDataSample_000000" and first["__url__"] == shards[0]


def test_dict_key_mapping_selects_and_renames_atek_names(shards):
    mapping = {RGB: "image", "mfcd#camera-rgb+projection_params": "camera_params", "sequence_name": "sequence_name",
               "gt_data": "gt_data", "msdpd#points_world": "points", "not#in+these_shards": "ignored"}
    loader = create_native_atek_dataloader(shards, dict_key_mapping=mapping)
    got = list(loader)
    expected = atek_reference(shards, mapping)
    assert list(got[0]) == ["__key__", "__url__", "gt_data", "camera_params", "sequence_name", "image", "points"]
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        same(a, b, f"sample {i}")
    read = loader.loader.source.fields  # only the members the mapping needs are read
    assert not any(f.startswith((SLAM, "mtd#", "obj_ids")) for f in read) and "msdpd#points_world_lengths.pth" in read


def test_default_collation_stacks_equal_tensors_and_keeps_lists(shards):
    expected = atek_reference(shards)
    batches = list(create_native_atek_dataloader(shards, batch_size=4))
    assert [len(b["__key__"]) for b in batches] == [4, 3]  # the last batch is short, as webdataset's .batched()
    first = batches[0]
    assert first[RGB].shape == (4, FRAMES, 3, H, W) and first[RGB].dtype == torch.uint8
    same(first[RGB], torch.stack([s[RGB] for s in expected[:4]]))
    same(first["mfcd#camera-rgb+projection_params"], torch.stack([s["mfcd#camera-rgb+projection_params"] for s in expected[:4]]))
    for key in ("obj_ids", "gt_data", "msdpd#points_world", "__key__", "sequence_name"):  # shapes differ, or no tensors
        same(first[key], [s[key] for s in expected[:4]], key)
    same(atek_default_collation_fn([]), {})


def test_collation_fn_may_return_any_structure(shards):
    expected = atek_reference(shards)

    def as_list(samples):  # CubeRCNN's collation in ATEK
        return list(samples)

    for workers in (0, 2):
        batches = list(create_native_atek_dataloader(shards, batch_size=3, collation_fn=as_list, num_workers=workers))
        assert [type(b) for b in batches] == [list] * 3 and [len(b) for b in batches] == [3, 3, 1]
        same([s for b in batches for s in b], expected, f"{workers} workers")
    pairs = list(create_native_atek_dataloader(shards, batch_size=2, collation_fn=lambda s: (len(s), s[0]["__key__"])))
    assert pairs == [(2, "seq_AtekDataSample_000000"), (2, "seq_AtekDataSample_000002"),
                     (2, "seq_AtekDataSample_000004"), (1, "seq_AtekDataSample_000006")]


def test_resume_with_a_list_collation(shards):
    def make():
        return create_native_atek_dataloader(shards, batch_size=2, collation_fn=list, shuffle_flag=True, seed=4)

    straight = [[s["__key__"] for s in b] for b in make()]
    first = make()
    it = iter(first)
    taken = [[s["__key__"] for s in next(it)] for _ in range(2)]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert taken + [[s["__key__"] for s in b] for b in resumed] == straight
    assert sorted(k for b in straight for k in b) == [f"seq_AtekDataSample_{i:06}" for i in range(7)]


# --------------------------------------------------------------------------- node splitters
def _keys(loader) -> list[str]:
    return [s["__key__"] for s in loader]


def test_nodesplitter_may_be_webdataset_callables(shards, monkeypatch):
    every = [f"seq_AtekDataSample_{i:06}" for i in range(7)]
    assert _keys(create_native_atek_dataloader(shards, nodesplitter=wds.split_by_node)) == every
    assert _keys(create_native_atek_dataloader(shards, nodesplitter=wds.single_node_only)) == every
    assert _keys(create_native_atek_dataloader(shards, nodesplitter=ProcessPart(1, 2))) == every[1::2]
    monkeypatch.setenv("RANK", "1")  # webdataset's splitters read the rank as torch.distributed or these set it
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _keys(create_native_atek_dataloader(shards, nodesplitter=wds.split_by_node)) == every[3:6]  # shard 1 of 0..2
    with pytest.raises(ValueError, match="you need to add an explicit nodesplitter to your input pipeline"):
        create_native_atek_dataloader(shards, nodesplitter=wds.single_node_only)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError) as e:
        create_native_atek_dataloader(shards, nodesplitter=wds.split_by_node)
    assert str(e.value) == f"nodesplitter split_by_node left this process none of the 3 shards ({shards[0]} ...)"


def test_nodesplitter_may_be_any_callable(shards):
    def middle(src):
        for item in src:
            if item["url"].endswith("-0001.tar"):
                yield item

    assert _keys(create_native_atek_dataloader(shards, nodesplitter=middle)) == [
        f"seq_AtekDataSample_{i:06}" for i in (3, 4, 5)]


# --------------------------------------------------------------------------- data_transform_fn
def to_model(data):
    """An ATEK-style model adaptor: an iterator of ATEK samples in, an iterator of model samples out."""
    for sample in data:
        yield {"image": sample[RGB][0, [2, 1, 0]].clone(), "fx": float(sample["mfcd#camera-rgb+projection_params"][0]),
               "key": sample["__key__"]}


def test_iterator_adaptor_as_data_transform_fn(shards):
    from webdataset.filters import pipelinefilter

    reference = list(to_model(iter(atek_reference(shards))))  # ATEK: one adaptor over the stream, then batched
    for fn in (to_model, pipelinefilter(to_model)()):  # a generator function, or webdataset's curried form
        batches = list(create_native_atek_dataloader(shards, batch_size=3, data_transform_fn=fn))
        assert [len(b["key"]) for b in batches] == [3, 3, 1]
        for k, b in enumerate(batches):
            part = reference[3 * k : 3 * k + 3]
            same(b["image"], torch.stack([s["image"] for s in part]))
            assert b["key"] == [s["key"] for s in part] and b["fx"].tolist() == [s["fx"] for s in part]
        single = list(create_native_atek_dataloader(shards, data_transform_fn=fn))
        same(single, reference)


def test_filtering_adaptor_gives_shorter_batches_and_resumes_exactly(shards):
    def even_only(data):
        for sample in data:
            if int(sample["__key__"][-1]) % 2 == 0:
                yield sample["__key__"]

    def make():
        return create_native_atek_dataloader(shards, batch_size=3, data_transform_fn=even_only, collation_fn=list)

    straight = list(make())
    assert straight == [["seq_AtekDataSample_000000", "seq_AtekDataSample_000002"], ["seq_AtekDataSample_000004"],
                        ["seq_AtekDataSample_000006"]]  # each batch: what the adaptor kept of 3 samples
    first = make()
    it = iter(first)
    assert next(it) == straight[0]
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert list(resumed) == straight[1:]
    dropped_all = list(create_native_atek_dataloader(shards, batch_size=1, data_transform_fn=even_only, collation_fn=list))
    assert len(dropped_all) == 4  # steps whose samples the adaptor dropped yield no batch


def test_per_sample_transform_and_stream_override(shards):
    keys = [s["__key__"] for s in create_native_atek_dataloader(shards, data_transform_fn=lambda s: {"__key__": s["__key__"]})]
    assert keys == [f"seq_AtekDataSample_{i:06}" for i in range(7)]

    def forward(data):  # not a generator function: only the explicit flag says it takes the stream
        return map(lambda s: s["__key__"], data)

    assert list(create_native_atek_dataloader(shards, data_transform_fn=forward, transform_stream=True)) == keys


def test_repeat_flag_runs_on_in_one_loop(shards):
    loader = create_native_atek_dataloader(shards, batch_size=4, repeat_flag=True, collation_fn=list, shuffle_flag=True)
    seen = []
    for batch in loader:
        seen.append([s["__key__"] for s in batch])
        if len(seen) == 5:
            break
    assert [len(b) for b in seen] == [4, 3, 4, 3, 4]  # epoch after epoch, each with its short last batch
    assert sorted(seen[0] + seen[1]) == sorted(seen[2] + seen[3]) == [f"seq_AtekDataSample_{i:06}" for i in range(7)]
    assert seen[0] + seen[1] != seen[2] + seen[3]  # reshuffled


def test_mapping_of_nothing_and_bad_splitters_are_errors(shards):
    from loaders import DataError

    with pytest.raises(DataError) as e:
        create_native_atek_dataloader(shards, dict_key_mapping={"image": "image"})
    assert str(e.value) == (
        "dict_key_mapping names none of the ATEK keys of these shards: mapping ['image'], keys ['gt_data', "
        "'mfcd#camera-rgb+frame_ids', 'mfcd#camera-rgb+images', 'mfcd#camera-rgb+projection_params', "
        "'mfcd#camera-slam-left+images', 'msdpd#points_world+stacked', 'msdpd#points_world_lengths', "
        f"'mtd#ts_world_device', 'obj_ids', 'sequence_name'] (in {shards[0]} ...)"
    )
    with pytest.raises(TypeError, match="nodesplitter must be a ProcessPart or a callable, got int"):
        create_native_atek_dataloader(shards, nodesplitter=2)
