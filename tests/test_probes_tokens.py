"""LinearProbes on token activations ``(N, T, D)``: the layout rule, the class token, the masked mean, layers
probed once, ``"auto"`` on transformers, and a known answer (the class decided by one token)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_introspect._lightning import LightningDataModule, LightningModule
from lightning_introspect.callbacks.linear_probes import LinearProbes
from lightning_introspect.methods.probe_capture import FeatureCapture
from lightning_introspect.methods.probe_layers import auto_probe_layers, plan_probe_layers, token_layers
from lightning_introspect.methods.probes import (
    FeatureCache,
    TokenPooling,
    pool_activation,
    pool_tokens,
    prefix_tokens,
    resolve_token_pooling,
    token_mask,
)
from tests.helpers import quick_trainer, read_events
from tests.zoo import ZOO_BY_NAME, Classifier, GRUText, TinyViT, TransformerText, tokens

# ----------------------------------------------------------------------------------- pooling by hand


def test_pool_tokens_is_the_class_row_or_the_mean_over_the_tokens_the_mask_keeps() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(pool_tokens(x, TokenPooling("cls")), x[:, 0])
    by_hand = torch.stack([x[i][mask[i]].mean(0) for i in range(3)])
    torch.testing.assert_close(pool_tokens(x, TokenPooling("mean"), mask), by_hand)
    # prefix tokens (class, registers) are left out of the mean, with or without a mask
    torch.testing.assert_close(pool_tokens(x, TokenPooling("mean", prefix=2)), x[:, 2:].mean(1))
    with_prefix = torch.stack([x[i, 2:][mask[i, 2:]].mean(0) for i in range(3)])
    torch.testing.assert_close(pool_tokens(x, TokenPooling("mean", prefix=2), mask), with_prefix)
    # a sequence-first output (T, N, D) gives the same vectors
    torch.testing.assert_close(pool_tokens(x.transpose(0, 1), TokenPooling("mean", sequence_first=True), mask), by_hand)
    # a mask of another length (a layer whose tokens are not the input's) is not used
    torch.testing.assert_close(pool_tokens(x, TokenPooling("mean"), mask[:, :4]), x.mean(1))
    # a sample whose tokens are all padding gives zeros, not NaN
    empty = torch.zeros(3, 6, dtype=torch.bool)
    assert torch.equal(pool_tokens(x, TokenPooling("mean"), empty), torch.zeros(3, 4))
    # through pool_activation: token layers ignore `pooling`, conv maps (N, C, L) keep it
    torch.testing.assert_close(pool_activation(x, "max", tokens=TokenPooling("cls")), x[:, 0])
    torch.testing.assert_close(pool_activation(x, "avg"), x.mean(2))


def test_the_patch_grid_rule_finds_the_prefix_tokens() -> None:
    assert prefix_tokens(197, (224, 224)) == 1  # class token + 14 x 14
    assert prefix_tokens(196, (224, 224)) == 0  # patches only
    assert prefix_tokens(201, (224, 224)) == 5  # class + 4 registers
    assert prefix_tokens(9, (16, 32)) == 1  # class + a 2 x 4 grid of a wide image
    assert prefix_tokens(17, (16, 32)) is None  # 16 = 4 x 4 is not the image's aspect, nor anything within 8
    assert prefix_tokens(12, None) is None
    assert resolve_token_pooling("auto", 17, (16, 16)) == TokenPooling("cls", prefix=1, num_tokens=17)
    assert resolve_token_pooling("auto", 16, (16, 16)) == TokenPooling("mean", prefix=0, num_tokens=16)
    assert resolve_token_pooling("mean", 17, (16, 16)) == TokenPooling("mean", prefix=1, num_tokens=17)
    assert resolve_token_pooling("cls", 12, None).pooling == "cls"
    with pytest.raises(ValueError, match="token_pooling"):
        resolve_token_pooling("first", 12, None)


def test_token_mask_comes_from_the_attention_mask_or_the_padding_id() -> None:
    ids = torch.tensor([[4, 5, 0, 0], [6, 7, 8, 0]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(token_mask({"x": ids, "attention_mask": attention, "y": torch.tensor([0, 1])}), attention.bool())
    assert torch.equal(token_mask((ids, None), inputs={"input_ids": ids, "attention_mask": attention}), attention.bool())
    assert torch.equal(token_mask((ids, torch.tensor([0, 1])), inputs=ids, pad_token_id=0), ids != 0)
    assert torch.equal(token_mask({"input_ids": ids, "labels": torch.tensor([0, 1])}, pad_token_id=0), ids != 0)
    assert token_mask((ids, torch.tensor([0, 1])), inputs=ids) is None  # nothing says which tokens are padding
    assert token_mask((torch.randn(2, 4),), inputs=torch.randn(2, 4), pad_token_id=0) is None  # not token ids


# ----------------------------------------------------------------------------------- the layout rule


class TextCNN(nn.Module):
    """Embedding (tokens) -> transpose -> Conv1d (channels) -> ReLU -> a block ending in a Linear (tokens) ->
    a block whose Linear output is transposed before it returns (channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.mlp = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 6))
        self.mix = _TransposedLinear()
        self.head = nn.Linear(6, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(self.embed(ids).transpose(1, 2)))  # (N, C, L)
        x = self.mlp(x.transpose(1, 2))  # (N, T, D)
        return self.head(self.mix(x).mean(2))


