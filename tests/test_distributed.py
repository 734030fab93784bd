"""Real multi-process runs on the CPU, launched the way users launch: DDP over gloo and DeepSpeed ZeRO-2."""
import json
from pathlib import Path

import pytest

from trainer_utils import CPU_ENV, accelerate_bin, free_port, override_args, run_script, tiny_overrides

pytestmark = pytest.mark.slow


def launch(config: str, overrides: dict, env: dict, nproc: int = 2):
    cmd = [accelerate_bin(), "launch", "--config_file", config, "--num_processes", str(nproc),
           "--main_process_port", str(free_port()), "scripts/train.py", *override_args(overrides)]
    r = run_script(cmd, env_extra=env, timeout=400)
    assert r.returncode == 0, f"launch failed:\nSTDOUT\n{r.stdout[-3000:]}\nSTDERR\n{r.stderr[-6000:]}"
    return json.loads(Path(overrides["train.output_dir"], "summary.json").read_text())


def test_two_process_ddp_on_cpu_trains_in_step_resumes_and_equals_the_flat_buffer(two_machine_run, tmp_path):
    env = CPU_ENV
    # the first 2 steps: the session's 2-process DDP job (launched as two machines, conftest.py), which wrote a
    # checkpoint at step 2; its multi-node specifics are checked in tests/test_multinode.py
    s = two_machine_run.summary
    assert s["processes"] == 2 and "MULTI_CPU" in s["distributed_type"]
    assert len(s["rank_checksums"]) == 2 and s["rank_checksums"][0] == s["rank_checksums"][1]
    o = {**two_machine_run.overrides, "train.viz_images": 0}
    # resume on both ranks from the checkpoint at step 2 and go on to step 4
    s2 = launch("accelerate_configs/cpu_2proc.yaml", {**o, "train.max_steps": 4, "train.resume": "latest"}, env)
    assert s2["steps"] == 4 and s2["rank_checksums"][0] == s2["rank_checksums"][1]
    assert [h[0] for h in s2["history"]] == [1, 2, 3, 4]
    assert s2["history"][:2] == s["history"]  # steps 1-2 restored from the checkpoint
    # train.data_parallel=flat is what several GPUs use with CUDA graphs (DDP's hooks do not run inside a
    # replay): the same 4 steps through one flat gradient buffer must keep the ranks identical and give DDP's
    # result, the same averaged gradients up to the order of float additions
    flat = launch("accelerate_configs/cpu_2proc.yaml", {**o, "train.max_steps": 4, "train.ckpt_every": 0,
                                                        "train.output_dir": str(tmp_path / "flat"),
                                                        "train.data_parallel": "flat"}, env)
    assert flat["rank_checksums"][0] == flat["rank_checksums"][1]
    for (a, la), (b, lb) in zip(s2["history"], flat["history"]):
        assert a == b and abs(la - lb) <= 1e-4 * abs(la), (s2["history"], flat["history"])
    assert abs(s2["rank_checksums"][0] - flat["rank_checksums"][0]) <= 1e-6 * abs(s2["rank_checksums"][0]) + 1e-3


def test_two_process_deepspeed_zero2_on_cpu(tmp_path):
    pytest.importorskip("deepspeed")
    pytest.importorskip("transformers")
    o = tiny_overrides(tmp_path, **{"train.max_steps": 2})
    # (DeepSpeed's own CPU path: no ACCELERATE_USE_CPU, which would fall back to plain DDP)
    env = {"CUDA_VISIBLE_DEVICES": "", "PROTODEPTH_CHECKPOINT_FSYNC": "0",
           "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions")}
    s = launch("accelerate_configs/deepspeed_zero2.yaml", o, env)
    assert s["processes"] == 2 and "DEEPSPEED" in s["distributed_type"]
    assert s["rank_checksums"][0] == s["rank_checksums"][1]
    ckpt = Path(s["checkpoint"])
    # DeepSpeed writes its own engine checkpoint (ZeRO optimizer shards per rank) inside save_state's folder
    shards = list(ckpt.rglob("*optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in ckpt.rglob("*"))


def test_scaling_benchmark_runs_under_two_cpu_processes(tmp_path):
    """`scripts/benchmark.py scaling` (the DDP-efficiency benchmark of BENCHMARKS.md) on tiny CPU sizes."""
    results = tmp_path / "scaling.json"
    cmd = [accelerate_bin(), "launch", "--config_file", "accelerate_configs/cpu_2proc.yaml", "--num_processes", "2",
           "--main_process_port", str(free_port()), "scripts/benchmark.py", "scaling", "--cpu-smoke",
           "--results", str(results)]
    r = run_script(cmd, env_extra=CPU_ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = json.loads(results.read_text())
    assert [row["processes"] for row in rows] == [2] and rows[0]["samples_per_s"] > 0
    assert "MULTI_CPU" in rows[0]["distributed_type"]
    assert "| 2 |" in r.stdout and "n/a (no 1-process run)" in r.stdout
