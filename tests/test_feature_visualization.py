"""Feature visualisation: objectives, parameterisations, the three regularisers, the callback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization, resolve_prior
from lightning_introspect.demo import DigitsCNN, DigitsDataModule, load_digits_tensors
from lightning_introspect.methods.featviz import (
    MLPDecoder,
    TransformRobustness,
    channel,
    class_logit,
    fit_autoencoder_prior,
    high_frequency_fraction,
    layer,
    neuron,
    objective_values,
    stack_objectives,
    total_variation,
    visualize_features,
)
from lightning_introspect.methods.featviz import render as fv
from tests.helpers import quick_trainer, read_events


@pytest.fixture(autouse=True)
def _one_thread():
    """These workloads are tiny (32 px, a few images): one intra-op thread is as fast and does not
    oversubscribe a shared CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _display(dm):
    return {"mean": dm.mean, "std": dm.std, "value_range": (0.0, 1.0)}


def tiny_decoder() -> nn.Module:
    """A fixed random decoder for the callback's import-path prior (latent 4 -> 1x32x32)."""
    gen = torch.Generator().manual_seed(0)
    dec = MLPDecoder(4, (1, 32, 32), hidden=16)
    with torch.no_grad():
        for p in dec.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return dec


# ============================================================================= objectives & helpers
def test_objectives_compose_and_compute_what_they_say():
    acts = {"a": torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)}
    out = torch.tensor([[1.0, 5.0], [7.0, 2.0]])
    a = acts["a"]
    assert torch.equal(channel("a", 1)(acts), a[:, 1].flatten(1).mean(1))
    assert torch.equal(channel("a", [0, 2])(acts), torch.stack([a[0, 0].mean(), a[1, 2].mean()]))
    assert torch.equal(neuron("a", 2, 0, 1)(acts), a[:, 2, 0, 1])
    assert torch.equal(neuron("a", 2)(acts), a[:, 2, 1, 1])  # the centre of a 2x2 map
    assert torch.equal(layer("a")(acts), a.pow(2).flatten(1).mean(1))
    assert torch.equal(class_logit([1, 0])(acts, out), torch.tensor([5.0, 7.0]))
    combo = 2 * channel("a", 0) - layer("a") / 4 + class_logit(1)
    expected = 2 * a[:, 0].flatten(1).mean(1) - a.pow(2).flatten(1).mean(1) / 4 + out[:, 1]
    assert torch.allclose(combo(acts, out), expected)
    assert combo.layers == {"a", "<output>"} and combo.needs_output
    assert torch.equal(sum([channel("a", 0), channel("a", 1)])(acts), (-channel("a", 0) * -1 + channel("a", 1))(acts))
    stacked = stack_objectives([(channel("a", 1), 1), (class_logit(0), 1)])
    assert torch.equal(stacked(acts, out), torch.stack([a[0, 1].mean(), out[1, 0]]))


def test_high_frequency_fraction_orders_noise_digits_and_smooth_images():
    digits, _ = load_digits_tensors(32)
    noise = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    hf_digits = high_frequency_fraction(digits[:64])
    hf_noise = high_frequency_fraction(noise)
    assert hf_digits.max() < 0.05 < 0.6 < hf_noise.min()  # white noise: ~80 % of its energy above f = 0.25
    assert torch.equal(high_frequency_fraction(torch.ones(2, 3, 8, 8)), torch.zeros(2))
    assert total_variation(noise).min() > total_variation(digits[:8]).max()


def test_color_correlation_from_data_is_a_square_root_of_the_covariance():
    from lightning_introspect.methods.feature_visualization import (
        color_correlation_from_data,
        default_color_correlation,
    )

    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.3, 0.0], [0.5, 0.2, 0.1]])
    images = torch.einsum("rk,nkhw->nrhw", mix, torch.randn(64, 3, 8, 8, generator=gen))
    root = color_correlation_from_data(images)
    cov = torch.cov(images.permute(1, 0, 2, 3).reshape(3, -1))
    product = root @ root.T
    assert torch.allclose(product / product.max(), cov / cov.max(), atol=1e-3)
    assert default_color_correlation().norm(dim=0).max() == pytest.approx(1.0)


