"""Every method accepts what the callbacks accept as a model's output: a tensor, a dict with "logits", an
object with ``.logits`` (Hugging Face's ``ModelOutput``) or a tuple whose first item is the logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lightning_introspect.methods.attention import attention_rollout
from lightning_introspect.methods.attribution import attribute
from lightning_introspect.methods.emprt import emprt
from lightning_introspect.methods.faithfulness import deletion_curve
from lightning_introspect.methods.sanity_report import run_sanity_checks
from lightning_introspect.methods.targets import model_logits
from lightning_introspect.methods.token_attribution import token_attributions


class Output:
    """What a Hugging Face model returns: an object holding ``logits`` (and more)."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.hidden_states = logits, None


def wrap(kind: str, logits: torch.Tensor) -> Any:
    return {"tensor": logits, "dict": {"loss": None, "logits": logits}, "object": Output(logits), "tuple": (logits, logits * 0)}[kind]


class Cnn(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Any:
        return wrap(self.kind, self.head(self.conv(x).relu().mean((2, 3))))


class Text(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> Any:
        return wrap(self.kind, self.head(self.embed(ids).mean(1)))


class Vit(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.patch = nn.Conv2d(1, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> Any:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        t = t + self.attn(t, t, t)[0]
        return wrap(self.kind, self.head(t[:, 0]))


@pytest.mark.parametrize("kind", ["dict", "object", "tuple"])
def test_methods_read_the_logits_of_dicts_objects_and_tuples_as_of_a_tensor(kind: str) -> None:
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    plain, wrapped = Cnn("tensor"), Cnn(kind)
    methods = ["saliency", "grad_cam", "guided_backprop", "integrated_gradients"]
    want, got = attribute(plain, x, "pred", methods, layer="conv"), attribute(wrapped, x, "pred", methods, layer="conv")
    for m in methods:
        torch.testing.assert_close(got[m], want[m], rtol=0, atol=0)
    maps = want["saliency"]
    assert torch.equal(deletion_curve(wrapped, x, maps, "pred", steps=4).auc, deletion_curve(plain, x, maps, "pred", steps=4).auc)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert emprt(wrapped, x, "pred", ["saliency"], generator=g()).mean == emprt(plain, x, "pred", ["saliency"], generator=g()).mean
    report = run_sanity_checks(wrapped, x, methods=["saliency"], warn=False, run_emprt=False, class_check=True)
    again = run_sanity_checks(plain, x, methods=["saliency"], warn=False, run_emprt=False, class_check=True)
    assert report.verdict_scores == again.verdict_scores
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(2))
    t_want = token_attributions(Text("tensor"), ids, "pred", ["saliency"], embedding_layer="embed")["saliency"]
    t_got = token_attributions(Text(kind), ids, "pred", ["saliency"], embedding_layer="embed")["saliency"]
    assert torch.equal(t_got, t_want)
    v = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(attention_rollout(Vit(kind), v, gradient_weighted=True, target="pred"),
                       attention_rollout(Vit("tensor"), v, gradient_weighted=True, target="pred"))


def test_an_output_without_logits_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="a dict with a 'logits' tensor, an object with a `.logits` tensor"):
        model_logits({"scores": torch.zeros(2, 3)})


@pytest.mark.parametrize("kind", ["dict", "object"])
def test_feature_visualisation_reads_the_class_logit_of_a_wrapped_output(kind: str) -> None:
    from lightning_introspect.methods.featviz import class_logit, visualize_features

    def run(model: nn.Module) -> torch.Tensor:
        return visualize_features(model, class_logit(1), shape=(1, 8, 8), steps=3, seed=0).images

    assert torch.equal(run(Cnn(kind)), run(Cnn("tensor")))
