"""LRP on U-Nets: transposed convolutions, upsampling and skip concatenations.

Known answers: each new layer against its dense equivalent (an ``nn.Linear`` whose weight is the layer's
Jacobian, for which the rules are already checked by hand and against captum), the gradient x input limit
of epsilon on bias-free networks, conservation, and region targets on the demo's and the zoo's U-Nets.
"""

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
    fold_batchnorm,
    lrp,
    lrp_unsupported,
)
from lightning_introspect.methods.targets import RegionTarget, object_targets, target_scores
from lightning_introspect.segmentation_demo import ShapesUNet
from tests.zoo import TinyUNet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sums(relevance: torch.Tensor) -> torch.Tensor:
    return relevance.flatten(1).sum(1)


def signed(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Dense(nn.Module):
    """``layer`` on one sample shape as a single ``nn.Linear`` (flattened in and out): its Jacobian as weight,
    its output at zero as bias."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        x0 = torch.zeros(1, *shape, dtype=torch.float64)
        with torch.no_grad():
            bias = layer(x0).flatten()
        jacobian = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *shape)).flatten() - bias, x0.flatten())
        self.linear = nn.Linear(x0.numel(), bias.numel()).double()
        with torch.no_grad():
            self.linear.weight.copy_(jacobian)
            self.linear.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class Flattened(nn.Module):
    """``layer`` then a flatten, optionally after a ReLU (inputs known to be >= 0)."""

    def __init__(self, layer: nn.Module, relu: bool) -> None:
        super().__init__()
        self.relu, self.layer = (nn.ReLU() if relu else nn.Identity()), layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.relu(x)).flatten(1)


class ReluThenDense(nn.Module):
    def __init__(self, dense: Dense, relu: bool) -> None:
        super().__init__()
        self.relu, self.dense = (nn.ReLU() if relu else nn.Identity()), dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.relu(x))


def _pair(layer: nn.Module, shape: tuple[int, ...], relu: bool) -> tuple[nn.Module, nn.Module]:
    layer = layer.double().eval()
    return Flattened(layer, relu).eval(), ReluThenDense(Dense(layer, shape), relu).eval()


def _weighted_score(out: torch.Tensor) -> torch.Tensor:
    """A signed linear score over every output: both signs of output relevance are exercised."""
    v = torch.linspace(-1.0, 1.5, out.shape[1], dtype=out.dtype, device=out.device)
    return out @ v


def _conv_transposes() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "stride2": nn.ConvTranspose2d(3, 4, 2, stride=2),
        "k3_pad1_outpad1": nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
        "dilated": nn.ConvTranspose2d(3, 2, 3, dilation=2),
        "groups": nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
    }


# ------------------------------------------------------------------------ transposed convolutions


@pytest.mark.parametrize("relu", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize("name", ["stride2", "k3_pad1_outpad1", "dilated", "groups"])
@pytest.mark.parametrize(
    "rule", [Epsilon(1e-6), ZPlus(), AlphaBeta(2.0, 1.0), Gamma(0.25), WSquare(), ZBox(-5.0, 5.0)],
    ids=["epsilon", "zplus", "alpha_beta", "gamma", "wsquare", "zbox"],
)
def test_conv_transpose_matches_its_dense_equivalent(name: str, rule: Rule, relu: bool) -> None:
    layer = _conv_transposes()[name]
    shape = (layer.in_channels, 4, 4)
    model, dense = _pair(layer, shape, relu)
    x = signed((3, *shape))
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x))
    options = {"composite": Composite(first=rule)} if isinstance(rule, ZBox) else {"rule": rule}  # a first-layer rule
    ours = lrp(model, x, _weighted_score, **options)
    reference = lrp(dense, x, _weighted_score, **options)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10 * reference.abs().max().item())
    assert reference.abs().max() > 0


def test_flat_rule_on_a_conv_transpose_shares_over_its_real_connections() -> None:
    # Flat: every input a neuron is connected to gets an equal share. Stride 2, kernel 2: each output pixel
    # has exactly one input pixel per channel, so an output's relevance splits equally over the channels at
    # the one pixel it came from.
    layer = nn.ConvTranspose2d(3, 1, 2, stride=2, bias=False).double()
    model = Flattened(layer, relu=False).eval()
    x = signed((1, 3, 2, 2))
    relevance = lrp(model, x, lambda out: out[:, 0], rule=Flat())  # output pixel (0, 0) <- input pixel (0, 0)
    with torch.no_grad():
        y00 = model(x)[0, 0]
    expected = torch.zeros_like(x)
    expected[0, :, 0, 0] = y00 / 3
    torch.testing.assert_close(relevance, expected)


def test_batchnorm_after_a_conv_transpose_is_folded() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    with torch.no_grad():
        bn = net[1]
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    net = net.double().eval()
    x = signed((2, 4, 3, 3))
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x))
    for rule in ("epsilon", "alpha_beta"):
        torch.testing.assert_close(lrp(net, x, 1, rule=rule), lrp(folded, x, 1, rule=rule))


def test_conv_transpose_with_an_output_size_is_refused() -> None:
    class Sized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.up(x, [9, 9])

    assert "module 'up' of type torch.nn.ConvTranspose2d called with more than one argument" in str(lrp_unsupported(Sized()))


def test_conv_transpose_1d_and_3d() -> None:
    torch.manual_seed(0)
    for layer, shape in [(nn.ConvTranspose1d(2, 3, 3, stride=2), (2, 5)), (nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 2, 2, 2))]:
        model, dense = _pair(layer, shape, relu=False)
        x = signed((2, *shape))
        for rule in (Epsilon(), AlphaBeta(2.0, 1.0)):
            torch.testing.assert_close(lrp(model, x, _weighted_score, rule=rule), lrp(dense, x, _weighted_score, rule=rule))


# -------------------------------------------------------------------------------------- upsampling


class Interpolate(nn.Module):
    def __init__(self, **kwargs: object) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, **self.kwargs)


UPSAMPLERS = {
    "nearest": lambda: nn.Upsample(scale_factor=2, mode="nearest"),
    "bilinear": lambda: nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    "bilinear_corners": lambda: nn.Upsample(size=(7, 5), mode="bilinear", align_corners=True),
    "nearest_module": lambda: nn.UpsamplingNearest2d(scale_factor=3),
    "bilinear_module": lambda: nn.UpsamplingBilinear2d(scale_factor=2),
    "interpolate_nearest": lambda: Interpolate(size=(6, 7), mode="nearest"),
    "interpolate_bilinear": lambda: Interpolate(scale_factor=2.5, mode="bilinear", align_corners=False),
}


@pytest.mark.parametrize("relu", [False, True], ids=["signed", "nonneg"])
@pytest.mark.parametrize("name", sorted(UPSAMPLERS))
@pytest.mark.parametrize("rule", [Epsilon(1e-6), ZPlus(), AlphaBeta(2.0, 1.0)], ids=["epsilon", "zplus", "alpha_beta"])
def test_upsampling_matches_its_dense_equivalent(name: str, rule: Rule, relu: bool) -> None:
    # The implicit weights of these modes are >= 0: relevance goes back in proportion to each input's
    # contribution, exactly as for a linear layer with those weights.
    shape = (2, 3, 3)
    model, dense = _pair(UPSAMPLERS[name](), shape, relu)
    assert (dense.dense.linear.weight >= 0).all()
    x = signed((3, *shape))
    ours = lrp(model, x, _weighted_score, rule=rule)
    reference = lrp(dense, x, _weighted_score, rule=rule)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-10 * reference.abs().max().item())


def test_nearest_upsampling_gives_each_input_the_sum_over_its_copies() -> None:
    model = Flattened(nn.Upsample(scale_factor=2, mode="nearest"), relu=False).eval()
    x = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]], dtype=torch.float64)
    weights = torch.arange(16, dtype=torch.float64)
    relevance = lrp(model, x, lambda out: out @ weights, epsilon=1e-12)
    copies = (x.repeat_interleave(2, 2).repeat_interleave(2, 3) * weights.view(1, 1, 4, 4)).view(1, 1, 2, 2, 2, 2)
    torch.testing.assert_close(relevance, copies.sum(dim=(3, 5)))  # R_out = out * weight, summed per input


def test_bicubic_upsampling_is_refused_with_the_modes_that_work() -> None:
    message = lrp_unsupported(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2, mode="bicubic")))
    assert message is not None and "module '1' of type torch.nn.Upsample with mode='bicubic'" in message and "bilinear" in message
    functional = lrp_unsupported(Interpolate(scale_factor=2, mode="bicubic"))
    assert functional is not None and "interpolate" in functional and "bicubic" in functional


# ------------------------------------------------------------------------------------------ U-Nets


class LinearUNet(nn.Module):
    """A U-Net without biases or nonlinearities: conv, average pooling, transposed conv, bilinear and
    nearest upsampling, skip concatenations. The whole network is one linear map."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2 = nn.Conv2d(2, w, 3, padding=1, bias=False), nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.bottom = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)
        self.up2 = nn.ConvTranspose2d(2 * w, w, 2, stride=2, bias=False)
        self.dec2 = nn.Conv2d(3 * w, w, 3, padding=1, bias=False)
        self.up1 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.dec1 = nn.Conv2d(2 * w, w, 3, padding=1, bias=False)
        self.head = nn.Conv2d(w, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(self.pool(s1))
        b = self.bottom(self.pool(s2))
        d2 = self.dec2(torch.cat([self.up2(b), s2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), F.interpolate(s1, scale_factor=1.0, mode="nearest")], dim=1))
        return self.head(d1)


class PaddedUNet(nn.Module):
    """Habits of common U-Net code: reflection padding, an odd input size, the upsampled map padded to the
    skip's size (sizes read from the tensors), interpolation to the skip's size, ``F.relu``."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        w = width
        self.enc = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, w, 3, bias=False), nn.ReLU())
        self.bottom = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(w, w, 2, stride=2, bias=False)
        self.head = nn.Conv2d(3 * w, classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        pooled = F.max_pool2d(skip, 2)
        up = self.up(F.relu(self.bottom(pooled)))
        dy, dx = skip.size(2) - up.size(2), skip.size(3) - up.size(3)
        up = F.pad(up, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        wide = F.interpolate(pooled, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.head(torch.cat([up, skip, wide], dim=1))


def test_padding_is_supported_and_a_non_zero_constant_is_refused() -> None:
    assert lrp_unsupported(PaddedUNet()) is None
    message = lrp_unsupported(nn.Sequential(nn.ConstantPad2d(1, 0.5), nn.Conv2d(1, 2, 3)))
    assert message is not None and "module '0' of type torch.nn.ConstantPad2d with value=0.5" in message
    # reflect padding copies border pixels: each input gets the sum over its copies
    model = Flattened(nn.ReflectionPad2d(1), relu=False).eval()
    x = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]], dtype=torch.float64)
    weights = torch.arange(16, dtype=torch.float64)
    relevance = lrp(model, x, lambda out: out @ weights, epsilon=1e-12)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad((model(leaf) @ weights).sum(), leaf)
    torch.testing.assert_close(relevance, grad * x)


def bias_free(model: nn.Module) -> nn.Module:
    """Biases off; BatchNorm keeps a random scale but no shift, so folding adds no bias."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.bias.zero_()
                module.running_mean.zero_()
            elif getattr(module, "bias", None) is not None:
                module.bias.zero_()
    return model.eval()


def _region(n: int, size: int) -> RegionTarget:
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[:, size // 4 : size // 2, size // 3 : 3 * size // 4] = True
    return RegionTarget(class_id=[i % 3 for i in range(n)], mask=mask)


@pytest.mark.parametrize(
    ("make", "size"),
    [(LinearUNet, 16), (lambda: ShapesUNet(width=4), 16), (lambda: TinyUNet(channels=2, width=4), 16), (PaddedUNet, 15)],
    ids=["linear_unet", "shapes_unet", "tiny_unet", "padded_unet"],
)
def test_epsilon_to_zero_is_gradient_times_input_on_bias_free_unets(make, size: int) -> None:
    torch.manual_seed(0)
    model = bias_free(make()).double()
    channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = signed((3, channels, size, size))
    target = _region(3, size)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(target_scores(model(leaf), target).sum(), leaf)
    relevance = lrp(model, x, target, epsilon=1e-12)
    torch.testing.assert_close(relevance, grad * x, rtol=1e-6, atol=1e-8 * (grad * x).abs().max().item())
    # ... and so the relevance sums to the explained score: the class's logits over the region.
    with torch.no_grad():
        score = target_scores(model(x), target)
    torch.testing.assert_close(sums(relevance), score, rtol=1e-6, atol=1e-8 * score.abs().max().item())


@pytest.mark.parametrize("rule", ["zplus", "alpha_beta"])
def test_zplus_and_alpha_beta_conserve_through_a_unet_with_biases(rule: str) -> None:
    # Biases (and BatchNorm shifts) are not counted in z+ / z-: every layer conserves, also the upsampling
    # and concatenation steps. (Width 8: at width 4 some pixels have every channel of a stage at zero after
    # the ReLU, and a neuron fed only by its bias has no input to pass its relevance to.)
    torch.manual_seed(0)
    model = ShapesUNet(width=8).double().eval()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.bias.normal_(0, 0.1), bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    target = object_targets(out.argmax(1))
    score = target_scores(out, target)
    torch.testing.assert_close(sums(lrp(model, x, target, rule=rule)), score, rtol=1e-6, atol=1e-9 * score.abs().max().item())


@pytest.mark.parametrize("make", [lambda: ShapesUNet(), lambda: TinyUNet(channels=3)], ids=["shapes_unet", "tiny_unet"])
def test_lrp_explains_the_unets_objects(make) -> None:
    torch.manual_seed(0)
    model = make().eval()
    assert lrp_unsupported(model) is None
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
    target = object_targets(out.argmax(1))
    for kwargs in ({}, {"rule": "zplus"}, {"composite": epsilon_plus()}):
        relevance = lrp(model, x, target, **kwargs)
        assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().amax(dim=(1, 2, 3)).min() > 0
    # A plain class id on a dense output explains that class's logits over every pixel.
    everywhere = RegionTarget(class_id=1, mask=torch.ones(16, 16, dtype=torch.bool))
    torch.testing.assert_close(lrp(model, x, 1), lrp(model, x, everywhere))
    # The region matters: another region gives another map.
    other = RegionTarget(class_id=target.class_id, mask=~target.mask)
    assert (lrp(model, x, other) - lrp(model, x, target)).abs().max() > 0


def test_the_unet_is_left_untouched() -> None:
    torch.manual_seed(0)
    model = ShapesUNet(width=4).train()
    state, modes = copy.deepcopy(model.state_dict()), [m.training for m in model.modules()]
    x = torch.rand(2, 3, 8, 8)
    rng = torch.get_rng_state()
    with torch.inference_mode():
        relevance = lrp(model, x, RegionTarget(class_id=2, mask=torch.ones(8, 8)))
    assert torch.isfinite(relevance).all() and not relevance.requires_grad
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), rng)
