"""Misclassifications on text: each confidently wrong sentence with its tokens coloured by gradient x embedding
for the predicted class, the same scores as a direct call of the method."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.methods.token_attribution import gradient_x_embedding
from lightning_introspect.render.review import wrong_sentences_markdown
from tests.helpers import quick_trainer, read_events
from tests.zoo import Classifier, TransformerText, tokens_dm

WORDS = [f"w{i}" for i in range(60)]


def _fit(tmp_path: Any, callbacks: list[Any]) -> Classifier:
    pl.seed_everything(0, verbose=False)
    model, dm = Classifier(TransformerText()), tokens_dm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick_trainer(tmp_path, callbacks, epochs=1).fit(model, datamodule=dm)
    return model


def test_the_wrong_texts_carry_the_scores_of_a_direct_call_and_training_is_unchanged(tmp_path: Any) -> None:
    plain = _fit(tmp_path / "plain", [])
    cb = Misclassifications(top_k=6, decode=lambda ids: [WORDS[i] for i in ids], at=None, on_error="raise")
    model = _fit(tmp_path / "watched", [cb])
    for key, value in plain.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), f"{key} differs"
    report = cb.report
    assert report is not None and report["wrong"], "a one-epoch text model makes mistakes"
    val_ids = tokens_dm().val_dataloader().dataset.tensors[0]
    ids = val_ids[[row["index"] for row in report["wrong"]]]
    preds = torch.tensor([row["pred"] for row in report["wrong"]])
    direct = gradient_x_embedding(model.eval(), ids, preds)
    got = torch.tensor(report["wrong_token_scores"])
    assert got.shape == ids.shape
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-4)
    # the predicted class is the model's own prediction on those sentences: "pred" gives the same scores
    torch.testing.assert_close(got, gradient_x_embedding(model, ids, "pred"), atol=1e-5, rtol=1e-4)
    assert "introspect/misclassifications/top_wrong_text/text_summary" in read_events(str(tmp_path / "watched"))["text"]


def test_the_table_colours_each_token_by_its_score() -> None:
    rows = [{"index": 0, "label": 1, "pred": 0, "confidence": 0.9}, {"index": 4, "label": 0, "pred": 1, "confidence": 0.7}]
    table = wrong_sentences_markdown(
        rows, ["a b c", "d"], ["x", "y"], tokens=[["a", "b", "c"], ["d"]], scores=[torch.tensor([1.0, -0.9, 0.1]), None],
    )
    lines = table.splitlines()
    assert lines[0].startswith("Token colours") and lines[2].endswith("tokens for the predicted class |")
    assert lines[-2].endswith("| 🟥**a** 🟦**b** ⬜c |") and lines[-1].endswith("| d | - |")
    plain = wrong_sentences_markdown(rows, ["a b c", "d"], ["x", "y"])
    assert plain.splitlines()[0] == "| rank | index | true | predicted | confidence | text |"  # no scores: as before
