"""Fixtures several test files share."""

import os

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: the tensors are tiny and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A fresh folder as $SOLO_DATA_DIR for the module: the built-in data set is generated
    there on first use (`synthetic.ensure_builtin_dataset`)."""
    root = tmp_path_factory.mktemp("builtin")
    old = os.environ.get("SOLO_DATA_DIR")
    os.environ["SOLO_DATA_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("SOLO_DATA_DIR", None)
    else:
        os.environ["SOLO_DATA_DIR"] = old
