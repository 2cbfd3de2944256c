"""FedDMMR: SASRec backbone with a residual multimodal enhancement read from the client's memory.

For a user state h (the backbone's last position after its final LayerNorm, i.e. LN(seq)) and a
candidate item c, with one expert per modality m (``feddmmr.modalities``):

    out_m,c = Expert_m(query = P_m(f_m,c) or E_c, slots = P_m(f_m,memory))     P_m: D_m -> d
    w_c     = Router(E_c), restricted to the modalities item c has
    fused_c = LN(seq) + g * sum_m w_m,c * LN(out_m,c)                            g: learnable gating_weight
    score_c = <fused_c, E_c>                                                    E: the shared item embeddings

With the two modalities of the paper, visual (query: the candidate's projected poster) and text
(query: its item embedding), fused = LN(seq) + g * (w_vis LN(vis) + w_sem LN(sem)).
One scoring function serves training (sampled candidates) and evaluation (sampled or every item).
The experts read the user's memory, so the enhancement is personal: with an empty memory it is zero.
With no feature dims (Stage 1) the model is the plain backbone: score_c = <h, E_c>.

Feature tables are non-persistent buffers (data, not weights): checkpoints hold only parameters, and the
features are loaded from the feature files, with their hashes checked, when a model is rebuilt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from feddmmr.modalities import QUERY
from feddmmr.model.experts import MemoryExpert
from feddmmr.model.router import Router
from feddmmr.model.rows import take_rows
from feddmmr.model.sasrec import SASRec, score_items

# Every parameter belongs to exactly one group; stages load, train and freeze whole groups.
GROUPS: dict[str, tuple[str, ...]] = {
    "item_embeddings": ("sasrec.item_emb.",),
    "backbone": ("sasrec.",),
    "projections": ("projections.",),
    "gate": ("gating_weight",),
    "experts": ("experts.",),
    "router": ("router.",),
}


def group_of(name: str) -> str:
    """The group of a parameter name (first matching prefix, in GROUPS order)."""
    for group, prefixes in GROUPS.items():
        if any(name == p or name.startswith(p) for p in prefixes):
            return group
    raise KeyError(f"parameter {name!r} belongs to no group")


@dataclass
class FedDMMRConfig:
    """The model's shape; saved in a checkpoint's config.json and rebuilt with ``FedDMMR(FedDMMRConfig(**d))``.

    It has no defaults of its own: they live in the params sections (``config.ModelParams``,
    ``config.MultimodalParams``) and reach it through ``from_params``.
    """
    num_items: int
    max_seq_len: int
    hidden: int
    blocks: int
    heads: int
    ffn_hidden: int
    dropout: float
    gating_init: float
    router_hidden: int
    feature_dims: dict[str, int] = field(default_factory=dict)   # modality -> feature size; {} = Stage 1

    @classmethod
    def from_params(cls, params, num_items: int, max_seq_len: int,
                    feature_dims: dict[str, int] | None = None) -> FedDMMRConfig:
        mp, mm = params.model, params.multimodal
        return cls(num_items, max_seq_len, mp.hidden, mp.blocks, mp.heads, mp.ffn_hidden, mp.dropout,
                   mm.gating_init, mm.router_hidden, dict(feature_dims or {}))


class FedDMMR(nn.Module):
    def __init__(self, config: FedDMMRConfig):
        super().__init__()
        c = self.config = config
        self.num_items, self.hidden = c.num_items, c.hidden
        self.sasrec = SASRec(c.num_items, c.max_seq_len, c.hidden, c.blocks, c.heads, c.ffn_hidden, c.dropout)
        unknown = sorted(set(c.feature_dims) - set(QUERY))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; the registry (feddmmr.modalities) has {', '.join(QUERY)}")
        self.modalities = list(c.feature_dims)   # those it was built with, in their order (a checkpoint's own)
        self.multimodal = bool(self.modalities)
        if not self.multimodal:
            return
        self.projections = nn.ModuleDict({m: nn.Linear(c.feature_dims[m], c.hidden) for m in self.modalities})
        self.experts = nn.ModuleDict({m: MemoryExpert(c.hidden) for m in self.modalities})
        self.router = Router(c.hidden, c.router_hidden, len(self.modalities))
        self.gating_weight = nn.Parameter(torch.tensor(float(c.gating_init)))
        for m in self.modalities:
            self.register_buffer(f"features_{m}", torch.zeros(c.num_items + 1, c.feature_dims[m]), persistent=False)
        self.register_buffer("avail", torch.zeros(c.num_items + 1, len(self.modalities), dtype=torch.bool),
                             persistent=False)                                              # [I+1, M]
        self.covered = {m: False for m in self.modalities}

    # ------------------------------------------------------------------ features
    def set_features(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Item feature tables [I+1, D_m] with masks [I+1], per modality; masked rows never enter the model."""
        if set(features) != set(self.modalities):
            raise ValueError(f"features for {sorted(features)}, the model has {self.modalities}")
        with torch.no_grad():
            for i, m in enumerate(self.modalities):
                table, mask = features[m]
                expected = (self.num_items + 1, self.config.feature_dims[m])
                if tuple(table.shape) != expected:
                    raise ValueError(f"{m} features are {tuple(table.shape)}, expected {expected}")
                getattr(self, f"features_{m}").copy_(table * mask.unsqueeze(-1))
                self.avail[:, i] = mask
                self.covered[m] = bool(mask[1:].any())
            self.avail[0] = False

    def item_buffers(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The item-indexed buffers restricted to ``rows`` [R] (global ids, 0 first): with the item table's
        same rows they form a local catalogue in which item ``rows[j]`` is item j (``functional_call``)."""
        if not self.multimodal:
            return {}
        out = {f"features_{m}": take_rows(getattr(self, f"features_{m}"), rows) for m in self.modalities}
        out["avail"] = take_rows(self.avail, rows)
        return out

    # ------------------------------------------------------------------ backbone
    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] -> LN(seq) states [B, L, d]."""
        return self.sasrec.encode(seq)

    def tables(self) -> dict[str, torch.Tensor]:
        """Item-side quantities needed for every item, computed once per call: [I+1, ...]."""
        E = self.sasrec.item_emb.weight                                                     # [I+1, d]
        t = {"route": self.router(E, self.avail)}                                           # [I+1, M]
        for m in self.modalities:
            if QUERY[m] == "feature" and self.covered[m]:                                   # feature queries
                t[m] = self.project(m)                                                      # [I+1, d]
        return t

    def project(self, modality: str, items: torch.Tensor | None = None) -> torch.Tensor:
        """Projected features of items [...] -> [..., d] (None: every row, [I+1, d]); zero where an item lacks it."""
        i = self.modalities.index(modality)
        table = getattr(self, f"features_{modality}")
        if items is None:
            rows, have = table, self.avail
        else:
            rows, have = F.embedding(items, table), F.embedding(items, self.avail.to(table.dtype))
        return self.projections[modality](rows) * have[..., i: i + 1].to(rows.dtype)

    def _enhance(self, tables: dict, cands: torch.Tensor | None, mem_ids: torch.Tensor, visible: torch.Tensor):
        """Expert term of candidates [..., C] (None: every real item) given memory slots [..., K].

        Returns aux [..., C] = sum_m w_m <LN(out_m), E_c> and the router weights [..., C, M].
        """
        if cands is None:                     # all items: the tables themselves, broadcast over the batch
            rows = lambda t: t[1:]            # noqa: E731  [I, ...]
        else:
            rows = lambda t: F.embedding(cands, t)  # noqa: E731  [..., C, ...]
        E_c = rows(self.sasrec.item_emb.weight)                                             # [..., C, d]
        w = rows(tables["route"])                                                           # [..., C, M]
        slot_avail = F.embedding(mem_ids, self.avail.to(E_c.dtype)) > 0                    # [..., K, M]
        aux = E_c.new_zeros(torch.broadcast_shapes(mem_ids.shape[:-1] + (1,), w.shape[:-1]))  # [..., C]
        for i, m in enumerate(self.modalities):
            if not self.covered[m]:           # no item has it: its router weight is 0 everywhere
                continue
            query = E_c if QUERY[m] == "item" else rows(tables[m])
            out = self.experts[m](query, self.project(m, mem_ids), visible & slot_avail[..., i], E_c)
            aux = aux + w[..., i] * out
        return aux, w

    # ------------------------------------------------------------------ scoring
    def score(self, h: torch.Tensor, cands: torch.Tensor, mem_ids: torch.Tensor | None = None,
              visible: torch.Tensor | None = None, tables: dict | None = None) -> torch.Tensor:
        """h [..., d], candidates [..., C], memory ids / visibility [..., K] -> scores [..., C]."""
        base = score_items(self.sasrec.item_emb.weight, h, cands)                            # <LN(seq), E_c>
        if not self.multimodal:
            return base
        aux, _ = self._enhance(tables or self.tables(), cands, mem_ids, visible)
        return base + self.gating_weight * aux

    def score_all(self, h: torch.Tensor, mem_ids: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                  chunk: int = 256) -> torch.Tensor:
        """h [B, d] -> scores over every real item [B, I] (column j is item j+1)."""
        base = h @ self.sasrec.item_emb.weight[1:].T                                        # [B, I]
        if not self.multimodal:
            return base
        tables = self.tables()
        aux = torch.cat([self._enhance(tables, None, mem_ids[lo: lo + chunk], visible[lo: lo + chunk])[0]
                         for lo in range(0, len(h), chunk)])                                 # [B, I]
        return base + self.gating_weight * aux

    def forward(self, seq: torch.Tensor, cands: torch.Tensor, target_pos: torch.Tensor | None = None,
                mem_ids: torch.Tensor | None = None, mem_pos: torch.Tensor | None = None, align: bool = True):
        """Training scores of one client's batch.

        seq [b, L] windows, cands [b, L, C] (positive first; None: every real item, backbone only), target_pos [b, L] sequence index of each
        target, mem_ids / mem_pos [K] the client's memory slots and the sequence index of their items.
        A slot is visible to a target only if its item came strictly earlier (no look-ahead).
        ``align=False`` skips the contrastive cosines (scoring only).
        Returns logits [b, L, C] and aux: router weights of the positive [b, L, M], which modalities the
        positive has [b, L, M] and the cosine of each modality's projected positive feature with every
        candidate embedding [b, L, C, M].
        """
        h = self.encode(seq)                                                                  # [b, L, d]
        if cands is None:                                     # every real item (full softmax): backbone only
            if self.multimodal:
                raise ValueError("scoring every item in training is the backbone's alone (loss: full at stage 1)")
            return h @ self.sasrec.item_emb.weight[1:].T, {}                                 # [b, L, I]
        base = score_items(self.sasrec.item_emb.weight, h, cands)                             # [b, L, C]
        if not self.multimodal:
            return base, {}
        tables = self.tables()
        visible = (mem_ids > 0) & (mem_pos < target_pos.unsqueeze(-1))                       # [b, L, K]
        aux, w = self._enhance(tables, cands, mem_ids, visible)
        extra = {"router": w[..., 0, :], "avail": F.embedding(cands[..., 0], self.avail.to(base.dtype))}
        if not align:
            return base + self.gating_weight * aux, extra
        E_c = F.normalize(F.embedding(cands, self.sasrec.item_emb.weight), dim=-1)            # [b, L, C, d]
        pos = cands[..., 0]                                                                   # [b, L]
        cosines = [(E_c @ F.normalize(self.project(m, pos), dim=-1).unsqueeze(-1)).squeeze(-1)
                   if self.covered[m] else torch.zeros_like(base) for m in self.modalities]  # M x [b, L, C]
        return base + self.gating_weight * aux, {**extra, "align": torch.stack(cosines, -1)}

    @torch.no_grad()
    def router_stats(self) -> dict[str, float]:
        """Mean router weight of each modality over the items that have any, and over those that have all;
        and the residual gate."""
        if not self.multimodal:
            return {}
        w = self.tables()["route"]                        # [I+1, M]
        has, every = self.avail.any(-1), self.avail.all(-1)
        out = {"gating_weight": float(self.gating_weight)}
        out.update({f"router.w_{m}": float(w[has, i].mean()) for i, m in enumerate(self.modalities)})
        if every.any() and len(self.modalities) > 1:
            out.update({f"router.w_{m}_all": float(w[every, i].mean()) for i, m in enumerate(self.modalities)})
        return out
