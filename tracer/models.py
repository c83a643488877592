"""Hand-written models of the built-in zoo: a residual MLP and a small GPT.

They are plain ``nn.Module``s with no dependency beyond torch, so they trace with both ``torch.export`` and
``torch.fx.symbolic_trace``. Sizes come from frozen config dataclasses; the zoo (``distplan.tracer.zoo``)
builds them and wraps them in a :class:`~distplan.tracer.zoo.ModelBundle`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "MLP", "GPTConfig", "MLPConfig"]


@dataclass(frozen=True, slots=True)
class MLPConfig:
    """Sizes of the residual MLP.

    Attributes:
        in_features: width of the input vectors.
        hidden: width of the residual stream.
        num_layers: number of residual blocks.
        out_features: width of the output (regression target).
    """

    in_features: int = 1024
    hidden: int = 4096
    num_layers: int = 8
    out_features: int = 1024

    def __post_init__(self) -> None:
        for f in ("in_features", "hidden", "num_layers", "out_features"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MLPConfig.{f} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MLPBlock(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``: a pre-norm residual block (a skip connection for the cut costs)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class MLP(nn.Module):
    """Input projection, ``num_layers`` residual blocks, output projection. Input ``(batch, in_features)``."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(config.in_features, config.hidden)
        self.blocks = nn.ModuleList([MLPBlock(config.hidden) for _ in range(config.num_layers)])
        self.out_proj = nn.Linear(config.hidden, config.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h)
        return self.out_proj(h)


@dataclass(frozen=True, slots=True)
class GPTConfig:
    """Sizes of the small GPT.

    Attributes:
        vocab_size: number of tokens.
        block_size: maximum sequence length (size of the learned position embedding).
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: width of the residual stream (divisible by ``n_head``).
    """

    vocab_size: int = 50304
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self) -> None:
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTConfig.{f} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.mlp = GPTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: token + position embeddings, pre-norm blocks, LM head tied to the token
    embedding. ``forward(input_ids)`` with ``input_ids`` of shape ``(batch, seq)`` returns the logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one tensor, counted once

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