def test_transforms_identity_and_exact_integer_shift():
    x = torch.rand(3, 2, 12, 12, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    ident = TransformRobustness(pad=2, jitter=0, scale=(1.0, 1.0), degrees=0.0, jitter_after=0)
    assert torch.allclose(ident(x, gen), x, atol=1e-5)
    shift = TransformRobustness(pad=0, jitter=2, scale=(1.0, 1.0), degrees=0.0, jitter_after=0, fill="border")
    y = shift(x, torch.Generator().manual_seed(3))
    for i in range(3):  # each image is an exact integer translate of itself (interior compared)
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.allclose(y[i, :, 2:-2, 2:-2], torch.roll(x[i], (dy, dx), (1, 2))[:, 2:-2, 2:-2], atol=1e-5)]
        assert len(hits) == 1
    t32 = TransformRobustness.for_size(32)
    assert (t32.pad, t32.jitter, t32.jitter_after, t32.scale, t32.degrees) == (3, 2, 1, (0.9, 1.1), 10.0)
    with pytest.raises(ValueError, match="`jitter`"):
        TransformRobustness(jitter=-1)


# =============================================================================== on the trained CNN
def _lively_channels(model, dm, layer_name, k):
    """The callback's ``channels="auto"`` rule: the k channels whose activation varies most on data."""
    cb = FeatureVisualization(layers=[layer_name], num_channels=k)
    cb.resolve(model)
    return cb.choose_channels(model, dm.val_set.tensors[0][:64])[layer_name]


def test_optimised_inputs_beat_the_starting_noise(trained_digits):
    model, dm = trained_digits
    chans = _lively_channels(model, dm, "features.8", 4)
    for obj, n in ((channel("features.8", chans), 4), (class_logit([1, 7]), 2)):
        for param in ("pixels", "fourier"):
            res = visualize_features(model, obj, shape=(n, 1, 32, 32), steps=24, lr=0.1, param=param, seed=0, **_display(dm))
            gain = res.objective - res.initial_objective
            assert (gain > 5.0).all(), (obj, param, res.initial_objective, res.objective)
            assert res.trace[-4:].mean() > res.trace[:4].mean() + 5.0
            assert res.images.min() >= 0.0 and res.images.max() <= 1.0
            assert torch.allclose(res.model_inputs, (res.images - dm.mean) / dm.std, atol=1e-5)
            # the images are held once: the model's view of them is computed on demand, not kept beside them
            held = sum(v.numel() * v.element_size() for v in vars(res).values() if isinstance(v, torch.Tensor))
            assert held < 1.2 * res.images.numel() * res.images.element_size()
            # the stored final objective is the model's on those images
            assert torch.allclose(objective_values(model, obj, res.images, mean=dm.mean, std=dm.std), res.objective, atol=1e-3)


def test_frequency_penalty_lowers_the_high_frequency_fraction(trained_digits):
    model, dm = trained_digits
    obj, n = channel("features.8", _lively_channels(model, dm, "features.8", 4)), 4
    common = dict(shape=(n, 1, 32, 32), steps=24, lr=0.1, seed=0, **_display(dm))
    plain = visualize_features(model, obj, param="pixels", **common)
    tv = visualize_features(model, obj, param="pixels", frequency_penalty=4.0, **common)
    spectral = visualize_features(model, obj, param="pixels", frequency_penalty=6.0, penalty="highfreq", **common)
    fourier = visualize_features(model, obj, param="fourier", **common)
    fourier_tv = visualize_features(model, obj, param="fourier", frequency_penalty=4.0, **common)
    fourier_spectral = visualize_features(model, obj, param="fourier", frequency_penalty=4.0, penalty="highfreq", **common)
    runs = {"plain": plain, "tv": tv, "spectral": spectral, "fourier": fourier, "fourier_tv": fourier_tv, "fourier_spectral": fourier_spectral}
    hf = {k: float(r.high_frequency_fraction.mean()) for k, r in runs.items()}
    # measured on this model over seeds 0-3: ratios 0.82-0.88, 0.74-0.78, 0.42-0.44, 0.50-0.51, 0.57-0.61
    assert hf["tv"] < 0.95 * hf["plain"], hf
    assert hf["spectral"] < 0.85 * hf["plain"], hf
    assert hf["fourier"] < 0.55 * hf["plain"], hf  # the 1/f parameterisation alone
    assert hf["fourier_tv"] < 0.65 * hf["fourier"], hf
    assert hf["fourier_spectral"] < 0.72 * hf["fourier"], hf
    assert (fourier_tv.objective > fourier_tv.initial_objective + 3.0).all(), fourier_tv.objective  # still a real optimum


