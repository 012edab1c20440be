"""Context managers that make an introspection pass invisible to training."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` and every submodule in eval mode; restore each flag afterwards.

    Restoring per submodule (not ``module.train(previous)``) matters: a user may have frozen a
    BatchNorm in eval mode inside a model that trains.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> net[1].eval()  # doctest: +ELLIPSIS
        Dropout(...)
        >>> with eval_mode(net):
        ...     assert not net.training
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _cuda_devices() -> list[int]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [torch.cuda.current_device()]


@contextlib.contextmanager
def fork_global_rng() -> Iterator[None]:
    """Run a block without changing the global random states: torch (CPU and the current CUDA device),
    Python's ``random`` and NumPy's legacy global generator.

    Needed around anything of ours that may draw from them: creating an iterator over a ``DataLoader``
    (it draws a base seed), and indexing a dataset whose ``__getitem__`` draws random augmentations
    (torchvision transforms use torch's RNG, other libraries Python's or NumPy's).
    """
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=_cuda_devices()):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def gradients_on(device: torch.device | str | None = None) -> Iterator[None]:
    """Allow ``torch.autograd.grad`` even inside Lightning validation hooks.

    Leaves ``torch.inference_mode`` and ``torch.no_grad`` and switches autocast off for the device
    type, so attributions are computed in fp32 whatever the trainer's precision.
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    autocast_types = {"cpu", device_type} if device_type in ("cuda", "cpu", "xpu", "mps") else {"cpu"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        for kind in sorted(autocast_types):
            stack.enter_context(torch.autocast(device_type=kind, enabled=False))
        yield


@contextlib.contextmanager
def eager_mode() -> Iterator[None]:
    """Run ``torch.compile``-d code eagerly inside the block (``torch.compiler.set_stance("force_eager")``).

    Hooks registered after a function was compiled are not seen by the graph dynamo already cached for
    it: with a ``torch.compile``-d submodule an introspection pass could silently record nothing.
    Eager execution runs every module call, so every hook fires. The stance is restored on exit (training
    stays compiled). A no-op on torch versions without ``set_stance`` (before 2.6).

    Example:
        >>> with eager_mode():
        ...     pass
    """
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile``-d module (dynamo's ``OptimizedModule``, original in ``_orig_mod``)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype floating inputs must have: that of the parameters when all share one (a model held in
    float64, bfloat16 or float16, e.g. ``precision="64-true"``); float32 otherwise."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@contextlib.contextmanager
def inputs_in_model_dtype(module: nn.Module) -> Iterator[None]:
    """Cast floating tensor arguments of ``module``'s forward to :func:`model_dtype` inside the block.

    Lightning converts the batches of its own steps for ``precision="64-true"`` / ``"bf16-true"``; the
    passes of ours over the same data need the same (a no-op for float32 models). The hook is removed on exit.
    """
    dtype = model_dtype(module)
    if dtype == torch.float32:
        yield
        return

    def cast(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    handle = module.register_forward_pre_hook(cast)
    try:
        yield
    finally:
        handle.remove()


def module_device(module: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """The device of the module's first parameter (``default`` for a module without parameters).

    Example:
        >>> module_device(nn.Linear(2, 1)), module_device(nn.ReLU())
        (device(type='cpu'), device(type='cpu'))
    """
    return next((p.device for p in module.parameters()), torch.device(default))


@contextlib.contextmanager
def introspection_mode(module: nn.Module, *, grad: bool = True) -> Iterator[nn.Module]:
    """Eval mode + (optionally) gradients on + a forked global RNG + eager execution (hooks fire also
    under ``torch.compile``, see :func:`eager_mode`): the standard introspection pass.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> with torch.no_grad(), introspection_mode(net):
        ...     x = torch.ones(1, 3, requires_grad=True)
        ...     (g,) = torch.autograd.grad(net(x).sum(), x)
        >>> g.shape, net.weight.grad is None
        (torch.Size([1, 3]), True)
    """
    device = module_device(module)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fork_global_rng())
        stack.enter_context(eager_mode())
        stack.enter_context(eval_mode(module))
        stack.enter_context(inputs_in_model_dtype(module))
        if grad:
            stack.enter_context(gradients_on(device))
        else:
            stack.enter_context(torch.no_grad())
        yield module


def fresh_input(x: torch.Tensor, *, requires_grad: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A detached, cloned, normal (non-inference) copy of ``x`` that autograd can differentiate.

    Floating inputs are cast to fp32 unless ``dtype`` says otherwise; integer inputs keep their type
    and never require grad.
    """
    with torch.inference_mode(False):
        out = x.detach().clone()
        if out.is_floating_point():
            out = out.to(dtype or torch.float32)
            out.requires_grad_(requires_grad)
    return out


def private_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` of our own, so our randomness never touches the global RNG."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


# ------------------------------------------------------------------------------------------ threads
@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` while the block runs (``None``: unchanged); restored in ``finally``.

    For small or memory-bound work run from the training thread between steps (probe fits, histogram
    binning): per-op overhead dominates there, and on a busy machine every multi-threaded op waits for
    a descheduled worker. Training itself never runs inside the block, and the count it sees is unchanged.

    Example:
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


_BLAS_LOCK = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    """threadpoolctl's controller of the BLAS libraries numpy loaded (scanned once: ~0.5 ms); ``None``
    without threadpoolctl (it ships with scikit-learn) or without a BLAS it can drive."""
    try:
        import numpy  # noqa: F401  (loads numpy's BLAS before the scan)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return None
    controller = ThreadpoolController().select(user_api="blas")
    return controller if controller.lib_controllers else None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS / MKL, through threadpoolctl) at one thread while the block runs, process-wide.

    Multi-threaded BLAS competes with training for the same cores and spins on a busy machine (a float64
    dot of 64K values: ~40x slower with 2 OpenBLAS threads than with one), and a sum then depends on the
    thread count. Uses may overlap (a background probe fit while histograms are binned) and nest: they
    share one limit, counted under a lock, and the original counts come back when the last one ends.
    torch's own thread pool is not touched.
    """
    global _blas_users, _blas_limiter
    with _BLAS_LOCK:
        if _blas_users == 0:
            controller = _blas_controller()
            if controller is not None and any(lib.num_threads > 1 for lib in controller.lib_controllers):
                _blas_limiter = controller.limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _blas_users -= 1
            if _blas_users == 0 and _blas_limiter is not None:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def output_depends_on_input(model: nn.Module, inputs: torch.Tensor) -> bool:
    """Whether autograd connects ``model(inputs)`` to ``inputs``: ``False`` when the forward runs the
    network (or the part the input enters) under ``torch.no_grad()`` or detaches it, as frozen feature
    extractors often do. Gradient-based explanations and feature visualisation need this path.

    Example:
        >>> net = nn.Linear(3, 2)
        >>> output_depends_on_input(net, torch.ones(1, 3))
        True
        >>> class FrozenBackbone(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.backbone, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         with torch.no_grad():
        ...             features = self.backbone(x)
        ...         return self.head(features)  # requires grad (the head trains), but not through x
        >>> output_depends_on_input(FrozenBackbone(), torch.ones(1, 3))
        False
    """
    with introspection_mode(model, grad=True):
        x = fresh_input(inputs[:1].to(module_device(model, inputs.device)))
        if not x.requires_grad:  # integer inputs (token ids): there is no input gradient to speak of
            return False
        out = model(x)
        if not (isinstance(out, torch.Tensor) and out.requires_grad):
            return False
        (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)  # parameters' .grad untouched
    return grad is not None
