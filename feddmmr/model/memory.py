"""Two-tier local dynamic memory, one per client, stored as fixed-size tensors for all clients.

Each client keeps item ids only (features come from the shared feature tables):
- short-term (ST): FIFO of the last ``st_capacity`` items the client observed;
- long-term (LT): up to ``lt_capacity`` items whose surprise reached ``surprise_threshold``.
  An item already in LT is refreshed (frequency + 1, timestamp = now). A new item whose combined
  feature (the L2-normalised concatenation of its modality features) has cosine >= ``merge_threshold`` with an LT slot is merged
  into that slot (frequency + 1, timestamp = now) instead of taking a slot. When LT is full, the slot
  with the lowest utility ln(1 + freq) + 2^(-age / half_life) is evicted (age in observed items).

After a client's local training, ``observe`` replays its training targets in time order with the
surprise each one had (1 - p(positive) over its candidates). Retrieval returns, for a batch of
clients, the ST slots plus the ``retrieve_lt`` LT slots of highest utility, with each slot's item id
and the sequence index of the item (training masks slots that do not precede the target). The state
persists across rounds and stages and is saved with the checkpoint.
"""
from __future__ import annotations

import numpy as np
import torch

from feddmmr.config import MemoryParams

STATE_KEYS = ("st_ids", "st_pos", "lt_ids", "lt_pos", "lt_freq", "lt_time", "clock", "participations")
POINTER_KEYS = ("remote_run", "remote_round", "remote_seen")   # a checkpoint whose memories stay on the clients


def pointer_state(run: str, rnd: int, seen: bool) -> dict[str, torch.Tensor]:
    """What a stage trained on a federation saves for its memories: which snapshot the clients keep (the
    run's round ``rnd``), and whether any client has a memory."""
    return {"remote_run": torch.tensor(list(run.encode()), dtype=torch.uint8),
            "remote_round": torch.tensor([rnd], dtype=torch.int64), "remote_seen": torch.tensor([int(seen)])}


def read_pointer(state: dict[str, torch.Tensor]) -> tuple[str, int, bool] | None:
    """(run, round, seen) of a pointer state; None for the state of a ``MemoryBank``."""
    if "remote_run" not in state:
        return None
    return bytes(state["remote_run"].tolist()).decode(), int(state["remote_round"][0]), bool(state["remote_seen"][0])


