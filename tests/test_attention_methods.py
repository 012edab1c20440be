"""Attention capture, attention rollout and gradient-weighted rollout (``methods/attention.py``).

Checked against references computed independently: ``nn.MultiheadAttention(need_weights=True,
average_attn_weights=False)`` on the same layer input, a NumPy implementation of the papers' formulas,
``torch.autograd.grad`` through a hand-written forward pass that keeps the probabilities, and a model built
so that the answer is known. Then the training invariants and the ``Attributions`` callback's tags.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.methods.attention import (
    _recording,
    attention_maps,
    attention_problem,
    attention_rollout,
    grad_rollout,
    token_grid,
)
from lightning_introspect.methods.attribution import METHODS, attribute
from tests.test_method_side_effects import _assert_unchanged, _snapshot
from tests.zoo import TinyViT, small_cnn


# ------------------------------------------------------------------------------------------ models
class HandAttention(nn.Module):
    """timm-style multi-head attention: ``softmax(q k^T / sqrt(d)) v`` written out, or through SDPA."""

    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attend(self, x):
        """(output, probabilities): the reference path the tests differentiate through."""
        q, k, v = self.split(x)
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj((probs @ v).transpose(1, 2).flatten(2)), probs

    def forward(self, x):
        if self.sdpa:
            q, k, v = self.split(x)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return self.attend(x)[0]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sdpa: bool = False) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), HandAttention(dim, heads, sdpa)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class HandViT(nn.Module):
    """Conv patch embedding (4x4 patches of 16x16: a 4x4 grid), ``cls`` class token(s), ``registers``
    register tokens, ``depth`` pre-norm blocks; head on the class token, or on the mean of the tokens."""

    def __init__(self, cls: bool = True, registers: int = 4, depth: int = 2, heads: int = 2, dim: int = 16, sdpa: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, 4, stride=4)
        self.prefix = nn.Parameter(0.5 * torch.randn(1, int(cls) + registers, dim))
        self.cls = cls
        self.pos = nn.Parameter(0.5 * torch.randn(1, 16 + int(cls) + registers, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, sdpa) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 3)

    def tokens(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.prefix.expand(len(x), -1, -1), t], 1) + self.pos

    def pool(self, x):
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls else x.mean(1))

    def forward(self, x):
        return self.pool(self.blocks(self.tokens(x)))

    def manual(self, x):
        """The same forward, keeping each block's probabilities (N, heads, T, T)."""
        t, probs = self.tokens(x), []
        for blk in self.blocks:
            out, p = blk.attn.attend(blk.norm1(t))
            t = t + out
            t = t + blk.mlp(blk.norm2(t))
            probs.append(p)
        return self.pool(t), probs


