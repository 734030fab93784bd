"""train.cuda_graphs: the captured step computes what the eager step computes, and bad setups are refused clearly."""
import math
from pathlib import Path

import pytest
import torch

from protodepth.config import ConfigError, LossConfig, ModelConfig
from protodepth.loss import SamplingLevel
from protodepth.train import train
from trainer_utils import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.mark.parametrize("field,value,needle", [
    ("train.grad_accum", 2, "train.grad_accum=1"),
    ("train.mixed_precision", "fp16", "bf16"),
    ("train.compile", True, "choose one"),
])
def test_cuda_graphs_refuses_settings_it_cannot_capture(tmp_path, field, value, needle):
    with pytest.raises(ConfigError, match="train.cuda_graphs") as e:
        tiny_config(tmp_path, **{"train.cuda_graphs": True, field: value})
    assert needle in str(e.value) and "train.cuda_graphs=false" in str(e.value)


def test_cuda_graphs_value_must_be_true_false_or_auto(tmp_path):
    with pytest.raises(ConfigError, match="train.cuda_graphs: got 'yes'"):
        tiny_config(tmp_path, **{"train.cuda_graphs": "yes"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_graphs_on_a_cpu_machine_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="train.cuda_graphs: needs a CUDA GPU"):
        train(tiny_config(tmp_path, **{"train.cuda_graphs": True}))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks auto on a machine without a GPU")
def test_cuda_graphs_auto_stays_off_without_a_gpu(tmp_path):
    s = train(tiny_config(tmp_path, **{"train.max_steps": 1, "train.cuda_graphs": "auto"}))
    assert s["cuda_graphs"] is False


@pytest.mark.parametrize("extra,needle", [
    ({"train.grad_accum": 2}, "grad_accum=1"),
    ({"train.mixed_precision": "fp16"}, "fp16"),
    ({"train.compile": True}, "compile"),
    ({"progressive.shape": "linear", "progressive.steps": 10}, "progressive.shape=step"),
])
def test_cuda_graphs_blocker_names_the_reason_in_the_config_words(tmp_path, monkeypatch, extra, needle):
    import protodepth.geometry.knn as knn
    from protodepth.cuda_graphs import blocker, config_blocker

    monkeypatch.setattr(knn, "_use_triton", lambda: True)  # as on a CUDA machine, whatever this one has
    cfg = tiny_config(tmp_path, **extra)
    assert needle in blocker(cfg, torch.device("cuda"), deepspeed=False)
    assert blocker(cfg, torch.device("cuda"), deepspeed=False) == config_blocker(cfg)  # one wording
    assert "DeepSpeed" in blocker(tiny_config(tmp_path), torch.device("cuda"), deepspeed=True)
    assert blocker(tiny_config(tmp_path), torch.device("cuda"), deepspeed=False, world=2) is None  # DDP is allowed
    ddp = tiny_config(tmp_path, **{"train.data_parallel": "ddp"})
    assert "data_parallel=auto" in blocker(ddp, torch.device("cuda"), deepspeed=False, world=2)


def test_cuda_graphs_blocker_needs_the_triton_knn(tmp_path, monkeypatch):
    from protodepth.cuda_graphs import blocker

    monkeypatch.setenv("PROTODEPTH_DISABLE_TRITON", "1")  # the torch fallback copies to the GPU: not capturable
    assert "Triton" in blocker(tiny_config(tmp_path), torch.device("cuda"), deepspeed=False)


# ------------------------------------------------------------------------------------------------- GPU only

def _small_problem(seed=0):
    from protodepth.model import ProtoDepth

    torch.manual_seed(seed)
    model = ProtoDepth(ModelConfig(num_slots=3, num_prototypes=3, ico_level=1, trans_max=100.0,
                                   head_input_scale=0.022)).cuda()
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 64, 64, generator=g).cuda()
    cloud = (torch.rand(2, 300, 3, generator=g) * torch.tensor([40.0, 20.0, 57.0])
             - torch.tensor([20.0, 10.0, 60.0])).cuda()
    lengths = torch.tensor([300, 170]).cuda()
    return model, image, cloud, lengths


