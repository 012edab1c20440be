"""The text-input path of :class:`~lightning_introspect.callbacks.misclassifications.Misclassifications`: the
token ids kept per confidently wrong sample, their text (``decode``), and the ``top_wrong_text`` table with each
token coloured by its gradient x embedding score for the predicted class.

The scores are :func:`~lightning_introspect.methods.token_attribution.gradient_x_embedding`, the table
:func:`~lightning_introspect.render.review.wrong_sentences_markdown`; the callback decides when.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lightning_introspect.callbacks.data import split_batch
from lightning_introspect.callbacks.outputs import logits_only
from lightning_introspect.methods.token_attribution import gradient_x_embedding
from lightning_introspect.render.review import wrong_sentences_markdown

if TYPE_CHECKING:
    from lightning_introspect._lightning import pl
    from lightning_introspect.callbacks.misclassifications import Misclassifications
    from lightning_introspect.loggers.adapter import IntrospectionWriter

MAX_TOKENS = 128  # text inputs: the tokens of a wrong sample kept for its row in `top_wrong_text`

Decode = Callable[[list[int]], Any]

__all__ = ["MAX_TOKENS", "batch_tokens", "log_wrong_texts", "sample_text", "token_strings", "wrong_token_scores"]


def batch_tokens(batch: Any) -> torch.Tensor | None:
    """Text inputs' token ids ``(N, MAX_TOKENS)`` (padded with -1, longer texts cut), or ``None``."""
    try:
        x = split_batch(batch)[0]
    except ValueError:
        return None
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.dtype.is_floating_point or x.dtype == torch.bool:
        return None
    ids = x[:, :MAX_TOKENS].detach().long().cpu()
    return torch.nn.functional.pad(ids, (0, MAX_TOKENS - ids.shape[1]), value=-1)


def sample_text(decode: Decode | None, ids: Sequence[int]) -> str:
    """One text sample as shown: ``decode`` of its token ids (padding marks removed), else the ids."""
    ids = [int(i) for i in ids if int(i) >= 0]
    if decode is None:
        return " ".join(map(str, ids))
    text = decode(ids)
    return text if isinstance(text, str) else " ".join(map(str, text))


def token_strings(decode: Decode | None, ids: list[int]) -> list[str]:
    """One string per token: ``decode``'s list when it returns one item per id, else the ids."""
    if decode is not None:
        got = decode(ids)
        if not isinstance(got, str) and isinstance(got, Sequence) and len(got) == len(ids):
            return [str(t) for t in got]
    return [str(i) for i in ids]


def wrong_token_scores(
    model: Any, rows: list[list[int]], preds: list[int], output_transform: Callable[[Any], Any] | None
) -> list[torch.Tensor | None]:
    """Gradient x embedding of each wrong sentence for its predicted class (one call per sentence length, at
    the output of the embedding layer); ``None`` for a text cut at ``MAX_TOKENS`` (not the sentence the model
    saw). Raises what the model or the method raise when the model cannot be explained that way."""
    out: list[torch.Tensor | None] = [None] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(rows):
        if ids and len(ids) < MAX_TOKENS:
            by_length.setdefault(len(ids), []).append(i)
    with logits_only(model, output_transform):
        for length, members in by_length.items():
            sentences = torch.tensor([rows[i] for i in members], dtype=torch.long)
            target = torch.tensor([preds[i] for i in members], dtype=torch.long)
            scores = gradient_x_embedding(model, sentences, target)
            for j, i in enumerate(members):
                out[i] = scores[j, :length].cpu()
    return out


def log_wrong_texts(
    cb: Misclassifications, writer: IntrospectionWriter, pl_module: pl.LightningModule, report: dict[str, Any],
    tokens: torch.Tensor, names: list[str], step: int,
) -> None:
    """Write ``top_wrong_text`` for the wrong rows of ``report`` and add their ``wrong_texts`` and
    ``wrong_token_scores`` to it. Scores the model cannot give are left out (warned once; the table keeps
    its text) unless ``on_error="raise"``."""
    report["wrong_texts"] = texts = [sample_text(cb.decode, row.tolist()) for row in tokens]
    rows = [[int(i) for i in row.tolist() if int(i) >= 0] for row in tokens]
    scores: list[torch.Tensor | None] | None
    try:
        scores = wrong_token_scores(pl_module, rows, [int(r["pred"]) for r in report["wrong"]], cb.output_transform)
    except (ValueError, RuntimeError, IndexError) as err:
        if cb.on_error == "raise":
            raise
        cb.warn_once("token-scores", f"Misclassifications: the token scores of the wrong texts are left out: {err}")
        scores = None
    report["wrong_token_scores"] = [None if v is None else v.tolist() for v in scores] if scores is not None else None
    strings = [token_strings(cb.decode, ids) for ids in rows] if scores is not None else None
    writer.text(cb.tag("top_wrong_text"), wrong_sentences_markdown(report["wrong"], texts, names, tokens=strings, scores=scores), step)
