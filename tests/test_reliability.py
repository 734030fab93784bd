"""Reliability of one training process: atomic checkpoints and their fallback, non-finite steps, full or
unwritable disks. (Kill-and-resume: test_kill_resume.py; dead ranks: test_faults_distributed.py; the table of
user errors: test_errors_table.py / docs/errors.md.)"""
import errno
import hashlib
import json
import os
import pickle
import random
import re
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
    (tmp / "random_states_0.pkl").write_bytes(pickle.dumps({"step": step}))
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
    if how.startswith("same_size_"):  # random bytes of the same length: only the content hash can tell
        rel = {"weights": "model.safetensors", "optimizer": "sub/optimizer.bin", "pickle": "random_states_0.pkl"}[
            how.removeprefix("same_size_")]
        f = folder / rel
        f.write_bytes(os.urandom(f.stat().st_size))
        return f"{f.name} does not match its manifest (corrupt"
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
    assert man["step"] == 4
    sizes = {rel: e["size"] for rel, e in man["files"].items()}
    assert sizes == {"model.safetensors": 256 * 5, "sub/optimizer.bin": 100,
                     "random_states_0.pkl": len(pickle.dumps({"step": 4}))}
    assert man["files"]["sub/optimizer.bin"]["sha256"] == hashlib.sha256(b"x" * 100).hexdigest()
    assert ckpt.verify(tmp_path / "checkpoint-00000004") is None


@pytest.mark.parametrize("how", ["no_manifest", "truncated", "missing_file", "garbage_manifest", "wrong_step",
                                 "same_size_weights", "same_size_optimizer", "same_size_pickle"])
def test_latest_skips_a_broken_checkpoint_with_a_warning_naming_the_problem(tmp_path, how):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    fragment = break_checkpoint(tmp_path / "checkpoint-00000003", how)
    with pytest.warns(UserWarning, match="skipping checkpoint") as rec:
        found = ckpt.find_resume_checkpoint(tmp_path, "latest")
    assert found == tmp_path / "checkpoint-00000002"
    assert len(rec) == 1 and fragment in str(rec[0].message) and "checkpoint-00000003" in str(rec[0].message)
    # an explicit path to the broken one is an error, not a silent fallback
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint-00000003 is broken: .*{re.escape(fragment)}"):
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
    with pytest.raises(ckpt.CheckpointError, match="is broken: .*MANIFEST.json is missing"):
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


def test_a_manifest_of_sizes_only_from_an_older_version_still_verifies_by_size(tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    man = json.loads((folder / ckpt.MANIFEST).read_text())
    man["files"] = {rel: e["size"] for rel, e in man["files"].items()}
    (folder / ckpt.MANIFEST).write_text(json.dumps(man))
    assert ckpt.verify(folder) is None
    break_checkpoint(folder, "truncated")
    assert "has 100 bytes" in ckpt.verify(folder)


def test_resume_naming_a_file_says_it_is_a_file(tmp_path):
    folder = make_checkpoint(tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match=f"{re.escape(str(folder / 'model.safetensors'))} is a file; pass "
                                                   f"a checkpoint folder \\(the one holding it: {re.escape(str(folder))}"):
        ckpt.find_resume_checkpoint(tmp_path, str(folder / "model.safetensors"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match=r"afile is a file; pass a checkpoint folder \(checkpoint-XXXXXXXX"):
        ckpt.find_resume_checkpoint(tmp_path, str(tmp_path / "afile"))


@pytest.fixture
def forget_broken():
    """find_resume_checkpoint remembers the folders it found broken for the process's retention; tests start clean."""
    ckpt._known_broken.clear()
    yield
    ckpt._known_broken.clear()


@pytest.mark.usefixtures("forget_broken")
@pytest.mark.parametrize("how", ["truncated", "same_size_weights"])
def test_retention_after_a_fallback_past_a_broken_newest_keeps_the_good_one(tmp_path, how):
    # checkpoints every 2 steps, limit 1 kept: 2 good, 4 broken; the resume falls back to 2 and saves step 3
    for step in (2, 4):
        make_checkpoint(tmp_path, step, limit=2)
    break_checkpoint(tmp_path / "checkpoint-00000004", how)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert ckpt.find_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-00000002"
    make_checkpoint(tmp_path, 3, limit=2)  # 3 entries, 1 too many: the broken one goes, not the fallback
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-00000002", "checkpoint-00000003"]
    make_checkpoint(tmp_path, 4, limit=1)  # step 4 written anew; only it is kept
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["checkpoint-00000004"]
    assert ckpt.verify(tmp_path / "checkpoint-00000004") is None


@pytest.mark.usefixtures("forget_broken")
def test_retention_deletes_broken_checkpoints_before_older_complete_ones(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step, limit=5)
    break_checkpoint(tmp_path / "checkpoint-00000002", "missing_file")  # found by size alone, no resume needed
    make_checkpoint(tmp_path, 4, limit=3)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == [f"checkpoint-0000000{i}" for i in (1, 3, 4)]


def test_a_kill_during_retention_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    import shutil

    for step in (1, 2):
        make_checkpoint(tmp_path, step, limit=5)
    real = shutil.rmtree

    def killed_midway(path, *a, **k):  # deletes one file, then the process "dies"
        if not Path(path).exists():
            return real(path, *a, **k)
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.remove_checkpoint(tmp_path / "checkpoint-00000001")
    monkeypatch.setattr(shutil, "rmtree", real)
    assert ckpt.checkpoint_dirs(tmp_path) == [tmp_path / "checkpoint-00000002"]  # never a half-deleted checkpoint-*
    leftover = tmp_path / ".deleting-checkpoint-00000001"
    assert leftover.is_dir() and ckpt.clean_stale_temps(tmp_path) == [leftover] and not leftover.exists()


def _os_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    import shutil

    usage = {"free": 0}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, usage["free"]))
    assert ckpt.describe_write_error(_os_error(errno.ENOSPC), tmp_path) == f"the disk holding {tmp_path} is full (0 MiB free)"
    # torch's zip writer says neither ENOSPC nor "full": with no room left that is what it means
    torch_says = RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                              "data/3: file write failed\nunexpected pos 1234 vs 1100")
    assert ckpt.describe_write_error(torch_says, tmp_path) == f"the disk holding {tmp_path} is full (0 MiB free)"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = _os_error(errno.ENOSPC)
    assert "is full" in ckpt.describe_write_error(wrapped, tmp_path)
    # the same torch message with room to spare is something else: say what it said
    usage["free"] = 5 << 30
    said = ckpt.describe_write_error(torch_says, tmp_path)
    assert "is full" not in said and "unexpected pos" in said and said.endswith("; 5120 MiB free there")
    assert "\n" not in said
    assert ckpt.describe_write_error(_os_error(errno.EACCES), tmp_path / "nope" / "deeper") == \
        "Permission denied; 5120 MiB free there"


