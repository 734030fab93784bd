"""The Proto-Depth network: ResNet-50 trunk, slot head, prototype bank, and vectorised posing.

Knows nothing of losses, data files or Accelerate: `ProtoDepth(cfg)(image)` gives `SlotParams`, and
`pose_slots(params, prototypes)` turns them into slot meshes that share the icosphere's faces.
"""
from __future__ import annotations

from protodepth.errors import WeightsError  # noqa: F401  (raised here)
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from protodepth.config import ModelConfig
from protodepth.geometry import euler_angles_to_matrix, ico_sphere


class SlotParams(NamedTuple):
    """Per-image scene parameters predicted by the head.

    scale:   (B, K)        slot scale, > 0
    trans:   (B, K, P, 3)  translation of prototype p in slot k, metres, camera frame
    euler:   (B, K, P, 3)  XYZ Euler angles, radians in (-pi, pi)
    weights: (B, K, P)     blend weights, softmax over P
    """

    scale: torch.Tensor
    trans: torch.Tensor
    euler: torch.Tensor
    weights: torch.Tensor


class SceneOutput(NamedTuple):
    """What `ProtoDepth.forward` returns.

    params:     SlotParams
    slot_verts: (B, K, V, 3) posed slot meshes, float32, camera frame (faces: `ProtoDepth.faces`)
    prototypes: (P, V, 3) sphere + offsets, float32
    """

    params: SlotParams
    slot_verts: torch.Tensor
    prototypes: torch.Tensor



def build_backbone(weights: str) -> nn.Module:
    """torchvision ResNet-50 without its classifier: (B, 3, H, W) -> (B, 2048).

    weights: "none" (random init), "imagenet" (torchvision's IMAGENET1K_V2, downloaded to the torch hub cache
    once), or a path to a local file holding a ResNet-50 state_dict (a classifier `fc.*` in it is ignored).
    """
    # imported here, not at the top: torchvision's package import pulls in torch._dynamo (about 3 s on a CPU), which
    # a process that stops at a config or data error, or that never builds a model, need not pay
    import torchvision

    trunk = torchvision.models.resnet50(weights=None)
    if weights == "imagenet":
        try:
            state = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        except Exception as e:  # no network, proxy, hub cache unwritable...
            raise WeightsError(
                f"model.weights='imagenet': could not download torchvision's ResNet-50 ImageNet weights "
                f"({e.__class__.__name__}: {e}); download them elsewhere and pass the file path as model.weights, "
                f"or use model.weights=none"
            ) from None
        trunk.load_state_dict(state)
    elif weights != "none":
        trunk.load_state_dict(_read_resnet50_state(Path(weights), trunk), strict=False)
    trunk.fc = nn.Identity()
    return trunk


