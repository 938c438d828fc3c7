"""A ViT-style image encoder written from scratch (no timm): patch-embedding Conv, a class
token and learned position embeddings, pre-LN blocks (explicit multi-head attention, GELU MLP),
a final LayerNorm and a Linear head on the class token.

``build_vit`` draws the weights from a seed (ViT's truncated-normal init, std 0.02); the sizes of
``VIT_S`` are ViT-S/16's (384 wide, 6 heads, 12 blocks, 224x224 input). ``vit_tiny`` is a
two-block, 64-wide model on 32x32 inputs for fast tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTSize:
    """Image side, patch side, width, heads, blocks, MLP ratio, classes."""

    image: int = 224
    patch: int = 16
    dim: int = 384
    heads: int = 6
    depth: int = 12
    mlp_ratio: int = 4
    classes: int = 1000


VIT_S = ViTSize()
VIT_TINY = ViTSize(image=32, patch=8, dim=64, heads=2, depth=2, classes=10)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, softmax(q k^T / sqrt(d)) v, an output Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        context = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(context)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, class token + positions, blocks, LayerNorm, head on the class token."""

    def __init__(self, size: ViTSize) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, size.dim, size.patch, stride=size.patch)
        tokens = (size.image // size.patch) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, size.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, size.dim))
        self.blocks = nn.Sequential(
            *(Block(size.dim, size.heads, size.mlp_ratio) for _ in range(size.depth))
        )
        self.norm = nn.LayerNorm(size.dim)
        self.head = nn.Linear(size.dim, size.classes)
        for parameter in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(parameter, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def build_vit(size: ViTSize = VIT_S, seed: int = 0) -> ViT:
    """A ViT of ``size`` with weights drawn from ``seed`` (global RNG untouched), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViT(size).eval()


def vit_s_factory() -> tuple[ViT, torch.Tensor]:
    """For ``onnxq export models.vit:vit_s_factory``: ViT-S/16 and one 224x224 photo crop."""
    from calibration.images import resnet_inputs

    return build_vit(VIT_S), torch.from_numpy(resnet_inputs(1))
