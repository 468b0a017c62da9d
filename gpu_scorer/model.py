"""SASRec-style causal Transformer that scores candidate items for a user's recent sequence.

Tensor-only: ``forward`` takes id tensors and returns scores, with no numpy, no device moves
and no Python branching on values, so that it traces and exports to ONNX unchanged.

Conventions (the runtime and the training code rely on them):

- row 0 of the item table is padding, row 1 the out-of-vocabulary row (see ``vocab.py``);
- sequences are **left-padded**: the most recent item is the last column;
- positions are counted **from the end** (the most recent item has the same position
  embedding whatever the padded length), so a sequence scores the same padded to 10 or
  to 50, and the exported graph needs no position-id input;
- the last block computes its query only for the last position: nothing else is read, and
  it cuts that block's attention and feed-forward work by a factor of L.

>>> import torch
>>> model = SASRecScorer(ScorerConfig(n_items=10, dim=8, n_heads=2, max_len=5)).eval()
>>> model(torch.tensor([[0, 3, 4]]), torch.tensor([[2, 5, 7, 9]])).shape
torch.Size([1, 4])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_MASKED = -1e9  # additive bias for masked keys; finite, so a fully padded row stays finite


@dataclass(frozen=True)
class ScorerConfig:
    """Hyper-parameters of :class:`SASRecScorer`; ``n_items`` counts every embedding row
    (padding and OOV included), i.e. ``len(vocab)``."""

    n_items: int
    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    ffn_mult: int = 1  # feed-forward width = ffn_mult * dim (SASRec uses 1)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if self.n_items < 2:
            raise ValueError(f"n_items={self.n_items} must count the padding and OOV rows (>= 2)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScorerConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention written with plain MatMul/Softmax.

    ``nn.MultiheadAttention`` exports to a long chain of reshapes and transposes with a mask
    built on every call (and a -inf mask that turns fully padded rows into NaN); here Q/K/V
    come from one packed 2-D projection (tokens as rows, so ORT and PyTorch both run a Gemm
    with the bias fused) and the mask is a sliced constant plus the key-padding bias.
    """

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q [B, H, Lq, dh] (pre-scaled), k/v [B, H, L, dh] -> [B*Lq, D] (projected)."""
        att = torch.matmul(q, k.transpose(-1, -2)) + bias
        att = self.drop(torch.softmax(att, dim=-1))
        y = torch.matmul(att, v)  # [B, H, Lq, dh]
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b * n, self.n_heads * self.head_dim))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """All positions: ``x`` [B, L, D], ``bias`` [B, 1, L, L] (causal + key padding) -> [B*L, D]."""
        b, n, d = x.shape
        # one 2-D projection (a Gemm with its bias), one transpose to [3, B, H, L, dh]; the
        # 1/sqrt(dh) scale goes on q ([B,H,L,dh]) rather than on the [B,H,L,L] logits
        qkv = self.qkv(x.reshape(b * n, d)).reshape(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self._attend(qkv[0] * self.scale, qkv[1], qkv[2], bias)

    def forward_last(self, x: Tensor, bias: Tensor) -> Tensor:
        """The last position only; ``bias`` [B, 1, 1, L] (key padding). Returns [B, D]."""
        b, n, d = x.shape
        w, bb = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, -1], w[:d], bb[:d]) * self.scale  # [B, D]
        kv = F.linear(x.reshape(b * n, d), w[d:], bb[d:]).reshape(b, n, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self._attend(q.reshape(b, self.n_heads, 1, self.head_dim), kv[0], kv[1], bias)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + Attn(LN x), then x + FFN(LN x)."""

    def __init__(self, cfg: ScorerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.dim)
        hidden = cfg.ffn_mult * cfg.dim
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, hidden), nn.ReLU(), nn.Linear(hidden, cfg.dim), nn.Dropout(cfg.dropout)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, d = x.shape
        h = x.reshape(b * n, d) + self.drop(self.attn(self.ln1(x), bias))  # tokens as rows: Gemm
        h = h + self.ffn(self.ln2(h))
        return h.reshape(b, n, d)

    def forward_last(self, x: Tensor, bias: Tensor) -> Tensor:
        """[B, L, D] -> [B, D], the last position only."""
        h = x[:, -1] + self.drop(self.attn.forward_last(self.ln1(x), bias))
        return h + self.ffn(self.ln2(h))


class SASRecScorer(nn.Module):
    """Causal Transformer over item ids; scores = last hidden state · candidate embeddings."""

    def __init__(self, cfg: ScorerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_len, cfg.dim))  # last row = most recent
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_out = nn.LayerNorm(cfg.dim)
        causal = torch.triu(torch.full((cfg.max_len, cfg.max_len), _MASKED), diagonal=1)
        self.register_buffer("causal_bias", causal, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.item_emb.weight, std=self.cfg.dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.normal_(self.pos_emb, std=0.02)

    def _embed(self, seq_ids: Tensor) -> tuple[Tensor, Tensor]:
        n = seq_ids.shape[1]
        x = self.item_emb(seq_ids) * math.sqrt(self.cfg.dim) + self.pos_emb[self.cfg.max_len - n :]
        key_bias = (seq_ids == 0).to(x.dtype).mul(_MASKED)[:, None, None, :]  # [B, 1, 1, L]
        return self.emb_drop(x), key_bias

    def encode_all(self, seq_ids: Tensor) -> Tensor:
        """Hidden state at every position [B, L, D] (training: each predicts the next item)."""
        x, key_bias = self._embed(seq_ids)
        n = seq_ids.shape[1]
        bias = key_bias + self.causal_bias[:n, :n]
        for block in self.blocks:
            x = block(x, bias)
        return self.ln_out(x)

    def encode_last(self, seq_ids: Tensor) -> Tensor:
        """Hidden state of the last position [B, D]; equal to ``encode_all(s)[:, -1]``."""
        x, key_bias = self._embed(seq_ids)
        n = seq_ids.shape[1]
        bias = key_bias + self.causal_bias[:n, :n]
        for block in self.blocks[:-1]:
            x = block(x, bias)
        return self.ln_out(self.blocks[-1].forward_last(x, key_bias))

    def score(self, hidden: Tensor, cand_ids: Tensor) -> Tensor:
        """[B, D] hidden · [B, C, D] candidate embeddings -> [B, C]."""
        return torch.matmul(self.item_emb(cand_ids), hidden.unsqueeze(-1)).squeeze(-1)

    def forward(self, seq_ids: Tensor, cand_ids: Tensor) -> Tensor:
        """``seq_ids`` LongTensor [B, L] (left-padded with 0, L <= max_len), ``cand_ids``
        LongTensor [B, C] -> FloatTensor [B, C] of scores (higher is better)."""
        return self.score(self.encode_last(seq_ids), cand_ids)


__all__ = ["SASRecScorer", "ScorerConfig"]
