"""Per-pixel linear probes for segmentation: nearest-resized mask labels, bounded pixel sampling at fixed
positions, probes that find a feature map encoding the mask and not one of noise, and LinearProbes on a
U-Net at default settings (task detected, no ``target_transform``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule
from lightning_introspect.callbacks.linear_probes import LinearProbes
from lightning_introspect.methods.probe_capture import INPUT_KEY, FeatureCapture
from lightning_introspect.methods.probe_layers import pixel_probe_layers
from lightning_introspect.methods.probes import (
    FeatureCache,
    LayerCaches,
    fit_probes,
    nearest_labels,
    pixel_features,
    probe_label_problem,
    sample_pixels,
)
from tests.helpers import quick_trainer, read_events
from tests.zoo import Segmenter, TinyUNet, shapes_dm

IGNORE = 255


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# =================================================================================== the maths
@pytest.mark.parametrize("size", [(8, 11), (17, 23), (34, 46), (5, 3), (1, 1)])
def test_nearest_labels_are_f_interpolate_nearest_on_the_masks(size):
    masks = torch.randint(0, 300, (3, 17, 23), generator=torch.Generator().manual_seed(0))
    expected = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
    assert torch.equal(nearest_labels(masks, size), expected)


def test_sample_pixels_is_bounded_uniform_seeded_and_never_draws_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (4, 16, 16), generator=gen)
    labels[labels == 2] = IGNORE  # about a third of the pixels ignored
    labels[3] = IGNORE
    labels[3, 0, :5] = 1  # the last image: only 5 valid pixels
    rng = torch.get_rng_state()
    image, row, col = sample_pixels(labels, 40, generator=torch.Generator().manual_seed(1), ignore_index=IGNORE)
    assert torch.equal(torch.get_rng_state(), rng)  # a private generator only
    assert (labels[image, row, col] != IGNORE).all()
    assert torch.bincount(image, minlength=4).tolist() == [40, 40, 40, 5]  # at most 40 per image, all 5 of the last
    assert len(set(zip(image.tolist(), row.tolist(), col.tolist()))) == image.numel()  # without replacement
    again = sample_pixels(labels, 40, generator=torch.Generator().manual_seed(1), ignore_index=IGNORE)
    assert all(torch.equal(a, b) for a, b in zip((image, row, col), again))  # same seed, same positions
    # uniform over the valid pixels: over many draws every valid pixel of image 0 is drawn about equally often
    counts = torch.zeros(16 * 16)
    g = torch.Generator().manual_seed(2)
    for _ in range(300):
        i, r, c = sample_pixels(labels[:1], 40, generator=g, ignore_index=IGNORE)
        counts.index_add_(0, r * 16 + c, torch.ones(r.numel()))
    valid = (labels[0] != IGNORE).flatten()
    assert counts[~valid].sum() == 0
    assert scipy.stats.chisquare(counts[valid].numpy()).pvalue > 1e-3  # no valid pixel favoured


def test_pixel_features_read_the_vectors_at_the_positions():
    fmap = torch.randn(2, 5, 4, 6)
    image, row, col = torch.tensor([1, 0, 1]), torch.tensor([3, 0, 2]), torch.tensor([5, 1, 0])
    expected = torch.stack([fmap[1, :, 3, 5], fmap[0, :, 0, 1], fmap[1, :, 2, 0]])
    assert torch.equal(pixel_features(fmap, image, row, col), expected)
    with pytest.raises(ValueError, match=r"feature maps \(N, D, h, w\)"):
        pixel_features(torch.zeros(2, 5), image, row, col)


def test_capture_reads_the_same_positions_after_restart_and_labels_each_layer_at_its_own_size():
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(3, 4, 1))
    masks = torch.randint(0, 3, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    x = masks[:, None].float()
    capture = FeatureCapture({"0": net[0], "1": net[1]}, pixels_per_image=6, seed=3)
    rows = []
    for _restart in range(2):
        capture.restart()
        caches, inputs = LayerCaches(1000), FeatureCache(1000)
        with capture.attach(), torch.no_grad():
            capture.begin(masks)
            capture.add_input(x)
            net(x)
            capture.commit(caches, inputs)
        rows.append((caches.features("1").clone(), caches.labels_of("1").clone(), inputs.features(INPUT_KEY).clone()))
    assert all(torch.equal(a, b) for a, b in zip(*rows))  # the same pixels in every pass
    assert caches.size_of("0") == caches.size_of("1") == inputs.size == 24  # 6 per image
    assert torch.equal(inputs.features(INPUT_KEY)[:, 0].long(), inputs.labels)  # the input is the mask itself
    assert set(caches.labels_of("1").tolist()) <= set(nearest_labels(masks, (4, 4)).unique().tolist())


def test_fit_probes_with_per_layer_labels_fits_each_layer_on_its_own_labels():
    gen = torch.Generator().manual_seed(0)
    ya, yb = torch.randint(0, 2, (300,), generator=gen), torch.randint(0, 3, (200,), generator=gen)
    xa = torch.randn(300, 4, generator=gen) + 3 * ya[:, None]
    xb = torch.randn(200, 5, generator=gen)
    both = fit_probes({"a": xa, "b": xb}, {"a": ya, "b": yb}, solver="torch")
    alone = fit_probes({"a": xa}, ya, solver="torch")["a"]
    assert both["a"].accuracy == alone.accuracy and both["a"].n_classes == 2 and both["b"].n_classes == 3
    assert both["a"].accuracy > 0.9 and both["b"].accuracy < 0.6
    with pytest.raises(ValueError, match="per-layer `labels`"):
        fit_probes({"a": xa, "b": xb}, {"a": ya}, solver="torch")


def test_auto_pixel_layers_keep_feature_maps_and_drop_the_logits_head():
    unet = TinyUNet()
    modules = dict(unet.named_modules())
    shapes = {"enc1.2": (2, 8, 16, 16), "dec1.2": (2, 8, 16, 16), "head": (2, 3, 16, 16), "pool": (2, 8)}
    picked = pixel_probe_layers({n: modules[n] for n in ("enc1.2", "dec1.2", "head")}, shapes, auto=True, num_classes=3)
    assert list(picked) == ["enc1.2", "dec1.2"]
    with pytest.raises(ValueError, match=r"`layers`.*feature maps"):
        pixel_probe_layers({"pool": modules["pool"]}, shapes, auto=False)


# ====================================================================== a model with known answers
class KnownMaps(nn.Module):
    """Per-pixel logits from the mask itself. ``known``'s output channel 0 is the input (the mask as a float)
    resized to 8x8 by nearest neighbour: the class id of every cell. ``noise`` gives 4 channels of noise from
    its own generator. A 1x1 head on both, upsampled to 16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.known = nn.Upsample(size=(8, 8), mode="nearest")
        self.noise = Noise()
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.known(x)
        return F.interpolate(self.head(torch.cat([a, self.noise(a)], 1)), size=x.shape[-2:], mode="nearest")


class Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.randn(a.shape[0], 4, *a.shape[-2:], generator=self.gen)


class IgnoringSegmenter(LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, masks = batch
        return F.cross_entropy(self(x), masks, ignore_index=IGNORE)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _known_loaders() -> tuple[DataLoader, DataLoader]:
    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (96, 16, 16), generator=gen)  # every class equally frequent: chance is 1/3
    masks[:, :, :4] = IGNORE  # a quarter of every image is ignored (it would read as class 255 in `known`)
    data = TensorDataset(masks[:, None].float(), masks)
    return DataLoader(data, batch_size=32), DataLoader(data, batch_size=32)


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_probes_find_the_map_that_encodes_the_mask_and_not_the_noise(tmp_path, solver):
    train, val = _known_loaders()
    probes = LinearProbes(layers=["net.known", "net.noise"], ignore_index=IGNORE, solver=solver, include_init=False, on_error="raise")
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=1)
    trainer.fit(IgnoringSegmenter(KnownMaps()), train_dataloaders=train, val_dataloaders=val)
    assert probes.resolved_task == "segmentation"
    acc = probes.history[0]
    assert acc["net.known"] > 0.99  # the class id itself, cell by cell: linearly decodable
    assert abs(acc["net.noise"] - 1 / 3) < 0.06  # noise: chance level
    assert probes.history["input"]["input"] > 0.99  # the input is the mask
    cache = probes._cache
    assert isinstance(cache, LayerCaches)
    for name in ("net.known", "net.noise"):
        labels = cache.labels_of(name)
        # an 8x8 map has 48 cells outside the ignored quarter, fewer than 64 per image: every one of them, no other
        assert (labels != IGNORE).all() and cache.size_of(name) == 96 * 48
    # each cached row of `known` carries exactly its label: positions and nearest-resized labels agree
    assert torch.equal(cache.features("net.known")[:, 0].long(), cache.labels_of("net.known"))


