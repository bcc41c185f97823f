"""The Helios seed's ``MyDataModule`` example, with Tandem sources in place of CIFAR10 (used by the tests).

The HDF5 files are named by the environment (``HELIOS_TRAIN`` / ``HELIOS_VALID``) so the
trainer can import the class by path (``data.module: tests.helios_module:MyDataModule``).
"""

import os

from adapters.helios import DataLoaderParams, DataModule
from loaders import H5Source

CALLS = []  # what the hooks saw, for the tests


class MyDataModule(DataModule):
    def prepare_data(self) -> None:
        CALLS.append("prepare_data")

    def setup(self) -> None:
        CALLS.append("setup")
        self._train_dataset = self._create_dataset(H5Source(os.environ["HELIOS_TRAIN"], keys=["x", "y"]),
                                                   DataLoaderParams(batch_size=32, shuffle=True, random_seed=5))
        settings = {"batch_size": 50}
        self._valid_dataset = self._create_dataset(H5Source(os.environ["HELIOS_VALID"], keys=["x", "y"]), settings)
        self._test_dataset = self._create_dataset(H5Source(os.environ["HELIOS_VALID"], keys=["x", "y"]), settings)

    def teardown(self) -> None:
        CALLS.append("teardown")
