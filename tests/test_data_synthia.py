"""SYNTHIA depth encoding, back-projection, Z bins, network input, and the errors for bad frames/folders."""
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from protodepth.data import DataConfig, build_datasets
from protodepth.errors import ConfigError, DataSetupError
from protodepth.data.synthia import (CODE_MAX, ENCODING_STEP, BadFrameError, backproject, decode_depth_rgb,
                                     draw_indices, encode_depth_rgb, list_frames, network_input, process_depth,
                                     read_depth_png, sample_rng, write_depth_png, z_bins)


def test_encode_decode_exact_to_resolution(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.0, 999.0, size=(37, 53))
    depth[0, :5] = [0.0, ENCODING_STEP, 1.0, 300.0, 999.99]
    depth[1, :3] = [1000.0, 5000.0, np.inf]  # sky
    path = tmp_path / "d.png"
    write_depth_png(path, depth)
    back = read_depth_png(path)
    assert back.shape == depth.shape and back.dtype == np.float64
    finite = depth < 1000
    # rounding to the nearest code: error at most half a step (plus float64 noise)
    assert np.abs(back[finite] - depth[finite]).max() <= ENCODING_STEP / 2 + 1e-9
    assert (back[~finite] == 1000.0).all()
    # decoding is exact on codes: re-encoding the decoded depth gives the same bytes
    assert np.array_equal(encode_depth_rgb(back), np.asarray(Image.open(path)))
    # the byte layout is the documented one: R low byte, B high byte
    px = np.array([[[0x12, 0x34, 0x56]]], dtype=np.uint8)
    assert decode_depth_rgb(px)[0, 0] == pytest.approx((0x12 + 256 * 0x34 + 65536 * 0x56) / CODE_MAX * 1000, abs=1e-12)


def test_backproject_matches_formula_by_hand():
    h, w, f = 4, 6, 2.5
    depth = np.full((h, w), 1000.0)
    depth[0, 0] = 10.0  # u=0, v=0
    depth[3, 5] = 2.0  # u=5, v=3
    depth[2, 3] = 7.0  # the principal point (W/2, H/2)
    pts, idx = backproject(depth, f, max_depth=1000.0)
    assert idx.tolist() == [0, 2 * w + 3, 3 * w + 5]  # raster order, sky dropped
    expect = np.array([
        [(0 - 3) / f * 10, -(0 - 2) / f * 10, -10],
        [0.0, 0.0, -7.0],
        [(5 - 3) / f * 2, -(3 - 2) / f * 2, -2],
    ])
    np.testing.assert_allclose(pts, expect, rtol=0, atol=1e-12)


def test_z_bins_caps_and_counts():
    z = np.array([-10.0, -9.0, -5.0, -1.0, -1.0, -2.0])
    b = z_bins(z, 3)  # edges -10, -7, -4, -1
    assert b.tolist() == [0, 0, 1, 2, 2, 2]
    counts = np.array([5, 1, 12])
    idx = draw_indices(counts, 4, sample_rng(3, 0, 11))
    assert len(idx) == 4 + 1 + 4
    assert len(set(idx.tolist())) == len(idx)  # without replacement
    assert ((idx[:4] >= 0) & (idx[:4] < 5)).all() and idx[4] == 5 and ((idx[5:] >= 6) & (idx[5:] < 18)).all()


def test_process_depth_bins_and_caps():
    cfg = DataConfig(source="synthia", root="x", height=8, width=8, num_bins=4, points_per_bin=3)
    depth = np.tile(np.linspace(1.0, 40.0, 16), (16, 1))  # columns 1..40 m
    depth[:4] = 1000.0  # sky rows
    p = process_depth(depth, cfg, "a.png")
    assert p.counts.sum() == 12 * 16 and p.points.shape == (192, 3)
    assert p.image.shape == (1, 8, 8) and p.image.dtype == np.float32
    bins = z_bins(p.points[:, 2].astype(np.float64), 4)
    assert (np.diff(bins) >= 0).all()  # sorted by bin
    assert np.bincount(bins, minlength=4).tolist() == p.counts.tolist()
    idx = draw_indices(p.counts, cfg.points_per_bin, sample_rng(0, 0, 1))
    assert len(idx) == 4 * 3
    # with a pool cap each bin keeps exactly min(count, pool) points
    cfg2 = DataConfig(source="synthia", root="x", height=8, width=8, num_bins=4, points_per_bin=3, pool_per_bin=10)
    p2 = process_depth(depth, cfg2, "a.png")
    assert p2.counts.tolist() == np.minimum(p.counts, 10).tolist()


