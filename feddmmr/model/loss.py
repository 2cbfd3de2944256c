"""The training loss of one client's batch: recommendation, drift-adaptive alignment, router balance.

    rec:   sampled softmax (ce) or BPR over the positive and N negatives, or softmax over the whole
           catalogue (full: the backbone alone, stage 1), mean over real targets;
    align: drift-adaptive contrastive loss (multimodal stages): for each modality the positive's
           projected feature must pick the positive's embedding among the candidates' (InfoNCE,
           temperature tau), each target weighted by 1 + alpha * surprise, so targets the sequence
           model fails on (interest drift) pull the modalities hardest;
    lb:    load balance, sum_m (mean router weight_m - 1/M)^2 over targets that have every modality.
    surprise = 1 - p(positive) under the batch's candidates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from feddmmr.config import TrainParams

LOSSES = ("ce", "bpr", "full")   # params: <stage>.loss
FULL_LOSS_STAGES = "the backbone alone (pretrain_sasrec)"   # where ``full`` applies: the experts score sampled candidates


def batch_loss(model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               pos: torch.Tensor, neg: torch.Tensor, mem_ids: torch.Tensor, mem_pos: torch.Tensor,
               tp: TrainParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one client's batch with weights ``params`` and the surprise of each target [b, L] (detached).

    x, y, pos [b, L] windows, next-item targets (0 = none) and their sequence index; neg [b, L, N];
    mem_ids / mem_pos [K] the client's memory slots.
    """
    if tp.loss == "full":                                   # every real item competes (backbone only)
        logits, extra = functional_call(model, params, (x, None, pos, mem_ids, mem_pos))  # [b, L, I]: item j+1
        target = (y - 1).clamp(min=0).unsqueeze(-1)                               # [b, L, 1] column of y
    else:                                                   # the positive and its N negatives
        cands = torch.cat([y.unsqueeze(-1), neg], dim=-1)                         # [b, L, 1+N], positive first
        logits, extra = functional_call(model, params, (x, cands, pos, mem_ids, mem_pos))
        target = torch.zeros_like(y).unsqueeze(-1)
    pos_logit = logits.gather(-1, target).squeeze(-1)                             # [b, L]
    if tp.loss in ("ce", "full"):
        per_pos = torch.logsumexp(logits, -1) - pos_logit
    elif tp.loss == "bpr":
        per_pos = F.softplus(logits[..., 1:] - logits[..., :1]).mean(-1)
    else:
        raise ValueError(f"unknown loss {tp.loss!r} ({' | '.join(LOSSES)})")
    mask = (y > 0).to(logits.dtype)
    total = (per_pos * mask).sum() / mask.sum().clamp(min=1.0)
    surprise = 1.0 - torch.softmax(logits.detach(), -1).gather(-1, target).squeeze(-1)   # [b, L]
    if extra:
        total = _add_multimodal_terms(total, extra, mask, surprise, tp)
    return total, surprise


def _add_multimodal_terms(total: torch.Tensor, extra: dict, mask: torch.Tensor,
                          surprise: torch.Tensor, tp: TrainParams) -> torch.Tensor:
    avail = extra["avail"] * mask.unsqueeze(-1)                               # [b, L, M] positive has modality
    cw = getattr(tp, "contrastive_weight", 0.0)
    if cw:
        a = extra["align"] / tp.contrastive_temperature                        # [b, L, C, M]
        nce = torch.logsumexp(a, -2) - a[..., 0, :]                             # [b, L, M]
        w = (1.0 + tp.surprise_alpha * surprise).unsqueeze(-1)                  # [b, L, 1]
        total = total + cw * ((w * nce * avail).sum((0, 1)) / avail.sum((0, 1)).clamp(min=1.0)).sum()
    lbw = getattr(tp, "load_balance_weight", 0.0)
    if lbw:
        every = avail.prod(-1)                                                  # [b, L]
        usage = (extra["router"] * every.unsqueeze(-1)).sum((0, 1)) / every.sum().clamp(min=1.0)
        total = total + lbw * ((usage - 1.0 / avail.shape[-1]) ** 2).sum() * (every.sum() > 0)
    return total
