"""The scripts' command lines: help texts, flags, and one `error:` line (exit 2) for a wrong command line."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _script(name):
    spec = importlib.util.spec_from_file_location(f"protodepth_script_{name}", REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, argv, capsys):
    try:
        rc = mod.main(argv)
    except SystemExit as e:  # argparse's own exits (--help, bad flags)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def test_train_help_lists_every_config_field_with_its_default(capsys):
    from protodepth.config import config_fields

    rc, out, _ = _run(_script("train"), ["--help"], capsys)
    assert rc == 0
    for name, _, _ in config_fields():
        assert f"  {name}=" in out, name
    assert "  train.max_steps=1000" in out and "optimizer steps" in out  # default and comment
    assert "  optim.betas=[0.9, 0.999]" in out and "  data.root=null" in out
    # the example that spans two lines stays two lines (a bare backslash in the docstring used to join them)
    assert "scripts/train.py \\\n        --config configs/original.yaml" in out


def test_train_flags_become_config_overrides(capsys):
    from protodepth.config import load_config

    train = _script("train")
    args = train.parse_args(["--overwrite", "--max-steps", "5", "--output-dir", "runs/x", "optim.lr=0.5"])
    cfg = load_config(None, train.overrides_from_args(args))
    assert cfg.train.overwrite is True and cfg.train.max_steps == 5 and cfg.train.output_dir == "runs/x"
    assert cfg.optim.lr == 0.5
    assert load_config(None, train.overrides_from_args(train.parse_args([]))).train.overwrite is False


@pytest.mark.parametrize("argv, last", [
    (["bogus"], "error: 'bogus' is an unknown benchmark; choose one of knn, data, step, scaling, compile"),
    ([], "error: name a benchmark first: one of knn, data, step, scaling, compile (--help says what each measures)"),
    (["--shapes", "b2"], "error: name a benchmark first: one of knn, data, step, scaling, compile (--help says what "
                         "each measures)"),
])
def test_benchmark_without_a_known_benchmark_is_one_line(argv, last, capsys):
    rc, out, err = _run(_script("benchmark"), argv, capsys)
    assert rc == 2 and err[-1] == last and "Traceback" not in "\n".join(err)


def test_benchmark_help_names_every_benchmark(capsys):
    bench = _script("benchmark")
    rc, out, _ = _run(bench, ["--help"], capsys)
    assert rc == 0 and all(f"  {name}" in out for name in bench.BENCHMARKS)


def _options_without_help() -> dict[str, list[str]]:
    """Each benchmark's options that have no help text (their parsers are built inside main(): stop there)."""
    import argparse
    import importlib

    class Built(Exception):
        pass

    found = {}

    def record(self, *a, **k):
        found[self.prog] = [x.option_strings[-1] for x in self._actions if x.option_strings and x.help is None]
        raise Built

    real = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = record
    bench = _script("benchmark")
    try:
        for name in bench.BENCHMARKS:
            with pytest.raises(Built):
                importlib.import_module(f"protodepth.benchmarks.{bench.MODULES.get(name, name)}").main([])
    finally:
        argparse.ArgumentParser.parse_args = real
    return {prog: opts for prog, opts in found.items() if opts}


def test_every_benchmark_option_has_help_text():
    assert _options_without_help() == {}


def test_prepare_data_bad_flag_and_bad_config_are_one_line(tmp_path, capsys):
    prep = _script("prepare_data")
    rc, _, err = _run(prep, ["--workers", "-1"], capsys)
    assert rc == 2 and err[-1] == "error: argument --workers: got -1, must be >= 0"
    rc, _, err = _run(prep, ["--config", str(tmp_path), "--quiet"], capsys)
    assert rc == 2 and err == [f"error: config file {tmp_path}: is a folder, not a YAML file"]


def test_prepare_data_leaves_errors_that_are_not_the_users_to_their_traceback(monkeypatch):
    """Only protodepth's user errors become one line: a plain ValueError or OSError from deep inside is a bug
    whose traceback must be seen, not a line that hides where it came from."""
    import protodepth.data.cache as cache

    def broken(*a, **k):
        raise OSError("a bug, not a user error")

    monkeypatch.setattr(cache, "prepare_cache", broken)
    with pytest.raises(OSError, match="a bug"):
        _script("prepare_data").main(["--quiet"])
