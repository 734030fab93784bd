"""`build_run(cfg)`: everything a training loop needs, built once: accelerator, data, model, optimizer, the
step, the checkpointer, the reporter, the plan. The order matters and is explained where it does."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from protodepth.config import Config
from protodepth.errors import ConfigError, DataSetupError, UserError
from protodepth.model import ProtoDepth
from protodepth.training.accel import build_accelerator, end_with_launcher
from protodepth.training.batches import LoaderBatches, training_batches
from protodepth.training.checkpointing import Checkpointer
from protodepth.training.nonfinite import NonFiniteGuard
from protodepth.training.plan import StepPlan
from protodepth.training.report import Reporter
from protodepth.training.state import TrainState
from protodepth.training.step import TrainStep
from protodepth.training.tracking import prepare_wandb_env, resolve_wandb_mode, start_tracking


@dataclass
class Run:
    cfg: Config
    accelerator: object
    model: torch.nn.Module  # as prepared: DDP / DeepSpeed engine / plain module
    optimizer: object
    faces: torch.Tensor  # (F, 3), shared by every slot mesh and prototype
    train_batches: object  # .epoch(e, start) -> micro-batches of this rank
    val_batches: object | None  # iterable of validation batches, or None
    step: TrainStep
    state: TrainState
    checkpointer: Checkpointer
    reporter: Reporter
    plan: StepPlan
    graphs_note: str  # "on" or why not, for the start-up block
    wandb_mode: str
    data_note: str
    num_train: int
    num_val: int

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def _workers(cfg: Config) -> int:
    """DataLoader workers per process: a number, or "auto" from the cores this process gets."""
    from protodepth.data.loaders import workers_per_process

    return workers_per_process(cfg.data, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _datasets(cfg: Config, accelerator):
    from protodepth.data import build_datasets

    # the main process generates the synthetic scenes (if needed) before the others read them
    with accelerator.main_process_first():
        try:
            train_ds, val_ds = build_datasets(cfg.data, seed=cfg.train.seed)
        except UserError:  # the data layer's own errors name their file (some are FileNotFoundErrors too)
            raise
        except OSError as e:  # an OS failure the data layer did not name
            raise DataSetupError(f"data: {e}") from e
    need = cfg.train.batch_size * accelerator.num_processes
    if len(train_ds) < need:
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} per process x {accelerator.num_processes} processes needs "
            f"at least {need} training samples, the data has {len(train_ds)}")
    return train_ds, val_ds


def model_and_optimizer(cfg: Config, deepspeed: bool):
    model = ProtoDepth(cfg.model)
    # DeepSpeed flattens parameters through byte views, which need a unit last stride: no channels-last there
    if cfg.model.channels_last and not deepspeed:
        model = model.to(memory_format=torch.channels_last)
    # fused Adam: one kernel for all parameters instead of a dozen per tensor group (~3 ms/step on an H100); on
    # the CPU one pass over the ResNet-50's parameters too (0.03 instead of 0.12 s per step on a 2-core machine)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                 weight_decay=cfg.optim.weight_decay, fused=True)
    if cfg.train.compile:
        model = torch.compile(model)
    return model, optimizer


def data_parallel_is_flat(cfg: Config, graphed: bool, world: int, deepspeed: bool) -> bool:
    """Several processes average gradients through FlatGrads (True) or DDP's wrapper (False)."""
    mode = cfg.train.data_parallel
    if mode == "flat" and deepspeed:
        raise ConfigError("train.data_parallel: flat does not run under DeepSpeed (its engine reduces gradients); "
                          "use auto")
    return world > 1 and not deepspeed and (mode == "flat" or (mode == "auto" and graphed))


