"""Stand-ins for testing lm-eval integrations without a real model (used by this package's tests).

``TinyCausalLM`` follows the model interface quamba-eval needs (``model(input_ids, seq_lens=None)``
returning ``.logits``); with ``exact=True`` every float32 operation is exact, so any batching or
summation order gives the same bits. ``ByteTokenizer`` maps UTF-8 bytes to ids 0..255, EOS 256.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

EOS = 256


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes are ids 0..255, EOS is 256."""

    eos_token_id = EOS
    vocab_size = 257

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TinyCausalLM(torch.nn.Module):
    """Stand-in causal LM: embedding + bounded running-sum feature + causal depthwise conv (K=4)
    + ReLU + linear head, random seeded weights. With exact=True the weights are small integers
    and every float32 operation is exact, so any summation order gives the same bits. The model
    vocabulary (260) is padded beyond the tokenizer's (257), as Mamba's is."""

    def __init__(self, seed=0, exact=True, vocab=260, dim=16, width=4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        if exact:
            emb = torch.randint(-3, 4, (vocab, dim), generator=g).float()
            conv = torch.randint(-2, 3, (dim, width), generator=g).float()
            head = torch.randint(-3, 4, (vocab, dim), generator=g).float()
        else:
            emb = torch.randn(vocab, dim, generator=g)
            conv = torch.randn(dim, width, generator=g) * 0.5
            head = torch.randn(vocab, dim, generator=g)
        self.emb = torch.nn.Parameter(emb)
        self.conv = torch.nn.Parameter(conv)
        self.head = torch.nn.Parameter(head)
        self.scale = 2.0**-5
        self.calls = []

    def forward(self, input_ids, seq_lens=None):
        batch, length = input_ids.shape
        if seq_lens is not None:
            assert seq_lens.shape == (batch,) and int(seq_lens.min()) >= 1
            assert int(seq_lens.max()) == length  # right padding to the longest row
        self.calls.append((batch, length, None if seq_lens is None else seq_lens.tolist()))
        x = self.emb[input_ids]
        # Long-range dependence: running sum of the embeddings, folded into a small range.
        x = x + torch.remainder(x.cumsum(dim=1), 7.0) - 3.0
        y = torch.zeros_like(x)
        width = self.conv.shape[1]
        for k in range(width):
            shift = width - 1 - k
            shifted = torch.nn.functional.pad(x, (0, 0, shift, 0))[:, :length]
            y = y + shifted * self.conv[:, k]
        h = torch.relu(y)
        return SimpleNamespace(logits=(h @ self.head.T) * self.scale)
