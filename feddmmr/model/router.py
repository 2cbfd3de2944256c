"""Item-centric router: weights of the visual and semantic experts from the target item's embedding.

w = softmax(MLP(E_item)) restricted to the modalities the item has, renormalised; an item with no
modality gets (0, 0). The last layer is zero-initialised, so an untrained router weighs the available
experts equally.
"""
from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    def __init__(self, hidden: int, router_hidden: int, experts: int = 2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, router_hidden), nn.ReLU(), nn.Linear(router_hidden, experts))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, item_emb: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """item_emb [..., d], available [..., E] (bool) -> weights [..., E] summing to 1 (or 0 when none)."""
        w = torch.softmax(self.mlp(item_emb), dim=-1) * available        # [..., E]
        return w / w.sum(-1, keepdim=True).clamp(min=1e-12)
