"""scripts/infer.py's command line: flag errors end in one `error:` line like every other user error, no user
error starts with a blank line, and the last line names the number a user compares with the trainer's."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trainer_utils import load_script, tiny_config


infer = load_script("infer")


@pytest.mark.parametrize("args, line", [
    (["--batch-size", "0"], "error: argument --batch-size: got 0, must be >= 1"),
    (["--workers", "-1"], "error: argument --workers: got -1, must be >= 0"),
    (["--bogus"], "error: unrecognized arguments: --bogus"),
    (["--batch", "2"], "error: unrecognized arguments: --batch 2"),  # no abbreviations
])
def test_bad_flag_ends_in_one_error_line_like_the_trainers(args, line, capsys):
    base = ["--checkpoint", "c", "--input", "i", "--output", "o"]
    with pytest.raises(SystemExit) as e:
        infer.main(base + args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1] == line
    assert "infer.py: error" not in err and not err.startswith("\n")


def test_missing_flag_names_it_in_the_error_line(capsys):
    with pytest.raises(SystemExit):
        infer.main(["--checkpoint", "c"])
    assert capsys.readouterr().err.splitlines()[-1] == "error: the following arguments are required: --input, --output"


def test_summary_line_gives_val_chamfer_named_as_the_trainer_logs_it_beside_the_symmetric_chamfer():
    res = {"count": 3, "device": "cpu", "skipped": ["x.png: bad"],
           "mean": {"val_chamfer": 20.25, "chamfer": 38.5, "pred_to_target": 10.0, "target_to_pred": 28.5}}
    line = infer.summary_line(res, "out")
    assert line.startswith("3 images on cpu: val_chamfer 20.25 (the trainer's val/chamfer")
    assert "symmetric chamfer 38.5 m^2 (pred->target 10, target->pred 28.5)" in line
    assert line.index("val_chamfer") < line.index("symmetric chamfer")
    assert line.endswith("results in out; skipped 1 bad files") and "\n" not in line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained tiny model saved as the trainer lays out a checkpoint, and its synthetic scenes."""
    import torch
    from safetensors.torch import save_file

    from protodepth import checkpoint as ckpt
    from protodepth.data import build_datasets
    from protodepth.model import ProtoDepth

    tmp = tmp_path_factory.mktemp("infer_cli")
    cfg = tiny_config(tmp, **{"model.num_slots": 2, "data.synthetic_num_scenes": 4})
    build_datasets(cfg.data, seed=0, progress=False)
    torch.manual_seed(0)
    root = Path(cfg.train.output_dir) / "checkpoints"
    folder = ckpt.temp_dir(root, 1)
    folder.mkdir(parents=True)
    save_file(ProtoDepth(cfg.model).state_dict(), str(folder / "model.safetensors"))
    cfg.save(folder / "config.yaml")
    return {"ckpt": ckpt.commit(root, 1, limit=1), "data": Path(cfg.data.root)}


def test_run_prints_val_chamfer_and_an_error_midway_starts_on_its_own_line(checkpoint, tmp_path, capsys):
    rc = infer.main(["--checkpoint", str(checkpoint["ckpt"]), "--input", str(checkpoint["data"]), "--output",
                     str(tmp_path / "ok"), "--no-pictures", "--device", "cpu"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[-1].startswith("4 images on cpu: val_chamfer ") and "symmetric chamfer" in out[-1]
    # a PNG that is cut short is only found while the progress bar is up: the error still gets a line of its
    # own, and no blank line comes before it
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for p in sorted(checkpoint["data"].glob("*/DepthLeft/*.png"))[:2]:
        shutil.copy(p, pngs / p.name)
    bad = sorted(pngs.iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:1000])
    rc = infer.main(["--checkpoint", str(checkpoint["ckpt"]), "--input", str(pngs), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").split("\n")
    assert rc == 2 and f"error: depth frame {bad}" in err
    error_at = next(i for i, l in enumerate(lines) if l.startswith("error: "))
    assert error_at == 0 or lines[error_at - 1].strip(), repr(err)
    assert not err.startswith("\n") and "\n\n" not in err


def test_user_error_before_any_work_is_the_only_stderr_line(tmp_path, capsys):
    rc = infer.main(["--checkpoint", str(tmp_path / "nope"), "--input", str(tmp_path), "--output", str(tmp_path)])
    assert rc == 2 and capsys.readouterr().err == f"error: --checkpoint {tmp_path / 'nope'}: folder not found\n"
