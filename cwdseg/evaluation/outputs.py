"""The --save-dir rule of evaluate.py: one checkpoint's outputs per folder, cleared only when asked."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from cwdseg.evaluation.loop import EvaluationError, sha256_file
from cwdseg.evaluation.writers import COLOR_DIR, LABEL_ID_DIR, PANEL_DIR, SUBMISSION_ZIP, TRAIN_ID_DIR

# What evaluate.py writes into --save-dir (all that --overwrite removes).
OUTPUTS = ("results.json", "class_iou.png", COLOR_DIR, TRAIN_ID_DIR, LABEL_ID_DIR, PANEL_DIR, SUBMISSION_ZIP)


def prepare_save_dir(save_dir: Path, checkpoint: str, overwrite: bool) -> None:
    """Refuse a non-empty ``save_dir`` that was not written for ``checkpoint`` (its results.json names
    another file by sha256, or it has none), so predictions of two checkpoints never sit side by side;
    ``overwrite`` clears evaluate.py's outputs first (and refuses folders holding anything else)."""
    if not save_dir.is_dir() or not any(save_dir.iterdir()):
        return
    results = save_dir / "results.json"
    previous = None
    if results.is_file():
        try:
            previous = json.loads(results.read_text()).get("checkpoint", {})
        except (json.JSONDecodeError, AttributeError):
            previous = None
    same = previous is not None and previous.get("sha256") == sha256_file(checkpoint)
    if same and not overwrite:
        return  # the same checkpoint again: its files are replaced one for one
    if not overwrite:
        owner = f"{previous.get('path')} (sha256 {str(previous.get('sha256'))[:12]})" if previous else \
            "no results.json: an unfinished evaluation or other files"
        raise EvaluationError(f"--save-dir {save_dir} already holds outputs of another checkpoint ({owner}); "
                              f"choose an empty --save-dir, or pass --overwrite to clear it first")
    foreign = sorted(p.name for p in save_dir.iterdir() if p.name not in OUTPUTS)
    if foreign:
        raise EvaluationError(f"--save-dir {save_dir} holds files evaluate.py did not write "
                              f"({', '.join(foreign[:5])}); "
                              "--overwrite clears only evaluation outputs: choose another --save-dir")
    remove_outputs(save_dir)
    print(f"--overwrite: cleared the previous outputs in {save_dir}")


def remove_outputs(save_dir: Path, created: bool = False) -> None:
    """Delete what evaluate.py writes into ``save_dir`` (:data:`OUTPUTS`, nothing else); ``created``: the
    folder was made for this evaluation, so it goes too once empty (a failed run leaves no trace)."""
    for name in OUTPUTS:
        path = save_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if created and save_dir.is_dir() and not any(save_dir.iterdir()):
        save_dir.rmdir()
