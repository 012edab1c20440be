"""LRP for transformers: LayerNorm / RMSNorm (identity rule on the normalisation), smooth activations (pass),
softmax attention (held constant, CP-LRP; AttnLRP's rule as an option), products of input-dependent tensors
(uniform rule), nn.MultiheadAttention / nn.TransformerEncoderLayer / F.scaled_dot_product_attention, token ids
through nn.Embedding, relevance at a named layer.

Checks: brute-force equality of each rule with its formula on small tensors; exact conservation per layer and
overall on bias-free models (fp64); the known answer LRP == gradient x input with the attention and the
normalisation's standard deviation detached (CP, epsilon -> 0); the traced nn.TransformerEncoderLayer equals a
hand-written block with the same weights (forward and relevance); the callbacks no longer skip LRP on a ViT.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_introspect.callbacks.attributions import Attributions
from lightning_introspect.callbacks.checks import lrp_problem
from lightning_introspect.callbacks.sanity_checks import SanityChecks
from lightning_introspect.methods.lrp import (
    AttnLRPSoftmax,
    Composite,
    Epsilon,
    HoldConstant,
    NormIdentity,
    Uniform,
    fold_batchnorm,
    lrp,
    lrp_unsupported,
)
from tests.helpers import quick_trainer
from tests.zoo import Attention, Classifier, TinyViT, TransformerText, digits_dm

TINY = 1e-12  # the stabiliser for checks of exact arithmetic in fp64


# ------------------------------------------------------------------------------------------------- models


class Block(nn.Module):
    """A hand-written pre-norm transformer on float tokens ``(N, T, D)``: multi-head attention written out
    (``unbind``, ``q k^T``, softmax, ``@ v``), a ReLU MLP, residual additions, mean pooling, a linear head.

    ``detach=True`` computes the same function with the attention probabilities and LayerNorm's standard
    deviation detached: the reference for gradient x input.
    """

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3, bias: bool = True, sdpa: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, bias=bias), nn.LayerNorm(dim, bias=bias)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=bias), nn.Linear(dim, dim, bias=bias)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim, bias=bias), nn.Linear(2 * dim, dim, bias=bias)
        self.head = nn.Linear(dim, classes, bias=bias)
        self.heads, self.detach, self.sdpa = heads, False, sdpa

    def norm(self, layer: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        if not self.detach:
            return layer(x)
        std = (x.var(-1, unbiased=False, keepdim=True) + layer.eps).sqrt().detach()
        y = (x - x.mean(-1, keepdim=True)) / std * layer.weight
        return y if layer.bias is None else y + layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(self.norm1, x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(dim=-1)
            out = (attn.detach() if self.detach else attn) @ v
        x = x + self.proj(out.transpose(1, 2).reshape(n, t, d))
        x = x + self.fc2(F.relu(self.fc1(self.norm(self.norm2, x))))
        return self.head(x.mean(1))


class EncoderModel(nn.Module):
    """``nn.TransformerEncoderLayer`` (pre-norm, ReLU) + mean + head, with the weights of a :class:`Block`."""

    def __init__(self, block: Block, batch_first: bool = True) -> None:
        super().__init__()
        dim = block.qkv.in_features
        self.layer = nn.TransformerEncoderLayer(dim, block.heads, 2 * dim, dropout=0.0, batch_first=batch_first, norm_first=True)
        self.head = copy.deepcopy(block.head)
        self.batch_first = batch_first
        layer = self.layer
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(block.qkv.weight)
            layer.self_attn.out_proj.weight.copy_(block.proj.weight)
            for mine, theirs in ((layer.linear1, block.fc1), (layer.linear2, block.fc2), (layer.norm1, block.norm1), (layer.norm2, block.norm2)):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)
            layer.self_attn.in_proj_bias.copy_(block.qkv.bias)
            layer.self_attn.out_proj.bias.copy_(block.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            return self.head(self.layer(x.transpose(0, 1)).transpose(0, 1).mean(1))
        return self.head(self.layer(x).mean(1))


class MaskedText(nn.Module):
    """Token ids -> embedding -> two post-norm GELU encoder layers (``nn.TransformerEncoder``) with the padding
    mask built from the ids -> mean -> head."""

    def __init__(self, vocab: int = 20, dim: int = 8, batch_first: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, activation="gelu", batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)
        self.batch_first = batch_first

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.batch_first:
            x = self.encoder(x, src_key_padding_mask=ids == 0)
        else:
            x = self.encoder(x.transpose(0, 1), src_key_padding_mask=ids == 0).transpose(0, 1)
        return self.head(x.mean(1))


class GroupedQueryBlock(nn.Module):
    """timm-style: fused ``F.scaled_dot_product_attention`` with grouped-query heads (4 query heads, 2 key /
    value heads) and a causal mask, LayerScale, a tanh-GELU MLP, SiLU before the mean."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj, self.ls1 = nn.Linear(dim, dim), nn.Parameter(0.5 * torch.ones(dim))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k, v = self.kv(x).reshape(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True, enable_gqa=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x)) * self.ls1
        x = x + self.mlp(self.norm2(x))
        return self.head(F.silu(x).mean(1))


