"""The model card of an export: a Markdown page written beside the exported files.

It states what the files are (architecture, parameters, GMACs), what they expect (normalisation,
classes), how they were made (the run configuration: distillation terms, the pair, data, crop and
schedule), how good they are (the per-class IoU of the evaluation they come with) and, plainly, how
the weights were selected: final-iteration, or chosen on the val set (an optimistic number), or unknown.
"""
from __future__ import annotations

from typing import Any

from cwdseg.export.metadata import BEST_VAL, FINAL

_SELECTION_TEXT = {
    FINAL: "**final iteration**: the weights at the last training step, not chosen on the val set; the val "
           "mIoU below is an honest estimate.",
    BEST_VAL: "**best on val**: the checkpoint with the highest val mIoU among several evaluated during training. "
              "The val mIoU below was used to choose it, so it is optimistic; do not compare it with "
              "final-iteration numbers.",
}


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _training_lines(training: dict[str, Any] | None) -> list[str]:
    """The training section, from the run configuration only (nothing assumed about the paper's recipe)."""
    if not training:
        return ["No training configuration came with these weights (a released file, or a run folder without "
                "`config.json`)."]
    terms = training["distillation"]["terms"]
    preset = training["distillation"]["preset"]
    lines = ["| | |", "|---|---|"]
    if terms:
        for name, options in terms.items():
            opts = ", ".join(f"{k} {v}" for k, v in options.items() if k != "weight")
            lines.append(f"| distillation term `{name}` | weight {options['weight']:g}"
                         + (f"; {opts}" if opts else "") + " |")
    else:
        lines.append("| distillation | none (the student trained alone on the labels) |")
    if preset:
        lines.append(f"| preset | `{preset}` |")
    teacher, student, data, sched = training["teacher"], training["student"], training["data"], training["schedule"]
    if teacher:
        digest = f" (sha256 `{teacher['sha256'][:16]}`)" if teacher.get("sha256") else ""
        lines.append(f"| teacher | `{teacher['arch']}` from `{teacher['file'] or 'random weights'}`{digest} |")
    init = f"`{student['init']}`" + (f" (sha256 `{student['init_sha256'][:16]}`)" if student.get("init_sha256") else "")
    lines.append(f"| student | `{student['arch']}`, initialised from {init}, input {student['normalization']} |")
    lines.append(f"| data | `{data['dataset']}` at `{data['root']}`" + (f" (list `{data['train_list']}`)"
                                                                          if data.get("train_list") else "")
                 + f", {data['num_classes']} classes, ignore label {data['ignore_label']} |")
    aug = [a for a, on in (("random scale", data["random_scale"]), ("mirror", data["random_mirror"])) if on]
    lines.append(f"| crop | {data['crop_size'][0]}x{data['crop_size'][1]}"
                 + (f", {' + '.join(aug)}" if aug else "") + " |")
    lines.append(f"| schedule | {sched['optimizer']} lr {sched['lr']:g}, momentum {sched['momentum']:g}, weight decay "
                 f"{sched['weight_decay']:g}, poly {sched['power']:g}"
                 + (f", head lr x{sched['head_lr_mult']:g}" if sched["head_lr_mult"] != 1 else "")
                 + (f", {sched['warmup_steps']} warm-up steps" if sched["warmup_steps"] else "")
                 + f"; batch {sched['batch_size']}, {sched['num_steps']} steps, seed {sched['seed']} |")
    lines.append(f"| evaluation | {training['evaluation']} |")
    return lines


def _iou_lines(val: dict[str, Any] | None) -> list[str]:
    if not val:
        return ["No evaluation came with these weights: run `evaluate.py --save-dir DIR` and export again with "
                "`--eval-json DIR/results.json`."]
    settings = val.get("settings") or {}
    protocol = ", ".join(f"{k} {settings[k]}" for k in ("mode", "scales", "flip", "amp") if k in settings)
    lines = [f"Split: {val.get('split', 'val')}, {val.get('num_images', '?')} images"
             + (f"; protocol: {protocol}" if protocol else "") + (f"; step {val['step']}" if "step" in val else ""),
             "", "| class | IoU (%) |", "|---|---:|"]
    lines += [f"| {name} | {_pct(iou)} |" for name, iou in (val.get("per_class_iou") or {}).items()]
    lines += [f"| **mIoU** | **{_pct(val.get('miou'))}** |"]
    if val.get("pixel_accuracy") is not None:
        lines += [f"| pixel accuracy | {_pct(val['pixel_accuracy'])} |"]
    return lines


def render_model_card(meta: dict[str, Any], files: dict[str, str]) -> str:
    """The Markdown card of an export described by ``meta`` (:func:`cwdseg.export.metadata.build_metadata`);
    ``files`` maps a role (``onnx``, ``safetensors``, ``metadata``) to the file name written."""
    norm = meta["normalization"]
    std = norm["std"]
    norm_text = (f"{norm['channel_order']} channel order, 0..255 values minus the mean {norm['mean']}"
                 + ("" if std == [1.0, 1.0, 1.0] else f", divided by the std {std}") + ", NCHW float32")
    gmacs = ", ".join(f"{v:.2f} G at {k}" for k, v in meta["gmacs"].items())
    selection = _SELECTION_TEXT.get(meta["selection"], "**unknown**: how these weights were chosen (final "
                                    "iteration or best on val) is not recorded; treat val numbers with care.")
    st_name = files.get("safetensors", "model.safetensors")
    val = meta.get("val")
    out = [
        f"# {meta['name']}",
        "",
        f"Semantic segmentation network `{meta['arch']}` ({meta['num_classes']} classes), exported by "
        "`tools/export.py` of cwdseg (channel-wise distillation for semantic segmentation).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{meta['arch']}` |",
        f"| parameters | {meta['parameters'] / 1e6:.2f} M |",
        f"| multiply-accumulates | {gmacs} (convolutions, auxiliary head included) |",
        f"| val mIoU | {_pct(val.get('miou')) if val else '— (no evaluation given)'} |",
        f"| selection | {meta['selection']} |",
        f"| files | {', '.join(f'`{v}`' for v in files.values())} |",
        "",
        "## Selection",
        "",
        selection,
        "",
        "## Input and output",
        "",
        f"- Input: {norm_text}.",
        f"- Output: {meta['output']}.",
        *([f"- The ONNX graph takes raw 0..255 values in {norm['channel_order']} order and normalises them itself."]
          if meta.get("onnx_input") == "raw" else []),
        "- Classes (train ids): " + ", ".join(f"{c['id']} {c['name']}" for c in meta["classes"]) + ".",
        "",
        "## Training",
        "",
        *_training_lines(meta.get("training")),
        "",
        "## Per-class IoU",
        "",
        *_iou_lines(val),
        "",
        "## Load it in plain PyTorch",
        "",
        "```python",
        "import torch",
        "from safetensors.torch import load_file",
        "from cwdseg.models import build_model",
        f"model = build_model({meta['arch']!r}, num_classes={meta['num_classes']}).eval()",
        f"model.load_state_dict(load_file({st_name!r}))  # no pickle involved",
        "```",
        "",
        "then `logits = model(x)[0]` for `x` normalised as above. "
        + (f"Without PyTorch, `{files['onnx']}` runs in ONNX Runtime (input `image`, output `logits`, dynamic "
           "batch, height and width): `onnxruntime.InferenceSession(path).run(['logits'], {'image': x})`; "
           "`python predict.py --restore-from " + files["onnx"] + " --input IMAGES --output-dir OUT` runs it on "
           "images and videos." if "onnx" in files else ""),
    ]
    if meta.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(out) + "\n"
