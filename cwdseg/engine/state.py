"""Resume state: everything ``last.pth`` holds (weights, optimisers, scaler, RNGs, sampler position, recipe)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cwdseg import checkpoint as ckpt
from cwdseg.engine.build import RANDOM, Engine, Models, needs_teacher


RECIPE_KEYS = (
    "data_list", "input_size", "random_mirror", "random_scale", "num_classes", "ignore_label", "batch_size",
    "grad_accum", "num_steps", "lr_g", "lr_d", "momentum", "weight_decay", "power", "seed", "cwd", "cwd_feat",
    "norm_type", "divergence", "temperature", "lambda_cwd", "cwd_ignore_mask", "kd", "lambda_kd", "adv", "lambda_adv", "lambda_d",
    "lambda_gp", "teacher_arch", "student_arch", "amp", "distill_terms",
)


def rng_state() -> dict[str, Any]:
    """Every RNG the run touches, as tensors and plain numbers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, step: int, models: Models, opt_g, opt_d, engine: Engine, args, samples_seen: int) -> None:
    state = {
        "format": "cwd-seg/last/1",
        "step": step,  # the next step to run
        "student": ckpt.export_state_dict(models.student_module),
        "connector": models.connector.state_dict() if models.connector is not None else None,
        "discriminator": models.discriminator.state_dict() if models.discriminator is not None else None,
        "optimizer_g": opt_g.state_dict(),
        "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
        "scaler": engine.scaler.state_dict(),
        "rng": rng_state(),
        "sampler": {"samples_per_rank": samples_seen, "world_size": engine.dist.world_size},
        "recipe": {k: jsonable(getattr(args, k)) for k in RECIPE_KEYS},
        "inputs": run_inputs(args),
    }
    ckpt.atomic_save(state, path)


def load_last(path: Path, models: Models, opt_g, opt_d, engine: Engine, args) -> int:
    """Restore everything from ``last.pth``; returns the step to continue from."""
    state = ckpt.load_checkpoint_dict(path)
    if state.get("format") != "cwd-seg/last/1":
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint of this toolkit (no 'format' tag); "
                                   "released students are loaded with --student-init or evaluate.py --restore-from")
    diff = recipe_differences(state, args)
    if diff:
        raise ResumeError(f"{path} was written by a run with other settings ({'; '.join(diff)}); "
                          "use the same flags to resume, or another --save-name for a new run")
    check_same_inputs(path, state.get("inputs"), run_inputs(args))
    if state["sampler"]["world_size"] != engine.dist.world_size:
        raise ResumeError(f"{path} was written with {state['sampler']['world_size']} processes, "
                          f"this run has {engine.dist.world_size}; resume with the same number of processes")
    models.student_module.load_state_dict(state["student"])
    if models.connector is not None:
        models.connector.load_state_dict(state["connector"])
    if models.discriminator is not None:
        models.discriminator.load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["optimizer_g"])
    if opt_d is not None:
        opt_d.load_state_dict(state["optimizer_d"])
    engine.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def jsonable(value):
    if isinstance(value, tuple):
        return list(value)
    return value




# --------------------------------------------------------------------------------------------------
# The files a run is built from, and config.json
# --------------------------------------------------------------------------------------------------
class ResumeError(ckpt.CheckpointError):
    """last.pth cannot be continued by this command (other settings, other input files, other world size)."""


def recipe_differences(state: dict, args) -> list[str]:
    """``"key: saved X, now Y"`` for every recipe setting that differs between ``last.pth`` and ``args``."""
    saved = state.get("recipe", {})
    now = {k: jsonable(getattr(args, k)) for k in RECIPE_KEYS}
    return [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in RECIPE_KEYS if saved.get(k) != now[k]]


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) so that each save does not re-read it."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def run_inputs(args) -> dict[str, dict | None]:
    """The weight files the run is built from, by content: ``{role: {"path", "sha256"} or None}``
    (None: not used, or random weights)."""
    files = {
        "teacher": args.T_ckpt_path if needs_teacher(args) and args.T_ckpt_path != RANDOM else None,
        "student_init": args.student_pretrain_model_imgnet
        if args.is_student_load_imgnet and args.student_pretrain_model_imgnet != RANDOM else None,
    }
    return {role: None if p is None else {"path": str(p), "sha256": file_sha256(p)} for role, p in files.items()}


def check_same_inputs(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse to continue ``path`` with other teacher / student-initialisation files (by content, not path).
    Checkpoints written before inputs were recorded (``saved`` None) are not checked."""
    if saved is None:
        return
    flags = {"teacher": "--teacher-ckpt", "student_init": "--student-init"}
    diff = []
    for role, flag in flags.items():
        a, b = saved.get(role), now.get(role)
        if (a or {}).get("sha256") == (b or {}).get("sha256"):
            continue
        was = f"{a['path']} (sha256 {a['sha256'][:12]})" if a else "random weights"
        is_ = f"{b['path']} (sha256 {b['sha256'][:12]})" if b else "random weights"
        diff.append(f"{role.replace('_', ' ')} was {was}, {flag} now gives {is_}")
    if diff:
        raise ResumeError(f"{path} was started from other files: {'; '.join(diff)}; resume with the original "
                          "files, or start a new run with another --save-name")


def write_config(run_dir: Path, config: dict, resumed_at: int) -> None:
    """A fresh run writes ``config.json``; a resumed one keeps it and appends a record to its
    ``"resumes"`` list (step, time, host, command, and the settings that now differ), so the file
    never claims what the run did not use."""
    path = Path(run_dir) / "config.json"
    if resumed_at == 0 or not path.is_file():
        config = dict(config, resumes=[])
    else:
        old = json.loads(path.read_text())
        changed = {k: {"was": old.get(k), "now": v} for k, v in config.items() if k in old and old[k] != v}
        old.setdefault("resumes", []).append({
            "step": resumed_at, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "command": shlex.join(["python", *sys.argv]), "changed": changed,
        })
        config = old
    ckpt.atomic_write_text(path, json.dumps(config, indent=2) + "\n")
