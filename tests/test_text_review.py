"""Misclassifications on text inputs: the confidently wrong texts themselves, decoded, beside their rows."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_introspect.callbacks.misclassifications import Misclassifications
from lightning_introspect.render.review import wrong_sentences_markdown
from tests.helpers import quick_trainer, read_events
from tests.zoo import Classifier, GRUText, tokens_dm

WORDS = [f"w{i}" for i in range(60)]


def test_the_wrong_texts_are_the_validation_samples_of_the_wrong_rows(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model, dm = Classifier(GRUText()), tokens_dm()
    cb = Misclassifications(top_k=5, decode=lambda ids: [WORDS[i] for i in ids], at=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quick_trainer(tmp_path, [cb], epochs=1).fit(model, datamodule=dm)
    report = cb.report
    assert report is not None and report["wrong"], "an untrained-ish text model makes mistakes"
    val_ids = dm.val_dataloader().dataset.tensors[0]  # the validation pass reads them in order
    expected = [" ".join(WORDS[i] for i in val_ids[row["index"]].tolist()) for row in report["wrong"]]
    assert report["wrong_texts"] == expected
    assert "introspect/misclassifications/top_wrong_text/text_summary" in read_events(str(tmp_path))["text"]


def test_without_decode_the_ids_are_shown_and_long_texts_are_cut() -> None:
    cb = Misclassifications()
    ids = torch.arange(200).view(1, 200)
    kept = cb._batch_tokens((ids, torch.zeros(1)))
    assert kept is not None and kept.shape == (1, 128)
    assert cb.sample_text(kept[0].tolist()) == " ".join(str(i) for i in range(128))
    short = cb._batch_tokens((torch.tensor([[5, 6]]), torch.zeros(1)))
    assert short is not None and cb.sample_text(short[0].tolist()) == "5 6"  # the -1 padding is dropped
    assert cb._batch_tokens((torch.rand(2, 3), torch.zeros(2))) is None  # float features are not text


def test_the_text_table_escapes_what_would_break_it() -> None:
    table = wrong_sentences_markdown([{"index": 0, "label": 1, "pred": 0, "confidence": 0.5}], ["a|b\n<i>c</i>"], ["x", "y"])
    row = table.splitlines()[-1]
    assert row.count("|") - row.count("\\|") == 7  # seven cell borders: the text's own bar is escaped
    assert "\n" not in row and "\\<i\\>" in row
