"""Shared pytest fixtures and report hooks."""
import pytest

_GEOMETRY_DIFFS = pytest.StashKey[dict]()


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
