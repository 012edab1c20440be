"""Misclassifications' segmentation review: per-image mean IoU against scikit-learn, the worst images of a
model built so the answer is known, boundary vs interior errors of an eroded / dilated prediction, a U-Net
fit at default arguments (tags read back, training bitwise unchanged), and the task refused when wrong."""

from __future__ import annotations

import io
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import jaccard_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import LightningModule, Trainer, pl
from lightning_introspect.callbacks.base import IntrospectionFailureWarning
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.image_stats import gaussian_blur, image_statistics, mean_by_bin
from lightning_introspect.methods.segmentation_review import (
    SegmentationReviewBuffer,
    boundary_mask,
    iou_from_confusion,
    per_image_miou,
    perturbation_iou,
    pixel_confusion,
)
from lightning_introspect.render.segmentation_review import (
    CORRECT_GREY,
    IGNORED_COLOUR,
    class_palette,
    error_maps,
)
from tests.helpers import quick_trainer, read_events
from tests.zoo import Classifier, Segmenter, TinyUNet, digits_dm, shapes_dm, small_cnn

SEG = "introspect/misclassifications/segmentation"


def sklearn_miou(pred: torch.Tensor, truth: torch.Tensor, ignore_index: int | None = None) -> float:
    keep = truth != ignore_index if ignore_index is not None else torch.ones_like(truth, dtype=torch.bool)
    t, p = truth[keep].numpy(), pred[keep].numpy()
    present = sorted(set(t.tolist()) | set(p.tolist()))
    return float(jaccard_score(t, p, average="macro", labels=present, zero_division=0))


# ------------------------------------------------------------------------------------------ pure maths
def test_per_image_miou_equals_sklearn_jaccard_over_the_classes_present() -> None:
    gen = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 4, (6, 9, 7), generator=gen)
    pred = torch.where(torch.rand(6, 9, 7, generator=gen) < 0.7, truth, torch.randint(0, 4, (6, 9, 7), generator=gen))
    pred[1] = 2  # one class predicted everywhere: the others present only in the truth
    truth[2][truth[2] == 3] = 255  # ignored pixels: class 3 is left out of image 2 unless predicted elsewhere
    truth[3] = 255  # every pixel ignored: no mean IoU
    truth[4, :5] = 255
    miou = per_image_miou(pred, truth, num_classes=4, ignore_index=255)
    for i in (0, 1, 2, 4, 5):
        assert float(miou[i]) == pytest.approx(sklearn_miou(pred[i], truth[i], 255), abs=1e-6), i
    assert torch.isnan(miou[3])
    assert float(per_image_miou(truth[:1], truth[:1], num_classes=4)[0]) == 1.0


def test_boundary_and_interior_errors_of_an_eroded_or_dilated_prediction() -> None:
    truth = torch.zeros(2, 20, 20, dtype=torch.long)
    truth[0, 5:13, 4:14] = 1
    truth[1, 3:9, 8:17] = 2
    truth[1, 12:18, 2:8] = 1
    eroded, dilated = truth.clone(), truth.clone()
    for c in (1, 2):  # one pixel off every edge of each object
        inside = (-F.max_pool2d(-(truth == c).float().unsqueeze(1), 3, stride=1, padding=1))[:, 0] > 0
        grown = F.max_pool2d((truth == c).float().unsqueeze(1), 3, stride=1, padding=1)[:, 0] > 0
        eroded[(truth == c) & ~inside] = 0
        dilated[grown & (truth == 0)] = c
    for width in (1, 2):
        for pred in (eroded, dilated):
            buffer = SegmentationReviewBuffer(top_k=2, boundary_width=width)
            buffer.add(F.one_hot(pred, 3).permute(0, 3, 1, 2).float(), truth)
            errors = buffer.boundary_errors()
            assert errors["interior_error"] == [0.0, 0.0, 0.0] and errors["overall"]["interior"] == 0.0
            wrong = (pred != truth).sum()
            assert wrong > 0
            assert errors["overall"]["boundary"] == pytest.approx(float(wrong) / sum(errors["boundary_pixels"]))
            assert sum(c["pixels"] for c in errors["confusions"]["boundary"]) == int(wrong)
            assert errors["confusions"]["interior"] == []
    # the boundary band: width 1 is the pixels next to a class change, on both sides of it
    band = boundary_mask(truth, 1)
    changes = F.max_pool2d(truth.float().unsqueeze(1), 3, 1, 1)[:, 0] != -F.max_pool2d(-truth.float().unsqueeze(1), 3, 1, 1)[:, 0]
    assert torch.equal(band, changes) and not band[0, 0, 0] and band[0, 4, 4] and band[0, 5, 4] and not band[0, 8, 8]
    # ignored pixels are neutral: an object next to a void band keeps its interior there
    void = truth.clone()
    void[0, 5:13, 14:16] = 255
    assert not boundary_mask(void, 1, ignore_index=255)[0, 8, 13] and boundary_mask(truth, 1)[0, 8, 13]


