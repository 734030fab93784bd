"""Reliability of one training process: atomic checkpoints and their fallback, non-finite steps, full or
unwritable disks. (Kill-and-resume: test_kill_resume.py; dead ranks: test_faults_distributed.py; the table of
user errors: test_errors_table.py / docs/errors.md.)"""
import errno
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from protodepth import checkpoint as ckpt


# ------------------------------------------------------------------------------- checkpoint folders alone

def make_checkpoint(root: Path, step: int, limit: int = 10) -> Path:
    """A committed checkpoint the way train.save makes one: files into the temp folder, then commit."""
    tmp = ckpt.temp_dir(root, step)
    (tmp / "sub").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(bytes(range(256)) * (step + 1))
    (tmp / "sub" / "optimizer.bin").write_bytes(b"x" * 100)
    return ckpt.commit(root, step, limit)


def break_checkpoint(folder: Path, how: str) -> str:
    """Damage a committed checkpoint; returns a fragment the warning about it must contain."""
    if how == "no_manifest":
        (folder / ckpt.MANIFEST).unlink()
        return "MANIFEST.json is missing"
    if how == "truncated":
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        return "model.safetensors has 100 bytes"
    if how == "missing_file":
        (folder / "sub" / "optimizer.bin").unlink()
        return "optimizer.bin is missing"
    if how == "garbage_manifest":
        (folder / ckpt.MANIFEST).write_text("{not json")
        return "MANIFEST.json is unreadable"
    if how == "wrong_step":
        m = json.loads((folder / ckpt.MANIFEST).read_text())
        m["step"] += 1
        (folder / ckpt.MANIFEST).write_text(json.dumps(m))
        return "is for step"
    raise AssertionError(how)


def test_commit_seals_a_complete_checkpoint_and_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        make_checkpoint(tmp_path, step, limit=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-00000003", "checkpoint-00000004"]
    assert not list(tmp_path.glob(".tmp-*"))
    man = json.loads((tmp_path / "checkpoint-00000004" / ckpt.MANIFEST).read_text())
    assert man == {"step": 4, "files": {"model.safetensors": 256 * 5, "sub/optimizer.bin": 100}}
    assert ckpt.verify(tmp_path / "checkpoint-00000004") is None


@pytest.mark.parametrize("how", ["no_manifest", "truncated", "missing_file", "garbage_manifest", "wrong_step"])
def test_latest_skips_a_broken_checkpoint_with_a_warning_naming_the_problem(tmp_path, how):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    fragment = break_checkpoint(tmp_path / "checkpoint-00000003", how)
    with pytest.warns(UserWarning, match="skipping checkpoint") as rec:
        found = ckpt.find_resume_checkpoint(tmp_path, "latest")
    assert found == tmp_path / "checkpoint-00000002"
    assert len(rec) == 1 and fragment in str(rec[0].message) and "checkpoint-00000003" in str(rec[0].message)
    # an explicit path to the broken one is an error, not a silent fallback
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint-00000003 is incomplete: .*{fragment}"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-00000003"))


def test_latest_with_two_broken_falls_back_two(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    break_checkpoint(tmp_path / "checkpoint-00000003", "truncated")
    break_checkpoint(tmp_path / "checkpoint-00000002", "no_manifest")
    with pytest.warns(UserWarning) as rec:
        assert ckpt.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-00000001"
    assert len(rec) == 2


def test_nothing_saved_yet_differs_from_only_broken_checkpoints(tmp_path):
    with pytest.raises(ckpt.NoCheckpointError):
        ckpt.find_resume_checkpoint(tmp_path / "none", "latest")
    make_checkpoint(tmp_path, 1)
    break_checkpoint(tmp_path / "checkpoint-00000001", "truncated")
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints") as e:
        ckpt.find_resume_checkpoint(tmp_path, "latest")
    assert not isinstance(e.value, ckpt.NoCheckpointError)  # train must not start from step 0 over them
    with pytest.warns(UserWarning):
        assert ckpt.latest_checkpoint_or_none(tmp_path) is None


def test_explicit_resume_paths(tmp_path):
    good = make_checkpoint(tmp_path, 5)
    assert ckpt.find_resume_checkpoint(tmp_path, str(good)) == good
    with pytest.raises(ckpt.CheckpointError, match="nope not found"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(ckpt.CheckpointError, match="holds checkpoint folders, it is not one.*checkpoint-00000005"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path))
    half = ckpt.temp_dir(tmp_path, 6)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"1234")
    with pytest.raises(ckpt.CheckpointError, match="incomplete: .*MANIFEST.json is missing"):
        ckpt.find_resume_checkpoint(tmp_path, str(half))


