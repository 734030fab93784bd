#!/usr/bin/env python
"""Train a Proto-Depth model.

    accelerate launch scripts/train.py                       # built-in synthetic scenes, configs/quickstart.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/train.py --config configs/original.yaml \
        data.root=/data/SYNTHIA-SF
    python scripts/train.py train.max_steps=50 train.wandb=disabled   # one process, CPU or one GPU

Any config field can be overridden as section.field=value (value parsed as YAML).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "quickstart.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # same last line as every other user error (`error: ...`, exit 2), whatever the program name
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    # no abbreviations: `--max-step 3` must not silently mean --max-steps
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/quickstart.yaml)")
    p.add_argument("--resume", default=None, help="'latest' (newest complete checkpoint of the run) or a checkpoint folder")
    p.add_argument("--output-dir", default=None, help="run folder (train.output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (train.max_steps)")
    p.add_argument("--wandb", default=None, choices=["auto", "online", "offline", "disabled"], help="train.wandb")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of a user error")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p.parse_args(argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from protodepth.config import load_config
    from protodepth.train import train

    overrides = list(args.overrides)
    for flag, key in (("resume", "train.resume"), ("output_dir", "train.output_dir"),
                      ("max_steps", "train.max_steps"), ("wandb", "train.wandb")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    train(load_config(args.config, overrides))
    return 0


def main(argv: list[str]) -> int:
    """Exit code 0, or 2 with one `error: ...` line for a user error (protodepth.errors.run_cli)."""
    from protodepth.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
