"""SanityChecks on text models (token ids (N, T)): the checks run on the token scores at the embedding output.

Known answer: a bag-of-embeddings linear classifier, ``logits = W @ sum_t E[ids_t]``, whose gradient x
embedding score of token ``t`` for class ``c`` is exactly ``W[c] . E[ids_t]``.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from lightning_introspect._lightning import pl
from lightning_introspect.callbacks.sanity_checks import SanityChecks
from lightning_introspect.errors import IntrospectionInputError
from lightning_introspect.methods.randomization import layer_seed, reinitialize_
from lightning_introspect.methods.sanity_report import TOKEN_NOTE, SanityReport, run_sanity_checks
from tests.helpers import quick_trainer, read_events
from tests.zoo import Classifier, GRUText, tokens, tokens_dm

VOCAB, DIM, CLASSES = 60, 256, 3


class BagOfEmbeddings(nn.Module):
    """``logits = head(sum_t embed(ids_t))``: token ``t``'s gradient x embedding for class ``c`` is ``W[c] . E[ids_t]``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, CLASSES, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(VOCAB, DIM, generator=gen))
            self.head.weight.copy_(torch.randn(CLASSES, DIM, generator=gen) / DIM**0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).sum(1))


def _by_hand(model: BagOfEmbeddings, ids: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``W[c] . E[ids_t]`` for each sentence's predicted class ``c`` (of the trained model) and a given head ``W``."""
    with torch.no_grad():
        pred = model(ids).argmax(1)
        return (model.embed.weight[ids] * head[pred].unsqueeze(1)).sum(-1)


def test_token_scores_are_hand_computed_and_randomising_the_head_destroys_them():
    model = BagOfEmbeddings().eval()
    ids, _ = tokens(16, vocab=VOCAB)
    before = copy.deepcopy(model.state_dict())
    report = run_sanity_checks(
        model, ids, methods=["input_x_gradient"], order="top_down", repeats=1, keep_maps=16, warn=False, resamples=200, seed=3,
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the trained model was changed"
    assert report.input_kind == "token_ids" and report.embedding_layer == "embed"
    assert report.layers == ["head", "embed"]
    maps = report.maps["cascading"]["input_x_gradient"]
    # the trained model's scores are W[c] . E[ids_t]
    torch.testing.assert_close(maps["original"], _by_hand(model, ids, model.head.weight), atol=1e-4, rtol=1e-4)
    # randomising the head: the scores become W'[c] . E[ids_t] with W' the re-initialised head (same private seed)
    fresh = copy.deepcopy(model)
    reinitialize_(fresh.head, seed=layer_seed(3, "head", 0))
    randomised = _by_hand(model, ids, fresh.head.weight)
    torch.testing.assert_close(maps["head"], randomised, atol=1e-4, rtol=1e-4)
    # ... and the similarity is the Spearman correlation of the two, near 0 (a random head shares no ranking)
    reference = np.mean([spearmanr(a, b).statistic for a, b in zip(maps["original"].numpy(), randomised.numpy())])
    curve = report.curves["cascading"]["input_x_gradient"]
    assert curve["spearman"]["head"] == pytest.approx(reference, abs=1e-5)
    assert abs(curve["spearman"]["head"]) < 0.3 and abs(curve["spearman_abs"]["head"]) < 0.3
    assert "ssim" not in curve, "SSIM is an image measure: left out for 1-D token scores"
    assert report.verdicts["input_x_gradient"] == "pass"
    # class sensitivity: three nearly orthogonal class rows give different token rankings
    assert report.class_sensitivity_verdicts["input_x_gradient"] == "pass"
    assert report.class_same["input_x_gradient"]["spearman"] > 0.95  # the same class under 1 % embedding noise
    assert TOKEN_NOTE in report.markdown() and "`embed`" in report.markdown()
    assert SanityReport.from_dict(report.to_dict()).embedding_layer == "embed"


def test_image_methods_and_ssim_verdicts_are_refused_for_token_ids():
    ids, _ = tokens(4, vocab=VOCAB)
    with pytest.raises(ValueError, match="for token ids"):
        run_sanity_checks(BagOfEmbeddings(), ids, methods=["grad_cam"], warn=False)
    with pytest.raises(ValueError, match="`verdict_metric`"):
        run_sanity_checks(BagOfEmbeddings(), ids, methods=["saliency"], verdict_metric="ssim", warn=False)


def _fit(tmp_path, callbacks, net_fn=BagOfEmbeddings, epochs=2):
    pl.seed_everything(0, verbose=False)
    model = Classifier(net_fn())
    trainer = quick_trainer(tmp_path, callbacks, epochs=epochs)
    trainer.fit(model, datamodule=tokens_dm())
    return model, trainer


def test_the_callback_checks_a_text_model_at_defaults_and_never_changes_training(tmp_path):
    plain, _ = _fit(tmp_path / "plain", [])
    rng = torch.get_rng_state()
    cb = SanityChecks(num_samples=6, progress=False, on_error="raise")  # default settings otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched, _ = _fit(tmp_path / "watched", [cb])
    assert cb.skip_reason is None
    assert torch.equal(rng, torch.get_rng_state()), "global torch RNG drifted"
    for key, value in plain.state_dict().items():
        assert torch.equal(value, watched.state_dict()[key]), f"{key} differs"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in watched.modules())

    report = cb.report
    methods = ["saliency", "input_x_gradient", "integrated_gradients"]
    assert report is not None and report.methods == methods and report.order == "bottom_up"
    assert list(report.curves) == ["bottom_up"] and report.steps("bottom_up") == ["net.embed", "net.head"]
    assert set(report.details) == {"randomization", "bottom_up", "class_least", "class_second"}
    events = read_events(str(tmp_path / "watched"))
    scalars, images, text = events["scalars"], events["images"], events["text"]
    for method in methods:
        for what in ("score", "passed", "bottom_up_score", "bottom_up_passed", "class_score", "class_passed"):
            assert f"introspect/sanity/{method}/{what}" in scalars, (method, what)
        detail = report.details["bottom_up"][method]
        assert scalars[f"introspect/sanity/{method}/bottom_up_score"][-1][1] == pytest.approx(detail.score, abs=1e-6)
        for layer in ("net.embed", "net.head"):
            assert f"introspect/sanity/{method}/spearman/bottom_up/{layer}" in scalars
            assert f"introspect/sanity/{method}/ssim/bottom_up/{layer}" not in scalars
    assert "introspect/sanity/maps/bottom_up" in images and "introspect/sanity/class_maps" in images
    assert "introspect/sanity/curve/bottom_up/spearman_abs" in images
    assert "introspect/sanity/curve/bottom_up/ssim" not in images
    assert any(tag.startswith("introspect/sanity/verdicts") for tag in text)
    # saliency of a bag of embeddings is ||W[c]|| at every token: a constant map, of entropy 0, so eMPRT is
    # undefined (NaN, not logged); the signed methods vary over the tokens
    assert math.isnan(report.emprt["saliency"]["score"]) and "introspect/sanity/saliency/emprt" not in scalars
    assert "introspect/sanity/input_x_gradient/emprt" in scalars
    # the input x gradient scores of the trained bag model are W[c] . E[ids_t]: randomising either block destroys them
    assert report.details["randomization"]["input_x_gradient"].verdict == "pass"


def test_ssim_verdict_is_refused_before_training_and_image_methods_are_dropped(tmp_path):
    cb = SanityChecks(verdict_metric="ssim", num_samples=4, progress=False, on_error="raise")
    with pytest.raises(IntrospectionInputError, match="`verdict_metric`"):
        _fit(tmp_path / "ssim", [cb], epochs=1)
    model = GRUText().eval()
    ids, _ = tokens(4)
    cb = SanityChecks(methods=["grad_cam", "input_x_gradient"], num_samples=4, repeats=1, resamples=100, progress=False, run_emprt=False)
    with pytest.warns(UserWarning, match="no token version"):
        report = cb.check(model, ids)
    assert report.methods == ["input_x_gradient"] and report.layers == ["head", "gru", "embed"]
    only_images = SanityChecks(methods=["grad_cam"], num_samples=4, progress=False)
    with pytest.raises(ValueError, match="explains token ids"):
        only_images.check(model, ids)
