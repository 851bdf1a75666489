import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepgrpo.advantages import group_advantages
from deepgrpo.config import AdvantageConfig

rewards_and_groups = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.25]), min_size=n, max_size=n),
    st.lists(st.integers(0, 5), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(rewards_and_groups, st.booleans(), st.booleans())
def test_advantages_sum_to_zero_per_group_and_never_nan(rg, scale_std, loo):
    r, g = torch.tensor(rg[0], dtype=torch.float64), torch.tensor(rg[1])
    a = group_advantages(r, g, AdvantageConfig(scale_std=scale_std, leave_one_out=loo))
    assert torch.isfinite(a).all()
    for gid in g.unique():
        sel = g == gid
        assert abs(float(a[sel].sum())) < 1e-9
        if r[sel].unique().numel() == 1:  # all-equal group (incl. singletons): exactly zero
            assert (a[sel] == 0).all()


def test_hand_computed_values():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    a = group_advantages(r, g)
    np.testing.assert_allclose(a.numpy(), [0.75, -0.25, -0.25, -0.25, 0, 0, 0], atol=1e-7)
    loo = group_advantages(r, g, AdvantageConfig(leave_one_out=True))
    # baseline = mean of the others: 1 - 0 = 1; 0 - 1/3
    np.testing.assert_allclose(loo.numpy(), [1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0], atol=1e-6)
    s = group_advantages(r, g, AdvantageConfig(scale_std=True, std_eps=1e-12))
    # sample std (n - 1, as verl and TRL): sum of squares 0.75 / 3 = 0.25 -> std 0.5
    np.testing.assert_allclose(s.numpy(), [1.5, -0.5, -0.5, -0.5, 0, 0, 0], rtol=1e-6)
    # a group of one has no sample std: advantage exactly 0, never NaN
    one = group_advantages(torch.tensor([1.0]), torch.tensor([0]), AdvantageConfig(scale_std=True))
    assert one.tolist() == [0.0]


def test_group_ids_need_not_be_contiguous():
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    a = group_advantages(r, torch.tensor([7, 7, 100, 100]))
    np.testing.assert_allclose(a.numpy(), [0.5, -0.5, 1.0, -1.0])


def test_tree_advantages_hand_computed():
    """One prompt: main chain A (reward 0) cut at one branch point into segments A1, A2, with two
    continuations c1 (reward 1) and c2 (reward 0) below A1; main chain B (reward 1) not cut.

    V(root) = 2/4, V(A1) = mean(A2, c1, c2) = 1/3, V(A2) = 0, V(c1) = 1, V(c2) = 0, V(B) = 1.
    R = (V - V(root)) + (V - V(parent)):  R(A1) = -1/6 - 1/6 = -1/3, R(A2) = -1/2 - 1/3 = -5/6,
    R(c1) = 1/2 + 2/3 = 7/6, R(c2) = -5/6, R(B) = 1/2 + 1/2 = 1.
    """
    from deepgrpo.advantages import tree_advantages
    r = torch.tensor([0.0, 1.0, 0.0, 1.0])  # rows: A, c1, c2, B
    path = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 5, -1]])  # root 0, A1 = 1, A2 = 2, c1, c2, B
    # unweighted: the mean over the leaf's nodes below the root
    np.testing.assert_allclose(tree_advantages(r, path).numpy(),
                               [(-1 / 3 - 5 / 6) / 2, (-1 / 3 + 7 / 6) / 2, (-1 / 3 - 5 / 6) / 2, 1.0], atol=1e-7)
    # weighted by trained tokens: A trains A1 (3 tokens) and A2 (2); a continuation only its own leaf
    w = torch.tensor([[0, 3, 2], [0, 0, 4], [0, 0, 4], [0, 7, 0]], dtype=torch.float32)
    np.testing.assert_allclose(tree_advantages(r, path, w).numpy(), [(3 * -1 / 3 + 2 * -5 / 6) / 5, 7 / 6, -5 / 6, 1.0],
                               atol=1e-6)
    # GRPO's flat group is a tree of depth 1: R = 2 (r - mean), twice the group advantage
    flat = torch.tensor([[9, 10], [9, 11], [9, 12], [9, 13]])
    np.testing.assert_allclose(tree_advantages(r, flat).numpy(), 2 * (r - 0.5).numpy())
    # a tree whose leaves agree carries no signal; two trees are independent
    two = torch.tensor([[0, 1], [0, 2], [7, 8], [7, 9]])
    np.testing.assert_allclose(tree_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0]), two).numpy(), [0, 0, 1, -1])
    with pytest.raises(ValueError, match="two different parents"):
        tree_advantages(r, torch.tensor([[0, 1, 2], [0, 3, 2], [0, 4, -1], [0, 5, -1]]))
