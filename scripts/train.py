#!/usr/bin/env python
"""Train a Proto-Depth model.

    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/train.py   # synthetic scenes, quickstart
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/train.py \\
        --config configs/original.yaml data.root=/data/SYNTHIA-SF
    python scripts/train.py train.max_steps=50 train.wandb=disabled --output-dir runs/debug   # one process

Any config field below can be overridden as section.field=value (the value is read as YAML, e.g.
data.val_sequences=[SEQ6]); --config gives a YAML file holding any subset of them. A fresh run into a folder
that holds another run stops unless --resume or --overwrite is given.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
DEFAULT_CONFIG = REPO / "configs" / "quickstart.yaml"

# flag -> config field; a flag that is given becomes the override `field=value`
FLAG_FIELDS = {"resume": "train.resume", "output_dir": "train.output_dir", "max_steps": "train.max_steps",
               "wandb": "train.wandb", "overwrite": "train.overwrite"}


def _fields_epilog() -> str:
    from protodepth.config import config_fields_help

    return ("config fields (section.field=default, as defined in protodepth/config.py; configs/quickstart.yaml,\n"
            "the default --config, changes some of them):\n" + config_fields_help())


def parse_args(argv: list[str]):
    import argparse

    from protodepth.errors import CliParser

    # the field listing imports the config tree: only built when it is shown
    epilog = _fields_epilog() if {"-h", "--help"} & set(argv) else None
    p = CliParser(description=__doc__, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/quickstart.yaml)")
    p.add_argument("--resume", default=None, help="'latest' (newest complete checkpoint of the run) or a checkpoint folder")
    p.add_argument("--output-dir", default=None, help="run folder (train.output_dir)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (train.max_steps)")
    p.add_argument("--wandb", default=None, choices=["auto", "online", "offline", "disabled"], help="train.wandb")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="allow a fresh run into a folder that holds another run (train.overwrite=true)")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of a user error")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    # intermixed: overrides may come before and after flags (`... train.log_every=20 --output-dir X data.device=cpu`)
    return p.parse_intermixed_args(argv)


def overrides_from_args(args) -> list[str]:
    """The positional overrides, then one `field=value` per flag given (the flags win)."""
    overrides = list(args.overrides)
    for flag, key in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={'true' if value is True else value}")
    return overrides


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    from protodepth.config import load_config

    cfg = load_config(args.config, overrides_from_args(args))
    from protodepth.train import train  # after the config check: a bad value is named without torch's start-up

    train(cfg)
    return 0


def main(argv: list[str]) -> int:
    """Exit code 0, or 2 with one `error: ...` line for a user error (protodepth.errors.run_cli)."""
    from protodepth.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
