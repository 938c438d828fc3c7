"""``finetune``: the common QAT loop (AdamW, cosine learning rate, fixed seed, no printing)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


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
