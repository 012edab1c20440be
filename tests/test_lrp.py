"""LRP: agreement with captum, the gradient x input limit, conservation, rules and composites by hand, folding,
non-interference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.methods.lrp import (
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    Rule,
    WSquare,
    ZBox,
    ZPlus,
    epsilon_plus,
    epsilon_plus_flat,
    fold_batchnorm,
    lrp,
)
from lightning_introspect.methods.targets import RegionTarget


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is ~50x faster than two on the shared, loaded CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ models


class PlainCNN(nn.Module):
    """Conv / ReLU / MaxPool / AdaptiveAvgPool / view / Linear: every layer captum's LRP has a rule for."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        self.fc1, self.relu3, self.fc2 = nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x))))))
        x = x.view(x.shape[0], -1)  # captum has no rule for nn.Flatten
        return self.fc2(self.relu3(self.fc1(x)))


class Block(nn.Module):
    """A ResNet basic block: in-place ReLU, BatchNorm, `+=` with an identity or a projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        projection = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out, inplace=True)


class SmallResNet(nn.Module):
    def __init__(self, width: int = 6, classes: int = 5) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layer1, self.layer2, self.layer3 = Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 2 * w, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class FunctionalNet(nn.Module):
    """Functional ops LRP must see through: F.relu (in place), x.relu(), F.max_pool2d, torch.cat, scaling,
    F.dropout, `x.mean`, a Linear followed by a folded BatchNorm1d, reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.Conv2d(1, 4, 5, padding=2, bias=False)
        self.c = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc, self.bn = nn.Linear(8, 8, bias=False), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x), inplace=True), self.b(x).relu()], dim=1)
        h = F.max_pool2d(h, 2) * 0.5
        h = F.dropout(F.relu(self.c(h)), 0.3, training=self.training).mean((2, 3))
        h = F.relu(self.bn(self.fc(h.reshape(h.size(0), -1))))
        return self.head(h)


