"""One typed configuration tree for a protodepth run.

`Config` nests one dataclass per concern. Every dataclass validates itself in `__post_init__` and names the
bad field as `section.field` with a hint on how to fix it, so a typo in a YAML file or on the command line
fails before any work starts. YAML files hold any subset of the tree; command-line overrides are dotted
`section.field=value` pairs whose values are parsed as YAML (so `train.max_steps=100`, `data.val_sequences=[SEQ1]`).

The dataclass defaults are the original research code's hyper-parameters; the
documented exceptions are the training length (`max_steps` instead of 1000 epochs) and everything that the
original did not have (mixed precision, schedules, checkpoints). `configs/quickstart.yaml` is the small
setup that `scripts/train.py` uses when no config is given; `configs/original.yaml` is the full-size one.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protodepth.data.config import DataConfig
from protodepth.errors import ConfigError, require, require_one_of


def _require_finite(section: Any, prefix: str) -> None:
    """Every float field of a config dataclass is a finite number: YAML's `.inf` / `.nan` pass any `> 0` check
    (inf) or every comparison's negation (nan), and would otherwise train with a silently broken value."""
    for f in dataclasses.fields(section):
        v = getattr(section, f.name)
        if isinstance(v, float):
            require(math.isfinite(v), f"{prefix}.{f.name}", f"got {v}, must be a finite number")


@dataclass
class ModelConfig:
    num_slots: int = 32  # K
    num_prototypes: int = 32  # P
    ico_level: int = 4  # level 4: V = 2562, F = 5120
    # "none": random init; "imagenet": torchvision's ImageNet weights (downloads once); or a path to a
    # local state_dict file (.pth / .pt) holding torchvision ResNet-50 weights.
    weights: str = "none"
    scale_max: float = 5.0  # scale = scale_max * softplus(a)
    trans_max: float = 1000.0  # translation = trans_max * tanh(.) metres
    channels_last: bool = True  # faster convolutions on tensor cores; harmless on CPU
    # The head sees feature * head_input_scale. 1.0 is the original. Adam moves every head weight by ~lr per
    # step, so the pre-tanh translation moves by ~lr * sum|feature| (~1000 lr for ResNet-50's 2048 features):
    # 100 m per step at lr 1e-4 with trans_max 1000. A scale of 1/sqrt(2048) ~ 0.022 makes that ~0.2 m and
    # starts every slot near the camera; configs/quickstart.yaml uses it.
    head_input_scale: float = 1.0

    def __post_init__(self) -> None:
        _require_finite(self, "model")
        require(self.num_slots >= 1, "model.num_slots", f"got {self.num_slots}, must be >= 1")
        require(self.num_prototypes >= 1, "model.num_prototypes", f"got {self.num_prototypes}, must be >= 1")
        require(0 <= self.ico_level <= 6, "model.ico_level", f"got {self.ico_level}, must be in 0..6 (4 is the original)")
        require(self.scale_max > 0, "model.scale_max", f"got {self.scale_max}, must be > 0")
        require(self.trans_max > 0, "model.trans_max", f"got {self.trans_max}, must be > 0")
        require(self.head_input_scale > 0, "model.head_input_scale", f"got {self.head_input_scale}, must be > 0")
        require(bool(self.weights), "model.weights", "must be 'none', 'imagenet' or a path to a weights file")


@dataclass
class LossConfig:
    samples_per_slot: int = 200  # S: points sampled on each posed slot mesh
    k_nearest: int = 3  # global term: each target point's k nearest predicted points
    w_global: float = 0.7  # weight of the global term (target -> k nearest predicted points)
    w_slot: float = 0.2  # weight of the per-slot term (predicted -> nearest target point)
    w_repulsion: float = 0.1  # weight of the term that pushes slot centres apart
    w_chamfer: float = 1.0  # weight of the hybrid Chamfer sum of the three terms above
    w_edge: float = 0.3  # prototype mesh regularisers: edge length, normal consistency, Laplacian smoothing
    w_normal: float = 0.3
    w_laplacian: float = 0.3
    repulsion_min_distance: float = 0.5  # metres
    repulsion_sharpness: float = 5.0  # how fast the repulsion fades beyond repulsion_min_distance
    laplacian_method: str = "uniform"  # "uniform" | "cot" | "cotcurv" (PyTorch3D's mesh_laplacian_smoothing)

    def __post_init__(self) -> None:
        _require_finite(self, "loss")
        require(self.samples_per_slot >= 1, "loss.samples_per_slot", f"got {self.samples_per_slot}, must be >= 1")
        require(self.k_nearest >= 1, "loss.k_nearest", f"got {self.k_nearest}, must be >= 1")
        for name in ("w_global", "w_slot", "w_repulsion", "w_chamfer", "w_edge", "w_normal", "w_laplacian"):
            v = getattr(self, name)
            require(v >= 0, f"loss.{name}", f"got {v}, must be a finite number >= 0")
        require(self.repulsion_min_distance >= 0, "loss.repulsion_min_distance", "must be >= 0")
        require_one_of(self.laplacian_method, "loss.laplacian_method", ("uniform", "cot", "cotcurv"))


