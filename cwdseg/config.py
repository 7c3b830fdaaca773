"""The run's configuration: one typed, immutable object, resolved once at the command line.

A run is described by :class:`RunConfig`, a tree of frozen dataclasses (data, the model pair,
optimisation, the distillation spec, evaluation, outputs, engine). ``train.py`` builds it once from
the layers below, in this order (a later layer wins field by field), and everything after the command
line reads it, never the parsed arguments::

    the dataclass defaults (the paper's Cityscapes recipe)
    < --config FILE.yaml ...     (recipe files: configs/, or a run's config.json)
    < --recipe NAME              (configs/recipes/NAME.yaml)
    < --demo                     (configs/demo.yaml)
    < the typed flags            (the original's names: --lambda-cwd, --T_ckpt_path, ...)
    < --set KEY=VALUE ...        (any field, e.g. --set optim.lr=0.02 data.crop_size=[64,64])

The files and the merging are OmegaConf's (structured configs: a YAML file's values are checked
against these dataclasses' types, unknown keys are refused); the resolved object is a plain frozen
dataclass. ``config.json`` of a run holds ``{"config": <this tree>, ...}`` and is itself a valid
``--config`` file, so a run can be re-run from it exactly.

Fields marked ``free`` (paths, workers, logging, evaluation cadence) may change when a run is resumed;
every other field is compared with the saved configuration on resume, and each difference is named.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["ConfigError", "DataConfig", "ModelsConfig", "OptimConfig", "DistillConfig", "EvalConfig",
           "OutputConfig", "EngineConfig", "RunConfig", "to_dict", "flatten", "differences", "from_dict",
           "CONFIG_FORMAT", "free"]

CONFIG_FORMAT = "cwdseg/config/1"


class ConfigError(ValueError):
    """A configuration that cannot be resolved; one line naming the field or file and the fix."""


def free(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field that a resumed run may change (it does not alter what is trained)."""
    return field(default=default, metadata={"free": True}, **kwargs)


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cityscapes"                  # a cwdseg.data.registry name
    root: str = free("")                         # the dataset's folder ('' until resolved: $DATA_DIR, data/<dataset>)
    train_list: Optional[str] = None             # list file (image<TAB>label); None: scan the train split
    val_list: Optional[str] = free(None)
    crop_size: List[int] = field(default_factory=lambda: [512, 512])  # random crop H, W
    random_scale: bool = False                   # the original's 0.7..2.1 (off in the recipe)
    random_mirror: bool = False
    num_classes: Optional[int] = None            # None until resolved: the dataset's own count
    ignore_label: int = 255
    cache_images: bool = free(False)             # decoded training images in RAM
    image_cache: Optional[str] = free(None)      # memory-mapped decoded images (folder)
    num_workers: Optional[int] = free(None)      # None until resolved: what fits the machine's cores

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_size", _tuple(self.crop_size))


@dataclass(frozen=True)
class ModelsConfig:
    teacher_arch: str = "pspnet_resnet101"       # a cwdseg.models registry name
    student_arch: str = "pspnet_resnet18"
    teacher_ckpt: str = free("ckpt/teacher_city.pth")   # 'random': random teacher (smoke tests); compared by digest
    student_init: Optional[str] = free(None)     # ImageNet backbone file; 'random': none; compared by digest
    teacher_normalization: Optional[str] = None  # None until resolved: the architecture's
    student_normalization: Optional[str] = None
    allow_normalization_mismatch: bool = False


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"                       # sgd (the recipe) | adamw
    lr: float = 0.01                             # student (and connectors)
    lr_d: float = 4e-4                           # discriminator (Adam), when the adversarial term is on
    momentum: float = 0.9                        # SGD momentum
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    weight_decay: float = 5e-4
    power: float = 0.9                           # poly decay
    head_lr_mult: float = 1.0                    # learning-rate factor of the decode head (SegFormer: 10)
    warmup_steps: int = 0                        # linear warm-up (0: none, as the original)
    warmup_ratio: float = 1e-6                   # warm-up starts at lr * warmup_ratio
    batch_size: int = 8                          # images per optimiser step, summed over processes
    grad_accum: int = 1
    num_steps: int = 40000
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", _tuple(self.betas))


