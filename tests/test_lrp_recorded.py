"""LRP on models torch.fx cannot trace: the plan recorded from a forward pass on the actual input.

Checks: (1) on models fx can trace (the zoo's TinyViT and TransformerText, a ResNet with in-place residuals and
BatchNorm, masked ``nn.TransformerEncoder``s) the recorded plan gives the traced plan's relevance (the same
numbers, under several rules, composites and at named layers), and traceable models keep the fx path;
(2) Hugging Face ``ViTForImageClassification`` / ``BertForSequenceClassification`` from tiny configs, eager and
SDPA attention: maps of the input's shape / per token, exact conservation with biases zeroed (fp64), the two
attention implementations give the same maps, the callbacks run LRP on a Hugging Face ViT; (3) Python control
flow on shapes (refused by fx) gets a plan per input shape, control flow on values is recorded for every input,
both equal to LRP of the branch taken; (4) no hook, mode or patch is left behind, also when forward raises;
what cannot be recorded is refused by name.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from lightning_introspect.methods.lrp import ZPlus, decompose, lrp, lrp_unsupported, record, trace
from lightning_introspect.methods.lrp.trace import TraceFailed, plan_for
from tests.zoo import Classifier, TinyResNet, TinyViT, TransformerText, digits_dm

TINY = 1e-12  # the stabiliser for exact arithmetic in fp64


def seeded(factory: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return factory()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the recorded path also for models fx can trace."""
    monkeypatch.setattr(trace, "_FORCE_RECORDED", True)


def _global_hooks() -> tuple[int, ...]:
    return tuple(len(v) for k, v in vars(module_globals).items() if k.startswith("_global_") and isinstance(v, dict))


def _left_behind(model: nn.Module) -> list[str]:
    """Hooks on the model, global module hooks, torch function modes or our attention patch still in place."""
    found = [f"{name}.{kind}" for name, m in model.named_modules()
             for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks") if getattr(m, kind)]
    if any(_global_hooks()):
        found.append("global module hooks")
    if torch._C._len_torch_function_stack():
        found.append("torch function mode")
    if decompose.attention is not record._ATTENTION:
        found.append("decompose.attention")
    return found


# ---------------------------------------------------------------- (1) the same plan as the fx trace


class EncoderText(nn.Module):
    """Token ids -> embedding -> ``nn.TransformerEncoder`` (fused fast path in eval mode) with the padding mask
    computed from the ids -> mean -> logits."""

    def __init__(self, norm_first: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0).mean(1))


class FloatEncoder(nn.Module):
    """Float tokens -> ``nn.TransformerEncoderLayer`` (causal mask) -> class token -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, activation="gelu")
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.layer(x, src_mask=mask, is_causal=True)[:, 0])


IDS = torch.tensor([[3, 4, 5, 0], [7, 1, 0, 0], [2, 2, 9, 8]])
TRACEABLE = {
    "tiny_vit": (lambda: TinyViT(), lambda: torch.randn(3, 1, 16, 16), ["patch_embed", "encoder", "norm"]),
    "transformer_text": (lambda: TransformerText(), lambda: torch.randint(0, 60, (3, 12)), ["embed", "norm1", "attn"]),
    "resnet": (lambda: TinyResNet(), lambda: torch.randn(3, 1, 16, 16), ["layer1", "layer2.0.bn1", "avgpool"]),
    "encoder_text": (lambda: EncoderText(), lambda: IDS, ["embed", "encoder.layers.0", "encoder"]),
    "encoder_text_pre_norm": (lambda: EncoderText(norm_first=True), lambda: IDS, ["encoder.layers.1.norm1", "encoder"]),
    "float_encoder": (lambda: FloatEncoder(), lambda: torch.randn(3, 5, 8), ["layer", "layer.self_attn"]),
}
OPTIONS: list[dict[str, Any]] = [{}, {"attention_rule": "attnlrp"}, {"rule": "zplus"}, {"composite": "epsilon_plus"},
                                 {"composite": {nn.Linear: ZPlus()}}]


def _train_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Running statistics that are not the identity, so the BatchNorm folding is visible in the numbers."""
    if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()


