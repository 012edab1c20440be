"""Attributions for token-id inputs ``(N, T)``: one score per token, computed at the embedding output.

Token ids are integers: there is no gradient with respect to them. The methods here differentiate with
respect to the output of the model's embedding layer instead, ``E`` of shape ``(N, T, D)``, and reduce
over the embedding dimension ``D`` to one score per token (as captum's ``LayerIntegratedGradients`` /
``LayerGradientXActivation`` on the embedding layer, followed by a sum over ``D``):

* ``"saliency"`` -- ``|| d score / d E[t] ||_2``, the size of the gradient at each token (unsigned);
* ``"input_x_gradient"`` -- gradient x embedding, ``sum_d E[t, d] * d score / d E[t, d]`` (signed);
* ``"integrated_gradients"`` -- integrated gradients along the straight path from a baseline embedding
  ``E'`` to ``E``, summed over ``d`` (signed). The baseline is the embedding of a token id you choose at
  every position (a pad or mask token: "no information here", the usual choice for text), or the zero
  vector when ``baseline=None``. With a pad token whose embedding row is zero (``nn.Embedding(...,
  padding_idx=pad)``) both coincide. Completeness: a sample's scores sum to ``score(E) - score(E')``, up
  to the quadrature error;
* ``"lrp"`` -- layer-wise relevance propagation, where :mod:`lightning_introspect.methods.lrp` supports
  the model for token ids (relevance at the embedding output summed over ``D``); otherwise it raises
  the LRP package's own error.

The embedding layer is found by :func:`find_embedding`: the first ``nn.Embedding`` that the forward pass
calls with the token ids themselves (a word embedding, not a position embedding called with
``arange``), or, if none takes them unchanged, the first ``nn.Embedding`` that runs; ``embedding_layer``
names it instead (any module whose output is ``(N, T, D)``).

How: a forward hook on the embedding layer replaces its output by a leaf tensor (the embedding itself,
or points on the integration path) and ``torch.autograd.grad`` differentiates the target score with
respect to that leaf only (parameter ``.grad`` untouched). The passes run under the usual guards: eval
mode with every flag restored, the global RNG forked, gradients on also inside ``torch.inference_mode``,
hooks removed in ``finally``. Only the embedding layer's first call in a forward pass is replaced (a
layer called twice is warned about).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_introspect._torch.guards import fresh_input, introspection_mode
from lightning_introspect._torch.hooks import hooks
from lightning_introspect.methods.gradients import LayerSpec, _is_token_ids, _layer_module, _model_device
from lightning_introspect.methods.path_attribution import (
    DEFAULT_PATH_BATCH,
    _check_batch_size,
    _tiled_target,
    ig_alphas,
)
from lightning_introspect.methods.targets import Target, model_logits, target_indices, target_scores

__all__ = [
    "SIGNED_TOKEN_METHODS",
    "TOKEN_METHODS",
    "find_embedding",
    "gradient_x_embedding",
    "is_token_ids",
    "token_attributions",
    "token_integrated_gradients",
    "token_saliency",
]

TOKEN_METHODS: tuple[str, ...] = ("saliency", "input_x_gradient", "integrated_gradients", "lrp")
"""The methods that explain token ids (one score per token)."""

SIGNED_TOKEN_METHODS: frozenset[str] = frozenset({"input_x_gradient", "integrated_gradients", "lrp"})
"""Token methods whose scores take both signs (``saliency`` is a gradient norm, >= 0)."""


def is_token_ids(inputs: Any) -> bool:
    """Whether ``inputs`` are token ids: an integer tensor ``(N, T)``.

    Example:
        >>> is_token_ids(torch.zeros(2, 5, dtype=torch.long)), is_token_ids(torch.zeros(2, 5))
        (True, False)
    """
    return _is_token_ids(inputs)


def _check_ids(ids: Any) -> None:
    if not is_token_ids(ids):
        what = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"Expected `inputs` to be integer token ids of shape (N, T), but got {what}.")


def _output_tensor(output: Any) -> torch.Tensor:
    return model_logits(output).float()


def find_embedding(model: nn.Module, ids: torch.Tensor, embedding_layer: LayerSpec = None) -> str:
    """The dotted name of the embedding layer whose output the token methods explain.

    With ``embedding_layer`` given (a dotted name or a submodule), that module. Otherwise one forward
    pass (eval mode, no gradients, global RNG forked) records every ``nn.Embedding`` call: the first one
    whose input is the token ids (the word embedding, also when position or segment embeddings run
    first), else the first one that runs at all.

    Raises:
        ValueError: no ``nn.Embedding`` runs on these inputs (name the layer with ``embedding_layer``),
            or ``embedding_layer`` is not a submodule.

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.pos, self.words, self.head = nn.Embedding(5, 4), nn.Embedding(10, 4), nn.Linear(4, 2)
        ...     def forward(self, ids):
        ...         x = self.pos(torch.arange(ids.shape[1])) + self.words(ids)
        ...         return self.head(x.mean(1))
        >>> find_embedding(Net(), torch.tensor([[1, 2, 3]]))
        'words'
    """
    if embedding_layer is not None and not (isinstance(embedding_layer, str) and embedding_layer == "auto"):
        return _layer_module(model, embedding_layer, argument="embedding_layer")[0]
    _check_ids(ids)
    names: dict[nn.Module, str] = {m: n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    calls: list[tuple[str, bool]] = []
    x = ids.to(_model_device(model, ids))

    def record(module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        seen = args[0] if args else None
        same = isinstance(seen, torch.Tensor) and (seen is x or (seen.shape == x.shape and bool(torch.equal(seen, x))))
        calls.append((names[module], same))

    with introspection_mode(model, grad=False), hooks() as handles:
        for module in names:
            handles.append(module.register_forward_hook(record))
        model(x)
    for name, same in calls:
        if same:
            return name
    if calls:
        return calls[0][0]
    raise ValueError(
        "Cannot find the embedding layer: no nn.Embedding runs in the forward pass on these token ids. "
        "Pass `embedding_layer` with the dotted name of the module whose output (N, T, D) embeds the tokens."
    )


@dataclass
class _EmbeddingPass:
    """One forward pass whose embedding output was replaced by ``leaf``; ``scores`` one per row."""

    leaf: torch.Tensor
    output: torch.Tensor
    scores: torch.Tensor

    def grad(self) -> torch.Tensor:
        (g,) = torch.autograd.grad(self.scores.sum(), [self.leaf], allow_unused=True)
        return torch.zeros_like(self.leaf) if g is None else g


@contextlib.contextmanager
def _embedding_pass(
    model: nn.Module,
    ids: torch.Tensor,
    target: Target,
    layer: str,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[_EmbeddingPass]:
    """Run the model on ``ids`` with the embedding output replaced by a leaf: ``replace(embedding)`` (the
    embedding itself when ``None``); the hook is removed when the block exits."""
    _, module = _layer_module(model, layer, argument="embedding_layer")
    leaves: list[torch.Tensor] = []
    calls = [0]

    def substitute(_module: nn.Module, _args: Any, output: Any) -> Any:
        calls[0] += 1
        if calls[0] > 1:
            return None
        if not isinstance(output, torch.Tensor) or output.ndim != 3:
            raise ValueError(
                f"Expected the embedding layer {layer!r} to output one tensor (N, T, D), but got "
                f"{getattr(output, 'shape', type(output).__name__)}; name another layer with `embedding_layer`."
            )
        with torch.no_grad():
            value = output.detach().float() if replace is None else replace(output.detach().float())
        leaf = value.detach().requires_grad_(True)
        leaves.append(leaf)
        # a clone goes downstream: an in-place op after the layer (x += pos) must not touch the leaf
        return leaf.to(output.dtype).clone()

    with introspection_mode(model), hooks() as handles:
        handles.append(module.register_forward_hook(substitute))
        # a normal copy: ids made under the caller's inference mode cannot be saved for backward
        output = _output_tensor(model(fresh_input(ids.to(_model_device(model, ids)))))
        if not leaves:
            raise ValueError(f"The embedding layer {layer!r} did not run in the forward pass; name the layer that embeds the tokens.")
        if calls[0] > 1:
            warnings.warn(f"The embedding layer {layer!r} ran {calls[0]} times in one forward pass; its first call is explained.", stacklevel=3)
        yield _EmbeddingPass(leaf=leaves[0], output=output, scores=target_scores(output, target))


def _resolve(model: nn.Module, ids: torch.Tensor, embedding_layer: LayerSpec) -> str:
    _check_ids(ids)
    return find_embedding(model, ids, embedding_layer)


def token_saliency(model: nn.Module, inputs: torch.Tensor, target: Target, *, embedding_layer: LayerSpec = None) -> torch.Tensor:
    """The L2 norm over the embedding dimension of the target score's gradient at each token's embedding.

    Returns:
        A detached ``(N, T)`` tensor (>= 0).

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> token_saliency(net, torch.tensor([[1, 2, 3]]), 0).shape
        torch.Size([1, 3])
    """
    return token_attributions(model, inputs, target, ["saliency"], embedding_layer=embedding_layer)["saliency"]


def gradient_x_embedding(model: nn.Module, inputs: torch.Tensor, target: Target, *, embedding_layer: LayerSpec = None) -> torch.Tensor:
    """Gradient x embedding per token: ``sum_d E[t, d] * d score / d E[t, d]`` (captum
    ``LayerGradientXActivation`` on the embedding layer, summed over ``D``).

    Returns:
        A detached signed ``(N, T)`` tensor.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> gradient_x_embedding(net, torch.tensor([[1, 2, 3]]), "pred").shape
        torch.Size([1, 3])
    """
    return token_attributions(model, inputs, target, ["input_x_gradient"], embedding_layer=embedding_layer)["input_x_gradient"]


def _baseline_embedding(model: nn.Module, ids: torch.Tensor, layer: str, baseline: int) -> torch.Tensor:
    """The embedding layer's output when the model runs on the baseline token id at every position (as
    captum's ``LayerIntegratedGradients`` gets it)."""
    if isinstance(baseline, bool) or not isinstance(baseline, int):
        raise ValueError(f"Expected `baseline` to be a token id (int) or None (the zero embedding), but got {baseline!r}.")
    _, module = _layer_module(model, layer, argument="embedding_layer")
    got: list[torch.Tensor] = []

    def capture(_module: nn.Module, _args: Any, output: Any) -> None:
        if not got and isinstance(output, torch.Tensor):
            got.append(output.detach().float())

    with introspection_mode(model, grad=False), hooks() as handles:
        handles.append(module.register_forward_hook(capture))
        try:
            model(torch.full_like(ids, baseline).to(_model_device(model, ids)))
        except IndexError as err:  # an id outside the vocabulary
            raise ValueError(f"Expected `baseline` to be a token id the embedding knows, but got {baseline}: {err}") from err
    return got[0]


