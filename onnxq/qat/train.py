"""QAT training loops (AdamW, cosine learning rate, fixed seed, no printing): ``finetune`` on
labelled batches, ``distill`` towards a float teacher's outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

DistillLoss = Literal["cosine", "mse"]


def finetune(
    module: Any,
    loader: Iterable[Any],
    loss_fn: Callable[..., Any],
    epochs: int,
    lr: float,
    *,
    scale_lr: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Any:
    """Train ``module`` for ``epochs`` passes over ``loader``; returns it in eval mode.

    A batch is ``(inputs..., target)``: every item but the last goes to the module, and
    ``loss_fn(output, target)`` is minimised. The learning rate follows a cosine from ``lr``
    to 0 over all steps; learnable scales (a module's ``scale_parameters()``) use ``scale_lr``
    (default ``lr``) and no weight decay. ``on_epoch(epoch, mean loss)`` follows progress. The
    seed fixes torch's global RNG (a shuffling DataLoader without its own generator uses it).
    """
    import torch

    from onnxq.errors import ConfigError

    if epochs < 1 or not lr > 0:
        raise ConfigError(f"finetune needs epochs >= 1 and lr > 0, got {epochs} and {lr}")
    torch.manual_seed(seed)
    scales = list(getattr(module, "scale_parameters", list)())
    chosen = {id(p) for p in scales}
    weights = [p for p in module.parameters() if p.requires_grad and id(p) not in chosen]
    groups = [{"params": weights, "weight_decay": weight_decay}]
    if scales:
        groups.append({"params": scales, "weight_decay": 0.0, "lr": scale_lr or lr})
    optimiser = torch.optim.AdamW(groups, lr=lr)
    steps = epochs * max(len(loader), 1) if hasattr(loader, "__len__") else None
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=steps) if steps else None
    module.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            *inputs, target = batch
            optimiser.zero_grad()
            loss = loss_fn(module(*inputs), target)
            loss.backward()
            optimiser.step()
            if schedule is not None:
                schedule.step()
            total, count = total + float(loss.detach()), count + 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(count, 1))
    return module.eval()


def distill(
    module: Any,
    teacher: Callable[..., Any],
    batches: Iterable[Any],
    *,
    epochs: int,
    lr: float,
    loss: DistillLoss = "cosine",
    scale_lr: float | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> Any:
    """Train the fake-quant ``module`` to reproduce ``teacher`` (the float model) on ``batches``;
    returns it in eval mode.

    A batch is a feed dict keyed by the module's input names (tensors or arrays) or a tuple of
    tensors in their order. The teacher's outputs ``t`` are computed once, without gradients;
    ``finetune`` then minimises, for the module's outputs ``y`` (rows along the last axis),
    ``loss="cosine"``: ``mean(1 - <y, t> / (|y| |t|))``, or ``loss="mse"``: ``mean((y - t)^2)``.
    The other arguments are ``finetune``'s.
    """
    import torch

    from onnxq.errors import ConfigError

    if loss not in DISTILL_LOSSES:
        raise ConfigError(f"distill loss must be one of {sorted(DISTILL_LOSSES)}, got {loss!r}")
    names = module.export_spec.input_names
    pairs = []
    with torch.no_grad():
        for batch in batches:
            inputs = tuple(
                torch.as_tensor(batch[name]) if isinstance(batch, Mapping) else batch[i]
                for i, name in enumerate(names)
            )
            pairs.append((*inputs, teacher(*inputs).detach()))
    return finetune(
        module,
        pairs,
        DISTILL_LOSSES[loss],
        epochs,
        lr,
        scale_lr=scale_lr,
        weight_decay=weight_decay,
        seed=seed,
        on_epoch=on_epoch,
    )


def _cosine_loss(output: Any, target: Any) -> Any:
    """``mean(1 - cos(output, target))`` over rows of the last axis."""
    import torch

    return (1 - torch.nn.functional.cosine_similarity(output, target, dim=-1)).mean()


def _mse_loss(output: Any, target: Any) -> Any:
    """``mean((output - target)^2)``."""
    import torch

    return torch.nn.functional.mse_loss(output, target)


DISTILL_LOSSES: dict[str, Callable[[Any, Any], Any]] = {"cosine": _cosine_loss, "mse": _mse_loss}