def _read_resnet50_state(path: Path, trunk: nn.Module) -> dict:
    """The ResNet-50 trunk weights in the file at `path` (without the classifier), checked against `trunk`'s
    names and shapes: anything else (a list, another network, int keys, wrong shapes) is a WeightsError naming
    the file and what is wrong, instead of a traceback from inside `load_state_dict`."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise WeightsError(f"model.weights: file {path} {what} (expected 'none', 'imagenet' or a .pth path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"model.weights: {path} is not a readable torch state_dict ({e.__class__.__name__})") from None
    for wrapper in ("state_dict", "model"):  # training scripts often save {"state_dict": ..., "epoch": ...}
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights: {path} holds a {type(state).__name__}, not a state_dict (a mapping of "
                           "parameter names to tensors)")
    bad_key = next((k for k in state if not isinstance(k, str)), None)
    if bad_key is not None:
        raise WeightsError(f"model.weights: {path} is not a state_dict: its keys must be parameter names, found "
                           f"{bad_key!r} ({type(bad_key).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    want = {k: v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
    if "layer1.0.conv3.weight" not in state and "layer1.0.conv2.weight" in state:
        raise WeightsError(f"model.weights: {path} holds a ResNet with basic blocks (ResNet-18 or -34, no conv3); "
                           "protodepth's backbone is a ResNet-50")
    # BatchNorm's step counters are absent from some exports and unused in training: not required
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise WeightsError(
            f"model.weights: {path} does not hold ResNet-50 weights "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )
    for k, v in state.items():
        if not torch.is_tensor(v):
            raise WeightsError(f"model.weights: {path}: {k} is a {type(v).__name__}, not a tensor")
        if v.shape != want[k].shape:
            raise WeightsError(f"model.weights: {path}: {k} has shape {tuple(v.shape)}, ResNet-50 needs "
                               f"{tuple(want[k].shape)}")
    return state


class ProtoDepth(nn.Module):
    """Depth image -> K slots, each a blend of P posed prototype meshes.

    Buffers: `sphere` (V, 3) unit icosphere, `faces` (F, 3) int64. Parameter: `offsets` (P, V, 3), zero-init.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        K, P = cfg.num_slots, cfg.num_prototypes
        self.backbone = build_backbone(cfg.weights)
        self.head = nn.Linear(2048, K * (1 + 7 * P))
        verts, faces = ico_sphere(cfg.ico_level)
        self.register_buffer("sphere", verts.clone(), persistent=False)
        self.register_buffer("faces", faces.clone(), persistent=False)
        self.offsets = nn.Parameter(torch.zeros(P, verts.shape[0], 3))

    def prototypes(self) -> torch.Tensor:
        """(P, V, 3): the learned prototype meshes, sphere plus offsets."""
        return self.sphere + self.offsets

    def forward(self, image: torch.Tensor) -> SceneOutput:
        """image (B, 3, H, W) -> SceneOutput (slot parameters, posed slot meshes, prototypes).

        Posing runs here, inside the module, so DDP / DeepSpeed see the prototype offsets used in forward.
        """
        params = self.predict(image)
        with torch.autocast(device_type=image.device.type, enabled=False):
            protos = self.prototypes().float()
            slot_verts = pose_slots(SlotParams(*(p.float() for p in params)), protos)
        return SceneOutput(params, slot_verts, protos)

    def predict(self, image: torch.Tensor) -> SlotParams:
        """image (B, 3, H, W), or (B, 1, H, W) repeated to 3 channels here -> SlotParams."""
        if image.shape[1] == 1:  # a third of the bytes through the loader and the host-to-device copy
            image = image.expand(-1, 3, -1, -1)
        B = image.shape[0]
        K, P = self.cfg.num_slots, self.cfg.num_prototypes
        feat = self.backbone(image)  # (B, 2048)
        if self.cfg.head_input_scale != 1.0:
            feat = feat * self.cfg.head_input_scale
        out = self.head(feat).float()  # the head's small outputs are squashed below: keep them in fp32
        # split, not slicing: the backward of a split is one cat, that of each slice a zero-filled copy plus an add
        scale_raw, per = out.split([K, K * P * 7], dim=1)  # (B, K), (B, K*P*7)
        trans_raw, euler_raw, weight_raw = per.view(B, K, P, 7).split([3, 3, 1], dim=-1)
        scale = self.cfg.scale_max * F.softplus(scale_raw)
        trans = self.cfg.trans_max * torch.tanh(trans_raw)
        euler = math.pi * torch.tanh(euler_raw)
        weights = torch.softmax(weight_raw.squeeze(-1), dim=-1)
        return SlotParams(scale, trans, euler, weights)


def pose_slots(params: SlotParams, prototypes: torch.Tensor) -> torch.Tensor:
    """Posed slot vertices (B, K, V, 3) from SlotParams and prototypes (P, V, 3).

    v_sp = R(e_sp) proto_p * s_k + t_sp and slot_k = sum_p w_sp v_sp. Because s_k is shared by the slot's
    prototypes, slot_k = s_k * sum_p (w_sp R_sp) proto_p + sum_p w_sp t_sp: one (B*K, 3, 3P) x (3P, V) matmul
    instead of B*K*P small ones, and no (B, K, P, V, 3) intermediate.
    """
    scale, trans, euler, weights = params
    B, K, P, _ = trans.shape
    V = prototypes.shape[1]
    R = euler_angles_to_matrix(euler, "XYZ")  # (B, K, P, 3, 3)
    wR = (weights[..., None, None] * R) * scale[..., None, None, None]  # (B, K, P, 3, 3)
    # (B*K, 3, P*3): row i, column (p, j) = s_k w_sp R_sp[i, j]
    A = wR.permute(0, 1, 3, 2, 4).reshape(B * K, 3, P * 3)
    X = prototypes.reshape(P, V, 3).permute(0, 2, 1).reshape(P * 3, V)  # row (p, j), column v
    verts = torch.matmul(A, X).view(B, K, 3, V).transpose(2, 3)  # (B, K, V, 3)
    t = (weights[..., None] * trans).sum(dim=2)  # (B, K, 3)
    return verts + t[:, :, None, :]