def _saved_config(folder: Path, **model) -> None:
    import yaml

    (folder / "config.yaml").write_text(yaml.safe_dump({"model": model, "train": {"max_steps": 3}}))


def test_a_checkpoint_of_another_model_shape_is_named_before_loading(tmp_path):
    from protodepth.config import ModelConfig

    _saved_config(tmp_path, num_slots=8, num_prototypes=8, ico_level=2)
    ckpt.check_compatible(tmp_path, {"num_slots": 8, "num_prototypes": 8, "ico_level": 2, "weights": "x"})
    with pytest.raises(ckpt.CheckpointError, match=re.escape(
            f"checkpoint {tmp_path} was trained with model.num_slots=8, model.ico_level=2, the config says "
            "model.num_slots=4, model.ico_level=3; resume it with model.num_slots=8 model.ico_level=2, or start a "
            "new run in another train.output_dir")):
        ckpt.check_compatible(tmp_path, ModelConfig(num_slots=4, num_prototypes=8, ico_level=3))
    (tmp_path / "config.yaml").unlink()
    ckpt.check_compatible(tmp_path, {"num_slots": 1})  # nothing saved to compare with: not checked


def test_nonfinite_loaded_weights_are_named(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ckpt.check_finite_state(net)
    with torch.no_grad():
        net[1].running_var[1] = float("inf")
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {re.escape(str(tmp_path))}: the model's "
                                                   r"1.running_var holds NaN or inf values"):
        ckpt.check_finite_state(net, tmp_path)
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match=r"the loaded checkpoint: the model's 0.weight holds NaN"):
        ckpt.check_finite_state(net)


# ------------------------------------------------------------------------------------- through train()