def test_transformation_robustness_survives_fresh_jitter(trained_digits):
    model, dm = trained_digits
    obj, n = channel("features.8", _lively_channels(model, dm, "features.8", 6)), 6
    common = dict(shape=(n, 1, 32, 32), steps=24, lr=0.1, seed=0, **_display(dm))
    fresh = TransformRobustness.for_size(32)
    kept = {}
    for name, kwargs in (("none", {}), ("transform", {"transforms": True})):
        res = visualize_features(model, obj, param="pixels", **common, **kwargs)
        jittered = torch.stack([objective_values(model, obj, res.images, mean=dm.mean, std=dm.std, transforms=fresh, seed=100 + s) for s in range(4)]).mean(0)
        kept[name] = float(jittered.mean() / res.objective.mean())  # share of the objective that survives jitter
    # the unregularised optimum loses well over half its objective under jitter; the robust one keeps much more
    assert kept["none"] < 0.55, kept
    assert kept["transform"] > kept["none"] + 0.15, kept


@pytest.mark.slow
def test_autoencoder_prior_class_images_are_recognised(trained_digits):
    model, dm = trained_digits
    digits, _ = load_digits_tensors(32)
    decoder = fit_autoencoder_prior(digits[:1000], latent_dim=8, hidden=64, batch_size=64, steps=300, seed=0)
    assert not any(p.requires_grad for p in decoder.parameters())
    classes = list(range(10))
    res = visualize_features(model, class_logit(classes), shape=(10, 1, 32, 32), steps=32, lr=0.1, prior=decoder, latent_penalty=0.1, seed=0, **_display(dm))
    assert res.latents is not None and res.latents.shape == (10, 8)
    with torch.no_grad():
        pred = model((res.images - dm.mean) / dm.std).argmax(1)
    assert int((pred == torch.tensor(classes)).sum()) >= 7, pred.tolist()
    # and they are far smoother than the pixel optimum of the same logits
    pixels = visualize_features(model, class_logit(classes), shape=(10, 1, 32, 32), steps=32, lr=0.1, seed=0, **_display(dm))
    assert res.high_frequency_fraction.mean() < 0.25 * pixels.high_frequency_fraction.mean()


def test_same_seed_same_images_other_seed_other_images(trained_digits):
    model, dm = trained_digits
    kwargs = dict(shape=(2, 1, 32, 32), steps=6, param="fourier", transforms=True, frequency_penalty=1.0, **_display(dm))
    a = visualize_features(model, channel("features.4", [1, 2]), seed=3, **kwargs)
    b = visualize_features(model, channel("features.4", [1, 2]), seed=3, **kwargs)
    c = visualize_features(model, channel("features.4", [1, 2]), seed=4, **kwargs)
    assert torch.equal(a.images, b.images) and torch.equal(a.trace, b.trace)
    assert not torch.allclose(a.images, c.images)