@dataclass
class ProgressiveConfig:
    """Progressive point sampling: few points early, all of them later (the original's own next step).

    `loss.samples_per_slot` and the number of target points per image ramp from `samples_start` /
    `targets_start` up to their full values over `steps` optimizer steps with the given shape.
    shape "constant" (the default) turns it off: full values from the first step.
    """

    shape: str = "constant"  # "constant" | "linear" | "step" | "cosine"
    steps: int = 0  # length of the ramp in optimizer steps
    samples_start: int = 50  # samples per slot at step 0
    targets_start: int = 2000  # target points per image at step 0 (a random subset of the cloud)
    num_levels: int = 4  # plateaus of the "step" shape

    def __post_init__(self) -> None:
        require_one_of(self.shape, "progressive.shape", ("constant", "linear", "step", "cosine"))
        require(self.steps >= 0, "progressive.steps", f"got {self.steps}, must be >= 0")
        require(self.samples_start >= 1, "progressive.samples_start", "must be >= 1")
        require(self.targets_start >= 1, "progressive.targets_start", "must be >= 1")
        require(self.num_levels >= 2, "progressive.num_levels", "must be >= 2")
        require(self.shape == "constant" or self.steps > 0, "progressive.steps",
               f"must be > 0 for shape {self.shape!r} (the ramp's length in optimizer steps)")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # Adam's learning rate (the peak of a cosine schedule)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 turns clipping off (the original had none)
    schedule: str = "constant"  # "constant" or "cosine" (linear warmup then cosine decay to min_lr_ratio * lr)
    warmup_steps: int = 0  # linear warmup from 0 to optim.lr over this many optimizer steps
    min_lr_ratio: float = 0.0  # cosine schedule's final learning rate, as a share of optim.lr

    def __post_init__(self) -> None:
        _require_finite(self, "optim")
        require(self.lr > 0, "optim.lr", f"got {self.lr}, must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               f"got {self.betas}, expected two numbers in [0, 1)")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "optim.grad_clip", f"got {self.grad_clip}, must be >= 0 (0 disables)")
        require_one_of(self.schedule, "optim.schedule", ("constant", "cosine"))
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # run folder: resolved config, checkpoints, W&B files, pictures
    batch_size: int = 2  # per process
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"; geometry always runs in fp32
    seed: int = 0  # in [0, 2**32 - 1], the range numpy's and Python's seeding share
    log_every: int = 10  # steps between logged losses
    val_every: int = 200  # 0 disables validation
    val_batches: int = 0  # 0: the whole validation split
    ckpt_every: int = 500  # 0: only the final checkpoint
    ckpt_limit: int = 3  # keep this many newest checkpoints
    resume: str | None = None  # None, "latest", or a checkpoint folder
    wandb: str = "auto"  # "auto" (online with an API key, else offline), "online", "offline", "disabled"
    wandb_project: str = "protodepth"  # W&B project name
    run_name: str | None = None  # W&B run name (default: the run folder's name)
    compile: bool = False  # torch.compile the model's forward
    # Replay forward + loss + backward from CUDA graphs: removes the host's kernel-launch time, which bounds the
    # eager step (BENCHMARKS.md). protodepth.cuda_graphs.blocker says which runs can use them. "auto": on exactly
    # when the run can (it says why not at start), true: on or a clear error, false: off.
    cuda_graphs: bool | str = "auto"
    # How several processes average gradients: "ddp" (Accelerate's DDP wrapper, overlapping the all-reduce with
    # the backward), "flat" (one flat gradient buffer all-reduced after the backward: what a replayed CUDA graph
    # needs, since DDP's hooks do not run inside a replay), "auto": flat exactly when graphs are on.
    data_parallel: str = "auto"
    deterministic: bool = False  # torch.use_deterministic_algorithms, for exact resume tests
    viz_every: int = 0  # pictures + meshes of the current batch every N steps and at the end (0: only at the end)
    viz_images: int = 4  # images of the batch drawn per snapshot (the main process's share of the batch)
    on_nonfinite: str = "error"  # "error": stop naming step and files; "skip": drop the step
    dist_timeout_s: int = 600  # process-group timeout: a dead rank ends the job within this bound
    overwrite: bool = False  # a fresh run (no resume) into a folder holding another run stops unless this is true

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "train.output_dir", "must be a folder path")
        for name in ("batch_size", "max_steps", "grad_accum"):
            require(getattr(self, name) >= 1, f"train.{name}", f"got {getattr(self, name)}, must be >= 1")
        require_one_of(self.mixed_precision, "train.mixed_precision", ("no", "fp16", "bf16"))
        require(0 <= self.seed <= 2**32 - 1, "train.seed", f"got {self.seed}, must be in [0, 2**32 - 1]")
        for name in ("log_every",):
            require(getattr(self, name) >= 1, f"train.{name}", f"got {getattr(self, name)}, must be >= 1")
        for name in ("val_every", "val_batches", "ckpt_every", "viz_every", "viz_images"):
            require(getattr(self, name) >= 0, f"train.{name}", f"got {getattr(self, name)}, must be >= 0")
        require(self.ckpt_limit >= 1, "train.ckpt_limit", f"got {self.ckpt_limit}, must be >= 1")
        require_one_of(self.wandb, "train.wandb", ("auto", "online", "offline", "disabled"))
        require_one_of(self.on_nonfinite, "train.on_nonfinite", ("error", "skip"))
        require_one_of(self.data_parallel, "train.data_parallel", ("auto", "ddp", "flat"))
        require(self.dist_timeout_s >= 1, "train.dist_timeout_s", "must be >= 1 second")
        require(isinstance(self.cuda_graphs, bool) or self.cuda_graphs == "auto", "train.cuda_graphs",
               f"got {self.cuda_graphs!r}, expected true, false or 'auto'")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.cuda_graphs is True:  # the config's share of the rule; the run checks the rest (GPU, ...)
            from protodepth.cuda_graphs import config_blocker

            why = config_blocker(self)
            require(why is None, "train.cuda_graphs", f"{why}; set train.cuda_graphs=false (or auto)")
        # The global term asks every target point for its loss.k_nearest nearest predicted points; with fewer
        # points than that, the nearest-neighbour search pads with dummies and the loss is silently wrong.
        K, S = self.model.num_slots, self.loss.samples_per_slot
        fewest, what = K * S, f"model.num_slots={K} x loss.samples_per_slot={S}"
        if self.progressive.shape != "constant" and self.progressive.samples_start < S:
            start = self.progressive.samples_start
            fewest, what = K * start, f"model.num_slots={K} x progressive.samples_start={start}, at the ramp's start"
        require(self.loss.k_nearest <= fewest, "loss.k_nearest",
                f"got {self.loss.k_nearest}, but the model predicts only {fewest} points per image ({what}); "
                f"use at most {fewest}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------- loading

def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _accepts(tp: Any, want: type) -> bool:
    return tp is want or want in typing.get_args(tp)


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of fields, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{name}: unknown field; known fields: {', '.join(known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{name}.")
            continue
        if _accepts(tp, float) and isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; take it as the number the user meant
            try:
                value = float(value)
            except ValueError:
                pass
        if _accepts(tp, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, tp):
            raise ConfigError(f"{name}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
        if isinstance(value, float):  # every section, also those that validate themselves elsewhere (data)
            require(math.isfinite(value), name, f"got {value}, must be a finite number")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # sub-configs owned elsewhere (data) raise plain ValueError with their own names
        raise ConfigError(str(e)) from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {key!r} appears twice (lines {first_line} and {line})")


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the last
    one, so a section repeated further down a config file would silently drop the first one's values."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may legitimately repeat keys
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                except TypeError:  # an unhashable key: the base loader names it
                    continue
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def _read_config_file(path: Path) -> Any:
    """The YAML tree of a config file; every way the file can be unusable is one ConfigError naming it."""
    if path.is_dir():
        raise ConfigError(f"config file {path}: is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not a text file (byte {e.start} is not UTF-8); "
                          "expected a YAML config") from None
    try:
        return _parse_yaml(text)
    except _DuplicateKey as e:
        raise ConfigError(f"config file {path}: {e}; keep one (a repeated key silently drops the first)") from None
    except yaml.reader.ReaderError as e:
        raise ConfigError(f"config file {path}: not a text file (character #x{e.character:04x} at position "
                          f"{e.position}); expected a YAML config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"config file {path}: not valid YAML: {where}{getattr(e, 'problem', None) or e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`"train.max_steps=100"` -> `("train.max_steps", 100)`; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. train.max_steps=100")
    key, raw = text.split("=", 1)
    if "." not in key:
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. train.max_steps=100")
    try:
        value = _parse_yaml(raw) if raw != "" else None
    except _DuplicateKey as e:
        raise ConfigError(f"override {text!r}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML file (any subset of the tree), apply dotted overrides, validate, return a `Config`."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        tree = _read_config_file(path) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


# ------------------------------------------------------------------------------------------- --help listing

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^=#]*(?:=.*?)?(?:#\s*(.*))?$")


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in the source: the one on its line, else the block just above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (frozen, zipped): the listing goes without comments
        return {}
    names, out, above = {f.name for f in dataclasses.fields(cls)}, {}, []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = _FIELD_LINE.match(line)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = m.group(2) or " ".join(above).split(". ")[0]
        above = []
    return out


def config_fields() -> list[tuple[str, Any, str]]:
    """Every settable field of the tree as (section.field, dataclass default, comment), in declaration order."""
    rows = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((f"{section.name}.{f.name}", default, comments.get(f.name, "")))
    return rows


def config_fields_help(width: int = 118) -> str:
    """The config fields as text for `scripts/train.py --help`: one line each, the comment cut to fit."""
    rows = [(name, yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n..."), comment)
            for name, default, comment in config_fields()]
    left = max(len(f"{n}={d}") for n, d, _ in rows) + 2
    lines = []
    for name, default, comment in rows:
        line = f"  {name}={default}".ljust(left + 2) + comment
        lines.append(line if len(line) <= width else line[: width - 3].rstrip() + "...")
    return "\n".join(lines)
