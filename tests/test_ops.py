"""The custom ops against the loop reference, per sample, with protection and padding."""

import pytest
import torch
from tome_reference import tome_merge

import tokencompile  # noqa: F401

tc = torch.ops.tokencompile


@pytest.mark.parametrize("order", ["keep", "official"])
def test_tome_plan_and_merge_match_reference_per_sample(order):
    g = torch.Generator().manual_seed(0)
    batch, n, c, r = 4, 21, 8, 6
    x, metric = torch.randn(batch, n, c, generator=g), torch.randn(batch, n, c, generator=g)
    size = torch.rand(batch, n, generator=g) + 0.5
    valid = torch.ones(batch, n, dtype=torch.bool)
    valid[1, 15:] = False
    valid[3, 9:] = False
    rep, src, dst = tc.tome_plan(metric, valid, r, 1, True, order == "official")
    merged = tc.merge_tokens(x, size, rep, src, dst)
    sizes = tc.sum_tokens(size, rep, src, dst)
    kept_valid = tc.gather_tokens(valid, rep, 1)
    for b in range(batch):
        last = int(valid[b].sum()) - 1
        want_x, want_size, want_valid = tome_merge(x[b], metric[b], size[b].tolist(), r, {0, last},
                                                   valid[b].tolist(), order)
        assert torch.allclose(merged[b], want_x, atol=1e-6)
        assert torch.allclose(sizes[b], torch.tensor(want_size), atol=1e-6)
        assert kept_valid[b].tolist() == want_valid


def test_plan_keeps_order_and_protected_tokens():
    metric = torch.randn(2, 11, 4)
    rep, src, dst = tc.tome_plan(metric, None, 4, 2, False)
    assert rep.shape == (2, 7) and src.shape == dst.shape == (2, 4)
    assert (rep[:, :2] == torch.tensor([0, 1])).all()          # protected prefix kept, in place
    assert (rep[:, 1:] > rep[:, :-1]).all()                    # original order
    assert (src % 2 == 0).all() and (src >= 2).all()           # only unprotected A (even) tokens merge
    # each removed token folds into the slot of an odd (B) token
    assert (torch.gather(rep, 1, dst) % 2 == 1).all()


def test_r_zero_is_identity():
    x = torch.randn(3, 9, 5)
    rep, src, dst = tc.tome_plan(torch.randn(3, 9, 4), None, 0, 1, False)
    assert (rep == torch.arange(9)).all() and src.shape == (3, 0)
    assert torch.equal(tc.merge_tokens(x, torch.ones(3, 9), rep, src, dst), x)


def test_gather_broadcasts_batch_one_over_plan_batch():
    table = torch.arange(10.0).reshape(1, 10, 1).expand(1, 10, 3)
    rep = torch.tensor([[0, 2, 4], [1, 3, 5]])
    out = tc.gather_tokens(table, rep, 1)
    assert out.shape == (2, 3, 3) and out[1, :, 0].tolist() == [1.0, 3.0, 5.0]


def _greedy_max_min(metric, k, start):
    """Farthest-point selection written out: the first pick is the token farthest from ``start``."""
    unit = [m / m.norm() for m in metric]
    distance = lambda i, j: 1 - float(unit[i] @ unit[j])
    mean = sum(unit) / len(unit)
    chosen = list(start)
    picks = []
    for _ in range(k):
        rest = [i for i in range(len(unit)) if i not in chosen]
        if chosen:
            pick = max(rest, key=lambda i: (min(distance(i, j) for j in chosen), -i))
        else:
            pick = max(rest, key=lambda i: (1 - float(unit[i] @ mean) / float(mean.norm()), -i))
        picks.append(pick)
        chosen.append(pick)
    return picks


def test_farthest_point_rank_matches_greedy_max_min():
    metric = torch.randn(3, 12, 6, generator=torch.Generator().manual_seed(4))
    for prefix in (0, 1):
        ranks = tc.farthest_point_rank(metric, None, 5, prefix, False)
        for b in range(3):
            picks = _greedy_max_min(metric[b], 5, range(prefix))
            assert [int(ranks[b, i]) for i in picks] == [5, 4, 3, 2, 1]
            assert sorted(i for i in range(12) if ranks[b, i] > 0) == sorted(picks)


def test_route_plan_and_max_tokens():
    removed, target = torch.tensor([[1, 4, 6]]), torch.tensor([[0, 5, -1]])
    rep, src, dst = tc.route_plan(removed, target, 8)
    assert rep.tolist() == [[0, 2, 3, 5, 7]] and src.tolist() == [[1, 4, 6]] and dst.tolist() == [[0, 3, 5]]
    values = torch.tensor([[1.0, 9.0, 2.0, 3.0, 7.0, 4.0, 8.0, 0.5]])
    assert tc.max_tokens(values, rep, src, dst).tolist() == [[9.0, 2.0, 3.0, 7.0, 0.5]]