def test_pixel_cache_stays_within_its_bound(tmp_path):
    train, val = _known_loaders()
    probes = LinearProbes(layers=["net.known"], ignore_index=IGNORE, max_samples=500, pixels_per_image=16,
                          include_init=False, include_input=False, on_error="raise")
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=1)
    trainer.fit(IgnoringSegmenter(KnownMaps()), train_dataloaders=train, val_dataloaders=val)
    cache = probes._cache
    assert cache.size_of("net.known") == 500  # 96 x 16 pixels seen, a reservoir of 500 kept
    assert cache.nbytes == 500 * (1 * 4 + 8)  # float32 features (1 channel) and int64 labels, nothing more
    assert probes.history[0]["net.known"] > 0.99


# ============================================================================ the zoo U-Net, defaults
def _fit_unet(tmp_path, callbacks):
    torch.manual_seed(0)
    model = Segmenter(TinyUNet())
    trainer = quick_trainer(tmp_path, callbacks, epochs=2, limit_train_batches=2)
    trainer.fit(model, datamodule=shapes_dm())
    return model, trainer


def test_unet_at_default_settings_logs_per_pixel_probes_and_leaves_training_unchanged(tmp_path):
    plain, _ = _fit_unet(tmp_path / "plain", [])
    probes = LinearProbes(on_error="raise")
    watched, trainer = _fit_unet(tmp_path / "watched", [probes])
    assert probes.resolved_task == "segmentation"
    assert probes.layer_names == ["net.enc1.2", "net.enc2.2", "net.dec1.2"]  # encoder and decoder stages, no head
    events = read_events(trainer.logger.log_dir)
    for name in ["input", *probes.layer_names]:
        accuracy = events["scalars"][f"introspect/probes/{name}/accuracy"]
        assert all(0.0 <= v <= 1.0 for _, v in accuracy)
    for name in probes.layer_names:
        steps = [s for s, _ in events["scalars"][f"introspect/probes/{name}/accuracy"]]
        assert steps == [0, 2, 4]  # the init baseline and both epochs
        assert events["scalars"][f"introspect/probes/{name}/accuracy"][-1][1] == pytest.approx(probes.history[1][name])
    assert "introspect/probes/table/text_summary" in events["text"]
    assert "Per-pixel probes" in probes.table()
    # background is most pixels: the probes beat the majority class share only by reading the features
    masks = shapes_dm().val_set.tensors[1]
    majority = float(np.bincount(masks.flatten().numpy()).max() / masks.numel())
    assert max(probes.history[1].values()) > majority
    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(not m._forward_hooks for m in watched.modules())


def test_a_target_transform_keeps_image_level_probes_and_masks_without_dense_logits_are_explained(tmp_path):
    big_square = lambda batch: ((batch[1] == 1).flatten(1).sum(1) > 12).long()  # noqa: E731
    probes = LinearProbes(target_transform=big_square, include_init=False, on_error="raise")
    _fit_unet(tmp_path, [probes])  # a transform giving one label per sample: image-level probes, as before
    assert probes.resolved_task == "classification" and isinstance(probes._cache, FeatureCache)
    assert set(probes.history) == {"input", 0, 1}
    problem = probe_label_problem(torch.zeros(2, 8, 8, dtype=torch.long))
    assert "task='segmentation'" in problem and "target_transform" in problem
    with pytest.raises(ValueError, match="`pixels_per_image`"):
        LinearProbes(pixels_per_image=0)
    with pytest.raises(ValueError, match="`ignore_index`"):
        LinearProbes(ignore_index=1.5)
    with pytest.raises(ValueError, match="`task`"):
        LinearProbes(task="pixels")