class MixedNet(nn.Module):
    """Depthwise (grouped) convs, a standalone BatchNorm, an MLP tail on signed features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(4)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 10), nn.BatchNorm1d(10), nn.LeakyReLU(0.1), nn.Dropout(), nn.Linear(10, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.avg_pool2d(self.depthwise(F.relu(self.conv(x))), 2)
        return self.mlp(self.bn(h))  # bn follows a pooling layer: not folded, an affine layer


class SegNet(nn.Module):
    """(N, 3, H, W) per-pixel logits; receptive field 5x5."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Conv2d(6, 3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def zero_biases(model: nn.Module) -> nn.Module:
    """Biases off everywhere; BatchNorm keeps a random scale but no shift (so folding adds no bias)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=gen))
                module.bias.zero_()
                module.running_mean.zero_()
            elif getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model.eval()


def random_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and shifts, as after training."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=gen))
    return model.eval()


def make(cls: type[nn.Module], seed: int = 0, **kwargs: object) -> nn.Module:
    torch.manual_seed(seed)
    return cls(**kwargs).eval()


def batch(shape: tuple[int, ...] = (6, 1, 12, 12), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sums(relevance: torch.Tensor) -> torch.Tensor:
    return relevance.flatten(1).sum(1)


# ---------------------------------------------------------------------------------- (1) captum


@pytest.mark.parametrize("epsilon", [1e-9, 1e-2])
def test_epsilon_rule_matches_captum(epsilon: float) -> None:
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import EpsilonRule

    model, x = make(PlainCNN), batch()
    target = [0, 1, 2, 3, 4, 0]
    reference_model = copy.deepcopy(model)  # captum attaches rules / hooks to the model it is given
    for module in reference_model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            module.rule = EpsilonRule(epsilon=epsilon)
    reference = LRP(reference_model).attribute(x.clone().requires_grad_(), target=target).detach()
    ours = lrp(model, x, target, epsilon=epsilon)
    assert ours.shape == x.shape and not ours.requires_grad
    # fp32 round-off only: the two implementations do the same arithmetic in a different order.
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    assert reference.abs().max() > 0


# ---------------------------------------------------------------------- (2) gradient x input limit


@pytest.mark.parametrize("cls", [PlainCNN, SmallResNet, FunctionalNet])
def test_epsilon_to_zero_is_gradient_times_input_for_bias_free_relu_nets(cls: type[nn.Module]) -> None:
    model = zero_biases(make(cls)).double()
    x = batch((4, 1, 12, 12)).double()
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    relevance = lrp(model, x, 1, epsilon=1e-12)
    assert relevance.dtype == torch.float64
    # The two differ by O(eps / |z|) per layer: ~1e-10 relative at eps=1e-12 in fp64.
    torch.testing.assert_close(relevance, grad * x, rtol=1e-7, atol=1e-9 * (grad * x).abs().max().item())


# ------------------------------------------------------------------------------- (3) conservation


@pytest.mark.parametrize("cls", [PlainCNN, SmallResNet, FunctionalNet, MixedNet])
def test_epsilon_conserves_the_target_logit_with_zero_biases(cls: type[nn.Module]) -> None:
    model, x = zero_biases(make(cls)), batch()
    with torch.no_grad():
        logits = model(x)
    target = [i % logits.shape[1] for i in range(x.shape[0])]
    score = logits[torch.arange(x.shape[0]), target]
    scale = score.abs().mean()
    # Each layer keeps sum_k z_k / (z_k + eps) R_k: the loss is O(eps / |z|) (measured ~5e-5 relative at
    # eps=1e-6 on these models, ~5e-8 at eps=1e-9 where fp32 round-off ~1e-7 dominates).
    torch.testing.assert_close(sums(lrp(model, x, target)), score, rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(sums(lrp(model, x, target, epsilon=1e-9)), score, rtol=0, atol=1e-5 * scale)
    # fp64 shows it is the maths, not luck: relative error ~1e-10.
    model64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        score64 = model64(x64)[torch.arange(x.shape[0]), target]
    torch.testing.assert_close(sums(lrp(model64, x64, target, epsilon=1e-12)), score64, rtol=0, atol=1e-8 * scale.item())


def test_biases_absorb_relevance_under_epsilon() -> None:
    model, x = random_batchnorm(make(SmallResNet)), batch()
    with torch.no_grad():
        score = model(x)[:, 2]
    gap = (sums(lrp(model, x, 2)) - score).abs().max()
    assert gap > 1e-3 * score.abs().mean()  # BatchNorm shifts become biases of the folded convs


# --------------------------------------------------------------------------- (4) z+ / alpha-beta


@pytest.mark.parametrize("cls", [PlainCNN, SmallResNet])
def test_zplus_maps_have_the_sign_of_the_target_score(cls: type[nn.Module]) -> None:
    model, x = random_batchnorm(make(cls)), batch()
    with torch.no_grad():
        logits = model(x)
    for target in range(logits.shape[1]):
        relevance = lrp(model, x, target, rule="zplus")
        signed = relevance * logits[:, target].sign().view(-1, 1, 1, 1)
        assert signed.min() >= -1e-7 * relevance.abs().max()
    assert (logits < 0).any() and (logits > 0).any()  # both signs were exercised
    torch.testing.assert_close(lrp(model, x, 0, rule="z+"), lrp(model, x, 0, rule="zplus"))


@pytest.mark.parametrize("cls", [PlainCNN, SmallResNet, FunctionalNet, MixedNet])
@pytest.mark.parametrize("rule", ["zplus", "alpha_beta"])
def test_zplus_and_alpha_beta_conserve_even_with_biases(cls: type[nn.Module], rule: str) -> None:
    model, x = random_batchnorm(make(cls)), batch()
    if cls is MixedNet:  # a neuron whose inputs are all zero fires through its bias alone: its relevance is
        with torch.no_grad():  # lost. Single-channel 3x3 patches of ReLU output are all zero often enough.
            model.conv.bias.zero_()
            model.depthwise.bias.zero_()
    with torch.no_grad():
        score = model(x)[:, 1]
    # Biases are not counted in z+ / z-, and one-sign neurons share in proportion: every layer conserves.
    torch.testing.assert_close(sums(lrp(model, x, 1, rule=rule)), score, rtol=1e-4, atol=1e-5 * score.abs().mean())


def test_alpha_beta_differs_from_zplus_and_reduces_to_it() -> None:
    model, x = make(PlainCNN), batch()
    ab = lrp(model, x, "pred", rule="alpha_beta", alpha=2.0, beta=1.0)
    zplus = lrp(model, x, "pred", rule="zplus")
    assert ab.min() < 0 and (ab - zplus).abs().max() > 0.1 * zplus.abs().max()
    torch.testing.assert_close(lrp(model, x, "pred", rule="alpha_beta", alpha=1.0, beta=0.0), zplus)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "gamma"}, "rule"),
        ({"rule": "alpha_beta", "alpha": 2.0, "beta": 2.0}, "alpha"),
        ({"rule": "alpha_beta", "alpha": 0.5, "beta": -0.5}, "beta"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1e-6}, "epsilon"),
    ],
)
def test_bad_options_raise_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lrp(make(PlainCNN), batch(), 0, **kwargs)


def test_bad_target_raises_value_error() -> None:
    with pytest.raises(ValueError, match="target"):
        lrp(make(PlainCNN), batch(), 7)


# -------------------------------------------------------------------------- (5) BatchNorm folding


@pytest.mark.parametrize("cls", [SmallResNet, FunctionalNet, MixedNet])
def test_folding_keeps_the_forward_output(cls: type[nn.Module]) -> None:
    model, x = random_batchnorm(make(cls)), batch()
    before = copy.deepcopy(model.state_dict())
    folded = fold_batchnorm(model)
    kept = {name for name, m in folded.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))}
    assert kept == ({"bn"} if cls is MixedNet else set())  # only the BatchNorm after a pooling layer stays
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # lrp folds the same way internally: the folded model has the same relevance.
    torch.testing.assert_close(lrp(model, x, "pred"), lrp(folded, x, "pred"), rtol=1e-5, atol=1e-7)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batchnorm_without_preceding_layer_is_an_affine_layer() -> None:
    torch.manual_seed(0)
    bn_first = random_batchnorm(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 3)))
    # The same affine map as a depthwise 1x1 convolution, which gets the rule of a weighted layer.
    bn = bn_first[0]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    as_conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        as_conv.weight.copy_(scale.view(1, 1, 1, 1))
        as_conv.bias.copy_(bn.bias - bn.running_mean * scale)
    conv_first = nn.Sequential(as_conv, *copy.deepcopy(list(bn_first)[1:])).eval()
    x = batch()
    for rule in ("epsilon", "alpha_beta"):
        torch.testing.assert_close(lrp(bn_first, x, [0, 1, 2, 0, 1, 2], rule=rule), lrp(conv_first, x, [0, 1, 2, 0, 1, 2], rule=rule),
                                   rtol=1e-5, atol=1e-7)


def test_batchnorm_without_running_stats_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.Linear(200, 2))
    with pytest.raises(TypeError, match=r"'2'.*BatchNorm2d"):
        lrp(model, batch(), 0)


# ---------------------------------------------------------------------- (6) non-interference


def _hook_count(model: nn.Module) -> int:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")
    return sum(len(getattr(m, n, {})) for m in model.modules() for n in names)


class ConstantNet(nn.Module):
    """Creates a tensor constant in forward (the fx tracer would store it on the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 3, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x) + torch.tensor(0.1)).mean((2, 3)))


