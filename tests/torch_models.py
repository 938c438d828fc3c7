"""Small PyTorch models several test files export (import only where torch is installed)."""

from __future__ import annotations

import torch

SEQ, WIDTH, VOCAB = 12, 64, 500


class TinyEncoder(torch.nn.Module):
    """Embedding + 2 encoder layers (post-LN with ReLU like BERT, or pre-LN with GELU like
    GPT-2) + mean pooling, with outlier channels like trained transformers."""

    def __init__(self, *, pre_ln: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        layer = torch.nn.TransformerEncoderLayer(
            WIDTH,
            4,
            128,
            dropout=0.0,
            batch_first=True,
            norm_first=pre_ln,
            activation="gelu" if pre_ln else "relu",
        )
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        with torch.no_grad():  # a few large channels, as trained transformers have
            for norm in (m for m in self.modules() if isinstance(m, torch.nn.LayerNorm)):
                norm.weight[:3] *= 12.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(ids)).mean(dim=1)
