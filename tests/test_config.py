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


# ------------------------------------------------------------------- values that pass a range check but are wrong

@pytest.mark.parametrize("override", ["optim.lr=.inf", "loss.w_global=.inf", "model.scale_max=.inf", "optim.lr=nan",
                                      "optim.grad_clip=inf", "data.max_depth=.inf"])
def test_a_float_field_must_be_finite(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{field.replace('.', '[.]')}: got (inf|nan), must be a finite number$"):
        load_config(None, [override])


def test_a_float_field_built_directly_must_be_finite_too():
    from protodepth.config import LossConfig, OptimConfig

    with pytest.raises(ConfigError, match="loss.w_slot: got inf, must be a finite number"):
        LossConfig(w_slot=float("inf"))
    with pytest.raises(ConfigError, match="optim.min_lr_ratio: got nan"):
        OptimConfig(min_lr_ratio=float("nan"))


@pytest.mark.parametrize("seed, ok", [(-1, False), (0, True), (2**32 - 1, True), (2**32, False)])
def test_seed_is_in_the_range_every_rng_accepts(seed, ok):
    if ok:
        assert load_config(None, [f"train.seed={seed}"]).train.seed == seed
    else:
        with pytest.raises(ConfigError, match=rf"train.seed: got {seed}, must be in \[0, 2\*\*32 - 1\]"):
            load_config(None, [f"train.seed={seed}"])


def test_k_nearest_larger_than_the_predicted_points_is_refused_with_the_numbers():
    small = ["model.num_slots=2", "loss.samples_per_slot=3"]
    assert load_config(None, small + ["loss.k_nearest=6"]).loss.k_nearest == 6
    with pytest.raises(ConfigError, match=r"loss.k_nearest: got 7, but the model predicts only 6 points per image "
                                          r"\(model.num_slots=2 x loss.samples_per_slot=3\); use at most 6"):
        load_config(None, small + ["loss.k_nearest=7"])
    # a progressive ramp starts with fewer samples per slot: that smaller count is the bound
    ramp = ["model.num_slots=2", "progressive.shape=linear", "progressive.steps=10", "progressive.samples_start=4"]
    with pytest.raises(ConfigError, match=r"only 8 points .*progressive.samples_start=4"):
        load_config(None, ramp + ["loss.k_nearest=9"])


def test_overwrite_defaults_to_false():
    assert Config().train.overwrite is False
    assert load_config(None, ["train.overwrite=true"]).train.overwrite is True


# ------------------------------------------------------------------------------------ config files that are wrong

@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  max_steps: 3\nmodel:\n  num_slots: 2\ntrain:\n  seed: 1\n", "train", "1 and 5"),
    ("train:\n  max_steps: 3\n  max_steps: 4\n", "max_steps", "2 and 3"),
])
def test_a_key_given_twice_in_a_config_file_is_refused_naming_key_and_file(tmp_path, text, key, lines):
    f = tmp_path / "twice.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"config file .*twice.yaml: key '{key}' appears twice \(lines {lines}\)"):
        load_config(f)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("train: &t {max_steps: 3, seed: 1}\nmodel: {num_slots: 2}\n")
    assert load_config(f).train.max_steps == 3
    f.write_text("optim: {lr: 0.5}\ntrain:\n  <<: {max_steps: 3, seed: 1}\n  seed: 2\n")
    assert load_config(f).train.seed == 2


@pytest.mark.parametrize("content, needle", [(bytes(range(256)), r"byte 128 is not UTF-8"),
                                              (b"train:\x00\n", r"character #x0000 at position 6")])
def test_a_binary_config_file_is_one_line_naming_it(tmp_path, content, needle):
    f = tmp_path / "weights.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"config file .*weights.yaml: not a text file \({needle}\)") as e:
        load_config(f)
    assert "\n" not in str(e.value)


def test_a_config_path_naming_a_folder_says_it_is_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_accelerate_config_is_plain_yaml_with_the_keys_accelerate_needs(path):
    """Read without Accelerate's own loader (which fills in defaults): no repeated key, and every key that
    `accelerate launch` needs to start without asking, each of a value Accelerate knows."""
    from accelerate.utils import DistributedType

    from protodepth.config import _parse_yaml

    tree = _parse_yaml(path.read_text())
    assert isinstance(tree, dict), path
    need = {"compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
            "mixed_precision"}
    assert need <= set(tree), sorted(need - set(tree))
    assert tree["compute_environment"] == "LOCAL_MACHINE"
    assert tree["distributed_type"] in {d.value for d in DistributedType}, tree["distributed_type"]
    assert isinstance(tree["num_processes"], int) and tree["num_processes"] >= 1
    # precision comes from train.mixed_precision; a file that set it would fight the training config
    assert tree["mixed_precision"] == "no"
    if tree["distributed_type"] == "DEEPSPEED":
        assert tree["deepspeed_config"]["zero_stage"] in (0, 1, 2, 3)