def test_confusion_iou_and_binned_means_agree_with_direct_counts() -> None:
    gen = torch.Generator().manual_seed(3)
    truth, pred = torch.randint(0, 3, (500,), generator=gen), torch.randint(0, 3, (500,), generator=gen)
    conf = pixel_confusion(pred, truth, 3)
    assert conf.tolist() == [[int(((truth == t) & (pred == p)).sum()) for p in range(3)] for t in range(3)]
    ref = jaccard_score(truth.numpy(), pred.numpy(), average=None, labels=[0, 1, 2])
    assert iou_from_confusion(conf) == pytest.approx(ref.tolist())
    values, scores = torch.arange(20.0), torch.linspace(0, 1, 20)
    scores[3] = float("nan")  # left out
    b = mean_by_bin(values, scores, num_bins=4)
    keep = ~torch.isnan(scores)
    v, sc = values[keep].double(), scores[keep].double()
    edges = torch.quantile(v, torch.linspace(0, 1, 5, dtype=torch.float64))
    assert b.edges == pytest.approx(edges.tolist()) and sum(b.counts) == 19
    for i in range(4):
        inside = (v >= edges[i]) & ((v < edges[i + 1]) if i < 3 else (v <= edges[i + 1]))
        assert b.counts[i] == int(inside.sum()) and b.mean[i] == pytest.approx(float(sc[inside].mean()))


def test_perturbation_iou_matches_pooled_pixels_and_uses_a_private_generator() -> None:
    gen = torch.Generator().manual_seed(1)
    masks = torch.zeros(6, 12, 12, dtype=torch.long)
    masks[:, 3:9, 3:9] = 1
    masks[::2, 5:7, 5:7] = 2
    x = masks.float().unsqueeze(1) / 2 + 0.05 * torch.randn(6, 1, 12, 12, generator=gen)

    def predict(inputs: torch.Tensor) -> torch.Tensor:  # class from the intensity: blur and noise move it
        return F.one_hot((inputs[:, 0] * 2).round().clamp(0, 2).long(), 3).permute(0, 3, 1, 2).float()

    rng = torch.get_rng_state()
    res = perturbation_iou(predict, x, masks, num_classes=3, strengths={"blur": [1.5], "noise": [0.5]}, seed=4, batch_size=4)
    again = perturbation_iou(predict, x, masks, num_classes=3, strengths={"noise": [0.5]}, seed=4)
    assert torch.equal(rng, torch.get_rng_state())
    assert res["noise"].per_class == again["noise"].per_class  # the same noise every time
    assert res["blur"].miou[0] == 1.0 and res["blur"].miou[1] < 1.0
    blurred = predict(gaussian_blur(x, 1.5)).argmax(1)
    ref = jaccard_score(masks.flatten().numpy(), blurred.flatten().numpy(), average=None, labels=[0, 1, 2])
    assert res["blur"].per_class[1] == pytest.approx(ref.tolist())
    assert res["blur"].miou[1] == pytest.approx(float(ref.mean()))


def test_error_map_shows_the_true_class_upper_left_and_the_predicted_class_lower_right() -> None:
    truth = torch.tensor([[[0, 1], [1, 255]]])
    pred = torch.tensor([[[0, 2], [1, 0]]])
    maps = error_maps(truth, pred, 3, ignore_index=255, scale=4)
    palette = class_palette(3)
    assert torch.allclose(maps[0, :, 0, 0], torch.full((3,), CORRECT_GREY))  # correct
    assert torch.allclose(maps[0, :, 0, 4], palette[1]) and torch.allclose(maps[0, :, 3, 7], palette[2])  # 1 -> 2
    assert torch.allclose(maps[0, :, 7, 7], torch.tensor(IGNORED_COLOUR))  # ignored
    small = error_maps(truth, pred, 3, scale=1)
    assert torch.allclose(small[0, :, 0, 1], palette[2])  # too small to split: checkered by position


