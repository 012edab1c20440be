"""Introspection never changes training: every callback on vs none, bitwise equal end state (CPU)."""

from __future__ import annotations

import torch

from lightning_introspect._lightning import pl
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, demo_config
from tests.helpers import quick_trainer, read_events


def _fit(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=128, seed=0)
    dm.setup("fit")
    model = DigitsCNN()
    trainer = quick_trainer(tmp_path, callbacks, epochs=2, log_every_n_steps=2)
    trainer.fit(model, datamodule=dm)
    return model, trainer


def test_all_callbacks_leave_training_bitwise_unchanged(tmp_path):
    dm = DigitsDataModule(limit=128)
    dm.setup("fit")
    callbacks = introspection_callbacks(demo_config(fast=True, mean=dm.mean, std=dm.std))
    for cb in callbacks:
        cb.on_error = "raise"
    plain, plain_trainer = _fit(tmp_path / "plain", [])
    rng_plain = torch.get_rng_state()
    watched, watched_trainer = _fit(tmp_path / "watched", callbacks)
    rng_watched = torch.get_rng_state()

    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # weights, biases and BatchNorm running stats
        assert torch.equal(a[key], b[key]), f"{key} differs"
    opt_a = plain_trainer.optimizers[0].state_dict()["state"]
    opt_b = watched_trainer.optimizers[0].state_dict()["state"]
    for idx in opt_a:
        for name, value in opt_a[idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b[idx][name])), f"optimizer {idx}.{name}"
    for (name, p), q in zip(plain.named_parameters(), watched.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{name}.grad presence differs"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{name}.grad differs"
    assert torch.equal(rng_plain, rng_watched), "global torch RNG drifted"
    assert [m.training for m in plain.modules()] == [m.training for m in watched.modules()]
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in watched.modules())
    # the comparison means something only if every callback was on and did its work in the watched fit
    assert len(callbacks) == len(demo_config(fast=True))
    assert not [type(cb).__name__ for cb in callbacks if cb.disabled]
    scalars = read_events(watched_trainer.logger.log_dir)["scalars"]
    silent = [cb.name for cb in callbacks if not scalars.get(f"introspect/{cb.name}/seconds")]
    assert not silent, f"callbacks that logged no work: {silent}"
