"""Helios' data module on Tandem sources: names, defaults, the seed's DataModule example, a torch loop."""

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from adapters.helios import (  # noqa: E402
    DataLoaderParams,
    DataModule,
    Dataset,
    DatasetSplit,
    create_collate_fn,
    create_dataloader,
    create_dataset,
)
from adapters.torch import TorchLoader  # noqa: E402
from loaders import COLLATE_FN_REGISTRY, H5Source, Sampler  # noqa: E402
from tests import helios_module  # noqa: E402


@pytest.fixture
def helios_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    paths = {}
    for name, n in (("train", 100), ("valid", 30)):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=rng.normal(size=(n, 4)).astype(np.float32), chunks=(7, 4), compression="gzip")
            f.create_dataset("y", data=np.arange(n, dtype=np.int64))
        paths[name] = str(path)
        monkeypatch.setenv(f"HELIOS_{name.upper()}", str(path))
    helios_module.CALLS.clear()
    return paths


def test_dataset_split_and_params():
    assert DatasetSplit.from_str("train") is DatasetSplit.TRAIN and DatasetSplit.from_str("valid").value == 1
    with pytest.raises(ValueError, match=r"^invalid dataset split 'validation': expected one of 'train', 'valid', 'test'$"):
        DatasetSplit.from_str("validation")
    p = DataLoaderParams()
    assert (p.random_seed, p.batch_size, p.shuffle, p.num_workers, p.pin_memory, p.drop_last, p.debug_mode,
            p.is_distributed, p.sampler, p.collate_fn) == (6691, 1, False, 0, True, False, False, None, None, None)
    assert DataLoaderParams.from_dict({**p.to_dict(), "batch_size": 8}) == DataLoaderParams(batch_size=8)
    with pytest.raises(KeyError, match=r"unknown DataLoaderParams key\(s\) 'batchsize' \(known: random_seed, batch_size"):
        DataLoaderParams.from_dict({"batchsize": 8})
    assert Dataset([1, 2], p).dict() == {"dataset": [1, 2], "params": p.to_dict()}


def test_registries_create_datasets_and_collate_functions(helios_files):
    src = create_dataset("h5", helios_files["train"], keys=["x"])
    assert isinstance(src, H5Source) and len(src) == 100

    @COLLATE_FN_REGISTRY.register("helios_test_pad")
    def make_pad(value):  # a factory, as Helios registers them
        return lambda records: {"n": len(records), "value": value}

    assert create_collate_fn("helios_test_pad", 7)([{}, {}]) == {"n": 2, "value": 7}
    with pytest.raises(KeyError, match=r"no dataset named 'h6' \(known: h5, h5_cached, tar\)"):
        create_dataset("h6")


def test_create_dataloader_has_helios_defaults_and_a_short_last_batch(helios_files):
    src = H5Source(helios_files["train"], keys=["x", "y"])
    loader, sampler = create_dataloader(src, batch_size=32, shuffle=True)
    assert isinstance(loader, TorchLoader) and sampler.seed == 6691 and not sampler.drop_remainder
    batches = list(loader)
    assert [len(b["y"]) for b in batches] == [32, 32, 32, 4] and set(batches[-1]) == {"x", "y"}
    assert sorted(torch.cat([b["y"] for b in batches]).tolist()) == list(range(100))
    dropped, _ = create_dataloader(src, batch_size=32, drop_last=True)
    assert [len(b["y"]) for b in dropped] == [32, 32, 32]
    with pytest.raises(TypeError, match="sampler must be a loaders.Sampler"):
        create_dataloader(src, sampler=object())


