"""Per-example gradients of a model, vectorised with :mod:`torch.func`.

``vmap(grad(loss of one example))`` over a chunk of examples replaces a loop of
batch-1 forward/backward passes (the way the official Sparse SAM code computes its
Fisher information). The model is called through
:func:`torch.func.functional_call`, so nothing of it changes: its ``.grad``
fields, its train/eval mode and its buffers (BatchNorm running statistics are
updated in per-example copies that are thrown away) stay exactly as they were.

Example::

    from samopt.per_sample import per_sample_grads

    names = [n for n, _ in model.named_parameters()]
    for chunk in per_sample_grads(model, names, x, y, F.cross_entropy, chunk_size=32):
        sq = [g.square().sum(0) for g in chunk]   # chunk[i]: (examples, *shape of parameter i)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["chunk_size_for", "per_sample_grads"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def chunk_size_for(params: Sequence[Tensor], budget_bytes: int) -> int:
    """How many examples' gradients of ``params`` fit in ``budget_bytes`` (at least 1)."""
    per_example = sum(p.numel() * p.element_size() for p in params)
    return max(1, budget_bytes // max(1, per_example))


def per_sample_grads(
    model: nn.Module,
    names: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    label: Callable[[Tensor], Tensor] | None = None,
    randomness: str = "different",
) -> Iterator[list[Tensor]]:
    """Gradients of ``loss_fn(model(x_i[None]), y_i[None])`` for every example, ``chunk_size`` at a time.

    Args:
        model: the module, used in its current train/eval mode. In training mode,
            BatchNorm normalises each example by its own statistics (as a batch-1
            pass does) and updates per-example copies of its running statistics,
            which are discarded.
        names: the ``model.named_parameters()`` names to differentiate; the others
            are held constant.
        inputs, targets: the examples, stacked along dimension 0.
        loss_fn: ``loss_fn(output, target)`` for a batch of one, a scalar.
        chunk_size: examples per vectorised call; bounds memory (each call holds
            ``chunk_size`` copies of the differentiated parameters' gradients).
        label: if given, the loss of each example uses ``label(output)`` (computed
            from that example's output, e.g. a label sampled from the model's
            prediction) instead of its target.
        randomness: :func:`torch.func.vmap`'s ``randomness`` (dropout in training
            mode): ``"different"`` draws independent masks per example, like a loop.

    Yields:
        For each chunk, one tensor per name, of shape ``(examples in chunk, *param.shape)``.
    """
    wanted = set(names)
    all_params = dict(model.named_parameters())
    missing = wanted - all_params.keys()
    if missing:
        raise ValueError(f"names {sorted(missing)} are not parameters of the model")
    diff = {n: all_params[n].detach() for n in names}
    const = {n: p.detach() for n, p in all_params.items() if n not in wanted}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, ({**p, **const}, b), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0) if label is None else label(out))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness=randomness)
    with torch.enable_grad():
        for start in range(0, inputs.shape[0], chunk_size):
            x, y = inputs[start : start + chunk_size], targets[start : start + chunk_size]
            # each example gets its own copy of the buffers, so in-place updates stay private
            b = {n: t.unsqueeze(0).expand(x.shape[0], *t.shape).clone() for n, t in buffers.items()}
            g = per_example(diff, b, x, y)
            yield [g[n] for n in names]
