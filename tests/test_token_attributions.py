"""Token-id inputs: attributions at the embedding output, against captum's layer methods on the same
embedding layer; the embedding found automatically; completeness; guards; the text rendering."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from lightning_introspect.methods.attribution import attribute, integrated_gradients
from lightning_introspect.methods.token_attribution import (
    TOKEN_METHODS,
    find_embedding,
    gradient_x_embedding,
    token_attributions,
    token_integrated_gradients,
    token_saliency,
)
from tests.zoo import GRUText, TransformerText, tokens

captum_attr = pytest.importorskip("captum.attr")


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"gru": GRUText().eval(), "transformer": TransformerText().eval()}


def _ids(n: int = 4) -> torch.Tensor:
    return tokens(n=n)[0]


def _close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = float(theirs.detach().abs().max().clamp_min(1e-12))
    torch.testing.assert_close(ours, theirs.detach().float(), rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("name", ["gru", "transformer"])
def test_gradient_x_embedding_and_saliency_equal_captum_layer_gradient_x_activation(name):
    net, ids = _models()[name], _ids()
    target = [0, 1, 2, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gxa = captum_attr.LayerGradientXActivation(net, net.embed).attribute(ids, target=target)
        grad = captum_attr.LayerGradientXActivation(net, net.embed, multiply_by_inputs=False).attribute(ids, target=target)
    _close(gradient_x_embedding(net, ids, target), gxa.sum(-1))
    _close(token_saliency(net, ids, target), grad.norm(dim=-1))


@pytest.mark.parametrize("method", ["riemann_right", "riemann_middle", "gausslegendre"])
@pytest.mark.parametrize("name", ["gru", "transformer"])
def test_integrated_gradients_on_embeddings_equals_captum_layer_integrated_gradients(name, method):
    net, ids = _models()[name], _ids()
    pad = 5
    ours = token_integrated_gradients(net, ids, "pred", steps=6, baseline=pad, method=method, batch_size=8)
    pred = net(ids).argmax(1)
    theirs = captum_attr.LayerIntegratedGradients(net, net.embed).attribute(
        ids, baselines=torch.full_like(ids, pad), target=pred, n_steps=6, method=method
    )
    _close(ours, theirs.sum(-1))
    # the same through the generic entry points
    _close(integrated_gradients(net, ids, "pred", steps=6, baseline=pad, method=method, batch_size=8), theirs.sum(-1))
    got = attribute(net, ids, "pred", ["integrated_gradients"], options={"integrated_gradients": {"steps": 6, "baseline": pad, "method": method}})
    _close(got["integrated_gradients"], theirs.sum(-1))


def test_zero_baseline_equals_a_zero_padding_row_and_is_complete():
    torch.manual_seed(0)
    net = GRUText().eval()
    with torch.no_grad():
        net.embed.weight[0].zero_()  # a padding row: its embedding is the zero vector
    ids = _ids()
    zero = token_integrated_gradients(net, ids, 1, steps=64, baseline=None)
    pad = token_integrated_gradients(net, ids, 1, steps=64, baseline=0)
    torch.testing.assert_close(zero, pad)
    gap = net(ids)[:, 1] - net(torch.zeros_like(ids))[:, 1]
    torch.testing.assert_close(zero.sum(1), gap.detach(), atol=5e-4, rtol=1e-3)


def test_the_embedding_layer_is_found_among_position_embeddings_and_can_be_named():
    class PositionsFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.position = nn.Embedding(12, 8)
            self.words = nn.Embedding(60, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.position(torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0)
            x = x + self.words(ids)
            x += 1.0  # an in-place op right after: the leaf handed downstream is a copy
            return self.head(torch.tanh(x).mean(1))

    torch.manual_seed(0)
    net, ids = PositionsFirst().eval(), _ids()
    assert find_embedding(net, ids) == "words"
    assert find_embedding(net, ids, "position") == "position"
    assert find_embedding(net, ids, net.words) == "words"
    with pytest.raises(ValueError, match="embedding_layer"):
        find_embedding(net, ids, "wordz")
    theirs = captum_attr.LayerGradientXActivation(net, net.words).attribute(ids, target=2)
    _close(gradient_x_embedding(net, ids, 2), theirs.sum(-1))

    class OneHot(nn.Module):  # embeds by one-hot vectors and a linear layer: no nn.Embedding to find
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(60, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.proj(nn.functional.one_hot(ids, 60).float()).mean(1)

    with pytest.raises(ValueError, match="no nn.Embedding runs"):
        find_embedding(OneHot(), ids)


def test_token_attributions_share_one_pass_and_refuse_image_methods():
    net, ids = _models()["transformer"], _ids()
    got = token_attributions(net, ids, "pred", ["saliency", "input_x_gradient", "integrated_gradients"], options={"integrated_gradients": {"steps": 4}})
    assert list(got) == ["saliency", "input_x_gradient", "integrated_gradients"]
    assert all(v.shape == ids.shape and not v.requires_grad for v in got.values())
    assert bool((got["saliency"] >= 0).all())
    torch.testing.assert_close(got["input_x_gradient"], gradient_x_embedding(net, ids, "pred"))
    torch.testing.assert_close(got["integrated_gradients"], token_integrated_gradients(net, ids, "pred", steps=4))
    same = attribute(net, ids, "pred", ["saliency"], layer="embed")
    torch.testing.assert_close(same["saliency"], got["saliency"])
    for bad in ("grad_cam", "guided_backprop", "smoothgrad"):
        with pytest.raises(ValueError, match="token ids"):
            attribute(net, ids, 0, [bad])
    with pytest.raises(ValueError, match="steps"):
        token_attributions(net, ids, 0, ["integrated_gradients"], options={"integrated_gradients": {"n_steps": 4}})
    with pytest.raises(ValueError, match="token id"):
        token_integrated_gradients(net, ids, 0, baseline=1000)
    assert set(TOKEN_METHODS) >= {"saliency", "input_x_gradient", "integrated_gradients"}


def test_token_methods_leave_no_trace():
    net, ids = _models()["gru"], _ids()
    net.train()
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    rng, ids0 = torch.get_rng_state(), ids.clone()
    with torch.inference_mode():
        token_attributions(net, ids, "pred", ["saliency", "input_x_gradient", "integrated_gradients"], options={"integrated_gradients": {"steps": 3, "baseline": 0}})
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(ids, ids0)


# ------------------------------------------------------------------------------------- rendering
def test_token_text_survives_tensorboards_markdown_sanitiser():
    from tensorboard.plugin_util import markdown_to_safe_html

    from lightning_introspect.render.tokens import (
        token_sentences_markdown,
        token_strings,
        top_tokens_markdown,
    )

    ids = torch.tensor([[4, 7, 0], [7, 9, 9]])
    words = {0: "<pad>", 4: "<b>bold</b>", 7: "a|b", 9: "*great*"}
    strings = token_strings(ids, lambda row: [words[i] for i in row])
    scores = torch.tensor([[0.1, 1.0, 5.0], [-0.9, 0.4, 0.05]])
    keep = ids != 0
    text = token_sentences_markdown(strings, scores, signed=True, captions=["pred 1", "pred 0"], keep=keep, title="ig")
    page = markdown_to_safe_html(text + "\n\n" + top_tokens_markdown(ids, strings, scores, torch.tensor([1, 0]), keep=keep))
    assert "&lt;pad&gt;" not in page.split("<table>")[0]  # padding hidden from the sentences
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>" not in page  # a token's markup is shown, never interpreted
    assert "🟥<strong>a|b</strong>" in page  # the strongest token: red and bold, its pipe kept literally
    assert "🟦<strong>a|b</strong>" in page and "⬜*great*" in page
    assert page.count("<tr>") == 3 and "<td>a|b 1 (1)" in page  # header + one row per class; pipes do not split cells
    with pytest.raises(ValueError, match="one string per id"):
        token_strings(ids, lambda row: " ".join(words[i] for i in row))


def test_token_colours_follow_the_score():
    from lightning_introspect.render.tokens import token_colour

    assert [token_colour(v, 1.0, signed=False)[0] for v in (0.1, 0.3, 0.6, 0.9)] == ["⬜", "🟨", "🟧", "🟥"]
    assert token_colour(-0.8, 1.0, signed=True) == ("🟦", True) and token_colour(0.3, 1.0, signed=True) == ("🟥", False)
    assert token_colour(0.0, 0.0, signed=True) == ("⬜", False)


# -------------------------------------------------------------------------------------- callback
def _texts(log_dir: str) -> dict[str, str]:
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, str] = {}
    for path in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True):
        acc = EventAccumulator(path, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags().get("tensors", []):
            out[tag.removesuffix("/text_summary")] = acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
    return out


@pytest.fixture(scope="module")
def text_fit(tmp_path_factory):
    from lightning_introspect.callbacks.attributions import Attributions
    from tests.helpers import quick_trainer
    from tests.zoo import ZOO_BY_NAME

    tmp = tmp_path_factory.mktemp("text")
    model, dm = ZOO_BY_NAME["transformer_text"].build()
    cb = Attributions(num_samples=8, on_error="raise", decode=lambda row: [f"w{i}" for i in row], pad_token_id=3, baseline_token_id=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp, [cb], epochs=3).fit(model, datamodule=dm)
    return cb, str(tmp), [str(w.message) for w in caught], dm


def test_attributions_callback_logs_coloured_sentences_and_top_tokens_for_token_ids(text_fit):
    from tensorboard.plugin_util import markdown_to_safe_html

    cb, log_dir, caught, dm = text_fit
    assert cb.skip_reason is None and not cb.disabled
    assert cb.resolved_embedding_layer == "net.embed"
    assert list(cb.maps) == ["saliency", "input_x_gradient", "integrated_gradients", "lrp"]  # the token defaults (LRP on the embedding)
    assert not any("'lrp' is skipped" in m for m in caught)
    texts = _texts(log_dir)
    for method in cb.maps:
        page = markdown_to_safe_html(texts[f"introspect/attributions/{method}"])
        assert page.count("<p><strong>#") == 8 and "<table>" in page
        assert re.search(r"(?<!\w)w3(?!\w)", page.split("<table>")[0]) is None  # the pad token is hidden from the sentences
    x, _ = cb._samples
    assert bool((x == 3).any())  # ... and the samples do hold it
    assert "net.embed" in texts["introspect/attributions/layer"]
    ig = cb.maps["integrated_gradients"]
    assert ig.shape == (8, 12) and torch.isfinite(ig).all()


def test_integrated_gradients_ranks_the_decisive_tokens_first_after_training(text_fit):
    """The zoo's text data: a sentence's class is the vocabulary block (20 ids) most of its tokens come from.
    The highest-scored token of each sentence must come from the block of the class it is explained for."""
    cb, _, _, dm = text_fit
    explained = torch.tensor(cb.history[-1]["explained"])
    x, _ = cb._samples  # the fixed samples of the fit
    top = cb.maps["integrated_gradients"].masked_fill(x == 3, float("-inf")).argmax(1)
    top_ids = x.gather(1, top.view(-1, 1)).squeeze(1)
    hits = (top_ids // 20 == explained).float().mean()
    assert hits >= 0.75, (top_ids.tolist(), explained.tolist())


def test_token_only_refusals(tmp_path):
    from lightning_introspect.callbacks.attributions import Attributions
    from lightning_introspect.callbacks.base import IntrospectionInputError, IntrospectionSkipWarning
    from tests.helpers import quick_trainer
    from tests.zoo import ZOO_BY_NAME

    model, dm = ZOO_BY_NAME["gru_text"].build()
    cb = Attributions(methods=["grad_cam", "guided_backprop"], num_samples=2)
    with pytest.warns(IntrospectionSkipWarning, match="none of the methods"):
        quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model, datamodule=dm)
    model, dm = ZOO_BY_NAME["gru_text"].build()
    joined = Attributions(num_samples=2, decode=lambda row: " ".join(map(str, row)))
    with pytest.raises(IntrospectionInputError, match="`decode`"):
        quick_trainer(tmp_path, [joined], epochs=1, limit_train_batches=1).fit(model, datamodule=dm)
    with pytest.raises(ValueError, match="`pad_token_id`"):
        Attributions(pad_token_id=-1)
    with pytest.raises(ValueError, match="`feature_names`"):
        Attributions(feature_names="age")


def test_tabular_bars_are_named_by_feature_names(tmp_path, monkeypatch):
    import lightning_introspect.callbacks.attributions as module
    from tests.helpers import quick_trainer
    from tests.zoo import ZOO_BY_NAME

    seen = []
    real = module.feature_bar_chart
    monkeypatch.setattr(module, "feature_bar_chart", lambda maps, **kw: seen.append(kw["feature_names"]) or real(maps, **kw))
    names = [f"f{i}" for i in range(20)]
    model, dm = ZOO_BY_NAME["tabular_mlp"].build()
    cb = module.Attributions(methods=["saliency"], num_samples=4, feature_names=names, faithfulness=False, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=1).fit(model, datamodule=dm)
    assert seen and all(s == names for s in seen)


def test_explaining_token_ids_during_a_fit_leaves_training_bitwise_unchanged(tmp_path):
    from lightning_introspect.callbacks.attributions import Attributions
    from tests.helpers import quick_trainer
    from tests.zoo import ZOO_BY_NAME

    def fit(callbacks):
        model, dm = ZOO_BY_NAME["transformer_text"].build()  # seeded: the same weights every call
        quick_trainer(tmp_path, callbacks, epochs=2, logger=False).fit(model, datamodule=dm)
        return [p.detach().clone() for p in model.parameters()]

    plain = fit([])
    cb = Attributions(num_samples=4, every_n_epochs=1, baseline_token_id=0, on_error="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explained = fit([cb])
    assert len(cb.history) >= 2 and "integrated_gradients" in cb.maps
    assert all(torch.equal(a, b) for a, b in zip(plain, explained))