class StackedViT(nn.Module):
    """TinyViT with two ``nn.TransformerEncoderLayer`` (post-norm; ``batch_first`` either way)."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        self.vit = TinyViT()
        self.batch_first = batch_first
        layer = dict(nhead=2, dim_feedforward=64, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.layers = nn.Sequential(nn.TransformerEncoderLayer(32, **layer), nn.TransformerEncoderLayer(32, **layer))

    def tokens(self, x):
        v = self.vit
        t = v.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([v.cls_token.expand(len(x), -1, -1), t], 1) + v.pos_embed

    def forward(self, x):
        t = self.tokens(x)
        t = self.layers(t if self.batch_first else t.transpose(0, 1))
        t = t if self.batch_first else t.transpose(0, 1)
        return self.vit.head(self.vit.norm(t)[:, 0])


def _mha_manual(layer: nn.TransformerEncoderLayer, x):
    """A post-norm ``TransformerEncoderLayer`` (batch first) written out; returns (output, probs)."""
    mha, (n, t, e) = layer.self_attn, x.shape
    h = mha.num_heads
    q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(n, t, h, e // h).transpose(1, 2) for z in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(e // h), dim=-1)
    out = mha.out_proj((probs @ v).transpose(1, 2).reshape(n, t, e))
    x = layer.norm1(x + out)
    return layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x)))), probs


def _images(n=3, seed=0):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- NumPy refs
def _np_rollout(probs, fusion="mean", discard=0.0):
    result = None
    for a in probs:
        a = {"mean": a.mean(1), "max": a.max(1), "min": a.min(1)}[fusion].astype(np.float64)
        drop = int(math.floor(discard * a.shape[-1]))
        if drop:
            a = a.copy()
            for n in range(a.shape[0]):
                for i in range(a.shape[1]):
                    a[n, i, np.argsort(a[n, i], kind="stable")[:drop]] = 0.0
        a = a + np.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        result = a if result is None else np.einsum("nij,njk->nik", a, result)
    return result


def _np_grad_rollout(probs, grads):
    result = None
    for a, g in zip(probs, grads):
        cam = np.maximum(a.astype(np.float64) * g, 0).mean(1) + np.eye(a.shape[-1])
        result = cam if result is None else np.einsum("nij,njk->nik", cam, result)
    return result


def _grid(scores, k):
    return scores[:, k:].reshape(len(scores), 1, 4, 4)


# ---------------------------------------------------------------------------------------- layout
def test_token_grid_rule():
    assert token_grid(16, (16, 16)) == (0, 4, 4)
    assert token_grid(17, (16, 16)) == (1, 4, 4)
    assert token_grid(21, (16, 16)) == (5, 4, 4)  # class token + 4 registers
    assert token_grid(26, (16, 16)) == (10, 4, 4)  # 25 = 5x5 does not tile 16x16; 1 + 9 registers does
    assert token_grid(26, (20, 20)) == (1, 5, 5)  # ambiguous: the smallest prefix wins...
    assert token_grid(26, (20, 20), num_prefix_tokens=10) == (10, 4, 4)  # ...unless stated
    assert token_grid(9, (16, 32)) == (1, 2, 4)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        token_grid(17, (16, 16), num_prefix_tokens=2)


# --------------------------------------------------------------------------------------- capture
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_captured_probabilities_equal_need_weights(batch_first, norm_first):
    torch.manual_seed(0)
    model = StackedViT(batch_first=batch_first, norm_first=norm_first).eval()
    x = _images()
    maps = attention_maps(model, x)
    assert [m.layer for m in maps] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(m.source == "multi_head_attention" for m in maps)
    # the reference: each layer's MultiheadAttention asked for its per-head weights on the layer's input
    inputs = []
    with torch.no_grad():
        handles = [layer.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for layer in model.layers]
        plain = model(x)
        for h in handles:
            h.remove()
        for layer, t, m in zip(model.layers, inputs, maps):
            src = layer.norm1(t) if norm_first else t
            _, ref = layer.self_attn(src, src, src, need_weights=True, average_attn_weights=False)
            assert ref.shape == m.probs.shape == (3, 2, 17, 17)
            torch.testing.assert_close(m.probs, ref, rtol=0, atol=1e-6)
        with _recording(model, 3):  # the model's output is unchanged while the probabilities are recorded
            torch.testing.assert_close(model(x), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sdpa", [False, True])
def test_captured_hand_written_and_sdpa_attention(sdpa):
    torch.manual_seed(0)
    model = HandViT(sdpa=sdpa).eval()
    x = _images()
    maps = attention_maps(model, x)
    with torch.no_grad():
        ref_out, ref = model.manual(x)
        plain = model(x)
        with _recording(model, 3):
            recorded = model(x)
    assert [m.layer for m in maps] == ["blocks.0.attn", "blocks.1.attn"]
    assert {m.source for m in maps} == {"scaled_dot_product_attention" if sdpa else "softmax"}
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m.probs, r, rtol=0, atol=1e-6)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref_out, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_mask", "causal", "scale", "gqa"])
def test_explicit_sdpa_equals_torch(case):
    from lightning_introspect.methods.attention import _explicit_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g) for _ in range(3))
    kwargs: dict = {}
    if case == "bool_mask":
        kwargs["attn_mask"] = torch.rand(6, 6, generator=g) > 0.3
        kwargs["attn_mask"].fill_diagonal_(True)
    elif case == "float_mask":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 6, generator=g)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.3
    elif case == "gqa":
        k, v, kwargs["enable_gqa"] = k[:, :2], v[:, :2], True
    out, probs = _explicit_sdpa(q, k, v, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6))


class _PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.register_buffer("pad", torch.tensor([[False] * 5, [False, False, False, True, True]]))

    def forward(self, x):
        return self.layer(x, src_key_padding_mask=self.pad)


def test_captured_probabilities_with_a_key_padding_mask():
    torch.manual_seed(0)
    model = _PaddedEncoder().eval()
    x = torch.randn(2, 5, 8)
    (m,) = attention_maps(model, x)
    with torch.no_grad():
        _, ref = model.layer.self_attn(x, x, x, key_padding_mask=model.pad, need_weights=True, average_attn_weights=False)
        plain = model(x)
        with _recording(model, 2):
            recorded = model(x)
    torch.testing.assert_close(m.probs, ref, rtol=0, atol=1e-6)
    assert float(m.probs[1, :, :, 3:].abs().max()) == 0.0  # padded keys get no attention
    torch.testing.assert_close(recorded[0], plain[0], rtol=1e-5, atol=1e-6)  # the fast path leaves padded rows undefined


def test_zoo_attention_single_head_three_dim_scores():
    from tests.zoo import Attention

    attn = Attention(8)
    x = torch.randn(2, 5, 8)
    (m,) = attention_maps(attn, x)
    q, k, _ = attn.qkv(x).chunk(3, dim=-1)
    ref = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    assert m.probs.shape == (2, 1, 5, 5)
    torch.testing.assert_close(m.probs[:, 0], ref.detach(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize(("fusion", "discard"), [("mean", 0.0), ("max", 0.0), ("min", 0.25), ("mean", 0.5)])
def test_rollout_equals_numpy_formula(fusion, discard):
    torch.manual_seed(1)
    model = StackedViT().eval()
    x = _images()
    inputs = []
    with torch.no_grad():
        handles = [layer.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for layer in model.layers]
        model(x)
        for h in handles:
            h.remove()
        probs = [layer.self_attn(t, t, t, need_weights=True, average_attn_weights=False)[1].numpy() for layer, t in zip(model.layers, inputs)]
    expected = _grid(_np_rollout(probs, fusion, discard)[:, 0], 1)
    grid = attention_rollout(model, x, head_fusion=fusion, discard_ratio=discard, upsample=False)
    np.testing.assert_allclose(grid.numpy(), expected, rtol=1e-5, atol=1e-6)
    full = attention_rollout(model, x, head_fusion=fusion, discard_ratio=discard)
    torch.testing.assert_close(full, F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False))
    # the class-independent map: the target does not matter
    torch.testing.assert_close(attribute(model, x, 2, ["attention_rollout"], options={"attention_rollout": {"head_fusion": fusion,
                               "discard_ratio": discard}})["attention_rollout"], full)


def test_rollout_without_class_token_uses_the_mean_row():
    torch.manual_seed(0)
    model = HandViT(cls=False, registers=0).eval()
    x = _images()
    with torch.no_grad():
        _, probs = model.manual(x)
    expected = _grid(_np_rollout([p.numpy() for p in probs]).mean(1), 0)
    np.testing.assert_allclose(attention_rollout(model, x, upsample=False).numpy(), expected, rtol=1e-5, atol=1e-6)


class CopyPatch(nn.Module):
    """A class token that attends (almost) only to patch ``p`` in every layer; every patch token attends
    to itself. Tokens: one-hot positions in the first ``T`` channels, the patch's mean pixel after them."""

    def __init__(self, patch: int, depth: int = 2) -> None:
        super().__init__()
        self.depth, t = depth, 17
        pos = torch.eye(t)
        query = torch.eye(t)
        query[0] = 0.0
        query[0, 1 + patch] = 30.0  # the class token's query matches the key of patch p
        query[1:, 1:] *= 30.0  # each patch's query matches its own key
        self.register_buffer("pos", pos)
        self.query = nn.Parameter(query)  # a weight: the probabilities are in the autograd graph, as in any ViT

    def forward(self, x):
        patches = F.avg_pool2d(x, 4).flatten(1)  # (N, 16)
        values = torch.cat([torch.zeros(len(x), 1), patches], 1).unsqueeze(-1)  # (N, 17, 1)
        for _ in range(self.depth):
            q, k = self.pos @ self.query, self.pos  # row i: the query / key of token i
            scores = (q @ k.T).expand(len(x), -1, -1)  # (N, 17, 17)
            values = torch.softmax(scores, dim=-1) @ values + values
        return torch.cat([values[:, 0], -values[:, 0]], 1)


