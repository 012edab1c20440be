"""The LRP plan of a model that :mod:`torch.fx` cannot trace, recorded from one concrete forward pass.

Symbolic tracing fails on forwards whose Python control flow reads shapes or values (Hugging Face's
``ViTForImageClassification`` and ``BertForSequenceClassification`` among them). Here the model runs once on
the actual input under a :class:`torch.overrides.TorchFunctionMode` that sees every tensor function and
Tensor method; control flow resolves itself because every value is concrete. The calls are written into an
``fx.Graph`` of the same form the tracer of :mod:`.trace` gives, so the same plan, rules, composites and
propagator serve it unchanged:

* the input is the placeholder; a call reading a tensor computed from the input, or from a parameter or buffer
  of the model, becomes a ``call_function`` / ``call_method`` node in the tracer's form (``x + y`` arrives as
  ``Tensor.add`` and stays ``call_method "add"``; ``x[i]`` is ``operator.getitem``; ``2 - x`` is
  ``operator.sub(2, x)``); parameters and buffers are ``get_attr`` nodes of their own names; other tensors
  (position ids, masks made from shapes) are constants of the plan; Python numbers (sizes) are baked in;
* the modules the tracer keeps as leaves (``torch.nn`` layers: Linear, Conv, LayerNorm, Embedding, ...) are
  ``call_module`` nodes with their dotted names: global forward pre / post hooks from torch's public API mark a
  leaf's entry and exit and silence the recording inside it (removed in ``finally``); the modules of
  :data:`~.decompose.DECOMPOSED` are recorded through their reference computation, with the attention as one
  call, as the tracer does.

A recording is only valid for inputs of the shape, dtype and device it saw, so plans are cached per (model
signature, input shape, dtype, device); a forward that reads a traced value into Python (``if x.sum() > 0``,
``.item()``, ``.tolist()``) may branch on the values themselves, so its plan is recorded again for every input.
The recorded plan must reproduce the model's output on the input, or it is refused.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function

from lightning_introspect._torch.guards import fresh_input, introspection_mode, is_compiled
from lightning_introspect.methods.lrp import decompose
from lightning_introspect.methods.lrp.composites import Composite
from lightning_introspect.methods.lrp.decompose import DECOMPOSED
from lightning_introspect.methods.lrp.propagate import Propagator
from lightning_introspect.methods.lrp.trace import Plan, leaf_module, model_signature, plan_from_graph
from lightning_introspect.methods.targets import model_logits

__all__ = ["recorded_plan"]

_GLOBAL_HOOK_KWARGS = "with_kwargs" in inspect.signature(register_module_forward_hook).parameters

# Tensor dunders as the tracer writes them: (function, whether the tensor is the right operand). The plain
# arithmetic operators arrive as Tensor methods (``x + y`` as ``Tensor.add``) and stay call_method nodes.
_DUNDERS: dict[str, tuple[Any, bool]] = {
    "__getitem__": (operator.getitem, False), "__setitem__": (operator.setitem, False),
    "__add__": (operator.add, False), "__radd__": (operator.add, True), "__iadd__": (operator.iadd, False),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True), "__isub__": (operator.isub, False),
    "__mul__": (operator.mul, False), "__rmul__": (operator.mul, True), "__imul__": (operator.imul, False),
    "__truediv__": (operator.truediv, False), "__rtruediv__": (operator.truediv, True), "__rdiv__": (operator.truediv, True),
    "__div__": (operator.truediv, False), "__itruediv__": (operator.itruediv, False),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__eq__": (operator.eq, False), "__ne__": (operator.ne, False), "__lt__": (operator.lt, False),
    "__le__": (operator.le, False), "__gt__": (operator.gt, False), "__ge__": (operator.ge, False),
    "__invert__": (operator.invert, False), "__neg__": (operator.neg, False), "__abs__": (operator.abs, False),
    "__and__": (operator.and_, False), "__or__": (operator.or_, False), "__xor__": (operator.xor, False),
    "__pow__": (operator.pow, False), "__rpow__": (operator.pow, True), "__mod__": (operator.mod, False),
    "__floordiv__": (operator.floordiv, False), "__rfloordiv__": (operator.floordiv, True),
}
# Calls whose result is a shape, dtype, device or flag: the same for every input of the recorded shape.
_METADATA = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "__len__", "stride", "storage_offset", "element_size", "get_device",
    "is_floating_point", "is_complex", "is_contiguous", "is_signed", "data_ptr", "dim_order", "__hash__", "untyped_storage",
})
# Calls whose result only has the shape / dtype / device of their tensor arguments, never their values.
_SHAPE_ONLY = frozenset({
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor",
})


def _attention_call(*args: Any, **kwargs: Any) -> Any:
    """:func:`~.decompose.attention` made visible to a torch function mode, so the recording keeps it as one
    call (the tracer's leaf) and the plan gets one attention step."""
    tensors = tuple(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    if has_torch_function(tensors):
        return handle_torch_function(_attention_call, tensors, *args, **kwargs)
    return _ATTENTION(*args, **kwargs)


_ATTENTION = decompose.attention


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, slice):
        yield from _tensors((value.start, value.stop, value.step))


def _map(value: Any, fn: Any) -> Any:
    """``value`` with every tensor replaced by ``fn(tensor)`` (tuples, lists, dicts and slices rebuilt)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        items = [_map(v, fn) for v in value]
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, Mapping):
        return {k: _map(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_map(value.start, fn), _map(value.stop, fn), _map(value.step, fn))
    return value


class _Recorder(TorchFunctionMode):
    """Writes the calls on traced tensors into ``graph`` while the model runs.

    Traced tensors are those computed from the input (``derived``) and from parameters and buffers; every
    tensor the recording has seen is kept alive, so ``id`` stays a faithful key while it runs.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        super().__init__()
        self.graph = graph
        self.nodes: dict[int, fx.Node] = {}  # id(tensor) -> its node
        self.pending: dict[int, tuple[fx.Node, int]] = {}  # id(element of a traced tuple) -> (tuple node, index)
        self.derived: set[int] = set()  # ids of tensors computed from the input
        self.keep: list[Any] = []
        self.attrs = {id(t): name for name, t in (*model.named_parameters(), *model.named_buffers())}
        self.attr_nodes: dict[str, fx.Node] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.constant_nodes: dict[tuple[int, int], fx.Node] = {}
        self.names = {id(m): name for name, m in model.named_modules()}
        self.module_outputs: dict[str, list[fx.Node]] = {}
        self.stack: list[tuple[str, type]] = []  # the traced-through modules around the current call
        self.frames: list[tuple[str, str | None]] = []
        self.silent = 0  # > 0 inside a leaf module
        self.value_read = False  # a traced value was read into Python: the recording may depend on values
        self.thread = threading.get_ident()

    # ---- tensors -> nodes --------------------------------------------------------------------

    def traced(self, t: torch.Tensor) -> bool:
        return id(t) in self.nodes or id(t) in self.pending or id(t) in self.attrs

    def is_derived(self, value: Any) -> bool:
        return any(id(t) in self.derived for t in _tensors(value))

    def node_of(self, t: torch.Tensor) -> fx.Node:
        key = id(t)
        node = self.nodes.get(key)
        if node is not None:
            return node
        if key in self.pending:
            parent, index = self.pending.pop(key)
            node = self._create("call_function", operator.getitem, (parent, index), {})
            self.nodes[key] = node
            return node
        name = self.attrs.get(key)
        if name is not None:
            if name not in self.attr_nodes:
                self.attr_nodes[name] = self.graph.get_attr(name)
            return self.attr_nodes[name]
        version = (key, t._version)  # a tensor changed in place since is a new constant
        if version not in self.constant_nodes:
            target = f"_lrp_constant_{len(self.constants)}"
            self.constants[target] = t.detach().clone()
            self.keep.append(t)
            self.constant_nodes[version] = self.graph.get_attr(target)
        return self.constant_nodes[version]

    def bind(self, value: Any, node: fx.Node, derived: bool) -> None:
        """``value`` (a tensor, or a tuple / list of them) is the result of ``node``."""
        if isinstance(value, torch.Tensor):
            self.pending.pop(id(value), None)
            self.nodes[id(value)] = node
            self._mark(value, derived)
        elif isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    self.nodes.pop(id(item), None)
                    self.pending[id(item)] = (node, index)  # a node of its own once something reads it
                    self._mark(item, derived)

    def _mark(self, t: torch.Tensor, derived: bool) -> None:
        self.keep.append(t)
        if derived:
            self.derived.add(id(t))
        else:
            self.derived.discard(id(t))

    def _create(self, op: str, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        node = self.graph.create_node(op, target, args, kwargs)
        node.meta["nn_module_stack"] = {name: (name, kind) for name, kind in self.stack}
        return node

    def _nodes(self, value: Any) -> Any:
        return _map(value, self.node_of)

    # ---- calls -------------------------------------------------------------------------------

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.silent or not any(self.traced(t) for t in _tensors((args, kwargs))):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        form = self._form(func, name, args, kwargs)
        derived = self.is_derived((args, kwargs))
        node = None if form is None else self._create(*form)  # arguments mapped before an in-place call changes them
        result = func(*args, **kwargs)
        if node is not None and name == "__setitem__":  # x[i] = y: x is now the result of the (refused) setitem
            self.bind(args[0], node, derived)
        elif any(True for _ in _tensors(result)):
            if node is not None:
                self.bind(result, node, derived)
        else:  # a Python value: metadata (the same for every input of this shape), or the values themselves
            if node is not None:
                self.graph.erase_node(node)
            if name not in _METADATA and name != "__get__":
                self.value_read = True  # maybe branched on: this recording holds for this input only
        return result

    def _form(self, func: Any, name: str, args: tuple, kwargs: dict) -> tuple[str, Any, tuple, dict] | None:
        """The node the tracer would write for this call, or ``None`` for calls that are not recorded."""
        if name in _METADATA or name in _SHAPE_ONLY:
            return None
        if func is _attention_call:
            return "call_function", _ATTENTION, self._nodes(args), self._nodes(kwargs)
        if name == "__get__":  # a property of a tensor: x.T, x.mT, x.shape, x.dtype, ...
            prop = getattr(getattr(func, "__self__", None), "__name__", "")
            t = args[0] if args else None
            if not isinstance(t, torch.Tensor):
                return None
            if prop == "T":
                return "call_method", "permute", (self.node_of(t), *range(t.ndim - 1, -1, -1)), {}
            if prop == "mT":
                return "call_method", "transpose", (self.node_of(t), -2, -1), {}
            if prop in ("data", "real"):
                return "call_method", prop, (self.node_of(t),), {}
            return None
        is_method = getattr(torch.Tensor, name, None) is func or getattr(torch._C.TensorBase, name, None) is func
        if is_method and name in _DUNDERS:
            target, reflected = _DUNDERS[name]
            node_args = self._nodes(args)
            if reflected:
                node_args = (node_args[1], node_args[0], *node_args[2:])
            return "call_function", target, node_args, self._nodes(kwargs)
        if is_method:
            if name.startswith("__"):
                return None  # __bool__, __format__, __array__, ...: read values into Python
            if name in ("item", "tolist", "numpy"):
                return None
            return "call_method", name, self._nodes(args), self._nodes(kwargs)
        return "call_function", func, self._nodes(args), self._nodes(kwargs)

    # ---- modules -----------------------------------------------------------------------------

    def pre_hook(self, module: nn.Module, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        if self.silent:
            self.frames.append(("inner", None))
            return
        name = self.names.get(id(module))
        if not name or is_compiled(module):
            self.frames.append(("through", None))
        elif type(module) in DECOMPOSED or leaf_module(module, name):
            self.frames.append(("leaf", name))
            self.silent += 1
        else:
            self.frames.append(("through", name))
            self.stack.append((name, type(module)))

    def post_hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any] | None, output: Any) -> Any:
        if threading.get_ident() != self.thread or not self.frames:
            return None
        kind, name = self.frames.pop()
        if kind == "inner" or name is None:
            return None
        if kind == "through":
            self.stack.pop()
            self._module_output(name, output)
            return None
        self.silent -= 1
        decomposed = DECOMPOSED.get(type(module))
        if kwargs is None:  # this torch's global hooks do not show them: only a call without them is known fully
            if decomposed is not None:
                raise TypeError(f"LRP records {type(module).__name__} (module '{name}') only with torch >= 2.6.")
            kwargs = {}
        if not any(self.traced(t) for t in _tensors((args, kwargs))):
            return None  # computed from constants only: a constant
        if decomposed is not None:  # the reference computation, recorded, replaces the fused kernel's output
            self.stack.append((name, type(module)))
            try:
                output = decomposed(module, *args, **kwargs)
            finally:
                self.stack.pop()
            self._module_output(name, output)
            return output
        self.stack.append((name, type(module)))
        node = self._create("call_module", name, self._nodes(args), self._nodes(kwargs))
        self.stack.pop()
        self.bind(output, node, self.is_derived((args, kwargs)))
        self._module_output(name, output)
        return None

    def _module_output(self, name: str, output: Any) -> None:
        if isinstance(output, Mapping):
            output = tuple(output.values())
        first = next((t for t in _tensors(output if isinstance(output, (tuple, list)) else (output,)) if self.traced(t)), None)
        if first is not None and id(first) not in self.attrs:
            self.module_outputs.setdefault(name, []).append(self.node_of(first))


@contextlib.contextmanager
def _recording(recorder: _Recorder) -> Iterator[None]:
    """The mode, the global hooks and the attention kept as one call; all undone on exit, also on errors."""
    pre = register_module_forward_pre_hook(recorder.pre_hook)
    try:
        if _GLOBAL_HOOK_KWARGS:
            post = register_module_forward_hook(recorder.post_hook, with_kwargs=True)
        else:  # torch < 2.6: global hooks see no keyword arguments
            post = register_module_forward_hook(lambda module, args, output: recorder.post_hook(module, args, None, output))
        try:
            # looked up at call time by the decompositions; process-wide, as fx's own patching of wrapped functions
            decompose.attention = _attention_call
            try:
                with recorder:
                    yield
            finally:
                decompose.attention = _ATTENTION
        finally:
            post.remove()
            # torch's handle forgets the with_kwargs flag of a global hook (its extra dict is the always-call one)
            getattr(torch.nn.modules.module, "_global_forward_hooks_with_kwargs", {}).pop(post.id, None)
    finally:
        pre.remove()


def _working_dtype(model: nn.Module, inputs: torch.Tensor) -> torch.dtype:
    """The dtype :func:`~lightning_introspect.methods.lrp.lrp` propagates in: the recording sees the same input."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    reference = inputs.dtype if param is None else param.dtype
    return torch.float64 if reference == torch.float64 else torch.float32


def _input_name(model: nn.Module) -> str:
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        names = []
    return names[0] if names and names[0].isidentifier() else "x"


def _record(model: nn.Module, inputs: torch.Tensor) -> tuple[Plan, bool]:
    graph = fx.Graph()
    recorder = _Recorder(model, graph)
    dtype = _working_dtype(model, inputs)
    with introspection_mode(model, grad=False):
        x = fresh_input(inputs, requires_grad=False, dtype=dtype)
        placeholder = graph.placeholder(_input_name(model))
        recorder.bind(x, placeholder, derived=True)
        try:
            with _recording(recorder):
                output = model(x)
        except Exception as err:
            raise TypeError(f"LRP recorded the forward pass of {type(model).__name__} on the input, and it raised "
                            f"{type(err).__name__}: {err}") from err
        try:
            logits = model_logits(output)
        except ValueError as err:
            raise TypeError(f"LRP needs a model that returns a tensor: {err}") from err
        if not recorder.is_derived(logits):
            raise TypeError(
                f"LRP recorded the forward pass of {type(model).__name__}, but its output was not computed from the input by "
                "operations it could see (tensor functions and methods): it cannot be explained this way."
            )
        graph.output(recorder.node_of(logits))
        for node in reversed(list(graph.nodes)):  # results nothing reads (a tuple's parts, an unused size)
            if node.op not in ("placeholder", "output") and not node.users:
                graph.erase_node(node)
        alive = set(graph.nodes)
        outputs = {name: kept for name, nodes in recorder.module_outputs.items() if (kept := [n for n in nodes if n in alive])}
        plan = plan_from_graph(model, graph, recorder.constants, outputs)
        _verify(plan, model, x, logits.detach(), dtype)
    return plan, recorder.value_read


def _verify(plan: Plan, model: nn.Module, x: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """The plan, replayed on ``x``, must give the output the model gave."""
    try:
        got = Propagator(plan, model, Composite(), dtype).forward(x)
    except TypeError:  # already a reason LRP gives (token ids reaching no embedding, ...)
        raise
    except Exception as err:
        raise TypeError(f"LRP recorded the forward pass of {type(model).__name__}, but replaying it failed: "
                        f"{type(err).__name__}: {err}") from err
    want = want.to(got.dtype)
    scale = float(want.abs().max()) if want.numel() else 0.0
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * max(scale, 1.0)):
        diff = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
        raise TypeError(
            f"LRP recorded the forward pass of {type(model).__name__}, but the recorded graph does not reproduce its output "
            f"(shapes {tuple(got.shape)} / {tuple(want.shape)}, largest difference {diff:.3g}): some operation is hidden from "
            "the recording (e.g. done in place on a view, or outside torch's function API)."
        )


_CACHE_SIZE = 8  # recordings kept per model (input shapes)
_RECORDED: weakref.WeakKeyDictionary[nn.Module, OrderedDict[tuple, Plan]] = weakref.WeakKeyDictionary()


def recorded_plan(model: nn.Module, inputs: torch.Tensor) -> Plan:
    """The plan of ``model`` recorded from a forward pass on ``inputs`` (cached per model signature, input shape,
    dtype and device; recorded again each time for a forward that reads traced values into Python).

    Raises:
        TypeError: the forward raised, its output was not computed from the input by recorded operations, an
            operation has no LRP rule, or the recorded graph does not reproduce the model's output.
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"LRP needs one input tensor, but got {type(inputs).__name__}.")
    key = (model_signature(model), tuple(inputs.shape), inputs.dtype, inputs.device)
    cache = _RECORDED.setdefault(model, OrderedDict())
    plan = cache.get(key)
    if plan is not None:
        cache.move_to_end(key)
        return plan
    plan, value_read = _record(model, inputs)
    if not value_read:
        cache[key] = plan
        while len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    return plan