# ============================================================================== side effects & errors
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("inference", [False, True])
def test_no_side_effects_on_model_rng_hooks_or_grads(inference):
    torch.manual_seed(0)
    net = _Net()
    net.train()
    net.bn.eval()  # a user-frozen BatchNorm inside a training model: must stay as it was
    net.head.weight.requires_grad_(False)
    before = copy.deepcopy(net.state_dict())
    flags = {n: m.training for n, m in net.named_modules()}
    requires = {n: p.requires_grad for n, p in net.named_parameters()}
    decoder = MLPDecoder(5, (3, 8, 8), hidden=8)
    decoder.train()
    rng = torch.get_rng_state()
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        for kwargs in ({"param": "pixels"}, {"param": "fourier", "transforms": True, "frequency_penalty": 1.0}, {"prior": decoder, "latent_penalty": 0.1}):
            res = visualize_features(net, channel("conv", [0, 1]) + 0.1 * class_logit(2), shape=(2, 3, 8, 8), steps=3, seed=0, **kwargs)
            assert res.images.shape == (2, 3, 8, 8) and not res.images.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in net.named_modules()} == flags and decoder.training
    assert {n: p.requires_grad for n, p in net.named_parameters()} == requires
    assert all(p.grad is None for p in [*net.parameters(), *decoder.parameters()])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [*net.modules(), *decoder.modules()])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # incl. BatchNorm running stats


