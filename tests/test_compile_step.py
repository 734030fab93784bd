"""The compile benchmark's step (protodepth/benchmarks/compile_step.py) is the trainer's step: compiled with
fullgraph=True it gives the eager step's loss, gradients and Adam update, and it computes the model and the
regularisers the trainer's own forward computes. On the CPU with backend "aot_eager" (dynamo's full trace, the
custom ops' fake implementations and AOT autograd's joint graph: what the GPU's Inductor compiles from), on a
tiny shape: ResNet-50 on 32x32 images, 2 slots of a level-1 icosphere."""
import pytest
import torch

from protodepth.benchmarks.compile_step import Row, compiled_trainer_step, needs_cumsum_fallback, problems
from protodepth.benchmarks.step import as_batch, make_inputs, shape_config

B, K, H, W, N = 2, 2, 32, 32, 50


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _step(mode: str):
    torch.manual_seed(0)  # the same initial weights in every step built here
    cfg = shape_config(B, K, H, W, N, "fp32", level=1)
    return compiled_trainer_step(cfg, mode, backend="aot_eager")[0]


def _grads(step) -> list[torch.Tensor]:
    return [p.grad.clone() for p in step.params]


def _assert_close_by_norm(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-4):
    """Each |got - want| / |want| (whole-tensor norms) under tol: ResNet-50's backward through batch norm on
    2 images amplifies the rounding of a reordered sum to ~1e-5 of a gradient, elementwise more where terms cancel."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        err = float((g - w).norm() / w.norm().clamp(min=1e-30))
        assert err < tol, f"tensor {i} {tuple(w.shape)}: relative difference {err:.2e}"


def test_compiled_step_matches_eager_step_loss_gradients_and_update():
    batch = as_batch(*make_inputs(B, H, W, N, "cpu"))
    eager, compiled = _step("eager"), _step("default")
    level = eager.levels(0)
    want_scene, want = eager._forward_backward(batch, level, seed=7)
    got_scene, got = compiled._forward_backward(batch, level, seed=7)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # it really was compiled
    torch.testing.assert_close(got.total, want.total)
    torch.testing.assert_close(got.terms, want.terms)
    torch.testing.assert_close(got_scene.slot_verts, want_scene.slot_verts)
    assert all(float(g.abs().sum()) > 0 for g in _grads(eager))  # every parameter takes part
    _assert_close_by_norm(_grads(compiled), _grads(eager))
    before = [p.detach().clone() for p in eager.params]
    outs = []
    for s in (eager, compiled):
        s.zero_grad()
        outs.append(s(batch, 1, 0))  # the trainer's whole step: forward, loss, backward, guard, clipping, Adam
    torch.testing.assert_close(outs[1].loss.total, outs[0].loss.total)
    torch.testing.assert_close(outs[1].grad_norm, outs[0].grad_norm, rtol=1e-4, atol=0)
    # Adam's first step moves each weight by about lr * sign(gradient): equal, except where a gradient is at
    # rounding level and its sign is noise
    moved = [(p.detach() - b, q.detach() - b) for p, q, b in zip(compiled.params, eager.params, before)]
    agree = sum(int(torch.isclose(c, e, rtol=1e-3, atol=1e-9).sum()) for c, e in moved)
    assert all(bool((e != 0).any()) for _, e in moved)
    assert agree >= 0.999 * sum(e.numel() for _, e in moved)
    assert counters["stats"]["unique_graphs"] == 1  # the second call did not recompile


def test_compiled_step_computes_the_trainers_model_and_regularisers():
    """Same scene and the same draw-independent loss terms as TrainStep.forward_loss (which draws with a
    generator, so only the Chamfer terms differ)."""
    batch = as_batch(*make_inputs(B, H, W, N, "cpu"))
    step = _step("eager")
    level = step.levels(0)
    step.model.eval()  # batch norm from its running statistics: two forward passes see the same network
    (scene, res), _ = step.forward_loss(batch["image"], batch["cloud"], batch["lengths"], level, step.gen)
    ours_scene, ours = step._forward_backward.forward_loss(batch["image"], batch["cloud"], batch["lengths"], level,
                                                           step._forward_backward.draws(batch, level, 3))
    assert set(ours.terms) == set(res.terms)
    for k in ("edge", "normal", "laplacian"):
        torch.testing.assert_close(ours.terms[k], res.terms[k])
    torch.testing.assert_close(ours_scene.slot_verts, scene.slot_verts)


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="mode: expected 'eager' or one of"):
        _step("fast")


def _row(mode="default", first_s=10.0, graphs=1, breaks=0, late=0):
    return Row("b32", mode, first_s, 1.0, graphs, breaks, 0, 0.02, 1600.0, 3.0, late)


@pytest.mark.parametrize("row, says", [
    (_row(first_s=121.0), "took 121 s, over --max-compile-s 120"),
    (_row(breaks=2), "2 graph breaks"),
    (_row(graphs=2), "2 graphs compiled in warm-up"),
    (_row(late=1), "1 more while timed"),
])
def test_slow_compile_graph_break_or_recompile_fails_the_benchmark(row, says):
    assert says in " ".join(problems(row, 120.0))


def test_good_compile_and_the_hand_graph_pass():
    assert problems(_row(), 120.0) == [] and problems(_row("graph", first_s=500.0, graphs=0), 120.0) == []


@pytest.mark.parametrize("version, needed", [("2.11.0+cu130", True), ("2.12.1", True), ("2.13.0", False),
                                             ("2.14.1+cu130", False), ("3.0.0", False)])
def test_inductor_cumsum_workaround_only_on_releases_with_the_split_scan_bug(version, needed):
    assert needs_cumsum_fallback(version) is needed


def test_compile_benchmark_is_registered_and_needs_a_gpu(capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_cli", Path(__file__).parents[1] / "scripts/benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["compile", "--shapes", "b2"]) == 2
    assert "benchmark.py compile needs a CUDA GPU" in capsys.readouterr().out
