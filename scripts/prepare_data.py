#!/usr/bin/env python
"""Convert a depth dataset once into the preprocessed form that `data.format=cache` reads.

    python scripts/prepare_data.py --config configs/original.yaml data.root=/data/SYNTHIA-SF --workers 16
    python scripts/prepare_data.py data.height=240 data.width=320      # the built-in synthetic scenes

The network inputs are stored at their final size (data.height x data.width) and every frame's points sorted
by Z bin, memory-mapped; training then reads them with no PNG decode. Train with the same data settings plus
`data.format=cache` (and the same `data.cache_dir` if you set one). See docs/data.md.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str]):
    import argparse

    from protodepth.errors import CliParser

    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config whose data section is used (default: built-in defaults)")
    p.add_argument("--root", default=None, help="dataset folder (data.root)")
    p.add_argument("--source", default=None, choices=["synthetic", "synthia"], help="data.source")
    p.add_argument("--cache-dir", default=None, help="output folder (data.cache_dir; default derived from the config)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes decoding frames (default: min(8, CPUs))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of a user error")
    p.add_argument("overrides", nargs="*", metavar="data.field=value", help="config overrides, e.g. data.height=240")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"argument --workers: got {args.workers}, must be >= 0")
    return args


def overrides_from_args(args) -> list[str]:
    """The positional overrides plus one `data.field=value` per flag given; --root alone implies SYNTHIA."""
    overrides = list(args.overrides)
    if args.source is not None:
        overrides.append(f"data.source={args.source}")
    if args.root is not None:
        overrides.append(f"data.root={args.root}")
        if args.source is None:
            overrides.append("data.source=synthia")
    if args.cache_dir is not None:
        overrides.append(f"data.cache_dir={args.cache_dir}")
    return overrides


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from protodepth.config import load_config
    from protodepth.data.cache import prepare_cache

    cfg = load_config(args.config, overrides_from_args(args)).data
    t0 = time.perf_counter()
    cache_dir, manifest = prepare_cache(cfg, workers=args.workers, progress=not args.quiet)
    size = sum(os.path.getsize(os.path.join(cache_dir, n)) for n in os.listdir(cache_dir))
    n = len(manifest["frames"])
    print(f"wrote {n} frames ({manifest['num_points']:,} points, {size / 2**20:.1f} MiB) to {cache_dir} "
          f"in {time.perf_counter() - t0:.1f} s" + (f"; left out {len(manifest['skipped'])} bad frames"
                                                     if manifest["skipped"] else ""))
    hint = "data.format=cache" + ("" if cfg.cache_dir is None else f" data.cache_dir={cache_dir}")
    print(f"train from it with the same data settings plus: {hint}")
    return 0


def main(argv: list[str]) -> int:
    """Exit code 0, or 2 with one `error: ...` line for a user error (protodepth.errors.run_cli)."""
    from protodepth.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
