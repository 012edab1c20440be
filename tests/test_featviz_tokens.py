"""Feature visualisation on vision transformers: embedding dimensions over the patch tokens.

Known answers come from a hand-built "ViT-like" model whose blocks are exact identities (attention and MLP
outputs zeroed, residuals kept) and whose patch embedding makes embedding dimension 0 the mean of the red
channel over each patch: the channel objective of a block is then the red mean averaged over the patches,
computed here by hand. The class token (and the register tokens) hold large constants, so an objective or
a channel choice that let them in would be far off.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect._lightning import pl
from lightning_introspect._torch.hooks import layer_outputs
from lightning_introspect.callbacks.feature_visualization import FeatureVisualization
from lightning_introspect.methods.featviz import (
    class_logit,
    objective_values,
    token_channel,
    visualize_features,
)
from lightning_introspect.methods.featviz.layers import PatchTokens, patch_token_layouts, vit_blocks
from lightning_introspect.methods.featviz_plan import check_units
from tests.helpers import quick_trainer, read_events
from tests.zoo import Classifier, TinyViT, digits_dm

SIZE, PATCH, DIM = 16, 4, 8
CLS_VALUE = 100.0  # the class token's value in every dimension: far from any patch value


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class IdentityBlock(nn.Module):
    """A transformer block without norms whose attention and MLP add exactly zero to the residual: output == input."""

    def __init__(self, dim: int = DIM, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.mlp = nn.Linear(dim, dim)
        with torch.no_grad():
            for p in (self.attn.out_proj.weight, self.attn.out_proj.bias, self.mlp.weight, self.mlp.bias):
                p.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


class RedMeanViT(nn.Module):
    """RGB ``SIZE x SIZE`` -> ``PATCH x PATCH`` patches; dimension 0 = the patch's mean red, 1 = its mean green,
    the rest 0; a class token and ``registers`` register tokens of value ``CLS_VALUE``; identity blocks."""

    def __init__(self, registers: int = 0, depth: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        with torch.no_grad():
            self.patch_embed.weight.zero_()
            self.patch_embed.bias.zero_()
            self.patch_embed.weight[0, 0] = 1.0 / PATCH**2  # red
            self.patch_embed.weight[1, 1] = 1.0 / PATCH**2  # green
        self.prefix = nn.Parameter(torch.full((1, 1 + registers, DIM), CLS_VALUE))
        self.blocks = nn.Sequential(*[IdentityBlock(batch_first=batch_first) for _ in range(depth)])
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        out = self.blocks(tokens)
        return self.head(out[:, 0] if self.batch_first else out[0])


def red_mean_over_patches(images: torch.Tensor) -> torch.Tensor:
    """By hand: the mean red of each patch (unfolded), then the mean over the patches, per image."""
    patches = F.unfold(images[:, :1], kernel_size=PATCH, stride=PATCH)  # (N, PATCH*PATCH, P)
    return patches.mean(1).mean(1)


@pytest.mark.parametrize("registers", [0, 4])
def test_token_channel_is_the_patch_average_of_a_known_function_and_optimising_raises_it(registers: int) -> None:
    torch.manual_seed(0)
    model = RedMeanViT(registers=registers)
    images = torch.rand(3, 3, SIZE, SIZE)
    layouts = patch_token_layouts(model, images, ["blocks.0", "blocks.1", "patch_embed"])
    assert layouts == {name: PatchTokens(1 + registers, (4, 4), 17 + registers, DIM) for name in ("blocks.0", "blocks.1")}

    objective = token_channel("blocks.1", 0, prefix=layouts["blocks.1"].prefix)
    expected = red_mean_over_patches(images)
    assert torch.allclose(objective_values(model, objective, images), expected, atol=1e-6)
    # letting the prefix tokens in would be far off: the test can tell the two apart
    with_prefix = objective_values(model, token_channel("blocks.1", 0, prefix=0), images)
    assert (with_prefix - expected).abs().min() > 1.0

    result = visualize_features(model, objective, shape=(2, 3, SIZE, SIZE), steps=12, lr=0.1, value_range=(0.0, 1.0))
    assert (result.objective > result.initial_objective + 0.1).all()
    assert torch.allclose(result.objective, red_mean_over_patches(result.images), atol=1e-5)


def test_sequence_first_tokens_are_read_as_tokens() -> None:
    torch.manual_seed(0)
    model = RedMeanViT(batch_first=False)
    images = torch.rand(2, 3, SIZE, SIZE)
    layouts = patch_token_layouts(model, images, ["blocks.1"])
    assert layouts["blocks.1"].sequence_first and layouts["blocks.1"].prefix == 1
    objective = token_channel("blocks.1", [0, 1], prefix=1, sequence_first=True)
    green = F.unfold(images[:, 1:2], kernel_size=PATCH, stride=PATCH).mean(1).mean(1)
    expected = torch.stack([red_mean_over_patches(images)[0], green[1]])
    assert torch.allclose(objective_values(model, objective, images), expected, atol=1e-6)


def test_auto_layers_and_channels_on_a_vit_use_the_blocks_and_leave_the_class_token_out() -> None:
    torch.manual_seed(0)
    model = RedMeanViT(depth=3)
    with torch.no_grad():
        model.prefix[0, 0, 2] = 1000.0  # a class token that, were it counted, would make dimension 2 the most varied
    images = torch.rand(4, 3, SIZE, SIZE)
    assert vit_blocks(model, images) == ["blocks.0", "blocks.1", "blocks.2"]

    cb = FeatureVisualization(num_layers=2, num_channels=2, classes=None, on_error="raise")
    assert cb.resolve(model, images) == ["blocks.1", "blocks.2"]  # spread over the blocks, the last one included
    cb.validate(model, images)
    chosen = cb.choose_channels(model, images)
    assert chosen == {"blocks.1": [0, 1], "blocks.2": [0, 1]}  # only red and green vary over the patches
    tokens, _ = layer_outputs(model, images, ["blocks.2"])
    spread_with_cls = tokens["blocks.2"].flatten(0, 1).std(0)  # every token counted: dimension 2 would win
    assert int(spread_with_cls.argmax()) == 2


def test_channels_out_of_range_name_embedding_dimensions() -> None:
    torch.manual_seed(0)
    model, x = TinyViT(), torch.randn(2, 1, 16, 16)
    cb = FeatureVisualization(channels=[3, 64], classes=None, on_error="raise")
    assert cb.resolve(model, x) == ["encoder"]
    with pytest.raises(ValueError, match=r"Expected `channels` in \[0, 31\] \(layer 'encoder' has 32 embedding dimensions\), but got \[64\]\."):
        cb.validate(model, x)
    with pytest.raises(ValueError, match=r"layer 'blocks.1' has 64 embedding dimensions\), but got \[64\]"):
        check_units({"blocks.1": (2, 17, 64)}, (2, 10), [64], None, tokens={"blocks.1"})
    # the same shape read as a conv / Conv1d output has 17 channels
    with pytest.raises(ValueError, match=r"has 17 channels"):
        check_units({"blocks.1": (2, 17, 64)}, (2, 10), [64], None)


def test_class_objective_works_on_a_vit() -> None:
    torch.manual_seed(0)
    model = TinyViT()
    result = visualize_features(model, class_logit([3, 7]), shape=(2, 1, 16, 16), steps=10, lr=0.1, value_range=(-2.0, 2.0))
    assert (result.objective > result.initial_objective).all()
    with torch.no_grad():
        logits = model.eval()(result.model_inputs)
    assert torch.allclose(result.objective, logits[[0, 1], [3, 7]], atol=1e-4)


def _fit(tmp_path: Any, callbacks: list[Any]) -> tuple[nn.Module, Any]:
    pl.seed_everything(0, verbose=False)
    torch.manual_seed(0)
    model = Classifier(TinyViT(), lr=3e-3)
    trainer = quick_trainer(tmp_path, callbacks, epochs=2)
    trainer.fit(model, datamodule=digits_dm(n_train=64, n_val=32))
    return model, trainer


def test_callback_at_defaults_on_tinyvit_logs_images_and_leaves_training_bitwise_unchanged(tmp_path: Any) -> None:
    plain, _ = _fit(tmp_path / "plain", [])
    cb = FeatureVisualization(on_error="raise")
    watched, trainer = _fit(tmp_path / "watched", [cb])

    a, b = plain.state_dict(), watched.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in watched.modules())

    assert cb.layer_names == ["net.encoder"]
    assert cb.token_layouts["net.encoder"] == PatchTokens(1, (4, 4), 17, 32)
    dims = cb.chosen["net.encoder"]
    assert len(dims) == 3 and all(0 <= d < 32 for d in dims)
    events = read_events(trainer.logger.log_dir)
    images = set(events["images"])
    assert {f"introspect/featviz/net.encoder/{d}" for d in dims} <= images
    assert {f"introspect/featviz/class/{c}" for c in range(10)} <= images
    assert any(tag.startswith("introspect/featviz/table") for tag in events["text"])
    assert "net.encoder: embedding dimensions" in cb.table(cb.unit_keys(), cb.results)
    assert "mean over the 4x4 patch tokens; 1 prefix token left out" in cb.table(cb.unit_keys(), cb.results)
    # every channel image raised its embedding dimension's patch mean (the `none` column: plain pixels)
    none = cb.results["none"]
    assert (none.objective[:3] > none.initial_objective[:3]).all()
