"""SASRec backbone: self-attentive sequential recommendation over item-ID sequences.

Pre-LN transformer blocks with a causal + key-padding mask, sqrt(d)-scaled item embeddings shared
between input and output, absolute positions counted from the left of a left-padded window (the
most recent item always sits at position L-1). Written with plain tensor ops so that it runs under
``torch.func.vmap`` (many clients trained in one call).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout whose keep mask comes from 16-bit slices of 64-bit random draws.

    Same semantics as ``nn.Dropout`` (zero with probability p, scale the rest by 1/(1-p)), with p
    resolved to 1/65536; on CPU it draws a quarter of the random numbers ``nn.Dropout`` does (whose
    per-element Bernoulli sampling took a quarter of a training step). Works under ``vmap``
    (``randomness="different"``).
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = -32768 + round(p * 65536)     # keep where a uniform int16 >= threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        d = x.shape[-1]
        draws = torch.randint(-2 ** 63, 2 ** 63 - 1, x.shape[:-1] + ((d + 3) // 4,), dtype=torch.int64,
                              device=x.device)
        scale = (draws.view(torch.int16)[..., :d] >= self.threshold).to(x.dtype).mul_(1.0 / (1.0 - self.p))
        return x * scale                                                            # scale [..., d]: 0 or 1/(1-p)


class CausalSelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = Dropout(dropout)

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
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn_hidden), nn.GELU(), Dropout(dropout), nn.Linear(ffn_hidden, hidden))
        self.dropout = Dropout(dropout)

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
        self.emb_dropout = Dropout(dropout)
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
    return GatherDot.apply(item_weight, h, items)


class GatherDot(torch.autograd.Function):
    """out[p, j] = <h[p], E[c[p, j]]>, with a backward that never forms the gathered [P, C, d] rows' gradient:
    grad_h is an ``embedding_bag`` of E weighted by the output gradient (``WeightedBags``), grad_E one of h
    (``RowSums``). Training scores 1 + N candidates per target, so this is a third of a training step's work
    in autograd's plain form (gather, batched mat-vec, embedding backward)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(E: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # E [R, d], h [..., d], c [..., C] -> [..., C]
        return torch.bmm(F.embedding(c.reshape(-1, c.shape[-1]), E), h.reshape(-1, h.shape[-1], 1)).view(c.shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        E, h, c = ctx.saved_tensors
        C, d = c.shape[-1], h.shape[-1]
        gf = g.reshape(-1, C)                                                      # [P, C]
        grad_E = grad_h = None
        if ctx.needs_input_grad[1]:
            grad_h = WeightedBags.apply(E, c.reshape(-1, C), gf).view(h.shape)
        if ctx.needs_input_grad[0]:
            grad_E = RowSums.apply(h.reshape(-1, d), c.reshape(-1, C), gf, E.shape[0])
        return grad_E, grad_h, None


class _InBackward(torch.autograd.Function):
    """A function used only inside a backward pass (first order): it has no gradient of its own."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("this function is used inside a backward pass and has no gradient of its own")


class WeightedBags(_InBackward):
    """out[p] = sum_j w[p, j] E[c[p, j]]: E [R, d], c and w [P, C] -> [P, d], one ``embedding_bag`` call.

    Its ``vmap`` rule stacks the clients' tables into one [a*R, d] table (each client's ids offset by
    its row block) so a batch of clients is still one call. First-order only (used in a backward).
    """

    @staticmethod
    def forward(E: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        starts = torch.arange(0, c.numel(), c.shape[-1], device=c.device)         # one bag of C rows per p
        return F.embedding_bag(c.reshape(-1), E, starts, mode="sum", per_sample_weights=w.reshape(-1))

    @staticmethod
    def vmap(info, in_dims, E, c, w):
        a = info.batch_size
        E, c, w = (x.movedim(d, 0) if d is not None else x.expand(a, *x.shape) for x, d in zip((E, c, w), in_dims))
        R = E.shape[1]
        offset = (torch.arange(a, device=c.device) * R).view(a, 1, 1)
        out = WeightedBags.apply(E.reshape(a * R, -1), (c + offset).reshape(-1, c.shape[-1]),
                                 w.reshape(-1, w.shape[-1]))
        return out.view(a, -1, out.shape[-1]), 0


class RowSums(_InBackward):
    """out[r] = sum of w[p, j] h[p] over the (p, j) with c[p, j] = r: h [P, d], c and w [P, C] -> [R, d].

    The transpose of ``WeightedBags``: the (p, j) pairs sorted by row become one bag per row of an
    ``embedding_bag`` over h, so the [P*C, d] weighted copies of h that an ``index_add`` needs are never
    formed. Each row sums its pairs in (p, j) order (a stable sort). Its ``vmap`` rule stacks the clients
    into one call (client i's rows offset by i * R). First-order only (used in a backward).
    """

    @staticmethod
    def forward(h: torch.Tensor, c: torch.Tensor, w: torch.Tensor, R: int) -> torch.Tensor:
        flat = c.reshape(-1)
        order = _stable_argsort(flat, R)                                          # pairs grouped by row
        counts = torch.bincount(flat, minlength=R)
        starts = torch.cumsum(counts, 0) - counts                                  # each row's first pair
        return F.embedding_bag(order // c.shape[-1], h, starts, mode="sum", per_sample_weights=w.reshape(-1)[order])

    @staticmethod
    def vmap(info, in_dims, h, c, w, R):
        a = info.batch_size
        h, c, w = (x.movedim(d, 0) if d is not None else x.expand(a, *x.shape) for x, d in zip((h, c, w), in_dims[:3]))
        offset = (torch.arange(a, device=c.device) * R).view(a, 1, 1)
        out = RowSums.apply(h.reshape(-1, h.shape[-1]), (c + offset).reshape(-1, c.shape[-1]),
                            w.reshape(-1, w.shape[-1]), a * R)
        return out.view(a, R, -1), 0


def _stable_argsort(keys: torch.Tensor, bound: int) -> torch.Tensor:
    """``torch.argsort(keys, stable=True)`` for keys in [0, bound). On CPU with bound <= 2^16 it uses NumPy's
    radix sort of 16-bit keys, ten times faster than a comparison sort of the ~17k pairs of a training step."""
    if keys.device.type == "cpu" and bound <= 2 ** 16:
        return torch.from_numpy(np.argsort(keys.numpy().astype(np.uint16), kind="stable"))
    return torch.argsort(keys, stable=True)
