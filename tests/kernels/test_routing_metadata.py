"""Routing metadata vs a per-row Python oracle. Legend: T tokens, K top-k, E experts, P = T*K rows, J tiles."""
import pytest
import torch

from expertmesh.kernels.routing import build_routing


def _oracle(idx_TK, E, ids):
    """Rows grouped trainable slots first (slot order), then frozen experts by id, token order inside."""
    order = list(ids) + [e for e in range(E) if e not in ids]
    flat = idx_TK.flatten().tolist()
    perm = [p for e in order for p in range(len(flat)) if flat[p] == e]
    counts = [flat.count(e) for e in order]
    return order, perm, counts


@pytest.mark.parametrize("T,K,E,ids,block_m", [
    (7, 2, 5, [3, 1], 4),       # partial tiles, trainable ids out of order
    (1, 1, 4, [], 16),          # one row, nothing trainable
    (9, 3, 3, [0, 1, 2], 2),    # all trainable
    (12, 1, 6, [5], 4),         # experts with zero rows
])
def test_routing_matches_oracle(T, K, E, ids, block_m):
    g = torch.Generator().manual_seed(T * 100 + E)
    idx_TK = torch.randint(0, E, (T, K), generator=g)
    if T == 12:
        idx_TK[:] = 2  # every token on one frozen expert
    rt = build_routing(idx_TK, E, torch.tensor(ids, dtype=torch.long) if ids else None, block_m)
    order, perm, counts = _oracle(idx_TK, E, ids)

    assert rt.num_trainable == len(ids)
    assert rt.expert_G.tolist() == order
    assert rt.perm_P.tolist() == perm
    assert rt.counts_G.tolist() == counts
    assert rt.offsets_G1.tolist() == [sum(counts[:i]) for i in range(E + 1)]
    assert [rt.slot_E[e].item() for e in ids] == list(range(len(ids)))
    assert all(rt.slot_E[e] == -1 for e in range(E) if e not in ids)

    # Every row is covered by exactly one real tile of its own group, and tiles come in group order.
    covered = []
    last_group = -1
    for j in range(rt.max_tiles):
        grp, row0 = int(rt.tile_group_J[j]), int(rt.tile_row_J[j])
        if grp >= E:
            continue
        assert grp >= last_group
        last_group = grp
        end = min(row0 + block_m, int(rt.offsets_G1[grp + 1]))
        assert int(rt.offsets_G1[grp]) <= row0 < end
        covered += range(row0, end)
    assert sorted(covered) == list(range(T * K))