def test_stale_temp_folders_are_removed_and_a_resave_replaces_the_old_folder(tmp_path):
    make_checkpoint(tmp_path, 1)
    stale = ckpt.temp_dir(tmp_path, 2)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert ckpt.clean_stale_temps(tmp_path) == [stale] and not stale.exists()
    assert ckpt.checkpoint_dirs(tmp_path) == [tmp_path / "checkpoint-00000001"]
    # the same step written again (after it was skipped as broken) replaces the old folder whole
    break_checkpoint(tmp_path / "checkpoint-00000001", "truncated")
    make_checkpoint(tmp_path, 1)
    assert ckpt.verify(tmp_path / "checkpoint-00000001") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001"]


def test_commit_of_an_empty_temp_folder_is_refused(tmp_path):
    ckpt.temp_dir(tmp_path, 1).mkdir()
    with pytest.raises(ckpt.CheckpointError, match="wrote no files"):
        ckpt.commit(tmp_path, 1, 3)
    assert ckpt.checkpoint_dirs(tmp_path) == []


# ------------------------------------------------------------------------------------- through train()

@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each training test builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train(tmp_path, **extra):
    from protodepth.train import train
    from trainer_utils import tiny_config

    return train(tiny_config(tmp_path, **extra))


def steps_saved(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.checkpoint_dirs(run / "checkpoints")]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_latest_falls_back_past_a_truncated_checkpoint_and_removes_stale_temps(tmp_path, capsys):
    run = tmp_path / "run"
    run_train(tmp_path, **{"train.max_steps": 3, "train.ckpt_every": 1})
    assert steps_saved(run) == [1, 2, 3]
    weights = run / "checkpoints" / "checkpoint-00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    stale = ckpt.temp_dir(run / "checkpoints", 4)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = run_train(tmp_path, **{"train.max_steps": 4, "train.ckpt_every": 1, "train.resume": "latest"})
    msgs = [str(w.message) for w in rec if "skipping checkpoint" in str(w.message)]
    assert len(msgs) == 1 and "checkpoint-00000003" in msgs[0] and "model.safetensors has" in msgs[0], msgs
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-00000002 at step 2" in out, out
    assert s["steps"] == 4 and [h[0] for h in s["history"]] == [1, 2, 3, 4]
    assert not stale.exists()
    assert steps_saved(run) == [2, 3, 4] and ckpt.verify(run / "checkpoints" / "checkpoint-00000003") is None


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_only_broken_checkpoints_stop_a_latest_resume_instead_of_starting_over(tmp_path):
    run = tmp_path / "run"
    run_train(tmp_path, **{"train.max_steps": 1, "train.ckpt_every": 1})
    (run / "checkpoints" / "checkpoint-00000001" / ckpt.MANIFEST).unlink()
    with pytest.warns(UserWarning, match="MANIFEST.json is missing"), \
            pytest.raises(ckpt.CheckpointError, match="none of the 1 checkpoints"):
        run_train(tmp_path, **{"train.max_steps": 2, "train.resume": "latest"})
    assert steps_saved(run) == [1]  # the broken one is left for the user to inspect, nothing new written


# ------------------------------------------------------------------------------------ non-finite steps

