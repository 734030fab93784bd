"""scripts/prepare_data.py and `benchmark.py data`, run in-process on tiny inputs."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from protodepth.data import DataConfig, build_datasets
from protodepth.data.synthia import write_depth_png

REPO = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_data_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for seq in ("SEQ1", "SEQ2"):
        d = tmp_path / "root" / seq / "DepthLeft"
        d.mkdir(parents=True)
        for i in range(3):
            depth = rng.uniform(2.0, 80.0, size=(30, 40))
            depth[:8] = 1000.0
            write_depth_png(d / f"{i:06d}.png", depth)
    prep = _script("prepare_data")
    over = ["data.height=16", "data.width=20", "data.points_per_bin=50", "data.val_sequences=[SEQ2]"]
    rc = prep.main(["--root", str(tmp_path / "root"), "--cache-dir", str(tmp_path / "cache"), "--workers", "0",
                    "--quiet", *over])
    out = capsys.readouterr().out
    assert rc == 0 and "wrote 6 frames" in out and "data.format=cache" in out
    m = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert m["config"]["height"] == 16 and len(m["frames"]) == 6
    kw = dict(source="synthia", root=str(tmp_path / "root"), height=16, width=20, points_per_bin=50,
              val_sequences=["SEQ2"])
    png, _ = build_datasets(DataConfig(**kw), seed=1)
    cache, val = build_datasets(DataConfig(**kw, format="cache", cache_dir=str(tmp_path / "cache")), seed=1)
    assert len(cache) == 3 and len(val) == 3
    assert torch.equal(png[2]["cloud"], cache[2]["cloud"])
    # a user error is one line on stderr and exit status 2
    rc = prep.main(["--root", str(tmp_path / "missing"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing" in err and "Traceback" not in err


def test_benchmark_data_runs(tmp_path, capsys):
    from protodepth.benchmarks import data as bench
    rc = bench.main(["--frames", "2", "--frame-size", "48x64", "--input", "24x32", "--workers", "0",
                     "--seconds", "0.1", "--repeats", "1", "--batch-size", "2", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [l for l in out.splitlines() if l.startswith("| png") or l.startswith("| cache")]
    assert len(rows) == 2 and all(float(r.split("|")[3].replace(",", "")) > 0 for r in rows)
