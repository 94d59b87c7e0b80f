"""Synthetic token streams with structure a small GPT can learn, identical under every layout.

Each sequence follows a fixed random successor table: with probability ``1 - noise`` the next
token is ``successor[token]``, otherwise uniform. A model that learns the table drives the loss
from ``ln(vocab)`` towards the noise entropy, so a falling loss is visible in a few steps.
Sample ``i`` of iteration ``t`` depends only on ``(seed, t, i)``: any data-parallel split of a
global batch sees the same tokens as one device.
"""

from __future__ import annotations

from typing import Dict

import torch


class SuccessorTableData:
    """Global batches of ``[global_batch, seq_length + 1]`` tokens."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, noise: float = 0.1):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.noise = noise
        generator = torch.Generator().manual_seed(seed)
        self.successor = torch.randperm(vocab_size, generator=generator)

    def sample(self, iteration: int, index: int) -> torch.Tensor:
        """Sequence ``index`` of ``iteration``: ``[seq_length + 1]`` int64 tokens."""
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + iteration) * 1_000_003 + index
        )
        n = self.seq_length + 1
        random_tokens = torch.randint(self.vocab_size, (n,), generator=generator)
        jump = torch.rand(n, generator=generator) < self.noise
        tokens = torch.empty(n, dtype=torch.long)
        tokens[0] = random_tokens[0]
        for t in range(1, n):
            tokens[t] = random_tokens[t] if jump[t] else self.successor[tokens[t - 1]]
        return tokens

    def micro_batch(self, iteration: int, first: int, size: int) -> Dict[str, torch.Tensor]:
        """Samples ``[first, first + size)`` as Megatron's GPT batch (``[b, s]`` tensors)."""
        tokens = torch.stack([self.sample(iteration, first + i) for i in range(size)])
        s = self.seq_length
        return {
            "tokens": tokens[:, :s].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(size, s),
            "position_ids": torch.arange(s).unsqueeze(0).expand(size, s).contiguous(),
            "attention_mask": torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1),
        }
