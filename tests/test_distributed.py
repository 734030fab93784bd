"""Real multi-process runs on the CPU, launched the way users launch: DDP over gloo and DeepSpeed ZeRO-2. The
launches are background jobs (trainer_utils): they run beside the in-process tests, these tests read them."""
import importlib.util
import json
from pathlib import Path

import pytest

from trainer_utils import (CPU_ENV, DDP_RUNS, LaneCall, accelerate_bin, background_job, free_port, launch_job,
                           run_script, tiny_overrides)

pytestmark = pytest.mark.slow


def test_two_process_ddp_on_cpu_trains_in_step_resumes_and_equals_the_flat_buffer(ddp_runs):
    # the first 2 steps: the session's 2-process DDP job (launched as two machines, trainer_utils.ddp_runs), which
    # wrote a checkpoint at step 2; its multi-node specifics are checked in tests/test_multinode.py
    s = ddp_runs.two_machines.summary
    assert s["processes"] == 2 and "MULTI_CPU" in s["distributed_type"]
    assert len(s["rank_checksums"]) == 2 and s["rank_checksums"][0] == s["rank_checksums"][1]
    # resumed on both ranks from the checkpoint at step 2 and gone on to step 4
    s2 = ddp_runs.resumed
    assert s2["steps"] == 4 and s2["rank_checksums"][0] == s2["rank_checksums"][1]
    assert [h[0] for h in s2["history"]] == [1, 2, 3, 4]
    assert s2["history"][:2] == s["history"]  # steps 1-2 restored from the checkpoint
    # train.data_parallel=flat is what several GPUs use with CUDA graphs (DDP's hooks do not run inside a
    # replay): the same 4 steps through one flat gradient buffer must keep the ranks identical and give DDP's
    # result, the same averaged gradients up to the order of float additions
    flat = ddp_runs.flat
    assert flat["rank_checksums"][0] == flat["rank_checksums"][1]
    for (a, la), (b, lb) in zip(s2["history"], flat["history"]):
        assert a == b and abs(la - lb) <= 1e-4 * abs(la), (s2["history"], flat["history"])
    assert abs(s2["rank_checksums"][0] - flat["rank_checksums"][0]) <= 1e-6 * abs(s2["rank_checksums"][0]) + 1e-3


def _zero2_fp32_run(folder: Path):
    o = tiny_overrides(folder, **{"train.max_steps": 2})
    # (DeepSpeed's own CPU path: no ACCELERATE_USE_CPU, which would fall back to plain DDP)
    env = {"CUDA_VISIBLE_DEVICES": "", "PROTODEPTH_CHECKPOINT_FSYNC": "0",
           "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions")}
    s = launch_job("accelerate_configs/deepspeed_zero2.yaml", o, env)
    return s, sorted(str(p.relative_to(s["checkpoint"])) for p in Path(s["checkpoint"]).rglob("*"))


def _scaling_run(folder: Path):
    results = folder / "scaling.json"
    cmd = [accelerate_bin(), "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "scripts/benchmark.py", "scaling", "--cpu-smoke",
           "--results", str(results)]
    r = run_script(cmd, env_extra=CPU_ENV, timeout=300)
    return r, (json.loads(results.read_text()) if r.returncode == 0 else None)


HAVE_DEEPSPEED = all(importlib.util.find_spec(m) is not None for m in ("deepspeed", "transformers"))
ZERO2_FP32 = LaneCall(_zero2_fp32_run)
SCALING = LaneCall(_scaling_run)
BACKGROUND_JOBS = {"ddp_runs": DDP_RUNS, "scaling_run": SCALING,
                   **({"zero2_fp32_run": ZERO2_FP32} if HAVE_DEEPSPEED else {})}


@pytest.fixture
def zero2_fp32_run():
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    return background_job("zero2_fp32_run", ZERO2_FP32).result(timeout=1800)


@pytest.fixture
def scaling_run():
    return background_job("scaling_run", SCALING).result(timeout=1800)


def test_two_process_deepspeed_zero2_on_cpu(zero2_fp32_run):
    s, files = zero2_fp32_run
    assert s["processes"] == 2 and "DEEPSPEED" in s["distributed_type"]
    assert s["rank_checksums"][0] == s["rank_checksums"][1]
    # DeepSpeed writes its own engine checkpoint (ZeRO optimizer shards per rank) inside save_state's folder
    shards = [f for f in files if f.endswith("optim_states.pt")]
    assert len(shards) == 2, files


def test_scaling_benchmark_runs_under_two_cpu_processes(scaling_run):
    """`scripts/benchmark.py scaling` (the DDP-efficiency benchmark of BENCHMARKS.md) on tiny CPU sizes."""
    r, rows = scaling_run
    assert r.returncode == 0, r.stderr[-4000:]
    assert [row["processes"] for row in rows] == [2] and rows[0]["samples_per_s"] > 0
    assert "MULTI_CPU" in rows[0]["distributed_type"]
    assert "| 2 |" in r.stdout and "n/a (no 1-process run)" in r.stdout
