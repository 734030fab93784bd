"""Inference: a checkpoint written by the trainer + depth PNGs -> scene meshes, pictures, Chamfer metrics.

`scripts/infer.py` is its command line; `run(args)` does the work (see that script for the options).

Two kinds of numbers per image (docs/visualization.md, "Which number is which"):
- `val_total`, `val_chamfer`, `val_global`, `val_slot`, `val_repulsion`: the trainer's validation measure,
  computed by the same code (`proto_depth_loss`) with the same point counts on the image alone; their mean over
  a set is what the trainer logs as `val/total`, `val/chamfer`, ... on that set (up to the random sampling);
- `pred_to_target`, `target_to_pred` (squared metres) and `chamfer` = their sum: plain directed Chamfer means
  on the same sampled points. `pred_to_target` equals `val_slot`; `val_chamfer` weights and mixes the terms.
"""
from __future__ import annotations

from protodepth.errors import InferError
import argparse
import csv
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin")



def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder / checkpoints folder -> its newest complete checkpoint."""
    from protodepth import checkpoint as ckpt

    if not path.exists():
        raise InferError(f"--checkpoint {path}: folder not found")
    if not path.is_dir():
        raise InferError(f"--checkpoint {path}: is a file; pass the checkpoint folder that holds config.yaml")
    has_weights = any((path / n).is_file() for n in WEIGHT_FILES) or (path / "pytorch_model").is_dir()
    if (path / "config.yaml").is_file() and has_weights:
        return path
    for root in (path / "checkpoints", path):
        found = ckpt.latest_checkpoint_or_none(root)
        if found is not None:
            return found
    if (path / "config.yaml").is_file() and not (path / "checkpoints").is_dir():
        return path  # config but no weights: load_model names what is missing
    raise InferError(f"--checkpoint {path}: holds no config.yaml and no complete checkpoint-* folder; pass a "
                     "checkpoint folder written by scripts/train.py (runs/<name>/checkpoints/checkpoint-XXXXXXXX)")


def read_weights(folder: Path) -> dict:
    """The ProtoDepth state_dict saved by Accelerate's save_state in `folder` (safetensors, a torch .bin, or a
    DeepSpeed `pytorch_model/` folder), with DDP / torch.compile name prefixes removed."""
    import torch

    state = None
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(f), device="cpu")
            else:
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or foreign file
            raise InferError(f"--checkpoint: {f} is not a readable weights file ({e.__class__.__name__}: "
                             f"{str(e)[:200]})") from None
        break
    if state is None:
        ds = sorted((folder / "pytorch_model").glob("*model_states.pt")) if (folder / "pytorch_model").is_dir() else []
        if ds:  # DeepSpeed: ZeRO-1/2 keep the full fp32 module weights in the model-states file
            try:
                state = torch.load(ds[0], map_location="cpu", weights_only=False)["module"]
            except Exception as e:
                raise InferError(f"--checkpoint: {ds[0]} is not a readable DeepSpeed model-states file "
                                 f"({e.__class__.__name__})") from None
    if state is None:
        raise InferError(f"--checkpoint {folder}: no model weights found (looked for {', '.join(WEIGHT_FILES)} and "
                         "pytorch_model/*model_states.pt)")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_model(folder: Path, device):
    """(model in eval mode on `device`, Config) from a checkpoint folder."""
    from protodepth.config import load_config
    from protodepth.model import ProtoDepth

    cfg_file = folder / "config.yaml"
    if not cfg_file.is_file():
        raise InferError(f"--checkpoint {folder}: config.yaml is missing (every checkpoint written by "
                         "scripts/train.py holds one)")
    # the checkpoint holds every weight: never download or read the backbone's initial weights
    cfg = load_config(cfg_file, {"model.weights": "none"})
    model = ProtoDepth(cfg.model)
    state = read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferError(f"--checkpoint {folder}: weights do not match the model of its config.yaml (missing "
                         f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''})")
    return model.to(device).eval(), cfg


# ------------------------------------------------------------------------------------------------ inputs

def list_inputs(path: Path):
    """Frames (protodepth.data.synthia.Frame) of a PNG file or any folder layout `list_frames` accepts."""
    from protodepth.data.synthia import Frame, list_frames

    if not path.exists():
        raise InferError(f"--input {path}: not found")
    if path.is_file():
        if path.suffix.lower() != ".png":
            raise InferError(f"--input {path}: expected a depth PNG or a folder of them")
        return [Frame(str(path.resolve()), path.name, path.parent.name)]
    try:
        return list_frames(str(path))
    except FileNotFoundError:
        raise InferError(f"--input {path}: no depth PNG found (looked for */DepthLeft/*.png, DepthLeft/*.png "
                         "and *.png)") from None


def skip_hint(msg: str) -> str:
    """The data layer's message about a bad frame, with this script's way of skipping it."""
    if "data.skip_bad_frames=true" in msg:
        return msg.replace("set data.skip_bad_frames=true", "pass --skip-bad to skip such files")
    return f"{msg} (pass --skip-bad to skip such files)"


def dataset_rel(frame) -> str:
    """The frame's path as the trainer names it when data.root is the dataset root ("SEQ/DepthLeft/name.png"
    for a PNG in a DepthLeft folder), whatever --input was: it keys the frame's target draw, so one frame gets
    the same target points (validation's) whether it is passed alone, in its folder or with the whole set."""
    parts = Path(frame.path).parts
    if len(parts) >= 3 and parts[-2] == "DepthLeft":
        return "/".join(parts[-3:])
    return frame.rel


class FrameDataset:
    """Depth PNG -> {"image" (C, H, W), "cloud" (N, 3), "path", "rel", "native_hw"}, with validation's draw of
    the target cloud (epoch 0 of `seed`: the trainer's validation draw when seed = train.seed)."""

    def __init__(self, frames, data_cfg, seed: int, skip_bad: bool = False):
        self.frames, self.cfg, self.seed, self.skip_bad = list(frames), data_cfg, seed, skip_bad

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> dict:
        import torch

        from protodepth.data.dataset import gray_to_rgb
        from protodepth.data.synthia import (BadFrameError, draw_indices, frame_key, process_depth, read_depth_png,
                                             sample_rng)

        fr = self.frames[i]
        try:  # truncated pixel data and all-sky frames only show here, when decoding
            depth = read_depth_png(fr.path)
            p = process_depth(depth, self.cfg, fr.rel, fr.path)
        except BadFrameError as e:
            if not self.skip_bad:
                raise InferError(skip_hint(str(e))) from None
            return {"bad": str(e)}
        idx = draw_indices(p.counts, self.cfg.points_per_bin, sample_rng(self.seed, 0, frame_key(dataset_rel(fr))))
        return {"image": gray_to_rgb(p.image[0], self.cfg.image_channels), "cloud": torch.from_numpy(p.take(idx)),
                "path": fr.path, "rel": fr.rel, "native_hw": depth.shape}


def check_frames(frames, skip_bad: bool):
    """Check every PNG before the long run (headers only): stop naming a corrupt file, or drop it with
    --skip-bad. Returns (good frames, messages of skipped ones). Truncated pixel data is only found when
    decoding (FrameDataset)."""
    from protodepth.data.synthia import BadFrameError, check_png_header

    good, skipped = [], []
    for fr in frames:
        try:
            check_png_header(fr.path)
            good.append(fr)
        except (BadFrameError, FileNotFoundError) as e:
            if not skip_bad:
                raise InferError(skip_hint(str(e))) from None
            warnings.warn(f"skipping: {e}", RuntimeWarning, stacklevel=2)
            skipped.append(str(e))
    if not good:
        raise InferError("--input: no readable depth PNG left after skipping bad ones")
    return good, skipped


def collate(samples: list[dict]) -> dict:
    """collate_depth of the good samples, plus rels, native sizes, and the messages of skipped bad ones."""
    from protodepth.data import collate_depth

    bad = [s["bad"] for s in samples if "bad" in s]
    samples = [s for s in samples if "bad" not in s]
    if not samples:
        return {"bad": bad, "image": None}
    batch = collate_depth(samples)
    batch["bad"] = bad
    batch["rels"] = [s["rel"] for s in samples]
    batch["native_hw"] = [tuple(s["native_hw"]) for s in samples]
    return batch


def out_name(rel: str) -> str:
    """A flat, unique file stem from a frame's path relative to the input: SEQ1/DepthLeft/000003.png ->
    SEQ1_DepthLeft_000003."""
    stem = rel[:-4] if rel.lower().endswith(".png") else rel
    return stem.replace("/", "_").replace(os.sep, "_")


# ------------------------------------------------------------------------------------------------ metrics

VAL_KEYS = ("val_total", "val_chamfer", "val_global", "val_slot", "val_repulsion")
CHAMFER_KEYS = ("chamfer", "pred_to_target", "target_to_pred")
METRIC_KEYS = VAL_KEYS + CHAMFER_KEYS

# what each number is, written into metrics.json so the file explains itself
DEFINITIONS = {
    "val_total": "the trainer's val/total on this image alone (loss.w_chamfer * val_chamfer + the prototype "
                 "regularisers, which do not depend on the image)",
    "val_chamfer": "the trainer's val/chamfer on this image alone: loss.w_global * val_global + loss.w_slot * "
                   "val_slot + loss.w_repulsion * val_repulsion",
    "val_global": "val/global: mean over target points of the mean squared distance (m^2) to their "
                  "loss.k_nearest nearest predicted points",
    "val_slot": "val/slot: mean over predicted points of the squared distance (m^2) to the nearest target point "
                "(equals pred_to_target)",
    "val_repulsion": "val/repulsion: the slot-centroid repulsion term",
    "pred_to_target": "mean over predicted points of the squared distance (m^2) to the nearest target point",
    "target_to_pred": "mean over target points of the squared distance (m^2) to the nearest predicted point",
    "chamfer": "pred_to_target + target_to_pred (m^2), the symmetric Chamfer distance; not a validation number",
}


def image_metrics(slot_verts, prototypes, faces, cloud, loss_cfg, seed: int) -> tuple[dict[str, float], object]:
    """One image's numbers: the validation loss (`proto_depth_loss`, as the trainer's validation calls it:
    loss.samples_per_slot points per slot, the whole target cloud) on this image alone, with point sampling
    seeded by `seed` (so a number does not depend on the batch the image came in), and the directed Chamfer
    means on the same sampled points.

    slot_verts (K, V, 3), prototypes (P, V, 3), faces (F, 3), cloud (N, 3) valid target points.
    Returns ({METRIC_KEYS: float}, the sampled points (K, S, 3))."""
    import torch

    from protodepth.geometry import chamfer_distance
    from protodepth.loss import proto_depth_loss

    gen = torch.Generator(device=slot_verts.device).manual_seed(seed)
    lengths = torch.tensor([cloud.shape[0]], device=cloud.device)
    res = proto_depth_loss(slot_verts[None], prototypes, faces, cloud[None], lengths, loss_cfg, generator=gen)
    flat = res.pred_points.reshape(1, -1, 3)
    p2t, _ = chamfer_distance(flat, cloud[None].float(), single_directional=True)
    t2p, _ = chamfer_distance(cloud[None].float(), flat, single_directional=True)
    t = res.terms
    values = torch.stack([res.total, t["chamfer"], t["global"], t["slot"], t["repulsion"], p2t, t2p]).float()
    total, chamfer, glob, slot, rep, p2t, t2p = values.cpu().tolist()  # one host read per image
    out = {"val_total": total, "val_chamfer": chamfer, "val_global": glob, "val_slot": slot, "val_repulsion": rep,
           "chamfer": p2t + t2p, "pred_to_target": p2t, "target_to_pred": t2p}
    return out, res.pred_points[0]


# ------------------------------------------------------------------------------------------------ run

def write_one(job: dict, out: Path, cfg, ckpt_name: str, faces, picture: bool) -> dict:
    """Write one image's scene mesh (and picture); return its metrics row. job: name, rel, path, metrics,
    target_points, slot_verts (K, V, 3), image (C, H, W), cloud (N, 3), pred (K, S, 3), native_hw."""
    from protodepth import viz

    m = job["metrics"]
    row = {"name": job["name"], "path": job["path"], **{k: m[k] for k in METRIC_KEYS},
           "target_points": job["target_points"]}
    pal = viz.slot_colors(job["slot_verts"].shape[0])
    viz.write_ply(out / "scenes" / f"{job['name']}.ply", job["slot_verts"], faces, pal)
    if picture:
        cam = viz.Camera.for_input(cfg, job["native_hw"])
        title = (f"{job['rel']}  |  val. chamfer {m['val_chamfer']:.4g}  |  pred->target {m['pred_to_target']:.3g}"
                 f" m^2, target->pred {m['target_to_pred']:.3g} m^2  |  {ckpt_name}")
        pic = viz.scene_picture(job["image"], job["cloud"], job["pred"], cam, title,
                                depth_scale=float(cfg.depth_scale))
        pic.save(out / "pictures" / f"{job['name']}.png", compress_level=1)
    return row


def batch_jobs(model, batch: dict, device, loss_cfg, seed: int) -> list[dict]:
    """Forward pass and metrics of one collated batch -> one job per image for `write_one`."""
    import torch

    image = batch["image"].to(device, non_blocking=True)
    cloud = batch["cloud"].to(device, non_blocking=True)
    jobs = []
    with torch.no_grad():
        scene = model(image)
        for b in range(image.shape[0]):
            n = int(batch["lengths"][b])
            metrics, pred = image_metrics(scene.slot_verts[b], scene.prototypes, model.faces, cloud[b, :n],
                                          loss_cfg, seed)
            jobs.append({"name": out_name(batch["rels"][b]), "rel": batch["rels"][b], "path": batch["paths"][b],
                         "metrics": metrics, "target_points": n, "slot_verts": scene.slot_verts[b].float().cpu(),
                         "image": batch["image"][b], "cloud": batch["cloud"][b, :n], "pred": pred.float().cpu(),
                         "native_hw": batch["native_hw"][b]})
    return jobs


def write_metrics(out: Path, result: dict, rows: list[dict]) -> None:
    """metrics.json (the whole result) and metrics.csv (a row per image, then the mean)."""
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["name", "path", *METRIC_KEYS, "target_points"])
        w.writeheader()
        w.writerows(rows)
        w.writerow({"name": "mean", "path": "", **result["mean"], "target_points": ""})


