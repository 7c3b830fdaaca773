"""predict.py, tools/export.py, tools/show_distillation.py and the checkpoint hints: each mistake is one
line naming the culprit and the fix (issue 26). The README's Troubleshooting counts these (``TOOL_CASES``)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cwdseg.checkpoint import CheckpointError, load_student, load_teacher
from cwdseg.cli import evaluate, predict
from cwdseg.cli.checks import OutputNameError, safe_child
from cwdseg.models import build_model
from tests.factories import write_legacy_student
from tests.test_user_errors import readonly_dir  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "student.pth"
    write_legacy_student(path, seed=0)
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "street.jpg"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(path), rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    return path


def one_line(capsys, prog: str) -> str:
    """The error line; ``prog`` is the script's name (argparse's own errors in process name pytest's)."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith(f"{prog}: error: ") or (len(lines) == 2 and ": error: " in lines[-1]), err
    assert len(lines) <= 2, err  # at most the short usage line first
    return lines[-1]


def predict_args(student: Path, image: Path, out: Path, *extra: str) -> list[str]:
    return ["--restore-from", str(student), "--input", str(image), "--output-dir", str(out), "--device", "cpu",
            *extra]


def test_predict_read_only_output_dir(readonly_dir, student, image, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exc:
        predict.main(predict_args(student, image, readonly_dir / "out"))
    assert exc.value.code == 2
    assert f"--output-dir {readonly_dir / 'out'}: cannot write into {readonly_dir}" in one_line(capsys, "predict.py")


def test_export_read_only_out_dir_and_escaping_name(readonly_dir, student, tmp_path, capsys):  # noqa: F811
    from tools import export

    with pytest.raises(SystemExit):
        export.main([str(student), "--out-dir", str(readonly_dir / "x")])
    assert f"--out-dir {readonly_dir / 'x'}: cannot write into" in one_line(capsys, "export.py")
    with pytest.raises(SystemExit):
        export.main([str(student), "--out-dir", str(tmp_path / "x"), "--name", "../../escaped"])
    assert "--name '../../escaped': must be a plain folder name inside" in capsys.readouterr().err
    assert not (tmp_path.parent / "escaped.onnx").exists()


def test_safe_child_keeps_names_inside_their_folder(tmp_path):
    assert safe_child(tmp_path, "run_1") == tmp_path.absolute() / "run_1"
    for name in ("../../escaped", "a/b", "/etc", "..", "", "."):
        with pytest.raises(OutputNameError, match="--save-name"):
            safe_child(tmp_path, name)


def test_truncated_jpeg_is_refused_by_name(image, tmp_path, capsys, student):
    from cwdseg.evaluation.media import MediaError, read_image

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])
    assert cv2.imread(str(cut)) is not None  # OpenCV alone decodes it, half grey
    with pytest.raises(MediaError, match=f"{cut}: truncated JPEG"):
        read_image(cut)
    assert read_image(image).shape == (48, 64, 3)
    assert predict.cli(predict_args(student, cut, tmp_path / "o", "--no-progress")) == 2
    assert "truncated JPEG" in one_line(capsys, "predict.py")


def test_restore_from_a_folder_is_called_a_folder(tmp_path, image, capsys):
    assert predict.cli(predict_args(tmp_path, image, tmp_path / "o")) == 2
    assert f"--restore-from {tmp_path}: is a folder, not a checkpoint file" in one_line(capsys, "predict.py")


def test_onnx_file_given_as_weights_says_what_it_is(tmp_path, capsys):
    fake = tmp_path / "student.onnx"
    fake.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.13.0" + bytes(64))  # ModelProto: ir_version, producer
    renamed = tmp_path / "student.pth"
    renamed.write_bytes(fake.read_bytes())
    assert evaluate.cli(["--data-dir", str(tmp_path), "--restore-from", str(fake), "--device", "cpu"]) == 2
    assert str(fake) in one_line(capsys, "evaluate.py")  # an .onnx name is run with ONNX Runtime, which refuses it
    assert evaluate.cli(["--data-dir", str(tmp_path), "--restore-from", str(renamed), "--device", "cpu"]) == 2
    line = one_line(capsys, "evaluate.py")
    assert "is an ONNX export (tools/export.py)" in line and "predict.py --restore-from" in line
    assert "download it again" not in line


def test_hints_name_the_flag_of_the_script_and_the_role(tmp_path):
    file = tmp_path / "r18.pth"
    torch.save(build_model("pspnet_resnet18", num_classes=11).state_dict(), file)
    with pytest.raises(CheckpointError, match="the file has 11 classes, the model 19: pass --num-classes 11"):
        load_student(build_model("pspnet_resnet18", num_classes=19), file)
    with pytest.raises(CheckpointError) as exc:  # a PSPNet-R18 file given as the DeepLabV3-R18 teacher
        load_teacher(build_model("deeplabv3_resnet18", num_classes=11), file)
    assert "is it the teacher file? (or pass --teacher-arch pspnet_resnet18)" in str(exc.value)
    assert "--student-arch" not in str(exc.value)


def test_show_distillation_blames_the_right_file(student, image, tmp_path, capsys):
    from tools import show_distillation

    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"<html>not a checkpoint</html>")
    for teacher, needle in ((bad, f"--teacher: {bad}: cannot be read"), (tmp_path, f"--teacher {tmp_path}: is a folder")):
        code = show_distillation.cli(["--teacher", str(teacher), "--student", str(student), "--image", str(image),
                                      "--out", str(tmp_path / "c.png")])
        line = one_line(capsys, "show_distillation.py")
        assert code == 2 and needle in line and "--student" not in line and "--restore-from" not in line


def test_distill_terms_joined_by_a_comma_get_the_separator_hint():
    from cwdseg.distill.registry import DistillSpecError, parse_entry

    with pytest.raises(DistillSpecError, match=r"terms are separated by spaces: --distill cwd=3 at=1"):
        parse_entry("cwd=3,at=1")


def test_predict_help_and_progress_in_a_log(student, image, tmp_path, capsys):
    text = predict.get_args_parser().format_help()
    assert "--ids, --no-ids" in text and "--overlay, --no-overlay" in text
    assert predict.cli(predict_args(student, image, tmp_path / "o")) == 0  # stderr is no terminal here
    err = capsys.readouterr().err
    assert "\r" not in err and "predict: 1/1 frames" in err


TOOL_CASES = [test_predict_read_only_output_dir, test_export_read_only_out_dir_and_escaping_name,
              test_truncated_jpeg_is_refused_by_name, test_restore_from_a_folder_is_called_a_folder,
              test_onnx_file_given_as_weights_says_what_it_is, test_hints_name_the_flag_of_the_script_and_the_role,
              test_show_distillation_blames_the_right_file, test_distill_terms_joined_by_a_comma_get_the_separator_hint]


def test_readme_lists_the_tool_cases():
    text = (ROOT / "README.md").read_text()
    assert f"predict.py, tools and hints ({len(TOOL_CASES)}, `tests/test_tool_errors.py`)" in text
