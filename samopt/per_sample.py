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

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = ["Inputs", "chunk_size_for", "inputs_cat", "inputs_index", "inputs_len", "inputs_map", "per_sample_grads"]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: A batch of model inputs: one tensor (``model(x)``), or named tensors (``model(**x)``, as Hugging Face models
#: take ``input_ids``, ``attention_mask``, ...), stacked along dimension 0.
Inputs = Tensor | Mapping[str, Tensor]


def inputs_map(x: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """``fn`` applied to the tensor, or to each named tensor."""
    return {k: fn(v) for k, v in x.items()} if isinstance(x, Mapping) else fn(x)


def inputs_index(x: Inputs, index: int | slice) -> Inputs:
    """The examples ``index`` of a batch (an example, or a slice of the batch)."""
    return inputs_map(x, lambda t: t[index])


def inputs_len(x: Inputs) -> int:
    """The number of examples in a batch of inputs."""
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def inputs_cat(parts: Sequence[Inputs]) -> Inputs:
    """Batches of inputs joined along dimension 0."""
    if isinstance(parts[0], Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}  # type: ignore[index]
    return torch.cat(parts)  # type: ignore[arg-type]


def _call(model: nn.Module, params: dict[str, Tensor], x: Inputs) -> Tensor:
    """The model's output for a batch of one (``.logits`` of a Hugging Face output)."""
    one = inputs_map(x, lambda t: t.unsqueeze(0))
    out: Any = (
        functional_call(model, params, kwargs=dict(one))
        if isinstance(one, Mapping)
        else functional_call(model, params, (one,))
    )
    return out.logits if hasattr(out, "logits") else out


def chunk_size_for(params: Sequence[Tensor], budget_bytes: int) -> int:
    """How many examples' gradients of ``params`` fit in ``budget_bytes`` (at least 1)."""
    per_example = sum(p.numel() * p.element_size() for p in params)
    return max(1, budget_bytes // max(1, per_example))


def per_sample_grads(
    model: nn.Module,
    names: Sequence[str],
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    chunk_size: int,
    label: Callable[[Tensor], Tensor] | None = None,
    vectorize: bool = True,
) -> Iterator[list[Tensor]]:
    """Gradients of ``loss_fn(model(x_i[None]), y_i[None])`` for every example, ``chunk_size`` at a time.

    Args:
        model: the module, used in its current train/eval mode. In training mode,
            BatchNorm normalises each example by its own statistics (as a batch-1
            pass does) and updates per-example copies of its running statistics,
            which are discarded; dropout draws independent masks per example.
        names: the ``model.named_parameters()`` names to differentiate; the others
            are held constant.
        inputs, targets: the examples, stacked along dimension 0; ``inputs`` is a
            tensor (the model is called as ``model(x)``) or a mapping of tensors
            (``model(**x)``); an output with a ``.logits`` field (Hugging Face) is
            reduced to it.
        loss_fn: ``loss_fn(output, target)`` for a batch of one, a scalar.
        chunk_size: examples per vectorised call and yielded chunk; bounds memory
            (each chunk holds ``chunk_size`` copies of the differentiated
            parameters' gradients). The loop (``vectorize=False``) yields one
            example at a time.
        label: if given, the loss of each example uses ``label(output)`` (computed
            from that example's output, e.g. a label sampled from the model's
            prediction) instead of its target.
        vectorize: ``True``: one ``vmap(grad(...))`` call per chunk (fast where
            batch-1 passes leave the device idle, as on GPUs). ``False``: a loop of
            batch-1 ``torch.autograd.grad`` calls, still through ``functional_call``
            (on a CPU, where a batch-1 pass already keeps the cores busy, this is the
            faster one: see ``benchmarks/fisher_cost.py``).

    Yields:
        For each chunk, one tensor per name, of shape ``(examples in chunk, *param.shape)``.
    """
    wanted = set(names)
    all_params = dict(model.named_parameters())
    missing = wanted - all_params.keys()
    if missing:
        raise ValueError(f"names {sorted(missing)} are not parameters of the model")
    const = {n: p.detach() for n, p in all_params.items() if n not in wanted}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, Tensor], b: dict[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
        out = _call(model, {**p, **const, **b}, x)
        return loss_fn(out, y.unsqueeze(0) if label is None else label(out))

    with torch.enable_grad():
        if vectorize:
            diff = {n: all_params[n].detach() for n in names}
            per_example = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), randomness="different")
            for start in range(0, inputs_len(inputs), chunk_size):
                x = inputs_index(inputs, slice(start, start + chunk_size))
                y = targets[start : start + chunk_size]
                # each example gets its own copy of the buffers, so in-place updates stay private
                b = {n: t.unsqueeze(0).expand(len(y), *t.shape).clone() for n, t in buffers.items()}
                g = per_example(diff, b, x, y)
                yield [g[n] for n in names]
            return
        diff = {n: all_params[n].detach().requires_grad_(True) for n in names}
        leaves = [diff[n] for n in names]
        if inputs_len(inputs) != len(targets):
            raise ValueError(f"{inputs_len(inputs)} inputs but {len(targets)} targets")
        for i, y in enumerate(targets):
            x = inputs_index(inputs, i)
            b = {n: t.clone() for n, t in buffers.items()}
            gs = torch.autograd.grad(loss_one(diff, b, x, y), leaves, allow_unused=True, materialize_grads=True)
            yield [g.unsqueeze(0) for g in gs]
