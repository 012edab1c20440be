"""PerClassMetrics on segmentation: per-class IoU / Dice against sklearn and torchmetrics, the task read from
the shapes, the mean-IoU curve read back from the event file, a wrong explicit task refused before training."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.per_class_metrics import PerClassMetrics
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.per_class import (
    build_metrics,
    mean_iou,
    per_class_values,
    prepare_predictions,
)
from tests.helpers import quick_trainer, read_events
from tests.zoo import Segmenter, TinyUNet, shapes_dm


def _random_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 4, 6, 6, generator=gen)
    masks = torch.randint(0, 3, (3, 6, 6), generator=gen)  # class 3 is never true: no support
    masks[0, 0] = 255
    return logits, masks


def test_iou_and_dice_per_class_equal_sklearn_and_torchmetrics_with_ignore_index() -> None:
    from torchmetrics.classification import MulticlassJaccardIndex

    logits, masks = _random_batch()
    cb = PerClassMetrics(ignore_index=255, on_error="raise")
    cb._update(logits, (torch.zeros(3, 1, 6, 6), masks))
    values, table = cb._compute()
    assert cb.resolved_task == "segmentation"
    assert cb.active_metrics == ["precision", "recall", "f1", "accuracy", "iou", "dice"]
    keep = masks != 255
    truth, pred = masks[keep].numpy(), logits.argmax(1)[keep].numpy()
    iou = jaccard_score(truth, pred, labels=[0, 1, 2, 3], average=None, zero_division=0)
    dice = f1_score(truth, pred, labels=[0, 1, 2, 3], average=None, zero_division=0)
    assert values["iou"][:3] == pytest.approx(list(iou[:3]), abs=1e-6)
    assert values["dice"][:3] == pytest.approx(list(dice[:3]), abs=1e-6)
    assert values["iou"][3] is None and values["dice"][3] is None and values["support"][3] == 0  # no support: None, never 0 or NaN
    tm = MulticlassJaccardIndex(num_classes=4, average=None, ignore_index=255)(logits, masks)
    assert values["iou"][:3] == pytest.approx(tm[:3].tolist(), abs=1e-6)
    assert mean_iou(values) == pytest.approx(float(iou[:3].mean()), abs=1e-6)
    assert sum(map(sum, table)) == int(keep.sum())  # the confusion matrix counts pixels


def test_iou_from_the_confusion_matrix_equals_the_metric_of_the_summed_batches() -> None:
    """IoU is derived from integer counts: the value over two batches is that of their union (exact when
    DDP sums the counts of the ranks)."""
    (l1, m1), (l2, m2) = _random_batch(1), _random_batch(2)
    collection = build_metrics("segmentation", ["iou"], 4, ignore_index=255)
    for logits, masks in ((l1, m1), (l2, m2)):
        collection.update(*prepare_predictions(logits, masks, task="segmentation", num_classes=4, ignore_index=255)[:2])
    values, _ = per_class_values(collection.compute(), "segmentation", ["iou"])
    logits, masks = torch.cat([l1, l2]), torch.cat([m1, m2])
    keep = masks != 255
    expected = jaccard_score(masks[keep].numpy(), logits.argmax(1)[keep].numpy(), labels=[0, 1, 2], average=None)
    assert values["iou"][:3] == pytest.approx(list(expected), abs=1e-9)


def test_single_channel_masks_are_squeezed_and_classification_is_unchanged() -> None:
    logits, masks = _random_batch()
    cb = PerClassMetrics(ignore_index=255, on_error="raise")
    cb._update(logits, (torch.zeros(3, 1, 6, 6), masks.unsqueeze(1).float()))
    assert cb.resolved_task == "segmentation" and cb._compute() is not None
    plain = PerClassMetrics(on_error="raise")
    plain._update(torch.randn(4, 3), (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])))
    assert plain.resolved_task == "multiclass" and "iou" not in plain._compute()[0]


def test_a_wrong_explicit_task_is_refused_with_the_shapes_named() -> None:
    cb = PerClassMetrics(task="segmentation", on_error="raise")
    with pytest.raises(IntrospectionInputError, match=r"task='segmentation'.*\(N, C, H, W\).*output \(4, 3\)"):
        cb._update(torch.randn(4, 3), (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match="Expected `task` to be one of 'auto', 'multiclass'"):
        PerClassMetrics(task="semantic")


def test_a_unet_fit_logs_mean_iou_every_epoch_and_iou_per_class_at_the_snapshots(tmp_path: Any) -> None:
    pl.seed_everything(0, verbose=False)
    model, dm = Segmenter(TinyUNet()), shapes_dm()
    cb = PerClassMetrics(class_names=["background", "square", "disk"], on_error="raise")
    trainer = quick_trainer(tmp_path, [cb], epochs=3)
    trainer.fit(model, datamodule=dm)
    events = read_events(str(tmp_path))
    curve = dict(events["scalars"]["introspect/per_class/mean_iou"])
    assert len(curve) == 3  # one point per validation epoch, not only at the snapshots
    assert curve[trainer.global_step] == pytest.approx(cb.mean_iou["end"], abs=1e-6)
    for name in ("background", "square", "disk"):
        assert {0, trainer.global_step} <= {s for s, _ in events["scalars"][f"introspect/per_class/iou/{name}"]}
        assert f"introspect/per_class/dice/{name}" in events["scalars"]
    assert set(cb.snapshots) == {"start", "middle", "end"} and set(cb.mean_iou) == set(cb.snapshots)
    assert all(len(cb.snapshots[k]["iou"]) == 3 for k in cb.snapshots)
    assert cb.mean_iou["end"] > cb.mean_iou["start"]  # the U-Net learns the shapes
    assert "introspect/per_class/confusion" in events["images"]
    assert "Mean IoU" in cb.summary_markdown() and "### iou" in cb.table_markdown()
