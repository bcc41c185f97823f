"""A small ATEK-style data store to try the ATEK drop-in on without ATEK's data.

Writes ``OUT/SEQUENCE/shards-NNNN.tar`` for a few sequences of CubeRCNN-like samples, laid out as
ATEK's preprocessing writes them with webdataset's ``ShardWriter`` (``*_N.jpeg`` frames of an RGB
and a grayscale SLAM camera, ``.pth`` tensors, ``gt_data`` JSON and tensors, semidense points,
``sequence_name.txt``), and ``OUT/AriaDigitalTwin_ATEK_download_urls.json``: ATEK's URL JSON with
the URLs under ``--base-url``, their sha1 and size. Serve ``OUT`` over HTTP and hand the JSON to
``python -m loaders.datastore``, as you would the JSON ATEK's data store gives you::

    python examples/atek_demo_store.py data/atek_store --base-url http://127.0.0.1:8765
    python -m http.server 8765 --bind 127.0.0.1 --directory data/atek_store &
    python -m loaders.datastore --config-name cubercnn \\
        --input-json-path data/atek_store/AriaDigitalTwin_ATEK_download_urls.json \\
        --output-folder-path data/adt --max-num-sequences 3 --download-wds-to-local

Needs torch, webdataset and Pillow (``pip install -e '.[all]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

RGB, SLAM = "mfcd#camera-rgb+images", "mfcd#camera-slam-left+images"
JSON_NAME = "AriaDigitalTwin_ATEK_download_urls.json"


def sample(sequence: str, i: int, rng: np.random.Generator, frames: int, size: int) -> dict:
    """One sample as ATEK's writer lays it out for webdataset's ShardWriter."""
    import torch

    n_obj = int(rng.integers(1, 4))
    lengths = torch.tensor([int(rng.integers(5, 20)), int(rng.integers(5, 20))])
    out = {"__key__": f"{sequence}_AtekDataSample_{i:06}"}
    for f in range(frames):
        out[f"{RGB}_{f}.jpeg"] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        out[f"{SLAM}_{f}.jpeg"] = rng.integers(0, 256, (size, size * 3 // 4), dtype=np.uint8)  # an L JPEG
    out.update({
        "mfcd#camera-rgb+projection_params.pth": torch.tensor([600.0, 600.0, size / 2, size / 2], dtype=torch.float64),
        "mfcd#camera-rgb+frame_ids.pth": torch.arange(frames, dtype=torch.int64) + frames * i,
        "mtd#ts_world_device.pth": torch.from_numpy(rng.normal(size=(frames, 3, 4)).astype(np.float32)),
        "sequence_name.txt": sequence,
        "gt_data.json": {"obb3_gt": {"camera-rgb": {"category_names": ["chair"] * n_obj}}},
        "gt_data#obb3_gt+camera-rgb+category_ids.pth": torch.arange(n_obj, dtype=torch.int32),
        "gt_data#obb3_gt+camera-rgb+object_dimensions.pth": torch.from_numpy(rng.random((n_obj, 3)).astype(np.float32)),
        "msdpd#points_world+stacked.pth": torch.from_numpy(rng.random((int(lengths.sum()), 3)).astype(np.float32)),
        "msdpd#points_world_lengths.pth": lengths,
    })
    return out


def make_store(out: str, base_url: str, *, sequences: int = 4, samples: int = 24, per_shard: int = 10,
               frames: int = 2, size: int = 64, config_name: str = "cubercnn", seed: int = 0) -> str:
    """Write the shards and the URL JSON under ``out``; returns the JSON's path."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    urls: dict[str, dict] = {}
    for s in range(sequences):
        sequence = f"Apartment_release_seq{s:03d}"
        folder = os.path.join(out, sequence)
        os.makedirs(folder, exist_ok=True)
        with wds.ShardWriter(os.path.join(folder, "shards-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
            for i in range(samples):
                sink.write(sample(sequence, i, rng, frames, size))
        entries = {}
        for name in sorted(n for n in os.listdir(folder) if n.endswith(".tar")):
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            entries[name.replace(".tar", "_tar")] = {
                "filename": f"ADT_ATEK_{config_name}_{sequence}_{name}",
                "sha1sum": hashlib.sha1(data).hexdigest(),
                "file_size_bytes": len(data),
                "download_url": f"{base_url.rstrip('/')}/{sequence}/{name}",
            }
        urls[sequence] = entries
    doc = {"raw_dataset_name": "AriaDigitalTwin (Tandem demo)",
           "atek_data_for_all_configs": {config_name: {"wds_file_urls": urls}}}
    path = os.path.join(out, JSON_NAME)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the store into (served as is)")
    parser.add_argument("--base-url", default="http://127.0.0.1:8765", help="where OUT will be served")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--samples", type=int, default=24, help="samples per sequence")
    parser.add_argument("--per-shard", type=int, default=10, help="samples per shard")
    args = parser.parse_args(argv)
    path = make_store(args.out, args.base_url, sequences=args.sequences, samples=args.samples,
                      per_shard=args.per_shard)
    n = sum(len(v) for v in json.load(open(path))["atek_data_for_all_configs"]["cubercnn"]["wds_file_urls"].values())
    print(f"{args.sequences} sequences, {n} shards under {args.out}; URL JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
