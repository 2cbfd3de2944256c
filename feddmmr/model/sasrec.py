"""SASRec backbone: self-attentive sequential recommendation over item-ID sequences.

Pre-LN transformer blocks with a causal + key-padding mask, sqrt(d)-scaled item embeddings shared
between input and output, absolute positions counted from the left of a left-padded window (the
most recent item always sits at position L-1). Written with plain tensor ops so that it runs under
``torch.func.vmap`` (many clients trained in one call).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        # x [B, L, d]; allowed [B, L, L] (query, key) -> True where attention is allowed
        B, L, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.reshape(B, L, self.heads, d // self.heads).transpose(1, 2)  # [B, h, L, dh]
        k = k.reshape(B, L, self.heads, d // self.heads).transpose(1, 2)
        v = v.reshape(B, L, self.heads, d // self.heads).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)   # [B, h, L, L]
        scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        attn = self.dropout(torch.softmax(scores, dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(B, L, d)                   # [B, L, d]
        return self.out(y)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn_hidden: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_hidden, hidden))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), allowed))
        x = x + self.dropout(self.ffn(self.ln2(x)))
        return x


class SASRec(nn.Module):
    def __init__(self, num_items: int, max_seq_len: int, hidden: int = 128, blocks: int = 2, heads: int = 4,
                 ffn_hidden: int = 128, dropout: float = 0.2):
        super().__init__()
        self.num_items = num_items
        self.max_seq_len = max_seq_len
        self.hidden = hidden
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)  # row 0 = padding
        self.pos_emb = nn.Embedding(max_seq_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn_hidden, dropout) for _ in range(blocks))
        self.final_ln = nn.LayerNorm(hidden)
        nn.init.normal_(self.item_emb.weight, std=hidden ** -0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] left-padded item ids -> hidden states [B, L, d] (position t sees items <= t)."""
        B, L = seq.shape
        valid = seq > 0                                                        # [B, L]
        pos = torch.arange(L, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.hidden) + self.pos_emb(pos)  # [B, L, d]
        x = self.emb_dropout(x) * valid.unsqueeze(-1)
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()  # [L, L]
        eye = torch.eye(L, dtype=torch.bool, device=seq.device)
        allowed = causal & (valid.unsqueeze(1) | eye)                         # [B, L, L]; pads see themselves
        for block in self.blocks:
            x = block(x, allowed)
        return self.final_ln(x)

    forward = encode

    def score(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """h [..., d], candidate items [..., C] -> dot-product scores [..., C]."""
        return score_items(self.item_emb.weight, h, items)

    def score_all(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, d] -> scores over every real item [B, I] (column j is item j+1)."""
        return h @ self.item_emb.weight[1:].T


def score_items(item_weight: torch.Tensor, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Dot products of h [..., d] with the embeddings of candidate items [..., C] -> [..., C]."""
    return (F.embedding(items, item_weight) @ h.unsqueeze(-1)).squeeze(-1)  # [..., C, d] @ [..., d, 1]
