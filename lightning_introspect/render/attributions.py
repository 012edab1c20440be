"""Attribution maps as a person reads them: overlays, captions, feature bar charts and notes on NaN / Inf.

Pure: tensors and numbers in, images, matplotlib figures and strings out (no logging, no Lightning).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_introspect.methods.attribution_runs import FAITHFULNESS_REFERENCES
from lightning_introspect.render.heatmap import colorize, normalize_maps, overlay, to_display
from lightning_introspect.render.plot import Chart


def class_label(c: int, class_names: Sequence[str] | None) -> str:
    """The name of class ``c``, or its id when no name is given.

    Example:
        >>> class_label(1, ["cat", "dog"]), class_label(5, ["cat", "dog"]), class_label(2, None)
        ('dog', '5', '2')
    """
    return class_names[c] if class_names is not None and c < len(class_names) else str(c)


def attribution_captions(
    predicted: torch.Tensor,
    explained: torch.Tensor,
    confidence: torch.Tensor,
    labels: torch.Tensor | None,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """One caption per sample: the true class (when labels are known), the prediction, the explained
    class and the model's probability for it.

    Example:
        >>> attribution_captions(torch.tensor([1]), torch.tensor([0]), torch.tensor([0.25]), torch.tensor([0]), ["cat", "dog"])
        ['true cat pred dog\\nexpl cat p=0.25']
    """
    return [
        (f"true {class_label(int(labels[i]), class_names)} " if labels is not None else "")
        + f"pred {class_label(int(predicted[i]), class_names)}\n"
        + f"expl {class_label(int(explained[i]), class_names)} p={float(confidence[i]):.2f}"
        for i in range(len(predicted))
    ]


def region_captions(
    class_ids: torch.Tensor,
    samples: torch.Tensor,
    areas: torch.Tensor,
    confidence: torch.Tensor,
    source: str,
    class_names: Sequence[str] | None = None,
) -> list[str]:
    """One caption per explained region (segmentation): the sample, the explained class, which mask the
    region comes from and its size, and the model's mean probability for the class over it.

    Example:
        >>> region_captions(torch.tensor([2]), torch.tensor([5]), torch.tensor([34]), torch.tensor([0.9]), "pred", ["bg", "sq", "disc"])
        ['#5 disc\\npred region 34 px p=0.90']
    """
    return [
        f"#{int(i)} {class_label(int(c), class_names)}\n{source} region {int(a)} px p={float(p):.2f}"
        for c, i, a, p in zip(class_ids.tolist(), samples.tolist(), areas.tolist(), confidence.tolist())
    ]


def outline_regions(images: torch.Tensor, masks: torch.Tensor, color: Sequence[float] = (0.0, 1.0, 1.0)) -> torch.Tensor:
    """``images`` ``(N, 3, H, W)`` in [0, 1] with the one-pixel border of each bool region ``masks``
    ``(N, H, W)`` drawn in ``color`` (cyan: apart from every heat-map colormap's ends), so a tile shows which
    region it explains. Masks of another size are resized (nearest) first.

    Example:
        >>> mask = torch.zeros(1, 5, 5, dtype=torch.bool); mask[0, 1:4, 1:4] = True
        >>> out = outline_regions(torch.zeros(1, 3, 5, 5), mask)
        >>> out[0, 1].long().tolist()[2]
        [0, 1, 0, 1, 0]
    """
    import torch.nn.functional as F

    m = masks.float().unsqueeze(1)
    if m.shape[-2:] != images.shape[-2:]:
        m = F.interpolate(m, size=images.shape[-2:], mode="nearest")
    inside = 1.0 - F.max_pool2d(1.0 - m, 3, stride=1, padding=1)  # eroded by one pixel
    border = (m - inside) > 0.5
    paint = torch.tensor(list(color), dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return torch.where(border, paint.expand_as(images), images)


def localization_markdown(scores: Mapping[str, Mapping[str, Any]], step: int) -> str:
    """The localisation scores of one run as a markdown table (method x pointing game / energy / chance), with
    a note on the regions left out because their class is not in the true mask.

    Example:
        >>> row = {"pointing_game": 0.75, "energy_in_mask": 0.5, "chance": 0.1, "pairs": 4, "skipped": 1}
        >>> print(localization_markdown({"saliency": row}, 7))
        **Localisation at step 7** (each true object's class explained for its whole-image score; the map against the object's true mask; chance = the mask's area fraction)
        <BLANKLINE>
        | method | pointing game | energy in mask | chance | regions scored |
        |---|---|---|---|---|
        | saliency | 0.750 | 0.500 | 0.100 | 4 |
        <BLANKLINE>
        1 sample(s) left out: their true mask shows no object (only the background), so there is nothing to point at.
    """

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"**Localisation at step {step}** (each true object's class explained for its whole-image score; the map "
        "against the object's true mask; chance = the mask's area fraction)",
        "",
        "| method | pointing game | energy in mask | chance | regions scored |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {fmt(r['pointing_game'])} | {fmt(r['energy_in_mask'])} | {fmt(r['chance'])} | {r['pairs']} |"
        for m, r in scores.items()
    ]
    skipped = max((int(r["skipped"]) for r in scores.values()), default=0)
    if skipped:
        lines += ["", f"{skipped} sample(s) left out: their true mask shows no object (only the background), so there is nothing to point at."]
    return "\n".join(lines)



def _against(row: Mapping[str, float], ref: Mapping[str, float] | None) -> str:
    """``better`` (removing its top pixels hurts more and inserting them helps more than the reference's),
    ``worse`` (both the other way), ``mixed``, or ``n/a``."""
    if ref is None:
        return "n/a"
    deletes, inserts = row["deletion_auc"] < ref["deletion_auc"], row["insertion_auc"] > ref["insertion_auc"]
    return "better" if deletes and inserts else "worse" if not (deletes or inserts) else "mixed"


def faithfulness_markdown(scores: Mapping[str, Mapping[str, float]], step: int, *, steps: int, baseline: str, score: str) -> str:
    """The deletion / insertion areas of one run as a markdown table: each method, how it compares with the
    random map and the edge detector, and the two references.

    Args:
        scores: ``{name: {"deletion_auc", "insertion_auc"}}`` with the references under ``"random"`` / ``"edges"``.
        step: the global step of the run.
        steps: removal steps per curve.
        baseline: what removed pixels became.
        score: what the curve follows, in words (e.g. "the explained class's probability").

    Example:
        >>> rows = {"saliency": {"deletion_auc": 0.2, "insertion_auc": 0.7}, "random": {"deletion_auc": 0.5, "insertion_auc": 0.5}}
        >>> print(faithfulness_markdown(rows, 3, steps=20, baseline="blur", score="the explained class's probability"))  # doctest: +NORMALIZE_WHITESPACE
        **Faithfulness at step 3**: the explained class's probability as the pixels are removed in the map's order, most important first, replaced by the blur baseline (deletion: lower is better), and put back on the baseline in the same order (insertion: higher is better); 20 steps, area over the fraction 0..1.
        <BLANKLINE>
        | map | deletion AUC | insertion AUC | vs random | vs edges |
        |---|---|---|---|---|
        | saliency | 0.200 | 0.700 | better | n/a |
        | random (reference) | 0.500 | 0.500 | | |
        <BLANKLINE>
        A method no better than the edge detector explains the image, not the model; one no better than random explains nothing.
    """
    lines = [
        f"**Faithfulness at step {step}**: {score} as the pixels are removed in the map's order, most important first, "
        f"replaced by the {baseline} baseline (deletion: lower is better), and put back on the baseline in the same order "
        f"(insertion: higher is better); {steps} steps, area over the fraction 0..1.",
        "",
        "| map | deletion AUC | insertion AUC | vs random | vs edges |",
        "|---|---|---|---|---|",
    ]
    refs = {name: scores.get(name) for name in FAITHFULNESS_REFERENCES}
    for name, row in scores.items():
        if name in FAITHFULNESS_REFERENCES:
            continue
        against = " | ".join(_against(row, refs[r]) for r in FAITHFULNESS_REFERENCES)
        lines.append(f"| {name} | {row['deletion_auc']:.3f} | {row['insertion_auc']:.3f} | {against} |")
    lines += [f"| {name} (reference) | {r['deletion_auc']:.3f} | {r['insertion_auc']:.3f} | | |" for name, r in refs.items() if r is not None]
    lines += ["", "A method no better than the edge detector explains the image, not the model; one no better than random explains nothing."]
    return "\n".join(lines)


def display_inputs(x: torch.Tensor, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
    """Images ``(N, C, H, W)`` ready to show under a heat map: un-normalised with ``mean`` / ``std`` (else
    min-max scaled per image), and averaged to one channel unless they have 1 or 3.

    Example:
        >>> display_inputs(torch.rand(2, 4, 5, 5)).shape
        torch.Size([2, 1, 5, 5])
    """
    disp = to_display(x, mean=None if mean is None else tuple(mean), std=None if std is None else tuple(std))
    return disp if disp.shape[1] in (1, 3) else disp.mean(dim=1, keepdim=True)


def attribution_overlays(
    display: torch.Tensor,
    maps: torch.Tensor,
    *,
    signed: bool,
    normalize: str = "per_map",
    colormap: str = "inferno",
    signed_colormap: str = "bwr",
    alpha: float = 0.5,
) -> torch.Tensor:
    """Heat maps of ``maps`` ``(N, C, H, W)`` (channels summed; signed maps keep their sign) laid over
    the ``display`` images.

    Args:
        display: images in [0, 1], as :func:`display_inputs` gives them.
        maps: the attribution maps, one per image.
        signed: a signed method: diverging ``signed_colormap`` centred on 0, else ``colormap``.
        normalize: ``"per_map"`` or ``"per_batch"`` (see :func:`~lightning_introspect.render.heatmap.normalize_maps`).
        colormap: matplotlib colormap of unsigned maps.
        signed_colormap: matplotlib colormap of signed maps.
        alpha: opacity of the heat map.

    Returns:
        ``(N, 3, H, W)`` images in [0, 1].

    Example:
        >>> attribution_overlays(torch.rand(2, 1, 4, 4), torch.randn(2, 3, 4, 4), signed=True).shape
        torch.Size([2, 3, 4, 4])
    """
    heat2d = maps.float().sum(dim=1)
    norm = normalize_maps(heat2d, mode=normalize, signed=signed)
    heat = colorize(norm, cmap=signed_colormap if signed else colormap, signed=signed)
    return overlay(display, heat, alpha=alpha)


def feature_bar_chart(maps: torch.Tensor, *, title: str, max_features: int = 40, feature_names: Sequence[str] | None = None) -> Chart:
    """Mean ``|attribution|`` per feature of tabular maps ``(N, F)`` as a bar chart (the ``max_features``
    strongest features, in feature order, when there are more), each bar labelled with its name from
    ``feature_names`` (its index where no name is given).

    Example:
        >>> chart = feature_bar_chart(torch.tensor([[1.0, -3.0]]), title="saliency", feature_names=["age", "income"])
        >>> [name for _, name in chart.panels[0].xticks], chart.panels[0].series[0].y
        (['age', 'income'], (1.0, 3.0))
    """
    importance = maps.detach().float().abs().mean(dim=0)
    idx = torch.arange(importance.numel())
    if importance.numel() > max_features:
        idx = importance.topk(max_features).indices.sort().values
    chart = Chart(title=title, xlabel="feature", width=int(100 * max(3.0, 0.25 * idx.numel() + 1.0)), panel_height=150,
                  legend=False)
    panel = chart.panel(ylabel="mean |attribution|", xticks=[(i, class_label(int(f), feature_names)) for i, f in enumerate(idx)])
    panel.bars(range(idx.numel()), importance[idx].tolist(), color="#4c72b0")
    return chart


def grid_list(grids: Sequence[str], class_counts: Mapping[str, int]) -> str:
    """Name grids for a person: a method whose main and per-class grids are all listed is named once.

    Args:
        grids: ``<method>`` / ``<method>/class_<label>`` names.
        class_counts: ``{method: number of per-class grids}`` for every method, in display order.

    Example:
        >>> grid_list(["saliency", "saliency/class_3", "lrp/class_3"], {"saliency": 1, "lrp": 1})
        'saliency (all grids), lrp/class_3'
    """
    names: list[str] = []
    for m, n_classes in class_counts.items():
        own = [g for g in grids if g == m or g.startswith(f"{m}/class_")]
        every = 1 + n_classes
        names += [f"{m} (all grids)"] if every > 1 and len(own) == every else own
    return ", ".join(names)


def nonfinite_what(broken: Sequence[str], class_counts: Mapping[str, int], n: int) -> str:
    """What held NaN / Inf, in words: the model's outputs on the ``n`` samples and / or the maps of grids.

    Example:
        >>> nonfinite_what(["outputs", "lrp"], {"lrp": 0}, 8)
        "the model's outputs on the 8 fixed samples and the maps of lrp"
    """
    grids = [b for b in broken if b != "outputs"]
    return " and ".join(
        ([f"the model's outputs on the {n} fixed samples"] if "outputs" in broken else [])
        + ([f"the maps of {grid_list(grids, class_counts)}"] if grids else [])
    )



def attribution_summary_lines(history: Sequence[Mapping[str, Any]], methods: Sequence[str], cam_layer: str | None) -> list[str]:
    """A few plain-text lines on the runs: how many, of which methods, the Grad-CAM layer, and the latest
    run's time and mean confidence in the explained class.

    Example:
        >>> attribution_summary_lines([{"explained": [1, 2], "confidence": [0.5, 0.7], "seconds": 0.2}], ["saliency"], None)
        ['1 logs of saliency on 2 fixed samples', 'last run 0.20 s; mean confidence in the explained class 0.60']
    """
    if not history:
        return ["no attribution maps logged"]
    last = history[-1]
    n = len(last["explained"])
    on = f"{n} class regions of {len(set(last['samples']))} fixed samples" if "samples" in last else f"{n} fixed samples"
    lines = [f"{len(history)} logs of {', '.join(methods) or 'no methods'} on {on}"]
    if cam_layer is not None:
        lines.append(f"Grad-CAM layer {cam_layer}")
    lines.append(f"last run {last['seconds']:.2f} s; mean confidence in the explained class {sum(last['confidence']) / max(n, 1):.2f}")
    scored = {m: r for m, r in last.get("localization", {}).items() if r.get("pointing_game") is not None}
    if scored:
        lines.append("localisation (pointing game / energy in mask / chance): " + "; ".join(
            f"{m} {r['pointing_game']:.2f} / {r['energy_in_mask']:.2f} / {r['chance']:.2f}" for m, r in scored.items()
        ))
    faithful = last.get("faithfulness") or {}
    if faithful:
        lines.append("faithfulness (deletion AUC, lower better / insertion AUC, higher better): " + "; ".join(
            f"{m} {r['deletion_auc']:.2f} / {r['insertion_auc']:.2f}" for m, r in faithful.items()
        ))
    rise = last.get("emprt") or {}
    if rise:
        lines.append("eMPRT (map entropy rise under full randomisation, higher better): " + "; ".join(f"{m} {v:.2f}" for m, v in rise.items()))
    return lines


__all__ = [
    "faithfulness_markdown",
    "localization_markdown",
    "outline_regions",
    "region_captions",
    "attribution_captions",
    "attribution_overlays",
    "attribution_summary_lines",
    "class_label",
    "display_inputs",
    "feature_bar_chart",
    "grid_list",
    "nonfinite_what",
]