@pytest.mark.parametrize("name", list(TRACEABLE))
def test_recorded_plan_gives_the_relevance_of_the_traced_plan(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    build, sample, layers = TRACEABLE[name]
    model, x = seeded(build), seeded(sample, 1)
    _train_batchnorm(model, x if x.is_floating_point() else x)
    traced = {i: lrp(model, x, [0, 1, 2], **options) for i, options in enumerate(OPTIONS)}
    traced_at = {at: lrp(model, x, [0, 1, 2], at=at) for at in layers}
    assert record._RECORDED.get(model) is None  # fx can trace it: the fx path, as before
    traced_kinds = Counter(s.kind for s in plan_for(model).steps if s.kind not in ("const", "meta"))
    monkeypatch.setattr(trace, "_FORCE_RECORDED", True)
    plan = plan_for(model, x)
    assert Counter(s.kind for s in plan.steps if s.kind not in ("const", "meta")) == traced_kinds  # a tuple's parts: when used
    for i, options in enumerate(OPTIONS):
        got = lrp(model, x, [0, 1, 2], **options)
        assert got.shape == traced[i].shape
        torch.testing.assert_close(got, traced[i], rtol=1e-5, atol=1e-5, msg=f"{name} {options}")
    for at in layers:
        torch.testing.assert_close(lrp(model, x, [0, 1, 2], at=at), traced_at[at], rtol=1e-5, atol=1e-5, msg=f"{name} at {at}")
    assert len(record._RECORDED[model]) == 1  # one recording served every call on this input shape
    assert not _left_behind(model)


# ------------------------------------------------------------------------- (2) Hugging Face models


def _hf_vit(attn: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=10, attn_implementation=attn)
    return seeded(lambda: transformers.ViTForImageClassification(config)).eval()


def _hf_bert(attn: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3, attn_implementation=attn)
    return seeded(lambda: transformers.BertForSequenceClassification(config)).eval()


def _zero_constants(model: nn.Module) -> nn.Module:
    """Biases, position / token-type embeddings and the class token zeroed, fp64: relevance is then conserved."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(k in name for k in ("position_embeddings", "token_type_embeddings", "cls_token")):
                p.zero_()
    return model.double().eval()


ATTENTION = ["eager", "sdpa"]


def test_fx_cannot_trace_the_hugging_face_models() -> None:
    for model in (_hf_vit("eager"), _hf_bert("eager")):
        with pytest.raises(TraceFailed):
            plan_for(model)


@pytest.mark.parametrize("attn", ATTENTION)
def test_hugging_face_vit_is_explained_and_conserves_relevance(attn: str) -> None:
    model = _hf_vit(attn)
    x = seeded(lambda: torch.randn(3, 1, 16, 16), 1)
    assert lrp_unsupported(model) is None and lrp_unsupported(model, x) is None
    relevance = lrp(model, x, "pred")
    assert relevance.shape == x.shape and torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert record._RECORDED[model]  # cached for this input shape
    plan = plan_for(model, x)
    assert plan.steps[-1].source.op == "call_module" and plan.steps[-1].source.target == "classifier"  # the logits
    model = _zero_constants(model)
    x = x.double()
    logits = model(x).logits.detach()
    targets = [0, 4, 9]
    want = logits[torch.arange(3), targets]
    for at in (None, "vit.embeddings.patch_embeddings.projection", "vit.layers.0", "vit.layernorm"):
        got = lrp(model, x, targets, epsilon=TINY, at=at)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got.flatten(1).sum(1), want, rtol=1e-8, atol=1e-10, msg=f"{attn} at {at}")


@pytest.mark.parametrize("attn", ATTENTION)
def test_hugging_face_bert_gives_conserving_per_token_scores(attn: str) -> None:
    model = _hf_bert(attn)
    ids = seeded(lambda: torch.randint(1, 50, (3, 7)), 1)
    assert lrp_unsupported(model) is None and lrp_unsupported(model, ids) is None
    scores = lrp(model, ids, "pred")
    assert scores.shape == ids.shape and torch.isfinite(scores).all()
    assert record._RECORDED[model]  # nothing read into Python: cached for this input shape
    model = _zero_constants(model)
    logits = model(ids).logits.detach()
    want = logits[torch.arange(3), [0, 1, 2]]
    per_token = lrp(model, ids, [0, 1, 2], epsilon=TINY)
    torch.testing.assert_close(per_token.sum(1), want, rtol=1e-8, atol=1e-10)
    at_embed = lrp(model, ids, [0, 1, 2], epsilon=TINY, at="bert.embeddings.word_embeddings")
    assert at_embed.shape == (3, 7, 32)
    torch.testing.assert_close(at_embed.sum(-1), per_token)  # relevance stops at the word embedding, per token


@pytest.mark.parametrize("build", [_hf_vit, _hf_bert])
@pytest.mark.parametrize("attention_rule", ["cp", "attnlrp"])
def test_eager_and_sdpa_attention_give_the_same_maps(build: Any, attention_rule: str) -> None:
    eager, sdpa = build("eager"), build("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    x = seeded(lambda: torch.randn(2, 1, 16, 16) if build is _hf_vit else torch.randint(1, 50, (2, 6)), 2)
    kinds = {s.kind for s in plan_for(sdpa, x).steps}
    assert "attention" in kinds and "softmax" in {s.kind for s in plan_for(eager, x).steps}  # two different graphs
    torch.testing.assert_close(lrp(sdpa, x, [1, 2], attention_rule=attention_rule),
                               lrp(eager, x, [1, 2], attention_rule=attention_rule), rtol=1e-4, atol=1e-6)


def test_callbacks_run_lrp_on_a_hugging_face_vit(tmp_path: Any) -> None:
    from lightning_introspect.callbacks.attributions import Attributions
    from lightning_introspect.callbacks.checks import lrp_problem
    from lightning_introspect.callbacks.sanity_checks import SanityChecks
    from tests.helpers import quick_trainer

    module = Classifier(_hf_vit("sdpa"), lr=3e-3)  # forward returns the ImageClassifierOutput itself
    assert lrp_problem(module) is None
    attributions = Attributions(methods=["saliency", "lrp"], num_samples=4, on_error="raise")
    sanity = SanityChecks(methods=["saliency", "lrp"], num_samples=4, repeats=1, resamples=50, run_emprt=False,
                          run_class_sensitivity=False, progress=False, on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [attributions, sanity], epochs=1, limit_train_batches=2).fit(
            module, datamodule=digits_dm(n_train=32, n_val=16, batch_size=16))
    assert not any("'lrp' is skipped" in str(w.message) or "LRP failed" in str(w.message) for w in caught)
    assert "lrp" in attributions.maps and torch.isfinite(attributions.maps["lrp"]).all()
    assert attributions.maps["lrp"].abs().sum() > 0
    assert sanity.report is not None and "lrp" in sanity.report.verdicts
    assert not _left_behind(module)


def test_attributions_run_lrp_per_token_on_a_hugging_face_bert(tmp_path: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from lightning_introspect.callbacks.attributions import Attributions
    from tests.helpers import quick_trainer
    from tests.zoo import tokens_dm

    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    module = Classifier(seeded(lambda: transformers.BertForSequenceClassification(config)), lr=3e-3)
    attributions = Attributions(num_samples=4, on_error="raise")  # the token defaults, LRP among them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [attributions], epochs=1, limit_train_batches=2).fit(module, datamodule=tokens_dm())
    assert not any("'lrp' is skipped" in str(w.message) or "LRP failed" in str(w.message) for w in caught)
    assert attributions.resolved_embedding_layer == "net.bert.embeddings.word_embeddings"
    assert attributions.maps["lrp"].shape == (4, 12) and torch.isfinite(attributions.maps["lrp"]).all()
    assert not _left_behind(module)


# ------------------------------------------------------------------------ (3) Python control flow


class ShapeBranch(nn.Module):
    """Pools only large maps: fx refuses the shape test (a traced value in control flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if h.shape[-1] > 8:
            h = F.max_pool2d(h, 2)
        return self.head(h.mean((2, 3)))


class Branch(nn.Module):
    """One branch of :class:`ShapeBranch` as a model fx can trace, with its weights."""

    def __init__(self, source: ShapeBranch, pool: bool) -> None:
        super().__init__()
        self.conv, self.head, self.pool = source.conv, source.head, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if self.pool:
            h = F.max_pool2d(h, 2)
        return self.head(h.mean((2, 3)))


def test_shape_dependent_control_flow_is_recorded_once_per_input_shape() -> None:
    model = seeded(ShapeBranch)
    with pytest.raises(TraceFailed, match="torch.fx"):
        plan_for(model)
    assert lrp_unsupported(model) is None  # its layers have rules; the recording on the input decides
    large, small = seeded(lambda: torch.randn(2, 1, 16, 16), 1), seeded(lambda: torch.randn(2, 1, 8, 8), 2)
    got_large, got_small = lrp(model, large, [0, 2]), lrp(model, small, [0, 2])
    assert got_large.shape == large.shape and got_small.shape == small.shape
    torch.testing.assert_close(got_large, lrp(Branch(model, pool=True), large, [0, 2]))
    torch.testing.assert_close(got_small, lrp(Branch(model, pool=False), small, [0, 2]))
    plans = record._RECORDED[model]
    assert len(plans) == 2  # one recording per input shape
    plan_large, plan_small = plans.values()
    assert sum(s.kind == "wta" for s in plan_large.steps) == 1 and sum(s.kind == "wta" for s in plan_small.steps) == 0
    lrp(model, large.flip(0), 1)
    assert len(plans) == 2 and plan_for(model, large) is plan_large and plan_for(model, small) is plan_small  # cached


class ValueBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


class Negated(nn.Module):
    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(-x)


def test_value_dependent_control_flow_is_recorded_for_every_input() -> None:
    model = seeded(ValueBranch)
    positive, negative = torch.rand(3, 4) + 0.1, -torch.rand(3, 4) - 0.1
    torch.testing.assert_close(lrp(model, positive, 0), lrp(model.fc, positive, 0))
    torch.testing.assert_close(lrp(model, negative, 0), lrp(Negated(model.fc), negative, 0))
    assert not record._RECORDED[model]  # a forward that reads values into Python is never cached


# ------------------------------------------------------------------- (4) nothing left behind, refusals


class Raises(nn.Module):
    def __init__(self, inside_layer: bool) -> None:
        super().__init__()
        self.fc, self.inside_layer = nn.Linear(4, 4), inside_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.shape[0] == 3:
            if self.inside_layer:
                return self.fc(h[:, :2])  # a shape error inside nn.Linear
            raise RuntimeError("boom")
        return h


@pytest.mark.parametrize("inside_layer", [False, True])
def test_no_hook_mode_or_patch_is_left_even_when_forward_raises(inside_layer: bool) -> None:
    model = Raises(inside_layer).train()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="raised RuntimeError"):
        lrp(model, torch.randn(3, 4), 0)
    assert not _left_behind(model)
    assert lrp(model, torch.randn(2, 4), 0).shape == (2, 4)  # other shapes take the other branch
    assert not _left_behind(model) and model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_hugging_face_model_is_left_as_it_was() -> None:
    model = _hf_bert("sdpa").train()
    before = copy.deepcopy(model.state_dict())
    lrp(model, torch.randint(1, 50, (2, 5)), 1)
    assert not _left_behind(model)
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class GroupNormBranch(ShapeBranch):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.norm(self.conv(x)).mean(1, keepdim=True))


