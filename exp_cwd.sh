#!/usr/bin/env bash
# Train a CWD student with the original eight positional arguments, then evaluate it (train.py does
# the final evaluation and writes ckpt/<NAME>/eval.json).
#
#   bash exp_cwd.sh NORM DIVERGENCE WEIGHT TEMPERATURE KD ADV FEAT VERSION [more train.py flags]
#   bash exp_cwd.sh channel kl 3 4 False False False v1      # CWD on the logits (paper recipe)
#   bash exp_cwd.sh channel kl 3 4 True True False v1        # + pixel KD + holistic GAN
#
# Dataset: $DATASET (cityscapes, pascal_voc, ade20k, camvid or folder; default cityscapes) with its root in
# $DATA_DIR; for cityscapes the root may also come from $CITYSCAPES (default data/cityscapes).
#   DATASET=ade20k DATA_DIR=/data/ADEChallengeData2016 bash exp_cwd.sh channel kl 3 4 False False False v1 --recipe ade20k
# Further arguments go to train.py unchanged,
# e.g. another pair of networks (train.py appends them to the run name when not the paper's pair):
#   bash exp_cwd.sh channel kl 3 4 False False False v1 --teacher-arch deeplabv3_resnet101 \
#        --teacher-ckpt ckpt/deeplabv3_resnet101_citys_best_model.pth --student-arch deeplabv3_resnet18
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: bash exp_cwd.sh NORM DIVERGENCE WEIGHT TEMPERATURE KD ADV FEAT VERSION [train.py flags...]
  NORM         channel | spatial | channel_mean | none   (channel = CWD)
  DIVERGENCE   kl | mse                                  (mse forces temperature 1)
  WEIGHT       loss weight lambda_cwd, a number          (paper: 3)
  TEMPERATURE  tau, a positive number                    (paper: 4)
  KD           True | False   pixel-wise KD on the logits (lambda_kd 10)
  ADV          True | False   holistic adversarial distillation (WGAN-GP)
  FEAT         True | False   CWD on the PSP feature through a connector instead of the logits
  VERSION      any tag not starting with '-'; only used in the run name
run name: ${KD}_${ADV}_${FEAT}_${NORM}_${DIVERGENCE}_${WEIGHT}_${TEMPERATURE}_${VERSION}, written to ckpt/<name>/
  (+ _T-<teacher>_S-<student> with --teacher-arch/--student-arch other than the paper's PSPNets)
USAGE
}

fail() { echo "exp_cwd.sh: $1" >&2; usage; exit 2; }

[ $# -ge 8 ] || fail "expected 8 positional arguments, got $#"
NORM=$1; DIVERGENCE=$2; WEIGHT=$3; TEMPERATURE=$4; KD=$5; ADV=$6; FEAT=$7; VERSION=$8
shift 8

case "$NORM" in channel|spatial|channel_mean|none) ;; *) fail "NORM must be channel, spatial, channel_mean or none, got '$NORM'";; esac
case "$DIVERGENCE" in kl|mse) ;; *) fail "DIVERGENCE must be kl or mse, got '$DIVERGENCE'";; esac
is_number() { [[ "$1" =~ ^[0-9]+([.][0-9]*)?([eE][-+]?[0-9]+)?$|^[.][0-9]+$ ]]; }
is_number "$WEIGHT" || fail "WEIGHT must be a non-negative number, got '$WEIGHT'"
is_number "$TEMPERATURE" || fail "TEMPERATURE must be a positive number, got '$TEMPERATURE'"
[[ "$TEMPERATURE" =~ [1-9] && ! "$TEMPERATURE" =~ ^[0.]*[eE] ]] || fail "TEMPERATURE must be > 0, got '$TEMPERATURE'"
for pair in "KD:$KD" "ADV:$ADV" "FEAT:$FEAT"; do
  case "${pair#*:}" in True|False) ;; *) fail "${pair%%:*} must be True or False, got '${pair#*:}'";; esac
done
[ -n "$VERSION" ] || fail "VERSION must not be empty"
# A flag in VERSION's place means VERSION was left out (train.py's flags come after all eight).
[[ "$VERSION" != -* ]] || fail "VERSION is missing: got the flag '$VERSION' as the 8th positional argument"

NAME="${KD}_${ADV}_${FEAT}_${NORM}_${DIVERGENCE}_${WEIGHT}_${TEMPERATURE}_${VERSION}"
PYTHON=${PYTHON:-python}

# train.py reads $DATASET, $DATA_DIR and $CITYSCAPES itself, so --demo can pick its synthetic root.
exec "$PYTHON" "$(dirname "$0")/train.py" --kd "$KD" --adv "$ADV" --cwd True --cwd-feat "$FEAT" \
  --temperature "$TEMPERATURE" --norm-type "$NORM" --divergence "$DIVERGENCE" --lambda-cwd "$WEIGHT" \
  --exp-name "$NAME" "$@"
