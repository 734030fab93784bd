"""Datasets, collate, synthetic scenes, determinism across workers, and the preprocessed cache."""
import json
import multiprocessing as mp
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protodepth.data import DataConfig, build_datasets, collate_depth
from protodepth.data.cache import build_cache, open_cache
from protodepth.data.dataset import split_indices
from protodepth.data.synthetic import META_NAME, ensure_synthetic, render_scene, scene_layout
from protodepth.data.synthia import ENCODING_STEP, BadFrameError, list_frames, read_depth_png
from protodepth.errors import DataSetupError


def small_cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), synthetic_num_scenes=8, synthetic_sequences=2, synthetic_height=48,
                synthetic_width=64, height=24, width=32, num_bins=3, points_per_bin=150, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def test_collate_pads_and_reports_lengths():
    samples = [{"image": torch.full((3, 4, 5), float(i)),
                "cloud": torch.arange(n * 3, dtype=torch.float32).view(n, 3) + 1, "path": f"p{i}"}
               for i, n in enumerate([2, 5, 1])]
    b = collate_depth(samples)
    assert b["image"].shape == (3, 3, 4, 5) and b["cloud"].shape == (3, 5, 3)
    assert b["lengths"].tolist() == [2, 5, 1] and b["lengths"].dtype == torch.int64
    assert b["paths"] == ["p0", "p1", "p2"]
    for i, s in enumerate(samples):
        n = s["cloud"].shape[0]
        assert torch.equal(b["cloud"][i, :n], s["cloud"]) and (b["cloud"][i, n:] == 0).all()
    with pytest.raises(ValueError, match="empty"):
        collate_depth([])


def test_synthetic_read_back_through_reader(tmp_path):
    cfg = small_cfg(tmp_path / "syn")
    root = ensure_synthetic(cfg, progress=False)
    frames = list_frames(root)
    assert len(frames) == 8 and sorted({f.sequence for f in frames}) == ["SEQ1", "SEQ2"]
    layout = scene_layout(8, 2)
    assert [f.rel for f in frames] == [f"{s}/DepthLeft/{n}" for s, n in layout]
    for i in (0, 5):
        want = render_scene(np.random.default_rng([cfg.synthetic_seed, i]), 48, 64, cfg.focal_for(64))
        got = read_depth_png(frames[i].path)
        hit = want < 1000
        assert hit.mean() > 0.3 and (~hit).mean() > 0.05  # ground and objects, and open sky
        assert np.abs(got[hit] - want[hit]).max() <= ENCODING_STEP / 2 + 1e-9
        assert (got[~hit] == 1000.0).all()
        z = -want[hit]
        assert z.max() < -1.0 and z.min() > -100.0
    # sky sits above the horizon: the top row is mostly sky, the bottom row is all ground
    top = read_depth_png(frames[0].path)
    assert (top[0] >= 1000).mean() > 0.5 and (top[-1] < 1000).all()
    # reused when the settings match, regenerated when they change
    meta = json.loads((tmp_path / "syn" / META_NAME).read_text())
    stamp = os.path.getmtime(frames[0].path)
    ensure_synthetic(cfg, progress=False)
    assert os.path.getmtime(frames[0].path) == stamp
    cfg2 = small_cfg(tmp_path / "syn", synthetic_seed=1)
    ensure_synthetic(cfg2, progress=False)
    assert json.loads((tmp_path / "syn" / META_NAME).read_text())["seed"] == 1 != meta["seed"]
    assert not np.array_equal(read_depth_png(frames[0].path), top)


def test_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a protodepth synthetic folder"):
        ensure_synthetic(small_cfg(tmp_path), progress=False)
    assert (tmp_path / "mine.txt").exists()


def _ensure(root):
    ensure_synthetic(small_cfg(root), progress=False)
    return sorted(os.listdir(os.path.join(root, "SEQ1", "DepthLeft")))


def test_concurrent_generation_is_safe(tmp_path):
    root = str(tmp_path / "syn")
    with mp.get_context("fork").Pool(2) as pool:
        a, b = pool.map(_ensure, [root, root])
    assert a == b and len(a) == 4
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_split_by_sequence_and_fraction():
    seqs = ["A"] * 10 + ["B"] * 5 + ["C"] * 1
    train, val = split_indices(seqs, DataConfig(val_fraction=0.2))
    assert val == [8, 9, 14]  # the tail of each sequence; C's single frame stays in training
    assert sorted(train + val) == list(range(16))
    train, val = split_indices(seqs, DataConfig(val_sequences=["B"]))
    assert val == list(range(10, 15)) and len(train) == 11
    with pytest.raises(ValueError, match="data.val_sequences"):
        split_indices(seqs, DataConfig(val_sequences=["Z"]))
    assert split_indices(seqs, DataConfig(val_fraction=0.0))[1] == []


