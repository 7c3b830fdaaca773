"""The command-line boundary of train.py: the original's flags, recipe files and layers -> one :class:`RunConfig`.

Nothing after :func:`resolve_config` reads the parsed arguments. The layers, in order (a later one wins):
the dataclass defaults (the paper's recipe), ``--config FILE`` (several allowed), ``--recipe NAME``,
``--demo``, the typed flags (the original's names), ``--set KEY=VALUE``. The distillation spec is merged
term by term: a layer that names a preset replaces the terms below it, and ``--distill`` adds or
re-weights terms; ``--demo``'s CWD term applies only when no other layer chose the distillation.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from cwdseg.config import CONFIG_FORMAT, ConfigError, RunConfig, from_dict, one_line, to_dict
from cwdseg.data.registry import dataset_info
from cwdseg.distill.registry import PRESETS, DistillSpecError, complete, parse_distill, spec_run_name
from cwdseg.engine.build import RANDOM, default_imagenet_init
from cwdseg.engine.precision import resolve_amp
from cwdseg.models import NORMALIZATION, PAPER_PAIR, canonical_arch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped as package data; ./configs links here

# Flags that set one field each: argparse dest -> "section.field".
FLAG_FIELDS: dict[str, str] = {
    "dataset": "data.dataset", "data_dir": "data.root", "data_list": "data.train_list",
    "data_listval": "data.val_list", "input_size": "data.crop_size", "random_mirror": "data.random_mirror",
    "random_scale": "data.random_scale", "cache_images": "data.cache_images", "image_cache": "data.image_cache",
    "num_workers": "data.num_workers", "num_classes": "data.num_classes", "ignore_label": "data.ignore_label",
    "batch_size": "optim.batch_size", "grad_accum": "optim.grad_accum", "num_steps": "optim.num_steps",
    "optimizer": "optim.optimizer", "lr_g": "optim.lr", "lr_d": "optim.lr_d", "momentum": "optim.momentum",
    "weight_decay": "optim.weight_decay", "power": "optim.power", "seed": "optim.seed",
    "T_ckpt_path": "models.teacher_ckpt", "teacher_arch": "models.teacher_arch", "student_arch": "models.student_arch",
    "teacher_normalization": "models.teacher_normalization",
    "student_normalization": "models.student_normalization",
    "allow_normalization_mismatch": "models.allow_normalization_mismatch",
    "student_pretrain_model_imgnet": "models.student_init",
    "save_dir": "output.save_dir", "save_name": "output.name", "save_every": "output.save_every",
    "save_last_every": "output.save_last_every", "stop_signal": "output.stop_signal", "log_every": "output.log_every",
    "log_to": "output.log_to", "eval": "eval.final", "eval_every": "eval.every", "save_best": "eval.save_best",
    "teacher_check_images": "eval.teacher_check_images", "teacher_min_miou": "eval.teacher_min_miou",
    "device": "engine.device", "amp": "engine.amp", "channels_last": "engine.channels_last",
    "compile": "engine.compile", "deterministic": "engine.deterministic",
}
# The original's CWD/KD/GAN flags: option defaults of the terms they switch on.
LEGACY_TERM_FLAGS = ("cwd", "cwd_feat", "norm_type", "divergence", "temperature", "lambda_cwd", "cwd_ignore_mask",
                     "kd", "lambda_kd", "adv", "lambda_adv", "lambda_d", "lambda_gp")
LEGACY_DEFAULTS: dict[str, Any] = dict(cwd=False, cwd_feat=False, norm_type="channel", divergence="kl",
                                       temperature=4.0, lambda_cwd=3.0, cwd_ignore_mask=False, kd=False,
                                       lambda_kd=10.0, adv=False, lambda_adv=0.001, lambda_d=0.1, lambda_gp=10.0)
# Where --demo and --recipe layers live (configs/demo.yaml, configs/recipes/NAME.yaml).
RECIPE_NAMES = ("cityscapes", "pascal_voc", "ade20k", "camvid")


def default_for(dest: str) -> Any:
    """The value a flag has when no layer sets it (for --help)."""
    if dest in FLAG_FIELDS:
        section, name = FLAG_FIELDS[dest].split(".")
        return getattr(getattr(RunConfig(), section), name)
    return LEGACY_DEFAULTS.get(dest)


def default_data_dir(dataset: str) -> str:
    """``$DATA_DIR``, else ``$CITYSCAPES`` or ``data/cityscapes`` for cityscapes, else ``data/<dataset>``."""
    if os.environ.get("DATA_DIR"):
        return os.environ["DATA_DIR"]
    if dataset == "cityscapes":
        return os.environ.get("CITYSCAPES", "data/cityscapes")
    return f"data/{dataset}"


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
def read_config_file(path: str | Path) -> dict[str, Any]:
    """A recipe file (YAML or JSON: the sections of :class:`RunConfig`), or a run's ``config.json``
    (``{"format": ..., "config": {...}}``), as plain data."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file"
                          + (" (a folder: give its config.json)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: not a YAML/JSON file ({str(exc).splitlines()[0]})") from None
    if isinstance(data, dict) and data.get("format") == CONFIG_FORMAT:
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections (data, models, optim, distill, ...)")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RunConfig)} - {"defaults"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown section(s) {', '.join(unknown)}; sections: "
                          + ", ".join(f.name for f in dataclasses.fields(RunConfig)))
    return data


