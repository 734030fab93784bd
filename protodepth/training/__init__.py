"""The trainer's parts; `protodepth.train.train` composes them into one loop.

| module | its one job |
| --- | --- |
| `run.py` | build a run: accelerator, data, model, optimizer, the step, checkpointer (`build_run`) |
| `accel.py` | the Accelerator (DDP / DeepSpeed / precision / W&B wiring) and the launcher watchdog |
| `batches.py` | the training batches of this rank per epoch: the DataLoader path or the on-device path |
| `step.py` | `TrainStep`: the only code that runs forward, loss, backward, clipping and the optimizer step |
| `nonfinite.py` | `NonFiniteGuard`: the per-step finite flags, the deferred check, the skip or stop decision |
| `checkpointing.py` | `Checkpointer`: the run folder's owner check, save, resume, retention |
| `plan.py` | `StepPlan`: what happens after an optimizer step (log, pictures, validation, checkpoint) |
| `report.py` | `Reporter`: the start-up block, progress bar, metric logging and the end-of-run summary |
| `validation.py` | the validation pass |
| `state.py` | `TrainState`: the counters a resume restores |
"""