class _ViewNet(nn.Module):
    """A classic forward that flattens with ``.view``: it needs NCHW-contiguous activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 32 * 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        return self.head(a.view(a.shape[0], -1))


def test_fast_pass_gives_the_same_optimum_and_falls_back_for_view_models(monkeypatch):
    """The channels-last, detached-parameter pass (CPU, batches of >= 4096 input values) optimises the same
    function as the model itself: the same objective trace to float precision; a model that cannot run it
    keeps its own parameters."""
    torch.manual_seed(0)
    net = _Net().eval()
    obj = channel("conv", [0, 1, 2, 3]) + 0.5 * class_logit([2, 1, 0, 1])
    kwargs = dict(shape=(4, 3, 32, 32), steps=10, seed=3, param="fourier", transforms=True, frequency_penalty=1.0)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for k, v in fv.frozen_params(net).items() if v.ndim == 4)
    calls = []
    functional_call = torch.func.functional_call
    monkeypatch.setattr(torch.func, "functional_call", lambda *a, **k: calls.append(1) or functional_call(*a, **k))
    fast = visualize_features(net, obj, **kwargs)
    assert len(calls) >= kwargs["steps"]  # the steps ran through the fast pass
    monkeypatch.setattr(fv, "frozen_params", lambda model, device=None: {})
    plain = visualize_features(net, obj, **kwargs)
    assert torch.equal(fast.initial_objective, plain.initial_objective)  # both measured on the model itself
    assert torch.allclose(fast.trace, plain.trace, rtol=1e-4, atol=1e-4)
    assert torch.allclose(fast.objective, plain.objective, rtol=1e-4, atol=1e-4)
    monkeypatch.undo()
    view_net = _ViewNet().eval()
    with pytest.raises(RuntimeError):  # what the fast pass would hit without the fallback
        with torch.enable_grad():
            torch.func.functional_call(view_net, fv.frozen_params(view_net), (torch.rand(4, 1, 32, 32, requires_grad=True),))
    res = visualize_features(view_net, class_logit(1), shape=(4, 1, 32, 32), steps=5, seed=0)
    assert (res.objective > res.initial_objective).all()
    assert all(not m._forward_hooks for m in view_net.modules())
    assert all(p.is_contiguous() for p in view_net.parameters())


def test_hooks_removed_when_the_objective_raises():
    net = _Net()
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        visualize_features(net, channel("conv", 7), shape=(1, 3, 8, 8), steps=2)
    assert all(not m._forward_hooks for m in net.modules())


def test_bad_arguments_list_the_valid_choices():
    net = _Net()
    with pytest.raises(ValueError, match="'conv'"):
        visualize_features(net, channel("cnv", 0), shape=(1, 3, 8, 8), steps=1)
    with pytest.raises(ValueError, match=r"class_id.*\[0, 2\]"):
        visualize_features(net, class_logit(5), shape=(1, 3, 8, 8), steps=1)
    with pytest.raises(ValueError, match="'pixels', 'fourier'"):
        visualize_features(net, class_logit(0), shape=(1, 3, 8, 8), param="fft")
    with pytest.raises(ValueError, match="'tv', 'highfreq'"):
        visualize_features(net, class_logit(0), shape=(1, 3, 8, 8), penalty="l1")
    with pytest.raises(ValueError, match="`steps`"):
        visualize_features(net, class_logit(0), shape=(1, 3, 8, 8), steps=0)
    with pytest.raises(ValueError, match="decode"):
        visualize_features(net, class_logit(0), shape=(1, 3, 8, 8), prior=MLPDecoder(4, (1, 8, 8)))
    with pytest.raises(ValueError, match="'frequency', 'transform', 'prior'"):
        FeatureVisualization(regularizers=["blur"])
    with pytest.raises(ValueError, match="no `prior`"):
        FeatureVisualization(regularizers=["prior"])
    with pytest.raises(ValueError, match="`channels`"):
        FeatureVisualization(channels=[-1])
    with pytest.raises(ValueError, match="Cannot import `prior`"):
        FeatureVisualization(prior="tests.test_feature_visualization:no_such_decoder")
    assert isinstance(resolve_prior("tests.test_feature_visualization:tiny_decoder"), MLPDecoder)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"layers": ["features.88"]}, "features.8"), ({"layers": ["features.8"], "channels": [70]}, r"\[0, 63\]"), ({"classes": [11]}, r"\[0, 9\]")],
)
def test_callback_rejects_bad_layers_channels_classes_before_training(tmp_path, digits_dm, kwargs, match):
    cb = FeatureVisualization(on_error="raise", steps=1, **kwargs)
    model = DigitsCNN()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        quick_trainer(tmp_path, [cb], epochs=1, logger=False).fit(model, datamodule=digits_dm)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken


# ============================================================================== the callback in a fit
def _fit(tmp_path, callbacks, seed=0):
    pl.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(batch_size=32, limit=128)
    dm.setup("fit")
    model = DigitsCNN(width=8)
    trainer = quick_trainer(tmp_path, callbacks, epochs=2, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    return model, trainer, dm


def test_callback_does_not_change_training(tmp_path):
    plain, _, _ = _fit(tmp_path / "a", [])
    cb = FeatureVisualization(layers=["features.4"], channels=[0, 1], classes=[2], steps=3, at=[0.0, 0.5], on_error="raise")
    watched, _, _ = _fit(tmp_path / "b", [cb])
    assert sorted({h["step"] for h in cb.history}) == [0, 3, 6]  # before training, epoch 0 (0.5 of 2), the last epoch
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not m._forward_hooks for m in watched.modules())


def test_callback_logs_grids_scalars_and_table(tmp_path):
    cb = FeatureVisualization(prior="tests.test_feature_visualization:tiny_decoder", latent_dim=4, classes=[0, 3], num_channels=2, steps=4, on_error="raise")
    _, trainer, dm = _fit(tmp_path, [cb])
    assert cb.columns == ["none", "frequency", "transform", "prior", "all"]
    assert list(cb.chosen) == ["features.4", "features.8"]  # auto: 2 of the 3 conv layers, the last included
    assert all(len(c) == 2 for c in cb.chosen.values())
    keys = [f"{n}/{c}" for n, cs in cb.chosen.items() for c in cs] + ["class/0", "class/3"]
    assert sorted(cb.images) == sorted(keys)
    assert all(img.shape == (5, 1, 32, 32) for img in cb.images.values())
    events = read_events(trainer.logger.log_dir)
    for key in keys:
        assert len(events["images"][f"introspect/featviz/{key}"]) == 2  # at half of training and at the end
        for s in cb.columns:
            assert f"introspect/featviz/objective/{s}/{key}" in events["scalars"]
            assert f"introspect/featviz/hf_fraction/{s}/{key}" in events["scalars"]
    for s in cb.columns:
        logged = events["scalars"][f"introspect/featviz/hf_fraction/{s}"][-1][1]
        assert logged == pytest.approx(float(cb.results[s].high_frequency_fraction.mean()), rel=1e-5)
    assert "introspect/featviz/seconds" in events["scalars"]
    assert any(t.startswith("introspect/featviz/table") for t in events["text"])
    assert len(cb.history) == 2 * len(keys) * len(cb.columns)
    assert cb.summary_lines() and "none: hf" in cb.summary_lines()[0]
    # value_range was inferred from the data (normalised digits): the images live in that range
    lo, hi = float(dm.val_set.tensors[0].min()), float(dm.val_set.tensors[0].max())
    assert all(lo - 1e-4 <= float(img.min()) and float(img.max()) <= hi + 1e-4 for img in cb.images.values())
    state = cb.state_dict()
    fresh = FeatureVisualization()
    fresh.load_state_dict(state)
    assert fresh.chosen == cb.chosen and len(fresh.history) == len(cb.history)


# ============================================================================== bring your own parts
def test_specs_and_shorthand_keywords_give_the_same_images():
    from lightning_introspect.methods.featviz import Fourier, ImageSpace, Latent, Pixels

    torch.manual_seed(0)
    net = _Net().eval()
    obj = channel("conv", [0, 1, 2, 3])
    common = dict(shape=(4, 3, 16, 16), steps=4, seed=2, transforms=True, frequency_penalty=1.0)
    decoder = MLPDecoder(5, (3, 16, 16), hidden=8)
    pairs = [
        ({"param": "fourier", "decay_power": 1.5, "mean": 0.5, "std": [0.2, 0.3, 0.4]},
         {"param": Fourier(decay_power=1.5), "space": ImageSpace(mean=0.5, std=[0.2, 0.3, 0.4])}),
        ({"param": "pixels", "range_fn": "clamp", "init_std": 0.1, "value_range": (-1.0, 1.0)},
         {"param": Pixels(range_fn="clamp", init_std=0.1), "space": ImageSpace(value_range=(-1.0, 1.0))}),
        ({"prior": decoder, "latent_std": 0.5, "latent_penalty": 0.1}, {"param": Latent(decoder, latent_std=0.5), "latent_penalty": 0.1}),
    ]
    for short, spec in pairs:
        a = visualize_features(net, obj, **common, **short)
        b = visualize_features(net, obj, **common, **spec)
        assert torch.equal(a.images, b.images) and torch.equal(a.trace, b.trace)
        assert a.settings["param"] == b.settings["param"]
    with pytest.raises(ValueError, match="either as keywords or in `space`"):
        visualize_features(net, obj, **common, mean=0.5, space=ImageSpace())
    with pytest.raises(ValueError, match="set them on your `param`"):
        visualize_features(net, obj, **common, param=Fourier(), decay_power=2.0)
    with pytest.raises(TypeError, match="lr_schedule"):
        visualize_features(net, obj, **common, lr_schedule="cosine")


class _Gray(nn.Module):
    """A parameterisation of one's own: one grey level per pixel, repeated over RGB, in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.level = nn.Parameter(torch.zeros(2, 1, 16, 16))
        self.projections = 0

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.level).expand(-1, 3, -1, -1)

    def project(self) -> None:
        self.projections += 1


