"""One callback class works with Trainers from `pytorch_lightning` and from `lightning.pytorch`."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from tests.helpers import read_events
from tests.test_foundation import _loaders, _Recorder


@pytest.mark.parametrize("flavor", ["pytorch_lightning", "lightning.pytorch"])
def test_callback_accepted_by_each_installed_trainer(tmp_path, flavor):
    mod = pytest.importorskip(flavor)
    assert isinstance(_Recorder(), mod.Callback)

    class Tiny(mod.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(4, 2)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, idx):
            return self(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loggers = importlib.import_module(f"{flavor}.loggers")
    cb = _Recorder(num_samples=4)
    trainer = mod.Trainer(
        max_epochs=2,
        logger=loggers.TensorBoardLogger(str(tmp_path)),
        callbacks=[cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(Tiny(), *_loaders())
    assert cb.ran == [0, 1]
    # each run logged its documented timing tag through this flavour's logger, at the epoch's last step
    timings = read_events(str(tmp_path))["scalars"]["introspect/recorder/seconds"]
    assert [step for step, _ in timings] == [trainer.num_training_batches * (e + 1) for e in range(2)]
    assert all(seconds >= 0 for _, seconds in timings)