def token_integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    steps: int = 32,
    baseline: int | None = None,
    method: str = "riemann_trapezoid",
    batch_size: int = DEFAULT_PATH_BATCH,
    embedding_layer: LayerSpec = None,
) -> torch.Tensor:
    """Integrated gradients on the embeddings, one score per token.

    ``sum_d (E - E')[t, d] * sum_j w_j * d score / d E[t, d] (E' + a_j (E - E'))`` with the points and
    weights of :func:`~lightning_introspect.methods.attribution.ig_alphas`; equals captum
    ``LayerIntegratedGradients(model, embedding).attribute(ids, baselines=full_like(ids, baseline),
    n_steps=steps, method=method).sum(-1)`` for a token-id ``baseline``.

    Args:
        model: the model, taking the token ids.
        inputs: ``(N, T)`` token ids.
        target: int, per-sample ids, ``"pred"`` (the prediction on the sentence itself) or a row-wise callable.
        steps: number of points on the path.
        baseline: the token id whose embedding is the baseline at every position (a pad / mask token),
            or ``None`` for the zero embedding.
        method: a quadrature rule of :data:`~lightning_introspect.methods.attribution.IG_METHODS`.
        batch_size: most rows (path points x sentences) per forward pass.
        embedding_layer: the embedding module (dotted name or submodule); ``None``: :func:`find_embedding`.

    Returns:
        A detached signed ``(N, T)`` tensor.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 2))
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> scores = token_integrated_gradients(net, ids, 1, baseline=0)
        >>> gap = net(ids)[0, 1] - net(torch.zeros_like(ids))[0, 1]
        >>> torch.allclose(scores.sum(), gap, atol=1e-5)
        True
    """
    return token_attributions(
        model, inputs, target, ["integrated_gradients"], embedding_layer=embedding_layer,
        options={"integrated_gradients": {"steps": steps, "baseline": baseline, "method": method, "batch_size": batch_size}},
    )["integrated_gradients"]


