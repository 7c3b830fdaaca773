"""What an evaluation writes: colour / trainId / labelId PNGs, panels, and the test-server zip."""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Sequence

import cv2
import torch

from cwdseg.data import IMG_MEAN_BGR
from cwdseg.viz.segmaps import (
    image_from_network_input,
    save_color_png,
    save_label_id_png,
    save_panel,
    save_train_id_png,
)

# Sub-folders of --save-dir; labelIds/ alone is what the official evaluator or the server should read.
COLOR_DIR, TRAIN_ID_DIR, LABEL_ID_DIR, PANEL_DIR = "color", "trainIds", "labelIds", "panels"
SUBMISSION_ZIP = "submission.zip"


def write_predictions(pred: torch.Tensor, names: Sequence[str], save_dir: Path, split: str,
                      images: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      info=None, normalization=None) -> list[Path]:
    """Write one batch of trainId maps ``[N, H, W]``; returns the labelId PNG paths.

    ``info`` (a :class:`cwdseg.data.info.DatasetInfo`, default Cityscapes) gives the colours, and the
    class -> label-file table of ``labelIds/`` (for VOC the class values, for ADE20K class + 1, ...).

    val: ``color/<name>_color.png``, ``trainIds/<name>_trainIds.png``, ``labelIds/<name>_leftImg8bit.png``
    and, given the network inputs and labels, ``panels/<name>.jpg`` (image | ground truth | prediction |
    errors, half size); test: ``labelIds/<name>_leftImg8bit.png`` only (the server's naming). The panel's
    picture is the network input undone with ``normalization`` (default: the original's Caffe BGR mean) and,
    when the input was resized (``--short-side``), resized back to the size of the labels and prediction.
    """
    maps = pred.to(torch.uint8).cpu().numpy()
    colors = None if info is None else info.colors
    to_file = None if info is None else info.class_to_file()
    written = []
    for i, (train_ids, name) in enumerate(zip(maps, names)):
        if split != "test":
            save_color_png(save_dir / COLOR_DIR / f"{name}_color.png", train_ids, colors)
            save_train_id_png(save_dir / TRAIN_ID_DIR / f"{name}_trainIds.png", train_ids)
            if images is not None and labels is not None:
                picture = image_from_network_input(images[i], normalization or IMG_MEAN_BGR)
                if picture.shape[:2] != train_ids.shape:
                    picture = cv2.resize(picture, train_ids.shape[::-1], interpolation=cv2.INTER_LINEAR)
                save_panel(save_dir / PANEL_DIR / f"{name}.jpg", picture, labels[i], train_ids, colors=colors)
        suffix = "_leftImg8bit.png" if info is None or info.name == "cityscapes" else ".png"  # the server's naming
        written.append(save_label_id_png(save_dir / LABEL_ID_DIR / f"{name}{suffix}", train_ids, to_file))
    return written


def write_submission_zip(label_id_pngs: Sequence[Path], zip_path: Path) -> Path:
    """Zip the test labelId PNGs flat (file names only), ready for the Cityscapes benchmark server."""
    tmp = zip_path.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are already compressed
        for png in label_id_pngs:
            zf.write(png, arcname=png.name)
    os.replace(tmp, zip_path)
    return zip_path
