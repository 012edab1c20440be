"""Which layer of an autoencoder holds the most linearly usable representation? Probe it.

An autoencoder is trained on the digits images alone (its data loaders carry no labels); a labelled
``probe_dataloader`` lets ``LinearProbes`` fit a linear classifier on every chosen layer at the end of
each epoch, next to the same probes on the untrained network ("init") and on the raw input. This is the
use the probes were proposed for: in unsupervised pretraining nothing else says which layer to keep.

Run (about a minute on 2 CPU cores)::

    python examples/probe_autoencoder.py --epochs 5
    tensorboard --logdir introspect_runs   # introspect/probes/... scalars, the depth figure, the table
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, Trainer, pl
from lightning_introspect.callbacks.linear_probes import LinearProbes
from lightning_introspect.demo import DigitsDataModule

LAYERS = ["encoder.1", "encoder.3", "encoder.5", "encoder.7", "decoder.1", "decoder.4", "decoder.6"]


class ConvAutoencoder(LightningModule):
    """32x32 -> 16x16 -> 8x8 -> 4x4 conv encoder, a 32-d code (``encoder.7``), a mirrored decoder."""

    def __init__(self, code: int = 32, lr: float = 2e-3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(),  # 0-1: 16x16
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 2-3: 8x8
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # 4-5: 4x4
            nn.Flatten(), nn.Linear(64 * 4 * 4, code),  # 6-7: the code
        )
        self.decoder = nn.Sequential(
            nn.Linear(code, 64 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (64, 4, 4)),  # 0-2
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # 3-4: 8x8
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),  # 5-6: 16x16
            nn.ConvTranspose2d(16, 1, 4, stride=2, padding=1),  # 7: 32x32
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch  # no labels anywhere in training
        loss = F.mse_loss(self(x), x)
        self.log("train_mse", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_mse", F.mse_loss(self(x), x), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="introspect_runs")
    parser.add_argument("--solver", default="auto", choices=["auto", "sklearn", "torch"])
    parser.add_argument("--pooling", default="avgmax", choices=["avg", "max", "avgmax", "flatten"])
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(seed=0)
    dm.setup("fit")
    (x_train, _), (x_val, y_val) = dm.train_set.tensors, dm.val_set.tensors
    unlabelled_train = DataLoader(TensorDataset(x_train), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    unlabelled_val = DataLoader(TensorDataset(x_val), batch_size=256)
    labelled = DataLoader(TensorDataset(x_val, y_val), batch_size=256)  # used only by the probes

    probes = LinearProbes(layers=LAYERS, pooling=args.pooling, probe_dataloader=labelled, solver=args.solver)
    loggers = __import__(f"{pl.__name__}.loggers", fromlist=["TensorBoardLogger"])
    trainer = Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[probes],
        logger=loggers.TensorBoardLogger(args.out, name="autoencoder"),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )
    trainer.fit(ConvAutoencoder(), train_dataloaders=unlabelled_train, val_dataloaders=unlabelled_val)

    print(f"\nval_mse {float(trainer.callback_metrics['val_mse']):.3f} after {args.epochs} epochs; logs in {trainer.logger.log_dir}")
    print(probes.table().replace("`", ""))
    for line in probes.summary_lines():
        print(line)


if __name__ == "__main__":
    main()
