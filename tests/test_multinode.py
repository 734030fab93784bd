"""Two one-process "machines" on localhost train together over gloo, launched the way a multi-node job is:
the same `accelerate launch` on every machine with --num_machines 2 and its own --machine_rank (the job is the
session fixture `ddp_runs` of conftest.py, a background job that tests/test_distributed.py then resumes)."""
import math

import pytest

from trainer_utils import DDP_RUNS

pytestmark = pytest.mark.slow

BACKGROUND_JOBS = {"ddp_runs": DDP_RUNS}


def test_two_single_process_machines_train_together_over_gloo(ddp_runs):
    two_machine_run = ddp_runs.two_machines
    results, s = two_machine_run.results, two_machine_run.summary
    assert s["processes"] == 2 and "MULTI_CPU" in s["distributed_type"]
    # the two machines stayed in step: their parameter checksums are equal
    assert len(s["rank_checksums"]) == 2 and s["rank_checksums"][0] == s["rank_checksums"][1]
    assert s["steps"] == 2 and [h[0] for h in s["history"]] == [1, 2]
    assert all(math.isfinite(h[1]) for h in s["history"])
    # only machine rank 0 (global rank 0) prints the run summary; machine 1 leaves its working folder empty
    assert "done: 2 steps" in results[0].stdout and "done: 2 steps" not in results[1].stdout
    assert not two_machine_run.machine1_files, two_machine_run.machine1_files
    # the end-of-run pictures are drawn under DDP too (by the main process)
    assert two_machine_run.pictures, results[0].stdout[-3000:]