class _TransposedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).transpose(1, 2)


class SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 4)
        self.gru = nn.GRU(4, 8)  # batch_first=False: (T, N, H)
        self.head = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(ids).transpose(0, 1))
        return self.head(out.mean(0))


def test_a_3d_output_is_tokens_or_channels_by_the_module_that_made_it() -> None:
    model = TextCNN()
    ids = torch.randint(0, 20, (2, 7))
    modules = {n: model.get_submodule(n) for n in ("embed", "conv", "act", "mlp", "mlp.1", "mix")}
    tokens_of = token_layers(model, ids, modules)
    # embed (Embedding), mlp (a Sequential ending in a Linear) and mlp.1 (a GELU after a Linear) are tokens;
    # conv (Conv1d), act (a ReLU after it) and mix (a Linear transposed before it returns) are channels
    assert sorted(tokens_of) == ["embed", "mlp", "mlp.1"]
    assert all(t == TokenPooling("mean", num_tokens=7) for t in tokens_of.values())
    # a batch_first=False GRU gives (T, N, H): sequence-first, T taken from its first dimension
    seq = SequenceFirst()
    gru = token_layers(seq, torch.randint(0, 20, (2, 5)), {"gru": seq.gru})["gru"]
    assert gru.sequence_first and gru.num_tokens == 5


def test_the_captured_features_are_the_class_row_and_the_masked_mean() -> None:
    torch.manual_seed(0)
    vit = TinyViT().eval()
    images = torch.randn(4, 1, 16, 16)
    plan = plan_probe_layers(vit, ["encoder", "norm"], images[:2])
    assert plan.tokens["encoder"] == TokenPooling("cls", prefix=1, num_tokens=17)  # 1 + 4 x 4 patches
    capture = FeatureCapture(plan.modules, tokens=plan.tokens, max_features=512)
    layers, inputs = FeatureCache(10, policy="first"), FeatureCache(10, policy="first")
    with capture.attach(), torch.no_grad():
        capture.begin(torch.arange(4))
        vit(images)
        capture.commit(layers, inputs)
    with torch.no_grad():
        x = vit.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token.expand(4, -1, -1), x], dim=1) + vit.pos_embed
        encoded = vit.encoder(x)
    torch.testing.assert_close(layers.features("encoder"), encoded[:, 0])
    torch.testing.assert_close(layers.features("norm"), vit.norm(encoded)[:, 0])

    text = TransformerText().eval()
    ids = torch.randint(1, 60, (4, 12))
    ids[0, 5:] = ids[2, 9:] = 0  # padding at the end
    plan = plan_probe_layers(text, ["embed", "norm1"], ids[:2])
    capture = FeatureCapture(plan.modules, tokens=plan.tokens)
    layers = FeatureCache(10, policy="first")
    with capture.attach(), torch.no_grad():
        capture.begin(torch.arange(4), mask=token_mask((ids,), inputs=ids, pad_token_id=0))
        text(ids)
        capture.commit(layers, FeatureCache(10))
    with torch.no_grad():
        embedded = text.embed(ids)
        keep = ids != 0
        masked_mean = torch.stack([embedded[i][keep[i]].mean(0) for i in range(4)])
    torch.testing.assert_close(layers.features("embed"), masked_mean)


# ----------------------------------------------------------------------------------- layers once, auto


def test_layers_with_the_same_output_are_probed_once_under_the_outer_name(tmp_path: Any) -> None:
    torch.manual_seed(0)
    vit = TinyViT()
    plan = plan_probe_layers(vit, ["encoder", "encoder.norm2", "encoder.linear2"], torch.randn(2, 1, 16, 16))
    # a post-norm TransformerEncoderLayer ends in its norm2: the same values, probed as the block
    assert list(plan.modules) == ["encoder", "encoder.linear2"] and plan.merged == {"encoder.norm2": "encoder"}

    model, dm = ZOO_BY_NAME["vit"].build()
    probes = LinearProbes(layers=["net.encoder.norm2", "net.encoder"], include_input=False, include_init=False,
                          solver="torch", on_error="raise")
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=1, limit_val_batches=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    assert probes.layer_names == ["net.encoder"]
    assert sum("probed once" in str(w.message) and "'net.encoder.norm2' as 'net.encoder'" in str(w.message) for w in caught) == 1


