"""An accelerator emulated on the CPU, so that host / device mix-ups show without a GPU.

CI has no GPU, and a callback that runs a CPU tensor through a CUDA model (or writes a CUDA tensor with numpy)
fails only there. Here every tensor Lightning moves to the accelerator becomes an :class:`OnDevice` tensor: still
computed on the CPU, but reporting ``device == cuda:0`` and ``is_cuda``, and refusing what a CUDA tensor refuses:
an operation that mixes it with a host tensor of one or more dimensions (host scalars and host index tensors are
allowed, as on CUDA) and ``.numpy()``. ``.cpu()`` / ``.to("cpu")`` give a host tensor back; ``.to("cuda")`` and
factories with ``device="cuda"`` give device tensors. Only our own code is held to the rule (a mix is an error
when the nearest caller outside torch is ``lightning_introspect``, not Lightning): the gradients the autograd
engine hands to Lightning's optimizer are plain tensors here although they stand for device ones.

:func:`emulated_accelerator` patches a ``Trainer`` (``accelerator="cpu"``; ``32-true`` or ``bf16-mixed``) so that its
root device is the emulated one, and the few ``torch.cuda`` entry points the code reaches (RNG state for
``fork_rng``, the default generators, ``torch.Generator(device="cuda")``) so that they work on a CPU-only build.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import lightning_introspect

DEVICE = torch.device("cuda", 0)
PACKAGE = os.path.dirname(lightning_introspect.__file__) + os.sep
LIGHTNING = (f"{os.sep}pytorch_lightning{os.sep}", f"{os.sep}lightning{os.sep}", f"{os.sep}lightning_fabric{os.sep}")


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one on the emulated accelerator (the type is the tag)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> OnDevice:  # copy.deepcopy of a model: its copy is on the device too
        if id(self) not in memo:
            with torch._C.DisableTorchFunctionSubclass():
                data = self.detach().clone()
            copy = torch.Tensor._make_subclass(OnDevice, data, self.requires_grad)
            if getattr(self, "_is_param", False):
                copy._is_param = True  # type: ignore[attr-defined]
            memo[id(self)] = copy
        return memo[id(self)]


class DeviceMixError(RuntimeError):
    """What CUDA raises: an operation on tensors of two devices, or numpy of a device tensor."""


#: the messages of :class:`DeviceMixError` (CUDA's wording), also when a callback contains the error and warns
MIXUP_TEXTS = ("found at least two devices", "device type tensor to numpy", "device type for generator")


def mixups(messages: Any) -> list[str]:
    """The messages (or ``warnings.WarningMessage`` records) that report a host / device mix-up."""
    texts = [str(getattr(m, "message", m)) for m in messages]
    return [t for t in texts if any(part in t for part in MIXUP_TEXTS)]


def _is_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value.startswith("cuda")
    if isinstance(value, int) and not isinstance(value, bool):
        return True  # a device index
    if isinstance(value, torch.Tensor):
        return isinstance(value, OnDevice)
    return False


def _is_host(value: Any) -> bool:
    return (isinstance(value, torch.device) and value.type == "cpu") or (isinstance(value, str) and value.startswith("cpu"))


def _retyped(t: torch.Tensor, cls: type) -> torch.Tensor:
    """``t`` as ``cls`` on the same storage: a leaf stays a leaf (parameters), a graph tensor stays in its graph."""
    if type(t) is cls:
        return t
    with torch._C.DisableTorchFunctionSubclass():
        if t.requires_grad and t.grad_fn is None:  # as_subclass would hang it in a graph: a parameter must stay a leaf
            leaf = t.detach()
            return leaf.requires_grad_() if cls is torch.Tensor else torch.Tensor._make_subclass(cls, leaf, True)
        return t.as_subclass(cls)


def _tag(tree: Any) -> Any:
    return tree_map(lambda t: _retyped(t, OnDevice) if isinstance(t, torch.Tensor) else t, tree)


def _host(value: Any) -> Any:
    return torch.device("cpu") if _is_device(value) and not isinstance(value, torch.Tensor) else value


# operations that may take host tensors beside device ones on CUDA: indices and copies (transfers: _transfer)
_MIXING_ALLOWED = {
    torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_, torch.Tensor.index_put_,
    torch.Tensor.new_tensor, torch.Tensor.set_,
}
_TRANSFER_METHODS = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.type_as}


def _called_from_package() -> bool:
    """Whether the operation comes from lightning_introspect: the nearest caller outside torch is ours, not
    Lightning's. Lightning's own work (its optimizer step gets the gradients the autograd engine makes, plain
    tensors here although they stand for device ones; its model transfer) is not held to the rule, also when our
    code started the fit (the demo)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if PACKAGE in name:
            return True
        if any(part in name for part in LIGHTNING):
            return False
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _Emulation(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        getter = getattr(func, "__self__", None)  # a property's __get__: a new method-wrapper at every access
        if getter is torch.Tensor.device:
            return DEVICE if isinstance(args[0], OnDevice) else func(*args)
        if getter is torch.Tensor.is_cuda:
            return isinstance(args[0], OnDevice)
        if getter is torch.Tensor.is_cpu:
            return not isinstance(args[0], OnDevice)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(args[0], OnDevice):
            raise DeviceMixError(f"can't convert {DEVICE} device type tensor to numpy. Use Tensor.cpu() first.")
        if func in _TRANSFER_METHODS:
            return self._transfer(func, args, kwargs)
        to_device = _is_device(kwargs.get("device"))
        if "device" in kwargs:
            kwargs["device"] = _host(kwargs["device"])
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on = [t for t in tensors if isinstance(t, OnDevice)]
        if on and func not in _MIXING_ALLOWED:
            host = [t for t in tensors if not isinstance(t, OnDevice) and t.ndim > 0]
            if host and _called_from_package():
                raise DeviceMixError(
                    f"Expected all tensors to be on the same device, but found at least two devices, {DEVICE} and cpu! "
                    f"({name}: host shapes {[tuple(t.shape) for t in host]})"
                )
        generator = kwargs.get("generator")
        if (isinstance(generator, _REAL_GENERATOR) and isinstance(generator, DeviceGenerator) != bool(on or to_device)
                and _called_from_package()):
            found, expected = ("cuda", "cpu") if isinstance(generator, DeviceGenerator) else ("cpu", "cuda")
            raise DeviceMixError(f"Expected a '{expected}' device type for generator but found '{found}' ({name})")
        out = func(*args, **kwargs)  # OnDevice's own (default) __torch_function__ makes results of device tensors OnDevice
        return _tag(out) if to_device else out

    def _transfer(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        source = args[0]
        if func is torch.Tensor.cpu:
            target_device = False
        elif func is torch.Tensor.cuda:
            target_device = True
        elif func is torch.Tensor.type_as:
            target_device = isinstance(args[1], OnDevice)
        else:  # Tensor.to(device | dtype | tensor, ..., device=..., dtype=...)
            target_device = isinstance(source, OnDevice)
            for value in [*args[1:], kwargs.get("device")]:
                if _is_device(value) and not isinstance(value, torch.dtype):
                    target_device = True
                elif isinstance(value, torch.Tensor) or _is_host(value):
                    target_device = isinstance(value, OnDevice)
        host_args = [a if isinstance(a, torch.Tensor) else _host(a) for a in args[1:]]
        host_kwargs = {k: _host(v) for k, v in kwargs.items()}
        if func is torch.Tensor.cuda:
            out = source
        elif func is torch.Tensor.type_as:
            out = source.type(args[1].dtype)
        else:
            out = func(source, *host_args, **host_kwargs)
        return _retyped(out, OnDevice if target_device else torch.Tensor)


_REAL_GENERATOR = torch.Generator


class DeviceGenerator(_REAL_GENERATOR):
    """A generator made with ``device="cuda"``: a CPU generator that says it is on the device."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return DEVICE


class _GeneratorType(type):
    def __call__(cls, device: Any = "cpu") -> torch.Generator:  # type: ignore[override]
        return DeviceGenerator() if _is_device(device) else _REAL_GENERATOR(device=device)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _REAL_GENERATOR)


class _CpuGenerator(metaclass=_GeneratorType):
    """``torch.Generator(device="cuda")`` on a CPU-only build: a CPU generator (and still a ``torch.Generator``)."""


@contextlib.contextmanager
def emulated_accelerator(trainer: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run ``trainer`` (CPU accelerator) as if its device were ``cuda:0``, with every mix-up in our code raising."""
    states: dict[int, torch.Tensor] = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states.get(0, torch.zeros(16, dtype=torch.uint8)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": states.__setitem__(0, state))
    monkeypatch.setattr(torch.cuda, "default_generators", (DeviceGenerator(),))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: None)
    monkeypatch.setattr(torch, "Generator", _CpuGenerator)
    strategy = trainer.strategy
    monkeypatch.setattr(strategy, "_root_device", DEVICE)
    monkeypatch.setattr(strategy.accelerator, "setup_device", lambda device: None)
    with monkeypatch.context() as m:
        m.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: True)
        with _Emulation():
            yield
