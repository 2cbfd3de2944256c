"""FedDMMR: SASRec backbone with a residual multimodal enhancement read from the client's memory.

For a user state h (the backbone's last position after its final LayerNorm, i.e. LN(seq)) and a
candidate item c:

    vis_c = VisualExpert(query = P_vis(v_c), slots = P_vis(v_memory))           P_vis: 512 -> d
    sem_c = SemanticExpert(query = E_c,      slots = P_sem(t_memory))           P_sem: 384 -> d
    (w_vis, w_sem)_c = Router(E_c), restricted to the modalities item c has
    fused_c = LN(seq) + g * (w_vis * LN(vis_c) + w_sem * LN(sem_c))              g: learnable gating_weight
    score_c = <fused_c, E_c>                                                    E: the shared item embeddings

One scoring function serves training (sampled candidates) and evaluation (sampled or every item).
The experts read the user's memory, so the enhancement is personal: with an empty memory it is zero.
With no feature dims (Stage 1) the model is the plain backbone: score_c = <h, E_c>.

Feature tables are non-persistent buffers (data, not weights): checkpoints hold only parameters, and the
features are loaded from the feature files, with their hashes checked, when a model is rebuilt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import MemoryExpert
from .router import Router
from .sasrec import SASRec, score_items

# Every parameter belongs to exactly one group; stages load, train and freeze whole groups.
GROUPS: dict[str, tuple[str, ...]] = {
    "item_embeddings": ("sasrec.item_emb.",),
    "backbone": ("sasrec.",),
    "projections": ("visual_proj.", "text_proj."),
    "gate": ("gating_weight",),
    "experts": ("visual_expert.", "semantic_expert."),
    "router": ("router.",),
}


def group_of(name: str) -> str:
    """The group of a parameter name (first matching prefix, in GROUPS order)."""
    for group, prefixes in GROUPS.items():
        if any(name == p or name.startswith(p) for p in prefixes):
            return group
    raise KeyError(f"parameter {name!r} belongs to no group")


class FedDMMR(nn.Module):
    def __init__(self, num_items: int, max_seq_len: int, hidden: int = 128, blocks: int = 2, heads: int = 4,
                 ffn_hidden: int = 128, dropout: float = 0.2, text_dim: int = 0, visual_dim: int = 0,
                 gating_init: float = 0.1, router_hidden: int = 64):
        super().__init__()
        self.num_items, self.hidden = num_items, hidden
        self.sasrec = SASRec(num_items, max_seq_len, hidden, blocks, heads, ffn_hidden, dropout)
        self.multimodal = bool(text_dim or visual_dim)
        if not self.multimodal:
            return
        if not (text_dim and visual_dim):
            raise ValueError("a multimodal model needs both text_dim and visual_dim (a missing modality is masked)")
        self.text_dim, self.visual_dim = text_dim, visual_dim
        self.visual_proj = nn.Linear(visual_dim, hidden)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.visual_expert = MemoryExpert(hidden)
        self.semantic_expert = MemoryExpert(hidden)
        self.router = Router(hidden, router_hidden)
        self.gating_weight = nn.Parameter(torch.tensor(float(gating_init)))
        self.register_buffer("visual_feat", torch.zeros(num_items + 1, visual_dim), persistent=False)
        self.register_buffer("text_feat", torch.zeros(num_items + 1, text_dim), persistent=False)
        self.register_buffer("avail", torch.zeros(num_items + 1, 2, dtype=torch.bool), persistent=False)  # (vis, sem)
        self.has_visual = False

    # ------------------------------------------------------------------ features
    def set_features(self, visual: torch.Tensor, visual_mask: torch.Tensor, text: torch.Tensor,
                     text_mask: torch.Tensor) -> None:
        """Item feature tables [I+1, D] with masks [I+1]; masked rows never enter the model."""
        for name, t, dim in (("visual", visual, self.visual_dim), ("text", text, self.text_dim)):
            if tuple(t.shape) != (self.num_items + 1, dim):
                raise ValueError(f"{name} features are {tuple(t.shape)}, expected {(self.num_items + 1, dim)}")
        with torch.no_grad():
            self.visual_feat.copy_(visual * visual_mask.unsqueeze(-1))
            self.text_feat.copy_(text * text_mask.unsqueeze(-1))
            self.avail.copy_(torch.stack([visual_mask, text_mask], dim=-1))
            self.avail[0] = False
        self.has_visual = bool(visual_mask[1:].any())

    # ------------------------------------------------------------------ backbone
    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] -> LN(seq) states [B, L, d]."""
        return self.sasrec.encode(seq)

    def _tables(self) -> dict[str, torch.Tensor]:
        """Item-side quantities needed for every item, computed once per call: [I+1, ...]."""
        E = self.sasrec.item_emb.weight                                                     # [I+1, d]
        t = {"route": self.router(E, self.avail)}                                           # [I+1, 2]
        if self.has_visual:                                                                 # visual queries
            t["vis"] = self.visual_proj(self.visual_feat) * self.avail[:, 0:1]              # [I+1, d]
        return t

    def project(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        """Projected features of items [...] -> [..., d]; zero where the item lacks the modality."""
        col = 0 if modality == "vis" else 1
        if modality == "sem":
            x = self.text_proj(F.embedding(items, self.text_feat))                          # [..., d]
        else:
            x = self.visual_proj(F.embedding(items, self.visual_feat))
        return x * F.embedding(items, self.avail.to(x.dtype))[..., col: col + 1]

    def _enhance(self, tables: dict, cands: torch.Tensor | None, mem_ids: torch.Tensor, visible: torch.Tensor):
        """Expert term of candidates [..., C] (None: every real item) given memory slots [..., K].

        Returns aux [..., C] = w_vis <LN(vis_c), E_c> + w_sem <LN(sem_c), E_c> and router weights [..., C, 2].
        """
        if cands is None:                     # all items: the tables themselves, broadcast over the batch
            rows = lambda t: t[1:]            # noqa: E731  [I, ...]
        else:
            rows = lambda t: F.embedding(cands, t)  # noqa: E731  [..., C, ...]
        E_c = rows(self.sasrec.item_emb.weight)                                             # [..., C, d]
        w = rows(tables["route"])                                                           # [..., C, 2]
        slot_avail = F.embedding(mem_ids, self.avail.to(E_c.dtype)) > 0                    # [..., K, 2]
        sem = self.semantic_expert(E_c, self.project("sem", mem_ids), visible & slot_avail[..., 1], E_c)
        aux = w[..., 1] * sem                                                               # [..., C]
        if self.has_visual:
            vis = self.visual_expert(rows(tables["vis"]), self.project("vis", mem_ids),
                                     visible & slot_avail[..., 0], E_c)
            aux = aux + w[..., 0] * vis
        return aux, w

    # ------------------------------------------------------------------ scoring
    def score(self, h: torch.Tensor, cands: torch.Tensor, mem_ids: torch.Tensor | None = None,
              visible: torch.Tensor | None = None, tables: dict | None = None) -> torch.Tensor:
        """h [..., d], candidates [..., C], memory ids / visibility [..., K] -> scores [..., C]."""
        base = score_items(self.sasrec.item_emb.weight, h, cands)                            # <LN(seq), E_c>
        if not self.multimodal:
            return base
        aux, _ = self._enhance(tables or self._tables(), cands, mem_ids, visible)
        return base + self.gating_weight * aux

    def score_all(self, h: torch.Tensor, mem_ids: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                  chunk: int = 256) -> torch.Tensor:
        """h [B, d] -> scores over every real item [B, I] (column j is item j+1)."""
        base = h @ self.sasrec.item_emb.weight[1:].T                                        # [B, I]
        if not self.multimodal:
            return base
        tables = self._tables()
        aux = torch.cat([self._enhance(tables, None, mem_ids[lo: lo + chunk], visible[lo: lo + chunk])[0]
                         for lo in range(0, len(h), chunk)])                                 # [B, I]
        return base + self.gating_weight * aux

    def forward(self, seq: torch.Tensor, cands: torch.Tensor, target_pos: torch.Tensor | None = None,
                mem_ids: torch.Tensor | None = None, mem_pos: torch.Tensor | None = None, align: bool = True):
        """Training scores of one client's batch.

        seq [b, L] windows, cands [b, L, C] (positive first), target_pos [b, L] sequence index of each
        target, mem_ids / mem_pos [K] the client's memory slots and the sequence index of their items.
        A slot is visible to a target only if its item came strictly earlier (no look-ahead).
        ``align=False`` skips the contrastive cosines (scoring only).
        Returns logits [b, L, C] and aux: router weights of the positive [b, L, 2] and the cosine of
        each modality's projected positive feature with every candidate embedding [b, L, C, 2].
        """
        h = self.encode(seq)                                                                  # [b, L, d]
        base = score_items(self.sasrec.item_emb.weight, h, cands)                             # [b, L, C]
        if not self.multimodal:
            return base, {}
        tables = self._tables()
        visible = (mem_ids > 0) & (mem_pos < target_pos.unsqueeze(-1))                       # [b, L, K]
        aux, w = self._enhance(tables, cands, mem_ids, visible)
        if not align:
            return base + self.gating_weight * aux, {"router": w[..., 0, :]}
        E_c = F.normalize(F.embedding(cands, self.sasrec.item_emb.weight), dim=-1)            # [b, L, C, d]
        pos = cands[..., 0]                                                                   # [b, L]
        cosines = [(E_c @ F.normalize(self.project(m, pos), dim=-1).unsqueeze(-1)).squeeze(-1)
                   if m == "sem" or self.has_visual else torch.zeros_like(base) for m in ("vis", "sem")]  # 2 x [b, L, C]
        return base + self.gating_weight * aux, {"router": w[..., 0, :], "align": torch.stack(cosines, -1)}