def test_the_seed_data_module_example_runs_a_torch_loop_and_resumes(helios_files):
    module = helios_module.MyDataModule()
    module.prepare_data()
    module.setup()
    assert module.train_dataset.params.batch_size == 32 and module.valid_dataset.params.batch_size == 50
    loader, sampler = module.train_dataloader()
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for batch in loader:  # a plain PyTorch epoch
        loss = model(batch["x"]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append(batch["y"].tolist())
    assert [len(s) for s in seen] == [32, 32, 32, 4]
    expected = [sampler.indices_and_mask(t) for t in range(4)]
    assert seen == [idx[mask].tolist() if mask is not None else idx.tolist() for idx, mask in expected]
    assert helios_module.MyDataModule().train_dataloader() is None  # no setup: no dataset
    # resume mid-epoch in a new module: the remaining batches are the same
    fresh = helios_module.MyDataModule()
    fresh.setup()
    resumed, _ = fresh.train_dataloader()
    first, _ = module.train_dataloader()
    it = iter(first)
    next(it)
    next(it)
    resumed.load_state_dict(first.state_dict())
    assert [b["y"].tolist() for b in resumed] == seen[2:]
    valid, vs = module.valid_dataloader()
    assert [len(b["y"]) for b in valid] == [30] and vs.seed == 6691
    module.teardown()
    assert helios_module.CALLS == ["prepare_data", "setup", "setup", "teardown"]


def test_a_data_module_must_implement_setup():
    class Incomplete(DataModule):
        pass

    with pytest.raises(TypeError, match="abstract method"):
        Incomplete()
    module = helios_module.MyDataModule()
    module.is_distributed, module.trainer = True, "trainer"
    assert module.is_distributed is True and module.trainer == "trainer" and module.test_dataloader() is None


def test_distributed_without_a_process_group_is_a_clear_error(helios_files):
    src = H5Source(helios_files["train"], keys=["x"])
    with pytest.raises(RuntimeError, match=r"^is_distributed=True but torch.distributed is not initialized"):
        create_dataloader(src, is_distributed=True)
    assert isinstance(create_dataloader(src, sampler=Sampler(100, 10))[1], Sampler)


# --------------------------------------------------------------------------- the JAX trainer
def _trainer_config(overrides):
    pytest.importorskip("jax")
    pytest.importorskip("grain")
    import os

    from trainers.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_config(os.path.join(root, "configs", "mnist1d_mlp.yaml"),
                       ["train.steps=6", "train.eval_every=6", "train.checkpoint_every=0", "train.log_every=3", *overrides])


def test_one_data_module_feeds_the_jax_trainer_like_paths_do(tmp_path, monkeypatch, mnist1d_dir):
    from trainers.data import prepare_mnist1d
    from trainers.train import train_and_evaluate

    files = prepare_mnist1d(mnist1d_dir)
    monkeypatch.setenv("HELIOS_TRAIN", files["h5_train"])
    monkeypatch.setenv("HELIOS_VALID", files["h5_eval"])
    helios_module.CALLS.clear()
    by_module = train_and_evaluate(_trainer_config(["data.module=tests.helios_module:MyDataModule", "data.dataset=null"]),
                                   str(tmp_path / "module"), progress=False)
    assert helios_module.CALLS == ["prepare_data", "setup", "teardown"]
    by_paths = train_and_evaluate(_trainer_config([f"data.train={files['h5_train']}", f"data.eval={files['h5_eval']}",
                                                   "data.dataset=null", "data.source=h5"]),
                                  str(tmp_path / "paths"), progress=False)
    assert by_module["params_sha256"] == by_paths["params_sha256"] and by_module["accuracy"] == by_paths["accuracy"]


def test_data_module_conflicts_and_source_options_are_checked(tmp_path, mnist1d_dir):
    from trainers.config import ConfigError
    from trainers.data import build_sources, prepare_mnist1d
    from trainers.train import train_and_evaluate

    with pytest.raises(ConfigError, match=r"^data.module 'tests.helios_module:MyDataModule' builds the sources: "
                                          r"leave data.dataset unset$"):
        train_and_evaluate(_trainer_config(["data.module=tests.helios_module:MyDataModule"]),  # the base sets dataset
                           str(tmp_path / "a"), progress=False)
    with pytest.raises(ConfigError, match=r"^data.module: 'tests.helios_module' has no attribute 'Nope'"):
        train_and_evaluate(_trainer_config(["data.module=tests.helios_module:Nope", "data.dataset=null"]),
                           str(tmp_path / "b"), progress=False)
    from loaders import ProcessPart

    files = prepare_mnist1d(mnist1d_dir)
    cfg = _trainer_config([f"data.train={files['h5_train']}", "data.source=h5", "data.dataset=null",
                           "data.source_options={rdcc_nbytes: 0, rdcc_nslots: 11}"]).data
    train, _ = build_sources(cfg, ProcessPart())
    assert train._cache_opts == {"rdcc_nbytes": 0, "rdcc_nslots": 11, "rdcc_w0": None}  # they reach h5py's open
    bad = _trainer_config([f"data.train={files['h5_train']}", "data.source=h5", "data.dataset=null",
                           "data.source_options={rdcc_bytes: 0}"]).data
    with pytest.raises(ConfigError, match=r"^data.source_options 'rdcc_bytes': H5Source does not take it here "
                                          r"\(it takes: rdcc_nbytes, rdcc_nslots, rdcc_w0, direct\)$"):
        build_sources(bad, ProcessPart())