def test_auto_picks_the_embedding_and_the_block_outputs_of_transformers() -> None:
    torch.manual_seed(0)
    images, ids = torch.randn(2, 1, 16, 16), tokens()[0][:2]
    # TinyViT: the patch embedding, the encoder block, the final norm (the penultimate layer)
    assert auto_probe_layers(TinyViT(), images) == ["patch_embed", "encoder", "norm"]
    # TransformerText has no block modules: its post-norm residuals (norm1, norm2) are the block outputs
    assert auto_probe_layers(TransformerText(), ids) == ["embed", "norm1", "norm2"]
    assert auto_probe_layers(GRUText(), ids) == ["embed", "gru"]  # no attention: as before
    # inside a LightningModule (the zoo's Classifier holds the network as `net`): the same layers, never `net`
    # itself (its output is the logits)
    assert auto_probe_layers(Classifier(TinyViT()), images) == ["net.patch_embed", "net.encoder", "net.norm"]
    assert auto_probe_layers(Classifier(TransformerText()), ids) == ["net.embed", "net.norm1", "net.norm2"]
    assert auto_probe_layers(Classifier(GRUText()), ids) == ["net.embed", "net.gru"]
    stacked = nn.Sequential(
        nn.Embedding(60, 8),
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 3,
                              enable_nested_tensor=False),
        nn.Linear(8, 3),
    )
    assert auto_probe_layers(stacked, ids) == ["0", "1.layers.0", "1.layers.1", "1.layers.2"]


# ----------------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize(
    ("name", "pooled"),
    [("vit", "class token (token 0 of 17; 1 prefix token before the patch grid)"),
     ("transformer_text", "mean over the 12 tokens without padding"),
     ("gru_text", "mean over the 12 tokens without padding")],
)
def test_zoo_token_models_log_probe_accuracy_per_layer(tmp_path: Any, name: str, pooled: str) -> None:
    model, dm = ZOO_BY_NAME[name].build()
    probes = LinearProbes(solver="torch", on_error="raise")
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=dm)
    scalars = read_events(str(tmp_path))["scalars"]
    assert probes.layer_names and set(probes.history[0]) == set(probes.layer_names)
    for layer in probes.layer_names:
        assert f"introspect/probes/{layer}/accuracy" in scalars
    token_layer = next(iter(probes.resolved_token_pooling))
    assert probes.resolved_token_pooling[token_layer] == pooled
    assert f"`{token_layer}`: {pooled}" in probes.table()


# ----------------------------------------------------------------------------------- a known answer

PAD, VOCAB, LENGTH, DECIDING = 0, 40, 10, (1, 2, 3)


def deciding_token_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids ``(n, LENGTH)``: a random length of 4..10 tokens drawn from 4..39, then padding; one position
    holds the deciding token ``DECIDING[y]``, every other token says nothing about the class."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(DECIDING), (n,), generator=gen)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    mask = torch.arange(LENGTH).view(1, -1) < lengths.view(-1, 1)
    ids[~mask] = PAD
    where = (torch.rand(n, generator=gen) * lengths).long()
    ids[torch.arange(n), where] = torch.tensor(DECIDING)[y]
    return ids, mask, y


class DictBatches(Dataset):
    def __init__(self, seed: int, n: int) -> None:
        self.ids, self.mask, self.y = deciding_token_data(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.ids[i], "attention_mask": self.mask[i], "y": self.y[i]}


class BagOfEmbeddings(LightningModule):
    """Embedding -> masked mean -> linear head, on dict batches ``{"x", "attention_mask", "y"}``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, len(DECIDING))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["x"]), batch["y"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch["x"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class DictData(LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(DictBatches(0, 64), batch_size=32)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(DictBatches(1, 600), batch_size=100)


def test_the_probe_on_the_embedding_mean_recovers_the_deciding_token(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = BagOfEmbeddings()
    probes = LinearProbes(layers=["embed"], cache="first", include_input=False, solver="torch", on_error="raise")
    trainer = quick_trainer(tmp_path, [probes], epochs=1, limit_train_batches=1)
    trainer.fit(model, datamodule=DictData())
    # the class is decided by one of 3 tokens among 4..10 random ones: chance is 1/3, the linear probe on the
    # mean embedding over the real tokens sees the deciding token's embedding (divided by the length)
    assert probes.resolved_token_pooling == {"embed": "mean over the 10 tokens without padding"}
    assert probes.history["init"]["embed"] > 0.8 and probes.history[0]["embed"] > 0.8
    # the cached features are the masked means, computed by hand (the cache kept the validation order)
    val = DictBatches(1, 600)
    with torch.no_grad():
        embedded = model.embed(val.ids)
        by_hand = torch.stack([embedded[i][val.mask[i]].mean(0) for i in range(len(val))])
    torch.testing.assert_close(probes._cache.features("embed"), by_hand, rtol=1e-5, atol=1e-6)
