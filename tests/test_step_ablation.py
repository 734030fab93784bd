"""The critical-path ablation of the step benchmark (`benchmark.py step --ablate`): every variant's stand-ins give a
finite, differentiable loss of the same shapes, and "full" restores the real loss."""
import pytest
import torch

import protodepth.loss as L
import protodepth.training.step as TS
from loss_inputs import small_loss_problem
from protodepth.benchmarks import step_ablation


def _loss_and_grad():
    slot_verts, protos, faces, target, lengths, cfg, _, _ = small_loss_problem()
    level = L.SamplingLevel(8, None)
    early = TS.start_prototype_terms(protos, faces, cfg)
    res = L.proto_depth_loss(slot_verts, protos, faces, target, lengths, cfg, level=level,
                             generator=torch.Generator().manual_seed(1), proto_terms=early)
    res.total.backward()
    return res, slot_verts.grad


@pytest.mark.parametrize("variant", ["noknn", "onlyslot", "onlyglobal", "nosample", "noproto", "norep",
                                     "noknn+nosample+noproto+norep"])
def test_each_ablation_variant_keeps_the_loss_differentiable_and_full_restores_the_real_loss(variant):
    real, real_grad = _loss_and_grad()
    try:
        step_ablation.apply(variant)
        res, grad = _loss_and_grad()
    finally:
        step_ablation.apply("full")
    assert torch.isfinite(res.total) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert res.pred_points.shape == real.pred_points.shape
    assert not torch.equal(res.total, real.total)  # the stand-in really replaced something
    again, again_grad = _loss_and_grad()
    assert torch.equal(again.total, real.total) and torch.equal(again_grad, real_grad)


def test_an_unknown_ablation_variant_is_refused_naming_the_choices():
    with pytest.raises(SystemExit, match="noknn"):
        step_ablation.apply("noknn+nothing")
    step_ablation.apply("full")
