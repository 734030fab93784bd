"""The training loop in one process: the loss falls, resume is exact, W&B offline logs, errors are clear."""
import json
import math
from pathlib import Path

import pytest
import torch

from protodepth.config import ConfigError
from protodepth.errors import CheckpointError
from protodepth.train import train
from trainer_utils import (PICTURES, background_job, override_args, python, script_env, tiny_config,
                           tiny_overrides)


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; a second Accelerator with other settings needs them cleared."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    # checkpoints without fsync (0.7 s each; protodepth/checkpoint.py: nothing here needs power-loss durability)
    monkeypatch.setenv("PROTODEPTH_CHECKPOINT_FSYNC", "0")
    yield
    reset_accelerate()


def load_params(ckpt_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt_dir / "model.safetensors"))


# 4 training frames, batch 4: every step sees the same frames, so the loss curve shows learning, not batch noise
FIXED_BATCH = {"data.synthetic_num_scenes": 6, "data.val_fraction": 0.34, "train.batch_size": 4, "optim.lr": 1e-3}


def test_loss_falls_over_twenty_steps(tmp_path):
    # seen: 366 at step 4 -> 132 at step 20 (and about 110 from step 25 on, so 20 steps show the fall)
    cfg = tiny_config(tmp_path, **{"train.max_steps": 20, "train.log_every": 4, **FIXED_BATCH})
    s = train(cfg)
    losses = [l for _, l in s["history"]]
    assert len(losses) == 5
    assert losses[-1] < 0.5 * losses[0], losses
    run = Path(cfg.train.output_dir)
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert s["checkpoint"] and Path(s["checkpoint"], "MANIFEST.json").is_file()
    assert not (run / "viz").exists()  # train.viz_images=0 (the tests' tiny runs): no pictures drawn