@pytest.mark.usefixtures("fresh_accelerate_state")
def test_nonfinite_loss_from_an_overflowing_learning_rate_stops_naming_step_and_files(tmp_path):
    # Honest NaN: no patching. Adam's first update moves every weight by about lr, so lr=1e30 makes the
    # weights ~1e30 and the second forward pass overflows float32 (its largest value is 3.4e38).
    from protodepth.train import NonFiniteError

    with pytest.raises(NonFiniteError) as e:
        run_train(tmp_path, **{"optim.lr": 1e30, "train.max_steps": 4, "train.ckpt_every": 1})
    msg = str(e.value)
    assert "non-finite loss at step 2" in msg, msg
    assert msg.count(".png") == 2 and "DepthLeft" in msg  # the batch's two sample files
    assert steps_saved(tmp_path / "run") == [1]  # nothing of step 2 or later
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def _nan_at(monkeypatch, bad_calls: set[int], where: str):
    """Make proto_depth_loss non-finite on the given (1-based) calls: `where`="loss" multiplies the real loss by
    NaN (loss and gradients NaN); "grad" adds sqrt(0 * x), which is 0 but whose gradient is inf * 0 = NaN."""
    import protodepth.train as tr

    real = tr.proto_depth_loss
    calls = {"n": 0}

    def patched(slot_verts, *a, **k):
        calls["n"] += 1
        out = real(slot_verts, *a, **k)
        if calls["n"] in bad_calls:
            extra = (slot_verts.sum() * 0).sqrt()
            total = out.total * float("nan") if where == "loss" else out.total + extra
            out = out._replace(total=total)
        return out

    monkeypatch.setattr(tr, "proto_depth_loss", patched)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_nonfinite_gradient_with_a_finite_loss_is_caught_too(tmp_path, monkeypatch):
    from protodepth.train import NonFiniteError

    _nan_at(monkeypatch, {3}, "grad")
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 3"):
        run_train(tmp_path, **{"train.max_steps": 4, "train.ckpt_every": 1})
    assert steps_saved(tmp_path / "run") == [1, 2]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_skip_drops_the_nonfinite_step_and_training_goes_on(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2}, "loss")
    s = run_train(tmp_path, **{"train.max_steps": 4, "train.ckpt_every": 1, "train.on_nonfinite": "skip"})
    assert s["steps"] == 4 and s["skipped_steps"] == 1
    losses = dict((step, loss) for step, loss in s["history"])
    assert torch.isnan(torch.tensor(losses[2])) and all(torch.isfinite(torch.tensor(losses[k])) for k in (1, 3, 4))
    from safetensors.torch import load_file

    params = load_file(str(Path(s["checkpoint"]) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in params.values())  # the NaN gradients never reached the weights


# ----------------------------------------------------------------------------- disk full / unwritable

def test_output_dir_under_a_regular_file_is_refused_before_training(tmp_path):
    from protodepth.config import ConfigError
    from protodepth.train import check_output_dir

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"train.output_dir: .*afile/run is not writable"):
        check_output_dir(blocker / "run", min_free_bytes=1)


def test_output_dir_without_room_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil

    from protodepth.config import ConfigError
    from protodepth.train import check_output_dir

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5 << 20))
    with pytest.raises(ConfigError, match="has 5 MiB free, a checkpoint needs about 100 MiB"):
        check_output_dir(tmp_path / "run", min_free_bytes=100 << 20)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_failing_checkpoint_write_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    from accelerate import Accelerator

    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state_then_disk_full(self, output_dir=None, **kw):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(self, output_dir, **kw)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")  # half-written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Accelerator, "save_state", save_state_then_disk_full)
    with pytest.raises(ckpt.CheckpointError) as e:
        run_train(tmp_path, **{"train.max_steps": 3, "train.ckpt_every": 1})
    msg = str(e.value)
    assert "checkpoint of step 2" in msg and "No space left on device" in msg and "checkpoint-00000001" in msg, msg
    root = tmp_path / "run" / "checkpoints"
    assert steps_saved(tmp_path / "run") == [1] and not list(root.glob(".tmp-*"))
