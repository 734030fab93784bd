"""The config tree: every shipped YAML loads, overrides apply, bad values name their field."""
from pathlib import Path

import pytest
import yaml

from protodepth.config import Config, ConfigError, load_config, parse_override

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1
    assert cfg.distributed_type is not None


def test_defaults_are_the_original_hyper_parameters():
    c = Config()
    assert (c.model.num_slots, c.model.num_prototypes, c.model.ico_level) == (32, 32, 4)
    assert (c.loss.samples_per_slot, c.loss.k_nearest) == (200, 3)
    assert (c.loss.w_global, c.loss.w_slot, c.loss.w_repulsion) == (0.7, 0.2, 0.1)
    assert (c.loss.w_edge, c.loss.w_normal, c.loss.w_laplacian) == (0.3, 0.3, 0.3)
    assert c.optim.lr == 1e-4 and c.train.batch_size == 2
    assert (c.data.height, c.data.width, c.data.num_bins, c.data.points_per_bin) == (480, 640, 5, 2000)


def test_overrides_are_parsed_as_yaml_and_applied():
    cfg = load_config(None, ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "train.resume=latest", "optim.lr=1"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == [0.8, 0.9] and cfg.train.resume == "latest"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert parse_override("data.val_sequences=[SEQ1]") == ("data.val_sequences", ["SEQ1"])
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4  # YAML 1.1 reads 1e-4 as a string


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.mixed_precision=fp8", "train.mixed_precision"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.max_steps=ten", "train.max_steps"),
        ("model.num_slots=-1", "model.num_slots"),
        ("optim.schedule=linear", "optim.schedule"),
        ("loss.w_global=-0.5", "loss.w_global"),
        ("loss.laplacian_method=foo", "loss.laplacian_method"),
        ("train.wandb=maybe", "train.wandb"),
        ("model.nmu_slots=3", "model.nmu_slots: unknown field"),
        ("data.source=kitti", "data.source"),
        ("data.height=0", "data.height"),
        ("train.batch_size=true", "train.batch_size"),
        ("nosection=3", "expected section.field=value"),
    ],
)
def test_bad_value_names_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_or_broken_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.max_steps=11", "model.num_slots=3"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]["max_steps"] == 11
