"""The Lightning flavours we build on.

Lightning ships as ``pytorch_lightning`` and as ``lightning.pytorch`` (the unified ``lightning``
package); a Trainer of one rejects callbacks that subclass only the other's ``Callback``. Our
callbacks subclass the ``Callback`` of every flavour that is installed, so one class works with
either Trainer and the user has nothing to choose. Everything else of ours duck-types the trainer.

``pl`` (used for our own demo Trainer and LightningModule) is ``pytorch_lightning`` (our declared
dependency), or ``lightning.pytorch`` if only that is installed, or if the environment variable
``LIGHTNING_INTROSPECT_FLAVOR=lightning`` is set.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

_NAMES = ("pytorch_lightning", "lightning.pytorch")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


FLAVORS: tuple = tuple(importlib.import_module(n) for n in _NAMES if _installed(n))
if not FLAVORS:  # pragma: no cover
    raise ImportError("lightning_introspect needs `pytorch-lightning` (pip install pytorch-lightning) or `lightning`.")

_wanted = os.environ.get("LIGHTNING_INTROSPECT_FLAVOR", "").strip().lower()
pl = next((m for m in FLAVORS if _wanted in ("lightning", "lightning.pytorch") and m.__name__ == "lightning.pytorch"), FLAVORS[0])

FLAVOR: str = pl.__name__
CALLBACK_BASES: tuple[type, ...] = tuple(m.Callback for m in FLAVORS)
Callback = pl.Callback
LightningModule = pl.LightningModule
LightningDataModule = pl.LightningDataModule
Trainer = pl.Trainer
rank_zero_warn = importlib.import_module(f"{FLAVOR}.utilities").rank_zero_warn

__all__ = [
    "CALLBACK_BASES",
    "FLAVOR",
    "FLAVORS",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "Trainer",
    "pl",
    "rank_zero_warn",
]
