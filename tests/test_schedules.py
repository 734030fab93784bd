"""Learning-rate and progressive-sampling schedules, and the target subsampling they drive."""
import math

import pytest
import torch

from protodepth.config import ConfigError, load_config
from protodepth.loss import subsample_targets
from protodepth.schedules import Ramp, lr_factor


def test_constant_lr_with_warmup():
    assert [lr_factor(s, "constant", 4, 100, 0.0) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_lr_decays_from_one_to_min_ratio():
    f = [lr_factor(s, "cosine", 10, 110, 0.1) for s in range(0, 111)]
    assert f[9] == 1.0 and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


@pytest.mark.parametrize("shape", ["linear", "step", "cosine"])
def test_ramps_go_from_start_to_end_monotonically(shape):
    r = Ramp(50, 200, steps=100, shape=shape)
    values = [r(s) for s in range(0, 130)]
    assert values[0] == 50 and values[100] == 200 and values[-1] == 200
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert all(isinstance(v, int) for v in values)


def test_step_ramp_has_equal_plateaus():
    r = Ramp(10, 40, steps=100, shape="step", num_levels=4)
    assert {r(s) for s in range(0, 25)} == {10}
    assert {r(s) for s in range(25, 50)} == {20}
    assert {r(s) for s in range(75, 100)} == {40}


def test_linear_ramp_midpoint_and_constant_shape():
    assert Ramp(0 + 1, 101, steps=100, shape="linear")(50) == 51
    assert Ramp(5, 80, steps=100, shape="constant")(0) == 80


def test_bad_progressive_config_names_the_field():
    with pytest.raises(ConfigError, match="progressive.shape"):
        load_config(None, ["progressive.shape=exponential"])
    with pytest.raises(ConfigError, match="progressive.steps"):
        load_config(None, ["progressive.shape=linear", "progressive.steps=0"])


def test_subsample_targets_keeps_valid_points_only_and_pads_with_zeros():
    g = torch.Generator().manual_seed(0)
    B, N = 3, 50
    target = torch.randn(B, N, 3, generator=g) + 10.0  # no valid point is zero
    lengths = torch.tensor([50, 20, 7])
    target[1, 20:] = 0
    target[2, 7:] = 0
    sub, new_len = subsample_targets(target, lengths, 10, generator=g)
    assert sub.shape == (B, 10, 3) and new_len.tolist() == [10, 10, 7]
    for b in range(B):
        valid = {tuple(p.tolist()) for p in target[b, : lengths[b]]}
        picked = [tuple(p.tolist()) for p in sub[b, : new_len[b]]]
        assert len(set(picked)) == len(picked) and set(picked) <= valid
        assert (sub[b, new_len[b]:] == 0).all()
    same, same_len = subsample_targets(target, lengths, 64)
    assert same is target and same_len is lengths
