"""Attribution methods: agreement with captum, shared passes, targets, ReLU variants, top-K, segmentation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.methods.attribution import (
    METHODS,
    SIGNED_METHODS,
    attribute,
    auto_layer,
    deconvnet,
    grad_cam,
    guided_backprop,
    guided_grad_cam,
    input_x_gradient,
    saliency,
)
from lightning_introspect.methods.targets import RegionTarget

captum_attr = pytest.importorskip("captum.attr")




@pytest.fixture(scope="module")
def digits(request):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared fixture may be built here: train it on one thread too
    try:
        model, dm = request.getfixturevalue("trained_digits")
    finally:
        torch.set_num_threads(before)
    x, y = dm.val_set.tensors
    return model, x[:16].clone(), y[:16].clone()


def _close(ours, theirs):
    assert ours.shape == theirs.shape
    scale = theirs.detach().abs().max().clamp_min(1e-12)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6 * float(scale))


def _captum(name, model, x, target, layer_module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "saliency":
            return captum_attr.Saliency(model).attribute(x, target=target, abs=True)
        if name == "input_x_gradient":
            return captum_attr.InputXGradient(model).attribute(x, target=target)
        if name == "guided_backprop":
            return captum_attr.GuidedBackprop(model).attribute(x, target=target)
        if name == "deconvnet":
            return captum_attr.Deconvolution(model).attribute(x, target=target)
        if name == "grad_cam":
            cam = captum_attr.LayerGradCam(model, layer_module).attribute(x, target=target, relu_attributions=True)
            return captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
        if name == "guided_grad_cam":
            return captum_attr.GuidedGradCam(model, layer_module).attribute(x, target=target, interpolate_mode="bilinear")
    raise AssertionError(name)


@pytest.mark.parametrize("kind", ["int", "per_sample_list", "per_sample_tensor"])
@pytest.mark.parametrize("name", ["saliency", "input_x_gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam"])
def test_each_method_matches_captum_on_trained_digits(digits, name, kind):
    model, x, y = digits
    target = {"int": 3, "per_sample_list": y.tolist(), "per_sample_tensor": y}[kind]
    captum_target = 3 if kind == "int" else y.tolist()
    layer = "features.9"
    fn = METHODS[name]
    ours = fn(model, x, target, layer) if name in ("grad_cam", "guided_grad_cam") else fn(model, x, target)
    _close(ours, _captum(name, model, x, captum_target, model.features[9]))
    assert not ours.requires_grad and ours.grad_fn is None


def test_grad_cam_without_upsampling_matches_layer_grad_cam(digits):
    model, x, y = digits
    ours = grad_cam(model, x, y, "features.9", upsample=False)
    theirs = captum_attr.LayerGradCam(model, model.features[9]).attribute(x, target=y.tolist(), relu_attributions=True)
    assert ours.shape == (16, 1, 8, 8)
    _close(ours, theirs)
    signed = grad_cam(model, x, y, "features.8", relu=False, upsample=False)
    theirs = captum_attr.LayerGradCam(model, model.features[8]).attribute(x, target=y.tolist())
    _close(signed, theirs)
    assert (signed < 0).any()  # without the ReLU negative evidence is kept


def test_saliency_signed_and_every_sample_has_its_own_target(digits):
    model, x, y = digits
    signed = saliency(model, x, y, abs=False)
    torch.testing.assert_close(signed.abs(), saliency(model, x, y))
    one_by_one = torch.cat([saliency(model, x[i : i + 1], int(y[i]), abs=False) for i in range(4)])
    _close(signed[:4], one_by_one)
    # a different class per sample really changes the maps (never only the first sample's target)
    other = (y + 1) % 10
    assert not torch.allclose(saliency(model, x, other)[1:], saliency(model, x, y)[1:])


def test_pred_target_is_each_samples_argmax(digits):
    model, x, _ = digits
    with torch.no_grad():
        pred = model(x).argmax(1)
    torch.testing.assert_close(guided_backprop(model, x, "pred"), guided_backprop(model, x, pred))
    callable_target = lambda out: out.gather(1, pred.view(-1, 1)).squeeze(1)  # noqa: E731
    torch.testing.assert_close(grad_cam(model, x, callable_target, "features.9"), grad_cam(model, x, pred, "features.9"))


def test_attribute_shares_one_forward_and_one_gradient_call(digits, monkeypatch):
    model, x, y = digits
    model = copy.deepcopy(model)
    forwards = []
    model.register_forward_pre_hook(lambda m, i: forwards.append(1))
    calls = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(len(kwargs.get("inputs", args[1] if len(args) > 1 else ())))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    maps = attribute(model, x, y, ["saliency", "input_x_gradient", "grad_cam"], layer="features.9")
    assert len(forwards) == 1 and calls == [2]  # one autograd.grad w.r.t. [input, activation]
    monkeypatch.setattr(torch.autograd, "grad", real_grad)
    _close(maps["saliency"], saliency(model, x, y))
    _close(maps["input_x_gradient"], input_x_gradient(model, x, y))
    _close(maps["grad_cam"], grad_cam(model, x, y, "features.9"))

    forwards.clear()
    everything = ["saliency", "input_x_gradient", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam"]
    maps = attribute(model, x, y, everything, layer="features.9")
    assert len(forwards) == 1 and list(maps) == everything
    _close(maps["guided_backprop"], guided_backprop(model, x, y))
    _close(maps["deconvnet"], deconvnet(model, x, y))
    _close(maps["guided_grad_cam"], guided_grad_cam(model, x, y, "features.9"))
    # options reach the methods; guided Grad-CAM keeps plain guided backprop when top_k is set
    maps = attribute(model, x, y, ["saliency", "guided_backprop", "guided_grad_cam"], layer="features.9",
                     options={"saliency": {"abs": False}, "guided_backprop": {"top_k": 2}})
    _close(maps["saliency"], saliency(model, x, y, abs=False))
    _close(maps["guided_backprop"], guided_backprop(model, x, y, top_k=2, layer="features.9"))
    _close(maps["guided_grad_cam"], guided_grad_cam(model, x, y, "features.9"))


def test_inference_mode_gives_the_same_maps(digits):
    """Lightning runs validation hooks under torch.inference_mode(): every method must still work."""
    model, x, y = digits
    names = [m for m in METHODS if m not in ("lrp", "attention_rollout", "grad_rollout")]  # a CNN: no attention (ViT: test_attention_methods)
    outside = attribute(model, x, y, names, layer="features.9")
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor
        inside = attribute(model, xi, y, names, layer="features.9")
        single = grad_cam(model, xi, "pred", "auto")
    assert xi.is_inference()
    for name in names:
        _close(inside[name], outside[name])
    _close(single, grad_cam(model, x, "pred", "features.9"))  # "auto" resolves to the last conv feature map


def test_lrp_is_reachable_through_attribute(digits):
    from lightning_introspect.methods.lrp import lrp  # part of the package: a failing import must fail here

    model, x, y = digits
    maps = attribute(model, x, y, ["saliency", "lrp"], options={"lrp": {"rule": "epsilon"}})
    _close(maps["lrp"], lrp(model, x, y, rule="epsilon"))
    assert "lrp" in SIGNED_METHODS and "saliency" not in SIGNED_METHODS


# ------------------------------------------------------------------------------------- ReLU variants
class _ModuleReLUNet(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.act1, self.act2 = nn.ReLU(inplace=inplace), nn.ReLU(inplace=inplace)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.head(h.mean((2, 3)))


class _FunctionalReLUNet(_ModuleReLUNet):
    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = self.conv2(h).relu()
        return self.head(torch.relu(h).mean((2, 3)))


class _InplaceFunctionalNet(_ModuleReLUNet):
    def forward(self, x):
        h = self.conv1(x)
        F.relu(h, inplace=True)  # the result is used through `h`, modified in place
        h = self.conv2(h)
        h.relu_()
        return self.head(h.mean((2, 3)))


def _twins():
    torch.manual_seed(0)
    ref = _ModuleReLUNet().eval()
    nets = {}
    for name, cls, kw in (("functional", _FunctionalReLUNet, {}), ("inplace_module", _ModuleReLUNet, {"inplace": True}),
                          ("inplace_functional", _InplaceFunctionalNet, {})):
        net = cls(**kw).eval()
        net.load_state_dict(ref.state_dict())
        nets[name] = net
    return ref, nets


@pytest.mark.parametrize("variant", ["functional", "inplace_module", "inplace_functional"])
def test_modified_relu_rules_see_functional_and_inplace_relu(variant):
    ref, nets = _twins()
    net = nets[variant]
    x = torch.randn(5, 1, 10, 10)
    target = [0, 1, 2, 3, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want_gbp = captum_attr.GuidedBackprop(ref).attribute(x, target=target)
        want_dec = captum_attr.Deconvolution(ref).attribute(x, target=target)
    _close(guided_backprop(net, x, target), want_gbp)
    _close(deconvnet(net, x, target), want_dec)
    # Grad-CAM on a conv whose output a later in-place ReLU overwrites: still the conv's own output
    _close(grad_cam(net, x, target, "conv2", relu=False), grad_cam(ref, x, target, "conv2", relu=False))
    _close(saliency(net, x, target), saliency(ref, x, target))
    if variant == "functional":  # captum's known gap: F.relu invisible, guided backprop = plain gradient
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = captum_attr.GuidedBackprop(net).attribute(x, target=target)
        _close(theirs, saliency(net, x, target, abs=False))
        assert not torch.allclose(theirs, want_gbp)


def test_guided_backprop_warns_when_it_degrades_to_the_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    with pytest.warns(UserWarning, match="no ReLU"):
        got = guided_backprop(net, x, 1)
    _close(got, saliency(net, x, 1, abs=False))
    mixed = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).eval()
    with pytest.warns(UserWarning, match="gelu"):
        deconvnet(mixed, x, 0)


# -------------------------------------------------------------------------------------------- top-K
def test_top_k_keeps_the_k_strongest_positions_then_continues_guided(digits):
    model, x, y = digits
    x, y = x[:6], y[:6]
    plain = guided_backprop(model, x, y)
    _close(guided_backprop(model, x, y, top_k=64, layer="features.9"), plain)  # 8x8 = 64 positions: all kept
    k = 3
    got = guided_backprop(model, x, y, top_k=k)  # default layer: auto_layer -> features.9
    assert not torch.allclose(got, plain)

    # Independent check: A and the gradient G at features.9 (nothing but max-pool / pooling / linear
    # above it, so guided = plain there), mask the top-k locations of sum_c A*G, then captum's guided
    # backprop of the linear functional <body(x), G*mask> gives the same map.
    body = model.features[:10]
    head = nn.Sequential(model.features[10], model.pool, model.flatten, model.classifier)
    with torch.enable_grad():
        a = body(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(head(a).gather(1, y.view(-1, 1)).sum(), a)
    strength = (a.detach() * g).sum(1).flatten(1)
    idx = strength.topk(k, dim=1).indices
    mask = torch.zeros_like(strength).scatter_(1, idx, 1.0).view(-1, 1, 8, 8)
    weights = (g * mask).detach()

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, inp):
            return (self.body(inp) * weights[: inp.shape[0]]).flatten(1).sum(1, keepdim=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = captum_attr.GuidedBackprop(Probe().eval()).attribute(x, target=0)
    _close(got, want)


def test_top_k_on_a_tabular_layer_keeps_k_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(4, 5)
    full = guided_backprop(net, x, 2, top_k=16, layer="1")
    _close(full, guided_backprop(net, x, 2))
    one = guided_backprop(net, x, 2, top_k=1, layer="1")
    # with one hidden unit kept the map is (a positive multiple of) that unit's guided input weights
    w1 = net[0].weight
    explained = [i for i in range(4) if one[i].abs().max() > 0]  # a sample with no active unit has a zero map
    assert explained, "every map is zero: nothing was checked"
    for i in explained:
        assert F.cosine_similarity(one[i], w1, dim=1).abs().max() > 0.999


# ------------------------------------------------------------------------------------- segmentation
class _TinyFCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.out = nn.Conv2d(1, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.c2(F.relu(self.c1(x)))))


def test_region_target_for_segmentation():
    torch.manual_seed(0)
    net = _TinyFCN().eval()
    x = torch.randn(2, 1, 12, 12)
    mask = torch.zeros(2, 12, 12, dtype=torch.bool)
    mask[0, 2:4, 3:5] = True
    mask[1, 8:10, 7:10] = True
    region = RegionTarget(class_id=[0, 2], mask=mask)
    got = saliency(net, x, region, abs=False)
    xx = x.clone().requires_grad_(True)
    out = net(xx)
    score = (out[0, 0] * mask[0]).sum() + (out[1, 2] * mask[1]).sum()
    (want,) = torch.autograd.grad(score, xx)
    _close(got, want)
    # two 3x3 convs: the gradient lives within 2 pixels of the region, nowhere else
    near = F.max_pool2d(mask.float().unsqueeze(1), 5, stride=1, padding=2) > 0
    assert got[~near].abs().max() == 0 and got[near].abs().max() > 0
    maps = attribute(net, x, region, ["saliency", "grad_cam", "guided_backprop", "deconvnet", "guided_grad_cam"], layer="c2")
    _close(maps["saliency"], saliency(net, x, region))
    _close(maps["grad_cam"], grad_cam(net, x, region, "c2"))
    _close(maps["guided_grad_cam"], guided_grad_cam(net, x, region, "c2"))
    assert maps["grad_cam"].shape == (2, 1, 12, 12) and maps["grad_cam"].abs().max() > 0
    for name in ("guided_backprop", "deconvnet"):
        assert maps[name].shape == x.shape
        assert maps[name][~near].abs().max() == 0
    assert auto_layer(net, x) == "c2"  # a dense output: the 1x1 head is skipped, the feature map before it taken


# ---------------------------------------------------------------------------------- auto_layer, errors
class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(_Block(8), _Block(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.stem(x))), 1))


def test_auto_layer_picks_the_last_conv_feature_map(digits):
    model, x, _ = digits
    assert auto_layer(model, x) == "features.9"
    net = _ResNetish().eval()
    assert auto_layer(net, torch.randn(2, 3, 8, 8)) == "layer1"  # block output, after the residual ReLU
    x_res = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = attribute(net, x_res, 1, ["grad_cam", "guided_backprop"], layer="auto")
    _close(maps["grad_cam"], grad_cam(net, x_res, 1, "layer1"))  # "auto" is the block output named above
    _close(maps["guided_backprop"], guided_backprop(net, x_res, 1))
    with pytest.raises(ValueError, match="no submodule outputs a spatial feature map"):
        auto_layer(nn.Sequential(nn.Linear(3, 2)), torch.randn(2, 3))


def test_bad_arguments_raise_value_errors(digits):
    model, x, y = digits
    with pytest.raises(ValueError, match="'saliency'"):
        attribute(model, x, y, ["salency"])
    with pytest.raises(ValueError, match="features.9"):
        grad_cam(model, x, y, "features.99")
    with pytest.raises(ValueError, match="top_k"):
        guided_backprop(model, x, y, top_k=0)
    with pytest.raises(ValueError, match="spatial"):
        grad_cam(model, x, y, "classifier")
    with pytest.raises(ValueError, match="class ids"):
        saliency(model, x, 10)
    with pytest.raises(ValueError, match="options"):
        attribute(model, x, y, ["saliency"], options={"salency": {}})
    with pytest.raises(ValueError, match="floating"):
        saliency(model, x.long(), y)


# ---------------------------------------------------------------------------- vision transformers
def _token_cam_by_hand(model, x, target, layer, k, *, relu=True, upsample=True):
    """Grad-CAM on the reshaped patch grid, computed here: hook -> autograd.grad -> (N, D, h, w) Grad-CAM."""
    captured = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = model(x)
    finally:
        handle.remove()
    act = captured[0]
    (grad,) = torch.autograd.grad(out.gather(1, torch.as_tensor(target).view(-1, 1)).sum(), act)
    if act.shape[0] != x.shape[0]:  # (T, N, D)
        act, grad = act.transpose(0, 1), grad.transpose(0, 1)
    n, t, d = act.shape
    side = int(round((t - k) ** 0.5))
    grid = act[:, k:].reshape(n, side, side, d).permute(0, 3, 1, 2).detach()
    ggrid = grad[:, k:].reshape(n, side, side, d).permute(0, 3, 1, 2)
    cam = (ggrid.mean(dim=(2, 3), keepdim=True) * grid).sum(1, keepdim=True)
    cam = F.relu(cam) if relu else cam
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False) if upsample else cam


def _vit(name):
    from tests.test_attention_methods import HandViT, StackedViT
    from tests.zoo import TinyViT

    torch.manual_seed(0)
    return {
        "registers": (HandViT(cls=True, registers=4), "blocks.0", 5),
        "mean_pool": (HandViT(cls=False, registers=0), "blocks.1", 0),
        "encoder_layers": (StackedViT(), "layers.0", 1),
        "sequence_first": (StackedViT(batch_first=False), "layers.0", 1),
        "zoo_tiny_vit": (TinyViT(), "encoder", 1),
    }[name]


@pytest.mark.parametrize("name", ["registers", "mean_pool", "encoder_layers", "sequence_first", "zoo_tiny_vit"])
def test_grad_cam_on_tokens_equals_grad_cam_on_the_reshaped_grid(name):
    model, layer, k = _vit(name)
    model.eval()
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    target = [0, 1, 2]
    for relu, upsample in ((True, True), (False, False)):
        ours = grad_cam(model, x, target, layer, relu=relu, upsample=upsample)
        torch.testing.assert_close(ours, _token_cam_by_hand(model, x, target, layer, k, relu=relu, upsample=upsample), rtol=1e-5, atol=1e-6)
    stated = attribute(model, x, target, ["grad_cam"], layer=layer, options={"grad_cam": {"num_prefix_tokens": k}})["grad_cam"]
    torch.testing.assert_close(stated, grad_cam(model, x, target, layer))
    raw = grad_cam(model, x, target, layer, relu=False)
    if name == "zoo_tiny_vit":  # one block, class-token head: its patch tokens never reach the score (documented)
        assert float(raw.abs().max()) == 0.0
    else:
        assert float(raw.abs().max()) > 0.0


def test_guided_grad_cam_on_tokens_is_guided_backprop_times_the_token_cam():
    model, layer, k = _vit("registers")
    model.eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="no ReLU"):
        guided = guided_backprop(model, x, [1, 2])
        ours = guided_grad_cam(model, x, [1, 2], layer, num_prefix_tokens=k)
    torch.testing.assert_close(ours, guided * _token_cam_by_hand(model, x, [1, 2], layer, k), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("registers", "blocks.0"), ("mean_pool", "blocks.1"), ("encoder_layers", "layers.0"), ("zoo_tiny_vit", "patch_embed")],
)
def test_auto_layer_on_vision_transformers(name, expected, caplog):
    model, _, _ = _vit(name)
    with caplog.at_level("INFO", logger="lightning_introspect.methods.attribution"):
        assert auto_layer(model, torch.randn(2, 1, 16, 16)) == expected
    assert "patch tokens" in caplog.text


def test_auto_layer_without_a_reaching_block_or_feature_map_says_so():
    from tests.test_attention_methods import Block

    class LinearPatchViT(nn.Module):  # linear patch embedding, one block, class-token head
        def __init__(self):
            super().__init__()
            self.embed, self.cls, self.block, self.head = nn.Linear(16, 8), nn.Parameter(torch.zeros(1, 1, 8)), Block(8, 2), nn.Linear(8, 3)

        def forward(self, x):
            patches = F.unfold(x, 4, stride=4).transpose(1, 2)
            t = torch.cat([self.cls.expand(len(x), -1, -1), self.embed(patches)], 1)
            return self.head(self.block(t)[:, 0])

    with pytest.raises(ValueError, match="transformer block"):
        auto_layer(LinearPatchViT(), torch.randn(1, 1, 16, 16))
