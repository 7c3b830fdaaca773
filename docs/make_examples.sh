#!/usr/bin/env bash
# Regenerates the example pictures of README.md ("Using a trained student") in docs/.
# They come from the SYNTHETIC dataset and RANDOM-WEIGHT networks (no training, no Cityscapes): they show
# what the commands draw, not what a trained student predicts.
set -euo pipefail
W=${1:-/tmp/cwdseg_docs_examples}
rm -rf "$W" && mkdir -p "$W"
python -m cwdseg.data.synthetic "$W/cityscapes" --train 0 --val 2 --test 0 --size 256 512 --seed 0
python - "$W" <<'PY'
import sys, torch
from cwdseg.models import build_model
# Random weights with logits of a trained network's scale (|logit| ~ 5-10): convs N(0, 1/fan_in),
# BN |weight| in [0.5, 1], small biases; saved in the released key layout.
for arch, name, seed in (("resnet18", "student_random", 1), ("resnet101", "teacher_random", 0)):
    g, sd = torch.Generator().manual_seed(seed), {}
    for k, v in build_model(arch).state_dict().items():
        leaf = k.rsplit(".", 1)[1]
        if v.ndim >= 2: sd[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
        elif leaf == "weight": sd[k] = 0.5 + 0.5 * torch.rand(v.shape, generator=g)
        elif leaf == "running_var": sd[k] = 0.5 + torch.rand(v.shape, generator=g)
        else: sd[k] = 0.05 * torch.randn(v.shape, generator=g)
    torch.save(sd, f"{sys.argv[1]}/{name}.pth")
PY
V="$W/cityscapes/leftImg8bit/val/validton"
python predict.py --restore-from "$W/student_random.pth" --input "$V/validton_000000_000019_leftImg8bit.png" --output-dir "$W/pred" --no-progress
python evaluate.py --data-dir "$W/cityscapes" --restore-from "$W/teacher_random.pth" --save-dir "$W/eval_teacher" --no-progress --num-workers 0
python evaluate.py --data-dir "$W/cityscapes" --restore-from "$W/student_random.pth" --save-dir "$W/eval_student" --compare "$W/eval_teacher/results.json" --no-progress --num-workers 0
python tools/show_distillation.py --teacher "$W/teacher_random.pth" --student "$W/student_random.pth" --data-dir "$W/cityscapes" --index 0 --top-k 4 --out "$W/channels.png"
cp "$W/pred/overlay/validton_000000_000019_leftImg8bit.png" docs/example_predict_overlay.png
cp "$W/eval_student/class_iou.png" docs/example_class_iou.png
cp "$W/channels.png" docs/example_show_distillation.png
