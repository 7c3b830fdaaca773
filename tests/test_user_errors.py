"""Every user mistake is one line (exit status 2) naming the culprit, and nothing is overwritten.

The README's Troubleshooting section lists the cases covered here (``BAD_INPUT_CASES`` counts them).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.factories import write_legacy_student

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
TINY = ["--input-size", "64,64", "--batch-size", "2", "--num-workers", "0", "--student-init", "random",
        "--teacher-arch", "resnet18", "--log-every", "1", "--device", "cpu", "--eval", "False"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from cwdseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, n_train=4, n_val=2, n_test=1, size=(64, 128), seed=0)
    return root


@pytest.fixture(scope="module")
def student_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    write_legacy_student(folder / "a.pth", seed=1)
    write_legacy_student(folder / "b.pth", seed=2)
    return folder / "a.pth", folder / "b.pth"


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def train(data_dir: Path, save_dir: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "--data-dir", str(data_dir), "--save-dir", str(save_dir), "--save-name", name,
            *TINY, *extra]


def assert_one_line_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write into: a read-only tmpfs when root (root ignores permissions), else 0555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("running as root without permission to mount a read-only tmpfs")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------------------
# Values (in process: the argument checks run before anything is built)
# ------------------------------------------------------------------------------------------------
BAD_TRAIN_VALUES = [
    (["--temperature", "0"], "--temperature must be > 0, got 0"),
    (["--temperature", "-2"], "--temperature must be > 0, got -2"),
    (["--lambda-cwd", "-3"], "--lambda-cwd must be >= 0, got -3"),
    (["--lambda-kd", "-1"], "--lambda-kd must be >= 0, got -1"),
    (["--lambda-adv", "-0.001"], "--lambda-adv must be >= 0, got -0.001"),
    (["--lambda-gp", "nan"], "--lambda-gp must be >= 0, got nan"),
    (["--lr-g", "0"], "--lr-g must be > 0, got 0"),
    (["--momentum", "1.5"], "--momentum must be < 1, got 1.5"),
    (["--num_classes", "5"], "--num_classes 5: the Cityscapes labels hold 19 classes"),
    (["--ignore-label", "300"], "--ignore-label must be in 0..255"),
    (["--ignore-label", "3"], "--ignore-label 3 is one of the 19 classes"),
    (["--resume", "/nonexistent/last.pth"], "--resume /nonexistent/last.pth: no such file"),
]


@pytest.mark.parametrize("argv, message", BAD_TRAIN_VALUES)
def test_train_refuses_bad_values(argv, message, capsys, tmp_path):
    from cwdseg.cli import train

    with pytest.raises(SystemExit) as exc:
        train.resolve_config(["--save-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_train_refuses_a_read_only_save_dir(readonly_dir, capsys):
    from cwdseg.cli import train

    with pytest.raises(SystemExit) as exc:
        train.resolve_config(["--save-dir", str(readonly_dir / "runs")])
    assert exc.value.code == 2
    assert f"--save-dir {readonly_dir / 'runs'}: cannot write into {readonly_dir}" in capsys.readouterr().err


BAD_EVAL_VALUES = [
    (["--scales", "0"], "--scales must all be > 0, got 0"),
    (["--scales", "1", "-0.5"], "--scales must all be > 0, got -0.5"),
    (["--tile", "0", "512"], "--tile must be two positive sizes"),
    (["--num-classes", "5"], "--num-classes 5: the Cityscapes labels hold 19 classes"),
]


@pytest.mark.parametrize("argv, message", BAD_EVAL_VALUES)
def test_evaluate_refuses_bad_values(argv, message, capsys, student_files):
    from cwdseg.cli import evaluate

    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--data-dir", "d", "--restore-from", str(student_files[0]), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_evaluate_refuses_a_read_only_save_dir(readonly_dir, capsys, student_files):
    from cwdseg.cli import evaluate

    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--data-dir", "d", "--restore-from", str(student_files[0]), "--save-dir", str(readonly_dir)])
    assert exc.value.code == 2
    assert "read-only filesystem" in capsys.readouterr().err or os.geteuid() != 0


# ------------------------------------------------------------------------------------------------
# Files and folders
# ------------------------------------------------------------------------------------------------
def test_evaluate_save_dir_of_another_checkpoint(data_dir, student_files, tmp_path, capsys):
    from cwdseg.cli import evaluate

    a, b = student_files
    out = tmp_path / "out"
    base = ["--data-dir", str(data_dir), "--save-dir", str(out), "--num-workers", "0", "--no-progress",
            "--device", "cpu"]
    assert evaluate.cli([*base, "--restore-from", str(a)]) == 0
    stale = out / "color" / "from_an_older_run_color.png"
    stale.write_bytes(b"x")
    before = (out / "results.json").read_bytes()
    capsys.readouterr()

    assert evaluate.cli([*base, "--restore-from", str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--save-dir {out} already holds outputs of another checkpoint ({a.resolve()}" in err
    assert (out / "results.json").read_bytes() == before and stale.exists()

    assert evaluate.cli([*base, "--restore-from", str(b), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["checkpoint"]["path"] == str(b.resolve())
    assert not stale.exists()
    # the same checkpoint again is no conflict
    assert evaluate.cli([*base, "--restore-from", str(b)]) == 0


def test_list_line_without_its_label(data_dir, student_files, tmp_path):
    image = next((data_dir / "leftImg8bit" / "val").rglob("*_leftImg8bit.png")).relative_to(data_dir)
    listing = tmp_path / "val_images_only.lst"
    listing.write_text(f"{image}\n")
    proc = run([sys.executable, "evaluate.py", "--data-dir", str(data_dir), "--restore-from", str(student_files[0]),
                "--data-list", str(listing), "--num-workers", "0", "--device", "cpu"])
    assert_one_line_error(proc, "evaluate.py", f"{listing}:1: the val split needs 'image<TAB>label'")
    assert "mIoU" not in proc.stdout


def test_bad_png_inside_a_loader_worker_is_one_line(student_files, tmp_path):
    from cwdseg.data.synthetic import generate

    root = generate(tmp_path / "data", n_train=0, n_val=2, n_test=0, size=(64, 128), seed=1)
    broken = sorted((root / "leftImg8bit" / "val").rglob("*_leftImg8bit.png"))[1]
    broken.write_bytes(broken.read_bytes()[:60])  # truncated download
    proc = run([sys.executable, "evaluate.py", "--data-dir", str(root), "--restore-from", str(student_files[0]),
                "--num-workers", "1", "--device", "cpu", "--no-progress"])
    assert_one_line_error(proc, "evaluate.py", f"cannot decode image {broken}", "raised in a data loader worker")
    assert "Original Traceback" not in proc.stderr


def test_second_run_into_a_busy_folder(data_dir, tmp_path):
    cmd = train(data_dir, tmp_path, "busy", "--teacher-ckpt", "random", "--num-steps", "500", "--save-last-every", "500")
    first = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "busy"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and
                                              (run_dir / "metrics.jsonl").read_text().strip()):
            time.sleep(0.05)
        config = (run_dir / "config.json").read_bytes()
        second = run(cmd)
        assert_one_line_error(second, "train.py", f"{run_dir} is in use by another run (pid {first.pid} on ")
        assert (run_dir / "config.json").read_bytes() == config
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0


def test_stale_lock_is_taken_over_and_a_complete_run_is_a_no_op(data_dir, tmp_path):
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    (run_dir / "run.lock").write_text(json.dumps({"host": "node17", "pid": 4194000, "started": "yesterday",
                                                  "command": "python train.py --old"}))
    cmd = train(data_dir, tmp_path, "stale", "--teacher-ckpt", "random", "--num-steps", "1")
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "no longer running (pid 4194000 on node17, started yesterday: python train.py --old); stale lock taken " \
           "over" in proc.stdout
    assert not (run_dir / "run.lock").exists()

    final = run_dir / "city_0_G.pth"
    stamp = final.stat().st_mtime_ns
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert f"{run_dir} holds this run complete (1/1 steps, city_0_G.pth): nothing to do" in again.stdout
    assert final.stat().st_mtime_ns == stamp
    forced = run(cmd + ["--force"])
    assert forced.returncode == 0 and final.stat().st_mtime_ns != stamp


def test_resume_refuses_a_changed_teacher_file_by_content(data_dir, tmp_path):
    teacher = tmp_path / "teacher.pth"
    write_legacy_student(teacher, seed=5)  # a resnet18 teacher (--teacher-arch resnet18)
    original = teacher.read_bytes()
    cmd = train(data_dir, tmp_path, "t", "--teacher-ckpt", str(teacher), "--teacher-check-images", "0", "--cwd", "True", "--num-steps", "2",
                "--save-last-every", "1")
    assert run(cmd).returncode == 0
    run_dir = tmp_path / "t"
    last = torch.load(run_dir / "last.pth", map_location="cpu", weights_only=True)
    last["step"] = 1  # as if stopped after the first step
    torch.save(last, run_dir / "last.pth")
    saved, config = (run_dir / "last.pth").read_bytes(), (run_dir / "config.json").read_bytes()

    write_legacy_student(teacher, seed=6)  # same path, other weights
    proc = run(cmd)
    assert_one_line_error(proc, "train.py", f"{run_dir / 'last.pth'} was started from other files: teacher was "
                          f"{teacher} (sha256 ", "--teacher-ckpt now gives")
    assert (run_dir / "last.pth").read_bytes() == saved and (run_dir / "config.json").read_bytes() == config

    moved = tmp_path / "elsewhere" / "same_teacher.pth"  # other path, same content: accepted
    moved.parent.mkdir()
    moved.write_bytes(original)
    cmd[cmd.index(str(teacher))] = str(moved)
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert "at step 1/2" in proc.stdout
    record = json.loads((run_dir / "config.json").read_text())
    assert record["config"]["models"]["teacher_ckpt"] == str(teacher), "config.json keeps what the run started with"
    assert record["resumes"][-1]["step"] == 1
    assert record["resumes"][-1]["changed"]["models.teacher_ckpt"] == {"was": str(teacher), "now": str(moved)}


def test_checkpoint_of_another_class_count_names_both(student_files):
    from cwdseg import checkpoint as ckpt
    from cwdseg.models import build_model

    with pytest.raises(ckpt.CheckpointError) as exc:
        ckpt.load_student(build_model("resnet18", num_classes=5), student_files[0])
    first_hint = str(exc.value).splitlines()[1]
    assert first_hint == "  hint: the file has 19 classes, the model 5: pass --num-classes 19"


# ------------------------------------------------------------------------------------------------
# Space
# ------------------------------------------------------------------------------------------------
def test_full_disk_names_the_file_and_the_bytes(data_dir, tmp_path):
    # A filesystem with 10 MB free (patched: no root needed), and last.pth needs ~100 MB.
    code = ("import sys; from cwdseg import checkpoint as c; c.free_bytes = lambda folder: 10_000_000; "
            "from cwdseg.cli.train import cli; sys.exit(cli(sys.argv[1:]))")
    proc = run([sys.executable, "-c", code, *train(data_dir, tmp_path, "full")[2:], "--teacher-ckpt", "random",
                "--num-steps", "1"])
    line = assert_one_line_error(proc, "train.py", f"cannot write {tmp_path / 'full' / 'last.pth'}: no space left",
                                 "10000000 bytes are free")
    needed = int(line.split("it needs ")[1].split(" bytes")[0])
    assert needed > 10_000_000
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "full").iterdir())


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from cwdseg import checkpoint as ckpt

    path = tmp_path / "last.pth"
    ckpt.atomic_save({"w": torch.arange(10)}, path)
    before = path.read_bytes()
    new = {"w": torch.zeros(1000)}
    size = len(_serialised(new))

    real_fdopen = os.fdopen

    def fdopen_full(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

        return Full()

    monkeypatch.setattr(ckpt.os, "fdopen", fdopen_full)
    with pytest.raises(ckpt.SaveError) as exc:
        ckpt.atomic_save(new, path)
    message = str(exc.value)
    assert f"cannot write {path} (the previous file is intact): no space left: it needs {size} bytes" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def _serialised(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# exp_cwd.sh
# ------------------------------------------------------------------------------------------------
BAD_EXP_CWD = [
    (["channel", "kl", "3", "4", "False", "False", "False", "--demo"],
     "VERSION is missing: got the flag '--demo' as the 8th positional argument"),
    (["channel", "kl", "3", "0", "False", "False", "False", "v1"], "TEMPERATURE must be > 0, got '0'"),
    (["channel", "kl", "3", "0.0e3", "False", "False", "False", "v1"], "TEMPERATURE must be > 0, got '0.0e3'"),
]


@pytest.mark.parametrize("positional, message", BAD_EXP_CWD)
def test_exp_cwd_refuses_a_missing_version_and_zero_temperature(positional, message, tmp_path):
    proc = run(["bash", str(ROOT / "exp_cwd.sh"), *positional, "--save-dir", str(tmp_path)])
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "usage: bash exp_cwd.sh NORM DIVERGENCE WEIGHT TEMPERATURE KD ADV FEAT VERSION" in proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing was started"


def test_batch_that_does_not_split_is_one_line(tmp_path, capsys):
    from cwdseg.cli import train

    rc = train.cli(["--save-dir", str(tmp_path), "--device", "cpu", "--batch-size", "3", "--grad-accum", "2",
                    "--teacher-ckpt", "random", "--student-init", "random", "--cwd", "True"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("train.py: error: --batch-size 3 does not split into 1 processes x --grad-accum 2")


# The one-case tests above, by name; with the three tables, the count in README.md's Troubleshooting.
SINGLE_CASES = [
    test_train_refuses_a_read_only_save_dir, test_evaluate_refuses_a_read_only_save_dir,
    test_evaluate_save_dir_of_another_checkpoint, test_list_line_without_its_label,
    test_bad_png_inside_a_loader_worker_is_one_line, test_second_run_into_a_busy_folder,
    test_stale_lock_is_taken_over_and_a_complete_run_is_a_no_op, test_resume_refuses_a_changed_teacher_file_by_content,
    test_full_disk_names_the_file_and_the_bytes, test_failed_write_keeps_the_previous_checkpoint,
    test_checkpoint_of_another_class_count_names_both, test_batch_that_does_not_split_is_one_line,
]
BAD_INPUT_CASES = len(BAD_TRAIN_VALUES) + len(BAD_EVAL_VALUES) + len(BAD_EXP_CWD) + len(SINGLE_CASES)


def test_readme_counts_the_cases():
    text = (ROOT / "README.md").read_text()
    assert f"covers these **{BAD_INPUT_CASES} cases**" in text
    assert f"train.py values ({len(BAD_TRAIN_VALUES)})" in text and f"evaluate.py values ({len(BAD_EVAL_VALUES)})" in text
    assert f"folders and files ({len(SINGLE_CASES)})" in text
    for argv, _ in BAD_TRAIN_VALUES + BAD_EVAL_VALUES:
        assert f"`{' '.join(argv)}`" in text or argv[0] == "--resume", argv
