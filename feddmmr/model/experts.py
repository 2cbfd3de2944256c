"""Memory experts: what the client's memory says about a candidate item, in one modality.

    a_ck  = softmax_k( (Wq query_c) . (Wk slot_k) / sqrt(d) )      over the visible memory slots k
    out_c = LN( sum_k a_ck Wv slot_k )                               [..., C, d]

``query_c`` is the candidate's projected visual feature (visual expert) or its item embedding
(semantic expert); ``slot_k`` is the projected feature of a memory item. The three maps start as
identities, so an untrained expert is a similarity-weighted pooling of the user's remembered items:
a meaningful operator, never a frozen random transform (the failure of the original Stage 3). With
no visible slot the pooled vector is zero and LN returns its bias (zero at initialisation).

The model only needs <out_c, E_c> for each candidate's item embedding E_c. ``forward`` computes it
exactly without forming out_c: with x_c = sum_k a_ck v_k,
    <LN(x_c), E_c> = (sum_k a_ck <v_k, g*E_c> - mu_c sum(g*E_c)) / sqrt(var_c + eps) + <b, E_c>
    mu_c = sum_k a_ck mean(v_k),   var_c = a_c G a_c / d - mu_c^2,   G = V V^T     (g, b: LN affine)
so every per-candidate tensor is [..., C, K] (K memory slots) instead of [..., C, d]: scoring all
items for a batch of users stays small. ``pooled`` is the plain form, used by the tests.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NEG = -1e9  # finite "minus infinity": a row with no visible slot gives zero weights instead of NaN


class MemoryExpert(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.query = nn.Linear(hidden, hidden, bias=False)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        for lin in (self.query, self.key, self.value):
            nn.init.eye_(lin.weight)

    def attention(self, query: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor):
        """query [..., C, d], slots [..., K, d], visible [..., K]
        -> weights [..., C, K] (zero on invisible slots) and values [..., K, d].

        (Wq q) . (Wk s) = q . (Wq^T Wk s): the query map is folded into the K keys, so nothing is
        computed per candidate before the dot product.
        """
        keys = self.key(slots) @ self.query.weight                               # [..., K, d]
        scores = query @ keys.transpose(-1, -2) / math.sqrt(self.hidden)         # [..., C, K]
        vis = visible.unsqueeze(-2)                                              # [..., 1, K]
        weights = torch.softmax(scores.masked_fill(~vis, NEG), dim=-1) * vis     # [..., C, K]
        return weights, self.value(slots)

    def pooled(self, query: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """LN(expert output) [..., C, d], the plain form."""
        weights, values = self.attention(query, slots, visible)
        return self.norm(weights @ values)

    def forward(self, query: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """<LN(expert output_c), target_c> [..., C] for candidate embeddings target [..., C, d]."""
        a, v = self.attention(query, slots, visible)                              # [..., C, K], [..., K, d]
        d = self.hidden
        g_target = target * self.norm.weight                                     # [..., C, d]
        dots = (a * (g_target @ v.transpose(-1, -2))).sum(-1)                     # sum_k a_ck <v_k, g*E_c>
        mu = a @ v.mean(-1).unsqueeze(-1)                                         # [..., C, 1]
        sq = ((a @ (v @ v.transpose(-1, -2))) * a).sum(-1, keepdim=True) / d      # [..., C, 1]
        var = (sq - mu * mu).clamp(min=0.0)
        centred = dots - mu.squeeze(-1) * g_target.sum(-1)
        return centred / torch.sqrt(var.squeeze(-1) + self.norm.eps) + target @ self.norm.bias