# --------------------------------------------------------------------------------- a known answer
class MaskReader(LightningModule):
    """Reads the class of each pixel from its input (``x = class id``): right wherever the input holds the
    true class, wrong where the data put another one; NaN logits for inputs marked with -1 at pixel (0, 0)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.classes = classes
        self.scale = nn.Parameter(torch.ones(()))  # gives the optimiser something; the logits ignore it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0].round().long()
        logits = 10.0 * F.one_hot(ids.clamp(0, self.classes - 1), self.classes).permute(0, 3, 1, 2).float()
        broken = (ids[:, 0, 0] < 0).view(-1, 1, 1, 1)
        return torch.where(broken, torch.full_like(logits, float("nan")), logits) + 0.0 * self.scale

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def known_worst_data() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """20 images 16x16 (a square of class 1 and a bar of class 2 along the bottom edge); images 13, 4 and 9 have a known share of
    their square read as class 2 (inputs), image 7 is broken (NaN); the expected worst order."""
    masks = torch.zeros(20, 16, 16, dtype=torch.long)
    masks[:, 2:10, 2:10] = 1
    masks[:, 11:16, 3:13] = 2
    x = masks.float().unsqueeze(1).clone()
    x[13, 0, 2:10, 2:10] = 2  # the whole square wrong
    x[4, 0, 2:10, 2:6] = 2  # half of it
    x[9, 0, 2:10, 2:4] = 0  # a quarter, as background
    x[7, 0, 0, 0] = -1
    return x, masks, [13, 4, 9]


def test_the_worst_images_of_a_model_built_so_the_answer_is_known(tmp_path: Any) -> None:
    x, masks, expected = known_worst_data()
    loader = DataLoader(TensorDataset(x, masks), batch_size=6)
    cb = Misclassifications(top_k=3, perturbations=[], on_error="raise")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb], default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"\(logits\) are non-finite \(NaN / Inf\) for 1 of 20 validation images"):
        trainer.validate(MaskReader(), loader, verbose=False)  # the task found at the first batch (no fit)
    report = cb.report
    assert cb.resolved_task == "segmentation" and report["task"] == "segmentation"
    assert report["nonfinite"] == 1 and report["num_samples"] == 19
    assert [row["index"] for row in report["worst"]] == expected
    preds = x[:, 0].round().long().clamp(0, 2)
    for row in report["worst"]:
        assert row["miou"] == pytest.approx(sklearn_miou(preds[row["index"]], masks[row["index"]]), abs=1e-6)
    kept = [i for i in range(20) if i != 7]
    assert report["miou"] == pytest.approx(sum(sklearn_miou(preds[i], masks[i]) for i in kept) / 19, abs=1e-6)
    assert torch.equal(cb.worst_samples["index"], torch.tensor(expected))
    assert torch.equal(cb.worst_samples["mask"], masks[expected]) and torch.equal(cb.worst_samples["pred"], preds[expected])
    # every error is in the square, its interior included; nothing else is ever wrong
    boundary = report["boundary"]
    assert boundary["interior_error"][1] > 0 and boundary["interior_error"][0] == boundary["interior_error"][2] == 0.0
    assert boundary["boundary_error"][0] == boundary["boundary_error"][2] == 0.0
    top = boundary["confusions"]["interior"][0]
    assert (top["true"], top["pred"]) == (1, 2) and boundary["interior_confused_with"] == [None, 2, None]
    stats = image_statistics(x[kept])
    for stat, binned in report["bins"].items():
        ref = mean_by_bin(stats[stat], torch.tensor([sklearn_miou(preds[i], masks[i]) for i in kept]), num_bins=5)
        assert binned["counts"] == ref.counts and binned["miou"] == pytest.approx(ref.mean)


def test_a_unet_fit_at_default_arguments_logs_the_review_and_leaves_training_unchanged(tmp_path: Any) -> None:
    def fit(callbacks: list[Any], where: str) -> tuple[Any, Any, list[warnings.WarningMessage]]:
        pl.seed_everything(0, verbose=False)
        model = Segmenter(TinyUNet())
        trainer = quick_trainer(tmp_path / where, callbacks, epochs=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, datamodule=shapes_dm())
        return model, trainer, list(caught)

    plain, plain_trainer, _ = fit([], "plain")
    rng_plain = torch.get_rng_state()
    cb = Misclassifications()
    watched, trainer, caught = fit([cb], "watched")
    assert torch.equal(rng_plain, torch.get_rng_state())
    assert not [str(w.message) for w in caught if issubclass(w.category, IntrospectionFailureWarning)]
    a, b = plain.state_dict(), watched.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), "introspection changed the weights"
    opt_a, opt_b = plain_trainer.optimizers[0].state_dict()["state"], trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b[i][k])) for i in opt_a for k, v in opt_a[i].items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in watched.modules())

    assert not cb.disabled and cb.resolved_task == "segmentation"
    assert [h["epoch"] for h in cb.history] == [0, 1]  # half way and the last epoch
    report = cb.report
    assert report["num_samples"] == 48 and len(report["worst"]) == 16
    assert [r["miou"] for r in report["worst"]] == sorted(r["miou"] for r in report["worst"])
    events = read_events(trainer.logger.log_dir)
    steps = [h["step"] for h in cb.history]
    for tag in ("gallery", "statistics_figure", "perturbations_figure"):
        assert events["images"][f"{SEG}/{tag}"] == steps, tag
    for tag in ("worst", "boundary", "statistics", "perturbations"):
        assert events["text"][f"{SEG}/{tag}/text_summary"] == steps, tag
    scalars = events["scalars"]
    assert dict(scalars[f"{SEG}/miou"])[steps[-1]] == pytest.approx(report["miou"])
    for c in range(3):
        for region in ("boundary", "interior"):
            value = report["boundary"][f"{region}_error"][c]
            if value is not None:
                assert dict(scalars[f"{SEG}/{region}_error/{c}"])[steps[-1]] == pytest.approx(value)
    assert f"{SEG}/miou_by/sharpness/q1" in scalars
    blur = report["perturbations"]["blur"]
    assert dict(scalars[f"{SEG}/perturbation/blur/1"])[steps[-1]] == pytest.approx(blur["miou"][2])
    assert not any(t.startswith("introspect/misclassifications/error_rate") for t in scalars)  # no classification tags
    assert cb.summary_lines()[0].startswith("epoch 1: mean IoU per image")

    buffer = io.BytesIO()  # the checkpoint state holds only plain types
    torch.save(cb.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["history"][-1]["worst"] == report["worst"]


def test_a_task_that_contradicts_the_shapes_is_refused_before_training(tmp_path: Any) -> None:
    model = Segmenter(TinyUNet())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cb = Misclassifications(task="classification")
    trainer = quick_trainer(tmp_path / "unet", [cb], epochs=1, logger=False)
    with pytest.raises(IntrospectionInputError, match=r"`task='classification'` needs one label per sample, but got "
                       r"output \(16, 3, 16, 16\), labels \(16, 16, 16\) \(per-pixel masks\); pass `task='segmentation'`"):
        trainer.fit(model, datamodule=shapes_dm())
    assert trainer.global_step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    trainer = quick_trainer(tmp_path / "cnn", [Misclassifications(task="segmentation")], epochs=1, logger=False)
    with pytest.raises(IntrospectionInputError, match=r"`task='segmentation'` needs per-pixel logits"):
        trainer.fit(Classifier(small_cnn()), datamodule=digits_dm())
    with pytest.raises(ValueError, match=r"Expected `task` to be one of 'auto', 'classification', 'segmentation'"):
        Misclassifications(task="detection")
    with pytest.raises(ValueError, match="`ignore_index`"):
        Misclassifications(ignore_index=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`boundary_width`"):
        Misclassifications(boundary_width=0)


def test_ignore_index_pixels_are_left_out_of_the_review(tmp_path: Any) -> None:
    x, masks, _ = known_worst_data()
    x, masks = x[:8], masks[:8].clone()
    x[7, 0, 0, 0] = 0  # not broken here
    masks[:, 0, :] = 255  # a void row: out of range for 3 classes unless ignored
    loader = DataLoader(TensorDataset(x, masks), batch_size=4)
    kw: dict[str, Any] = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                              default_root_dir=str(tmp_path))
    cb = Misclassifications(ignore_index=255, perturbations=[], figures=False, on_error="raise")
    Trainer(callbacks=[cb], **kw).validate(MaskReader(), loader, verbose=False)
    preds = x[:, 0].round().long().clamp(0, 2)
    assert [r["miou"] for r in cb.report["worst"][:1]] == [pytest.approx(sklearn_miou(preds[4], masks[4], 255), abs=1e-6)]
    assert sum(cb.report["boundary"]["boundary_pixels"]) + sum(cb.report["boundary"]["interior_pixels"]) == 8 * 15 * 16
    with pytest.raises(IntrospectionInputError, match=r"Labels out of range.*max 255"):
        Trainer(callbacks=[Misclassifications(perturbations=[], on_error="raise")], **kw).validate(MaskReader(), loader, verbose=False)
