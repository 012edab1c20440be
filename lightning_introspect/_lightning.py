"""The Lightning flavour we build on.

Lightning ships as ``pytorch_lightning`` and as ``lightning.pytorch``; a Trainer of one rejects the
callbacks of the other. We import ``pytorch_lightning`` (our declared dependency) and fall back to
``lightning.pytorch`` when only the unified package is installed. Set the environment variable
``LIGHTNING_INTROSPECT_FLAVOR=lightning`` (before importing us) to use ``lightning.pytorch`` when
both are installed.
"""

from __future__ import annotations

import importlib
import os

_flavor = os.environ.get("LIGHTNING_INTROSPECT_FLAVOR", "pytorch_lightning").strip().lower()
_order = ["lightning.pytorch", "pytorch_lightning"] if _flavor in ("lightning", "lightning.pytorch") else [
    "pytorch_lightning",
    "lightning.pytorch",
]
for _name in _order:
    try:
        pl = importlib.import_module(_name)
        break
    except ImportError:  # pragma: no cover - depends on what is installed
        continue
else:  # pragma: no cover
    raise ImportError("lightning_introspect needs `pytorch-lightning` (pip install pytorch-lightning) or `lightning`.")

FLAVOR: str = pl.__name__
Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
rank_zero_warn = importlib.import_module(f"{FLAVOR}.utilities").rank_zero_warn

__all__ = ["FLAVOR", "Callback", "LightningDataModule", "LightningModule", "Trainer", "pl", "rank_zero_warn"]