@pytest.mark.parametrize("patch", [0, 6, 15])
def test_rollout_peaks_on_the_copied_patch(patch):
    model = CopyPatch(patch)
    x = _images().abs() + 0.1  # positive pixels: the class score grows with the copied patch
    grid = attention_rollout(model, x, upsample=False)
    assert (grid.flatten(1).argmax(1) == patch).all()
    expected = 0.25 + 0.5  # R = A_hat^2, class row: 1/4 (through itself twice) + 1/2 (via patch p, then p to p)
    np.testing.assert_allclose(grid.flatten(1)[:, patch].numpy(), expected, atol=1e-6)
    cam = grad_rollout(model, x, 0, upsample=False)
    assert (cam.flatten(1).argmax(1) == patch).all()
    big = attention_rollout(model, x)
    rows, cols = divmod(patch, 4)
    peak = big[0, 0].argmax()
    assert divmod(int(peak), 16)[0] // 4 == rows and divmod(int(peak), 16)[1] // 4 == cols


# ----------------------------------------------------------------------------------- grad rollout
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("sdpa", [False, True])
def test_grad_rollout_equals_autograd_bruteforce(cls, sdpa):
    torch.manual_seed(2)
    model = HandViT(cls=cls, registers=4 if cls else 0, sdpa=sdpa).eval()
    x = _images()
    target = [0, 2, 1]
    logits, probs = model.manual(x)
    score = logits.gather(1, torch.tensor(target).view(-1, 1)).sum()
    grads = torch.autograd.grad(score, probs)
    relevance = _np_grad_rollout([p.detach().numpy() for p in probs], [g.numpy() for g in grads])
    k = 5 if cls else 0
    expected = _grid(relevance[:, 0] if cls else relevance.mean(1), k)
    got = grad_rollout(model, x, target, upsample=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert float(got.abs().sum()) > 0
    via_attribute = attribute(model, x, target, ["grad_rollout"], options={"grad_rollout": {"upsample": False}})["grad_rollout"]
    torch.testing.assert_close(via_attribute, got)


def test_grad_rollout_through_multihead_attention_equals_bruteforce():
    torch.manual_seed(3)
    model = StackedViT().eval()
    x = _images()
    t, probs = model.tokens(x), []
    for layer in model.layers:
        t, p = _mha_manual(layer, t)
        probs.append(p)
    logits = model.vit.head(model.vit.norm(t)[:, 0])
    torch.testing.assert_close(logits, model(x), rtol=1e-5, atol=1e-5)
    pred = logits.argmax(1)
    grads = torch.autograd.grad(logits.gather(1, pred.view(-1, 1)).sum(), probs)
    expected = _grid(_np_grad_rollout([p.detach().numpy() for p in probs], [g.numpy() for g in grads])[:, 0], 1)
    got = attention_rollout(model, x, "pred", gradient_weighted=True, upsample=False)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- errors
def test_no_attention_is_refused_with_a_clear_error():
    cnn = small_cnn()
    x = _images()
    for name in ("attention_rollout", "grad_rollout"):
        with pytest.raises(ValueError, match="no self-attention"):
            attribute(cnn, x, "pred", [name])
    assert "no self-attention" in attention_problem(cnn, x)
    assert "images" in attention_problem(TinyViT(), torch.randn(2, 16))
    assert attention_problem(TinyViT(), x) is None
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(TinyViT(), x, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        attention_rollout(TinyViT(), x, discard_ratio=1.0)
    with pytest.raises(ValueError, match="Unknown option"):
        attribute(TinyViT(), x, "pred", ["attention_rollout"], options={"attention_rollout": {"steps": 3}})
    assert {"attention_rollout", "grad_rollout"} <= set(METHODS)


# ------------------------------------------------------------------------------- no interference
class _TrainingViT(HandViT):
    """A ViT that trains: dropout in the blocks, a frozen parameter, existing ``.grad``; may raise."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__(sdpa=False)
        self.drop = nn.Dropout(0.5)
        self.fail = fail

    def forward(self, x):
        t = self.drop(self.blocks(self.tokens(x)))
        if self.fail:
            raise RuntimeError("boom in forward")
        return self.pool(t)


def _target_that_raises(output):
    raise RuntimeError("boom in target")


_CALLS = {
    "attention_rollout": lambda net, x, t: attention_rollout(net, x),
    "grad_rollout": lambda net, x, t: grad_rollout(net, x, t),
    "grad_cam(tokens)": lambda net, x, t: METHODS["grad_cam"](net, x, t, "blocks.0"),
    "attribute": lambda net, x, t: attribute(net, x, t, ["attention_rollout", "grad_rollout", "grad_cam", "saliency"], layer="auto"),
}


@pytest.mark.parametrize("case", ["ok", "ok_no_grad", "model_raises", "target_raises"])
@pytest.mark.parametrize("name", list(_CALLS))
def test_methods_leave_no_trace(name, case):
    if case == "target_raises" and name == "attention_rollout":
        pytest.skip("plain rollout does not use the target")
    torch.manual_seed(0)
    net = _TrainingViT(fail=case == "model_raises")
    net.train()
    net.pos.requires_grad_(False)  # a frozen parameter stays frozen
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    x = _images(4)
    flags = [p.requires_grad for p in net.parameters()]
    target = _target_that_raises if case == "target_raises" else [0, 1, 2, 0]
    with torch.no_grad() if case == "ok_no_grad" else torch.enable_grad():
        before = _snapshot(net, x)
        if case.startswith("ok"):
            out = _CALLS[name](net, x, target)
            for m in out.values() if isinstance(out, dict) else [out]:
                assert m.shape[0] == 4 and torch.isfinite(m).all() and not m.requires_grad
        else:
            with pytest.raises(RuntimeError, match="boom"):
                _CALLS[name](net, x, target)
        _assert_unchanged(net, x, before)
    assert [p.requires_grad for p in net.parameters()] == flags


def test_inference_mode_gives_the_same_maps():
    """Lightning runs validation hooks under torch.inference_mode(): the rollouts must still work."""
    torch.manual_seed(0)
    model = HandViT().eval()
    x = _images()
    names = ["attention_rollout", "grad_rollout", "grad_cam"]
    outside = attribute(model, x, "pred", names, layer="blocks.0")
    with torch.inference_mode():
        xi = x.clone()
        inside = attribute(model, xi, "pred", names, layer="blocks.0")
    for name in names:
        torch.testing.assert_close(inside[name], outside[name])


# -------------------------------------------------------------------------------------- callback
def test_attributions_callback_logs_rollouts_on_the_zoo_vit(tmp_path):
    from lightning_introspect.callbacks import Attributions
    from tests.helpers import quick_trainer, read_events
    from tests.zoo import ZOO_BY_NAME

    module, dm = ZOO_BY_NAME["vit"].build()
    cb = Attributions(methods=["attention_rollout", "grad_rollout", "grad_cam"], num_samples=4, faithfulness=False, on_error="raise")
    quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=2, limit_val_batches=1).fit(module, datamodule=dm)
    images = read_events(str(tmp_path))["images"]
    for method in ("attention_rollout", "grad_rollout", "grad_cam"):
        assert f"introspect/attributions/{method}" in images, sorted(images)
        assert cb.maps[method].shape == (4, 1, 16, 16) and torch.isfinite(cb.maps[method]).all()
    assert float(cb.maps["attention_rollout"].min()) >= 0 and float(cb.maps["grad_rollout"].min()) >= 0


def test_attributions_callback_skips_rollouts_without_attention(tmp_path):
    from lightning_introspect.callbacks import Attributions
    from tests.helpers import quick_trainer, read_events
    from tests.zoo import Classifier, digits_dm

    cb = Attributions(methods=["saliency", "attention_rollout"], num_samples=4, faithfulness=False, on_error="raise")
    with pytest.warns(UserWarning, match="attention_rollout.*skipped.*no self-attention"):
        quick_trainer(tmp_path, [cb], epochs=1, limit_train_batches=2, limit_val_batches=1).fit(Classifier(small_cnn()), datamodule=digits_dm())
    images = read_events(str(tmp_path))["images"]
    assert "introspect/attributions/saliency" in images and "introspect/attributions/attention_rollout" not in images
    assert cb.enabled and cb.skip_reason is None


def test_sanity_checks_take_the_rollouts_by_name():
    import warnings

    from lightning_introspect.callbacks import SanityChecks

    torch.manual_seed(0)
    x = _images(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caveats of a GELU model
        report = SanityChecks(methods=["attention_rollout", "grad_rollout"], repeats=1, run_emprt=False, on_error="raise").check(HandViT(), x)
    assert report.methods == ["attention_rollout", "grad_rollout"]
    # plain rollout is the same map for every class: the class-sensitivity check must call that out
    assert report.class_sensitivity_verdicts["attention_rollout"] == "fail"
    with pytest.warns(UserWarning, match=r"\['attention_rollout'\] are skipped for this model"):
        report = SanityChecks(methods=["saliency", "attention_rollout"], repeats=1, run_emprt=False, on_error="raise").check(small_cnn(), x)
    assert report.methods == ["saliency"]