def bias_free(model: nn.Module) -> nn.Module:
    """Every bias and additive position embedding zeroed, in fp64, eval mode: relevance is then conserved exactly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("pos_embed") or name == "pos":
                p.zero_()
    return model.double().eval()


def seeded(factory: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return factory()


# ------------------------------------------------------------------------- (1) the rules, brute force


def _explicit(out_fn: Any, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A score ``sum(out * c)``: its output relevance is ``out * c``."""
    return lambda out: (out * c).flatten(1).sum(1)


def test_layernorm_identity_rule_equals_its_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    dim = 5
    layer = nn.LayerNorm(dim).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(dim, generator=gen, dtype=torch.float64))
    x = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    c = torch.randn(3, dim, generator=gen, dtype=torch.float64)
    got = lrp(layer, x, lambda out: (out * c).sum(1), epsilon=TINY)
    for n in range(3):
        std = math.sqrt(float(x[n].var(unbiased=False)) + layer.eps)
        # y = W x + beta with W = diag(gamma / std) (I - 11^T / D): the std a constant
        w = torch.diag(layer.weight.detach() / std) @ (torch.eye(dim, dtype=torch.float64) - 1.0 / dim)
        y = w @ x[n] + layer.bias.detach()
        relevance_out = y * c[n]
        want = torch.stack([sum(x[n, j] * w[i, j] * relevance_out[i] / y[i] for i in range(dim)) for j in range(dim)])
        torch.testing.assert_close(got[n], want)
    # without the shift the rule is conservative
    with torch.no_grad():
        layer.bias.zero_()
    got = lrp(layer, x, lambda out: (out * c).sum(1), epsilon=TINY)
    torch.testing.assert_close(got.sum(1), (layer(x) * c).sum(1))


