"""`Reporter`: what a run says: the start-up block, the progress bar, metric logging, and the end summary."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


class Reporter:
    """Main-process output and W&B logging. Metrics are read from the device only at log points."""

    def __init__(self, accelerator, cfg, state, world: int):
        self.acc, self.cfg, self.state = accelerator, cfg, state
        self.main = accelerator.is_main_process
        self.global_batch = cfg.train.batch_size * world * cfg.train.grad_accum
        self.bar = None
        self.t_start = self.t_last = time.perf_counter()
        self.samples_last = state.samples
        self.loss_sum, self.loss_n = None, 0  # this log interval's losses, summed on the device
        self.rates: list[float] = []  # samples/s of every log interval of this session
        self.last_terms: dict[str, float] = dict(state.final)  # a resumed run starts from its last log point

    def say(self, msg: str) -> None:
        """A line for the user (main process), printed above the progress bar."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def start(self, lines: dict[str, str]) -> None:
        from tqdm.auto import tqdm

        self.say("***** Running training *****\n" + "\n".join(f"  {k}: {v}" for k, v in lines.items()))
        t = self.cfg.train
        self.bar = tqdm(total=t.max_steps, initial=self.state.step, disable=not self.main, desc="train",
                        dynamic_ncols=True)
        self.t_start = self.t_last = time.perf_counter()

    def step_done(self, out) -> None:
        total = out.loss.total.detach().float()
        self.loss_sum = total.clone() if self.loss_sum is None else self.loss_sum + total
        self.loss_n += 1
        self.bar.update(1)

    def log(self, out, lr: float, levels) -> None:
        """Log the interval that ends at this step: mean loss, terms of this batch, rates, memory."""
        st, t = self.state, self.cfg.train
        terms = self.acc.reduce(torch.stack([out.loss.total.detach().float()] +
                                            [v.float() for v in out.loss.terms.values()]), "mean")
        mean = self.acc.reduce(self.loss_sum / max(1, self.loss_n), "mean")
        self.loss_sum, self.loss_n = None, 0
        self.last_terms = dict(zip(["loss"] + [f"loss/{k}" for k in out.loss.terms], terms.tolist()))
        now = time.perf_counter()
        steps = t.log_every if st.step % t.log_every == 0 else st.step % t.log_every
        level = levels(st.step)
        logs = {**self.last_terms, "loss_mean": float(mean), "lr": lr, "epoch": st.epoch,
                "samples_per_s": (st.samples - self.samples_last) / (now - self.t_last),
                "step_time_s": (now - self.t_last) / max(1, steps),
                "samples_per_slot": level.samples_per_slot,
                "targets_per_image": level.max_targets or levels.full_targets}
        if out.grad_norm is not None:
            logs["grad_norm"] = float(out.grad_norm)
        if torch.cuda.is_available():
            logs["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.rates.append(logs["samples_per_s"])
        self.t_last, self.samples_last = now, st.samples
        st.history.append((st.step, self.last_terms["loss"]))
        st.final = self.last_terms
        self.acc.log(logs, step=st.step)
        self.bar.set_postfix(loss=f"{logs['loss_mean']:.4g}", refresh=False)

    def validation(self, step: int, val: dict[str, float]) -> None:
        if not val:
            return
        self.state.val_history.append((step, val))
        self.acc.log(val, step=step)
        self.say(f"step {step}: validation " + ", ".join(f"{k[4:]}={v:.4g}" for k, v in sorted(val.items())))

    def close(self) -> float:
        """End the bar; this session's training seconds."""
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.t_start

    def summary(self, extra: dict) -> dict:
        st = self.state
        last_val = st.val_history[-1][1] if st.val_history else {}
        return {
            "steps": st.step,
            "samples": st.samples,
            "wall_s": round(st.wall_s, 2),
            "final": self.last_terms,
            "val": last_val,
            "first_loss": st.history[0][1] if st.history else None,
            "history": [tuple(h) for h in st.history],
            "val_history": [(s, v) for s, v in st.val_history],
            "skipped_steps": st.skipped_steps,
            # the first interval holds start-up (data workers, cuDNN autotuning): left out when there are others
            "samples_per_s_median": statistics.median(self.rates[1:] or self.rates) if self.rates else None,
            **extra,
        }

    def write_summary(self, s: dict, out: Path) -> None:
        if self.main:
            (out / "summary.json").write_text(json.dumps(s, indent=1))
            self.say(summary_text(s))


def summary_text(s: dict) -> str:
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