@pytest.mark.parametrize("cls", [SmallResNet, ConstantNet])
def test_the_users_model_is_left_untouched(cls: type[nn.Module]) -> None:
    model = random_batchnorm(make(cls)).train()
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()  # a frozen submodule inside a training model must stay frozen
    modes = [m.training for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    attributes = set(model.__dict__)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))  # a user's hook stays silent
    x = batch()
    x_before = x.clone()
    rng = torch.get_rng_state()
    try:
        expected = lrp(model, x, "pred")
        with torch.inference_mode():  # as inside Lightning's validation hooks
            inside = lrp(model, x, "pred", rule="alpha_beta")
            again = lrp(model, x, "pred")
    finally:
        handle.remove()
    assert not calls
    torch.testing.assert_close(again, expected)
    assert not again.requires_grad and not inside.requires_grad
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == model.state_dict().keys()
    assert all(p.grad is None for p in model.parameters())
    assert _hook_count(model) == 0
    assert set(model.__dict__) == attributes
    assert torch.equal(x, x_before) and not x.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)


def test_inference_tensors_are_accepted() -> None:
    model = make(PlainCNN)
    with torch.inference_mode():
        x = batch()
    torch.testing.assert_close(lrp(model, x, 1), lrp(model, x.clone(), 1))


# ---------------------------------------------------------------------- (7) unsupported layers


