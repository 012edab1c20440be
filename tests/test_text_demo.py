"""The text demo: a tiny transformer on sentences whose label is decided by known words, so the right
token attribution is known."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from lightning_introspect.methods.token_attribution import token_attributions
from lightning_introspect.text_demo import DECISIVE, SentencesDataModule, SentenceTransformer, make_sentences
from tests.helpers import read_events


def test_integrated_gradients_ranks_the_decisive_word_first_in_most_sentences() -> None:
    from lightning_introspect._lightning import Trainer, pl

    pl.seed_everything(0, verbose=False)
    dm, model = SentencesDataModule(seed=0), SentenceTransformer()
    trainer = Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    ids, labels = dm.val_set.tensors
    model.eval()
    assert (model(ids).argmax(1) == labels).float().mean() > 0.95  # the task is learnt
    scores = token_attributions(model, ids, labels, ["integrated_gradients"], embedding_layer="embed")["integrated_gradients"]
    top = scores.argmax(1)
    decisive = ids[torch.arange(len(ids)), top] == torch.tensor([DECISIVE[int(c)] for c in labels])
    assert decisive.float().mean() >= 0.8, f"decisive word first in {decisive.float().mean():.2f} of the sentences"


def test_sentences_carry_their_decisive_word_and_the_seed_fixes_them() -> None:
    ids, labels = make_sentences(64, seed=3)
    for row, c in zip(ids, labels):
        assert DECISIVE[int(c)] in row.tolist()
        others = [d for k, d in DECISIVE.items() if k != int(c)]
        assert not set(others) & set(row.tolist())  # only its own class's word: the label is decided by it
    again, _ = make_sentences(64, seed=3)
    assert torch.equal(ids, again)


def test_the_text_demo_runs_every_callback_that_serves_token_ids(tmp_path: Any) -> None:
    from lightning_introspect.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["demo", "--task", "text", "--fast", "--epochs", "2", "--out", str(tmp_path)]) == 0
    events = read_events(str(tmp_path / "sentences"))
    texts = set(events["text"])
    assert any(t.startswith("introspect/attributions/integrated_gradients") for t in texts)
    assert "introspect/sanity/verdicts/text_summary" in texts
    assert any(t.startswith("introspect/per_class/") for t in events["scalars"])
    # the bottom-up cascade starts at the embedding (not at the blocks nearest the output, which a budget-cut
    # or `layers=k` run keeps): randomising the embedding leaves nothing of the trained token ranking
    scalars = events["scalars"]
    for method in ("saliency", "input_x_gradient", "integrated_gradients"):
        (_, at_embedding), = scalars[f"introspect/sanity/{method}/spearman_abs/bottom_up/embed"]
        assert at_embedding < 0.3, (method, at_embedding)
        (_, passed), = scalars[f"introspect/sanity/{method}/bottom_up_passed"]
        assert passed > 0.0, f"{method} fails the bottom-up check"
