"""AXOL1TL's entry points: ``python -m trainers.run`` with no config, and ``trainers.main(config, overrides)``."""

import os
import subprocess
import sys

import pytest

from trainers.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = os.path.join(ROOT, "configs", "mnist1d_mlp.yaml")


def test_nested_dict_overrides_merge_like_dotted_ones():
    nested = load_config(MLP, {"model": {"kwargs": {"hidden": [64]}}, "train": {"steps": 7}})
    dotted = load_config(MLP, ["model.kwargs.hidden=[64]", "train.steps=7"])
    assert nested == dotted and nested.model.kwargs == {"hidden": [64], "num_outputs": 10}
    as_dict = load_config({"extends": MLP, "train": {"steps": 7}}, {"model": {"kwargs": {"hidden": [64]}}})
    assert as_dict == dotted
    with pytest.raises(ConfigError, match=r"^config: unknown config key 'trian'"):
        load_config({"trian": {"steps": 1}})


def test_main_trains_the_default_with_overrides(tmp_path, mnist1d_dir):
    pytest.importorskip("jax")
    import trainers

    summary = trainers.main(overrides={"data": {"cache_dir": str(mnist1d_dir)}, "train": {"steps": 5, "eval_every": 0}},
                            workdir=str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 5 and os.path.exists(tmp_path / "run" / "summary.json")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: cnn1d" in saved and "steps: 5" in saved  # the built-in default's model, with the override


def test_run_without_a_config_runs_the_default_and_says_so(tmp_path, mnist1d_dir):
    pytest.importorskip("jax")
    out = subprocess.run([sys.executable, "-m", "trainers.run", f"data.cache_dir={mnist1d_dir}", "train.steps=3",
                          "train.eval_every=0", "--workdir", str(tmp_path / "run"), "--no-progress"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no config given: running the built-in default, configs/mnist1d_cnn.yaml "
                                 "(MNIST-1D, 1-D CNN)\n")
    assert "done: 3 steps" in out.stdout