class ThroughNumpy(ShapeBranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 8:
            x = torch.from_numpy(x.detach().numpy() * 2)  # the recording cannot see numpy
        return super().forward(x)


class HiddenInPlace(nn.Module):
    """Changes a tensor in place after taking a view of it: the view's values change unseen."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        flat = h.view(-1)
        h.mul_(2)
        return flat.view(h.shape)


def test_what_cannot_be_recorded_is_refused_by_name(recorded: None) -> None:
    x = torch.randn(2, 1, 16, 16)
    message = lrp_unsupported(GroupNormBranch())  # without an input: the layers decide
    assert message is not None and "module 'norm' of type torch.nn.GroupNorm" in message
    message = lrp_unsupported(GroupNormBranch(), x)
    assert message is not None and "module 'norm' of type torch.nn.GroupNorm" in message
    message = lrp_unsupported(ThroughNumpy(), x)
    assert message is not None and "not computed from the input" in message
    message = lrp_unsupported(HiddenInPlace(), torch.randn(2, 4))
    assert message is not None and "does not reproduce its output" in message
    with pytest.raises(TypeError, match="no rule for operation 'torch.exp' inside module '2'"):
        lrp(nn.Sequential(nn.Linear(4, 4), nn.Softplus(), _Exp()), torch.randn(2, 4), 0)
    assert not _left_behind(GroupNormBranch())


class _Exp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)
