"""Model, data and loss shared by tests/test_train.py and the subprocess scripts here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A 2-layer MLP: a frozen input layer, BatchNorm, dropout, a trainable head, a
    persistent buffer (``scale``) and a non-persistent one (``scratch``)."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1, batchnorm: bool = True):
        super().__init__()
        self.embed = nn.Linear(6, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 3)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)
        self.embed.weight.requires_grad_(False)  # embed.bias stays trainable

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.norm(self.embed(x))))) * self.scale


def make_model(hidden: int = 16, dropout: float = 0.1, batchnorm: bool = True) -> Net:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return Net(hidden, dropout, batchnorm)


def make_batches(n: int = 12, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(99)
    w = torch.randn(6, 3, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 6, generator=g)
        out.append({"x": x, "y": (x @ w).argmax(-1)})
    return out


def loss_fn(model, batch, info):
    logits = model(batch["x"])
    loss = F.cross_entropy(logits, batch["y"])
    acc = (logits.argmax(-1) == batch["y"]).float().mean()
    return loss, {"acc": acc.item(), "progress": info.progress}