def prepare_for_training(cfg: Config, acc, model, optimizer, loaders: list, flat: bool):
    """Hand model, optimizer and DataLoaders to Accelerate -> (model, optimizer, loaders, FlatGrads or None).

    `flat` (several processes with CUDA graphs): the model is placed but not wrapped in DDP, whose reducer
    hooks do not run inside a graph replay; its gradients live in one flat buffer that the step all-reduces."""
    if flat:
        from protodepth.grad_sync import FlatGrads, broadcast_params_

        model = acc.prepare_model(model, evaluation_mode=True)  # placement and autocast, no DDP wrapper
        broadcast_params_(list(model.parameters()) + list(model.buffers()))  # as DDP does at construction
        return model, acc.prepare_optimizer(optimizer), [acc.prepare(d) for d in loaders], FlatGrads(model.parameters())
    if acc.distributed_type.name == "DEEPSPEED" and not loaders:
        # DeepSpeed reads its micro-batch size from a DataLoader, or from here
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    model, optimizer, *loaders = acc.prepare(model, optimizer, *loaders)
    return model, optimizer, loaders, None


def build_run(cfg: Config) -> Run:
    from accelerate.utils import DistributedType, set_seed

    from protodepth.cuda_graphs import blocker

    t = cfg.train
    end_with_launcher()
    wandb_mode = resolve_wandb_mode(t.wandb)
    prepare_wandb_env(wandb_mode)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    acc = build_accelerator(cfg, wandb_mode)
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    if deepspeed and t.on_nonfinite == "skip":
        raise ConfigError("train.on_nonfinite: skip cannot drop a step under DeepSpeed (its engine steps the optimizer "
                          "inside backward); use error")
    if t.mixed_precision == "fp16" and acc.device.type == "cpu":
        raise ConfigError("train.mixed_precision: fp16 needs a GPU (on the CPU it would train in fp32); use bf16 or no")
    checkpointer = Checkpointer(cfg, acc, acc.print)
    checkpointer.claim()
    set_seed(t.seed, device_specific=False)
    train_ds, val_ds = _datasets(cfg, acc)
    world = acc.num_processes
    why_not = blocker(cfg, acc.device, deepspeed, world)
    if t.cuda_graphs is True and why_not:
        raise ConfigError(f"train.cuda_graphs: {why_not}; set train.cuda_graphs=false (or auto)")
    graphed = t.cuda_graphs is not False and why_not is None
    flat = data_parallel_is_flat(cfg, graphed, world, deepspeed)

    model, optimizer = model_and_optimizer(cfg, deepspeed)
    faces = model.faces
    workers = _workers(cfg)
    train_src, val_src, data_note, loaders = training_batches(cfg, acc, train_ds, val_ds, workers)
    checkpointer.prepare_folder(min_free_bytes=4 * sum(p.numel() * p.element_size() for p in model.parameters())
                                + (64 << 20))
    model, optimizer, loaders, grad_sync = prepare_for_training(cfg, acc, model, optimizer, loaders, flat)
    if loaders:  # the DataLoader path: Accelerate's sharded, device-placed loaders
        train_src = LoaderBatches(loaders[0], train_ds)
        val_src = loaders[1] if len(loaders) > 1 else None
    faces = faces.to(acc.device)
    state = TrainState()
    acc.register_for_checkpointing(state)
    folder = checkpointer.resume(model)
    finished = state.step >= t.max_steps  # a resume of a finished run: keep its config.yaml and W&B run as they are
    if acc.is_main_process and not finished:
        cfg.save(Path(t.output_dir) / "config.yaml")
    acc.wait_for_everyone()

    guard = NonFiniteGuard.for_run(cfg, acc, optimizer, deepspeed)
    guard.skipped = state.skipped_steps
    step = TrainStep(cfg, acc, model, optimizer, faces, graphed=graphed, grad_sync=grad_sync, guard=guard,
                     deepspeed=deepspeed)
    step.set_lr(state.step)
    reporter = Reporter(acc, cfg, state, world)
    if folder is not None:
        reporter.say(f"resumed from {folder} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    if not finished:
        start_tracking(acc, cfg, state, wandb_mode, reporter.say)
    graphs_note = "on" if graphed else f"off ({why_not})" if t.cuda_graphs == "auto" else "off (train.cuda_graphs=false)"
    return Run(cfg, acc, model, optimizer, faces, train_src, val_src, step, state, checkpointer, reporter,
               StepPlan(t, val_src is not None), graphs_note, wandb_mode, data_note, len(train_ds), len(val_ds))
