"""Generated side-effect test over every attribution method in ``methods/`` (ours and LRP).

For each method, on a model that trains (BatchNorm, Dropout, in-place and functional ReLU, a BatchNorm
frozen in eval mode, parameters with existing ``.grad``), and also when the model or the target raises:
no hook or torch-function mode is left behind, every submodule's training flag is restored, parameter
``.grad`` is untouched (same object, same values), BatchNorm buffers and the inputs are unchanged, the
global torch RNG is unchanged, and grad mode / inference mode are as before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.methods.attention import ATTENTION_METHODS
from lightning_introspect.methods.attribution import METHODS, attribute


class _Net(nn.Module):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)
        self.fail = fail

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        if self.fail:
            raise RuntimeError("boom in forward")
        return self.head(self.drop(h.mean((2, 3))))


def _target_that_raises(output):
    raise RuntimeError("boom in target")


def _global_hooks():
    m = nn.modules.module
    names = ["_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"]
    return {n: len(getattr(m, n, {})) for n in names}


def _snapshot(net, x):
    return {
        "training": [m.training for m in net.modules()],
        "grads": [(p.grad, p.grad.clone()) for p in net.parameters()],
        "buffers": [b.clone() for b in net.buffers()],
        "params": [p.detach().clone() for p in net.parameters()],
        "x": (x.clone(), None if x.is_inference() else x._version, x.requires_grad),
        "rng": torch.get_rng_state(),
        "global_hooks": _global_hooks(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference": torch.is_inference_mode_enabled(),
    }


def _assert_unchanged(net, x, before):
    for name, module in net.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, kind), f"{kind} left on {name or 'model'}"
    assert _global_hooks() == before["global_hooks"]
    assert torch._C._len_torch_function_stack() == 0, "a torch-function mode was left active"
    assert [m.training for m in net.modules()] == before["training"], "training flags not restored"
    for p, (obj, value) in zip(net.parameters(), before["grads"]):
        assert p.grad is obj and torch.equal(p.grad, value), "parameter .grad touched"
    for b, value in zip(net.buffers(), before["buffers"]):
        assert torch.equal(b, value), "BatchNorm running stats changed"
    for p, value in zip(net.parameters(), before["params"]):
        assert torch.equal(p.detach(), value)
    x0, version, requires_grad = before["x"]
    assert torch.equal(x, x0) and (version is None or x._version == version) and x.requires_grad == requires_grad and x.grad is None
    assert torch.equal(torch.get_rng_state(), before["rng"]), "global RNG changed"
    assert torch.is_grad_enabled() == before["grad_enabled"]
    assert torch.is_inference_mode_enabled() == before["inference"]


# The CNN has no attention: the rollouts get the same checks on a ViT in tests/test_attention_methods.py.
CNN_METHODS = [m for m in METHODS if m not in ATTENTION_METHODS]


def _methods():
    return [*CNN_METHODS, "attribute(all)"]


def _call(name, net, x, target):
    if name == "attribute(all)":
        return attribute(net, x, target, CNN_METHODS, layer="bn2", options={"guided_backprop": {"top_k": 3}})
    if name in ("grad_cam", "guided_grad_cam"):
        return METHODS[name](net, x, target, "bn2")
    if name == "guided_backprop":
        return METHODS[name](net, x, target, top_k=3, layer="bn2")
    return METHODS[name](net, x, target)


def _setup(fail=False):
    torch.manual_seed(0)
    net = _Net(fail=fail)
    net.train()
    net.bn2.eval()  # a user-frozen BatchNorm inside a training model
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    x = torch.randn(4, 1, 8, 8)
    return net, x


@pytest.mark.parametrize("case", ["ok", "ok_no_grad", "model_raises", "target_raises"])
@pytest.mark.parametrize("name", _methods())
def test_method_leaves_no_trace(name, case):
    net, x = _setup(fail=case == "model_raises")
    target = _target_that_raises if case == "target_raises" else [0, 1, 2, 0]
    grad_context = torch.no_grad() if case == "ok_no_grad" else torch.enable_grad()
    with grad_context:
        before = _snapshot(net, x)
        if case.startswith("ok"):
            out = _call(name, net, x, target)
            maps = out.values() if isinstance(out, dict) else [out]
            for m in maps:
                assert m.shape[0] == 4 and torch.isfinite(m).all() and not m.requires_grad
        else:
            with pytest.raises((RuntimeError, TypeError), match="boom"):  # LRP wraps tracing errors
                _call(name, net, x, target)
        _assert_unchanged(net, x, before)


def test_inference_mode_caller_is_left_in_inference_mode():
    net, x = _setup()
    with torch.inference_mode():
        xi = x.clone()
        before = _snapshot(net, xi)
        attribute(net, xi, "pred", ["saliency", "guided_backprop", "grad_cam"], layer="bn2")
        _assert_unchanged(net, xi, before)
