"""The training loop: Accelerate wiring, checkpoints, logging, progress.

One function, `train(cfg)`, readable top to bottom. Model and loss know nothing of Accelerate; everything
distributed or precision-related lives here, so the same code runs on a CPU, one GPU, DDP and DeepSpeed.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from protodepth import checkpoint as ckpt
from protodepth.config import Config
from protodepth.errors import ConfigError, DataSetupError, NonFiniteError
from protodepth.data import build_datasets, collate_depth
from protodepth.loss import proto_depth_loss
from protodepth.model import ProtoDepth
from protodepth.schedules import Ramp, lr_factor


class _NonFiniteOutput(Exception):
    """The model's slot vertices are not finite (raised inside the step, reported with batch files outside)."""


class DeferredCheck:
    """The finite check of the latest optimizer step, read by the host one step late.

    push() starts copying the step's flags to pinned host memory and records an event; resolve() waits for
    that event only, not for the GPU work queued since, and hands the flags to `check`.
    """

    def __init__(self, check, n_flags: int):
        self.check = check
        self.host = torch.zeros(n_flags, pin_memory=True)  # one buffer: push() resolves the previous step first
        self.pending = None

    def push(self, flags: torch.Tensor, step: int, epoch: int, paths: list[str]) -> None:
        self.resolve()
        self.host.copy_(flags.float(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (self.host, event, step, epoch, list(paths))

    def resolve(self) -> None:
        if self.pending is None:
            return
        buf, event, step, epoch, paths = self.pending
        self.pending = None
        event.synchronize()
        self.check(buf.tolist(), step, epoch, paths)


class EpochShuffleSampler(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, epoch).

    Accelerate shards the batches of this order across ranks, and `skip_first_batches` resumes inside an
    epoch, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainState:
    """Everything beyond model/optimizer/RNG that a resume needs; saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    samples: int = 0  # samples seen, all processes
    skipped_steps: int = 0
    history: list = field(default_factory=list)  # (step, loss) at every log point, for the summary and tests

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, d: dict) -> None:
        self.__dict__.update(d)


def resolve_wandb_mode(mode: str) -> str:
    """'auto' -> 'online' when an API key is configured, else 'offline' (said once, on the main process)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def check_output_dir(path: Path, min_free_bytes: int) -> None:
    """Fail before training, with the reason, if the run folder can't hold a checkpoint."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"train.output_dir: {path} is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise ConfigError(
            f"train.output_dir: {path} has {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{min_free_bytes / 2**20:.0f} MiB; free some space or choose another folder"
        )


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def build_accelerator(cfg: Config, wandb_mode: str):
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    t = cfg.train
    kwargs = [
        InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.dist_timeout_s)),
        # every parameter gets a gradient every step: no unused-parameter search, fixed bucket order
        DistributedDataParallelKwargs(find_unused_parameters=False, static_graph=True),
    ]
    if not torch.cuda.is_available() and "ACCELERATE_USE_DEEPSPEED" in os.environ:
        # DeepSpeed on a CPU machine only works over gloo (shared/facts.md)
        kwargs[0] = InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=t.dist_timeout_s))
    return Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=None if wandb_mode == "disabled" else "wandb",
        project_config=ProjectConfiguration(project_dir=t.output_dir, automatic_checkpoint_naming=False),
        kwargs_handlers=kwargs,
        step_scheduler_with_optimizer=False,
        # batches come from pinned memory: an asynchronous copy lets the host queue the next step while the GPU
        # still runs this one (a blocking copy waits for the GPU to go idle first)
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )


def train(cfg: Config) -> dict:
    """Train per `cfg`; returns the end-of-run summary (also written to <output_dir>/summary.json)."""
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm

    t = cfg.train
    out = Path(t.output_dir)
    ckpt_root = out / "checkpoints"
    if t.resume is not None and t.resume != "latest" and not Path(t.resume).is_dir():
        raise ConfigError(f"train.resume: checkpoint folder {t.resume} not found (use 'latest' or a checkpoint path)")
    wandb_mode = resolve_wandb_mode(t.wandb)
    if wandb_mode != "disabled":
        os.environ["WANDB_MODE"] = wandb_mode
        os.environ.setdefault("WANDB_SILENT", "true")
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    accelerator = build_accelerator(cfg, wandb_mode)
    is_main = accelerator.is_main_process
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    log = accelerator.print
    set_seed(t.seed, device_specific=False)

    # ---- data: the main process generates the synthetic scenes (if needed) before the others read them
    with accelerator.main_process_first():
        try:
            train_ds, val_ds = build_datasets(cfg.data, seed=t.seed)
        except (ValueError, OSError) as e:  # the data layer names the file or field; keep its message
            raise DataSetupError(str(e)) from e
    if len(train_ds) < t.batch_size * accelerator.num_processes:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} per process x {accelerator.num_processes} processes needs at least "
            f"{t.batch_size * accelerator.num_processes} training samples, the data has {len(train_ds)}"
        )
    loader_kwargs = dict(
        batch_size=t.batch_size,
        collate_fn=collate_depth,
        num_workers=cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    train_sampler = EpochShuffleSampler(len(train_ds), t.seed)
    # Persistent training workers: restarting 12 of them every epoch cost ~0.5 s each time (a third of an H100
    # run with 14-step epochs). They see set_epoch through the dataset's shared-memory epoch.
    train_dl = DataLoader(train_ds, sampler=train_sampler, drop_last=True,
                          persistent_workers=cfg.data.num_workers > 0, **loader_kwargs)
    val_dl = DataLoader(val_ds, sampler=EpochShuffleSampler(len(val_ds), t.seed, shuffle=False), **loader_kwargs) \
        if len(val_ds) and t.val_every else None

    # ---- model, optimizer
    model = ProtoDepth(cfg.model)
    faces = model.faces  # (F, 3), shared by every slot mesh and prototype
    if is_main:
        check_output_dir(out, min_free_bytes=4 * _model_bytes(model) + (64 << 20))
    # DeepSpeed flattens parameters through byte views, which need a unit last stride: no channels-last there
    # ("self.stride(-1) must be 1 to view Float as Byte", seen on an H100 with ZeRO-2)
    if cfg.model.channels_last and not is_deepspeed:
        model = model.to(memory_format=torch.channels_last)
    # fused Adam: one kernel for all parameters instead of a dozen per tensor group (~3 ms/step on an H100)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay, fused=accelerator.device.type == "cuda")
    if t.compile:
        model = torch.compile(model)
    if val_dl is not None:
        model, optimizer, train_dl, val_dl = accelerator.prepare(model, optimizer, train_dl, val_dl)
    else:
        model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    faces = faces.to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    # ---- resume
    if t.resume is not None:
        try:
            folder = ckpt.find_resume_checkpoint(ckpt_root, t.resume)
        except ckpt.NoCheckpointError:
            # "latest" with nothing saved yet: a fresh start, so a restart loop can always pass it. Only broken
            # checkpoints (CheckpointError) stop the run: starting over would let retention delete them.
            folder = None
            log(f"resume=latest: no checkpoint under {ckpt_root} yet, starting from step 0")
        if folder is not None:
            accelerator.load_state(str(folder))
            log(f"resumed from {folder} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    if is_main:
        ckpt.clean_stale_temps(ckpt_root)
        cfg.save(out / "config.yaml")
    accelerator.wait_for_everyone()

    tracker_cfg = _flatten(cfg.to_dict())
    if wandb_mode != "disabled":
        if is_main and t.wandb == "auto" and wandb_mode == "offline":
            log("W&B: no API key configured, logging offline into "
                f"{out / 'wandb'} (sync later with `wandb sync`; train.wandb=disabled turns it off)")
        accelerator.init_trackers(t.wandb_project, config=tracker_cfg,
                                  init_kwargs={"wandb": {"dir": str(out), "name": t.run_name or out.name}})

    pg = cfg.progressive  # few points early, all later: the ramps are functions of the optimizer step
    samples_ramp = Ramp(min(pg.samples_start, cfg.loss.samples_per_slot), cfg.loss.samples_per_slot, pg.steps,
                        pg.shape, pg.num_levels)
    full_targets = cfg.data.num_bins * cfg.data.points_per_bin  # the largest cloud the data can give
    targets_ramp = Ramp(min(pg.targets_start, full_targets), full_targets, pg.steps, pg.shape, pg.num_levels)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    world = accelerator.num_processes
    global_batch = t.batch_size * world * t.grad_accum

    def set_lr(step: int) -> float:
        f = lr_factor(step, cfg.optim.schedule, cfg.optim.warmup_steps, t.max_steps, cfg.optim.min_lr_ratio)
        for g, lr in zip(optimizer.param_groups, base_lrs):
            g["lr"] = lr * f
        return base_lrs[0] * f

    def save(step: int) -> None:
        tmp = ckpt.temp_dir(ckpt_root, step)
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if is_main:
                cfg.save(tmp / "config.yaml")  # a checkpoint is self-contained: scripts/infer.py needs only the folder
                ckpt.commit(ckpt_root, step, t.ckpt_limit)
        except Exception as e:
            # Disk full, file too large, folder removed, permissions: leave no partial checkpoint behind. Writers
            # report these as OSError (open/write), SafetensorError or RuntimeError (torch.save), hence Exception.
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            try:
                free = f"{shutil.disk_usage(ckpt_root).free / 2**20:.0f} MiB free there"
            except OSError:
                free = "free space unknown"
            good = ckpt.checkpoint_dirs(ckpt_root)
            raise ckpt.CheckpointError(
                f"could not write the checkpoint of step {step} to {ckpt_root} ({getattr(e, 'strerror', None) or e};"
                f" {free}); the last complete checkpoint is {good[-1] if good else 'none'}") from e
        accelerator.wait_for_everyone()

    def visualise(step: int, batch: dict, scene, res) -> None:
        """Pictures and meshes of this batch into <output_dir>/viz/step_*, and to W&B when it is on."""
        if not is_main or t.viz_images == 0:
            return
        from protodepth import viz

        loss = float(res.total.detach())
        paths = viz.snapshot(out, step, batch, scene, res.pred_points, faces, loss, cfg.data, max_images=t.viz_images)
        if wandb_mode != "disabled":
            accelerator.log(viz.wandb_payload(paths, batch, res.pred_points, prototypes=scene.prototypes.detach(),
                                              max_images=t.viz_images), step=step)

    def validate() -> dict[str, float]:
        model.eval()
        gen = torch.Generator(device=accelerator.device).manual_seed(t.seed + 1)  # same val samples every time
        sums: dict[str, torch.Tensor] = {}
        n = torch.zeros((), device=accelerator.device)
        with torch.no_grad():
            for i, batch in enumerate(val_dl):
                if t.val_batches and i >= t.val_batches:
                    break
                with accelerator.autocast():
                    scene = model(batch["image"])
                res = proto_depth_loss(scene.slot_verts, scene.prototypes, faces, batch["cloud"], batch["lengths"],
                                       cfg.loss, generator=gen)
                bs = batch["image"].shape[0]
                for k, v in {"total": res.total, **res.terms}.items():
                    sums[k] = sums.get(k, 0) + v.float() * bs
                n += bs
        model.train()
        if not sums:
            return {}
        keys = sorted(sums)
        stacked = accelerator.reduce(torch.stack([sums[k] for k in keys] + [n]), reduction="sum")
        return {f"val/{k}": (stacked[i] / stacked[-1]).item() for i, k in enumerate(keys)}

    # ---- the loop
    model.train()
    bar = tqdm(total=t.max_steps, initial=state.step, disable=not is_main, desc="train", dynamic_ncols=True)
    t_start = time.perf_counter()
    t_last, samples_last = t_start, state.samples
    last_terms: dict[str, float] = {}
    last_val: dict[str, float] = {}
    rates: list[float] = []  # samples/s of every log interval of this process's run
    batch_paths: list[str] = []
    nonfinite_local = torch.zeros((), device=accelerator.device)
    bad_output_local = torch.zeros((), device=accelerator.device)
    lr = set_lr(state.step)
    # Point sampling draws from a generator re-seeded from (seed, step, micro-batch, rank) every micro-batch, not
    # from the global RNG: a resumed run then samples exactly what an uninterrupted one did, whatever else
    # (DataLoader iterators, libraries) consumed global random numbers in between.
    sample_gen = torch.Generator(device=accelerator.device)

    def forward_loss(image, cloud, lengths, key, generator):
        """Forward pass and loss of one micro-batch; key = (samples_per_slot, max_targets or None)."""
        with accelerator.autocast():
            scene = model(image)  # slot_verts (B, K, V, 3) fp32, prototypes (P, V, 3)
        try:
            res = proto_depth_loss(scene.slot_verts, scene.prototypes, faces, cloud, lengths, cfg.loss,
                                   samples_per_slot=key[0], generator=generator, max_targets=key[1])
        except ValueError:
            # the geometry refuses non-finite vertices; then the weights themselves have overflowed (a finite
            # but huge step), so skipping steps cannot help either: stop in both modes
            if bool(torch.isfinite(scene.slot_verts.detach()).all()):
                raise
            raise _NonFiniteOutput() from None
        return (scene, res), res.total

    def _nonfinite_output_error(step: int, epoch: int, paths: list[str]) -> NonFiniteError:
        return NonFiniteError(
            f"non-finite model output (slot vertices) at step {step} (epoch {epoch}): the weights overflowed at an "
            f"earlier step; batch files on rank {accelerator.process_index}: {', '.join(paths[:8])}"
            f"{' ...' if len(paths) > 8 else ''}. No checkpoint was written for this step; lower optim.lr or set "
            "optim.grad_clip")

    graphed = None
    why_not = cuda_graphs_blocker(cfg, accelerator.device, world, is_deepspeed)
    if t.cuda_graphs is True and why_not:
        raise ConfigError(f"train.cuda_graphs: {why_not}; set train.cuda_graphs=false (or auto)")
    if t.cuda_graphs is not False and not why_not:
        from protodepth.cuda_graphs import GraphedStep

        graphed = GraphedStep(forward_loss, list(model.parameters()), sample_gen, max_points=full_targets)
        log("CUDA graphs: on (forward, loss and backward replayed after 2 eager warm-up steps per sampling level; "
            "train.cuda_graphs=false turns them off)")
    elif t.cuda_graphs == "auto" and accelerator.device.type == "cuda":
        log(f"CUDA graphs: off ({why_not})")

    def check_flags(flags: list[float], step: int, epoch: int, paths: list[str]) -> bool:
        """Act on a step's (loss, grad-norm, model-output) non-finite flags; True if the step is dropped.

        Non-finite model output stops the run in both modes: the weights have overflowed, and skipping steps
        would skip every step from here on. Otherwise raise (on_nonfinite=error) or count a skipped step."""
        if flags[2] > 0:
            raise _nonfinite_output_error(step, epoch, paths)
        # fp16: inf gradients are the grad scaler's business (it skips the step and lowers the scale)
        if not (flags[0] > 0 or (flags[1] > 0 and t.mixed_precision != "fp16")):
            return False
        what = "loss" if flags[0] > 0 else "gradient norm"
        if t.on_nonfinite == "error":
            raise NonFiniteError(
                f"non-finite {what} at step {step} (epoch {epoch}); batch files on rank {accelerator.process_index}: "
                f"{', '.join(paths[:8])}{' ...' if len(paths) > 8 else ''}. No checkpoint was written for this "
                "step; set train.on_nonfinite=skip to drop such steps instead")
        state.skipped_steps += 1  # no optimizer step; its gradients are dropped
        return True

    # The deferred check needs an optimizer that can skip a step on the device: fused Adam (CUDA) reads
    # `found_inf` as it does under a grad scaler. fp16 has the scaler itself; DeepSpeed steps its own optimizer.
    inner_optimizer = getattr(optimizer, "optimizer", optimizer)
    deferred = DeferredCheck(check_flags, n_flags=3) if (accelerator.device.type == "cuda" and not is_deepspeed
                                              and t.mixed_precision != "fp16"
                                              and inner_optimizer.defaults.get("fused")) else None
    micro = 0
    viz_done, last_batch = -1, None
    done = state.step >= t.max_steps
    while not done:
        train_dl.set_epoch(state.epoch)
        train_ds.set_epoch(state.epoch)
        epoch_iter = accelerator.skip_first_batches(train_dl, state.batch_in_epoch) if state.batch_in_epoch else train_dl
        for batch in epoch_iter:
            state.batch_in_epoch += 1
            batch_paths.extend(batch["paths"])
            with accelerator.accumulate(model):
                n_targets = targets_ramp(state.step)
                key = (samples_ramp(state.step), n_targets if n_targets < full_targets else None)
                seed = (((t.seed * 1_000_003 + state.step) * 64 + micro) * 4096 + accelerator.process_index) % 2**63
                micro = 0 if accelerator.sync_gradients else micro + 1
                try:
                    if graphed is not None:  # forward, loss and backward in one replay; grads land in p.grad
                        scene, res = graphed(batch["image"], batch["cloud"], batch["lengths"], key, seed)
                    else:
                        sample_gen.manual_seed(seed)
                        (scene, res), _ = forward_loss(batch["image"], batch["cloud"], batch["lengths"], key,
                                                       sample_gen)
                except _NonFiniteOutput:
                    raise _nonfinite_output_error(state.step + 1, state.epoch, batch_paths) from None
                nonfinite_local += (~torch.isfinite(res.total.detach())).float()
                # Eagerly the geometry refuses non-finite vertices (above); a replayed graph cannot raise, so
                # the same fact travels as a flag
                bad_output_local += (~torch.isfinite(scene.slot_verts)).any().float()
                if graphed is None:
                    accelerator.backward(res.total)
                grad_norm = None
                if accelerator.sync_gradients and not is_deepspeed:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
                if accelerator.sync_gradients:
                    # agree across ranks whether this step is finite: (loss, gradient norm) flags, summed
                    grad_bad = torch.zeros_like(nonfinite_local) if grad_norm is None else \
                        (~torch.isfinite(grad_norm)).float().to(nonfinite_local.device)
                    flags = accelerator.reduce(torch.stack([nonfinite_local, grad_bad, bad_output_local]),
                                               reduction="sum")
                    nonfinite_local.zero_()
                    bad_output_local.zero_()
                    if deferred is not None:
                        # the previous step's flags: it finished while this step's work was being queued
                        deferred.resolve()
                        # Adam skips a non-finite step on the GPU (as under a grad scaler); the host reads
                        # the flags one step later instead of waiting for this step to finish
                        inner_optimizer.found_inf = (flags.sum() > 0).float()
                        deferred.push(flags, state.step + 1, state.epoch, batch_paths)  # before Adam: resolves sooner
                        optimizer.step()
                    else:
                        # one host sync per optimizer step
                        if not check_flags(flags.tolist(), state.step + 1, state.epoch, batch_paths):
                            optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step done
            batch_paths.clear()
            last_batch = (batch, scene, res)
            state.step += 1
            state.samples += global_batch
            bar.update(1)
            lr = set_lr(state.step)
            if deferred is not None and (
                    state.step % t.log_every == 0 or state.step >= t.max_steps
                    or (t.viz_every and state.step % t.viz_every == 0)
                    or (val_dl is not None and state.step % t.val_every == 0)
                    or (t.ckpt_every and state.step % t.ckpt_every == 0)):
                deferred.resolve()  # nothing is logged, drawn or saved from a step not known to be finite
            if state.step % t.log_every == 0 or state.step == t.max_steps:
                terms = accelerator.reduce(torch.stack([res.total.detach()] + list(res.terms.values())), "mean")
                last_terms = dict(zip(["loss"] + [f"loss/{k}" for k in res.terms], terms.tolist()))
                now = time.perf_counter()
                steps_done = t.log_every if state.step % t.log_every == 0 else state.step % t.log_every
                logs = {**last_terms, "lr": lr, "samples_per_s": (state.samples - samples_last) / (now - t_last),
                        "step_time_s": (now - t_last) / max(1, steps_done), "epoch": state.epoch,
                        "samples_per_slot": samples_ramp(state.step), "targets_per_image": targets_ramp(state.step)}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                elif is_deepspeed and hasattr(model, "get_global_grad_norm") and model.get_global_grad_norm() is not None:
                    logs["grad_norm"] = float(model.get_global_grad_norm())
                if torch.cuda.is_available():
                    logs["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                rates.append(logs["samples_per_s"])
                t_last, samples_last = now, state.samples
                state.history.append((state.step, last_terms["loss"]))
                accelerator.log(logs, step=state.step)
                bar.set_postfix(loss=f"{last_terms['loss']:.4g}", refresh=False)
            if t.viz_every and state.step % t.viz_every == 0:
                visualise(state.step, batch, scene, res)
                viz_done = state.step
            if val_dl is not None and state.step % t.val_every == 0:
                last_val = validate()
                accelerator.log(last_val, step=state.step)
            if (t.ckpt_every and state.step % t.ckpt_every == 0) or state.step == t.max_steps:
                save(state.step)
            if state.step >= t.max_steps:
                done = True
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    bar.close()
    if viz_done != state.step and last_batch is not None:
        visualise(state.step, *last_batch)

    elapsed = time.perf_counter() - t_start
    # every rank's parameter checksum: equal values prove the replicas stayed in step (DDP / DeepSpeed)
    with torch.no_grad():
        local_sum = sum(p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters())
    rank_checksums = accelerator.gather(local_sum.reshape(1).to(accelerator.device)).tolist()
    summary = {
        "steps": state.step,
        "samples": state.samples,
        "wall_s": round(elapsed, 2),
        "final": last_terms,
        "val": last_val,
        "first_loss": state.history[0][1] if state.history else None,
        "history": [tuple(h) for h in state.history],
        "skipped_steps": state.skipped_steps,
        # the first interval holds start-up (data workers, cuDNN autotuning): leave it out when there are others
        "samples_per_s_median": statistics.median(rates[1:] or rates) if rates else None,
        "processes": world,
        "rank_checksums": rank_checksums,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": t.mixed_precision,
        "cuda_graphs": graphed is not None,
        "checkpoint": str(ckpt.checkpoint_dirs(ckpt_root)[-1]) if ckpt.checkpoint_dirs(ckpt_root) else None,
        "output_dir": str(out),
    }
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log(_summary_text(summary))
    # Free the model, then end training: avoids gloo's rare "terminate called without an active exception" at
    # shutdown (shared/facts.md). This order matters for DeepSpeed, whose engine.destroy() asks for the rank:
    # after end_training() has destroyed the process group it fails ("DeepSpeed backend not set", H100 run).
    del model, optimizer, train_dl, val_dl
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return summary


def cuda_graphs_blocker(cfg: Config, device: torch.device, world: int, is_deepspeed: bool) -> str | None:
    """Why this run cannot replay its step from CUDA graphs (None: it can)."""
    t = cfg.train
    if device.type != "cuda":
        return f"needs a CUDA GPU, this run is on {device}"
    if world > 1 or is_deepspeed:
        return (f"captures the step of one process, this run has {world} process(es)"
                f"{' under DeepSpeed' if is_deepspeed else ''}: DDP/DeepSpeed collectives are not captured")
    if t.grad_accum > 1:
        return "needs train.grad_accum=1: a captured backward assigns gradients, it cannot add to them"
    if t.mixed_precision == "fp16":
        return "does not work with fp16's grad scaler; bf16 does"
    if t.compile:
        return "is not combined with train.compile"
    from protodepth.geometry.knn import _use_triton

    if not _use_triton():
        return ("needs the Triton KNN (PROTODEPTH_DISABLE_TRITON is set or triton is missing); its torch "
                "fallback copies values to the GPU on every call, which a capture does not allow")
    if cfg.progressive.shape in ("linear", "cosine"):
        # every new (samples, targets) pair is a new capture with its own memory: plateaus only
        return (f"progressive.shape={cfg.progressive.shape} changes the point counts every step; "
                "progressive.shape=step (num_levels plateaus, one graph each) works with graphs")
    return None


def _summary_text(s: dict) -> str:
    lines = [f"done: {s['steps']} steps, {s['samples']} samples in {s['wall_s']:.1f} s on {s['processes']} "
             f"process(es) ({s['distributed_type']}, mixed precision {s['mixed_precision']})"
             + (f", median {s['samples_per_s_median']:.0f} samples/s" if s["samples_per_s_median"] else "")]
    if s["first_loss"] is not None and s["final"]:
        lines.append(f"loss: {s['first_loss']:.4g} (first log) -> {s['final']['loss']:.4g} (last)")
    if s["val"]:
        lines.append("validation: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(s["val"].items())))
    if s["skipped_steps"]:
        lines.append(f"skipped {s['skipped_steps']} non-finite steps")
    lines.append(f"run folder: {s['output_dir']}  last checkpoint: {s['checkpoint']}")
    return "\n".join(lines)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