def test_unsupported_module_is_named_with_its_type() -> None:
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(300, 2))
    with pytest.raises(TypeError, match=r"module '1' of type torch\.nn\.GroupNorm"):
        lrp(model, batch(), 0)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.conv(x))


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.fc = Gated(), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(x).mean((2, 3)))


def test_unsupported_operation_is_named_with_its_module() -> None:
    with pytest.raises(TypeError, match=r"exp.*inside module 'block' of type .*Gated"):
        lrp(GatedNet(), batch(), 0)


def test_changed_modules_are_traced_again() -> None:
    model, x = make(PlainCNN), batch()
    lrp(model, x, 0)
    model.relu3 = nn.PReLU()  # the cached trace must not hide the new module
    with pytest.raises(TypeError, match=r"module 'relu3' of type torch\.nn\.PReLU"):
        lrp(model, x, 0)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


def test_untraceable_model_is_recorded_instead() -> None:
    # fx cannot trace a branch on values; the forward recorded on the input explains the branch it took
    model, x = DataDependent(), torch.rand(3, 4) + 0.1
    torch.testing.assert_close(lrp(model, x, 0), lrp(model.fc, x, 0))


class Quotient(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h / h.sum(-1, keepdim=True))


def test_quotient_of_two_input_dependent_tensors_is_refused() -> None:
    # products of input-dependent tensors have the uniform rule (tests/test_lrp_transformers.py); quotients have none
    with pytest.raises(TypeError, match="truediv"):
        lrp(Quotient(), torch.randn(3, 4), 0)


# --------------------------------------------------------------------------- (8) targets


