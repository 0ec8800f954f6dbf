"""Routing metadata for the grouped expert kernels, built on the device without a host sync.

Legend: T tokens, K top-k, P = T*K routed rows (one per token-expert pair), E experts,
G groups (= E, experts in group order), S selected (trainable) experts, J tiles of block_m rows.

Rows are grouped by expert so each tile of block_m rows multiplies one expert's weights. Groups are
ordered with the trainable experts first (group s = compact slot s), then the frozen experts by id:
the trainable rows are then the prefix [0, offsets[S]) and the tiles that touch them are a prefix
of the tile list, so the weight-gradient-only passes simply stop early.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    num_tokens: int                 # T
    top_k: int                      # K
    num_experts: int                # E
    num_trainable: int              # S
    block_m: int
    slot_E: torch.Tensor            # int32, compact slot of each expert, -1 when frozen
    expert_G: torch.Tensor          # int32, expert id of each group (trainable slots first)
    counts_G: torch.Tensor          # int32, rows per group (the per-expert histogram, group order)
    offsets_G1: torch.Tensor        # int32, [G+1] row offsets of each group in the sorted order
    perm_P: torch.Tensor            # int32, flat index t*K+k of each sorted row
    tile_group_J: torch.Tensor      # int32, group of each tile; >= G past the last real tile
    tile_row_J: torch.Tensor        # int32, first sorted row of each tile

    @property
    def num_rows(self) -> int:
        return self.num_tokens * self.top_k

    @property
    def max_tiles(self) -> int:
        return self.tile_group_J.numel()


def build_routing(
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    trainable_ids_S: torch.Tensor | None,
    block_m: int,
) -> Routing:
    """Histogram, offsets, permutation and tile map for one routed batch.

    Everything stays on topk_idx's device and no value is read back to the host, so a training
    step on GPU does not stall here; the tile count is the upper bound cdiv(P, block_m) + min(E, P)
    (every non-empty group adds at most one partial tile) and surplus tiles exit at once.
    """
    dev = topk_idx_TK.device
    T, K = topk_idx_TK.shape
    E, P = num_experts, T * K
    ids_S = (torch.empty(0, dtype=torch.long, device=dev) if trainable_ids_S is None
             else trainable_ids_S.to(device=dev, dtype=torch.long).flatten())
    S = ids_S.numel()

    slot_E = torch.full((E,), -1, dtype=torch.long, device=dev)
    slot_E[ids_S] = torch.arange(S, device=dev)
    frozen_E = slot_E < 0
    group_E = torch.where(frozen_E, S + torch.cumsum(frozen_E, 0) - 1, slot_E)
    expert_G = torch.empty_like(group_E)
    expert_G[group_E] = torch.arange(E, device=dev)

    group_P = group_E[topk_idx_TK.reshape(-1).long()]
    # Stable so rows inside a group stay in token order: deterministic and gather-friendly.
    _, perm_P = torch.sort(group_P, stable=True)
    counts_G = torch.bincount(group_P, minlength=E)
    offsets_G1 = torch.zeros(E + 1, dtype=torch.long, device=dev)
    offsets_G1[1:] = torch.cumsum(counts_G, 0)

    tiles_G = (counts_G + block_m - 1) // block_m
    tile_end_G = torch.cumsum(tiles_G, 0)
    J = (P + block_m - 1) // block_m + min(E, P)
    j_J = torch.arange(J, device=dev)
    tile_group_J = torch.searchsorted(tile_end_G, j_J, right=True)
    g_J = tile_group_J.clamp(max=E - 1)
    tile_row_J = offsets_G1[g_J] + (j_J - (tile_end_G[g_J] - tiles_G[g_J])) * block_m

    i32 = torch.int32
    return Routing(
        num_tokens=T, top_k=K, num_experts=E, num_trainable=S, block_m=block_m,
        slot_E=slot_E.to(i32), expert_G=expert_G.to(i32), counts_G=counts_G.to(i32),
        offsets_G1=offsets_G1.to(i32), perm_P=perm_P.to(i32),
        tile_group_J=tile_group_J.to(i32), tile_row_J=tile_row_J.to(i32),
    )