def test_network_input_value_and_keep_aspect():
    depth = np.full((30, 60), 75.0)
    depth[:, :30] = 1000.0
    cfg = DataConfig(source="synthia", root="x", height=30, width=60)
    x = network_input(depth, cfg)
    np.testing.assert_allclose(x[0, :, 40:], np.sqrt(75.0 / 300.0), rtol=1e-6)
    np.testing.assert_allclose(x[0, :, :20], 1.0)
    cfg = DataConfig(source="synthia", root="x", height=40, width=40, keep_aspect=True)
    x = network_input(depth, cfg)
    assert x.shape == (1, 40, 40)
    assert (x[0, :10] == 0).all() and (x[0, 30:] == 0).all() and (x[0, 10:30] > 0).all()  # 2:1 frame, centred


# ---------------------------------------------------------------------------------------------- bad input

def _write_png_by_hand(path, rgb16):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one): signature, IHDR, one IDAT, IEND."""
    h, w = rgb16.shape[:2]
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _good_png(path, h=6, w=8, depth=20.0):
    write_depth_png(path, np.full((h, w), depth))


@pytest.mark.parametrize("kind, words", [
    ("truncated", "truncated"), ("not_png", "not a readable PNG"), ("jpeg", "not a PNG"),
    ("gray", "grayscale"), ("gray16", "16-bit"), ("rgb16", "16-bit-per-channel RGB"), ("rgba", "RGBA"),
    ("palette", "palette"), ("sky", "every pixel is sky"),
])
def test_bad_frame_errors_name_the_file(tmp_path, kind, words):
    path = tmp_path / "f.png"
    if kind == "truncated":
        _good_png(path, 64, 64)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "not_png":
        path.write_text("this is not an image")
    elif kind == "jpeg":
        Image.new("RGB", (8, 6)).save(path, format="JPEG")
    elif kind == "gray":
        Image.new("L", (8, 6)).save(path)
    elif kind == "gray16":
        Image.fromarray(np.zeros((6, 8), dtype=np.uint16)).save(path)
    elif kind == "rgb16":
        _write_png_by_hand(path, np.full((6, 8, 3), 1000, np.uint16))
    elif kind == "rgba":
        Image.new("RGBA", (8, 6)).save(path)
    elif kind == "palette":
        Image.new("P", (8, 6)).save(path)
    elif kind == "sky":
        _good_png(path, depth=5000.0)
    cfg = DataConfig(source="synthia", root=str(tmp_path), height=8, width=8)
    with pytest.raises(BadFrameError, match=words) as err:
        process_depth(read_depth_png(path), cfg, "f.png", str(path))
    assert str(path) in str(err.value)


def test_missing_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_frames(str(tmp_path / "nope"))
    (tmp_path / "empty" / "SEQ1" / "DepthLeft").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no depth PNG"):
        build_datasets(DataConfig(source="synthia", root=str(tmp_path / "empty")), seed=0)


def test_folder_layouts(tmp_path):
    for seq in ("SEQ1", "SEQ2"):
        d = tmp_path / "root" / seq / "DepthLeft"
        d.mkdir(parents=True)
        for i in range(3):
            _good_png(d / f"{i:04d}.png")
    frames = list_frames(str(tmp_path / "root"))
    assert [f.rel for f in frames][:2] == ["SEQ1/DepthLeft/0000.png", "SEQ1/DepthLeft/0001.png"]
    assert [f.sequence for f in frames] == ["SEQ1"] * 3 + ["SEQ2"] * 3
    one = list_frames(str(tmp_path / "root" / "SEQ2" / "DepthLeft"))
    assert len(one) == 3 and one[0].sequence == "SEQ2" and os.path.isfile(one[0].path)
    assert [f.sequence for f in list_frames(str(tmp_path / "root" / "SEQ1"))] == ["SEQ1"] * 3


def test_bad_header_found_up_front_or_skipped(tmp_path):
    d = tmp_path / "SEQ1" / "DepthLeft"
    d.mkdir(parents=True)
    for i in range(4):
        _good_png(d / f"{i}.png")
    Image.new("RGBA", (8, 6)).save(d / "9_bad.png")
    cfg = dict(source="synthia", root=str(tmp_path), height=8, width=8, val_fraction=0.0)
    with pytest.raises(BadFrameError, match="9_bad.png"):
        build_datasets(DataConfig(**cfg), seed=0)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 5"):
        train, _ = build_datasets(DataConfig(**cfg, skip_bad_frames=True), seed=0)
    assert len(train) == 4


def test_bad_pixels_skipped_at_load_time(tmp_path):
    d = tmp_path / "SEQ1" / "DepthLeft"
    d.mkdir(parents=True)
    for i in range(3):
        _good_png(d / f"{i}.png", depth=10.0 + i)
    _good_png(d / "1.png", depth=5000.0)  # all sky: only found when decoded
    cfg = dict(source="synthia", root=str(tmp_path), height=8, width=8, val_fraction=0.0)
    train, _ = build_datasets(DataConfig(**cfg), seed=0)
    with pytest.raises(BadFrameError, match="1.png"):
        train[1]
    train, _ = build_datasets(DataConfig(**cfg, skip_bad_frames=True), seed=0)
    with pytest.warns(RuntimeWarning, match="1.png"):
        s = train[1]
    assert s["path"].endswith("2.png") and train.num_skipped == 1
    assert train[1]["path"].endswith("2.png") and train.num_skipped == 1  # remembered, not retried


def _bomb_png(path, w=100000, h=100000):
    """A tiny PNG whose header claims w x h 8-bit RGB pixels (Pillow refuses to open it as a decompression bomb)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))