@pytest.mark.parametrize("kind", ["rms_module", "layer_norm_function", "rms_norm_function"])
def test_other_normalisations_detach_their_scale(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    dim = 4
    weight = torch.randn(dim, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, dim, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 3, dim, generator=gen, dtype=torch.float64)

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(weight.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if kind == "layer_norm_function":
                return F.layer_norm(x, (dim,), self.weight, None, 1e-5)
            return F.rms_norm(x, (dim,), self.weight, 1e-6)

    if kind == "rms_module":
        model: nn.Module = nn.RMSNorm(dim, eps=1e-6).double()
        with torch.no_grad():
            model.weight.copy_(weight)
    else:
        model = Functional()
    got = lrp(model, x, lambda out: (out * c).flatten(1).sum(1), epsilon=TINY)
    y = model(x).detach()
    if kind == "layer_norm_function":
        centred = x - x.mean(-1, keepdim=True)
        scale = weight / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        # R_x_j = x_j sum_i (delta_ij - 1/D) scale_i R_i / y_i
        share = scale * y * c / y
        want = x * (share - share.mean(-1, keepdim=True))
        assert torch.allclose(centred * scale, y)
    else:
        want = y * c  # an elementwise scaling by a constant: relevance passes unchanged
    torch.testing.assert_close(got, want)


def test_uniform_rule_on_a_matmul_of_two_activations_equals_its_formula() -> None:
    gen = torch.Generator().manual_seed(2)

    class MatMul(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = x[:, :6].reshape(-1, 2, 3), x[:, 6:].reshape(-1, 3, 2)
            return (a @ b).flatten(1)

    x = torch.randn(2, 12, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    got = lrp(MatMul(), x, lambda out: (out * c).sum(1), epsilon=TINY)
    for n in range(2):
        a, b = x[n, :6].view(2, 3), x[n, 6:].view(3, 2)
        z = a @ b
        r = z * c[n].view(2, 2)
        ra = torch.zeros(2, 3, dtype=torch.float64)
        rb = torch.zeros(3, 2, dtype=torch.float64)
        for i in range(2):
            for j in range(2):
                for k in range(3):
                    ra[i, k] += 0.5 * a[i, k] * b[k, j] / z[i, j] * r[i, j]
                    rb[k, j] += 0.5 * a[i, k] * b[k, j] / z[i, j] * r[i, j]
        torch.testing.assert_close(got[n], torch.cat([ra.flatten(), rb.flatten()]))
        torch.testing.assert_close(got[n].sum(), r.sum())  # conservative


def test_elementwise_product_of_one_tensor_with_itself_is_shared_uniformly() -> None:
    class Square(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * x

    x = torch.tensor([[1.5, -2.0, 0.5]], dtype=torch.float64)
    got = lrp(Square(), x, lambda out: out.sum(1), epsilon=TINY)
    torch.testing.assert_close(got, x * x)  # both halves of x_i * x_i go back to x_i


def test_attnlrp_softmax_rule_equals_its_formula_and_cp_holds_it_constant() -> None:
    gen = torch.Generator().manual_seed(3)

    class Softmax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(x, dim=-1)

    x = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    c = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    score = lambda out: (out * c).sum(1)  # noqa: E731
    s = torch.softmax(x, -1)
    r = s * c
    want = x * (r - s * r.sum(-1, keepdim=True))
    torch.testing.assert_close(lrp(Softmax(), x, score, attention_rule="attnlrp"), want)
    assert torch.equal(lrp(Softmax(), x, score), torch.zeros_like(x))  # held constant: no relevance reaches x


def test_masked_entries_get_no_relevance_under_attnlrp() -> None:
    class Masked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mask = torch.tensor([False, True, False, False])
            return torch.softmax(x.masked_fill(mask, float("-inf")), dim=-1) * 3.0

    x = torch.randn(2, 4, dtype=torch.float64)
    got = lrp(Masked(), x, lambda out: out[:, 0], attention_rule="attnlrp")
    assert torch.isfinite(got).all() and torch.equal(got[:, 1], torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------- (2) conservation, per layer


CONSERVING = {
    "tiny_vit": (lambda: TinyViT(), lambda: torch.randn(3, 1, 16, 16), ["patch_embed", "encoder.norm1", "encoder", "norm", "head"]),
    "transformer_text": (lambda: TransformerText(), lambda: torch.randint(0, 60, (3, 12)), ["embed", "norm1", "norm2", "head"]),
    "block": (lambda: Block(bias=False), lambda: torch.randn(3, 5, 8), ["head"]),
    "encoder_layer": (lambda: EncoderModel(Block()), lambda: torch.randn(3, 5, 8), ["layer", "head"]),
    "grouped_query_sdpa": (lambda: GroupedQueryBlock(), lambda: torch.randn(3, 5, 16), ["head"]),
    "masked_text": (lambda: MaskedText(), lambda: torch.tensor([[3, 4, 5, 0], [7, 1, 0, 0], [2, 2, 9, 8]]),
                    ["embed", "encoder.layers.0.norm1", "encoder.layers.0", "encoder", "head"]),
}


@pytest.mark.parametrize("name", list(CONSERVING))
def test_relevance_is_conserved_overall_and_at_every_layer_without_biases(name: str) -> None:
    build, sample, layers = CONSERVING[name]
    model, x = bias_free(seeded(build)), seeded(sample, 1)
    x = x.double() if x.is_floating_point() else x
    assert lrp_unsupported(model) is None and lrp_unsupported(model, x) is None
    logits = model(x).detach()
    target = [0, 1, 2]
    want = logits[torch.arange(3), target]
    for at in [None, *layers]:
        relevance = lrp(model, x, target, at=at, epsilon=TINY)
        assert relevance.dtype == torch.float64
        torch.testing.assert_close(relevance.flatten(1).sum(1), want, rtol=1e-8, atol=1e-10, msg=f"{name} at {at}")
    if not x.is_floating_point():
        torch.testing.assert_close(lrp(model, x, target, epsilon=TINY), lrp(model, x, target, at="embed", epsilon=TINY).sum(-1))


def test_with_biases_the_sum_misses_only_what_the_biases_absorb() -> None:
    model, x = seeded(TinyViT).double().eval(), seeded(lambda: torch.randn(2, 1, 16, 16), 1).double()
    logits = model(x).detach()[:, 4]
    total = lrp(model, x, 4, epsilon=TINY).flatten(1).sum(1)
    assert not torch.allclose(total, logits, rtol=1e-3)  # biases and the position embedding absorb relevance
    # the head's bias absorbs exactly its share: the relevance at its input is (logit - bias) * logit / logit
    at_norm = lrp(model, x, 4, at="norm", epsilon=TINY)
    torch.testing.assert_close(at_norm.flatten(1).sum(1), logits - model.head.bias[4].detach())


def test_attnlrp_halves_the_relevance_through_a_uniform_attention() -> None:
    # queries of zero: every attention row is uniform and the scores are zero, so AttnLRP's softmax rule gives the
    # scores nothing: half of the output's relevance (the share of the probabilities in attention @ v) is lost,
    # the other half goes to v as under CP, where v gets all of it.
    class OnlyAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.head = Attention(4), nn.Linear(4, 2, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x).mean(1))

    model = bias_free(seeded(OnlyAttention))
    with torch.no_grad():
        model.attn.qkv.weight[:4].zero_()
    x = seeded(lambda: torch.randn(2, 5, 4), 1).double()
    cp = lrp(model, x, 1, epsilon=TINY)
    attnlrp = lrp(model, x, 1, epsilon=TINY, attention_rule="attnlrp")
    torch.testing.assert_close(attnlrp, cp / 2)
    torch.testing.assert_close(cp.flatten(1).sum(1), model(x)[:, 1].detach())


# ------------------------------------------------------------------ (3) known answers and equivalences


@pytest.mark.parametrize("sdpa", [False, True])
def test_cp_lrp_is_gradient_times_input_with_attention_and_std_detached(sdpa: bool) -> None:
    # CP-LRP with epsilon -> 0 on a ReLU transformer (with biases): every step is x * gradient of a function in
    # which the attention probabilities and LayerNorm's standard deviation are constants
    model = seeded(lambda: Block(sdpa=sdpa)).double().eval()
    x = seeded(lambda: torch.randn(3, 6, 8), 1).double()
    relevance = lrp(model, x, [0, 2, 1], epsilon=TINY)
    reference = copy.deepcopy(model)
    reference.detach, reference.sdpa = True, False
    leaf = x.clone().requires_grad_()
    out = reference(leaf)
    torch.testing.assert_close(out, model(x))
    (grad,) = torch.autograd.grad(out[torch.arange(3), [0, 2, 1]].sum(), leaf)
    torch.testing.assert_close(relevance, leaf.detach() * grad)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("attention_rule", ["cp", "attnlrp"])
def test_transformer_encoder_layer_is_traced_as_its_reference_computation(batch_first: bool, attention_rule: str) -> None:
    block = seeded(Block).double().eval()
    model = EncoderModel(block, batch_first=batch_first).double().eval()
    x = seeded(lambda: torch.randn(2, 5, 8), 1).double()
    # eval mode takes the fused fast path; the traced graph computes the same numbers without it
    torch.testing.assert_close(fold_batchnorm(model)(x), model(x))
    torch.testing.assert_close(model(x), block(x))
    torch.testing.assert_close(lrp(model, x, 1, attention_rule=attention_rule), lrp(block, x, 1, attention_rule=attention_rule))
    sdpa_block = copy.deepcopy(block)
    sdpa_block.sdpa = True
    torch.testing.assert_close(lrp(sdpa_block, x, 1, attention_rule=attention_rule), lrp(block, x, 1, attention_rule=attention_rule))


@pytest.mark.parametrize("batch_first", [True, False])
def test_padding_mask_from_token_ids_is_applied(batch_first: bool) -> None:
    model = seeded(lambda: MaskedText(batch_first=batch_first)).eval()
    ids = torch.tensor([[3, 4, 5, 0], [7, 1, 0, 0]])
    torch.testing.assert_close(fold_batchnorm(model)(ids), model(ids))
    x = model.embed(ids) if batch_first else model.embed(ids).transpose(0, 1)
    unmasked = model.encoder(x) if batch_first else model.encoder(x).transpose(0, 1)
    assert not torch.allclose(model.head(unmasked.mean(1)), model(ids))  # so the equality above needs the mask
    relevance = lrp(model, ids, 0, epsilon=TINY)
    assert relevance.shape == (2, 4) and torch.isfinite(relevance).all()


def test_relevance_at_a_named_layer_and_clear_errors() -> None:
    model, ids = seeded(TransformerText).eval(), torch.randint(0, 60, (2, 12))
    assert lrp(model, ids, 0, at="embed").shape == (2, 12, 16)
    with pytest.raises(ValueError, match=r"`at`.*'norm_1'.*Did you mean 'norm1'"):
        lrp(model, ids, 0, at="norm_1")

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(self.fc(x)))

    with pytest.raises(ValueError, match="runs 2 times"):
        lrp(Twice(), torch.randn(2, 4), 0, at="fc")
    with pytest.raises(ValueError, match="attention_rule"):
        lrp(model, ids, 0, attention_rule="rollout")


def test_composites_choose_operation_rules_by_module_name_and_type() -> None:
    model, x = bias_free(seeded(TransformerText)), torch.randint(0, 60, (2, 12))
    attnlrp = lrp(model, x, 0, attention_rule="attnlrp")
    cp = lrp(model, x, 0)
    assert not torch.allclose(attnlrp, cp)
    torch.testing.assert_close(lrp(model, x, 0, composite={"attn": AttnLRPSoftmax()}), attnlrp)
    torch.testing.assert_close(lrp(model, x, 0, composite={type(model.attn): AttnLRPSoftmax()}), attnlrp)
    torch.testing.assert_close(lrp(model, x, 0, composite=Composite(softmax=AttnLRPSoftmax())), attnlrp)
    torch.testing.assert_close(lrp(model, x, 0, composite=Composite(softmax=AttnLRPSoftmax()), attention_rule="cp"), cp)
    coarse = lrp(model, x, 0, composite={nn.LayerNorm: NormIdentity(10.0)})
    assert not torch.allclose(coarse, cp) and coarse.abs().sum() < cp.abs().sum()  # a large stabiliser absorbs relevance
    with pytest.raises(ValueError, match="`softmax`"):
        Composite(softmax=Uniform())
    with pytest.raises(ValueError, match=r"layer_map\[Linear\].*NormIdentity"):
        lrp(model, x, 0, composite={nn.Linear: NormIdentity()})
    assert Composite().softmax == HoldConstant() and Composite().rule_for("head", nn.Linear(2, 2)) == Epsilon()


# --------------------------------------------------------------------------- (4) what stays refused


def test_what_is_still_unsupported_is_named() -> None:
    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x, x).mean(1)

    reason = lrp_unsupported(Decoder())
    assert reason is not None and "module 'layer' of type torch.nn.TransformerDecoderLayer" in reason
    no_embedding = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    assert "computes a torch.int64 tensor" in str(lrp_unsupported(no_embedding, torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(TypeError, match="nn.Embedding"):
        lrp(no_embedding, torch.zeros(2, 4, dtype=torch.long), 0)


def test_modes_and_weights_are_left_as_they_were() -> None:
    model = seeded(lambda: MaskedText()).train()
    before = copy.deepcopy(model.state_dict())
    lrp(model, torch.tensor([[3, 4, 0]]), 0, attention_rule="attnlrp")
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------- (5) callbacks


def test_callbacks_no_longer_skip_lrp_on_a_vision_transformer(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = Classifier(TinyViT(), lr=3e-3)
    assert lrp_problem(module) is None
    attributions = Attributions(num_samples=4, on_error="raise")  # the default methods, LRP among them
    sanity = SanityChecks(methods=["saliency", "lrp"], num_samples=4, repeats=1, resamples=50, run_emprt=False,
                          run_class_sensitivity=False, progress=False, on_error="raise")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quick_trainer(tmp_path, [attributions, sanity], epochs=1, limit_train_batches=2).fit(
            module, datamodule=digits_dm(n_train=32, n_val=16, batch_size=16))
    assert not any("'lrp' is skipped" in str(w.message) for w in caught)
    assert "lrp" in attributions.maps and torch.isfinite(attributions.maps["lrp"]).all()
    assert sanity.report is not None and "lrp" in sanity.report.verdicts