class MemoryBank:
    def __init__(self, num_users: int, params: MemoryParams, comb: torch.Tensor | None = None):
        """``params``: the ``memory`` params section; ``comb``: combined item features (``combined_features``)
        for merging near-duplicates (None: no merging)."""
        if params.retrieve_lt > params.lt_capacity:
            raise ValueError("memory.retrieve_lt must be <= memory.lt_capacity")
        self.S, self.C, self.R = params.st_capacity, params.lt_capacity, params.retrieve_lt
        self.threshold, self.merge_threshold = params.surprise_threshold, params.merge_threshold
        self.half_life = params.half_life
        self.comb = None if comb is None else comb.numpy().astype(np.float32)   # [I+1, D] unit rows or zeros
        self.has_comb = None if comb is None else self.comb.any(1)
        self.st_ids = np.zeros((num_users, self.S), dtype=np.int64)   # 0 = empty; oldest first
        self.st_pos = np.full((num_users, self.S), -1, dtype=np.int64)
        self.lt_ids = np.zeros((num_users, self.C), dtype=np.int64)
        self.lt_pos = np.full((num_users, self.C), -1, dtype=np.int64)
        self.lt_freq = np.zeros((num_users, self.C), dtype=np.int64)
        self.lt_time = np.zeros((num_users, self.C), dtype=np.int64)
        self.clock = np.zeros(num_users, dtype=np.int64)            # items observed so far, per client
        self.participations = np.zeros(num_users, dtype=np.int64)

    @property
    def slots(self) -> int:
        return self.S + self.R

    # ------------------------------------------------------------------ update
    def _utility(self, freq: np.ndarray, age: np.ndarray) -> np.ndarray:
        return np.log1p(freq) + np.exp2(-age.astype(np.float64) / self.half_life)

    def utility(self, u: int | np.ndarray) -> np.ndarray:
        """Utility of client(s) u's LT slots now; -inf for empty slots."""
        age = self.clock[u][..., None] - self.lt_time[u]
        return np.where(self.lt_ids[u] > 0, self._utility(self.lt_freq[u], age), -np.inf)

    def observe(self, u: int, items: np.ndarray, pos: np.ndarray, surprise: np.ndarray) -> int:
        """Replay client u's items (any order; sorted by ``pos``) with their surprise. Returns LT writes."""
        order = np.argsort(pos, kind="stable")
        items, pos, surprise = items[order], pos[order], surprise[order]
        self.participations[u] += 1
        ids, lpos, freq, tim = self.lt_ids[u], self.lt_pos[u], self.lt_freq[u], self.lt_time[u]  # views
        slot_of = {int(i): j for j, i in enumerate(ids) if i}
        empty = [j for j in range(self.C - 1, -1, -1) if not ids[j]]          # popped lowest index first
        combs = None
        if self.comb is not None:                                            # slot features, -inf rows when empty
            combs = self.comb[ids]
        writes = 0
        for k in np.flatnonzero(surprise >= self.threshold):
            now = int(self.clock[u]) + int(k) + 1
            item = int(items[k])
            j = slot_of.get(item)
            if j is None and combs is not None and slot_of and self.has_comb[item]:
                sims = combs @ self.comb[item]
                sims[ids == 0] = -np.inf
                best = int(np.argmax(sims))
                if sims[best] >= self.merge_threshold:
                    j = best
            if j is not None:                             # refresh, or merge into the near-duplicate's slot
                freq[j] += 1
                tim[j] = now
                continue
            if empty:
                j = empty.pop()
            else:                                         # evict the lowest-utility slot
                j = int(np.argmin(self._utility(freq, now - tim)))
                del slot_of[int(ids[j])]
            ids[j], lpos[j], freq[j], tim[j] = item, pos[k], 1, now
            slot_of[item] = j
            if combs is not None:
                combs[j] = self.comb[item]
            writes += 1
        self.clock[u] += len(items)
        # ST: FIFO of the observed stream -> its last S distinct items, oldest first
        _, last = np.unique(items[::-1], return_index=True)
        keep = np.sort(len(items) - 1 - last)[-self.S:]
        n = len(keep)
        self.st_ids[u] = 0
        self.st_pos[u] = -1
        self.st_ids[u, self.S - n:], self.st_pos[u, self.S - n:] = items[keep], pos[keep]
        return writes

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, users: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots of a batch of clients: item ids [n, S + R] (0 = empty) and their sequence index [n, S + R].

        The ST slots, then the R LT slots of highest utility among the LT items not already in ST.
        """
        users = np.asarray(users, dtype=np.int64)
        st_ids, lt_all = self.st_ids[users], self.lt_ids[users]
        in_st = (lt_all[:, :, None] == st_ids[:, None, :]).any(-1)                 # [n, C] already in ST
        util = self.utility(users)
        util[in_st | (lt_all == 0)] = -np.inf                                       # ranked last, then blanked
        top = torch.topk(torch.from_numpy(util), self.R, dim=-1).indices.numpy()    # [n, R] highest utility
        keep = np.isfinite(np.take_along_axis(util, top, 1))
        lt_ids = np.where(keep, np.take_along_axis(lt_all, top, 1), 0)
        lt_pos = np.where(keep, np.take_along_axis(self.lt_pos[users], top, 1), -1)
        ids = np.concatenate([st_ids, lt_ids], 1)
        pos = np.concatenate([self.st_pos[users], lt_pos], 1)
        return torch.from_numpy(ids), torch.from_numpy(pos)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(getattr(self, k).copy()) for k in STATE_KEYS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if read_pointer(state) is not None:
            raise ValueError("the client memories of this checkpoint stay on the SuperNodes of the Flower federation "
                             "that trained it (federation.engine=flower); only that federation can continue them")
        for k in STATE_KEYS:
            cur = getattr(self, k)
            if k not in state or tuple(state[k].shape[:1]) != cur.shape[:1]:
                raise ValueError(f"memory state {k} is missing or has {tuple(state.get(k, torch.empty(0)).shape)} "
                                 f"rows, expected {cur.shape[0]}")
        if state["st_ids"].shape[1] != self.S or state["lt_ids"].shape[1] != self.C:
            raise ValueError(f"memory capacities differ: saved ST {state['st_ids'].shape[1]} / LT "
                             f"{state['lt_ids'].shape[1]}, configured {self.S} / {self.C}")
        for k in STATE_KEYS:
            setattr(self, k, state[k].numpy().astype(np.int64).copy())

    def summary(self) -> dict[str, float]:
        filled = self.lt_ids > 0
        seen = self.participations > 0
        return {"clients_with_memory": int(seen.sum()),
                "lt_fill": float(filled[seen].mean()) if seen.any() else 0.0,
                "lt_mean_freq": float(self.lt_freq[filled].mean()) if filled.any() else 0.0}


def combined_features(features: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """L2-normalised concatenation of every modality's (table, mask), each part unit-norm where the item has it,
    zero for an item with no modality: [I+1, sum D_m]."""
    parts = [torch.nn.functional.normalize(t, dim=-1) * m.unsqueeze(-1) for t, m in features.values()]
    return torch.nn.functional.normalize(torch.cat(parts, -1), dim=-1)
