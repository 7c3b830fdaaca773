"""The typed run configuration (cwdseg.config): recipe files, layers, the records a run writes from it.

Each shipped recipe file trains two steps on the matching synthetic dataset and writes a config.json that,
fed back with --config, resolves to the identical configuration; --demo combines with every preset, with
--distill, with every dataset and with every student architecture.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from cwdseg.cli import train
from cwdseg.config import RunConfig, differences, from_dict, to_dict
from cwdseg.data.registry import DATASETS
from cwdseg.distill.registry import PRESETS
from cwdseg.models import ARCHS, arch_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
TINY = ["--input-size", "32,32", "--batch-size", "2", "--num-steps", "2", "--num-workers", "0", "--eval", "False",
        "--device", "cpu", "--log-every", "1", "--save-last-every", "2"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic copy of every dataset layout."""
    from cwdseg.data.synthetic_zoo import generate_dataset

    base = tmp_path_factory.mktemp("datasets")
    return {name: generate_dataset(name, base / name, n_train=2, n_val=1, n_test=1, size=(48, 64), seed=0)
            for name in DATASETS}


def dataset_of(path: Path) -> str:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return (data.get("data") or {}).get("dataset", "cityscapes")


def train_and_reload(argv: list[str], save_dir: Path) -> tuple[RunConfig, dict]:
    """Train in process; returns the resolved configuration and the run's config.json record."""
    cfg = train.resolve_config(argv)
    assert train.main(argv) == 0
    record = json.loads((save_dir / cfg.output.name / "config.json").read_text())
    return cfg, record


