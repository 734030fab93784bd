"""README's two commands: the first installs only what training needs and launches without Accelerate's
"defaults" warning; the second is exactly what CI runs; the trainer works where DeepSpeed is not installed."""
from __future__ import annotations

import logging
import os
import re
import shlex
import textwrap

import pytest

from trainer_utils import REPO, tiny_overrides


def readme_lines() -> list[str]:
    """The two command lines of README's first ```bash block (train, test)."""
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    return lines


def steps(line: str) -> list[str]:
    return [s.strip() for s in line.split("&&")]


def test_readme_train_line_installs_the_base_without_test_tools_or_deepspeed():
    install = [s for s in steps(readme_lines()[0]) if s.startswith("pip install")]
    assert install == ["pip install -e ."]


def test_readme_test_line_installs_the_dev_extra_and_runs_pytest():
    assert steps(readme_lines()[1])[-2:] == ['pip install -e ".[dev]"', "python -m pytest -q"]


def test_ci_runs_readme_test_line_exactly():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.strip() and not line.startswith("#")]
    assert readme_lines()[1] in commands
    # nothing else installs packages or runs tests: CI fails when README's line is not enough
    others = [c for c in commands if c != readme_lines()[1]]
    assert not [c for c in others if re.search(r"\b(pip|pytest)\b", c)], others


def _launch_warnings(launch_args: list[str], monkeypatch, tmp_path, caplog) -> tuple[list[str], object]:
    """What `accelerate launch ARGS` would warn about its settings (its own check, run without launching), with
    no personal default config (`accelerate config`) on this machine."""
    import accelerate.commands.launch as launch

    monkeypatch.setattr(launch, "default_config_file", str(tmp_path / "no_default_config.yaml"))
    args = launch.launch_command_parser().parse_args(launch_args)
    with caplog.at_level(logging.WARNING, logger=launch.logger.name):
        args, _, _ = launch._validate_launch_command(args)
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], args


def test_readme_train_command_launches_without_accelerates_defaults_warning(monkeypatch, tmp_path, caplog):
    words = shlex.split(steps(readme_lines()[0])[-1])
    assert words[:2] == ["accelerate", "launch"] and "scripts/train.py" in words
    launch_args = words[2:]
    config = launch_args[launch_args.index("--config_file") + 1]
    assert (REPO / config).is_file()
    monkeypatch.chdir(REPO)
    warned, args = _launch_warnings(launch_args, monkeypatch, tmp_path, caplog)
    assert warned == []
    assert args.num_processes == 1 and not args.multi_gpu and not args.use_deepspeed
    assert args.gpu_ids == "all"  # leaves the user's CUDA_VISIBLE_DEVICES alone


def test_bare_accelerate_launch_warns_so_the_check_above_can_fail(monkeypatch, tmp_path, caplog):
    warned, _ = _launch_warnings(["scripts/train.py"], monkeypatch, tmp_path, caplog)
    assert any("had defaults used instead" in w for w in warned)


BLOCK_DEEPSPEED = textwrap.dedent("""
    import sys
    # as if neither were installed: import fails, importlib.util.find_spec returns None
    sys.modules["deepspeed"] = None
    sys.modules["transformers"] = None
    from accelerate.utils import is_deepspeed_available
    assert not is_deepspeed_available()
    import protodepth.train, protodepth.inference
    from protodepth.config import load_config
    import yaml
    summary = protodepth.train.train(load_config(None, yaml.safe_load(sys.argv[1])))
    assert "deepspeed" not in {m.split(".")[0] for m, v in sys.modules.items() if v is not None}
    print("trained", summary.get("step", summary.get("steps")))
""")


def _no_deepspeed_run(folder):
    """A background job of trainer_utils (it runs beside the in-process tests): one step with DeepSpeed and
    transformers blocked (checkpoint without fsync: nothing here needs durability)."""
    import yaml

    from trainer_utils import python

    overrides = tiny_overrides(folder, **{"train.max_steps": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PROTODEPTH_CHECKPOINT_FSYNC": "0"}
    return [python(), "-c", BLOCK_DEEPSPEED, yaml.safe_dump(overrides)], env, {}


BACKGROUND_JOBS = {"no_deepspeed_run": _no_deepspeed_run}


@pytest.fixture
def no_deepspeed_run():
    from trainer_utils import background_job

    return background_job("no_deepspeed_run", _no_deepspeed_run).result(timeout=900)


@pytest.mark.slow
def test_trainer_trains_without_deepspeed_installed(no_deepspeed_run):
    rc, out, err = no_deepspeed_run
    assert rc == 0, err[-3000:]
    assert "trained" in out
