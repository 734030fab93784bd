"""The model: vectorised posing equals the original loop; parameterisation ranges; backbone weights."""
import math

import pytest
import torch

from protodepth.config import ModelConfig
from protodepth.model import ProtoDepth, SlotParams, WeightsError, build_backbone, pose_slots
from reference_posing import pose_slots_loop


def random_params(B, K, P, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SlotParams(
        scale=torch.rand(B, K, generator=g, dtype=dtype) * 3 + 0.1,
        trans=torch.randn(B, K, P, 3, generator=g, dtype=dtype) * 10,
        euler=(torch.rand(B, K, P, 3, generator=g, dtype=dtype) * 2 - 1) * math.pi,
        weights=torch.softmax(torch.randn(B, K, P, generator=g, dtype=dtype), -1),
    )


def test_vectorised_posing_equals_per_slot_loop():
    B, K, P, V = 2, 3, 4, 42
    params = random_params(B, K, P)
    protos = torch.randn(P, V, 3, dtype=torch.float64)
    fast = pose_slots(params, protos)
    slow = pose_slots_loop(params, protos)
    assert fast.shape == (B, K, V, 3)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_posing_gradients_match_loop():
    params = random_params(1, 2, 3)
    params = SlotParams(*(p.clone().requires_grad_() for p in params))
    protos = torch.randn(3, 12, 3, dtype=torch.float64, requires_grad=True)
    g_fast = torch.autograd.grad(pose_slots(params, protos).pow(2).sum(), [*params, protos])
    g_slow = torch.autograd.grad(pose_slots_loop(params, protos).pow(2).sum(), [*params, protos])
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_forward_shapes_and_ranges():
    cfg = ModelConfig(num_slots=3, num_prototypes=2, ico_level=1, channels_last=False)
    model = ProtoDepth(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 48))
    p = out.params
    assert p.scale.shape == (2, 3) and p.trans.shape == (2, 3, 2, 3) and p.euler.shape == (2, 3, 2, 3)
    assert p.weights.shape == (2, 3, 2)
    assert (p.scale > 0).all() and (p.scale <= 5 * 50).all()
    assert p.trans.abs().max() <= 1000 and p.euler.abs().max() <= math.pi
    torch.testing.assert_close(p.weights.sum(-1), torch.ones(2, 3))
    assert out.slot_verts.shape == (2, 3, 42, 3) and out.slot_verts.dtype == torch.float32
    assert out.prototypes.shape == (2, 42, 3)
    # zero-initialised offsets: the prototypes start as the unit sphere
    torch.testing.assert_close(out.prototypes.norm(dim=-1), torch.ones(2, 42))


def test_local_weights_file_loads(tmp_path):
    src = build_backbone("none")
    state = {k: v for k, v in src.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 2048)  # a classifier in the file is ignored
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    loaded = build_backbone(str(path))
    for (k, a), b in zip(src.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_missing_or_wrong_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_backbone(str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(WeightsError, match="does not hold ResNet-50 weights"):
        build_backbone(str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a readable"):
        build_backbone(str(junk))


def _resnet50_state() -> dict:
    import torchvision

    return {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()}


def _wrong_shape(state: dict) -> dict:
    state = dict(state)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3)
    return state


@pytest.mark.parametrize("content, needle", [
    (lambda: [torch.zeros(3)], r"holds a list, not a state_dict \(a mapping of parameter names to tensors\)"),
    (lambda: {0: torch.zeros(3), 1: torch.zeros(3)}, r"is not a state_dict: its keys must be parameter names, found 0"),
    (lambda: __import__("torchvision").models.resnet18(weights=None).state_dict(),
     r"holds a ResNet with basic blocks \(ResNet-18 or -34, no conv3\); protodepth's backbone is a ResNet-50"),
    (lambda: _wrong_shape(_resnet50_state()), r"layer2.0.conv1.weight has shape \(3, 3\), ResNet-50 needs "
                                              r"\(128, 256, 1, 1\)"),
    (lambda: {**_resnet50_state(), "conv1.weight": [1.0]}, r"conv1.weight is a list, not a tensor"),
])
def test_a_weights_file_that_is_not_a_resnet50_state_dict_names_file_and_problem(tmp_path, content, needle):
    path = tmp_path / "w.pth"
    torch.save(content(), path)
    with pytest.raises(WeightsError, match=rf"^model.weights: {tmp_path}/w.pth:? {needle}"):
        build_backbone(str(path))


def test_a_wrapped_or_ddp_prefixed_resnet50_state_dict_loads(tmp_path):
    state = _resnet50_state()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items() if "num_batches" not in k}}
    torch.save(wrapped, tmp_path / "w.pth")
    loaded = build_backbone(str(tmp_path / "w.pth")).state_dict()
    assert torch.equal(loaded["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])


def test_a_weights_path_naming_a_folder_says_so(tmp_path):
    with pytest.raises(WeightsError, match="is a folder, not a file"):
        build_backbone(str(tmp_path))


def test_the_model_exposes_its_sizes_only_through_its_config():
    model = ProtoDepth(ModelConfig(num_slots=2, num_prototypes=3, ico_level=0, channels_last=False))
    assert (model.cfg.num_slots, model.cfg.num_prototypes) == (2, 3)
    assert not hasattr(model, "num_slots") and not hasattr(model, "num_prototypes")


def test_imagenet_weights_without_network_is_a_clear_error(monkeypatch):
    import torchvision

    def no_network(self, *a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_network)
    with pytest.raises(WeightsError, match="could not download"):
        build_backbone("imagenet")


def test_single_channel_input_equals_its_three_channel_repeat():
    cfg = ModelConfig(num_slots=2, num_prototypes=2, ico_level=0, channels_last=False)
    model = ProtoDepth(cfg).eval()
    one = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        a = model(one).slot_verts
        b = model(one.repeat(1, 3, 1, 1)).slot_verts
    torch.testing.assert_close(a, b)
