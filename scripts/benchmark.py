#!/usr/bin/env python
"""protodepth benchmarks: `python scripts/benchmark.py {knn,data,step,scaling} [options]`.

Each sub-command lives in `protodepth/benchmarks/<name>.py` and reproduces one section of BENCHMARKS.md;
`python scripts/benchmark.py <name> --help` lists its options.
"""
import importlib
import sys

COMMANDS = ("knn", "data", "step", "scaling")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"protodepth.benchmarks.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
