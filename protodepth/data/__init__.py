"""Depth data: SYNTHIA-SF reader, built-in synthetic scenes, preprocessed cache, datasets and collate.

Entry points: `DataConfig` (all options), `build_datasets(cfg, seed) -> (train, val)`, `collate_depth`; for the
trainer's loading: `EpochShuffleSampler`, `DeviceBatches`, `choose_data_device`, `workers_per_process`
(protodepth/data/loaders.py).
See docs/data.md for the options and formats.
"""
from protodepth.data.cache import CachedDepthDataset, DepthCache, build_cache, open_cache, prepare_cache
from protodepth.data.config import DataConfig
from protodepth.data.loaders import (DeviceBatches, EpochShuffleSampler, choose_data_device, rank_batches,
                                     workers_per_process)
from protodepth.data.dataset import DepthDataset, PngDepthDataset, build_datasets, collate_depth, split_indices
from protodepth.data.synthetic import ensure_synthetic, generate_synthetic, render_scene
from protodepth.data.synthia import (BadFrameError, backproject, decode_depth_rgb, encode_depth_rgb, list_frames,
                                     process_depth, read_depth_png, write_depth_png)

__all__ = [
    "DataConfig", "build_datasets", "collate_depth", "DepthDataset", "PngDepthDataset", "CachedDepthDataset",
    "DepthCache", "build_cache", "open_cache", "prepare_cache", "split_indices", "ensure_synthetic",
    "generate_synthetic",
    "render_scene", "BadFrameError", "backproject", "decode_depth_rgb", "encode_depth_rgb", "list_frames",
    "process_depth", "read_depth_png", "write_depth_png", "DeviceBatches", "EpochShuffleSampler",
    "choose_data_device", "rank_batches", "workers_per_process",
]
