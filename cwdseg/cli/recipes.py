"""Per-dataset training recipes for the PSPNet-R18 student, selected with ``train.py --recipe NAME``.

A recipe only changes defaults: any flag typed on the command line still wins. Sources, per dataset:

- ``cityscapes``: the original CWD recipe (TorchDistiller ``SemSeg-distill``), i.e. train.py's defaults.
- ``pascal_voc``: mmsegmentation's VOC-aug schedule (``configs/_base_/datasets/pascal_voc12_aug.py``,
  ``pspnet_*_4xb4-40k_voc12aug-512x512``): 512x512 crops, batch 16, 40k iterations, SGD lr 0.01, random
  resize and flip. The CWD paper's VOC numbers were produced with the mmsegmentation-based distiller
  (the official README sends VOC/ADE20K users to ``pppppM/mmsegmentation-distiller``).
- ``ade20k``: mmsegmentation's ADE20K schedule (``pspnet_*_4xb4-80k_ade20k-512x512``): 512x512 crops,
  batch 16, 80k iterations, lr 0.01, random resize and flip.
- ``camvid``: the CIRKD family's CamVid recipe (``train_scripts/train_baseline/camvid/pspnet_res18.sh`` with
  ``train_baseline.py`` defaults): 360x360 crops, batch 16, 40k iterations, lr 0.02, wd 1e-4, scale + flip.

Departures, said here and in README.md: the random scale is the original's 0.7..2.1 (mmsegmentation and
CIRKD draw 0.5..2.0), and neither mmsegmentation's ``cat_max_ratio`` crop nor its photometric distortion
is applied. The final evaluation of a run is the whole image at native size (CIRKD's protocol);
``evaluate.py --short-side 512`` gives mmsegmentation's (short side resized to 512 first).
"""
from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "cityscapes": dict(dataset="cityscapes"),
    "pascal_voc": dict(dataset="pascal_voc", input_size=(512, 512), batch_size=16, num_steps=40000, lr_g=0.01,
                       random_scale=True, random_mirror=True, T_ckpt_path="ckpt/teacher_voc.pth"),
    "ade20k": dict(dataset="ade20k", input_size=(512, 512), batch_size=16, num_steps=80000, lr_g=0.01,
                   random_scale=True, random_mirror=True, T_ckpt_path="ckpt/teacher_ade20k.pth"),
    "camvid": dict(dataset="camvid", input_size=(360, 360), batch_size=16, num_steps=40000, lr_g=0.02,
                   weight_decay=1e-4, random_scale=True, random_mirror=True, T_ckpt_path="ckpt/teacher_camvid.pth"),
}
