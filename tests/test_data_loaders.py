"""The device data path against the DataLoader path, the per-epoch point draw, and the loading choices."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from protodepth.data import DataConfig, build_datasets, collate_depth
from protodepth.data import loaders
from protodepth.data.draw import DrawSeed, draw_batch, draw_batch_sorted, draw_indices, ranges
from protodepth.data.loaders import (DeviceBatches, EpochShuffleSampler, choose_data_device, rank_batches,
                                     workers_per_process)
from protodepth.errors import ConfigError


def small_cfg(root, **kw) -> DataConfig:
    base = dict(root=str(root), synthetic_num_scenes=11, synthetic_sequences=2, synthetic_height=48,
                synthetic_width=64, height=24, width=32, num_bins=3, points_per_bin=150, num_workers=0,
                val_fraction=0.2)
    base.update(kw)
    return DataConfig(**base)


# ----------------------------------------------------------------------------------------------- the draw

def test_draw_keeps_small_bins_and_picks_cap_distinct_ascending_points_of_big_ones():
    counts = np.array([5, 1, 0, 12, 300])
    idx = draw_indices(counts, 4, DrawSeed(3, 0, 11))
    starts = np.cumsum(counts) - counts
    parts = [idx[(idx >= s) & (idx < s + n)] for s, n in zip(starts, counts)]
    assert [len(p) for p in parts] == [4, 1, 0, 4, 4] and len(idx) == 13
    for p in parts:
        assert (np.diff(p) > 0).all()  # distinct and ascending
    assert (np.diff(idx) > 0).all()


def test_draw_changes_with_epoch_seed_and_frame_and_is_uniform():
    counts = np.array([40])
    draws = {(s, e, k): tuple(draw_indices(counts, 8, DrawSeed(s, e, k)))
             for s in (0, 1) for e in (0, 1) for k in (5, 6)}
    assert len(set(draws.values())) == len(draws)
    hits = np.zeros(40)
    for e in range(2000):
        hits[draw_indices(counts, 8, DrawSeed(0, e, 5))] += 1
    # each point is kept with probability 8/40: 400 of 2000 epochs, binomial sd ~18
    assert abs(hits.mean() - 400) < 1e-9 and hits.min() > 330 and hits.max() < 470


def test_batched_draw_equals_frame_by_frame_draw():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 60, size=(6, 4))
    seeds = [DrawSeed(7, 3, int(k)) for k in rng.integers(0, 2**32, size=6)]
    idx, lengths = draw_batch_sorted(counts, np.array([s.salts() for s in seeds]), 20, "cpu")
    assert torch.equal(idx, draw_batch(counts, np.array([s.salts() for s in seeds]), 20, "cpu")[0])
    pieces = np.split(idx.numpy(), np.cumsum(lengths)[:-1])
    for c, s, piece in zip(counts, seeds, pieces):
        assert np.array_equal(piece, draw_indices(c, 20, s))


def test_ranges_concatenates_aranges_and_names_each_values_segment_with_empty_segments_anywhere():
    starts, lens = np.array([7, 100, 3, 50, 0, 9]), np.array([0, 3, 0, 2, 4, 0])
    values, seg = ranges(starts, lens, "cpu")
    want = [v for s, n in zip(starts, lens) for v in range(s, s + n)]
    assert values.tolist() == want
    assert seg.tolist() == [k for k, n in enumerate(lens) for _ in range(n)]
    assert ranges(starts, np.zeros(6, dtype=np.int64), "cpu")[0].numel() == 0


# ---------------------------------------------------------------------------------- device path vs DataLoader

def loader_batches(ds, batch_size, seed, epoch, rank, world, start=0, train=True):
    """What the trainer's DataLoader path yields on `rank`: Accelerate's sharded loader, as LoaderBatches runs it."""
    from accelerate import skip_first_batches
    from accelerate.data_loader import prepare_data_loader
    dl = DataLoader(ds, sampler=EpochShuffleSampler(len(ds), seed, shuffle=train), batch_size=batch_size,
                    drop_last=train, collate_fn=collate_depth, num_workers=0)
    dl = prepare_data_loader(dl, num_processes=world, process_index=rank, put_on_device=False)
    dl.set_epoch(epoch)
    ds.set_epoch(epoch)
    return list(skip_first_batches(dl, start) if start else dl)


def assert_same_batches(got, want):
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert a["paths"] == b["paths"]
        assert torch.equal(a["lengths"], b["lengths"]) and a["lengths"].dtype == torch.int64
        assert a["image"].dtype == torch.float32 and torch.equal(a["image"], b["image"])
        assert a["cloud"].dtype == torch.float32 and torch.equal(a["cloud"], b["cloud"])


@pytest.mark.parametrize("fmt", ["cache", "png"])
@pytest.mark.parametrize("world", [1, 2])
def test_device_path_yields_the_dataloader_paths_batches(tmp_path, fmt, world):
    cfg = small_cfg(tmp_path / "syn", format=fmt, cache_dir=str(tmp_path / "cache"), pool_per_bin=400 if fmt == "png"
                    else 0)
    train, val = build_datasets(cfg, seed=5, progress=False)
    for rank in range(world):
        dev = DeviceBatches(train, 2, seed=9, rank=rank, world=world, device="cpu")
        assert dev.batches_per_epoch == len(train) // 2 // world
        for epoch in (0, 3):
            assert_same_batches(list(dev.epoch(epoch)), loader_batches(train, 2, 9, epoch, rank, world))
        assert_same_batches(list(dev.epoch(3, start=1)), loader_batches(train, 2, 9, 3, rank, world, start=1))
        # validation: index order, no drop_last (Accelerate pads the last round from the start), draw frozen at 0
        vdev = DeviceBatches(val, 2, seed=9, rank=rank, world=world, device="cpu", drop_last=False, shuffle=False)
        assert_same_batches(list(vdev.epoch(4)), loader_batches(val, 2, 9, 4, rank, world, train=False))
    other = list(DeviceBatches(train, 2, 9, 0, 1, "cpu").epoch(1))[0]["cloud"]
    assert not torch.equal(other, list(DeviceBatches(train, 2, 9, 0, 1, "cpu").epoch(0))[0]["cloud"])


def test_device_path_single_channel_and_float16_cache(tmp_path):
    cfg = small_cfg(tmp_path / "syn", format="cache", cache_dir=str(tmp_path / "c16"), cache_dtype="float16",
                    image_channels=1)
    train, _ = build_datasets(cfg, seed=0, progress=False)
    got = list(DeviceBatches(train, 3, 1, 0, 1, "cpu").epoch(2))
    assert got[0]["image"].shape == (3, 1, 24, 32)
    assert_same_batches(got, loader_batches(train, 3, 1, 2, 0, 1))


def test_device_path_replaces_a_bad_frame_like_the_dataloader_path(tmp_path):
    from protodepth.data.synthetic import ensure_synthetic
    from protodepth.data.synthia import write_depth_png
    root = ensure_synthetic(small_cfg(tmp_path / "syn"), progress=False)
    write_depth_png(f"{root}/SEQ1/DepthLeft/000001.png", np.full((48, 64), 5000.0))  # all sky: bad when loaded
    cfg = small_cfg(root, source="synthia", skip_bad_frames=True, val_fraction=0.0)
    train, _ = build_datasets(cfg, seed=0, progress=False)
    with pytest.warns(RuntimeWarning):
        want = loader_batches(train, 1, 2, 0, 0, 1, train=False)
    got = list(DeviceBatches(train, 1, 2, 0, 1, "cpu", drop_last=False, shuffle=False).epoch(0))
    assert_same_batches(got, want)
    assert got[1]["paths"][0].endswith("SEQ1/DepthLeft/000002.png")


def test_rank_batches_follow_accelerates_sharding_rule():
    # 23 samples, batch 4: 5 full batches; on 2 ranks the 5th (an incomplete round) is dropped
    b0, b1 = (rank_batches(23, 4, 5, 3, r, 2) for r in (0, 1))
    s = EpochShuffleSampler(23, 5)
    s.set_epoch(3)
    perm = list(s)
    assert b0 == [perm[0:4], perm[8:12]] and b1 == [perm[4:8], perm[12:16]]
    assert rank_batches(23, 4, 5, 3, 0, 1) == [perm[i:i + 4] for i in range(0, 20, 4)]


# ----------------------------------------------------------------------------------------------- choices

def test_choose_data_device_on_cpu_and_forced_cuda_without_gpu(tmp_path):
    cfg = small_cfg(tmp_path / "syn", format="cache", cache_dir=str(tmp_path / "c"))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    choice = choose_data_device(cfg, train, torch.device("cpu"))
    assert choice == "cpu" and "DataLoader workers" in choice.reason
    with pytest.raises(ConfigError, match="data.device: got 'cuda' but training runs on cpu"):
        choose_data_device(small_cfg(tmp_path / "syn", device="cuda"), train, "cpu")


@pytest.mark.parametrize("fmt, source, free, want", [
    ("cache", "synthetic", 10 << 30, "cuda"), ("cache", "synthetic", 100_000, "cpu"),
    ("png", "synthetic", 10 << 30, "cuda"), ("png", "synthia", 10 << 30, "cpu"),
])
def test_auto_moves_a_cache_or_synthetic_scenes_that_fit_a_quarter_of_free_gpu_memory(tmp_path, monkeypatch, fmt,
                                                                                        source, free, want):
    cfg = small_cfg(tmp_path / "syn", format=fmt, cache_dir=str(tmp_path / "c"))
    train, _ = build_datasets(cfg, seed=0, progress=False)
    if source == "synthia":
        cfg = small_cfg(tmp_path / "syn", source="synthia")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    need = loaders.estimate_bytes(cfg, train)
    assert 0 < need
    choice = choose_data_device(cfg, train, torch.device("cuda"))
    assert choice == want and choice.reason.startswith("data.device=auto")
    if fmt == "cache" and want == "cpu":
        assert "more than a quarter" in choice.reason


@pytest.mark.parametrize("cores, procs, want", [(16, 1, 8), (16, 2, 7), (16, 4, 3), (2, 1, 1), (4, 8, 1), (64, 2, 8)])
def test_auto_workers_come_from_the_cores_per_process(monkeypatch, cores, procs, want):
    monkeypatch.setattr(loaders, "usable_cpus", lambda: cores)
    assert workers_per_process(DataConfig(num_workers="auto"), procs) == want
    assert workers_per_process(DataConfig(num_workers=5), procs) == 5


def test_host_draw_equals_batched_torch_draw_over_many_shapes():
    rng = np.random.default_rng(1)
    for trial in range(100):
        counts = rng.integers(0, 3000, size=(1, 4))
        cap = int(rng.integers(1, 500))
        seed = DrawSeed(int(rng.integers(0, 2**32)), trial, int(rng.integers(0, 2**32)))
        idx, _ = draw_batch_sorted(counts, np.array([seed.salts()]), cap, "cpu")
        assert np.array_equal(draw_indices(counts[0], cap, seed), idx.numpy()), trial


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_path_on_the_gpu_yields_the_dataloader_paths_batches(tmp_path):
    cfg = small_cfg(tmp_path / "syn", format="cache", cache_dir=str(tmp_path / "cache"))
    train, _ = build_datasets(cfg, seed=5, progress=False)
    for rank in range(2):
        got = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in b.items()}
               for b in DeviceBatches(train, 2, 9, rank, 2, "cuda").epoch(3)]
        assert_same_batches(got, loader_batches(train, 2, 9, 3, rank, 2))
    counts = np.random.default_rng(0).integers(0, 50_000, size=(32, 5))
    salts = np.array([DrawSeed(1, 2, k).salts() for k in range(32)])
    assert torch.equal(draw_batch(counts, salts, 4000, "cuda")[0].cpu(), draw_batch(counts, salts, 4000, "cpu")[0])
    assert torch.equal(draw_batch_sorted(counts, salts, 4000, "cpu")[0], draw_batch(counts, salts, 4000, "cpu")[0])
