"""The segmentation review as a person reads it: a gallery of the images of lowest mean IoU (image, ground
truth, prediction, error map), markdown tables of those images, of errors at class boundaries vs in class
interiors, of mean IoU by image statistic and of IoU under perturbations, and a few plain-text lines
(tensors and numbers in, images and strings out; no logging, no Lightning).

Colours: class 0 (usually the background) is black, the other classes take matplotlib's ``tab10`` colours in
order (``tab20`` beyond 10 classes, then evenly spaced hues); pixels labelled ``ignore_index`` are cream
(:data:`IGNORED_COLOUR`, as void in the Pascal VOC masks).
In the error map, correct pixels are light grey and a wrong pixel shows both classes: its upper-left half
in the true class's colour (what was missed, a false negative of that class) and its lower-right half in
the predicted class's colour (a false positive of that class). Tiles too small to split a pixel show the
two colours as a checkerboard instead.

``report`` is :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications`' segmentation
report: ``worst`` rows ``{"index", "miou"}``, ``boundary`` as
:meth:`~lightning_introspect.methods.segmentation_review.SegmentationReviewBuffer.boundary_errors`,
``bins`` ``{statistic: {"edges", "counts", "miou"}}`` and ``perturbations`` ``{kind: {"strengths", "miou",
"per_class"}}``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_introspect.loggers.adapter import markdown_cell
from lightning_introspect.render.grid import captioned_grid
from lightning_introspect.render.review import display_images

_KIND_LABEL = {"blur": "blur sigma", "noise": "noise std", "color": "colour filter"}
CORRECT_GREY = 0.82  # correct pixels of the error map: light, so the coloured errors stand out
IGNORED_COLOUR = (0.88, 0.88, 0.75)  # ignored pixels: apart from the grey of correct ones and the white page
_TILE_PIXELS = 140  # about the size captioned_grid enlarges a tile to


@functools.lru_cache(maxsize=16)
def _palette(num_classes: int) -> tuple[tuple[float, float, float], ...]:
    import matplotlib

    if num_classes <= 11:
        colours = [matplotlib.colormaps["tab10"](i)[:3] for i in range(10)]
    elif num_classes <= 21:
        colours = [matplotlib.colormaps["tab20"](i)[:3] for i in range(20)]
    else:
        hsv = matplotlib.colormaps["hsv"]
        colours = [hsv(i / (num_classes - 1))[:3] for i in range(num_classes - 1)]
    return ((0.0, 0.0, 0.0), *((float(c[0]), float(c[1]), float(c[2])) for c in colours[: num_classes - 1]))


def class_palette(num_classes: int) -> torch.Tensor:
    """``(num_classes, 3)`` RGB colours in [0, 1]: class 0 black, the others ``tab10`` / ``tab20`` / hues.

    Example:
        >>> class_palette(3)[0].tolist(), class_palette(3).shape
        ([0.0, 0.0, 0.0], torch.Size([3, 3]))
    """
    if num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, but got {num_classes!r}.")
    return torch.tensor(_palette(int(num_classes)), dtype=torch.float32)


def _paint(masks: torch.Tensor, palette: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    ids = masks.long()
    ignored = ids == ignore_index if ignore_index is not None else torch.zeros_like(ids, dtype=torch.bool)
    rgb = palette[ids.clamp(0, palette.shape[0] - 1).masked_fill(ignored, 0)].permute(0, 3, 1, 2)
    cream = torch.tensor(IGNORED_COLOUR, dtype=rgb.dtype).view(1, 3, 1, 1)
    return torch.where(ignored.unsqueeze(1), cream, rgb)


def colorize_masks(masks: torch.Tensor, num_classes: int, *, ignore_index: int | None = None) -> torch.Tensor:
    """``(N, H, W)`` class ids -> ``(N, 3, H, W)`` RGB through :func:`class_palette` (``ignore_index`` cream).

    Example:
        >>> colorize_masks(torch.tensor([[[0, 1]]]), 2)[0, :, 0, 0].tolist()
        [0.0, 0.0, 0.0]
    """
    return _paint(masks, class_palette(num_classes), ignore_index)


def _enlarge(x: torch.Tensor, scale: int) -> torch.Tensor:
    return x if scale == 1 else F.interpolate(x, scale_factor=scale, mode="nearest")


def error_maps(
    masks: torch.Tensor, preds: torch.Tensor, num_classes: int, *, ignore_index: int | None = None, scale: int = 1
) -> torch.Tensor:
    """``(N, 3, H * scale, W * scale)`` error maps: correct pixels light grey, ignored ones cream, and each wrong
    pixel split between its true class's colour (upper-left: missed) and its predicted class's colour
    (lower-right: predicted there wrongly); with ``scale < 3`` the two alternate as a checkerboard.

    Example:
        >>> m = error_maps(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]), 2, scale=4)
        >>> m.shape, m[0, 0, 0, 0] == CORRECT_GREY  # a correct pixel
        (torch.Size([1, 3, 4, 8]), tensor(True))
        >>> palette = class_palette(2)  # the wrong pixel: true class 1 upper left, predicted class 0 lower right
        >>> torch.equal(m[0, :, 0, 4], palette[1]), torch.equal(m[0, :, 3, 7], palette[0])
        (True, True)
    """
    palette = class_palette(num_classes)
    true_rgb = _enlarge(_paint(masks, palette, ignore_index), scale)
    pred_rgb = _enlarge(_paint(preds, palette, None), scale)
    wrong = masks != preds
    if ignore_index is not None:
        wrong &= masks != ignore_index
    wrong = _enlarge(wrong.unsqueeze(1).float(), scale) > 0.5
    h, w = true_rgb.shape[-2:]
    rows = torch.arange(h).view(-1, 1)
    cols = torch.arange(w).view(1, -1)
    if scale >= 3:  # inside each pixel's block: above the anti-diagonal true, below it predicted
        upper = (rows % scale) + (cols % scale) < scale - 1
        upper |= ((rows % scale) + (cols % scale) == scale - 1) & (rows % scale < scale / 2)
    else:
        upper = (rows + cols) % 2 == 0
    out = torch.full_like(true_rgb, CORRECT_GREY)
    if ignore_index is not None:
        cream = torch.tensor(IGNORED_COLOUR, dtype=out.dtype).view(1, 3, 1, 1)
        out = torch.where(_enlarge((masks == ignore_index).unsqueeze(1).float(), scale) > 0.5, cream, out)
    errors = torch.where(upper.view(1, 1, h, w), true_rgb, pred_rgb)
    return torch.where(wrong, errors, out)


def _swatches(names: Sequence[str], height: int, width: int) -> torch.Tensor:
    palette = class_palette(len(names))
    return palette.view(-1, 3, 1, 1).expand(-1, 3, height, width).clone()


def segmentation_gallery(
    worst: Mapping[str, Any],
    names: Sequence[str],
    *,
    ignore_index: int | None = None,
    unnormalized: bool = False,
) -> Any:
    """One row per image of lowest mean IoU: image / ground truth / prediction / error map (see the module
    docstring for the colours), the index and mean IoU under the image, the share of wrong pixels under the
    error map, and a legend of the class colours at the bottom. HWC uint8.

    ``worst`` holds ``"index"``, ``"conf"`` (minus the mean IoU), ``"mask"``, ``"pred"`` ``(K, H, W)`` and
    ``"image"`` ``(K, C, H, W)`` or ``None`` (then the image column is left out).

    Example:
        >>> worst = {"index": torch.tensor([3]), "conf": torch.tensor([-0.5]), "image": torch.rand(1, 1, 8, 8),
        ...          "mask": torch.zeros(1, 8, 8, dtype=torch.long), "pred": torch.ones(1, 8, 8, dtype=torch.long)}
        >>> segmentation_gallery(worst, ["background", "thing"]).dtype
        dtype('uint8')
    """
    masks, preds = worst["mask"], worst["pred"]
    k, h, w = masks.shape
    n_classes = len(names)
    scale = max(1, round(_TILE_PIXELS / max(h, w)))
    truth = _enlarge(colorize_masks(masks, n_classes, ignore_index=ignore_index), scale)
    pred = _enlarge(colorize_masks(preds, n_classes), scale)
    errors = error_maps(masks, preds, n_classes, ignore_index=ignore_index, scale=scale)
    valid = masks != ignore_index if ignore_index is not None else torch.ones_like(masks, dtype=torch.bool)
    wrong_share = ((masks != preds) & valid).flatten(1).sum(1).double() / valid.flatten(1).sum(1).clamp_min(1).double()
    columns: list[torch.Tensor] = []
    image = worst.get("image")
    if image is not None:
        shown = display_images(image.float(), unnormalized=unnormalized)
        shown = shown.expand(-1, 3, -1, -1) if shown.shape[1] == 1 else shown[:, :3]
        columns.append(_enlarge(shown, scale))
    columns += [truth, pred, errors]
    ncol = len(columns)
    tiles: list[torch.Tensor] = []
    captions: list[str] = []
    for i in range(k):
        head = f"#{int(worst['index'][i])}  mIoU {-float(worst['conf'][i]):.2f}"
        labels = ([head] if image is not None else []) + [
            "ground truth" if image is not None else f"{head}\nground truth",
            "prediction",
            f"errors ({float(wrong_share[i]):.0%} of pixels)",
        ]
        tiles += [col[i] for col in columns]
        captions += labels
    legend = _swatches(names, int(truth.shape[-2]), int(truth.shape[-1]))
    for j, name in enumerate(names):
        tiles.append(legend[j])
        captions.append(str(name))
    pad = (-len(tiles)) % ncol
    tiles += [torch.ones_like(truth[0])] * pad
    captions += [""] * pad
    how = "upper-left: true class, lower-right: predicted" if scale >= 3 else "checkered true / predicted class"
    return captioned_grid(torch.stack(tiles), captions, nrow=ncol, title=f"lowest mean IoU first; errors {how}")


def worst_markdown(rows: Sequence[Mapping[str, Any]], mean_miou: float, n: int) -> str:
    """The mean of the images' mean IoU and the images of lowest mean IoU (``{"index", "miou"}``) as markdown.

    Example:
        >>> print(worst_markdown([{"index": 7, "miou": 0.25}], 0.8, 40))
        Mean IoU per image 0.800 on average over 40 validation images.
        <BLANKLINE>
        | rank | index | mean IoU |
        |---|---|---|
        | 1 | 7 | 0.250 |
    """
    lines = [f"Mean IoU per image {mean_miou:.3f} on average over {n} validation images.", ""]
    if not rows:
        return "\n".join(lines + ["No image reviewed."])
    lines += ["| rank | index | mean IoU |", "|---|---|---|"]
    lines += [f"| {r + 1} | {row['index']} | {row['miou']:.3f} |" for r, row in enumerate(rows)]
    return "\n".join(lines)


def _rate(value: float | None, pixels: int) -> str:
    return "no pixels" if value is None else f"{value:.1%} (n={pixels})"


def boundary_markdown(boundary: Mapping[str, Any], names: Sequence[str]) -> str:
    """Per true class: the error rate at class boundaries and in interiors, and the class it is most often
    mistaken for in each; then the most confused ``(true, predicted)`` pairs of each region.

    Example:
        >>> b = {"width": 2, "boundary_error": [0.1, 0.4], "interior_error": [0.0, 0.05],
        ...      "boundary_pixels": [50, 40], "interior_pixels": [200, 60], "boundary_confused_with": [1, 0],
        ...      "interior_confused_with": [None, 0], "overall": {"boundary": 0.23, "interior": 0.01},
        ...      "confusions": {"boundary": [{"true": 1, "pred": 0, "pixels": 16, "share": 0.4}], "interior": []}}
        >>> print(boundary_markdown(b, ["bg", "cat"]).splitlines()[5])
        | cat | 40.0% (n=40) | 5.0% (n=60) | bg | bg |
    """
    overall = boundary["overall"]
    lines = [
        f"Pixels within {boundary['width']} px of a class change in the true mask are *boundary*, the rest "
        f"*interior*. Error rate at boundaries {_rate(overall['boundary'], sum(boundary['boundary_pixels']))}, "
        f"in interiors {_rate(overall['interior'], sum(boundary['interior_pixels']))}.",
        "",
        "| class | boundary error | interior error | mistaken for (boundary) | mistaken for (interior) |",
        "|---|---|---|---|---|",
    ]

    def other(c: int | None) -> str:
        return "-" if c is None else markdown_cell(names[c], max_chars=48)

    for c, name in enumerate(names):
        lines.append(
            f"| {markdown_cell(name, max_chars=48)} | {_rate(boundary['boundary_error'][c], boundary['boundary_pixels'][c])} | "
            f"{_rate(boundary['interior_error'][c], boundary['interior_pixels'][c])} | "
            f"{other(boundary['boundary_confused_with'][c])} | {other(boundary['interior_confused_with'][c])} |"
        )
    for region in ("boundary", "interior"):
        pairs = boundary["confusions"][region]
        text = "; ".join(
            f"{names[p['true']]} -> {names[p['pred']]} {p['pixels']} px ({p['share']:.1%} of its {region} pixels)"
            for p in pairs
        )
        lines += ["", f"**Most confused ({region}):** {text or 'none'}."]
    return "\n".join(lines)


def miou_statistics_markdown(bins: Mapping[str, Mapping[str, Any]], overall: float) -> str:
    """Mean IoU per image, averaged in each quantile bin of each statistic, as a markdown table.

    Example:
        >>> bins = {"sharpness": {"edges": [0.0, 1.0, 2.0], "counts": [5, 5], "miou": [0.4, 0.8]}}
        >>> print(miou_statistics_markdown(bins, 0.6).splitlines()[-1])
        **Finding:** the lowest mean IoU is in sharpness q1 of 2 (lowest values), values [0, 1]: 0.400 vs 0.600 overall.
    """
    width = max((len(b["miou"]) for b in bins.values()), default=0)
    lines = [f"Mean IoU per image {overall:.3f} overall. Bins are quantiles, q1 = lowest values.", ""]
    lines.append("| statistic | " + " | ".join(f"q{i + 1}" for i in range(width)) + " | worst - overall |")
    lines.append("|---" * (width + 2) + "|")
    worst: tuple[float, str] | None = None
    for stat, b in bins.items():
        cells = []
        for i in range(width):
            if i < len(b["miou"]) and b["miou"][i] is not None:
                cells.append(f"{b['miou'][i]:.3f} (n={b['counts'][i]}, [{b['edges'][i]:.3g}, {b['edges'][i + 1]:.3g}])")
            else:
                cells.append("-")
        values = [(v, i) for i, v in enumerate(b["miou"]) if v is not None]
        gap = f"{min(values)[0] - overall:+.3f}" if values else "-"
        lines.append(f"| {stat} | " + " | ".join(cells) + f" | {gap} |")
        for v, i in values:
            if b["counts"][i] >= 5 and (worst is None or v < worst[0]):
                n = len(b["miou"])
                side = " (lowest values)" if i == 0 else " (highest values)" if i == n - 1 else ""
                worst = (v, f"{stat} q{i + 1} of {n}{side}, values [{b['edges'][i]:.3g}, {b['edges'][i + 1]:.3g}]")
    if worst is not None:
        lines += ["", f"**Finding:** the lowest mean IoU is in {worst[1]}: {worst[0]:.3f} vs {overall:.3f} overall."]
    return "\n".join(lines)


def iou_perturbation_markdown(results: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """Mean IoU and per-class IoU under each perturbation and strength, as a markdown table.

    Example:
        >>> res = {"blur": {"strengths": [0.0, 1.0], "miou": [0.8, 0.5], "per_class": [[0.9, 0.7], [0.8, 0.2]]}}
        >>> print(iou_perturbation_markdown(res, ["bg", "cat"]).splitlines()[-1])
        **blur:** class cat breaks most (IoU -0.50 at strength 1).
    """
    columns = ["clean"]
    cells: list[list[Any]] = []
    first = next(iter(results.values()))
    cells.append([first["miou"][0], *first["per_class"][0]])
    for kind, res in results.items():
        for s, miou, per in zip(res["strengths"][1:], res["miou"][1:], res["per_class"][1:]):
            columns.append(f"{_KIND_LABEL.get(kind, kind)} {s:g}")
            cells.append([miou, *per])
    lines = ["IoU per class (pixels pooled over the fixed validation subset) and their mean.", "",
             "| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, label in enumerate(["mean IoU", *names]):
        lines.append(
            f"| {markdown_cell(label, max_chars=48)} | "
            + " | ".join("no pixels" if col[row] is None else f"{col[row]:.2f}" for col in cells) + " |"
        )
    for kind, res in results.items():
        clean, worst = res["per_class"][0], res["per_class"][-1]
        pairs = [(c - w, n) for n, c, w in zip(names, clean, worst) if c is not None and w is not None]
        if pairs and len(res["strengths"]) > 1:
            drop, name = max(pairs)
            lines.append(f"\n**{kind}:** class {name} breaks most (IoU -{drop:.2f} at strength {res['strengths'][-1]:g}).")
    return "\n".join(lines)


def segmentation_summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A few plain-text lines on one segmentation review: mean IoU, the worst image, boundary vs interior
    errors, mean IoU under each perturbation."""
    out = [f"epoch {report['epoch']}: mean IoU per image {report['miou']:.3f} on {report['num_samples']} images"]
    if report["worst"]:
        row = report["worst"][0]
        out.append(f"lowest: image {row['index']} (mean IoU {row['miou']:.3f})")
    overall = report.get("boundary", {}).get("overall")
    if overall and overall["boundary"] is not None and overall["interior"] is not None:
        out.append(f"pixel error at class boundaries {overall['boundary']:.1%}, in interiors {overall['interior']:.1%}")
    for kind, res in report["perturbations"].items():
        out.append(
            f"{kind}: mean IoU " + " -> ".join("-" if v is None else f"{v:.2f}" for v in res["miou"])
            + f" at strengths {', '.join(f'{s:g}' for s in res['strengths'])}"
        )
    return out
