"""scripts/infer.py: a checkpoint written by the trainer + depth PNGs -> meshes, pictures, metrics; clear errors."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from trainer_utils import load_script, python, run_script, tiny_config
from protodepth.errors import InferError


infer = load_script("infer")


def error_lines(stderr: str) -> list[str]:
    """The error lines of stderr (the progress bar shares it); every other line must be the bar."""
    lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip()]
    assert all(l.startswith(("error: ", "infer:")) for l in lines), stderr
    return [l for l in lines if l.startswith("error: ")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint laid out as the trainer writes it (Accelerate's save_state: model.safetensors holding the
    ProtoDepth state_dict; plus config.yaml, sealed by protodepth.checkpoint.commit), for a tiny model, and the
    synthetic scenes of its config. Saved directly: a real 1-step training run costs ~20 s of CPU here."""
    import torch
    from safetensors.torch import save_file

    from protodepth import checkpoint as ckpt
    from protodepth.data import build_datasets
    from protodepth.model import ProtoDepth

    tmp = tmp_path_factory.mktemp("infer")
    cfg = tiny_config(tmp, **{"model.num_slots": 3, "data.synthetic_num_scenes": 6})
    build_datasets(cfg.data, seed=0, progress=False)  # generates the scenes
    torch.manual_seed(0)
    model = ProtoDepth(cfg.model)
    with torch.no_grad():
        model.offsets.normal_(0, 0.05)  # trained prototypes are not spheres: the checkpoint must carry them
    root = Path(cfg.train.output_dir) / "checkpoints"
    folder = ckpt.temp_dir(root, 7)
    folder.mkdir(parents=True)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    cfg.save(folder / "config.yaml")
    cfg.save(Path(cfg.train.output_dir) / "config.yaml")  # as train.py: the run folder has one too
    final = ckpt.commit(root, 7, limit=3)
    return {"ckpt": final, "run": Path(cfg.train.output_dir), "data": Path(cfg.data.root), "cfg": cfg,
            "offsets": model.offsets.detach().clone()}


