"""Shared pytest fixtures and report hooks."""
import gc

import pytest

_GEOMETRY_DIFFS = pytest.StashKey[dict]()


def pytest_configure(config):
    # One intra-op thread for the tests run in this process. Their tensors are tiny, so a second thread gains
    # little even on an idle machine, while a busy second core (a background job of this suite, a test's
    # subprocesses, another program) makes the threads wait on each other: tests/test_train.py took 82 s with
    # one thread and 428 s with two on a 2-core machine that other programs kept busy (load 2-5).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def gc_sees_only_new_objects():
    """After each test: collect its garbage, then freeze what survives (gc.freeze) so that later full collections
    skip it. The suite's process holds ~400 000 long-lived objects once torch, torch._dynamo and Accelerate are
    imported; a full collection walks them all (0.4-1 s on this 2-core machine), and every in-process training
    run triggers two (the trainer's teardown and Accelerate's free_memory) besides the interpreter's own.
    Frozen objects are still freed when their last reference goes; only cycles among them would stay."""
    yield
    gc.collect()
    gc.freeze()


def _reads_a_background_job(item) -> bool:
    jobs = getattr(getattr(item, "module", None), "BACKGROUND_JOBS", {})
    return any(name in jobs for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(session, config, items):
    """The tests that read a background job run last (each group in its collected order): the lane then runs
    its jobs while every in-process test runs, instead of the session waiting for a job at the reading test's
    place while the lane has nothing left for the other core (trainer_utils: the background jobs)."""
    items[:] = [i for i in items if not _reads_a_background_job(i)] + [i for i in items if _reads_a_background_job(i)]


@pytest.fixture(scope="session", autouse=True)
def background_jobs(request):
    """Starts, with the session's first test, the subprocess jobs that the modules of the selected tests declare
    in BACKGROUND_JOBS for a fixture those tests use (trainer_utils says why); ends what is left at the end.
    One-core jobs are queued first: they fit beside the in-process tests, while the LaneCalls' 2-process
    launches get both cores once the in-process tests are done."""
    from trainer_utils import LaneCall, background_job, end_background_jobs

    wanted = {}
    for item in request.session.items:
        for name, start in getattr(getattr(item, "module", None), "BACKGROUND_JOBS", {}).items():
            if name in item.fixturenames:
                wanted.setdefault(name, start)
    for name, start in sorted(wanted.items(), key=lambda job: job[1].cores if isinstance(job[1], LaneCall) else 0):
        background_job(name, start)
    yield
    end_background_jobs()


@pytest.fixture(scope="session")
def reference_report(request):
    """dict op -> (max abs diff, max rel diff) against tests/data/pytorch3d_reference.npz; printed at the end."""
    return request.config.stash.setdefault(_GEOMETRY_DIFFS, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    diffs = config.stash.get(_GEOMETRY_DIFFS, None)
    if not diffs:
        return
    terminalreporter.write_sep("-", "geometry ops: largest difference to the PyTorch3D 0.7.9 reference vectors")
    terminalreporter.write_line(f"{'op / key':<34} {'max abs diff':>14} {'max rel diff':>14}")
    for key in sorted(diffs):
        abs_d, rel_d = diffs[key]
        terminalreporter.write_line(f"{key:<34} {abs_d:>14.3e} {rel_d:>14.3e}")


@pytest.fixture(scope="session")
def ddp_runs():
    """The session's 2-process DDP jobs, one lane job of trainer_utils (ddp_runs says what it holds): read by
    tests/test_multinode.py (the two-machine launch) and tests/test_distributed.py (its resume, the flat buffer)."""
    from trainer_utils import DDP_RUNS, background_job

    return background_job("ddp_runs", DDP_RUNS).result(timeout=1800)
