"""Models of the built-in workloads: a small CNN for IDX image sets and a character-level GPT."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from pysim.pooling import MaxPool2x2


class ImageCNN(nn.Module):
    """A small LeNet-style CNN: two 5x5 convolutions (16, 32 channels) with 2x2 max pooling
    (:class:`pysim.pooling.MaxPool2x2`, ``nn.MaxPool2d(2)`` bit for bit), then two linear
    layers. 46,730 parameters for 28x28 greyscale images and 10 classes (MNIST)."""

    def __init__(self, channels: int = 1, height: int = 28, width: int = 28, classes: int = 10) -> None:
        super().__init__()
        h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if h < 1 or w < 1:
            raise ValueError(f"images of {height}x{width} are too small for this CNN; it needs at least 16x16")
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 5), nn.ReLU(), MaxPool2x2(),
            nn.Conv2d(16, 32, 5), nn.ReLU(), MaxPool2x2(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * h * w, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding size {dim} must be a multiple of the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A nanoGPT-style decoder over characters: token + position embeddings, ``layers`` blocks,
    a final LayerNorm and a head tied to the token embedding. Input (batch, time) ids; output
    (batch, time, vocab) logits. Defaults: 4 layers, 4 heads, 128 wide, context 64 (~0.8M parameters)."""

    def __init__(self, vocab: int, context: int = 64, layers: int = 4, heads: int = 4, dim: int = 128) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} exceeds the model's context of {self.context}")
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        return self.head(self.ln(self.blocks(x)))
