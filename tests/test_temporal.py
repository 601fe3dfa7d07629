import pytest
import torch

from spikeinfer.prune.temporal import allocate_timesteps, pca_components


def test_eq10_by_hand():
    # ceil(1.02^(c - 10) * 85): 85, ceil(76.987...) = 77, ceil(69.729...) = 70
    assert allocate_timesteps([10, 5, 0], base=1.02, t_conv=85) == [85, 77, 70]
    # base 2: halving per component below the top
    assert allocate_timesteps([3, 2, 1, 0], base=2.0, t_conv=16) == [16, 8, 4, 2]
    assert allocate_timesteps([4, 4], 1.5, 10) == [10, 10]
    # never below one step, even for hugely different counts
    assert allocate_timesteps([1000, 0], 1.02, 85) == [85, 1]


def test_eq10_validates():
    with pytest.raises(ValueError, match="base must be > 1"):
        allocate_timesteps([1, 2], base=1.0, t_conv=85)
    with pytest.raises(ValueError, match="t_conv"):
        allocate_timesteps([1, 2], base=1.02, t_conv=0)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_pca_counts_components_of_low_rank_traces(rank):
    torch.manual_seed(rank)
    trace = torch.randn(60, rank) @ torch.randn(rank, 40) + 3.0  # offset is removed by centring
    assert pca_components(trace, 0.99999) == rank
    assert pca_components(torch.full((10, 4), 0.25)) == 1


def test_pca_variance_fraction():
    # two components with variances 100 and 1: 0.9 needs one, 0.999 needs both
    t = torch.zeros(200, 2, dtype=torch.float64)
    t[::2, 0], t[1::2, 0] = 10.0, -10.0
    t[:100, 1], t[100:, 1] = 1.0, -1.0
    assert pca_components(t, 0.9) == 1
    assert pca_components(t, 0.999) == 2
