"""Export a trained student to ONNX and safetensors, with a metadata JSON and a model card.

    python tools/export.py ckpt/False_False_False_channel_kl_3_4_v1                    # a run folder
    python tools/export.py ckpt/new_rn18-cityscape_singleAndWhole_val-75.02_test-73.86.pth --eval-json outputs/rn18/results.json
    python tools/export.py RUN_DIR --select best-val --fold-normalization --out-dir outputs/export/best

Writes into ``--out-dir`` (default ``outputs/export/<name>``): ``<name>.onnx`` (logits at the output
stride; dynamic batch, height and width), ``<name>.safetensors`` (the weights, no pickle),
``<name>.json`` (architecture, classes and colours, normalisation, recipe, val numbers, the ONNX check)
and ``MODEL_CARD.md``. The ONNX file is run in ONNX Runtime right away on random images of the
``--check-sizes`` and compared with PyTorch; the largest absolute logit difference is printed, and an
export that differs by more than ``--tolerance`` is an error. Nothing is overwritten without ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cwdseg.checkpoint import CheckpointError, atomic_write_text
from cwdseg.data import DatasetError
from cwdseg.data.labels import CLASS_NAMES, NUM_CLASSES, TRAIN_ID_COLORS
from cwdseg.data.registry import DATASETS, dataset_info
from cwdseg.data.transforms import NORMALIZATIONS
from cwdseg.evaluation.loop import EvaluationError, load_model_file, sha256_file
from cwdseg.export.metadata import SELECTIONS, ExportSourceError, build_metadata, class_table, resolve_source
from cwdseg.export.model_card import render_model_card
from cwdseg.export.normalization import ORIGINAL, channel_order, make
from cwdseg.export.onnx import ExportError, compare_with_onnxruntime, export_onnx
from cwdseg.export.weights import save_safetensors
from cwdseg.models.summary import count_macs, count_parameters

FORMATS = ("onnx", "safetensors")


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HxW such as 512x1024") from None
    if h < 16 or w < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be at least 16x16")
    return h, w


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a student to ONNX + safetensors with metadata and a model card",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("source", help="a train.py run folder (ckpt/<NAME>/) or a weight file (.pth, last.pth)")
    p.add_argument("--out-dir", default=None, help="where to write; default outputs/export/<name>")
    p.add_argument("--name", default=None, help="file stem of the exports; default: the run's save name or the file stem")
    p.add_argument("--select", choices=SELECTIONS, default="final",
                   help="run folder: the final-iteration student, or best_val_G.pth (chosen on val: optimistic)")
    p.add_argument("--eval-json", default=None, help="evaluate.py results.json or a run's eval.json for the val numbers")
    p.add_argument("--config-json", default=None, help="a run's config.json for the recipe (run folders: read itself)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS), help="what to write")
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"classes of the network; default: the run's config.json, else {NUM_CLASSES}")
    p.add_argument("--dataset", choices=sorted(DATASETS), default=None,
                   help="class names and colours of this dataset; default: the run's config.json, else cityscapes")
    p.add_argument("--classes", default=None,
                   help="JSON file: a list of class names or of {name, color: [r, g, b]} (overrides --dataset)")
    p.add_argument("--channel-order", choices=("BGR", "RGB"), default=None,
                   help="input channel order the weights expect; default: the file's record, else the architecture's "
                        f"(the original's: {channel_order(ORIGINAL)})")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="per-channel mean (0..255); default as --channel-order")
    p.add_argument("--std", type=float, nargs=3, default=None, help="per-channel std (0..255 units); default as --channel-order")
    p.add_argument("--fold-normalization", action="store_true",
                   help="the ONNX graph takes raw 0..255 values and normalises itself")
    p.add_argument("--check-sizes", type=_size, nargs="+", default=[(128, 256), (256, 512)],
                   help="input sizes HxW of the ONNX Runtime vs PyTorch check")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |logit difference| of the check")
    p.add_argument("--gmacs-sizes", type=_size, nargs="+", default=[(512, 1024), (1024, 2048)],
                   help="input sizes HxW at which the model card states the GMACs")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--overwrite", action="store_true", help="replace existing export files")
    return p


def read_classes(path: str | None, num_classes: int, dataset: str | None = None,
                 data_dir: str | None = None) -> list[dict]:
    """The class table: from a JSON file (names, or {name, color}), else the dataset's, else Cityscapes'."""
    if path is None and dataset is not None:
        try:
            info = dataset_info(dataset, data_dir)
        except DatasetError as exc:
            raise ExportSourceError(f"--dataset {dataset}: {exc}; pass --classes FILE.json instead") from None
        if info.num_classes != num_classes:
            raise ExportSourceError(f"--dataset {dataset} has {info.num_classes} classes, the network {num_classes}")
        return class_table(info.class_names, info.colors)
    if path is None:
        if num_classes != NUM_CLASSES:
            return class_table([str(i) for i in range(num_classes)], [[128, 128, 128]] * num_classes)
        return class_table(CLASS_NAMES, TRAIN_ID_COLORS)
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportSourceError(f"--classes {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(items, list) or len(items) != num_classes:
        raise ExportSourceError(f"--classes {path}: expected a list of {num_classes} classes")
    names = [it if isinstance(it, str) else it.get("name") for it in items]
    colors = [[128, 128, 128] if isinstance(it, str) else it.get("color") for it in items]
    if any(not isinstance(n, str) for n in names) or any(not isinstance(c, list) or len(c) != 3 for c in colors):
        raise ExportSourceError(f"--classes {path}: each entry must be a name or {{\"name\": ..., \"color\": [r, g, b]}}")
    return class_table(names, colors)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Export; returns the metadata written (with ``files`` and ``onnx_check``)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    source = resolve_source(args.source, args.select, args.eval_json, args.config_json)
    name = args.name or source.name
    out_dir = Path(args.out_dir or Path("outputs") / "export" / name)
    files = {"onnx": f"{name}.onnx", "safetensors": f"{name}.safetensors"}
    files = {k: v for k, v in files.items() if k in args.formats} | {"metadata": f"{name}.json",
                                                                       "model_card": "MODEL_CARD.md"}
    existing = [out_dir / f for f in files.values() if (out_dir / f).exists()]
    if existing and not args.overwrite:
        raise ExportSourceError(f"{existing[0]} exists ({len(existing)} of the export files do); pass --overwrite "
                                f"to replace them or choose another --out-dir")

    data = (source.config or {}).get("data", {})
    loaded = load_model_file(source.weights, None, args.num_classes or data.get("num_classes"),
                             args.dataset or data.get("dataset"))
    model, arch, num_classes = loaded.model.eval(), loaded.arch, loaded.num_classes
    # A toolkit file (or run) records its normalisation and classes; flags override, foreign files need them.
    default = NORMALIZATIONS[loaded.normalization]
    try:
        normalization = make(args.channel_order or channel_order(default), args.mean or list(default.mean),
                             args.std or list(default.std))
    except ValueError as exc:
        parser.error(str(exc))
    if args.classes is None and args.dataset is None and loaded.class_names:
        classes = class_table(loaded.class_names, loaded.class_colors)
    else:
        classes = read_classes(args.classes, num_classes, args.dataset or data.get("dataset"), data.get("root"))
    gmacs = {f"{h}x{w}": count_macs(model, (h, w)) / 1e9 for h, w in args.gmacs_sizes}
    meta = build_metadata(arch, num_classes, source, normalization, classes, count_parameters(model), gmacs)
    meta["source_sha256"] = sha256_file(source.weights)
    meta["files"] = files
    print(f"exporting {source.weights} ({arch}, {meta['parameters'] / 1e6:.2f}M parameters, selection "
          f"{source.selection}) to {out_dir}", flush=True)
    for note in source.notes:
        print(f"  note: {note}")

    if "onnx" in args.formats:
        onnx_path = out_dir / files["onnx"]
        onnx_meta = {k: meta[k] for k in ("name", "arch", "num_classes", "classes", "selection")}
        export_onnx(model, onnx_path, normalization, args.fold_normalization, onnx_meta, opset=args.opset)
        diffs = compare_with_onnxruntime(model, onnx_path, [tuple(s) for s in args.check_sizes], batch=1,
                                         normalization=normalization)
        worst = max(diffs.values())
        meta["onnx_input"] = "raw" if args.fold_normalization else "normalised"
        meta["onnx_check"] = {"max_abs_logit_diff": diffs, "opset": args.opset}
        print("ONNX Runtime vs PyTorch, max |logit difference|: "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + f"  ({onnx_path})")
        if worst > args.tolerance:
            raise ExportError(f"{onnx_path}: ONNX Runtime differs from PyTorch by {worst:.3g} (> --tolerance "
                              f"{args.tolerance}); the export is wrong for this architecture")
    if "safetensors" in args.formats:
        save_safetensors(model, out_dir / files["safetensors"], meta)
        print(f"weights: {out_dir / files['safetensors']}")
    atomic_write_text(out_dir / files["metadata"], json.dumps(meta, indent=2) + "\n")
    atomic_write_text(out_dir / files["model_card"], render_model_card(meta, files))
    print(f"metadata: {out_dir / files['metadata']}\nmodel card: {out_dir / files['model_card']}")
    return meta


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with one-line errors (exit status 2) instead of tracebacks."""
    try:
        main(argv)
    except (ExportSourceError, ExportError, CheckpointError, EvaluationError) as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
