"""The training loop. `train(cfg)` reads top to bottom; each rule it follows lives in one part of
`protodepth.training` (see its module table): the step, the finite check, checkpoints, the plan of what
happens after a step, and what the run reports."""
from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import torch

from protodepth.config import Config
from protodepth.training.plan import Actions
from protodepth.training.run import Run, build_run
from protodepth.training.validation import validate


def train(cfg: Config) -> dict:
    """Train per `cfg`; returns the end-of-run summary (also written to <output_dir>/summary.json)."""
    run = build_run(cfg)
    t, st, rep = cfg.train, run.state, run.reporter
    if st.step >= t.max_steps:
        return _nothing_to_train(run)
    rep.start(startup_lines(run))
    wall_before, t0 = st.wall_s, time.perf_counter()
    run.model.train()
    while st.step < t.max_steps:
        for batch in run.train_batches.epoch(st.epoch, st.batch_in_epoch):
            st.batch_in_epoch += 1
            out = run.step(batch, st.step, st.epoch)  # forward, loss, backward; the optimizer at window ends
            if not out.synced:
                continue
            st.step += 1
            st.samples += rep.global_batch
            rep.step_done(out)
            actions = run.plan(st.step)
            if actions.any:  # nothing is logged, drawn or saved from a step not known to be finite
                run.step.guard.settle()
            st.skipped_steps = run.step.guard.skipped
            st.wall_s = wall_before + time.perf_counter() - t0
            after_step(run, actions, batch, out)
            if actions.last:
                break
        else:  # the epoch ran out before max_steps
            st.epoch += 1
            st.batch_in_epoch = 0
    rep.close()
    return finish(run)


def after_step(run: Run, actions: Actions, batch: dict, out) -> None:
    """Log, draw, validate and checkpoint as the plan says for this step (in that order)."""
    st, rep = run.state, run.reporter
    if actions.log:
        rep.log(out, run.step.lr, run.step.levels)
    if actions.pictures and run.cfg.train.viz_images:
        pictures(run, batch, out)
    if actions.validate:
        run.step.sync_buffers()
        rep.validation(st.step, validate(run.accelerator, run.model, run.faces, run.val_batches, run.cfg))
    if actions.checkpoint:
        run.step.sync_buffers()
        rep.say(f"step {st.step}: checkpoint {run.checkpointer.save(st.step)}")


def pictures(run: Run, batch: dict, out) -> None:
    """Pictures and meshes of this batch into <output_dir>/viz/step_*, and to W&B when it is on."""
    if not run.is_main:
        return
    from protodepth import viz

    step, out_dir = run.state.step, Path(run.cfg.train.output_dir)
    n = run.cfg.train.viz_images
    paths = viz.snapshot(out_dir, step, batch, out.scene, out.loss.pred_points, run.faces,
                         float(out.loss.total.detach()), run.cfg.data, max_images=n)
    if run.wandb_mode != "disabled":
        run.accelerator.log(viz.wandb_payload(paths, batch, out.loss.pred_points,
                                              prototypes=out.scene.prototypes.detach(), max_images=n), step=step)
    run.reporter.say(f"step {step}: pictures in {out_dir / 'viz' / f'step_{step:08d}'}")


def startup_lines(run: Run) -> dict[str, str]:
    """The "***** Running training *****" block: what this run is about to do."""
    cfg, acc, st = run.cfg, run.accelerator, run.state
    t, m = cfg.train, cfg.model
    params = sum(p.numel() for p in acc.unwrap_model(run.model).parameters())
    per_epoch = run.train_batches.batches_per_epoch // t.grad_accum
    return {
        "data": f"{run.num_train} training / {run.num_val} validation frames at {cfg.data.height}x{cfg.data.width}"
                f" ({run.data_note})",
        "model": f"{params / 1e6:.1f} M parameters, K={m.num_slots} slots, P={m.num_prototypes} prototypes, "
                 f"icosphere level {m.ico_level}",
        "processes": f"{acc.num_processes} ({acc.distributed_type}), batch {t.batch_size} per process, global "
                     f"batch {run.reporter.global_batch} (grad_accum {t.grad_accum})",
        "steps": f"{t.max_steps} optimizer steps from step {st.step} ({per_epoch} per epoch)",
        "precision": f"{t.mixed_precision}, CUDA graphs {run.graphs_note}",
        "output": f"{t.output_dir} (W&B {run.wandb_mode})",
    }


def finish(run: Run) -> dict:
    """The end-of-run summary, written and printed once; then the run's resources are freed."""
    acc = run.accelerator
    # every rank's parameter checksum: equal values prove the replicas stayed in step (DDP / DeepSpeed)
    with torch.no_grad():
        local = sum(p.detach().double().sum() for p in acc.unwrap_model(run.model).parameters())
    latest = run.checkpointer.latest()
    summary = run.reporter.summary({
        "processes": acc.num_processes,
        "rank_checksums": acc.gather(local.reshape(1).to(acc.device)).tolist(),
        "distributed_type": str(acc.distributed_type),
        "mixed_precision": run.cfg.train.mixed_precision,
        "cuda_graphs": run.step.graphed is not None,
        "checkpoint": str(latest) if latest else None,
        "output_dir": run.cfg.train.output_dir,
    })
    run.reporter.write_summary(summary, Path(run.cfg.train.output_dir))
    _teardown(run)
    return summary


def _nothing_to_train(run: Run) -> dict:
    """A resume of a finished run: say so, keep its summary.json as it is, train nothing."""
    t, out = run.cfg.train, Path(run.cfg.train.output_dir)
    run.reporter.say(f"nothing to train: the run in {out} is already at step {run.state.step} of train.max_steps="
                     f"{t.max_steps}; raise --max-steps to train further")
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):  # missing or damaged: the run's own files are left as they are
        summary = {"steps": run.state.step}
    _teardown(run)
    return summary


def _teardown(run: Run) -> None:
    # Free the model, then end training: avoids gloo's rare "terminate called without an active exception" at
    # shutdown. This order matters for DeepSpeed, whose engine.destroy() asks for the rank: after
    # end_training() has destroyed the process group it fails ("DeepSpeed backend not set").
    acc = run.accelerator
    run.model = run.optimizer = run.train_batches = run.val_batches = run.step = None
    acc.free_memory()
    gc.collect()
    acc.end_training()