def test_shipped_configs_cover_the_required_recipes():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {f"cityscapes/{p}.yaml" for p in PRESETS} <= names  # every preset (Table 2 and later)
    assert {"cityscapes/cd_logits.yaml", "cityscapes/cd_feat.yaml", "cityscapes/cd_kd_adv.yaml"} <= names
    assert {"cirkd/deeplabv3_resnet18_cwd.yaml", "cirkd/deeplabv3_mobilenetv2_cwd.yaml"} <= names
    assert {f"{d}/cd_logits.yaml" for d in ("pascal_voc", "ade20k", "camvid")} <= names
    assert {"demo.yaml", "recipes/pascal_voc.yaml", "recipes/ade20k.yaml", "recipes/camvid.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_recipe_file_trains_and_its_config_json_reproduces_it(path, roots, tmp_path):
    dataset = dataset_of(path)
    argv = ["--config", str(path), "--demo", "--data-dir", str(roots[dataset]), "--save-dir", str(tmp_path), *TINY]
    if path.name == "demo.yaml":
        argv = argv[2:]
    if "afdcd" in path.name:  # its contrast pools the last stage 4x into 4x4 patches: at least 128 px crops
        argv += ["--input-size", "128,128"]
    cfg, record = train_and_reload(argv, tmp_path)
    assert record["config"] == to_dict(cfg)
    # The run's record is itself a recipe: fed back, it resolves to the identical configuration.
    again = train.resolve_config(["--config", str(tmp_path / cfg.output.name / "config.json")])
    assert to_dict(again) == to_dict(cfg)
    last = torch.load(tmp_path / cfg.output.name / "last.pth", weights_only=True)
    assert last["config"] == to_dict(cfg) and last["step"] == 2
    if path.parent.name == "cityscapes":
        assert cfg.distill.preset == path.stem


def test_print_config_is_a_recipe_that_resolves_to_itself(tmp_path, capsys):
    argv = ["--preset", "cd_kd_adv", "--set", "optim.lr=0.02", "data.crop_size=[256,256]", "--student-arch",
            "deeplabv3_resnet18", "--teacher-arch", "deeplabv3_resnet101"]
    assert train.main([*argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    cfg = train.resolve_config(argv)
    assert cfg.optim.lr == 0.02 and cfg.data.crop_size == (256, 256) and cfg.distill.preset == "cd_kd_adv"
    assert to_dict(train.resolve_config(["--config", str(tmp_path / "printed.yaml")])) == to_dict(cfg)


def test_layers_order_and_flags_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 0.05, num_steps: 7}\ndata: {crop_size: [64, 96]}\n"
                      "distill: {preset: at_feat, terms: {kd: {weight: 2}}}\n")
    cfg = train.resolve_config(["--config", str(recipe)])
    assert (cfg.optim.lr, cfg.optim.num_steps, cfg.data.crop_size) == (0.05, 7, (64, 96))
    assert list(cfg.distill.terms) == ["at_feat", "kd"] and cfg.distill.terms["kd"]["weight"] == 2.0
    # typed flags win over the file, --set over the flags; --distill re-weights the file's terms
    cfg = train.resolve_config(["--config", str(recipe), "--lr-g", "0.1", "--set", "optim.num_steps=9",
                                "--distill", "at_feat=5"])
    assert (cfg.optim.lr, cfg.optim.num_steps) == (0.1, 9)
    assert cfg.distill.terms["at_feat"]["weight"] == 5.0 and cfg.distill.terms["kd"]["weight"] == 2.0
    # a later --preset replaces the terms below it
    assert list(train.resolve_config(["--config", str(recipe), "--preset", "cd_logits"]).distill.terms) == ["cwd"]
    # --demo's CWD applies only when nothing else chose the distillation
    assert list(train.resolve_config(["--demo"]).distill.terms) == ["cwd"]
    assert list(train.resolve_config(["--demo", "--distill", "kd=1"]).distill.terms) == ["kd"]
    assert train.resolve_config(["--demo", "--preset", "baseline"]).distill.terms == {}
    assert list(train.resolve_config(["--demo", "--config", str(recipe)]).distill.terms) == ["at_feat", "kd"]


@pytest.mark.parametrize("argv, message", [
    (["--set", "optim.lr=abc"], "optim.lr"),
    (["--set", "optim.no_such=1"], "no_such"),
    (["--set", "lr=1"], "expected SECTION.FIELD=VALUE"),
    (["--config", "/no/such.yaml"], "--config /no/such.yaml: no such file"),
    (["--set", "optim.optimizer=adam"], "choose one of sgd, adamw"),
    (["--set", "models.student_arch=vgg"], "unknown arch 'vgg'"),
    (["--save-name", "../../escaped"], "one folder name inside --save-dir"),
])
def test_bad_configurations_are_one_line_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.resolve_config([*argv, "--save-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_a_config_file_with_an_unknown_section_or_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimiser: {lr: 1}\n")
    with pytest.raises(SystemExit):
        train.resolve_config(["--config", str(bad)])
    assert "unknown section(s) optimiser" in capsys.readouterr().err
    bad.write_text("optim: {learning_rate: 1}\n")
    with pytest.raises(SystemExit):
        train.resolve_config(["--config", str(bad)])
    assert "learning_rate" in capsys.readouterr().err


def test_mse_divergence_records_tau_one_everywhere(roots, tmp_path):
    argv = ["--cwd", "True", "--divergence", "mse", "--temperature", "4", "--teacher-ckpt", "random",
            "--student-init", "random", "--teacher-arch", "resnet18", "--data-dir", str(roots["cityscapes"]),
            "--save-dir", str(tmp_path), *TINY]
    cfg, record = train_and_reload(argv, tmp_path)
    assert cfg.distill.terms["cwd"]["tau"] == 1.0 and cfg.distill.terms["cwd"]["div"] == "mse"
    assert "_mse_3_1_train" in cfg.output.name  # the run name says the temperature used
    assert record["config"]["distill"]["terms"]["cwd"]["tau"] == 1.0
    run_dir = tmp_path / cfg.output.name
    assert torch.load(run_dir / "last.pth", weights_only=True)["config"]["distill"]["terms"]["cwd"]["tau"] == 1.0
    from cwdseg.checkpoint import load_state_dict_file, student_metadata

    meta = student_metadata(load_state_dict_file(run_dir / "city_1_G.pth"))
    assert meta["config"]["distill"]["terms"]["cwd"]["tau"] == 1.0
    line = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["loss"]["cwd"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    *[["--dataset", d] for d in DATASETS],
    *[["--student-arch", a] for a in ARCHS if arch_spec(a).family != "segformer"],
    ["--student-arch", "segformer_b0", "--teacher-arch", "segformer_b0"],  # RGB ImageNet input: a SegFormer teacher
    ["--distill", "cwd=3", "kd=1"],
    ["--distill", "at_feat=100", "--cwd", "True"],
], ids=lambda v: "_".join(x.lstrip("-") for x in v))
def test_demo_combines_with_datasets_archs_and_distill(variant, roots, tmp_path):
    dataset = variant[1] if variant[0] == "--dataset" else "cityscapes"
    argv = ["--demo", *variant, "--data-dir", str(roots[dataset]), "--save-dir", str(tmp_path), *TINY]
    cfg, record = train_and_reload(argv, tmp_path)
    assert record["config"]["data"]["dataset"] == dataset and cfg.output.demo
    name = "city" if dataset == "cityscapes" else dataset  # the student file is named after its dataset
    assert (tmp_path / cfg.output.name / f"{name}_1_G.pth").is_file()


def test_resume_with_a_changed_field_names_it():
    saved = to_dict(train.resolve_config(["--preset", "cd_logits"]))
    now = train.resolve_config(["--preset", "cd_logits", "--set", "optim.power=0.8", "--num-workers", "7",
                                "--data-dir", "elsewhere"])
    assert differences(saved, now) == ["optim.power: saved 0.9, now 0.8"]  # paths and workers are free
    now = train.resolve_config(["--distill", "cwd=5"])
    assert [d.split(":")[0] for d in differences(saved, now)] == ["distill.preset", "distill.terms"]


def test_a_toolkit_student_file_needs_no_arch_or_dataset_flag(roots, tmp_path):
    from cwdseg.cli import evaluate, predict
    from tools import export as export_tool

    argv = ["--demo", "--dataset", "camvid", "--student-arch", "deeplabv3_mobilenetv2", "--data-dir",
            str(roots["camvid"]), "--save-dir", str(tmp_path), *TINY]
    cfg, _ = train_and_reload(argv, tmp_path)
    student = tmp_path / cfg.output.name / "camvid_1_G.pth"
    results = evaluate.main(["--restore-from", str(student), "--data-dir", str(roots["camvid"]), "--device", "cpu",
                             "--num-workers", "0", "--no-progress"])
    assert results["checkpoint"]["arch"] == "deeplabv3_mobilenetv2" and len(results["per_class_iou"]) == 11
    assert results["data"]["dataset"] == "camvid"
    image = next((roots["camvid"]).rglob("*.png"))
    out = predict.main(["--restore-from", str(student), "--input", str(image), "--output-dir", str(tmp_path / "p"),
                        "--device", "cpu", "--no-progress"])
    assert out is not None and any((tmp_path / "p").rglob("*.png"))
    meta = export_tool.main([str(tmp_path / cfg.output.name), "--out-dir", str(tmp_path / "e"), "--formats",
                             "safetensors", "--gmacs-sizes", "64x64"])
    assert meta["arch"] == "deeplabv3_mobilenetv2" and meta["num_classes"] == 11
    assert [c["name"] for c in meta["classes"]][:2] == ["sky", "building"]
    assert meta["training"]["data"]["dataset"] == "camvid"


def test_the_code_reads_the_configuration_not_the_arguments():
    """No getattr(args, ...), no assignment into parsed arguments, no hand-kept list of recipe keys. (The
    cityscapesscripts evaluator's own argument object, set up in evaluation/metrics.py, is not ours.)"""
    bad = []
    for path in sorted((ROOT / "cwdseg").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() == "cwdseg/evaluation/metrics.py":
            continue
        text = path.read_text()
        if "getattr(args" in text or "RECIPE_KEYS" in text:
            bad.append(f"{path.relative_to(ROOT)}: getattr(args, ...) or RECIPE_KEYS")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "args":
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} assigns args.{t.attr}")
    assert not bad, bad


def test_configuration_is_immutable_and_round_trips():
    cfg = train.resolve_config(["--preset", "pa_feat"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