def _batches(ds, workers, epoch):
    ds.set_epoch(epoch)
    dl = DataLoader(ds, batch_size=3, shuffle=False, num_workers=workers, collate_fn=collate_depth)
    return list(dl)


def test_same_seed_same_batch_with_0_and_2_workers(tmp_path):
    cfg = small_cfg(tmp_path / "syn", val_fraction=0.25)
    train, val = build_datasets(cfg, seed=7, progress=False)
    assert len(train) == 6 and len(val) == 2
    b0 = _batches(train, 0, epoch=3)
    b2 = _batches(train, 2, epoch=3)
    assert len(b0) == len(b2) == 2
    for x, y in zip(b0, b2):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["cloud"], y["cloud"])
        assert torch.equal(x["lengths"], y["lengths"]) and x["paths"] == y["paths"]
    assert b0[0]["image"].shape == (3, 3, 24, 32) and b0[0]["lengths"].max() <= 3 * 150
    # another epoch redraws the points, another seed too; validation stays fixed
    other = _batches(train, 0, epoch=4)
    assert not torch.equal(other[0]["cloud"], b0[0]["cloud"])
    train2, _ = build_datasets(cfg, seed=8, progress=False)
    train2.set_epoch(3)
    assert not torch.equal(train2[0]["cloud"], train[0]["cloud"])
    v0 = val[0]["cloud"]
    val.set_epoch(5)
    assert torch.equal(val[0]["cloud"], v0)


@pytest.mark.parametrize("pool", [0, 200])
def test_cache_and_png_paths_agree(tmp_path, pool):
    cfg = small_cfg(tmp_path / "syn", pool_per_bin=pool, val_fraction=0.25)
    png_train, png_val = build_datasets(cfg, seed=3, progress=False)
    cfg_c = small_cfg(tmp_path / "syn", pool_per_bin=pool, val_fraction=0.25, format="cache",
                      cache_dir=str(tmp_path / "cache"))
    c_train, c_val = build_datasets(cfg_c, seed=3, progress=False)
    assert len(c_train) == len(png_train) and len(c_val) == len(png_val)
    for epoch in (0, 2):
        png_train.set_epoch(epoch)
        c_train.set_epoch(epoch)
        for i in range(len(png_train)):
            a, b = png_train[i], c_train[i]
            assert a["path"] == b["path"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["cloud"], b["cloud"])
    # float16 storage: same clouds, images within float16 rounding of [0, 1] values
    cfg_h = small_cfg(tmp_path / "syn", pool_per_bin=pool, format="cache", cache_dtype="float16",
                      cache_dir=str(tmp_path / "cache16"))
    h_train, _ = build_datasets(cfg_h, seed=3, progress=False)
    png_train.set_epoch(0)
    assert torch.equal(h_train[1]["cloud"], png_train[1]["cloud"])
    assert (h_train[1]["image"] - png_train[1]["image"]).abs().max() <= 5e-4