def test_each_sample_is_explained_with_its_own_target() -> None:
    model, x = random_batchnorm(make(SmallResNet)), batch()
    target = [4, 0, 3, 3, 1, 2]
    together = lrp(model, x, target)
    alone = torch.cat([lrp(model, x[i : i + 1], t) for i, t in enumerate(target)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lrp(model, x, torch.tensor(target)), together)
    assert (together[0] - lrp(model, x[:1], 0)[0]).abs().max() > 0  # the targets matter
    with torch.no_grad():
        pred = model(x).argmax(1)
    torch.testing.assert_close(lrp(model, x, "pred"), lrp(model, x, pred))


def test_callable_target_relevance_is_output_times_its_gradient() -> None:
    model, x = zero_biases(make(PlainCNN)), batch()
    with torch.no_grad():
        logits = model(x)
    relevance = lrp(model, x, lambda out: out[:, 3] - out[:, 1], epsilon=1e-9)
    # A linear score of the logits keeps its value as the total relevance.
    torch.testing.assert_close(sums(relevance), logits[:, 3] - logits[:, 1], rtol=0, atol=1e-5 * logits.abs().mean())


def test_region_target_on_a_segmentation_net() -> None:
    model = make(SegNet)
    x = batch((3, 1, 16, 16))
    mask = torch.zeros(3, 16, 16, dtype=torch.bool)
    mask[:, 2:5, 2:5] = True
    region = RegionTarget(class_id=[0, 2, 1], mask=mask)
    relevance = lrp(model, x, region, epsilon=1e-9)
    with torch.no_grad():
        out = model(x)
    score = torch.stack([(out[i, c] * mask[i]).sum() for i, c in enumerate([0, 2, 1])])
    torch.testing.assert_close(sums(relevance), score, rtol=0, atol=1e-5 * score.abs().mean())  # bias-free: conserved
    # Only the mask's receptive field (two 3x3 convs: 2 pixels around it) receives relevance.
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[0:7, 0:7] = True
    assert relevance[:, 0][:, ~inside].abs().max() == 0 and relevance[:, 0][:, inside].abs().max() > 0
    alone = lrp(model, x[1:2], RegionTarget(class_id=2, mask=mask[1]), epsilon=1e-9)
    torch.testing.assert_close(relevance[1:2], alone, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------ (9) the trained demo CNN


@pytest.mark.slow
def test_trained_digits_cnn(trained_digits) -> None:
    from tests.helpers import val_tensors

    model, dm = trained_digits
    x, y = val_tensors(dm)
    x, y = x[:32], y[:32]
    with torch.no_grad():
        logits = model(x)
    maps = {rule: lrp(model, x, y, rule=rule) for rule in ("epsilon", "zplus", "alpha_beta")}
    assert all(m.shape == x.shape and torch.isfinite(m).all() for m in maps.values())
    # BatchNorm (folded), MaxPool, AdaptiveAvgPool and Flatten: the folded model gives the same relevance.
    torch.testing.assert_close(maps["epsilon"], lrp(fold_batchnorm(model), x, y), rtol=1e-4, atol=1e-6)
    score = logits[torch.arange(32), y]
    assert (score > 0).all()
    torch.testing.assert_close(sums(maps["zplus"]), score, rtol=1e-4, atol=1e-5)  # z+ conserves, biases aside
    assert maps["zplus"].min() >= 0
    # Positive z+ relevance sits on the pen strokes more than their share of the image.
    ink = x > x.flatten(1).median(1).values.view(-1, 1, 1, 1)
    positive = maps["zplus"].clamp(min=0)
    share = ((positive * ink).flatten(1).sum(1) / positive.flatten(1).sum(1)).mean()
    assert share > ink.float().mean() + 0.08
    # Class-specific: explaining another class gives a different map.
    other = lrp(model, x, (y + 1) % 10)
    assert F.cosine_similarity(other.flatten(1), maps["epsilon"].flatten(1)).mean() < 0.5


def test_methods_lrp_is_the_package_whatever_was_imported_before() -> None:
    import importlib

    from lightning_introspect import methods
    from lightning_introspect.methods import lrp as from_package
    from lightning_introspect.methods.lrp import lrp as function

    package = importlib.import_module("lightning_introspect.methods.lrp")
    assert from_package is package is methods.lrp and function is package.lrp and callable(function)
    assert methods.fold_batchnorm is fold_batchnorm and methods.ZPlus is ZPlus


# ------------------------------------------------------------- (10) rules and composites by hand
#
# x = [1, 2] -> W1 = [[1, 1], [3, -1]] -> h = relu([3, 1]) = [3, 1] -> W2 = [[1, -2]] -> y = 1, no biases.
# Layer 2 gets R = y = 1 from its contributions [3, -2]; layer 1's neurons get layer 2's shares.

W1, W2 = [[1.0, 1.0], [3.0, -1.0]], [[1.0, -2.0]]


def tiny_mlp() -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1))
        net[2].weight.copy_(torch.tensor(W2))
    return net.eval()


def tiny_cnn() -> nn.Module:
    """The same maths with a Conv1d first layer (kernel 2 over a length-2 input), to map rules by type."""
    net = nn.Sequential(nn.Conv1d(1, 2, 2, bias=False), nn.Flatten(), nn.ReLU(), nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(W1).view(2, 1, 2))
        net[3].weight.copy_(torch.tensor(W2))
    return net.eval()


