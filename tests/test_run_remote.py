"""scripts/run_remote.sh through its --dry-run: the printed commands, argument pass-through, and errors.

Network is never used: a fake `ssh` / `rsync` first on PATH records any call, and the tests assert none."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "run_remote.sh"


@pytest.fixture
def env(tmp_path):
    """Environment with fake ssh/rsync that log a call and fail, so a real connection can't happen."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("ssh", "rsync", "tmux"):
        f = bin_dir / tool
        f.write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {tmp_path / 'calls.log'}\nexit 97\n")
        f.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if not k.startswith("PROTODEPTH_REMOTE")}
    e["PATH"] = f"{bin_dir}{os.pathsep}{e.get('PATH', '')}"
    return e


def run(args, env, **kw):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30, **kw)


def launcher_text(out: str) -> str:
    m = re.search(r"<<'LAUNCHER'\n(.*?)\nLAUNCHER\n", out, re.S)
    assert m, out
    return m.group(1)


def commands(out: str) -> list[str]:
    return [l[2:] for l in out.splitlines() if l.startswith("+ ")]


def test_dry_run_prints_every_step_and_passes_args_through(tmp_path, env):
    acc = tmp_path / "accel.yaml"
    acc.write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    data = tmp_path / "SYNTHIA-SF"
    (data / "SEQ1" / "DepthLeft").mkdir(parents=True)
    train_args = ["--config", "configs/original.yaml", "train.max_steps=10", "data.val_sequences=[SEQ1, SEQ2]",
                  "train.run_name=it's a $HOME test"]
    r = run(["--dry-run", "--host", "me@gpu1", "--remote-dir", "/srv/pd", "--accelerate-config", str(acc),
             "--data", str(data), "--name", "exp1", "--ssh-opt", "-p", "--ssh-opt", "2222", "--", *train_args], env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "calls.log").exists(), "dry run called ssh/rsync"
    cmds = commands(r.stdout)
    code_sync = next(c for c in cmds if c.startswith("rsync") and f"{REPO}/ me@gpu1:/srv/pd/" in c)
    for ex in ("runs/", ".venv/", "wandb/", "data_cache/"):
        assert f"--exclude={ex}" in code_sync
    assert "-e 'ssh -p 2222'" in code_sync
    assert any(c.startswith("rsync") and f"{acc} me@gpu1:/srv/pd/.remote_configs/accel.yaml" in c for c in cmds)
    assert any(c.startswith("rsync") and f"{data}/ me@gpu1:/srv/pd/data/SYNTHIA-SF/" in c for c in cmds)
    assert any(c.startswith("ssh -p 2222 me@gpu1") and "nohup bash /srv/pd/logs/exp1.sh > /srv/pd/logs/exp1.log"
               in c for c in cmds)
    assert cmds[-1] == "ssh -p 2222 -t me@gpu1 'cd && tail -n +1 -F /srv/pd/logs/exp1.log'"

    script = launcher_text(r.stdout)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "cd /srv/pd" in script
    exec_line = next(l for l in script.splitlines() if l.startswith("exec accelerate launch"))
    assert exec_line.startswith("exec accelerate launch --config_file .remote_configs/accel.yaml scripts/train.py ")
    # the remote shell must see exactly our arguments, plus the dataset ones --data adds
    words = exec_line[len("exec accelerate launch --config_file .remote_configs/accel.yaml scripts/train.py "):]
    got = subprocess.run(["bash", "-c", f"printf '%s\\n' {words}"], capture_output=True, text=True,
                         env={"HOME": "/should-not-expand", "PATH": os.environ["PATH"]}).stdout.splitlines()
    assert got == train_args + ["data.source=synthia", "data.root=data/SYNTHIA-SF"]


def test_tmux_env_host_and_repo_config(env):
    env = dict(env, PROTODEPTH_REMOTE_HOST="lab-gpu")
    r = run(["--dry-run", "--tmux", "--no-follow", "--name", "t1", "--accelerate-config",
             str(REPO / "pyproject.toml"), "train.max_steps=5"], env)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert all(" lab-gpu" in c or "lab-gpu:" in c for c in cmds)
    assert any("tmux new-session -d -s t1" in c and "tee protodepth/logs/t1.log" in c for c in cmds)
    assert not any("nohup" in c for c in cmds) and not any("tail" in c for c in cmds)
    assert not any(".remote_configs" in c for c in cmds)  # a file inside the repo travels with the code
    assert "--config_file pyproject.toml scripts/train.py train.max_steps=5" in launcher_text(r.stdout)
    assert "data.root" not in launcher_text(r.stdout)


def test_errors_and_help(env):
    r = run(["--dry-run", "train.max_steps=1"], env)
    assert r.returncode == 2
    assert "no host given" in r.stderr and "PROTODEPTH_REMOTE_HOST" in r.stderr
    r = run(["--host", "h", "--bogus"], env)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr
    r = run(["--host", "h", "--dry-run", "--data", "/no/such/folder"], env)
    assert r.returncode == 2 and "/no/such/folder" in r.stderr
    r = run(["--help"], env)
    assert r.returncode == 0 and "--dry-run" in r.stdout and "PROTODEPTH_REMOTE_HOST" in r.stdout


def test_real_run_stops_at_the_first_failing_command(tmp_path, env):
    """Without --dry-run the commands really run (here: fake ssh that fails) and the first failure ends it."""
    r = run(["--host", "h", "--no-follow", "train.max_steps=1"], env)
    assert r.returncode == 97
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["ssh h mkdir -p protodepth/logs"]
