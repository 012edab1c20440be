"""Token scores as a person reads them in TensorBoard's text dashboard: sentences with coloured tokens,
and the top tokens per class.

TensorBoard renders a text summary as markdown (tables included) and keeps only a small set of HTML tags
(paragraphs, tables, ``<strong>``, ``<em>``, ``<code>``, links, images with http(s) sources), with no
``style`` or ``class`` attribute: a token's background cannot be coloured. The colour is therefore a
coloured square character before each token, which every browser draws in colour, and the strongest
tokens are also bold:

* unsigned scores (saliency): ``⬜`` below 25 % of the largest score, ``🟨`` below 50 %, ``🟧`` below
  75 %, ``🟥`` and **bold** from 75 % on (white -> yellow -> orange -> red: more is hotter);
* signed scores (input x gradient, integrated gradients, LRP): ``⬜`` for ``|score|`` below 25 % of the
  largest ``|score|``, ``🟥`` for a score for the explained class, ``🟦`` for one against it (as the
  ``bwr`` colormap of the image grids), **bold** from 75 % on.

Pure: tensors, strings and numbers in, markdown strings out (no logging, no Lightning).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "NORMALIZE_CHOICES",
    "token_colour",
    "token_legend",
    "token_line",
    "token_sentences_markdown",
    "token_strings",
    "top_tokens_markdown",
]

NORMALIZE_CHOICES = ("per_map", "per_batch")
_UNSIGNED = ("⬜", "🟨", "🟧", "🟥")
_ZERO, _POSITIVE, _NEGATIVE = "⬜", "🟥", "🟦"
_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|~")


def token_strings(ids: torch.Tensor, decode: Callable[[list[int]], Sequence[str]] | None = None) -> list[list[str]]:
    """One string per token: ``decode(ids_of_one_sentence)`` (a list with one string per id, such as a
    tokenizer's ``convert_ids_to_tokens``), or the ids themselves.

    Raises:
        ValueError: ``decode`` does not return one string per token (e.g. it returns the joined sentence).

    Example:
        >>> token_strings(torch.tensor([[3, 1]]))
        [['3', '1']]
        >>> token_strings(torch.tensor([[0, 1]]), lambda ids: ["ab"[i] for i in ids])
        [['a', 'b']]
    """
    rows = ids.detach().cpu().long().tolist()
    if decode is None:
        return [[str(i) for i in row] for row in rows]
    out = []
    for row in rows:
        got = decode(row)
        if isinstance(got, str) or not isinstance(got, Sequence) or len(got) != len(row):
            raise ValueError(
                "Expected `decode` to map a list of token ids to a list with one string per id (like a tokenizer's "
                f"convert_ids_to_tokens), but for {len(row)} ids it returned {_describe(got)}."
            )
        out.append([str(t) for t in got])
    return out


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f"one string {value[:40]!r}"
    return f"{len(value)} items" if isinstance(value, Sequence) else type(value).__name__


def _escape(token: str) -> str:
    """A token as literal text in markdown: HTML and markdown syntax escaped, whitespace made visible."""
    token = token.replace("\n", "⏎").replace("\t", "⇥")
    if not token.strip():
        return "␣" * max(1, len(token))
    token = html.escape(token, quote=False)
    return "".join("\\" + c if c in _MARKDOWN_SPECIAL else c for c in token)


def token_colour(score: float, scale: float, *, signed: bool) -> tuple[str, bool]:
    """The square and whether the token is bold, for ``score`` against the largest ``scale``.

    Example:
        >>> token_colour(0.9, 1.0, signed=False), token_colour(-0.5, 1.0, signed=True), token_colour(0.1, 1.0, signed=True)
        (('🟥', True), ('🟦', False), ('⬜', False))
    """
    level = abs(score) / scale if scale > 0 else 0.0
    strong = level >= 0.75
    if not signed:
        return _UNSIGNED[min(3, int(level * 4))], strong
    if level < 0.25:
        return _ZERO, False
    return (_POSITIVE if score > 0 else _NEGATIVE), strong


def token_legend(signed: bool) -> str:
    """One line saying what the squares mean.

    Example:
        >>> token_legend(True)
        '🟥 for the explained class, 🟦 against it, ⬜ below 25 % of the largest |score|; **bold**: from 75 % on.'
    """
    if signed:
        return f"{_POSITIVE} for the explained class, {_NEGATIVE} against it, {_ZERO} below 25 % of the largest |score|; **bold**: from 75 % on."
    return "⬜ < 25 % of the largest score ≤ 🟨 < 50 % ≤ 🟧 < 75 % ≤ 🟥 (**bold**)."


def token_line(tokens: Sequence[str], scores: torch.Tensor, *, signed: bool) -> str:
    """One sentence as a single line of coloured tokens (each scaled by the sentence's largest ``|score|``;
    colours and bold as in the module docstring), for a markdown table cell.

    Example:
        >>> token_line(["the", "good", "film"], torch.tensor([0.0, 1.0, -0.4]), signed=True)
        '⬜the 🟥**good** 🟦film'
    """
    values = scores.detach().float().cpu().reshape(-1)
    scale = float(values.abs().max()) if values.numel() else 0.0
    words = []
    for token, value in zip(tokens, values.tolist()):
        square, strong = token_colour(value, scale, signed=signed)
        text = _escape(token)
        words.append(f"{square}**{text}**" if strong else f"{square}{text}")
    return " ".join(words)


def token_sentences_markdown(
    tokens: Sequence[Sequence[str]],
    scores: torch.Tensor,
    *,
    signed: bool,
    captions: Sequence[str] | None = None,
    keep: torch.Tensor | None = None,
    normalize: str = "per_map",
    title: str = "",
) -> str:
    """Each sentence with every token coloured by its score (see the module docstring), one paragraph per
    sample, under a title and a legend.

    Args:
        tokens: one string per token, per sample (:func:`token_strings`).
        scores: ``(N, T)`` token scores.
        signed: scores of both signs (diverging colours) or not.
        captions: a line per sample shown before its sentence (true / predicted / explained class ...).
        keep: ``(N, T)`` bool: the tokens to show (padding hidden); all when ``None``.
        normalize: ``"per_map"`` (each sentence against its own largest score) or ``"per_batch"`` (one scale
            for all, so sentences compare).
        title: a bold first line.

    Example:
        >>> text = token_sentences_markdown([["the", "good", "film"]], torch.tensor([[0.0, 1.0, -0.4]]), signed=True)
        >>> text.splitlines()[-1]
        '⬜the 🟥**good** 🟦film'
    """
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"Expected `normalize` to be one of {', '.join(repr(c) for c in NORMALIZE_CHOICES)}, but got {normalize!r}.")
    values = scores.detach().float().cpu()
    shown = torch.ones_like(values, dtype=torch.bool) if keep is None else keep.detach().cpu().bool()
    magnitude = values.abs().masked_fill(~shown, 0.0)
    batch_scale = float(magnitude.max()) if magnitude.numel() else 0.0
    lines = ([f"**{title}**", ""] if title else []) + [token_legend(signed)]
    for i, row in enumerate(tokens):
        scale = float(magnitude[i].max()) if normalize == "per_map" and magnitude[i].numel() else batch_scale
        words = []
        for t, token in enumerate(row):
            if not bool(shown[i, t]):
                continue
            square, strong = token_colour(float(values[i, t]), scale, signed=signed)
            text = _escape(token)
            words.append(f"{square}**{text}**" if strong else f"{square}{text}")
        head = f"**#{i}** {_escape_caption(captions[i])}" if captions is not None else f"**#{i}**"
        lines += ["", head + "  ", " ".join(words) if words else "*(no tokens shown)*"]
    return "\n".join(lines)


def _escape_caption(caption: str) -> str:
    return html.escape(caption.replace("\n", " · "), quote=False)


def top_tokens_markdown(
    ids: torch.Tensor,
    tokens: Sequence[Sequence[str]],
    scores: torch.Tensor,
    classes: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    k: int = 8,
) -> str:
    """The tokens with the highest mean score per class, as a markdown table.

    For each class (in the order of first appearance in ``classes``, the class each sample is explained
    for) the scores of every occurrence of a token id in that class's samples are averaged; the ``k``
    ids with the highest mean are listed with their mean and number of occurrences.

    Args:
        ids: ``(N, T)`` token ids.
        tokens: their strings (:func:`token_strings`).
        scores: ``(N, T)`` token scores.
        classes: ``(N,)`` the class each sample is explained for.
        keep: ``(N, T)`` bool: the tokens to count (padding left out); all when ``None``.
        class_names: names of the classes (default: their ids).
        k: tokens per class.

    Example:
        >>> ids = torch.tensor([[1, 2, 1], [3, 2, 0]])
        >>> strings = [["a", "b", "a"], ["c", "b", "<pad>"]]
        >>> keep = ids != 0
        >>> print(top_tokens_markdown(ids, strings, torch.tensor([[0.5, 0.1, 0.3], [0.2, 0.4, 9.0]]), torch.tensor([1, 1]), keep=keep, k=2))
        | class | top tokens: mean score (occurrences) |
        |---|---|
        | 1 | a 0.4 (2), b 0.25 (2) |
    """
    values = scores.detach().float().cpu()
    id_rows = ids.detach().cpu().long()
    shown = torch.ones_like(id_rows, dtype=torch.bool) if keep is None else keep.detach().cpu().bool()
    names: dict[int, str] = {}
    for i, row in enumerate(tokens):
        for t, token in enumerate(row):
            names.setdefault(int(id_rows[i, t]), token)
    lines = ["| class | top tokens: mean score (occurrences) |", "|---|---|"]
    order: list[int] = []
    for c in classes.detach().cpu().long().tolist():
        if c not in order:
            order.append(c)
    for c in order:
        rows = classes.detach().cpu().long() == c
        picked_ids = id_rows[rows][shown[rows]]
        picked = values[rows][shown[rows]]
        if not picked_ids.numel():
            continue
        unique, inverse = picked_ids.unique(return_inverse=True)
        counts = torch.bincount(inverse, minlength=len(unique)).float()
        means = torch.zeros(len(unique)).index_add_(0, inverse, picked) / counts
        best = means.argsort(descending=True, stable=True)[:k]
        cells = ", ".join(f"{_escape(names[int(unique[j])])} {float(means[j]):.3g} ({int(counts[j])})" for j in best)
        label = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        lines.append(f"| {_escape(label)} | {cells} |")
    return "\n".join(lines)
