#!/usr/bin/env python
"""protodepth benchmarks: `python scripts/benchmark.py BENCHMARK [options]`.

Each benchmark lives in `protodepth/benchmarks/<name>.py` (`compile`: compile_step.py) and reproduces one section
of BENCHMARKS.md; `python scripts/benchmark.py BENCHMARK --help` lists its options.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

BENCHMARKS = {
    "knn": "k-nearest-neighbour search: the Triton kernels against the PyTorch fallback (GPU)",
    "data": "loading throughput against DataLoader workers: PNG decoding against the preprocessed cache",
    "step": "the full training step against the ResNet-50-only step, per shape and precision (GPU)",
    "scaling": "data-parallel throughput under `accelerate launch` (DDP or DeepSpeed; --cpu-smoke on a CPU)",
    "compile": "the step's forward + loss under torch.compile (default, reduce-overhead) against the CUDA graph (GPU)",
}
MODULES = {"compile": "compile_step"}  # benchmark -> module in protodepth/benchmarks, where the names differ


def usage() -> str:
    width = max(map(len, BENCHMARKS))
    rows = "\n".join(f"  {name.ljust(width)}  {what}" for name, what in BENCHMARKS.items())
    return f"{__doc__.strip()}\n\nbenchmarks:\n{rows}"


def _main(argv: list[str]) -> int:
    from protodepth.errors import ConfigError

    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0].startswith("-"):
        raise ConfigError(f"name a benchmark first: one of {', '.join(BENCHMARKS)} (--help says what each measures)")
    if argv[0] not in BENCHMARKS:
        raise ConfigError(f"{argv[0]!r} is an unknown benchmark; choose one of {', '.join(BENCHMARKS)}")
    module = importlib.import_module(f"protodepth.benchmarks.{MODULES.get(argv[0], argv[0])}")
    return module.main(argv[1:]) or 0


def main(argv: list[str]) -> int:
    """Exit code 0, or 2 with one `error: ...` line for a user error (protodepth.errors.run_cli)."""
    from protodepth.errors import run_cli

    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