X = torch.tensor([[1.0, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # R_h = [3, -2]; neuron 1: [1, 2] * 3/3; neuron 2: [3, -2] * -2/1.
        ({"rule": "epsilon", "epsilon": 1e-12}, [1 - 6, 2 + 4]),
        # R_h = [3/3, 0] (z+ = 3); neuron 1: [1, 2] / 3.
        ({"rule": "zplus"}, [1 / 3, 2 / 3]),
        # R_h = [2 * 3/3, -1 * -2/-2] = [2, -1]; neuron 1 has positive inputs only: [1, 2] * 2/3;
        # neuron 2: 2 * 3/3 * -1 = -2 to x1 and -1 * -2/-2 * -1 = 1 to x2.
        ({"rule": "alpha_beta", "alpha": 2.0, "beta": 1.0}, [2 / 3 - 2, 4 / 3 + 1]),
        # Layer 2 with w + 0.5 w+ = [1.5, -2]: contributions [4.5, -2], z = 2.5, R_h = [1.8, -0.8]; layer 1
        # also gamma: neuron 1 [1.5, 3] / 4.5 * 1.8 = [0.6, 1.2]; neuron 2 w' = [4.5, -1]: [4.5, -2] / 2.5 * -0.8.
        ({"rule": Gamma(0.5, epsilon=1e-12)}, [0.6 - 1.44, 1.2 + 0.64]),
        # Flat everywhere: layer 2 splits 1 into [0.5, 0.5]; each neuron splits its share equally again.
        ({"rule": Flat()}, [0.5, 0.5]),
        # w^2 everywhere: layer 2 [1, 4] / 5 -> [0.2, 0.8]; neuron 1 [1, 1] / 2 * 0.2; neuron 2 [9, 1] / 10 * 0.8.
        ({"rule": WSquare()}, [0.1 + 0.72, 0.1 + 0.08]),
    ],
    ids=["epsilon", "zplus", "alpha_beta", "gamma", "flat", "wsquare"],
)
def test_known_answer_per_rule(kwargs: dict, expected: list[float]) -> None:
    relevance = lrp(tiny_mlp(), X, 0, **kwargs)
    torch.testing.assert_close(relevance, torch.tensor([expected], dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert abs(relevance.sum().item() - 1.0) < 1e-9  # every rule here conserves y = 1 without biases


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        # Epsilon above (R_h = [3, -2]); flat first layer: [3/2, 3/2] + [-1, -1].
        (Flat(), [0.5, 0.5]),
        # w^2 first layer: [1, 1] / 2 * 3 + [9, 1] / 10 * -2.
        (WSquare(), [1.5 - 1.8, 1.5 - 0.2]),
        # z^B with x in [-1, 3]: neuron 1 (w+ = [1, 1]): [1 + 1, 2 + 1] / 5 * 3; neuron 2 (w+ = [3, 0],
        # w- = [0, -1]): [3 + 3, -2 + 3] / 7 * -2.
        (ZBox(-1.0, 3.0, epsilon=1e-12), [6 / 5 - 12 / 7, 9 / 5 - 2 / 7]),
    ],
    ids=["flat", "wsquare", "zbox"],
)
def test_first_layer_rule_of_a_composite(first: Rule, expected: list[float]) -> None:
    composite = Composite(first=first, default=Epsilon(1e-12))
    relevance = lrp(tiny_mlp(), X, 0, composite=composite)
    torch.testing.assert_close(relevance, torch.tensor([expected], dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_composite_maps_rules_by_type_name_and_first_layer() -> None:
    net, x = tiny_cnn(), X.view(1, 1, 2)

    def relevance(composite: object) -> list[float]:
        return lrp(net, x, 0, composite=composite).flatten().tolist()

    # Linear epsilon (R_h = [3, -2]); Conv1d z+: neuron 1 [1, 2] * 3/3; neuron 2 only its positive
    # contribution 3: -2 * 3/3 to x1.
    expected_plus = [1 - 2, 2 + 0]
    assert relevance({nn.Conv1d: ZPlus(), nn.Linear: Epsilon(1e-12)}) == pytest.approx(expected_plus, abs=1e-9)
    assert relevance(epsilon_plus(1e-12)) == pytest.approx(expected_plus, abs=1e-9)
    # The first layer's rule beats the type map.
    assert relevance(epsilon_plus_flat(1e-12)) == pytest.approx([0.5, 0.5], abs=1e-9)
    # Conv1d alpha-beta (2, 1): neuron 1 [1, 2] * 3/3; neuron 2: 2 * 3/3 * -2 to x1, -1 * -2/-2 * -2 to x2.
    # (by name: the preset's own epsilon, 1e-6, absorbs ~1e-6 of the relevance)
    assert relevance("epsilon_alpha2_beta1") == pytest.approx([1 - 4, 2 + 2], rel=1e-5)
    # A name beats the type: conv '0' gets epsilon back (gradient x input, [-5, 6]).
    composite = Composite({nn.Conv1d: ZPlus()}, name_map={"0": Epsilon(1e-12)}, default=Epsilon(1e-12))
    assert relevance(composite) == pytest.approx([-5, 6], abs=1e-9)


def test_old_keywords_are_the_rule_objects() -> None:
    model, x = random_batchnorm(make(SmallResNet)), batch()
    assert torch.equal(lrp(model, x, 1, epsilon=1e-3), lrp(model, x, 1, composite=Composite(default=Epsilon(1e-3))))
    assert torch.equal(lrp(model, x, 1, rule="z+"), lrp(model, x, 1, rule=ZPlus()))
    assert torch.equal(lrp(model, x, 1, rule="alpha_beta", alpha=1.5, beta=0.5), lrp(model, x, 1, rule=AlphaBeta(1.5, 0.5)))
    assert torch.equal(lrp(model, x, 1, rule="zplus"), lrp(model, x, 1, rule=AlphaBeta(1.0, 0.0)))


@pytest.mark.parametrize(
    "rule", [Gamma(0.25, epsilon=1e-12), Flat(), WSquare()], ids=["gamma", "flat", "wsquare"]
)
def test_other_rules_conserve_with_zero_biases(rule: Rule) -> None:
    model, x = zero_biases(make(SmallResNet)).double(), batch().double()
    with torch.no_grad():
        score = model(x)[:, 3]
    torch.testing.assert_close(sums(lrp(model, x, 3, rule=rule)), score, rtol=1e-7, atol=1e-9 * score.abs().mean().item())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"composite": "plus"}, "composite"),
        ({"composite": {3: Epsilon()}}, "composite"),
        ({"composite": {nn.Linear: "epsilon"}}, "layer_map"),
        ({"composite": "epsilon_plus", "rule": "zplus"}, "either `rule` or `composite`"),
        ({"rule": 3}, "rule"),
    ],
)
def test_bad_composites_raise_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lrp(make(PlainCNN), batch(), 0, **kwargs)