def test_infer_writes_meshes_pictures_and_metrics(trained, tmp_path):
    out = tmp_path / "out"
    frames = sorted(trained["data"].glob("*/DepthLeft/*.png"))
    rc = infer.main(["--checkpoint", str(trained["ckpt"]), "--input", str(trained["data"]), "--output", str(out),
                     "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["count"] == len(frames) == 6  # SYNTHIA layout: every SEQ*/DepthLeft/*.png, across batches
    names = [r["name"] for r in metrics["images"]]
    assert names[0] == "SEQ1_DepthLeft_000000" and len(set(names)) == len(names)
    for r in metrics["images"]:
        assert r["chamfer"] == pytest.approx(r["pred_to_target"] + r["target_to_pred"])
        assert np.isfinite(r["chamfer"]) and r["chamfer"] > 0
    assert metrics["mean"]["chamfer"] == pytest.approx(np.mean([r["chamfer"] for r in metrics["images"]]))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 7 and rows[-1]["name"] == "mean"
    assert float(rows[-1]["chamfer"]) == pytest.approx(metrics["mean"]["chamfer"])
    K = trained["cfg"].model.num_slots
    mesh = trimesh.load(out / "scenes" / f"{names[3]}.ply", process=False)
    assert mesh.vertices.shape == (K * 42, 3) and mesh.faces.shape == (K * 80, 3)  # ico level 1 per slot
    assert np.isfinite(mesh.vertices).all()
    pic = np.asarray(Image.open(out / "pictures" / f"{names[3]}.png").convert("RGB"))
    assert pic.shape[1] >= 960 and pic.astype(float).var() > 500

    # one image alone gives the same scene as inside a batch (eval-mode model), and the same target draw
    out1 = tmp_path / "single"
    assert infer.main(["--checkpoint", str(trained["run"]), "--input", str(frames[3]), "--output", str(out1),
                       "--no-pictures", "--device", "cpu"]) == 0  # a run folder resolves to its newest checkpoint
    one = json.loads((out1 / "metrics.json").read_text())["images"][0]
    assert one["name"] == frames[3].stem and one["target_points"] == metrics["images"][3]["target_points"]
    # the point sampling is seeded per image, so its numbers do not depend on the batch it came in (up to the
    # forward pass's float noise, which can move a sample to a neighbouring face: hence not 1e-5)
    for k in ("val_chamfer", "val_total", "chamfer"):
        assert one[k] == pytest.approx(metrics["images"][3][k], rel=2e-2), k
    np.testing.assert_allclose(trimesh.load(out1 / "scenes" / f"{frames[3].stem}.ply", process=False).vertices,
                               mesh.vertices, rtol=1e-4, atol=1e-3)
    assert not (out1 / "pictures").exists()


def test_validation_numbers_equal_the_loss_code_on_the_same_image(trained, tmp_path):
    """metrics.json's val_* are what the trainer's validation computes (proto_depth_loss, loss.samples_per_slot
    points per slot, the validation split's target draw), on the image alone with sampling seeded by --seed."""
    import torch

    from protodepth.data import build_datasets
    from protodepth.inference import FrameDataset, list_inputs
    from protodepth.loss import proto_depth_loss

    cfg = trained["cfg"]
    _, val_ds = build_datasets(cfg.data, seed=cfg.train.seed, progress=False)
    val = val_ds[0]  # a validation frame, drawn as the trainer's validation draws it
    out = tmp_path / "out"
    assert infer.main(["--checkpoint", str(trained["ckpt"]), "--input", val["path"], "--output", str(out),
                       "--no-pictures", "--device", "cpu", "--seed", str(cfg.train.seed)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    row = metrics["images"][0]
    sample = FrameDataset(list_inputs(Path(val["path"])), cfg.data, cfg.train.seed)[0]
    assert torch.equal(sample["cloud"], val["cloud"]) and row["target_points"] == len(val["cloud"])
    model, _ = infer.load_model(trained["ckpt"], torch.device("cpu"))
    with torch.no_grad():
        scene = model(val["image"][None])
        res = proto_depth_loss(scene.slot_verts, scene.prototypes, model.faces, val["cloud"][None],
                               torch.tensor([len(val["cloud"])]), cfg.loss,
                               generator=torch.Generator().manual_seed(cfg.train.seed))
    for key, term in [("val_chamfer", "chamfer"), ("val_global", "global"), ("val_slot", "slot"),
                      ("val_repulsion", "repulsion")]:
        assert row[key] == pytest.approx(float(res.terms[term]), rel=1e-5), key
    assert row["val_total"] == pytest.approx(float(res.total), rel=1e-5)
    assert row["pred_to_target"] == pytest.approx(row["val_slot"], rel=1e-5)  # the same points, the same measure
    assert metrics["samples_per_slot"] == cfg.loss.samples_per_slot
    assert set(metrics["definitions"]) == set(metrics["mean"])


def test_corrupt_png_is_named_or_skipped(trained, tmp_path, capsys):
    src = sorted(trained["data"].glob("*/DepthLeft/*.png"))[:3]
    folder = tmp_path / "pngs"
    folder.mkdir()
    for p in src:
        shutil.copy(p, folder / p.name)
    data = (folder / src[1].name).read_bytes()
    (folder / src[1].name).write_bytes(data[: len(data) // 2])  # valid header, truncated pixel data
    rc = infer.main(["--checkpoint", str(trained["ckpt"]), "--input", str(folder), "--output", str(tmp_path / "o")])
    err = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and src[1].name in err[0] and "--skip-bad" in err[0]
    with pytest.warns(RuntimeWarning, match=src[1].name):
        rc = infer.main(["--checkpoint", str(trained["ckpt"]), "--input", str(folder), "--output",
                         str(tmp_path / "o2"), "--skip-bad", "--batch-size", "3"])
    assert rc == 0
    m = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert m["count"] == 2 and len(m["skipped"]) == 1 and src[1].name in m["skipped"][0]
    (folder / src[0].name).write_bytes(b"not a png at all")  # a bad header is found before any work
    rc = infer.main(["--checkpoint", str(trained["ckpt"]), "--input", str(folder), "--output", str(tmp_path / "o3")])
    assert rc == 2 and src[0].name in capsys.readouterr().err


def test_missing_checkpoint_and_empty_folder_are_one_line_errors(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--input", str(trained["data"])], "nope: folder not found"),
        (["--checkpoint", str(empty), "--input", str(trained["data"])], "no config.yaml"),
        (["--checkpoint", str(trained["ckpt"]), "--input", str(empty)], "no depth PNG found"),
    ]
    for args, msg in cases:
        assert infer.main([*args, "--output", str(tmp_path / "o")]) == 2
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and msg in err[0], err
    broken = tmp_path / "broken"
    shutil.copytree(trained["ckpt"], broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    assert infer.main(["--checkpoint", str(broken), "--input", str(trained["data"]), "--output", str(tmp_path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_cli_exit_code(tmp_path):
    r = run_script([python(), "scripts/infer.py", "--checkpoint", str(tmp_path / "missing"), "--input", str(tmp_path),
                    "--output", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 2 and "error: --checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_load_model_restores_the_saved_weights(trained, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model, cfg = infer.load_model(trained["ckpt"], torch.device("cpu"))
    assert not model.training and cfg.model.num_slots == 3
    assert torch.equal(model.offsets, trained["offsets"])
    # DDP / torch.compile name prefixes are dropped
    other = tmp_path / "prefixed"
    shutil.copytree(trained["ckpt"], other)
    state = load_file(str(other / "model.safetensors"))
    save_file({f"module._orig_mod.{k}": v for k, v in state.items()}, str(other / "model.safetensors"))
    model2, _ = infer.load_model(other, torch.device("cpu"))
    assert torch.equal(model2.offsets, trained["offsets"])
    # a checkpoint of another model size is refused, naming the mismatch
    del state["offsets"]
    save_file(state, str(other / "model.safetensors"))
    with pytest.raises(InferError, match="missing.*offsets"):
        infer.load_model(other, torch.device("cpu"))
