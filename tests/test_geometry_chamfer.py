"""chamfer_distance against a dense loop reference of PyTorch3D's rules: every point/batch
reduction, direction, norm, lengths, weights and normals; gradients; bad input."""
import itertools

import pytest
import torch

from protodepth.geometry import chamfer_distance


def _nearest(a, b, norm):
    """a (P, D), b (Q, D) -> (dist to nearest (P,), index (P,)) by a dense matrix (reference only)."""
    diff = a[:, None, :] - b[None, :, :]
    d = (diff**2).sum(-1) if norm == 2 else diff.abs().sum(-1)
    return d.min(1)


def dense_chamfer(x, y, xl, yl, point_reduction, batch_reduction, norm, single, weights=None, xn=None, yn=None, abs_cos=True):
    N = x.shape[0]
    w = torch.ones(N, dtype=torch.float64) if weights is None else weights.double()

    def one_direction(a, b, la, lb, na, nb):
        terms, nterms = [], []
        for n in range(N):
            d, i = _nearest(a[n, : la[n]].double(), b[n, : lb[n]].double(), norm)
            full = torch.zeros(a.shape[1], dtype=torch.float64)
            full[: la[n]] = d * w[n]
            terms.append(full)
            if na is not None:
                cos = torch.nn.functional.cosine_similarity(na[n, : la[n]].double(), nb[n, : lb[n]][i].double(), dim=1, eps=1e-6)
                fn = torch.zeros(a.shape[1], dtype=torch.float64)
                fn[: la[n]] = (1 - (cos.abs() if abs_cos else cos)) * w[n]
                nterms.append(fn)
        per_point = torch.stack(terms)
        per_point_n = torch.stack(nterms) if nterms else None
        lens = torch.as_tensor(la).double().clamp(min=1)
        if point_reduction is None:
            return per_point, per_point_n
        if point_reduction == "max":
            return per_point.max(1).values, None
        red = per_point.sum(1)
        red_n = per_point_n.sum(1) if per_point_n is not None else None
        if point_reduction == "mean":
            red = red / lens
            red_n = red_n / lens if red_n is not None else None
        return red, red_n

    cx, cnx = one_direction(x, y, xl, yl, xn, yn)
    if single:
        loss, loss_n = cx, cnx
    else:
        cy, cny = one_direction(y, x, yl, xl, yn, xn)
        if point_reduction is None:
            return (cx, cy), ((cnx, cny) if cnx is not None else None)
        loss = torch.maximum(cx, cy) if point_reduction == "max" else cx + cy
        loss_n = cnx + cny if cnx is not None else None
    if batch_reduction is None:
        return loss, loss_n
    div = 1.0
    if batch_reduction == "mean":
        div = N if weights is None else float(w.sum())
    return loss.sum() / div, (loss_n.sum() / div if loss_n is not None else None)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 20, 3, generator=g)
    y = torch.randn(3, 15, 3, generator=g) + 0.3
    return x, y


def _close(got, want):
    if want is None:
        assert got is None
        return
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g_, w_ in zip(got, want):
            _close(g_, w_)
        return
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


COMBOS = [
    (pr, br, norm, single, lengths)
    for pr, br, norm, single, lengths in itertools.product(
        ["mean", "sum", "max", None], ["mean", "sum", None], [1, 2], [False, True], [False, True])
    if not (pr is None and br is not None)
]


@pytest.mark.parametrize("point_reduction, batch_reduction, norm, single, use_lengths", COMBOS)
def test_chamfer_matches_dense_reference(point_reduction, batch_reduction, norm, single, use_lengths):
    x, y = _data()
    xl = torch.tensor([20, 7, 1]) if use_lengths else None
    yl = torch.tensor([15, 15, 4]) if use_lengths else None
    got = chamfer_distance(x, y, xl, yl, batch_reduction=batch_reduction, point_reduction=point_reduction,
                           norm=norm, single_directional=single)
    want = dense_chamfer(x, y, xl if use_lengths else [20] * 3, yl if use_lengths else [15] * 3,
                         point_reduction, batch_reduction, norm, single)
    _close(got[0], want[0])
    assert got[1] is None


@pytest.mark.parametrize("point_reduction, batch_reduction", [("mean", "mean"), ("sum", None), (None, None)])
@pytest.mark.parametrize("abs_cosine", [True, False])
def test_chamfer_normals_and_weights_match_dense_reference(point_reduction, batch_reduction, abs_cosine):
    x, y = _data(1)
    g = torch.Generator().manual_seed(5)
    xn, yn = torch.randn(3, 20, 3, generator=g), torch.randn(3, 15, 3, generator=g)
    xl, yl = torch.tensor([20, 9, 3]), torch.tensor([15, 2, 15])
    weights = torch.tensor([0.5, 2.0, 0.0])
    got = chamfer_distance(x, y, xl, yl, xn, yn, weights=weights, batch_reduction=batch_reduction,
                           point_reduction=point_reduction, abs_cosine=abs_cosine)
    want = dense_chamfer(x, y, xl, yl, point_reduction, batch_reduction, 2, False, weights, xn, yn, abs_cosine)
    _close(got[0], want[0])
    _close(got[1], want[1])


def test_chamfer_zero_weights_give_zero_with_graph():
    x, y = _data()
    x.requires_grad_()
    loss, _ = chamfer_distance(x, y, weights=torch.zeros(3))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_chamfer_gradcheck():
    x, y = _data(2)
    x = x[:, :6].double().requires_grad_()
    y = y[:, :5].double().requires_grad_()
    xl, yl = torch.tensor([6, 3, 1]), torch.tensor([5, 5, 2])
    for norm in (1, 2):
        assert torch.autograd.gradcheck(lambda a, b: chamfer_distance(a, b, xl, yl, norm=norm)[0], (x, y))


def test_chamfer_half_inputs_give_float32():
    x, y = _data(3)
    loss, _ = chamfer_distance(x.half(), y.half())
    assert loss.dtype == torch.float32
    want, _ = dense_chamfer(x.half().float(), y.half().float(), [20] * 3, [15] * 3, "mean", "mean", 2, False)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


def test_chamfer_rejects_bad_input():
    x, y = _data()
    with pytest.raises(ValueError, match="batch_reduction"):
        chamfer_distance(x, y, batch_reduction="median")
    with pytest.raises(ValueError, match="point_reduction"):
        chamfer_distance(x, y, point_reduction="min")
    with pytest.raises(ValueError, match="batch_reduction.*point_reduction is None"):
        chamfer_distance(x, y, point_reduction=None)
    with pytest.raises(ValueError, match="norm"):
        chamfer_distance(x, y, norm=0)
    with pytest.raises(ValueError, match="x_normals"):
        chamfer_distance(x, y, x_normals=x, y_normals=y, point_reduction="max")
    with pytest.raises(ValueError, match="x:"):
        chamfer_distance(x[0], y)
    with pytest.raises(ValueError, match="y:"):
        chamfer_distance(x, y[:2])
    with pytest.raises(ValueError, match="y:"):
        chamfer_distance(x, y[..., :2])
    with pytest.raises(ValueError, match="x_lengths"):
        chamfer_distance(x, y, x_lengths=torch.tensor([21, 1, 1]))
    with pytest.raises(ValueError, match="y_lengths"):
        chamfer_distance(x, y, y_lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="weights"):
        chamfer_distance(x, y, weights=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="y_normals"):
        chamfer_distance(x, y, x_normals=x, y_normals=y[:, :3])