def test_own_parameterisation_transforms_and_optimizer():
    torch.manual_seed(0)
    net = _Net().eval()
    obj = channel("conv", [0, 1])
    gray = _Gray()
    seen = []

    def record(images, generator):  # (images, generator) -> images
        seen.append(tuple(images.shape))
        return images + 0.0 * torch.rand(1, generator=generator)

    sgd = []
    res = visualize_features(net, obj, param=gray, steps=5, transforms=[record, lambda x: x.flip(-1)],
                             optimizer=lambda ps: sgd.append(ps) or torch.optim.SGD(ps, lr=5.0))
    assert res.images.shape == (2, 3, 16, 16)  # the shape comes from the parameterisation
    assert torch.equal(res.images[:, 0], res.images[:, 2])  # grey: what the parameterisation makes
    assert seen == [(2, 3, 16, 16)] * 5 and gray.projections == 5
    assert len(sgd) == 1 and sgd[0] == [gray.level] and gray.level.grad is None
    assert torch.equal(torch.sigmoid(gray.level.detach()).expand(-1, 3, -1, -1), res.images)  # optimised in place
    assert (res.objective > res.initial_objective).all()
    # SGD with another step size is another optimisation than the default Adam, from the same start
    adam = visualize_features(net, obj, param=_Gray(), steps=5)
    assert torch.equal(adam.initial_objective, res.initial_objective) and not torch.allclose(adam.images, res.images)
    with pytest.raises(ValueError, match="`shape`"):
        visualize_features(net, obj, param=_Gray(), shape=(1, 3, 16, 16), steps=1)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        visualize_features(net, obj, param=_Gray(), steps=1, optimizer=lambda ps: None)