def _integrated(
    model: nn.Module, ids: torch.Tensor, target: Target, layer: str, *, steps: int = 32, baseline: int | None = None,
    method: str = "riemann_trapezoid", batch_size: int = DEFAULT_PATH_BATCH,
) -> torch.Tensor:
    alphas, weights = ig_alphas(steps, method)
    _check_batch_size(batch_size)
    n = ids.shape[0]
    tiled = _tiled_target(target, n, model, ids)
    per_pass = max(1, batch_size // n)
    # the baseline's own pass runs first: never a forward nested inside the hooked one
    base = None if baseline is None else _baseline_embedding(model, ids, layer, baseline)
    total: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    for start in range(0, steps, per_pass):
        stop = min(steps, start + per_pass)
        chunk = torch.tensor(alphas[start:stop])

        def path(embedding: torch.Tensor, chunk: torch.Tensor = chunk) -> torch.Tensor:
            nonlocal base, delta
            emb = embedding.view(len(chunk), n, *embedding.shape[1:])[0]  # every copy holds the same sentences
            if base is None:
                base = torch.zeros_like(emb)
            if base.shape != emb.shape:
                raise ValueError(f"The baseline embedding has shape {tuple(base.shape)}, the sentences' {tuple(emb.shape)}.")
            delta = emb - base
            a = chunk.to(emb.device, emb.dtype).view(-1, 1, 1, 1)
            return (base.unsqueeze(0) + a * delta.unsqueeze(0)).reshape(-1, *emb.shape[1:])

        with _embedding_pass(model, ids.repeat(stop - start, 1), tiled(stop - start), layer, path) as run:
            g = run.grad().detach().view(stop - start, n, *run.leaf.shape[1:])
        w = torch.tensor(weights[start:stop], dtype=g.dtype, device=g.device).view(-1, 1, 1, 1)
        part = (w * g).sum(dim=0)
        total = part if total is None else total + part
    assert total is not None and delta is not None
    return (delta * total).sum(dim=-1)


def _token_lrp(model: nn.Module, ids: torch.Tensor, target: Target, **options: Any) -> torch.Tensor:
    """LRP where the LRP package serves token ids; relevance of ``(N, T, D)`` is summed over ``D``."""
    from lightning_introspect.methods.lrp import lrp

    relevance = lrp(model, ids, target, **options)
    if relevance.ndim == 3:
        relevance = relevance.sum(dim=-1)
    if relevance.shape != ids.shape:
        raise ValueError(f"LRP returned relevance of shape {tuple(relevance.shape)} for token ids {tuple(ids.shape)}; expected one score per token.")
    return relevance


def token_attributions(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    methods: Sequence[str] = ("saliency", "input_x_gradient", "integrated_gradients"),
    *,
    embedding_layer: LayerSpec = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Several token methods for the same sentences and target: ``{method: (N, T) scores}``.

    ``saliency`` and ``input_x_gradient`` share one forward and one ``torch.autograd.grad``; integrated
    gradients runs its path in batches; ``"pred"`` is resolved once, so every method explains the same
    classes.

    Args:
        model: the model, taking the token ids.
        inputs: ``(N, T)`` integer token ids.
        target: int, per-sample ids, ``"pred"`` or a row-wise callable on the output.
        methods: names from :data:`TOKEN_METHODS`.
        embedding_layer: the embedding module (dotted name or submodule); ``None`` / ``"auto"``:
            :func:`find_embedding`.
        options: ``{"integrated_gradients": {"steps", "baseline", "method", "batch_size"}, "lrp": {...}}``
            (``baseline``: a token id or ``None``, see :func:`token_integrated_gradients`).

    Returns:
        Detached ``(N, T)`` float tensors, in the order of ``methods``.

    Raises:
        ValueError: a method without a token version (Grad-CAM, guided backprop ...), unknown options,
            inputs that are not ``(N, T)`` integers, no embedding layer.

    Example:
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
        >>> out = token_attributions(net, torch.tensor([[1, 2, 3], [4, 5, 6]]), "pred")
        >>> {k: tuple(v.shape) for k, v in out.items()}
        {'saliency': (2, 3), 'input_x_gradient': (2, 3), 'integrated_gradients': (2, 3)}
    """
    names = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in names if m not in TOKEN_METHODS]
    if not names or bad:
        raise ValueError(
            f"Expected `methods` for token ids to be names from {', '.join(repr(m) for m in TOKEN_METHODS)} (the others need "
            f"floating inputs or a spatial feature map), but got {bad or names!r}."
        )
    options = {k: dict(v) for k, v in (options or {}).items()}
    allowed = {"saliency": set(), "input_x_gradient": set(), "integrated_gradients": {"steps", "baseline", "method", "batch_size"}}
    for method, opts in options.items():
        if method == "lrp":
            continue
        unknown = sorted(set(opts) - allowed.get(method, set()))
        if method not in allowed or unknown:
            valid = ", ".join(sorted(allowed.get(method, set()))) or "none"
            raise ValueError(f"Unknown option(s) {unknown or sorted(opts)} for {method!r} on token ids in `options`; valid: {valid}.")
    layer = _resolve(model, inputs, embedding_layer)
    results: dict[str, torch.Tensor] = {}
    predicted: torch.Tensor | None = None
    if "saliency" in names or "input_x_gradient" in names:
        with _embedding_pass(model, inputs, target, layer) as run:
            g = run.grad().detach()
            emb = run.leaf.detach()
            if isinstance(target, str) and target == "pred":
                predicted = target_indices(run.output.detach(), "pred")
        results["saliency"] = g.norm(dim=-1)
        results["input_x_gradient"] = (g * emb).sum(dim=-1)
    if "integrated_gradients" in names:
        ig_target: Target = predicted if predicted is not None else target
        results["integrated_gradients"] = _integrated(model, inputs, ig_target, layer, **options.get("integrated_gradients", {}))
    if "lrp" in names:
        results["lrp"] = _token_lrp(model, inputs, target, **options.get("lrp", {}))
    return {m: results[m].detach() for m in names}