def test_header_claiming_huge_size_is_one_bad_frame_line_and_skippable(tmp_path):
    d = tmp_path / "SEQ1" / "DepthLeft"
    d.mkdir(parents=True)
    for i in range(3):
        _good_png(d / f"{i}.png")
    _bomb_png(d / "5_bomb.png")
    with pytest.raises(BadFrameError, match=r"5_bomb\.png: its header claims 100000x100000 pixels") as err:
        read_depth_png(d / "5_bomb.png")
    assert "\n" not in str(err.value)
    cfg = dict(source="synthia", root=str(tmp_path), height=8, width=8, val_fraction=0.0)
    with pytest.raises(BadFrameError, match="5_bomb.png"):
        build_datasets(DataConfig(**cfg), seed=0)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 4"):
        train, _ = build_datasets(DataConfig(**cfg, skip_bad_frames=True), seed=0)
    assert len(train) == 3 and all("bomb" not in train[i]["path"] for i in range(3))


@pytest.mark.parametrize("field, value, message", [
    ("source", "kitti", "data.source: got 'kitti', expected one of 'synthetic', 'synthia'"),
    ("format", "hdf5", "data.format: got 'hdf5', expected one of 'png', 'cache'"),
    ("height", 0, "data.height: got 0, must be an integer number of pixels >= 8"),
    ("num_bins", 0, "data.num_bins: got 0, must be an integer >= 1"),
    ("max_depth", -1.0, "data.max_depth: got -1.0, must be a finite number of metres > 0"),
    ("val_fraction", 1.0, "data.val_fraction: got 1.0, must be a number in [0, 1)"),
    ("pool_per_bin", 5, "data.pool_per_bin: got 5, smaller than data.points_per_bin=2000"),
    ("focal", 0.0, "data.focal: got 0.0, must be a focal length in pixels > 0"),
    ("device", "tpu", "data.device: got 'tpu', expected one of 'auto', 'cpu', 'cuda'"),
    ("num_workers", "many", "data.num_workers: got 'many', must be an integer >= 0 or 'auto'"),
    ("num_workers", -1, "data.num_workers: got -1, must be an integer >= 0 or 'auto'"),
])
def test_config_validation_raises_config_error_naming_the_field(field, value, message):
    with pytest.raises(ConfigError) as err:
        DataConfig(**{field: value})
    assert str(err.value).startswith(message)
    with pytest.raises(ConfigError, match="data.root: is required"):
        DataConfig(source="synthia")


def test_data_layer_errors_are_protodepth_errors(tmp_path):
    """Missing folders and caches are DataSetupErrors (still FileNotFoundErrors for older callers)."""
    from protodepth.data.cache import open_cache
    with pytest.raises(DataSetupError, match="folder not found") as err:
        list_frames(str(tmp_path / "nope"))
    assert isinstance(err.value, FileNotFoundError)
    cfg = DataConfig(source="synthia", root=str(tmp_path), format="cache", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataSetupError, match="prepare_data"):
        open_cache(cfg, str(tmp_path))
    with pytest.raises(BadFrameError, match="file not found"):
        read_depth_png(tmp_path / "gone.png")