def test_nan_weights_with_four_images_are_reported_not_raised(tmp_path):
    """Four 32 px images take the channels-last fast pass, whose check compared NaN objectives and failed."""
    net = _Net().eval()
    with torch.no_grad():
        net.conv.weight.fill_(float("nan"))
    res = visualize_features(net, channel("conv", [0, 1, 2, 3]), shape=(4, 3, 32, 32), steps=2)
    assert torch.isnan(res.objective).all()

    class NaNDigits(DigitsCNN):
        def on_fit_start(self) -> None:
            with torch.no_grad():
                self.features[8].weight.fill_(float("nan"))

    pl.seed_everything(0, verbose=False)
    cb = FeatureVisualization(layers=["features.8"], channels=[0, 1, 2, 3], classes=[0, 1], regularizers=[], steps=2,
                              at=[0.0], every_n_epochs=None, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.warns(UserWarning, match="FeatureVisualization: non-finite values"):
        trainer.fit(NaNDigits(width=8), datamodule=DigitsDataModule(batch_size=16, limit=64))
    assert sorted(cb.nonfinite) == ["class/0", "class/1", "features.8/0", "features.8/1", "features.8/2", "features.8/3"]
    assert not cb.disabled


class _Block(nn.Module):
    """A residual block whose 1x1 shortcut conv is registered, and runs, after the two 3x3 convs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


class _TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = _Block(4, 8)
        self.layer2 = _Block(8, 8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(torch.relu(self.stem(x)))))


def test_auto_layers_follow_the_main_path_not_the_shortcut():
    from lightning_introspect.methods.attribution import auto_layer

    model = _TinyResNet()
    x = torch.rand(2, 1, 16, 16)
    assert auto_layer(model, x) == "layer2"  # the feature map Attributions' Grad-CAM uses
    chosen = {k: FeatureVisualization(num_layers=k).resolve(model, x) for k in (1, 2, 3)}
    assert chosen == {1: ["layer2.conv2"], 2: ["layer1.conv2", "layer2.conv2"], 3: ["layer1.conv1", "layer2.conv1", "layer2.conv2"]}
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1] == "layer2.shortcut"  # the old pick
    assert all(not m._forward_hooks for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert FeatureVisualization(num_layers=2).resolve(model) == []  # "auto" waits for data


def test_channel_choice_takes_the_channels_that_vary_most():
    from lightning_introspect.methods.featviz_plan import channel_spread, spread_picks, top_channels

    torch.manual_seed(0)
    act = torch.randn(6, 4, 3, 3) * torch.tensor([0.1, 3.0, 1.0, 2.0]).view(1, 4, 1, 1)
    spread = channel_spread(act)
    assert torch.allclose(spread, act.transpose(0, 1).flatten(1).std(dim=1))
    assert top_channels(spread, 2) == [1, 3]
    assert spread_picks(["a", "b", "c", "d", "e"], 2) == ["c", "e"]
    assert spread_picks(["a", "b"], 5) == ["a", "b"]


def test_check_units_refuses_out_of_range_ids_naming_the_argument():
    from lightning_introspect.methods.featviz_plan import check_units

    with pytest.raises(ValueError, match=r"`channels` in \[0, 3\]"):
        check_units({"conv": (2, 4, 5, 5)}, (2, 10), [1, 4], None)
    with pytest.raises(ValueError, match=r"`classes` in \[0, 9\]"):
        check_units({}, (2, 10), "auto", [10])
    with pytest.raises(ValueError, match="classifier output"):
        check_units({}, (2, 10, 4, 4), "auto", [1])
    assert check_units({"conv": (2, 4)}, (2, 10, 4, 4), "auto", "auto") == []
