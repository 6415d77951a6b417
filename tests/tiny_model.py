"""A tiny train-form network for the bench/verify tests: ConvBN stem, blocks with BN, head."""
from __future__ import annotations

import torch
from torch import nn

from vismlp_deploy.models.init import randomize_
from vismlp_deploy.models.layers import ConvBN


class Block(nn.Module):
    """x + fc2(gelu(fc1(x))) with a BN on fc1's output (folds exactly into fc1)."""

    def __init__(self, c: int):
        super().__init__()
        self.fc1 = ConvBN(c, 2 * c, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(2 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class Tiny(nn.Module):
    """(N, 3, 16, 16) -> (N, 10)."""

    def __init__(self, c: int = 8, depth: int = 3, classes: int = 10):
        super().__init__()
        self.stem = ConvBN(3, c, 4, stride=4)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, classes)
        self.input_size = (3, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def tiny(seed: int = 0) -> Tiny:
    return randomize_(Tiny(), seed=seed).eval()


def tiny_checkpoint(path) -> None:
    """A small timm-resmlp train checkpoint (32 px, 2 blocks, dim 16) with our metadata, for CLI tests."""
    from vismlp_deploy.export.torch_artifact import save_model
    from vismlp_deploy.models.registry import create_model

    model = randomize_(create_model("resmlp_12", img_size=32, patch_size=8, num_blocks=2, embed_dim=16, num_classes=10))
    model.input_size = (3, 32, 32)
    save_model(model, path, form="train")
