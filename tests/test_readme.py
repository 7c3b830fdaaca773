"""Every command in README.md is exercised, so the README cannot rot.

The quick-start commands are what CI runs (they must appear verbatim in .ci/run). The others need the
real dataset, the released checkpoints or a GPU; here each is run on the synthetic dataset where it is
cheap, and otherwise its exact argument list is parsed by the program's own parser (a renamed or
removed flag fails). A command that no rule below recognises fails the test: add a rule for it.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    """Shell commands of the README's ```bash blocks (comments dropped, `&&` chains split)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in line.split("&&")]
    return commands


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [c.strip() for line in lines for c in line.split("&&") if c.strip()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("readme") / "cityscapes", n_train=2, n_val=2, n_test=1, size=(64, 128))


def test_quick_start_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = quick_start()
    assert commands == ["pip install torch==2.13.0", 'pip install -e ".[test]"', "python train.py --demo",
                        "python -m pytest -q"]
    for command in commands:
        assert command.replace("pip install", "python -m pip install -q") in ci or command in ci, command


def _parse_train(argv: list[str]) -> None:
    from cwdseg.cli import train

    train.resolve_config(argv)


def check(command: str, synthetic: Path, tmp_path: Path) -> None:
    argv = shlex.split(command)
    env = dict(os.environ, CITYSCAPES=str(synthetic))
    if command in quick_start():
        return  # run by CI as written
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value prefixes: the command after them is checked
        argv = argv[1:]
        command = shlex.join(argv)
    if argv[:3] == ["pip", "install", "-e"]:  # the extras it names exist in setup.py
        extras = re.fullmatch(r"\.\[(.*)\]", argv[3]).group(1).split(",")
        setup = (ROOT / "setup.py").read_text()
        assert all(f'"{extra}":' in setup for extra in extras), extras
        return
    if argv[0] in ("tensorboard", "wandb"):  # the trackers' own programs, installed with their extras
        import shutil

        assert shutil.which(argv[0]), f"{argv[0]} is not installed"
        help_text = subprocess.run([argv[0], argv[1], "--help"], capture_output=True, text=True, timeout=120)
        assert help_text.returncode == 0 or argv[0] == "tensorboard", help_text.stderr
        return
    if argv[0] == "csDownload":
        help_text = subprocess.run(["csDownload", "-h"], capture_output=True, text=True, timeout=60).stdout
        for token in argv[1:]:
            if token.startswith("-"):
                assert token in help_text, f"csDownload has no option {token}"
        return
    if argv[:2] == ["bash", "exp_cwd.sh"]:
        # The script's own argument checks run for real; train.py's parser checks what it passes on.
        stub = tmp_path / "parse_only.sh"
        stub.write_text(f'#!/bin/sh\nshift\nexec {sys.executable} -c "import sys; '
                        f'from cwdseg.cli import train; a = train.resolve_config(sys.argv[1:]); print(a.output.name)" "$@"\n')
        stub.chmod(0o755)
        out = subprocess.run(argv, cwd=ROOT, env=dict(env, PYTHON=str(stub)), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        name = "_".join([argv[6], argv[7], argv[8], argv[2], argv[3], argv[4], argv[5], argv[9]])
        if "--teacher-arch" in argv:  # another pair than the paper's: the architectures are appended
            name += f"_T-{argv[argv.index('--teacher-arch') + 1]}_S-{argv[argv.index('--student-arch') + 1]}"
        assert out.stdout.strip() == name
        return
    if argv[:2] == ["python", "train.py"]:
        return _parse_train(argv[2:])
    if argv[0] == "torchrun":
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        assert argv[script] == "train.py"
        return _parse_train(argv[script + 1:])
    if argv[:2] == ["python", "evaluate.py"]:
        from cwdseg.cli import evaluate

        evaluate.get_args_parser().parse_args(argv[2:])
        return
    if argv[:2] == ["python", "predict.py"]:
        from cwdseg.cli import predict

        predict.get_args_parser().parse_args(argv[2:])
        return
    if argv[:2] in (["python", "tools/export.py"], ["python", "tools/show_distillation.py"]):
        from tools import export, show_distillation

        tool = export if argv[1] == "tools/export.py" else show_distillation
        tool.get_args_parser().parse_args(argv[2:])
        return
    if argv[:2] == ["python", "tools/reproduce_table.py"]:
        from tools import reproduce_table

        reproduce_table.get_args_parser().parse_args(argv[2:])
        return
    if argv[:3] == ["python", "-m", "tools.run_grid"]:
        from tools import run_grid

        args, jobs = run_grid.plan(argv[3:])
        for job in jobs[:1]:
            _parse_train(list(job.train_args))
        return
    if argv[:3] == ["python", "-m", "tools.summarize_runs"]:
        from tools import summarize_runs

        summarize_runs.get_parser().parse_args(argv[3:])
        return
    if argv[:2] == ["python", "benchmarks/run.py"]:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from benchmarks import run as bench_run

        bench_run.get_args_parser().parse_args(argv[2:])
        return
    if argv[:3] == ["python", "-m", "cwdseg.data"]:
        argv = [a if a != "data/cityscapes" else str(synthetic) for a in argv]
        if "--dataset" in argv and argv[argv.index("--dataset") + 1] != "cityscapes":
            # Another registered layout: its synthetic copy stands in for the --data-dir of the README.
            from cwdseg.data.synthetic_zoo import generate_dataset

            root = generate_dataset(argv[argv.index("--dataset") + 1], tmp_path / "zoo")
            argv[argv.index("--data-dir") + 1] = str(root)
        out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "train" in out.stdout and "val" in out.stdout
        return
    if argv[:3] == ["python", "-m", "cwdseg.models"]:
        out = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        expected = {"resnet18": ("13.07M", "125.8"), "resnet101": ("70.44M", "574.9"),  # at 512x1024
                    # CIRKD's published params and FLOPs (its own count) at 1024x2048
                    "deeplabv3_resnet101": ("61.12M", "2371.7 G"), "deeplabv3_resnet18": ("13.61M", "572.0 G"),
                    "deeplabv3_mobilenetv2": ("3.23M", "128.9 G")}[argv[argv.index("--arch") + 1]]
        assert all(e in out.stdout for e in expected), out.stdout
        return
    raise AssertionError(f"README command with no check in tests/test_readme.py: {command}")


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command(command, synthetic, tmp_path):
    check(command, synthetic, tmp_path)


def test_inline_exp_cwd_example_is_checked_too(synthetic, tmp_path):
    """The demo example quoted inside a paragraph of the README."""
    example = re.search(r"`(bash exp_cwd\.sh [^`]*--demo)`", README).group(1)
    check(example, synthetic, tmp_path)
