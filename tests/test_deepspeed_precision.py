"""DeepSpeed ZeRO-2 under bf16 / fp16 (issue 15 item 2), launched the way users launch it.

DeepSpeed's engine casts the model's parameters to bf16 / fp16 itself (BatchNorm running statistics and the
other buffers stay fp32) and, unlike DDP, does not autocast: Accelerate's `autocast()` is a no-op under
DeepSpeed. With fp16, Accelerate asks for DeepSpeed's `auto_cast`, which casts the forward's floating inputs
to half; with bf16 nothing casts them, so the trainer must feed the engine inputs of its dtype. Casting the
input is not enough on its own: BatchNorm refuses bf16 weights beside fp32 running statistics ("expected scalar
type BFloat16 but found Float"), so those statistics must follow the engine's dtype too (or DeepSpeed's
`torch_autocast` mode keeps every parameter fp32 and autocasts instead).

On the CPU only bf16 is tried: protodepth refuses fp16 on the CPU (train.mixed_precision), and DeepSpeed's CPU
accelerator allows fp16 only where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16), otherwise stopping at
`deepspeed.initialize` with "Type fp16 is not supported on your device.". fp16 runs in the 2-GPU test.
"""
import importlib.util
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch

from trainer_utils import (PICTURES, LaneCall, accelerate_bin, background_job, override_args, run_script,
                           tiny_overrides)

pytestmark = pytest.mark.slow

EXT_DIR = str(Path.home() / ".cache" / "torch_extensions")  # DeepSpeed's compiled ops, reused between runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_zero2(overrides: dict, env: dict) -> dict:
    cmd = [accelerate_bin(), "launch", "--config_file", "accelerate_configs/deepspeed_zero2.yaml",
           "--num_processes", "2", "--main_process_port", str(_free_port()), "scripts/train.py",
           *override_args(overrides)]
    r = run_script(cmd, env_extra={"TORCH_EXTENSIONS_DIR": EXT_DIR, **env}, timeout=500)
    assert r.returncode == 0, f"launch failed:\nSTDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-6000:]}"
    return json.loads(Path(overrides["train.output_dir"], "summary.json").read_text())


def _check_trained(s: dict, precision: str, steps: int) -> None:
    assert s["processes"] == 2 and "DEEPSPEED" in s["distributed_type"]
    assert s["mixed_precision"] == precision
    assert s["steps"] == steps and [h[0] for h in s["history"]] == list(range(1, steps + 1))
    assert all(math.isfinite(h[1]) for h in s["history"]), s["history"]
    assert s["rank_checksums"][0] == s["rank_checksums"][1]
    # DeepSpeed's own engine checkpoint: one ZeRO optimizer shard per rank
    assert len(list(Path(s["checkpoint"]).rglob("*optim_states.pt"))) == 2


def _zero2_bf16_cpu_run(folder: Path):
    """The launch, a background job (trainer_utils) that runs beside the in-process tests: (summary, pictures)."""
    o = tiny_overrides(folder, **{"train.max_steps": 2, "train.mixed_precision": "bf16", **PICTURES})
    s = _launch_zero2(o, {"CUDA_VISIBLE_DEVICES": "", "PROTODEPTH_CHECKPOINT_FSYNC": "0"})
    return s, sorted(Path(o["train.output_dir"], "viz").rglob("*.png"))


ZERO2_BF16_CPU = LaneCall(_zero2_bf16_cpu_run)
HAVE_DEEPSPEED = all(importlib.util.find_spec(m) is not None for m in ("deepspeed", "transformers"))
BACKGROUND_JOBS = {"zero2_bf16_cpu_run": ZERO2_BF16_CPU} if HAVE_DEEPSPEED else {}


@pytest.fixture
def zero2_bf16_cpu_run():
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    return background_job("zero2_bf16_cpu_run", ZERO2_BF16_CPU).result(timeout=1800)


def test_deepspeed_zero2_trains_under_bf16_on_cpu(zero2_bf16_cpu_run):
    s, pictures = zero2_bf16_cpu_run
    _check_trained(s, "bf16", steps=2)
    assert pictures  # the end-of-run pictures, drawn from the engine's bf16 run


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deepspeed_zero2_trains_saves_and_resumes_on_two_gpus(tmp_path, precision):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    env = {"NCCL_NVLS_ENABLE": "0", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0,1")}
    o = tiny_overrides(tmp_path, **{"train.max_steps": 4, "train.ckpt_every": 2, "train.mixed_precision": precision})
    _check_trained(_launch_zero2({**o, "train.max_steps": 2}, env), precision, steps=2)
    s = _launch_zero2({**o, "train.resume": "latest"}, env)
    assert [h[0] for h in s["history"]] == [1, 2, 3, 4]  # history restored from the step-2 checkpoint
    _check_trained(s, precision, steps=4)
