"""Train the digits CNN with LightningCLI and introspection callbacks, configured two ways.

1. As ordinary LightningCLI callbacks (``trainer.callbacks`` with ``class_path`` / ``init_args``)::

       python examples/train_lightningcli.py fit --config examples/config.yaml

2. From one introspection file with a section per callback (``--introspection``), added to the
   callbacks of the trainer config by ``introspection_callbacks``::

       python examples/train_lightningcli.py fit --config examples/config.yaml \
           --introspection examples/introspection.yaml

Then: ``tensorboard --logdir introspect_runs``.
"""

from __future__ import annotations

from typing import Any

from lightning_introspect import introspection_callbacks
from lightning_introspect._lightning import pl
from lightning_introspect.demo import DigitsCNN, DigitsDataModule

LightningCLI = __import__(f"{pl.__name__}.cli", fromlist=["LightningCLI"]).LightningCLI


class IntrospectCLI(LightningCLI):
    """LightningCLI plus ``--introspection PATH``: a YAML file read by ``introspection_callbacks``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--introspection", type=str | None, default=None, help="introspection YAML (see README)")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        path = self._get(self.config, "introspection")
        if path:
            configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
            configured = configured if isinstance(configured, list) else [configured]
            kwargs["callbacks"] = [*configured, *introspection_callbacks(path)]
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> IntrospectCLI:
    return IntrospectCLI(DigitsCNN, DigitsDataModule, args=args, save_config_callback=None)


if __name__ == "__main__":
    main()
