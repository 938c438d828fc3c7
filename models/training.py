"""One deterministic training loop for the zoo's small classifiers."""

from __future__ import annotations

import torch
from torch import nn


def fit_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    clip_norm: float | None = None,
) -> nn.Module:
    """AdamW with a one-cycle schedule on cross-entropy; returns the model in eval mode.

    Deterministic: seeded shuffling, one thread (the thread count is restored afterwards).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * -(-len(x) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                batch = order[start : start + batch_size]
                optimiser.zero_grad()
                loss_fn(model(x[batch]), y[batch]).backward()
                if clip_norm is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimiser.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