@pytest.fixture
def fresh_accelerate_state(monkeypatch):
    """Accelerate keeps process-wide singletons; each training test builds its own Accelerator. Checkpoints
    skip fsync here (0.7 s per checkpoint; kills and failures do not need it: see protodepth/checkpoint.py)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    monkeypatch.setenv(ckpt.FSYNC_ENV, "0")
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
    run_train(tmp_path, **{"train.max_steps": 2, "train.ckpt_every": 1})
    assert steps_saved(run) == [1, 2]
    weights = run / "checkpoints" / "checkpoint-00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    stale = ckpt.temp_dir(run / "checkpoints", 3)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        s = run_train(tmp_path, **{"train.max_steps": 3, "train.ckpt_every": 1, "train.resume": "latest"})
    msgs = [str(w.message) for w in rec if "skipping checkpoint" in str(w.message)]
    assert len(msgs) == 1 and "checkpoint-00000002" in msgs[0] and "model.safetensors has" in msgs[0], msgs
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-00000001 at step 1" in out, out
    assert s["steps"] == 3 and [h[0] for h in s["history"]] == [1, 2, 3]
    assert not stale.exists()
    # step 2 was trained again and its broken checkpoint replaced by a complete one
    assert steps_saved(run) == [1, 2, 3] and ckpt.verify(run / "checkpoints" / "checkpoint-00000002") is None


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

def test_grad_norm_of_huge_fp32_gradients_is_finite_and_right():
    # A diverging step leaves fp32 gradients of ~1e19 (seen at step 1 with 16x16 input): their squares pass
    # float32's 3.4e38, so a norm summed in fp32 says inf although the true norm is finite.
    from protodepth.training.step import grad_norm

    big = torch.nn.Parameter(torch.zeros(3, 4))
    big.grad = torch.full((3, 4), 1e19)
    small = torch.nn.Parameter(torch.zeros(5))
    small.grad = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0])
    unused = torch.nn.Parameter(torch.zeros(2))  # no gradient: skipped
    norm = grad_norm([big, small, unused])
    assert torch.linalg.vector_norm(big.grad) == float("inf")  # what a float32 norm gives
    assert norm.dtype == torch.float64 and torch.isfinite(norm)
    v = big.grad[0, 0].item()  # 1e19 as float32 holds it
    assert norm.item() == pytest.approx((12 * v * v + 25) ** 0.5, rel=1e-12)
    assert grad_norm([small]).item() == 5.0
    small.grad[0] = float("inf")  # a truly infinite gradient still says inf
    assert grad_norm([big, small]).item() == float("inf")


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("size", [16, 32])
def test_nonfinite_loss_from_an_overflowing_learning_rate_stops_naming_step_and_files(tmp_path, size):
    # Honest overflow: no patching. Adam's first update moves every weight by about lr, so lr=1e30 makes the
    # weights ~1e30 and the second forward pass overflows float32 (its largest value is 3.4e38): the slot
    # vertices are inf/NaN, which the geometry refuses before any loss exists. Whatever the input size: at
    # 16x16 step 1's fp32 gradients reach ~1e19, whose norm must not overflow and end the run one step early.
    from protodepth.errors import NonFiniteError

    with pytest.raises(NonFiniteError) as e:
        run_train(tmp_path, **{"optim.lr": 1e30, "train.max_steps": 4, "train.ckpt_every": 1,
                               "data.height": size, "data.width": size})
    msg = str(e.value)
    assert "non-finite model output (slot vertices) at step 2" in msg, msg
    assert msg.count(".png") == 2 and "DepthLeft" in msg  # the batch's two sample files
    assert steps_saved(tmp_path / "run") == [1]  # nothing of step 2 or later
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def _nan_at(monkeypatch, bad_calls: set[int], where: str):
    """Make proto_depth_loss non-finite on the given (1-based) calls: `where`="loss" multiplies the real loss by
    NaN (loss and gradients NaN); "grad" adds sqrt(0 * x), which is 0 but whose gradient is inf * 0 = NaN."""
    import protodepth.training.step as tr

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
    from protodepth.errors import NonFiniteError

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
    from protodepth.training.checkpointing import check_writable as check_output_dir

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"train.output_dir: .*afile/run is not writable"):
        check_output_dir(blocker / "run", min_free_bytes=1)


def test_output_dir_without_room_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    import shutil

    from protodepth.config import ConfigError
    from protodepth.training.checkpointing import check_writable as check_output_dir

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5 << 20))
    with pytest.raises(ConfigError, match="has 5 MiB free, a checkpoint needs about 100 MiB"):
        check_output_dir(tmp_path / "run", min_free_bytes=100 << 20)


# What a full disk looks like to the trainer: the OS's ENOSPC, or torch's zip writer with no errno at all.
DISK_FULL_ERRORS = {
    "enospc": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "torch_unexpected_pos": lambda: RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
                                                 "failed writing file data/3: file write failed\nunexpected pos 1234 "
                                                 "vs 1100"),
}


def _disk_fills_up(monkeypatch, failure: str, saves_before: int = 0) -> None:
    """After `saves_before` good checkpoints, Accelerator.save_state writes part of a file and fails as a full disk
    does (`failure`, a key of DISK_FULL_ERRORS); from then on the disk has 0 bytes free."""
    import shutil

    from accelerate import Accelerator

    real_save, real_usage = Accelerator.save_state, shutil.disk_usage
    state = {"saves": 0, "full": False}

    def save_state(self, output_dir=None, **kw):
        state["saves"] += 1
        if state["saves"] <= saves_before:
            return real_save(self, output_dir, **kw)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")  # half-written, then the disk is full
        state["full"] = True
        raise DISK_FULL_ERRORS[failure]()

    def disk_usage(path):
        u = real_usage(path)
        return shutil._ntuple_diskusage(u.total, u.total, 0) if state["full"] else u

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("failure", list(DISK_FULL_ERRORS))
def test_a_full_disk_during_a_checkpoint_is_named_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch, failure):
    _disk_fills_up(monkeypatch, failure, saves_before=1)
    with pytest.raises(ckpt.CheckpointError) as e:
        run_train(tmp_path, **{"train.max_steps": 3, "train.ckpt_every": 1})
    msg = str(e.value)
    root = tmp_path / "run" / "checkpoints"
    assert msg == (f"could not write the checkpoint of step 2 to {root} (the disk holding {root} is full (0 MiB "
                   f"free)); the last complete checkpoint is {root / 'checkpoint-00000001'}"), msg
    assert steps_saved(tmp_path / "run") == [1] and not list(root.glob(".tmp-*"))
    assert ckpt.verify(root / "checkpoint-00000001") is None


# ------------------------------------------------------------------ run folders: one run per folder

@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_fresh_run_into_a_used_folder_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path, capsys):
    from protodepth.errors import RunFolderError

    run = tmp_path / "run"
    first = run_train(tmp_path, **{"train.max_steps": 2, "train.ckpt_every": 1})
    old_files = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match=re.escape(f"train.output_dir: {run} already holds a run (checkpoints up "
                                                       "to step 2); pass --resume latest")):
        run_train(tmp_path, **{"train.max_steps": 1, "train.ckpt_every": 1})
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == old_files  # untouched

    capsys.readouterr()
    second = run_train(tmp_path, **{"train.max_steps": 1, "train.ckpt_every": 1, "train.overwrite": True})
    aside = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and f"the earlier run in {run} was moved to {aside[0]}" in capsys.readouterr().out
    # nothing of the old run was deleted: every file of it is in the replaced-* folder, byte for byte
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file()} == old_files
    assert json.loads((aside[0] / "summary.json").read_text())["history"] == [list(h) for h in first["history"]]
    # the new run is on its own: its checkpoint, its summary
    assert steps_saved(run) == [1] and second["checkpoint"] == str(run / "checkpoints" / "checkpoint-00000001")
    assert json.loads((run / "summary.json").read_text())["steps"] == 1


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_resume_of_a_finished_run_trains_nothing_and_keeps_its_summary(tmp_path, capsys):
    run = tmp_path / "run"
    run_train(tmp_path, **{"train.max_steps": 2, "train.ckpt_every": 1})
    summary, config = (run / "summary.json").read_bytes(), (run / "config.yaml").read_bytes()
    capsys.readouterr()
    again = run_train(tmp_path, **{"train.max_steps": 2, "train.ckpt_every": 1, "train.resume": "latest",
                                   "train.log_every": 7})
    out = capsys.readouterr().out
    assert f"nothing to train: the run in {run} is already at step 2 of train.max_steps=2" in out, out
    assert "Running training" not in out
    assert (run / "summary.json").read_bytes() == summary  # not rewritten with an empty `final` and wall_s 0
    assert again == json.loads(summary) and steps_saved(run) == [1, 2]
    assert (run / "config.yaml").read_bytes() == config  # the finished run's config, not this call's


@pytest.mark.usefixtures("fresh_accelerate_state", "forget_broken")
def test_retention_through_the_trainer_keeps_the_checkpoint_it_fell_back_to(tmp_path):
    # 2 kept: steps 2 and 4; 4 gets same-size garbage (only its content hash tells). `--resume latest` falls back
    # to 2 and saves step 3: of 2, 3 and the broken 4 one must go, and it must be the broken one.
    run = tmp_path / "run"
    common = {"train.ckpt_every": 2, "train.ckpt_limit": 2}
    run_train(tmp_path, **{"train.max_steps": 4, **common})
    assert steps_saved(run) == [2, 4]
    break_checkpoint(run / "checkpoints" / "checkpoint-00000004", "same_size_weights")
    with pytest.warns(UserWarning, match="checkpoint-00000004.*does not match its manifest"):
        s = run_train(tmp_path, **{"train.max_steps": 3, "train.resume": "latest", **common})
    assert s["steps"] == 3
    assert steps_saved(run) == [2, 3]
    assert all(ckpt.verify(d) is None for d in ckpt.checkpoint_dirs(run / "checkpoints"))


# ------------------------------------------------------- every user error: one line through scripts/train.py
#
# Each case builds a bad input under a fresh folder and runs scripts/train.py's main() on it (in-process: most
# cases fail before the model is built, so this is fast; test_cli_error_in_a_real_process shows the same from a
# real process). Every case must exit 2 with a last stderr line `error: ...` naming the culprit, without a
# traceback, and that line must be exactly the one docs/errors.md shows (tmp folder written as <tmp>).

ERRORS_DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def _depth(seed: int, h: int = 24, w: int = 32):
    import numpy as np

    rng = np.random.default_rng(seed)
    d = np.full((h, w), 2000.0)  # sky above the horizon
    d[h // 3:] = rng.uniform(5.0, 60.0, size=(h - h // 3, w))
    return d


def _good_frames(root: Path, n_per_seq: int = 5) -> Path:
    from protodepth.data import write_depth_png

    for s in (1, 2):
        d = root / f"SEQ{s}" / "DepthLeft"
        d.mkdir(parents=True)
        for i in range(n_per_seq):
            write_depth_png(d / f"{i:04d}.png", _depth(10 * s + i))
    return root


def _png16_rgb(path: Path) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w = 6, 8
    raw = b"".join(b"\0" + b"\x03\xe8" * 3 * w for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _replace_frame(t: Path, how: str) -> None:
    """Damage the first frame of SEQ1 in the good folder t/frames."""
    from PIL import Image

    f = t / "frames" / "SEQ1" / "DepthLeft" / "0000.png"
    if how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif how == "text":
        f.write_text("this is not an image")
    elif how == "jpeg":
        Image.new("RGB", (32, 24)).save(f, format="JPEG")
    elif how == "sky":
        from protodepth.data import write_depth_png
        import numpy as np

        write_depth_png(f, np.full((24, 32), 1000.0))
    elif how == "rgb16":
        _png16_rgb(f)
    elif how == "bomb":
        from test_data_synthia import _bomb_png

        _bomb_png(f)
    else:
        mode = {"gray": "L", "gray16": "I;16", "rgba": "RGBA", "palette": "P"}[how]
        Image.new(mode, (32, 24)).save(f, format="PNG")


def _make_cache(t: Path) -> None:
    from protodepth.data import DataConfig, build_cache

    cfg = DataConfig(source="synthia", root=str(t / "frames"), height=16, width=16, num_bins=2, points_per_bin=32)
    build_cache(cfg, str(t / "frames"), str(t / "cache"), progress=False)


def _fake_checkpoints(t: Path, broken: bool) -> None:
    root = t / "run" / "checkpoints"
    make_checkpoint(root, 3)
    if broken:
        break_checkpoint(root / "checkpoint-00000003", "truncated")


def _write(t: Path, name: str, text: str) -> None:
    (t / name).write_text(text)


def _checkpoint_with(t: Path, how: str) -> None:
    """One committed checkpoint at step 3 under t/run/checkpoints, damaged or made for another model as `how` says."""
    import yaml

    root = t / "run" / "checkpoints"
    if how == "other_shape":  # a checkpoint whose saved config has 8 slots: the tiny model has 2
        tmp = ckpt.temp_dir(root, 3)
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"0" * 64)
        (tmp / "config.yaml").write_text(yaml.safe_dump({"model": {"num_slots": 8, "num_prototypes": 2, "ico_level": 1}}))
        ckpt.commit(root, 3, 3)
        return
    make_checkpoint(root, 3)
    rng = random.Random(0)  # the same bytes every run, though only the hash sees them
    f = root / "checkpoint-00000003" / "model.safetensors"
    f.write_bytes(bytes(rng.randrange(256) for _ in range(f.stat().st_size)))


def _nan_weights_checkpoint(t: Path) -> None:
    """A real checkpoint of one training step whose head weights were then set to NaN, the manifest resealed (as
    if the NaN had been saved): only the check of the loaded weights can catch it."""
    from safetensors.torch import load_file, save_file

    from protodepth.config import load_config
    from protodepth.train import train

    o = tiny_overrides_for_cli(t)
    o.update({"train.max_steps": 1, "train.ckpt_every": 1})
    train(load_config(None, o))
    folder = t / "run" / "checkpoints" / "checkpoint-00000001"
    weights = load_file(str(folder / "model.safetensors"))
    weights["head.weight"][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ckpt.write_manifest(folder, 1)


def _weights_file(t: Path, what: str) -> None:
    import torchvision

    content = {"list": lambda: [torch.zeros(3)], "int_keys": lambda: {0: torch.zeros(3)},
               "resnet18": lambda: torchvision.models.resnet18(weights=None).state_dict()}[what]()
    torch.save(content, t / f"{what}.pth")


# id -> (what the user did, setup(t) or None, extra argv, fragment the message must hold)
CLI_CASES = {
    # ---- command-line flags
    "flag-wandb-choice": ("`--wandb maybe`", None, ["--wandb", "maybe"], "--wandb"),
    "flag-not-an-int": ("`--max-steps ten`", None, ["--max-steps", "ten"], "--max-steps"),
    "flag-unknown": ("`--steps 3` (no such flag)", None, ["--steps", "3"], "--steps"),
    "flag-abbreviated": ("`--max-step 3` (abbreviations are not taken)", None, ["--max-step", "3"], "--max-step"),
    "override-no-equals": ("`train.max_steps` (no `=value`)", None, ["train.max_steps"], "train.max_steps"),
    "override-no-section": ("`max_steps=3` (no section)", None, ["max_steps=3"], "max_steps=3"),
    "override-bad-yaml": ("`data.val_sequences=[SEQ1`", None, ["data.val_sequences=[SEQ1"], "data.val_sequences"),
    "config-missing": ("`--config nope.yaml`", None, ["--config", "{t}/nope.yaml"], "nope.yaml"),
    "config-bad-yaml": ("`--config` file with broken YAML", lambda t: _write(t, "bad.yaml", "model: [1, 2\n"),
                        ["--config", "{t}/bad.yaml"], "bad.yaml"),
    "config-not-mapping": ("`--config` file holding a list", lambda t: _write(t, "list.yaml", "- 1\n- 2\n"),
                           ["--config", "{t}/list.yaml"], "list.yaml"),
    "config-folder": ("`--config` naming a folder", lambda t: (t / "configs").mkdir(), ["--config", "{t}/configs"],
                      "is a folder"),
    "config-binary": ("`--config` naming a binary (not UTF-8) file",
                      lambda t: (t / "model.pth").write_bytes(bytes(range(256))), ["--config", "{t}/model.pth"],
                      "model.pth"),
    "config-key-twice": ("`--config` file with a section given twice (YAML would silently keep the last)",
                         lambda t: _write(t, "twice.yaml", "train:\n  max_steps: 2\ntrain:\n  seed: 1\n"),
                         ["--config", "{t}/twice.yaml"], "'train' appears twice"),
    "resume-file": ("`--resume` naming a file inside a checkpoint", lambda t: _fake_checkpoints(t, False),
                    ["--resume", "{t}/run/checkpoints/checkpoint-00000003/model.safetensors"], "is a file"),
    "resume-corrupt": ("`--resume` a checkpoint whose weights were overwritten by same-size garbage",
                       lambda t: _checkpoint_with(t, "same_size"), ["--resume", "{t}/run/checkpoints/checkpoint-00000003"],
                       "does not match its manifest"),
    "resume-nan-weights": ("`--resume` a checkpoint whose weights hold NaN (manifest intact)", _nan_weights_checkpoint,
                           ["--resume", "{t}/run/checkpoints/checkpoint-00000001"], "head.weight"),
    "resume-other-shape": ("`--resume` a checkpoint trained with another `model.num_slots`",
                           lambda t: _checkpoint_with(t, "other_shape"), ["--resume", "latest"], "model.num_slots=8"),
    "resume-missing": ("`--resume` a folder that does not exist", None, ["--resume", "{t}/nope"], "nope"),
    "resume-run-folder": ("`--resume` the checkpoints folder instead of one checkpoint",
                          lambda t: _fake_checkpoints(t, False), ["--resume", "{t}/run/checkpoints"], "checkpoints"),
    "resume-incomplete": ("`--resume` a checkpoint whose weights file was truncated",
                          lambda t: _fake_checkpoints(t, True), ["--resume", "{t}/run/checkpoints/checkpoint-00000003"],
                          "model.safetensors has"),
    "resume-latest-all-broken": ("`--resume latest` when every checkpoint is broken",
                                 lambda t: _fake_checkpoints(t, True), ["--resume", "latest"], "none of the 1"),
    # ---- config values
    "field-unknown": ("`model.nmu_slots=3` (typo)", None, ["model.nmu_slots=3"], "model.nmu_slots"),
    "section-unknown": ("`trian.max_steps=3` (typo)", None, ["trian.max_steps=3"], "trian"),
    "type-str-for-int": ("`train.max_steps=ten`", None, ["train.max_steps=ten"], "train.max_steps"),
    "type-bool-for-int": ("`train.batch_size=true`", None, ["train.batch_size=true"], "train.batch_size"),
    "type-list-for-float": ("`optim.lr=[1]`", None, ["optim.lr=[1]"], "optim.lr"),
    "range-batch-size": ("`train.batch_size=0`", None, ["train.batch_size=0"], "train.batch_size"),
    "range-lr": ("`optim.lr=0`", None, ["optim.lr=0"], "optim.lr"),
    "range-loss-weight": ("`loss.w_global=-0.5`", None, ["loss.w_global=-0.5"], "loss.w_global"),
    "range-ico-level": ("`model.ico_level=9`", None, ["model.ico_level=9"], "model.ico_level"),
    "range-data-height": ("`data.height=4`", None, ["data.height=4"], "data.height"),
    "range-timeout": ("`train.dist_timeout_s=0`", None, ["train.dist_timeout_s=0"], "train.dist_timeout_s"),
    "range-lr-inf": ("`optim.lr=.inf` (passes `> 0`)", None, ["optim.lr=.inf"], "optim.lr"),
    "range-loss-weight-inf": ("`loss.w_global=.inf`", None, ["loss.w_global=.inf"], "loss.w_global"),
    "range-seed-negative": ("`train.seed=-1`", None, ["train.seed=-1"], "train.seed"),
    "range-seed-too-large": ("`train.seed=4294967296` (2^32)", None, ["train.seed=4294967296"], "train.seed"),
    "k-nearest-too-large": ("`loss.k_nearest=40` with 2 slots x 16 samples = 32 predicted points", None,
                            ["loss.k_nearest=40"], "loss.k_nearest"),
    "choice-precision": ("`train.mixed_precision=fp8`", None, ["train.mixed_precision=fp8"], "train.mixed_precision"),
    "fp16-on-cpu": ("`train.mixed_precision=fp16` where the run is on the CPU (it would train in fp32)", None,
                    ["train.mixed_precision=fp16"], "train.mixed_precision"),
    "choice-nonfinite": ("`train.on_nonfinite=ignore`", None, ["train.on_nonfinite=ignore"], "train.on_nonfinite"),
    "choice-data-source": ("`data.source=kitti`", None, ["data.source=kitti"], "data.source"),
    "choice-cuda-graphs": ("`train.cuda_graphs=sometimes`", None, ["train.cuda_graphs=sometimes"], "train.cuda_graphs"),
    "graphs-with-fp16": ("`train.cuda_graphs=true train.mixed_precision=fp16`", None,
                         ["train.cuda_graphs=true", "train.mixed_precision=fp16"], "train.cuda_graphs"),
    "needs-steps": ("`progressive.shape=linear` without `progressive.steps`", None, ["progressive.shape=linear"],
                    "progressive.steps"),
    "pool-too-small": ("`data.pool_per_bin=8` (< `data.points_per_bin`)", None, ["data.pool_per_bin=8"],
                       "data.pool_per_bin"),
    "batch-bigger-than-data": ("`train.batch_size=64` with 8 training frames", None, ["train.batch_size=64"],
                               "train.batch_size"),
    "val-sequence-unknown": ("`data.val_sequences=[SEQ9]`", None, ["data.val_sequences=[SEQ9]"], "SEQ9"),
    "weights-missing": ("`model.weights=nope.pth`", None, ["model.weights={t}/nope.pth"], "nope.pth"),
    "weights-garbage": ("`model.weights` a file that is not a state_dict",
                        lambda t: _write(t, "junk.pth", "not a state dict"), ["model.weights={t}/junk.pth"],
                        "junk.pth"),
    "weights-list": ("`model.weights` a torch file holding a list", lambda t: _weights_file(t, "list"),
                     ["model.weights={t}/list.pth"], "list.pth"),
    "weights-int-keys": ("`model.weights` a dict with integer keys", lambda t: _weights_file(t, "int_keys"),
                         ["model.weights={t}/int_keys.pth"], "int_keys.pth"),
    "weights-resnet18": ("`model.weights` a ResNet-18 state dict", lambda t: _weights_file(t, "resnet18"),
                         ["model.weights={t}/resnet18.pth"], "resnet18.pth"),
    "output-dir-under-file": ("`train.output_dir` below a regular file", lambda t: _write(t, "afile", "x"),
                              ["train.output_dir={t}/afile/run"], "train.output_dir"),
    # ---- data files
    "data-root-missing": ("`data.root` does not exist", None, ["data.root={t}/nope"], "nope"),
    "data-root-file": ("`data.root` is a file", lambda t: _write(t, "afile", "x"), ["data.root={t}/afile"], "afile"),
    "data-root-empty": ("`data.root` holds no PNG", lambda t: (t / "empty" / "SEQ1" / "DepthLeft").mkdir(parents=True),
                        ["data.root={t}/empty"], "empty"),
    "synthetic-root-foreign": ("`data.source=synthetic` into a non-empty folder it did not make",
                               None, ["data.source=synthetic"], "data.root"),
    "png-text": ("a `.png` that is a text file", lambda t: _replace_frame(t, "text"), [], "0000.png"),
    "png-jpeg": ("a `.png` that is a JPEG", lambda t: _replace_frame(t, "jpeg"), [], "0000.png"),
    "png-gray": ("an 8-bit grayscale PNG", lambda t: _replace_frame(t, "gray"), [], "0000.png"),
    "png-gray16": ("a 16-bit grayscale PNG", lambda t: _replace_frame(t, "gray16"), [], "0000.png"),
    "png-rgb16": ("a 16-bit-per-channel RGB PNG", lambda t: _replace_frame(t, "rgb16"), [], "0000.png"),
    "png-rgba": ("an RGBA PNG", lambda t: _replace_frame(t, "rgba"), [], "0000.png"),
    "png-palette": ("a palette PNG", lambda t: _replace_frame(t, "palette"), [], "0000.png"),
    "png-bomb": ("a PNG whose header claims 100000x100000 pixels (a decompression bomb)",
                 lambda t: _replace_frame(t, "bomb"), [], "0000.png"),
    "png-truncated": ("a PNG cut in half (header intact: found when first loaded)",
                      lambda t: _replace_frame(t, "truncated"), [], "0000.png"),
    "png-all-sky": ("a frame where every pixel is sky (found when first loaded)",
                    lambda t: _replace_frame(t, "sky"), [], "0000.png"),
    "cache-missing": ("`data.format=cache` with no cache built", None,
                      ["data.format=cache", "data.cache_dir={t}/nocache"], "prepare_data"),
    "cache-mismatch": ("`data.format=cache`, cache built with another `data.height`", _make_cache,
                       ["data.format=cache", "data.cache_dir={t}/cache", "data.height=32"], "data.height"),
    # ---- training
    "nonfinite-output": ("`optim.lr=1e30` (the weights overflow after one step)", None, ["optim.lr=1e30"],
                         "non-finite model output (slot vertices) at step 2"),
    "run-folder-taken": ("a fresh run (no `--resume`) into a `train.output_dir` that holds another run",
                         lambda t: _fake_checkpoints(t, False), [], "--overwrite"),
    "disk-full": ("the disk fills up while a checkpoint is written (`ENOSPC`)", None, ["train.ckpt_every=1"],
                  "is full"),
    "disk-full-torch": ("the disk fills up inside torch's writer (`unexpected pos`, no errno)", None,
                        ["train.ckpt_every=1"], "is full"),
}
# cases whose failure can't be set up as files: (monkeypatch) -> None
CLI_PATCHES = {
    "fp16-on-cpu": lambda mp: mp.setenv("ACCELERATE_USE_CPU", "1"),  # the CPU even on a GPU machine
    "disk-full": lambda mp: _disk_fills_up(mp, "enospc"),
    "disk-full-torch": lambda mp: _disk_fills_up(mp, "torch_unexpected_pos"),
}
# Not errors, but lines a user must be able to rely on: exit code 0, the last line of stdout as documented.
NOTICE_CASES = {
    "nothing-to-train": ("`--resume latest` on a run that already reached `train.max_steps`",
                         lambda t: _finished_run(t), ["--resume", "latest"], "nothing to train"),
}
SLOW_CASES = {"run-folder-taken", "disk-full", "disk-full-torch",
              "png-truncated", "png-all-sky", "nonfinite-output", "weights-garbage", "output-dir-under-file",
              "resume-run-folder", "resume-incomplete", "resume-latest-all-broken", "resume-file", "resume-corrupt",
              "resume-other-shape", "resume-nan-weights", "weights-list", "weights-int-keys", "weights-resnet18"}  # get past the model build


@pytest.fixture(scope="module")
def good_frames(tmp_path_factory) -> Path:
    return _good_frames(tmp_path_factory.mktemp("frames") / "frames")


def _cli_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("protodepth_train_cli", ERRORS_DOC.parent.parent / "scripts" /
                                                  "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _finished_run(t: Path) -> None:
    """A run in t/run that trained to its train.max_steps (3), with its final checkpoint."""
    from trainer_utils import override_args

    assert _cli_module().main(override_args(tiny_overrides_for_cli(t))) == 0


def _case_argv(t: Path, case: str) -> list[str]:
    from trainer_utils import override_args

    _, setup, extra, _ = {**CLI_CASES, **NOTICE_CASES}[case]
    base = tiny_overrides_for_cli(t)
    if case == "synthetic-root-foreign":
        base["data.root"] = str(t / "frames")  # a folder of SYNTHIA frames, not made by the generator
    return override_args(base) + [a.replace("{t}", str(t)) for a in extra]


def tiny_overrides_for_cli(t: Path) -> dict:
    from trainer_utils import tiny_overrides

    o = tiny_overrides(t, **{"data.source": "synthia", "data.root": str(t / "frames"), "data.val_fraction": 0.2,
                             "train.max_steps": 3, "data.height": 16, "data.width": 16})
    for k in [k for k in o if k.startswith("data.synthetic_")]:
        del o[k]
    return o


def run_cli_case(t: Path, case: str, good: Path, capsys, monkeypatch=None, after_setup=None) -> tuple[int, str, str]:
    """Set the case up under t, run scripts/train.py's main(); returns (exit code, stdout, stderr), with t as
    <tmp>. `after_setup()` is called between the two."""
    import shutil

    shutil.copytree(good, t / "frames")
    setup = {**CLI_CASES, **NOTICE_CASES}[case][1]
    if setup:
        setup(t)
    if case in CLI_PATCHES:
        CLI_PATCHES[case](monkeypatch)
    if after_setup:
        after_setup()
    capsys.readouterr()
    try:
        rc = _cli_module().main(_case_argv(t, case))
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out.replace(str(t), "<tmp>"), err.replace(str(t), "<tmp>")


def documented_errors() -> dict[str, str]:
    """id -> message, from the rows `| `id` | what | `message` |` of docs/errors.md (`|` escaped as `\\|`)."""
    rows = {}
    for line in ERRORS_DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        ident, _, msg = line.strip().strip("|").split(" | ", 2)
        msg = msg.strip()
        tick = "`` " if msg.startswith("`` ") else "`"
        rows[ident.strip().strip("`")] = msg[len(tick):-len(tick)].replace("\\|", "|")
    return rows


def test_errors_doc_lists_every_case():
    assert set(documented_errors()) == set(CLI_CASES) | set(NOTICE_CASES)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("case", sorted(CLI_CASES, key=lambda c: (c in SLOW_CASES, list(CLI_CASES).index(c))))
def test_user_error_is_one_documented_line(case, tmp_path, good_frames, capsys, monkeypatch):
    rc, _, err = run_cli_case(tmp_path, case, good_frames, capsys, monkeypatch)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: "), err
    assert CLI_CASES[case][3] in lines[-1], lines[-1]
    assert lines[-1] == "error: " + documented_errors().get(case, "<not in docs/errors.md>"), lines[-1]


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("case", list(NOTICE_CASES))
def test_notice_is_the_documented_last_line_and_the_run_folder_is_kept(case, tmp_path, good_frames, capsys):
    def files() -> dict:  # config.yaml is rewritten with the same config at every start
        return {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != "config.yaml"}

    before = {}
    rc, out, err = run_cli_case(tmp_path, case, good_frames, capsys, after_setup=lambda: before.update(files()))
    lines = [l for l in out.strip().splitlines() if l.strip()]
    assert rc == 0 and "Traceback" not in err, err
    assert NOTICE_CASES[case][3] in lines[-1], lines
    assert lines[-1] == documented_errors().get(case, "<not in docs/errors.md>"), lines[-1]
    assert before and files() == before  # summary.json and the checkpoints as they were


def _dataloader_worker_error_run(folder: Path):
    """A trainer_utils background job (it runs beside the session's other tests): png-truncated, in a real
    process, with the bad frame read in a DataLoader worker."""
    from trainer_utils import python, script_env

    _good_frames(folder / "frames")
    _replace_frame(folder, "truncated")
    argv = _case_argv(folder, "png-truncated") + ["data.num_workers=1"]
    return [python(), "scripts/train.py", *argv], script_env({ckpt.FSYNC_ENV: "0"}), {}


BACKGROUND_JOBS = {"dataloader_worker_error_run": _dataloader_worker_error_run}


@pytest.fixture
def dataloader_worker_error_run():
    from trainer_utils import background_job

    job = background_job("dataloader_worker_error_run", _dataloader_worker_error_run)
    rc, _, err = job.result(timeout=900)
    return rc, err.replace(str(job.folder), "<tmp>")


def test_cli_error_in_a_real_process_from_a_dataloader_worker(dataloader_worker_error_run):
    """The same contract from a real process, with the bad frame read in a DataLoader worker (whose error
    arrives wrapped in the worker's traceback text) and a progress bar open when it fails."""
    rc, err = dataloader_worker_error_run
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1] == "error: " + documented_errors()["png-truncated"], err


def _file_too_large_run(folder: Path):
    """A trainer_utils background job: 2 steps with a checkpoint each, under a 32 MiB file-size limit
    (RLIMIT_FSIZE, set by bash's `ulimit -f` in 1 KiB blocks before it execs the trainer)."""
    from trainer_utils import override_args, python, script_env, tiny_overrides

    o = tiny_overrides(folder, **{"train.max_steps": 2, "train.ckpt_every": 1})
    argv = ["bash", "-c", 'ulimit -f 32768 && exec "$@"', "bash", python(), "scripts/train.py", *override_args(o)]
    return argv, script_env({ckpt.FSYNC_ENV: "0"}), {}


BACKGROUND_JOBS["file_too_large_run"] = _file_too_large_run


@pytest.fixture
def file_too_large_run():
    from trainer_utils import background_job

    job = background_job("file_too_large_run", _file_too_large_run)
    rc, _, err = job.result(timeout=900)
    return rc, err, job.folder


def test_a_real_write_failure_file_too_large_leaves_no_partial_checkpoint(file_too_large_run):
    """Not a patched error: the trainer runs with a 32 MiB file-size limit (RLIMIT_FSIZE), so writing the
    ~90 MB weights file really fails inside safetensors (EFBIG, Python ignores SIGXFSZ) as on a full disk."""
    rc, err, folder = file_too_large_run
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: could not write the checkpoint of step 1 to ") and "File too large" in lines[-1]
    assert lines[-1].endswith("the last complete checkpoint is none"), lines[-1]
    root = folder / "run" / "checkpoints"
    assert root.is_dir() and not list(root.iterdir())  # no .tmp-*, no checkpoint-*


# ------------------------------------------------------------------------------------------ W&B

@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    # offline, no key: each session writes <output_dir>/wandb/offline-run-<time>-<run id>; `wandb sync` then
    # uploads both into one W&B run only if the ids are equal
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    common = {"train.ckpt_every": 1, "train.wandb": "offline"}
    run_train(tmp_path, **{"train.max_steps": 1, **common})
    run_train(tmp_path, **{"train.max_steps": 2, "train.resume": "latest", **common})
    sessions = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    ids = {p.name.rsplit("-", 1)[1] for p in sessions}
    assert len(sessions) == 2 and len(ids) == 1, [p.name for p in sessions]
    # and a new run in another folder gets a W&B run of its own
    run_train(tmp_path, **{"train.max_steps": 1, "train.output_dir": str(tmp_path / "other"), **common})
    other = [p.name.rsplit("-", 1)[1] for p in (tmp_path / "other" / "wandb").glob("offline-run-*")]
    assert len(other) == 1 and other[0] not in ids
