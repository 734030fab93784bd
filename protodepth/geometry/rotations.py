"""Euler angles <-> rotation matrices, PyTorch3D's conventions and formulas.

A convention is three letters from X, Y, Z with the middle letter different from both ends
(6 Tait-Bryan such as "XYZ", 6 proper Euler such as "ZXZ"). The matrix is R = R_c0(a0) @ R_c1(a1)
@ R_c2(a2) (intrinsic rotations), each R_axis a right-handed rotation acting on column vectors.
"""
from __future__ import annotations

import torch

from ._checks import check_float

_LETTERS = ("X", "Y", "Z")


def _check_convention(convention) -> None:
    if not isinstance(convention, str) or len(convention) != 3:
        raise ValueError(f"convention: expected 3 letters from X, Y, Z such as 'XYZ', got {convention!r}")
    for letter in convention:
        if letter not in _LETTERS:
            raise ValueError(f"convention: invalid letter {letter!r} in {convention!r}, expected X, Y or Z")
    if convention[1] in (convention[0], convention[2]):
        raise ValueError(f"convention: middle letter must differ from both ends, got {convention!r}")


def _axis_rotation(axis: str, cos: torch.Tensor, sin: torch.Tensor, nsin: torch.Tensor, one: torch.Tensor,
                   zero: torch.Tensor) -> torch.Tensor:
    """(...) cosine, sine and minus sine of the angles, ones, zeros -> (...) x (3, 3) rotation about one axis."""
    if axis == "X":
        flat = (one, zero, zero, zero, cos, nsin, zero, sin, cos)
    elif axis == "Y":
        flat = (cos, zero, sin, zero, one, zero, nsin, zero, cos)
    else:
        flat = (cos, nsin, zero, sin, cos, zero, zero, zero, one)
    return torch.stack(flat, -1).reshape(cos.shape + (3, 3))


def euler_angles_to_matrix(euler_angles: torch.Tensor, convention: str) -> torch.Tensor:
    """Euler angles (..., 3) in radians -> rotation matrices (..., 3, 3), differentiable.

    angle i rotates about axis convention[i]; R = R0 @ R1 @ R2.
    """
    _check_convention(convention)
    if not torch.is_tensor(euler_angles) or euler_angles.dim() == 0 or euler_angles.shape[-1] != 3:
        shape = tuple(euler_angles.shape) if torch.is_tensor(euler_angles) else type(euler_angles).__name__
        raise ValueError(f"euler_angles: expected a tensor of shape (..., 3), got {shape}")
    check_float("euler_angles", euler_angles)
    # cos and sin of all three angles at once, one ones and one zeros tensor: the same values as per angle,
    # with a third of the kernels (this runs on every training step, forward and backward)
    cos, sin = torch.cos(euler_angles), torch.sin(euler_angles)
    nsin = -sin
    one = torch.ones_like(euler_angles[..., 0])
    zero = torch.zeros_like(one)
    parts = zip(convention, cos.unbind(-1), sin.unbind(-1), nsin.unbind(-1))  # unbind: one backward kernel each
    mats = [_axis_rotation(axis, c, s, ns, one, zero) for axis, c, s, ns in parts]
    return _matmul3(_matmul3(mats[0], mats[1]), mats[2])


def _matmul3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for batches of 3 x 3 matrices (..., 3, 3), as a broadcast product summed over the inner index.
    cuBLAS runs a batched 3 x 3 product as one 32 x 32 tile per matrix: at the training step's 8 192 slot
    prototypes its six products (forward and backward) took ~17 us each on an H200, 0.1 ms of every step."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def _angle_from_tan(axis: str, other_axis: str, data: torch.Tensor, horizontal: bool, tait_bryan: bool) -> torch.Tensor:
    """First or third angle from one row (horizontal) or column of the matrix, by atan2."""
    i1, i2 = {"X": (2, 1), "Y": (0, 2), "Z": (1, 0)}[axis]
    if horizontal:
        i2, i1 = i1, i2
    even = (axis + other_axis) in ("XY", "YZ", "ZX")
    if horizontal == even:
        return torch.atan2(data[..., i1], data[..., i2])
    if tait_bryan:
        return torch.atan2(-data[..., i2], data[..., i1])
    return torch.atan2(data[..., i2], -data[..., i1])


def matrix_to_euler_angles(matrix: torch.Tensor, convention: str) -> torch.Tensor:
    """Rotation matrices (..., 3, 3) -> Euler angles (..., 3) in radians.

    The middle angle lies in [-pi/2, pi/2] (Tait-Bryan) or [0, pi] (proper Euler); the others in
    (-pi, pi]. At gimbal lock the split between first and third angle is arbitrary, as in PyTorch3D.
    """
    _check_convention(convention)
    if not torch.is_tensor(matrix) or matrix.dim() < 2 or matrix.shape[-1] != 3 or matrix.shape[-2] != 3:
        shape = tuple(matrix.shape) if torch.is_tensor(matrix) else type(matrix).__name__
        raise ValueError(f"matrix: expected a tensor of shape (..., 3, 3), got {shape}")
    check_float("matrix", matrix)
    i0 = _LETTERS.index(convention[0])
    i2 = _LETTERS.index(convention[2])
    tait_bryan = i0 != i2
    if tait_bryan:
        sign = -1.0 if i0 - i2 in (-1, 2) else 1.0
        central = torch.asin(torch.clamp(matrix[..., i0, i2], -1.0, 1.0) * sign)
    else:
        central = torch.acos(torch.clamp(matrix[..., i0, i0], -1.0, 1.0))
    first = _angle_from_tan(convention[0], convention[1], matrix[..., i2], False, tait_bryan)
    third = _angle_from_tan(convention[2], convention[1], matrix[..., i0, :], True, tait_bryan)
    return torch.stack((first, central, third), -1)