def _step_fn(model, loss_cfg):
    """The trainer's own forward + loss (TrainStep.forward_loss) around `model`, as GraphedStep calls it; its
    outputs reduced to the loss, which the tests compare."""
    from accelerate import Accelerator

    from protodepth.config import Config
    from protodepth.training.step import TrainStep

    opt = torch.optim.Adam(model.parameters())
    step = TrainStep(Config(loss=loss_cfg), Accelerator(), model, opt, model.faces.cuda())

    def fn(image, cloud, lengths, key, gen):
        (_, res), total = step.forward_loss(image, cloud, lengths, SamplingLevel(*key), gen)
        return res.total.detach(), total
    return fn


def _eager(model, fn, image, cloud, lengths, key, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    loss, total = fn(image, cloud, lengths, key, gen)
    total.backward()
    return loss.clone(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.cuda
@cuda
def test_replayed_step_equals_eager_step_with_the_same_seed():
    from protodepth.cuda_graphs import GraphedStep

    model, image, cloud, lengths = _small_problem()
    model.eval()  # batch norm in eval: both paths see the same weights and statistics, nothing else changes
    fn = _step_fn(model, LossConfig(samples_per_slot=64))
    key = (64, None)
    graphed = GraphedStep(fn, list(model.parameters()), torch.Generator(device="cuda"), max_points=512)
    for seed in (1, 2, 3):  # two warm-up calls, then capture + replay
        loss = graphed(image, cloud, lengths, key, seed).clone()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert key in graphed.graphs
    # the eager step on the unpadded cloud: padding to max_points must change nothing but summation order
    ref_loss, ref_grads = _eager(model, fn, image, cloud, lengths, key, seed=3)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # Two eager backwards already differ by ~1e-3 of a gradient's largest entry (TF32 cuDNN convolutions and
    # atomic adds pick their order per run, measured on an H100), so that is the tolerance: a wrong or missing
    # gradient is off by O(1) of it.
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            err = float((g - r).abs().max())
            assert err <= 5e-3 * float(r.abs().max()) + 1e-6, (name, err, float(r.abs().max()))


@pytest.mark.cuda
@cuda
def test_replay_follows_the_generator_seed():
    from protodepth.cuda_graphs import GraphedStep

    model, image, cloud, lengths = _small_problem()
    model.eval()
    graphed = GraphedStep(_step_fn(model, LossConfig(samples_per_slot=32)), list(model.parameters()),
                          torch.Generator(device="cuda"), max_points=300, warmup=1)
    key = (32, None)
    graphed(image, cloud, lengths, key, 0)
    a = graphed(image, cloud, lengths, key, 5).clone()
    b = graphed(image, cloud, lengths, key, 6).clone()
    c = graphed(image, cloud, lengths, key, 5).clone()
    assert torch.equal(a, c) and not torch.equal(a, b)


@pytest.mark.cuda
@cuda
def test_each_progressive_level_gets_its_own_graph_and_results_stay_correct():
    from protodepth.cuda_graphs import GraphedStep

    model, image, cloud, lengths = _small_problem()
    model.eval()
    fn = _step_fn(model, LossConfig(samples_per_slot=64))
    graphed = GraphedStep(fn, list(model.parameters()), torch.Generator(device="cuda"), max_points=300, warmup=1)
    keys = [(16, 100), (64, None)]
    for key in keys + keys:  # warm-up and capture of both
        graphed(image, cloud, lengths, key, 7)
    assert list(graphed.graphs) == [keys[-1]]  # the ramp only goes up: a new level drops the older graphs
    assert graphed.keep_alive  # the mesh-loss topology the graph reads by address
    for key in keys:  # going back to a level recaptures it; the pool shared with the dropped graphs stays sound
        loss = graphed(image, cloud, lengths, key, 9).clone()
        ref, _ = _eager(model, fn, image, cloud, lengths, key, 9)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_trainer_with_cuda_graphs_tracks_the_eager_trainer(tmp_path, precision):
    common = {"train.max_steps": 30, "train.log_every": 5, "train.mixed_precision": precision,
              "data.synthetic_num_scenes": 6, "data.val_fraction": 0.34, "train.batch_size": 4, "optim.lr": 1e-3}
    eager = train(tiny_config(tmp_path / "eager", **common, **{"train.cuda_graphs": False}))
    assert eager["cuda_graphs"] is False
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    graphed = train(tiny_config(tmp_path / "graphed", **common, **{"train.cuda_graphs": True}))
    assert graphed["cuda_graphs"] is True
    losses = [l for _, l in graphed["history"]]
    assert all(math.isfinite(l) for l in losses) and losses[-1] < 0.6 * losses[0], losses
    assert [s for s, _ in eager["history"]] == [s for s, _ in graphed["history"]]
    # Same data, seeds and sample draws; only summation order differs (padded clouds, TF32 convolutions, atomic
    # adds), and Adam's first steps (~lr * sign(g)) amplify that: on an H100 the fp32 curves differed by 3 % at
    # step 5 and 3 % at step 30. A missing gradient, a stale batch or a repeated seed shows far more.
    (_, e0), (_, g0) = eager["history"][0], graphed["history"][0]
    (_, e1), (_, g1) = eager["history"][-1], graphed["history"][-1]
    assert abs(e0 - g0) <= 0.06 * abs(e0), (eager["history"], graphed["history"])
    assert abs(e1 - g1) <= 0.15 * abs(e1), (eager["history"], graphed["history"])


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("mode", ["skip", "error"])
def test_deferred_finite_check_on_the_gpu_skips_or_stops_at_the_right_step(tmp_path, monkeypatch, graphs, mode):
    """On CUDA the host reads a step's finite flags one step late and fused Adam skips the bad step on the
    device; the outcome must be what the synchronous CPU path gives (tests/test_reliability.py)."""
    from safetensors.torch import load_file

    from protodepth import checkpoint as ckpt
    from protodepth.errors import NonFiniteError
    from test_reliability import _nan_at

    _nan_at(monkeypatch, {2}, "loss")  # call 2: an eager step in both modes (graphs capture at call 3)
    # log and checkpoint rarely, so step 2's flags are read late: in step 3's optimizer step
    common = {"train.max_steps": 5, "train.log_every": 5, "train.on_nonfinite": mode, "train.cuda_graphs": graphs}
    if mode == "error":
        with pytest.raises(NonFiniteError, match="non-finite loss at step 2"):
            train(tiny_config(tmp_path, **common, **{"train.ckpt_every": 3}))
        assert ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints") == []
        return
    s = train(tiny_config(tmp_path, **common, **{"train.ckpt_every": 0}))
    assert s["steps"] == 5 and s["skipped_steps"] == 1 and s["cuda_graphs"] is graphs
    assert all(math.isfinite(loss) for _, loss in s["history"])
    params = load_file(str(Path(s["checkpoint"]) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in params.values())  # the NaN step never reached the weights


_UNCAPTURABLE = """
import torch
from protodepth.cuda_graphs import GraphedStep

w = torch.nn.Parameter(torch.ones(3, device="cuda"))

def fn(image, cloud, lengths, key, gen):
    loss = (w * image.mean()).sum()
    if loss.item() > 1e9:  # a host read: fine eagerly, illegal while capturing
        raise AssertionError
    return loss.detach(), loss

graphed = GraphedStep(fn, [w], torch.Generator(device="cuda"), max_points=4, warmup=1)
image, cloud = torch.ones(1, 1, 2, 2, device="cuda"), torch.zeros(1, 4, 3, device="cuda")
lengths = torch.tensor([4], device="cuda")
graphed(image, cloud, lengths, (), 0)  # the eager warm-up step works
graphed(image, cloud, lengths, (), 1)
"""


@pytest.mark.cuda
@cuda
def test_a_step_that_cannot_be_captured_fails_naming_the_way_out():
    # In its own process: an aborted capture leaves the default CUDA generator unusable for the rest of the
    # process (torch 2.11: "Offset increment outside graph capture"), which would break later tests.
    from trainer_utils import python, run_script

    r = run_script([python(), "-c", _UNCAPTURABLE], timeout=120)
    assert r.returncode != 0 and "train.cuda_graphs=false" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("graphs", [
    False, pytest.param(True, marks=[pytest.mark.cuda, cuda])])
def test_overflowed_weights_stop_the_run_even_in_skip_mode(tmp_path, monkeypatch, graphs):
    """Non-finite slot vertices mean the weights overflowed: skipping would skip every later step, so the run
    stops, eagerly (the geometry refuses them) and from a replayed graph (a per-step flag, read one step late)."""
    import protodepth.training.step as tr
    from protodepth.model import ProtoDepth
    from protodepth.errors import NonFiniteError

    poison = torch.ones((), device="cuda" if graphs else "cpu")  # read by address in every replay
    real_forward, real_lr = ProtoDepth.forward, tr.lr_factor

    def forward(self, image):
        out = real_forward(self, image)
        return out._replace(slot_verts=out.slot_verts * poison)

    def lr_factor(step, *a, **k):
        if step == 4:  # asked after optimizer step 4: step 5 (a replay with graphs) gets inf vertices
            poison.fill_(float("inf"))
        return real_lr(step, *a, **k)

    monkeypatch.setattr(ProtoDepth, "forward", forward)
    monkeypatch.setattr(tr, "lr_factor", lr_factor)
    cfg = tiny_config(tmp_path, **{"train.max_steps": 8, "train.log_every": 10, "train.on_nonfinite": "skip",
                                   "train.cuda_graphs": graphs})
    with pytest.raises(NonFiniteError, match=r"non-finite model output \(slot vertices\) at step 5"):
        train(cfg)


def _graphed_grad_norms(tmp_path, flat: bool, steps: int = 5) -> list[float]:
    """Gradient norms of `steps` graphed TrainSteps on a fixed batch, with a learning rate too small to move the
    weights, so every step computes the same gradient; `flat`: gradients captured into FlatGrads' buffer, the
    path several processes take (with one process its all-reduce is a no-op)."""
    from accelerate import Accelerator

    from protodepth.grad_sync import FlatGrads
    from protodepth.training.run import model_and_optimizer
    from protodepth.training.step import TrainStep

    cfg = tiny_config(tmp_path, **{"optim.lr": 1e-12, "data.points_per_bin": 150})
    torch.manual_seed(0)
    acc = Accelerator()
    model, opt = model_and_optimizer(cfg, deepspeed=False)
    model, opt = acc.prepare(model, opt)
    model.eval()  # batch norm statistics stay put: the same gradient at every step
    sync = FlatGrads(model.parameters()) if flat else None
    step = TrainStep(cfg, acc, model, opt, model.faces, graphed=True, grad_sync=sync)
    _, image, cloud, lengths = _small_problem()
    batch = {"image": image[:, :, :32, :32].contiguous(), "cloud": cloud, "lengths": lengths, "paths": ["a", "b"]}
    norms = [float(step(batch, 0, 0).grad_norm) for _ in range(steps)]  # step 0 each time: the same draws
    assert step.graphed.graphs, "the step was never captured"
    return norms


@pytest.mark.cuda
@cuda
def test_graphed_step_into_flat_gradients_computes_the_graphed_gradient(tmp_path):
    """Data-parallel graphs: the replayed backward accumulates into FlatGrads' views instead of assigning its
    own gradients. Warm-up, capture and every replay must give the plain graphed step's gradient: a missing
    gradient gives 0, one never zeroed between steps doubles, a stale one stays at an earlier value."""
    plain = _graphed_grad_norms(tmp_path / "plain", flat=False)
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    flat = _graphed_grad_norms(tmp_path / "flat", flat=True)
    for a, b in zip(plain, flat):  # TF32 convolutions and atomics: ~1e-3 relative between runs
        assert abs(a - b) <= 1e-2 * abs(a), (plain, flat)