def test_cache_config_mismatch_and_missing(tmp_path):
    syn = small_cfg(tmp_path / "syn")
    root = ensure_synthetic(syn, progress=False)
    cache_dir = str(tmp_path / "cache")
    build_cache(small_cfg(root, source="synthia"), root, cache_dir, progress=False)
    # the synthia source never rebuilds a cache by itself: a different setting is an error naming field and file
    bad = small_cfg(root, source="synthia", format="cache", cache_dir=cache_dir, height=32)
    with pytest.raises(ValueError, match=r"data\.height.*manifest\.json"):
        build_datasets(bad, seed=0)
    bad = small_cfg(root, source="synthia", format="cache", cache_dir=cache_dir, num_bins=4)
    with pytest.raises(ValueError, match=r"data\.num_bins"):
        build_datasets(bad, seed=0)
    missing = small_cfg(root, source="synthia", format="cache", cache_dir=str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        build_datasets(missing, seed=0)
    # a damaged cache (cut short) is refused too
    with open(os.path.join(cache_dir, "points.npy"), "r+b") as f:
        f.truncate(200)
    with pytest.raises(DataSetupError, match=r"points\.npy: unreadable"):
        open_cache(small_cfg(root, source="synthia", format="cache", cache_dir=cache_dir), root)


def test_render_window_is_conservative(monkeypatch):
    """Ray-casting each object only inside its bounding ball's image window changes no pixel."""
    import protodepth.data.synthetic as syn
    fast = [syn.render_scene(np.random.default_rng([0, i]), 60, 80, 35.3) for i in range(6)]
    monkeypatch.setattr(syn, "_pixel_window", lambda c, r, h, w, f: (slice(0, h), slice(0, w)))
    for i, got in enumerate(fast):
        want = syn.render_scene(np.random.default_rng([0, i]), 60, 80, 35.3)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_single_channel_images(tmp_path):
    cfg3 = small_cfg(tmp_path / "syn")
    cfg1 = small_cfg(tmp_path / "syn", image_channels=1)
    a, b = build_datasets(cfg3, seed=0, progress=False)[0][0], build_datasets(cfg1, seed=0, progress=False)[0][0]
    assert a["image"].shape == (3, 24, 32) and b["image"].shape == (1, 24, 32)
    assert torch.equal(a["image"], b["image"].expand(3, -1, -1)) and torch.equal(a["cloud"], b["cloud"])


def test_cache_build_skips_or_names_bad_frames(tmp_path):
    root = ensure_synthetic(small_cfg(tmp_path / "syn"), progress=False)
    bad = os.path.join(root, "SEQ2", "DepthLeft", "000001.png")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    cfg = small_cfg(root, source="synthia")
    with pytest.raises(BadFrameError, match="000001.png"):
        build_cache(cfg, root, str(tmp_path / "c1"), progress=False)
    assert not os.path.exists(tmp_path / "c1")  # nothing half-written is left behind
    cfg = small_cfg(root, source="synthia", skip_bad_frames=True)
    with pytest.warns(RuntimeWarning, match="left 1 of 8"):
        m = build_cache(cfg, root, str(tmp_path / "c2"), progress=False)
    assert m["skipped"] == ["SEQ2/DepthLeft/000001.png"] and len(m["frames"]) == 7


def test_persistent_workers_follow_set_epoch(tmp_path):
    """The trainer keeps its workers across epochs; set_epoch between epochs must still reach them."""
    cfg = small_cfg(tmp_path / "syn", val_fraction=0.25)
    train, _ = build_datasets(cfg, seed=7, progress=False)
    dl = DataLoader(train, batch_size=3, shuffle=False, num_workers=2, collate_fn=collate_depth,
                    persistent_workers=True)
    seen = []
    for epoch in (0, 1, 0):
        train.set_epoch(epoch)
        seen.append(list(dl))
    ref = [_batches(train, 0, epoch=e) for e in (0, 1)]
    for got, want in zip(seen, [ref[0], ref[1], ref[0]]):
        for x, y in zip(got, want):
            assert torch.equal(x["cloud"], y["cloud"])
    assert not torch.equal(seen[0][0]["cloud"], seen[1][0]["cloud"])  # the draw did change with the epoch


def test_cache_is_npy_files_and_an_old_version_is_named_or_rebuilt(tmp_path):
    syn = small_cfg(tmp_path / "syn")
    root = ensure_synthetic(syn, progress=False)
    cache_dir = str(tmp_path / "cache")
    m = build_cache(small_cfg(root, source="synthia"), root, cache_dir, progress=False)
    images = np.load(os.path.join(cache_dir, "images.npy"))
    points = np.load(os.path.join(cache_dir, "points.npy"))
    offsets = np.load(os.path.join(cache_dir, "offsets.npy"))
    assert images.shape == (8, 24, 32) and images.dtype == np.float32
    assert points.shape == (m["num_points"], 3) and offsets[-1, -1] == m["num_points"]
    # a cache of the previous format (version 2: raw .bin files) is named with one line for SYNTHIA...
    man = os.path.join(cache_dir, "manifest.json")
    old = json.loads(open(man).read())
    old["version"] = 2
    open(man, "w").write(json.dumps(old))
    with pytest.raises(DataSetupError, match=r"cache version 2, this protodepth reads version 3; rebuild it"):
        open_cache(small_cfg(root, source="synthia", format="cache", cache_dir=cache_dir), root)
    # ...and rebuilt by itself for the synthetic source
    cfg = small_cfg(tmp_path / "syn", format="cache", cache_dir=cache_dir)
    cache = open_cache(cfg, root)
    assert cache.manifest["version"] == 3 and cache.maps()["points"].shape == points.shape