# (steps before the save, steps in all): 10 training frames in batches of 2 make 5 micro-batches an epoch, so the
# resumed part crosses an epoch boundary (after step 5; with grad_accum 2, inside step 3's accumulation window)
RESUME_STEPS = {1: (3, 6), 2: (2, 4)}


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_equals_uninterrupted_run(tmp_path, grad_accum):
    # straight vs first steps + save + load + the rest
    first_steps, steps = RESUME_STEPS[grad_accum]
    common = {"train.grad_accum": grad_accum, "train.ckpt_every": first_steps, "train.deterministic": True}
    straight = train(tiny_config(tmp_path / "a", **{**common, "train.max_steps": steps}))
    first = train(tiny_config(tmp_path / "b", **{**common, "train.max_steps": first_steps}))
    assert first["steps"] == first_steps
    resumed = train(tiny_config(tmp_path / "b", **{**common, "train.max_steps": steps, "train.resume": "latest"}))
    assert resumed["steps"] == steps
    assert resumed["history"] == straight["history"]
    a, b = load_params(Path(straight["checkpoint"])), load_params(Path(resumed["checkpoint"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_optimizer_is_fused_adam_on_the_cpu_too(tmp_path):
    from protodepth.training.run import model_and_optimizer

    _, opt = model_and_optimizer(tiny_config(tmp_path), deepspeed=False)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True


def test_resume_latest_without_checkpoints_starts_fresh_but_a_missing_path_is_an_error(tmp_path):
    s = train(tiny_config(tmp_path, **{"train.max_steps": 1, "train.resume": "latest"}))
    assert s["steps"] == 1
    with pytest.raises(CheckpointError, match="train.resume"):
        train(tiny_config(tmp_path, **{"train.resume": str(tmp_path / "nope")}))


def test_wandb_offline_run_holds_the_logged_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = tiny_config(tmp_path, **{"train.max_steps": 3, "train.wandb": "auto", "train.val_every": 3, **PICTURES})
    train(cfg)
    runs = list((Path(cfg.train.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    # wandb >= 0.19 writes offline runs as one protobuf record log (run-*.wandb) and no summary file; the
    # history records hold every key as plain UTF-8, which is what a later `wandb sync` uploads
    (log,) = runs[0].glob("run-*.wandb")
    data = log.read_bytes()
    for key in ("loss", "loss/global", "loss/slot", "loss/repulsion", "loss/edge", "loss/normal", "loss/laplacian",
                "lr", "grad_norm", "samples_per_s", "step_time_s", "samples_per_slot", "val/total", "val/global",
                "viz/picture_0", "viz/cloud_0", "train.batch_size", "model.num_slots"):
        assert f'"{key}"'.encode() in data or key.encode() in data, key
    assert b"not_a_logged_key" not in data


# Two commands that must fail with one clear line, run in real processes beside the other tests (background
# jobs of trainer_utils: the session starts them with its first test)
def _missing_data_run(folder: Path):
    o = tiny_overrides(folder, **{"data.source": "synthia", "data.root": str(folder / "no-such-folder")})
    return [python(), "scripts/train.py", *override_args(o)], script_env(), {}


def _bad_config_run(folder: Path):
    return [python(), "scripts/train.py", "train.mixed_precision=fp8"], script_env(), {}


BACKGROUND_JOBS = {"missing_data_run": _missing_data_run, "bad_config_run": _bad_config_run}


@pytest.fixture
def missing_data_run():
    return background_job("missing_data_run", _missing_data_run).result(timeout=900)


@pytest.fixture
def bad_config_run():
    return background_job("bad_config_run", _bad_config_run).result(timeout=900)


def test_missing_data_folder_is_one_clear_error(missing_data_run):
    rc, _, err = missing_data_run
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines[-1].startswith("error:") and "no-such-folder" in lines[-1], err
    assert "Traceback" not in err


def test_bad_config_value_on_the_command_line_is_one_clear_error(bad_config_run):
    rc, _, err = bad_config_run
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: train.mixed_precision")
    assert "Traceback" not in err


def test_bf16_run_tracks_the_fp32_run(tmp_path):
    common = {"train.max_steps": 6, "train.deterministic": False}
    fp32 = train(tiny_config(tmp_path / "fp32", **common))
    reset_accelerate()
    # with its end-of-run pictures: drawn from bf16 model outputs
    bf16 = train(tiny_config(tmp_path / "bf16", **common, **{"train.mixed_precision": "bf16", **PICTURES}))
    assert bf16["mixed_precision"] == "bf16"
    assert list((tmp_path / "bf16" / "run" / "viz").glob("step_*/*.png")), "no pictures from the bf16 run"
    # bf16 rounding moves Adam's first steps a little and that compounds: per step within 10 %, on average
    # within 4 % (seen: 1.5-5.4 % per step over 6 steps); a broken bf16 path is off by far more
    diffs = []
    for (s1, l1), (s2, l2) in zip(fp32["history"], bf16["history"]):
        assert s1 == s2
        diffs.append(abs(l1 - l2) / abs(l1))
        assert diffs[-1] <= 0.10, (fp32["history"], bf16["history"])
    assert sum(diffs) / len(diffs) <= 0.04, (fp32["history"], bf16["history"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a grad scaler needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_trains_on_gpu(tmp_path, precision):
    s = train(tiny_config(tmp_path, **{"train.max_steps": 30, "train.log_every": 5, "train.mixed_precision": precision,
                                       **FIXED_BATCH}))
    losses = [l for _, l in s["history"]]
    assert all(math.isfinite(l) for l in losses) and losses[-1] < 0.6 * losses[0], losses


def test_a_run_says_what_it_does_and_validates_at_the_end(tmp_path, capsys):
    """The start-up block, a line per validation, checkpoint and picture, and a final validation even when
    max_steps is not a multiple of val_every (summary.json's `val` is never empty then)."""
    s = train(tiny_config(tmp_path, **{"train.max_steps": 4, "train.val_every": 3, "train.ckpt_every": 2,
                                       "train.log_every": 2, **PICTURES}))
    out = capsys.readouterr().out
    assert "***** Running training *****" in out, out
    for key in ("data", "model", "processes", "steps", "precision", "output"):
        assert f"\n  {key}: " in out, key
    assert "global batch 2" in out and "4 optimizer steps from step 0" in out
    assert "step 3: validation " in out and "step 4: validation " in out
    assert "step 2: checkpoint " in out and "step 4: checkpoint " in out and "step 4: pictures in " in out
    assert s["val"] and [step for step, _ in s["val_history"]] == [3, 4]
