"""Misclassifications: gallery and statistics checked against the model, perturbations on a trained CNN."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_introspect._lightning import Trainer, pl
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.methods.image_stats import error_rate_by_bin, image_statistics
from lightning_introspect.render.grid import shown_images
from lightning_introspect.render.review import statistics_markdown, strongest_bin
from tests.helpers import quick_trainer, read_events
from tests.test_per_class_metrics import TinyDigits, digits8


def test_fit_logs_gallery_statistics_and_perturbations_that_match_the_model(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=192)
    model = TinyDigits(lr=1e-2)
    cb = Misclassifications(top_k=6, per_class=2, num_samples=96, blur_sigmas=[0.5, 1.0], noise_stds=[0.5],
                            color_strengths=[0.5], mean=dm.mean, std=dm.std, every_n_epochs=2, at=None, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=2)
    trainer.fit(model, datamodule=dm)

    # the report agrees with the final model on the whole validation set
    x, y = dm.val_set.tensors
    model.eval()
    with torch.no_grad():
        probs = model(x).softmax(1)
    conf, pred = probs.max(1)
    wrong = pred != y
    report = cb.report
    assert report["epoch"] == 1 and report["num_samples"] == len(y)
    assert report["error_rate"] == pytest.approx(float(wrong.float().mean()))
    idx = wrong.nonzero().flatten()
    expected = sorted(idx.tolist(), key=lambda i: (-float(conf[i]), i))[:6]
    assert [r["index"] for r in report["wrong"]] == expected
    for row in report["wrong"]:
        assert row["confidence"] == pytest.approx(float(conf[row["index"]]), abs=1e-6)
        assert (row["label"], row["pred"]) == (int(y[row["index"]]), int(pred[row["index"]]))
    raw = x * dm.std + dm.mean
    assert torch.allclose(cb.wrong_images, raw[expected], atol=1e-5)  # the un-normalised inputs
    assert report["confidence_wrong"] < report["confidence_right"]

    stats = image_statistics(raw)
    assert set(report["bins"]) == {"sharpness", "noise", "brightness", "contrast"}  # no saturation for grey
    for name, b in report["bins"].items():
        ref = error_rate_by_bin(stats[name], wrong, num_bins=5)
        assert b["counts"] == ref.counts and b["errors"] == ref.errors
        assert sum(b["counts"]) == len(y) and sum(b["errors"]) == int(wrong.sum())

    fx, fy = cb.fixed_samples(trainer)
    with torch.no_grad():
        clean = float((model(fx).argmax(1) == fy).float().mean())
    blur = report["perturbations"]["blur"]
    assert blur["strengths"] == [0.0, 0.5, 1.0] and blur["accuracy"][0] == pytest.approx(clean)
    assert set(report["perturbations"]) == {"blur", "noise", "color"}
    assert len(blur["per_class"][0]) == 10
    lines = cb.summary_lines()
    assert len(cb.history) == 1 and any("quantile bin" in line for line in lines)
    assert any(line.startswith("blur: accuracy") for line in lines)

    events = read_events(trainer.logger.log_dir)
    steps = [h["step"] for h in cb.history]
    for tag in ("gallery", "gallery_per_class", "statistics_figure", "perturbations_figure"):
        assert events["images"][f"introspect/misclassifications/{tag}"] == steps
    for tag in ("top_wrong", "statistics", "perturbations"):
        assert events["text"][f"introspect/misclassifications/{tag}/text_summary"] == steps
    scalars = events["scalars"]
    assert dict(scalars["introspect/misclassifications/error_rate/overall"])[steps[-1]] == pytest.approx(report["error_rate"])
    assert "introspect/misclassifications/error_rate/sharpness/q1" in scalars
    assert dict(scalars["introspect/misclassifications/perturbation/blur/1"])[steps[-1]] == pytest.approx(blur["accuracy"][2])

    buffer = io.BytesIO()  # the checkpoint state holds only plain types
    torch.save(cb.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["history"][-1]["error_rate"] == report["error_rate"]


def test_perturbation_accuracy_falls_with_blur_and_noise_on_a_trained_cnn(trained_digits: Any, tmp_path: Any) -> None:
    model, dm = trained_digits
    model = copy.deepcopy(model)
    cb = Misclassifications(perturbations=["blur", "noise"], blur_sigmas=[0.5, 1.0, 2.0, 3.0], noise_stds=[0.1, 0.25, 0.5],
                            num_samples=256, statistics=["sharpness"], figures=False, mean=dm.mean, std=dm.std,
                            on_error="raise")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[cb], default_root_dir=str(tmp_path))
    trainer.validate(model, datamodule=dm, verbose=False)  # reviewing a trained model works outside fit too
    for kind, drop in (("blur", 0.3), ("noise", 0.3)):
        acc = cb.report["perturbations"][kind]["accuracy"]
        assert acc[0] > 0.85, acc
        assert all(b <= a + 0.02 for a, b in zip(acc, acc[1:])), (kind, acc)  # falls with strength
        assert acc[-1] < acc[0] - drop, (kind, acc)


def test_non_image_inputs_skip_the_gallery_with_one_warning(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    dm = digits8(limit=64)
    (xt, yt), (xv, yv) = dm.train_set.tensors, dm.val_set.tensors
    train = DataLoader(TensorDataset(xt.flatten(1), yt), batch_size=16)
    val = DataLoader(TensorDataset(xv.flatten(1), yv), batch_size=32)
    cb = Misclassifications(top_k=4, on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=2)
    with pytest.warns(UserWarning, match="not images") as record:
        trainer.fit(TinyDigits(), train, val)
    assert sum("not images" in str(w.message) for w in record) == 1
    assert cb.report["bins"] == {} and cb.report["perturbations"] == {}
    assert len(cb.report["wrong"]) == 4 and cb.wrong_images is None
    events = read_events(trainer.logger.log_dir)
    assert not any(t.startswith("introspect/misclassifications") for t in events["images"])
    assert "introspect/misclassifications/top_wrong/text_summary" in events["text"]
    assert "introspect/misclassifications/error_rate/class/0" in events["scalars"]


def test_labels_out_of_range_raise(tmp_path: Any) -> None:
    cb = Misclassifications(target_transform=lambda batch: batch[1] + 3)
    with pytest.raises(ValueError, match=r"Labels out of range.*\[0, 9\]"):
        quick_trainer(tmp_path, [cb], epochs=1, logger=False).fit(TinyDigits(), datamodule=digits8(limit=32))


def test_binary_logit_becomes_two_class_probabilities() -> None:
    probs = Misclassifications._probabilities(torch.tensor([-2.0, 3.0]))
    assert torch.allclose(probs[:, 1], torch.sigmoid(torch.tensor([-2.0, 3.0])))
    assert torch.allclose(probs.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        Misclassifications._probabilities(torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "`top_k`"),
        ({"per_class": -1}, "`per_class`"),
        ({"statistics": ["blurriness"]}, "`statistics`.*'sharpness'"),
        ({"perturbations": ["jpeg"]}, "`perturbations`.*'blur'"),
        ({"color_strengths": [1.5]}, "`color_strengths`"),
        ({"blur_sigmas": [-1.0]}, "`blur_sigmas`"),
        ({"mean": 0.5}, "`mean` and `std`"),
        ({"mean": 0.5, "std": 0.0}, "`std`"),
        ({"num_bins": 0}, "`num_bins`"),
        ({"on_error": "ignore"}, "`on_error`"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Misclassifications(**kwargs)


def test_findings_name_the_bin_where_errors_concentrate() -> None:
    values = torch.arange(100.0)
    wrong = torch.zeros(100, dtype=torch.bool)
    wrong[:12] = True  # 12 % errors in the lowest fifth of the values, none elsewhere
    wrong[50] = True
    b = error_rate_by_bin(values, wrong, num_bins=5)
    bins = {"sharpness": {"edges": b.edges, "counts": b.counts, "errors": b.errors, "rate": b.rate}}
    text = strongest_bin(bins, overall=0.13)
    assert text.startswith("errors concentrate in sharpness quantile bin q1 of 5 (lowest values)"), text
    assert "60.0% vs 13.0% overall (4.6x)" in text
    even = {"contrast": {"edges": [0, 1, 2], "counts": [50, 50], "errors": [6, 7], "rate": [0.12, 0.14]}}
    assert strongest_bin(even, overall=0.13).startswith("no statistic bin stands out")
    table = statistics_markdown(bins, 0.13)
    assert "| sharpness | 60.0% (n=20" in table and "4.62x" in table


# ------------------------------------------------------------------------------- pure review pieces
def test_review_buffer_keeps_the_most_confident_errors_across_batches_and_drops_nonfinite_rows() -> None:
    from lightning_introspect.methods.review import ReviewBuffer, class_probabilities

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 4, generator=gen) * 3
    labels = torch.randint(0, 4, (40,), generator=gen)
    images = torch.rand(40, 1, 6, 6, generator=gen)
    logits[5] = float("nan")  # left out: counted, never a row
    buffer = ReviewBuffer(top_k=5, per_class=2, statistics=["brightness"])
    reads = []
    for start in range(0, 40, 16):
        part = slice(start, start + 16)
        buffer.add(class_probabilities(logits[part]), labels[part], images=lambda p=part: reads.append(p) or images[p])
    nan_only = torch.full((3, 4), float("nan"))
    buffer.add(class_probabilities(nan_only), torch.zeros(3, dtype=torch.long), images=lambda: reads.append("nan") or None)
    assert "nan" not in reads and len(reads) == 3  # a batch without a finite sample is never read
    assert buffer.seen == 43 and buffer.nonfinite == 4

    finite = torch.arange(40) != 5
    conf, pred = logits.softmax(1).max(1)
    wrong = (pred != labels) & finite
    expected = sorted(wrong.nonzero().flatten().tolist(), key=lambda i: (-float(conf[i]), i))
    assert [row["index"] for row in buffer.wrong_rows()] == expected[:5]
    assert torch.equal(buffer.top["image"], images[expected[:5]])
    for cls, rows in buffer.top_per_class.items():
        assert rows["index"].tolist() == [i for i in expected if int(labels[i]) == cls][:2]
    errors = buffer.errors()
    assert errors["num_samples"] == 39 and errors["error_rate"] == pytest.approx(float(wrong.sum()) / 39)
    total = torch.bincount(labels[finite], minlength=4)
    assert errors["per_class_error"] == pytest.approx([float(wrong[labels == c].sum()) / float(total[c]) for c in range(4)])
    b = error_rate_by_bin(images[finite].mean(dim=(1, 2, 3)), wrong[finite], num_bins=3)
    assert buffer.bins(3)["brightness"]["rate"] == pytest.approx(b.rate)
    with pytest.raises(ValueError, match="width changed from 4 to 3"):
        buffer.add(class_probabilities(torch.zeros(2, 3)), torch.zeros(2, dtype=torch.long))


def test_large_wrong_images_are_kept_at_the_gallerys_size_and_measured_at_their_own() -> None:
    """Images with a side over the tiles' size are kept shrunk to it (at 384 px a kept image is 1.8 MB, at the
    128 px tile 0.2 MB); their statistics are measured first, on the images as given: the same bins as a
    buffer that keeps them whole, and the kept images are the whole ones shrunk."""
    from lightning_introspect.methods.image_stats import STATISTICS
    from lightning_introspect.methods.review import ReviewBuffer, class_probabilities

    gen = torch.Generator().manual_seed(3)
    images = torch.rand(24, 3, 300, 200, generator=gen)
    logits, labels = torch.randn(24, 3, generator=gen) * 3, torch.randint(0, 3, (24,), generator=gen)
    whole = ReviewBuffer(top_k=4, per_class=2, statistics=STATISTICS)
    shown = ReviewBuffer(top_k=4, per_class=2, statistics=STATISTICS, shrink=shown_images)
    for part in (slice(0, 10), slice(10, 24)):
        for buffer in (whole, shown):
            buffer.add(class_probabilities(logits[part]), labels[part], images=lambda p=part: images[p])
    assert whole.top is not None and shown.top is not None
    assert tuple(shown.top["image"].shape[1:]) == (3, 128, 85)
    assert torch.allclose(shown.top["image"], shown_images(whole.top["image"]), atol=1e-6)
    assert shown.top_per_class.keys() == whole.top_per_class.keys()
    for cls, rows in shown.top_per_class.items():
        assert torch.allclose(rows["image"], shown_images(whole.top_per_class[cls]["image"]), atol=1e-6)
    assert shown.wrong_rows() == whole.wrong_rows() and shown.bins(4) == whole.bins(4)
    assert torch.equal(shown_images(images[:2, :, :100, :100]), images[:2, :, :100, :100])  # small images as they are


def test_fit_on_large_images_keeps_the_wrong_images_at_the_tile_size(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 160, 160, generator=gen), torch.randint(0, 3, (32,), generator=gen)

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten(), torch.nn.Linear(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, _: int) -> torch.Tensor:
            return self(batch[0])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = Misclassifications(top_k=4, perturbations=[], on_error="raise")
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    trainer = quick_trainer(tmp_path, [cb], epochs=1)
    trainer.fit(Net(), loader, loader)
    assert cb.wrong_images is not None and tuple(cb.wrong_images.shape[1:]) == (3, 128, 128)
    index = [row["index"] for row in cb.report["wrong"]]
    assert torch.allclose(cb.wrong_images, shown_images(x[index]), atol=1e-6)
    assert "introspect/misclassifications/gallery" in read_events(trainer.logger.log_dir)["images"]


def test_unnormalize_inverts_normalize_per_channel() -> None:
    from lightning_introspect.methods.image_stats import normalize, unnormalize

    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    z = normalize(x, mean, std)
    assert torch.allclose(z[:, 1], (x[:, 1] - 0.456) / 0.224)
    assert torch.allclose(unnormalize(z, mean, std), x, atol=1e-6)
    assert torch.equal(unnormalize(z, None, None), z)  # no normalisation known: the inputs as they are
