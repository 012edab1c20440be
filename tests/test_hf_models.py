"""Hugging Face ``transformers`` models, as users train them: ``ViTForImageClassification`` and
``BertForSequenceClassification`` built from tiny configs (random weights, nothing downloaded) inside a
LightningModule whose forward returns the model's output object (``.logits``).

Checked: the methods accept the output objects and agree with captum / a computation by hand on the same
inputs (Grad-CAM on the reshaped patch grid, attention rollout of the model's own attention
probabilities, the same map under the eager and the SDPA attention, integrated gradients on the word
embeddings); the default callback set fits both models and every callback logs its documented tags;
``"auto"`` choices pick the encoder blocks, never the top-level model.

``transformers`` is a test-only dependency (the ``dev`` extra); without it these tests are skipped.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_introspect._lightning import LightningModule
from lightning_introspect.config import introspection_callbacks
from lightning_introspect.methods.attribution import (
    attention_rollout,
    auto_layer,
    grad_cam,
    grad_rollout,
    integrated_gradients,
    saliency,
)
from lightning_introspect.methods.token_attribution import find_embedding, gradient_x_embedding
from tests.helpers import quick_trainer, read_events
from tests.test_attention_methods import _np_grad_rollout, _np_rollout
from tests.test_model_zoo import DOCUMENTED_TAGS, all_tags, check_each_callback_logs_or_skips_once
from tests.zoo import TensorDataModule, digits, split, tokens

transformers = pytest.importorskip("transformers")
captum_attr = pytest.importorskip("captum.attr")

IMAGE, PATCH, GRID = 16, 4, 4  # a 4x4 grid of patches and a class token: 17 tokens


def tiny_vit(attn_implementation: str = "eager", layers: int = 2, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.ViTConfig(
        image_size=IMAGE, patch_size=PATCH, num_channels=1, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, num_labels=10, attn_implementation=attn_implementation,
    )
    return transformers.ViTForImageClassification(config).eval()


def tiny_bert(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3,
        max_position_embeddings=16,
    )
    return transformers.BertForSequenceClassification(config).eval()


def vit_blocks(model: Any, prefix: str = "") -> list[str]:
    """The names of the encoder blocks (``vit.layers.i`` in transformers 5, ``vit.encoder.layer.i`` before)."""
    return [prefix + name for name, m in model.named_modules() if type(m).__name__ == "ViTLayer"]


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _logits_of(model: Any) -> Any:
    """What captum needs: a function returning the logits tensor."""
    return lambda x: model(x).logits


# --------------------------------------------------------------------------------------------- methods
def test_auto_layer_picks_the_block_before_the_last_on_a_class_token_head(caplog: Any) -> None:
    # ViT's classifier reads only the class token of the last block: its patch tokens reach nothing
    with caplog.at_level("INFO", logger="lightning_introspect.methods.attribution"):
        for layers in (2, 3):
            model = tiny_vit(layers=layers)
            assert auto_layer(model, _images()) == vit_blocks(model)[-2]
    assert "patch tokens" in caplog.text


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_grad_cam_on_hf_vit_blocks_equals_grad_cam_on_the_reshaped_grid(attn: str) -> None:
    model, x, target = tiny_vit(attn), _images(), [1, 2, 3]
    layer = vit_blocks(model)[0]
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x).logits
    finally:
        handle.remove()
    act = captured[0] if isinstance(captured[0], torch.Tensor) else captured[0][0]  # a layer may return (hidden, ...)
    (grad,) = torch.autograd.grad(logits.gather(1, torch.tensor(target).view(-1, 1)).sum(), act)
    grid = act[:, 1:].reshape(3, GRID, GRID, -1).permute(0, 3, 1, 2).detach()
    weights = grad[:, 1:].reshape(3, GRID, GRID, -1).permute(0, 3, 1, 2).mean(dim=(2, 3), keepdim=True)
    by_hand = F.interpolate(F.relu((weights * grid).sum(1, keepdim=True)), size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)
    ours = grad_cam(model, x, target, layer)
    assert ours.shape == (3, 1, IMAGE, IMAGE)
    torch.testing.assert_close(ours, by_hand, rtol=1e-5, atol=1e-6)
    assert float(ours.abs().max()) > 0


def test_attention_rollout_equals_the_rollout_of_the_models_own_attention_probabilities() -> None:
    eager, x = tiny_vit("eager"), _images()
    with torch.no_grad():
        probs = [a.numpy() for a in eager(x, output_attentions=True).attentions]
    assert len(probs) == 2 and probs[0].shape == (3, 2, 17, 17)
    expected = _np_rollout(probs)[:, 0, 1:].reshape(3, 1, GRID, GRID)
    np.testing.assert_allclose(attention_rollout(eager, x, upsample=False).numpy(), expected, rtol=1e-5, atol=1e-6)
    # the SDPA kernel hides the probabilities; the same weights give the same map
    sdpa = tiny_vit("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    torch.testing.assert_close(attention_rollout(sdpa, x), attention_rollout(eager, x), rtol=1e-5, atol=1e-6)


def test_gradient_weighted_rollout_equals_autograd_on_the_models_own_probabilities() -> None:
    model, x, target = tiny_vit("eager"), _images(), [0, 4, 9]
    out = model(x, output_attentions=True)
    score = out.logits.gather(1, torch.tensor(target).view(-1, 1)).sum()
    grads = torch.autograd.grad(score, out.attentions)
    expected = _np_grad_rollout([a.detach().numpy() for a in out.attentions], [g.numpy() for g in grads])[:, 0, 1:]
    got = grad_rollout(model, x, target, upsample=False)
    np.testing.assert_allclose(got.numpy(), expected.reshape(3, 1, GRID, GRID), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(attention_rollout(model, x, target=target, gradient_weighted=True, upsample=False), got)


def test_saliency_and_integrated_gradients_on_hf_vit_equal_captum() -> None:
    model, x, target = tiny_vit("sdpa"), _images(), [1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_saliency = captum_attr.Saliency(_logits_of(model)).attribute(x.clone().requires_grad_(), target=target, abs=True)
        theirs_ig = captum_attr.IntegratedGradients(_logits_of(model)).attribute(x, target=target, n_steps=16, method="riemann_right")
    torch.testing.assert_close(saliency(model, x, target).abs(), theirs_saliency.amax(1, keepdim=True), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(integrated_gradients(model, x, target, steps=16, method="riemann_right"), theirs_ig, rtol=1e-4, atol=1e-6)


def test_token_attributions_on_bert_equal_captum_at_the_word_embeddings() -> None:
    model = tiny_bert()
    ids = torch.randint(1, 60, (4, 12), generator=torch.Generator().manual_seed(2))
    target = [0, 1, 2, 1]
    assert find_embedding(model, ids) == "bert.embeddings.word_embeddings"  # not the position / token-type tables
    words = model.bert.embeddings.word_embeddings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gxa = captum_attr.LayerGradientXActivation(_logits_of(model), words).attribute(ids, target=target)
        lig = captum_attr.LayerIntegratedGradients(_logits_of(model), words).attribute(
            ids, baselines=torch.zeros_like(ids), target=target, n_steps=8, method="riemann_right"
        )
    torch.testing.assert_close(gradient_x_embedding(model, ids, target), gxa.sum(-1), rtol=1e-5, atol=1e-6)
    ours = integrated_gradients(model, ids, target, steps=8, baseline=0, method="riemann_right")  # BERT's [PAD] id is 0
    assert ours.shape == (4, 12)
    torch.testing.assert_close(ours, lig.sum(-1), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ the default set
class HFClassifier(LightningModule):
    """A LightningModule as HF users write it: forward returns the model's output object."""

    def __init__(self, net: Any, text: bool) -> None:
        super().__init__()
        self.net, self.text = net, text

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(input_ids=x) if self.text else self.net(pixel_values=x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).logits, y)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out.logits, y))
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_the_default_set_serves_hf_models_returning_output_objects(tmp_path: Any, kind: str) -> None:
    if kind == "vit":
        module, dm = HFClassifier(tiny_vit("sdpa"), text=False), TensorDataModule(*digits())
    else:
        module, dm = HFClassifier(tiny_bert(), text=True), TensorDataModule(*split(*tokens(), n_train=128))
    callbacks = introspection_callbacks({})
    trainer = quick_trainer(tmp_path, callbacks, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=dm)
    assert trainer.state.finished and trainer.current_epoch == 2
    assert not [str(w.message) for w in caught if "'lrp' is skipped" in str(w.message)]
    outcome = check_each_callback_logs_or_skips_once(str(tmp_path), callbacks, caught, DOCUMENTED_TAGS)
    expected_skips = {"FeatureVisualization"} if kind == "bert" else set()  # token ids: no image to optimise
    assert {name for name, result in outcome.items() if result != "logged"} == expected_skips, outcome
    tags = all_tags(str(tmp_path))
    probes = {cb for cb in callbacks if type(cb).__name__ == "LinearProbes"}.pop()
    # probes on the encoder blocks (a block's output is its hidden states), never on the output object
    blocks = vit_blocks(module.net, "net.") if kind == "vit" else [
        f"net.{name}" for name, m in module.net.named_modules() if type(m).__name__ == "BertLayer"]
    assert set(blocks) <= set(probes.layer_names), probes.layer_names
    assert all(f"introspect/probes/{name}/accuracy" in tags for name in probes.layer_names)
    if kind == "vit":
        # LRP through the forward recorded on the samples (torch.fx cannot trace HF models)
        assert {"introspect/attributions/grad_cam", "introspect/attributions/saliency", "introspect/attributions/lrp"} <= tags
        attributions = next(cb for cb in callbacks if type(cb).__name__ == "Attributions")
        assert attributions.resolved_cam_layer == vit_blocks(module.net, "net.")[0]  # the block before the class-token head's last
        assert "introspect/attributions/layer/text_summary" in read_events(str(tmp_path))["text"]
    else:
        assert {"introspect/attributions/integrated_gradients/text_summary", "introspect/attributions/saliency/text_summary",
                "introspect/attributions/lrp/text_summary"} <= tags