@dataclass(frozen=True)
class DistillConfig:
    preset: Optional[str] = None                 # the preset the terms came from (a name of distill.registry.PRESETS)
    terms: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # {name: {"weight": w, option: value}}


@dataclass(frozen=True)
class EvalConfig:
    final: bool = free(True)                     # evaluate the final student on val
    every: int = free(0)                         # also every N steps (0: only at the end)
    save_best: bool = free(False)                # keep best_val_G.pth (labelled: selected on val)
    teacher_check_images: int = free(8)          # teacher checked on the first N val images (0: off)
    teacher_min_miou: Optional[float] = free(None)  # percent; None: the default rule


@dataclass(frozen=True)
class OutputConfig:
    save_dir: str = free("ckpt")
    name: str = free("")                         # the run folder is save_dir/name; '' until resolved
    save_every: int = free(0)                    # also city_<step>_G.pth every N steps
    save_last_every: int = free(500)             # resumable last.pth every N steps
    log_every: int = free(20)
    log_to: List[str] = free(default_factory=list)  # trackers: tensorboard, mlflow, wandb
    stop_signal: str = free("USR1")
    demo: bool = free(False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "log_to", _tuple(self.log_to))


@dataclass(frozen=True)
class EngineConfig:
    device: str = free("auto")                   # auto, cpu, cuda, cuda:N
    amp: str = "auto"                            # none | bf16 | fp16 once resolved
    channels_last: Optional[bool] = free(None)
    compile: bool = free(False)
    deterministic: Optional[bool] = free(None)


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def needs_teacher(self) -> bool:
        return bool(self.distill.terms)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.save_dir) / self.output.name


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The configuration as plain JSON/YAML data (tuples as lists), in field order."""
    return {f.name: {g.name: _plain(getattr(getattr(cfg, f.name), g.name))
                     for g in dataclasses.fields(getattr(cfg, f.name))}
            for f in dataclasses.fields(cfg)}


def flatten(cfg: RunConfig, *, include_free: bool = True) -> dict[str, Any]:
    """``{"section.field": value}`` (``distill.terms`` as one entry)."""
    out = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        for g in dataclasses.fields(section):
            if include_free or not g.metadata.get("free"):
                out[f"{f.name}.{g.name}"] = _plain(getattr(section, g.name))
    return out


def differences(saved: dict[str, Any], now: RunConfig) -> list[str]:
    """``"section.field: saved X, now Y"`` for every non-free field that differs between a saved
    configuration (plain dict, as :func:`to_dict` wrote it) and ``now``."""
    out = []
    for key, value in flatten(now, include_free=False).items():
        section, name = key.split(".")
        old = saved.get(section, {}).get(name, "<absent>")
        if json.dumps(old, sort_keys=True) != json.dumps(value, sort_keys=True):
            out.append(f"{key}: saved {old!r}, now {value!r}")
    return out


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from plain data (type-checked by OmegaConf; unknown keys are errors)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(schema(), OmegaConf.create(data))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None


def schema():
    """The OmegaConf structured config of :class:`RunConfig`, writable (the dataclasses are frozen)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    def writable(node):
        OmegaConf.set_readonly(node, False)
        if isinstance(node, DictConfig):
            for key in node.keys():
                child = node._get_node(key)
                if isinstance(child, (DictConfig, ListConfig)):
                    writable(child)
        return node

    return writable(OmegaConf.structured(RunConfig))


def one_line(exc: Exception) -> str:
    """OmegaConf's multi-line message as one line naming the key."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    return f"{key}: {first}" if key else first