def named_layer(kind: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / ("demo.yaml" if kind == "demo" else f"recipes/{name}.yaml")
    return read_config_file(path)


def set_layer(items: list[str]) -> dict[str, Any]:
    """``--set a.b=v ...`` as nested data (values parsed as YAML: numbers, booleans, lists)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. optim.lr=0.02")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"--set: {one_line(exc)}") from None


def flag_layer(typed: dict[str, Any]) -> dict[str, Any]:
    """The fields the typed flags set (not the distillation ones)."""
    layer: dict[str, Any] = {}
    for dest, value in typed.items():
        if dest in FLAG_FIELDS:
            section, name = FLAG_FIELDS[dest].split(".")
            layer.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    if typed.get("is_student_load_imgnet") is False:
        layer.setdefault("models", {})["student_init"] = RANDOM
    if typed.get("gpu") not in (None, "None"):
        gpu, device = str(typed["gpu"]), typed.get("device", "auto")
        if not gpu.isdigit():
            raise ConfigError(f"--gpu {gpu!r}: expected a GPU index such as 0")
        if device not in ("auto", f"cuda:{gpu}"):
            raise ConfigError(f"--gpu {gpu} and --device {device} disagree; pass only one of them")
        layer.setdefault("engine", {})["device"] = f"cuda:{gpu}"
    return layer


def merge(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Section-wise merge of plain layers (the distill section is handled by :func:`merge_terms`)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for section, values in layer.items():
            if section in ("distill", "defaults"):
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"section {section!r} must be a mapping of fields, got {values!r}")
            out.setdefault(section, {}).update(values)
    return out


# --------------------------------------------------------------------------------------------------
# The distillation spec
# --------------------------------------------------------------------------------------------------
def legacy_options(typed: dict[str, Any]) -> dict[str, Any]:
    """The original CWD/KD/GAN flags' values (typed or their defaults)."""
    return {k: typed.get(k, LEGACY_DEFAULTS[k]) for k in LEGACY_TERM_FLAGS}


def flag_terms(typed: dict[str, Any]) -> tuple[str | None, dict[str, dict[str, Any]] | None]:
    """``(preset, terms)`` that --preset, --distill and --cwd/--kd/--adv give; terms None: no flag chose."""
    if not any(k in typed for k in ("preset", "distill", "cwd", "kd", "adv")):
        return None, None
    given: dict[str, dict[str, Any]] = {}
    preset = typed.get("preset")
    if preset:
        given.update(parse_distill(preset_terms(preset)))
    given.update(parse_distill(typed.get("distill") or []))
    legacy = legacy_options(typed)
    switched: dict[str, dict[str, Any]] = {}
    if legacy["cwd"]:
        switched["cwd"] = {"weight": legacy["lambda_cwd"], "on": "feature" if legacy["cwd_feat"] else "logits"}
    if legacy["kd"]:
        switched["kd"] = {"weight": legacy["lambda_kd"]}
    if legacy["adv"]:
        switched["adv"] = {"weight": legacy["lambda_adv"]}
    for name, value in switched.items():
        if name in given:
            raise DistillSpecError(f"--{name} True and --distill/--preset both set the term {name!r}; give it once")
        given[name] = value
    return preset, given


def preset_terms(preset: str) -> tuple[str, ...]:
    if preset not in PRESETS:
        raise DistillSpecError(f"--preset {preset!r} is unknown; presets: {', '.join(PRESETS)}")
    return PRESETS[preset].terms


def layer_terms(layer: dict[str, Any], where: str) -> tuple[bool, str | None, dict[str, dict[str, Any]]]:
    """``(replaces, preset, terms)`` of a file layer's distill section."""
    section = layer.get("distill")
    if section is None:
        return False, None, {}
    if not isinstance(section, dict) or set(section) - {"preset", "terms"}:
        raise ConfigError(f"{where}: distill must be a mapping with 'preset' and/or 'terms'")
    preset, terms = section.get("preset"), dict(section.get("terms") or {})
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{where}: distill.preset {preset!r} is unknown; presets: {', '.join(PRESETS)}")
    out = dict(parse_distill(preset_terms(preset))) if preset else {}
    for name, options in terms.items():
        if not isinstance(options, dict) or ("weight" not in options and where != "--set distill"):
            raise ConfigError(f"{where}: distill.terms.{name} must be a mapping with a weight")
        entry = ",".join([f"{name}={options.get('weight', 1)}"]
                         + [f"{k}={v}" for k, v in options.items() if k != "weight"])
        parsed = parse_distill([entry])[name]
        if "weight" not in options:  # --set may change one option of a term another layer gave
            del parsed["weight"]
        out[name] = {**out.get(name, {}), **parsed}
    return True, preset, out


def resolve_terms(file_layers: list[tuple[str, dict[str, Any]]], demo_layer: dict[str, Any] | None,
                  typed: dict[str, Any], set_distill: dict[str, Any] | None = None) -> tuple[str | None, dict]:
    """The run's complete spec (every option of every term spelled out) from all layers; ``set_distill``:
    the ``distill`` part of ``--set``, applied last."""
    preset, terms, chosen = None, {}, False
    for where, layer in file_layers:
        has, layer_preset, layer_spec = layer_terms(layer, where)
        if not has:
            continue
        chosen = True
        if layer_preset is not None:
            preset, terms = layer_preset, {}
        for name, options in layer_spec.items():
            terms[name] = {**terms.get(name, {}), **options}
    flag_preset, flag_spec = flag_terms(typed)
    if flag_spec is not None:
        if flag_preset is not None:
            preset, terms = flag_preset, {}
        for name, options in flag_spec.items():
            terms[name] = {**terms.get(name, {}), **options}
        chosen = True
    if set_distill:
        has, set_preset, set_spec = layer_terms({"distill": set_distill}, "--set distill")
        if set_preset is not None:
            preset, terms = set_preset, {}
        for name, options in set_spec.items():
            terms[name] = {**terms.get(name, {}), **options}
        chosen = True
    if demo_layer is not None and not chosen:
        _, _, terms = layer_terms(demo_layer, "configs/demo.yaml")
    legacy = legacy_options(typed)
    flag_defaults = {"cwd": {"tau": legacy["temperature"], "norm": legacy["norm_type"], "div": legacy["divergence"],
                             "ignore_mask": legacy["cwd_ignore_mask"]},
                     "adv": {"d": legacy["lambda_d"], "gp": legacy["lambda_gp"]}}
    spec = {name: complete(name, options, flag_defaults) for name, options in terms.items()}
    feature_cwd = [n for n in spec if n.startswith("cwd") and spec[n]["on"] == "feature"]
    if len(feature_cwd) > 1:
        raise DistillSpecError(f"CWD on the feature is given twice ({', '.join(feature_cwd)}); give it once")
    return preset, spec


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------
def run_name(typed: dict[str, Any], data: dict[str, Any], preset: str | None, spec: dict, demo: bool) -> str:
    """The run folder's name: exp_cwd.sh's, the preset's or the terms', plus the pair when not the paper's."""
    if typed.get("exp_name"):
        name = typed["exp_name"]
    elif demo:
        name = "demo" if spec else "demo_baseline"
        name = name if data["dataset"] == "cityscapes" else f"{name}_{data['dataset']}"  # one folder per layout
    elif typed.get("preset") or typed.get("distill") or not any(typed.get(k) for k in ("cwd", "kd", "adv")):
        name = spec_run_name(spec, preset) if spec or preset else "baseline"
    else:
        legacy, tau = (legacy_options(typed),
                       spec["cwd"]["tau"] if "cwd" in spec else legacy_options(typed)["temperature"])
        name = "_".join([str(legacy["kd"]), str(legacy["adv"]), str(legacy["cwd_feat"]), legacy["norm_type"],
                         legacy["divergence"], f"{legacy['lambda_cwd']:g}", f"{tau:g}", "train"])
    return name + arch_tag(typed.get("teacher_arch_resolved"), typed.get("student_arch_resolved"), bool(spec))


def arch_tag(teacher: str, student: str, distilled: bool) -> str:
    """``""`` for the paper's pair (or a PSPNet-R18 baseline), else ``_T-<teacher>_S-<student>``
    (``_S-<student>`` without a teacher), for run names."""
    if not distilled:
        return "" if student == PAPER_PAIR[1] else f"_S-{student}"
    return "" if (teacher, student) == PAPER_PAIR else f"_T-{teacher}_S-{student}"


def resolve_fields(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the fields whose default depends on others (root, classes, normalisations, ImageNet file, amp)."""
    d, m, e = data["data"], data["models"], data["engine"]
    if not d.get("root"):
        d["root"] = default_data_dir(d["dataset"])
    if d.get("num_workers") is None:
        from cwdseg.data.cityscapes import default_num_workers

        d["num_workers"] = default_num_workers()
    for role in ("teacher", "student"):
        try:
            m[f"{role}_arch"] = canonical_arch(m[f"{role}_arch"])
        except ValueError as exc:
            raise ConfigError(f"models.{role}_arch: {exc}") from None
        m[f"{role}_normalization"] = m.get(f"{role}_normalization") or NORMALIZATION[m[f"{role}_arch"]]
    if not m.get("student_init"):
        m["student_init"] = default_imagenet_init(m["student_arch"])
    # The device's kind decides the engine defaults; the device itself is checked when the run starts.
    wants_cuda = str(e["device"]).startswith("cuda") or (e["device"] == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if wants_cuda and torch.cuda.is_available() else "cpu")
    try:
        e["amp"] = resolve_amp(e["amp"], device)
    except ValueError as exc:
        raise ConfigError(f"engine.amp: {exc}") from None
    if e.get("channels_last") is None:
        e["channels_last"] = device.type == "cuda"
    if e.get("deterministic") is None:
        e["deterministic"] = device.type == "cpu"
    return data


def build_config(typed: dict[str, Any]) -> RunConfig:
    """The resolved :class:`RunConfig` from the typed flags (``vars`` of the parsed arguments, only
    the flags given) and the layers they name."""
    file_layers = [(f"--config {p}", read_config_file(p)) for p in typed.get("config") or []]
    file_layers += [("the configuration given", data) for data in typed.get("config_data") or []]
    if typed.get("recipe"):
        file_layers.append((f"--recipe {typed['recipe']}", named_layer("recipe", typed["recipe"])))
    demo = bool(typed.get("demo"))
    demo_layer = named_layer("demo", "demo") if demo else None
    layers = [layer for _, layer in file_layers] + ([demo_layer] if demo_layer else [])
    layers += [flag_layer(typed), {"output": {"demo": True}} if demo else {}, set_layer(typed.get("set") or [])]
    data = to_dict(from_dict(merge(layers)))  # type-checked against the dataclasses
    if demo and "data_dir" not in typed and "root" not in (set_layer(typed.get("set") or []).get("data") or {}):
        base = demo_layer["data"]["root"]
        data["data"]["root"] = base if data["data"]["dataset"] == "cityscapes" else f"{base}_{data['data']['dataset']}"
    preset, spec = resolve_terms(file_layers, demo_layer, typed, set_layer(typed.get("set") or []).get("distill"))
    data["distill"] = {"preset": preset, "terms": spec}
    resolve_fields(data)
    if data["data"]["dataset"] != "folder":
        # Known without reading any file; a folder dataset's count comes from its classes.json.
        known, given = dataset_info(data["data"]["dataset"]), data["data"]["num_classes"]
        if given is not None and given != known.num_classes and known.name != "cityscapes":  # (Cityscapes: checks.py)
            raise ConfigError(f"--num-classes {given} contradicts --dataset {known.name}, which has "
                              f"{known.num_classes} classes ({', '.join(known.class_names[:5])}, ...); "
                              "drop --num-classes")
        data["data"]["num_classes"] = given if given is not None else known.num_classes
    if not data["output"]["name"]:
        names = dict(typed, teacher_arch_resolved=data["models"]["teacher_arch"],
                     student_arch_resolved=data["models"]["student_arch"])
        data["output"]["name"] = run_name(names, data["data"], preset, spec, demo)
    return from_dict(data)


def config_yaml(cfg: RunConfig) -> str:
    """The resolved configuration as a recipe file (``--print-config``)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=120)


def config_json(cfg: RunConfig) -> str:
    return json.dumps(to_dict(cfg), indent=2)
