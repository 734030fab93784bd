#!/usr/bin/env python
"""Run a trained Proto-Depth checkpoint on depth PNGs: one scene mesh, one picture and the Chamfer numbers per image.

    python scripts/infer.py --checkpoint runs/quickstart --input data_cache/synthetic \\
        --output runs/quickstart/infer

--checkpoint: a checkpoint folder written by scripts/train.py (config.yaml + model weights, e.g.
              runs/quickstart/checkpoints/checkpoint-00000300), or a run folder (its newest complete checkpoint).
--input:      one depth PNG, a folder of PNGs, a DepthLeft folder, or a SYNTHIA-SF root (SEQ*/DepthLeft/*.png).
--output:     receives scenes/<name>.ply (the K posed slot meshes, slot colours), pictures/<name>.png,
              metrics.json and metrics.csv (per image and the mean over the set).

Metrics per image, on the target cloud the trainer's validation uses (at most data.points_per_bin points per
depth bin; with --seed equal to the run's train.seed, 0 by default, exactly validation's draw) and
loss.samples_per_slot points sampled on every slot mesh (seeded by --seed, per image):
- val_total, val_chamfer, val_global, val_slot, val_repulsion: the trainer's validation loss computed by the same
  code on the image alone. Their mean over the validation frames is what the trainer logs as val/total,
  val/chamfer, val/global, val/slot, val/repulsion (up to the random point sampling and mixed precision).
- pred_to_target (mean over predicted points of the squared distance to the nearest target point, m^2; equal to
  val_slot), target_to_pred (the other way; val_global averages loss.k_nearest neighbours instead of one), and
  chamfer = their sum: the symmetric Chamfer distance, which is NOT the validation number.
The last line printed gives both means: `val_chamfer` (compare it with the trainer's val/chamfer) and the
symmetric chamfer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from protodepth.inference import load_model, run  # noqa: E402,F401  (load_model: for callers)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from protodepth.errors import CliParser

    # CliParser: a bad flag ends in the same one `error: ...` line (exit code 2) as every other user error
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or a run folder: its newest checkpoint)")
    p.add_argument("--input", required=True, help="depth PNG, folder of PNGs, or SYNTHIA-SF root")
    p.add_argument("--output", required=True, help="output folder (created)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: the GPU when there is one (default)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding PNGs (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable PNGs with a warning instead of stopping")
    p.add_argument("--no-pictures", action="store_true", help="write meshes and metrics only")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the target draw and the mesh sampling (default 0; the run's train.seed gives "
                        "exactly the validation split's target clouds)")
    p.add_argument("--traceback", action="store_true", help="show the full traceback of a user error")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"argument --batch-size: got {a.batch_size}, must be >= 1")
    if a.workers < 0:
        p.error(f"argument --workers: got {a.workers}, must be >= 0")
    return a


def summary_line(res: dict, output: str) -> str:
    """The last line printed: the mean val_chamfer first, named as the trainer logs it (`val/chamfer`, so a user
    can put the two side by side), then the symmetric Chamfer distance, which is a different measure."""
    m = res["mean"]
    skipped = f"; skipped {len(res['skipped'])} bad files" if res["skipped"] else ""
    return (f"{res['count']} images on {res['device']}: val_chamfer {m['val_chamfer']:.6g} (the trainer's "
            f"val/chamfer measure, mean over these images); symmetric chamfer {m['chamfer']:.6g} m^2 "
            f"(pred->target {m['pred_to_target']:.6g}, target->pred {m['target_to_pred']:.6g}); "
            f"results in {output}{skipped}")


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(summary_line(run(args), args.output))
    return 0


def main(argv: list[str]) -> int:
    """Exit code 0, or 2 with one `error: ...` line for a user error (protodepth.errors.run_cli)."""
    from protodepth.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
