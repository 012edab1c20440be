import os
import warnings

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # tiny models: one thread is as fast and does not thrash a shared box
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture(scope="session")
def trained_digits():
    """(model, datamodule): a DigitsCNN trained 8 epochs on digits (val acc about 0.95), eval mode.

    Shared by every test in the session; do not modify it (deep-copy first).
    """
    from tests.helpers import train_digits_cnn

    return train_digits_cnn(epochs=8, seed=0)


@pytest.fixture
def digits_dm():
    """A small digits data module (256 train / 256 val samples at most) for quick fits."""
    from lightning_introspect.demo import DigitsDataModule

    dm = DigitsDataModule(batch_size=32, limit=256)
    dm.setup("fit")
    return dm