def run(args: argparse.Namespace) -> dict:
    """The whole inference; returns what metrics.json holds. Raises InferError (or a protodepth user error)."""
    folder = resolve_checkpoint(Path(args.checkpoint))  # before the heavy imports: a typo fails in a second

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InferError("--device cuda: no CUDA GPU is visible; use --device auto or cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    frames, skipped = check_frames(list_inputs(Path(args.input)), args.skip_bad)
    model, cfg = load_model(folder, device)

    out = Path(args.output)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    if not args.no_pictures:
        (out / "pictures").mkdir(parents=True, exist_ok=True)
    loader = DataLoader(FrameDataset(frames, cfg.data, args.seed, args.skip_bad), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda")
    rows: list[dict] = []
    bar = tqdm(total=len(frames), desc="infer", unit="img", dynamic_ncols=True)
    # meshes and pictures are written by threads (numpy, zlib and file I/O release the GIL)
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) // 2)))
    futures: list = []
    faces_cpu = model.faces.cpu()
    try:  # the bar is closed on errors too, so the error line stands on its own
        for batch in loader:
            for msg in batch["bad"]:
                skipped.append(msg)
                warnings.warn(f"skipping: {msg}", RuntimeWarning, stacklevel=2)
            bar.update(len(batch["bad"]))  # (bad ones count as done at once)
            if batch["image"] is None:
                continue
            for job in batch_jobs(model, batch, device, cfg.loss, args.seed):
                futures.append(pool.submit(write_one, job, out, cfg.data, folder.name, faces_cpu,
                                           not args.no_pictures))
            # writing batch i overlaps the forward pass of batch i + 1; collect what has been queued before
            while len(futures) > 2 * args.batch_size:
                rows.append(futures.pop(0).result())
                bar.update(1)
            if rows:
                bar.set_postfix(val_chamfer=f"{sum(r['val_chamfer'] for r in rows) / len(rows):.4g}", refresh=False)
        for f in futures:
            rows.append(f.result())
            bar.update(1)
    finally:
        pool.shutdown(wait=True)
        bar.close()
    if not rows:
        raise InferError("--input: every depth PNG was skipped; nothing to evaluate")

    mean = {k: sum(r[k] for r in rows) / len(rows) for k in METRIC_KEYS}
    result = {"checkpoint": str(folder), "input": str(args.input), "device": str(device), "count": len(rows),
              "samples_per_slot": cfg.loss.samples_per_slot, "num_slots": cfg.model.num_slots, "seed": args.seed,
              "train_seed": cfg.train.seed, "mean": mean, "definitions": DEFINITIONS, "skipped": skipped,
              "images": rows}
    write_metrics(out, result, rows)
    return result