def test_bad_rule_parameters_raise_value_errors() -> None:
    for make_rule, match in [(lambda: Gamma(-1.0), "gamma"), (lambda: ZBox(1.0, 0.0), "low"), (lambda: Epsilon(0.0), "epsilon"),
                             (lambda: Composite(default=ZBox()), "default")]:
        with pytest.raises(ValueError, match=match):
            make_rule()


# ---------------------------------------------------------------- (11) captum's other rules


def _captum_reference(model: nn.Module, x: torch.Tensor, target: list[int], rule_of: object) -> torch.Tensor:
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import EpsilonRule

    reference_model = copy.deepcopy(model)
    for module in reference_model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.rule = rule_of()
        elif isinstance(module, (nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
            module.rule = EpsilonRule(epsilon=1e-9)
    return LRP(reference_model).attribute(x.clone().requires_grad_(), target=target).detach()


def test_gamma_rule_matches_captum() -> None:
    from captum.attr._utils.lrp_rules import GammaRule

    model, x = make(PlainCNN), batch()
    target = [0, 1, 2, 3, 4, 0]
    reference = _captum_reference(model, x, target, lambda: GammaRule(gamma=0.25))
    gamma = Gamma(0.25, epsilon=1e-9)
    ours = lrp(model, x, target, composite=Composite({nn.Conv2d: gamma, nn.Linear: gamma}, default=Epsilon(1e-9)))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    assert (ours - lrp(model, x, target, epsilon=1e-9)).abs().max() > 1e-3 * reference.abs().max()  # gamma mattered


def test_zplus_matches_captums_alpha1_beta0_on_nonnegative_inputs_without_biases() -> None:
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule

    # captum's rule is a+ w+ / z+ with the bias: z+ proper (which also counts a- w-) only for inputs >= 0.
    model, x = zero_biases(make(PlainCNN)), batch().abs()
    target = [0, 1, 2, 3, 4, 0]
    reference = _captum_reference(model, x, target, Alpha1_Beta0_Rule)
    ours = lrp(model, x, target, composite=Composite({nn.Conv2d: ZPlus(), nn.Linear: ZPlus()}, default=Epsilon(1e-9)))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())
    assert reference.abs().max() > 0
