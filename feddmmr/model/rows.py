"""Row gathers of item-indexed tables (the local catalogues of sparse client updates)."""
from __future__ import annotations

import torch


def take_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]`` for rows [R] or [a, R] -> [R, ...] or [a, R, ...], with ``index_select``: on CPU it gathers
    whole rows at a time, two to five times faster than advanced indexing on a large table."""
    return table.index_select(0, rows.reshape(-1)).view(*rows.shape, *table.shape[1:])
