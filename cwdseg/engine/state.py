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
from cwdseg.config import CONFIG_FORMAT, RunConfig, differences, to_dict
from cwdseg.engine.build import RANDOM, Criteria, Engine, Models

LAST_FORMAT = "cwd-seg/last/2"  # /2: the whole run configuration replaces /1's list of recipe keys


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
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(path: Path, step: int, models: Models, criteria: Criteria, opt_g, opt_d, engine: Engine,
              cfg: RunConfig, samples_seen: int) -> None:
    state = {
        "format": LAST_FORMAT,
        "step": step,  # the next step to run
        "student": ckpt.export_state_dict(models.student_module),
        "connector": models.connector.state_dict() if models.connector is not None else None,
        "terms": criteria.terms.state_dict(),  # connectors again, and the terms' own layers and memory banks
        "discriminator": models.discriminator.state_dict() if models.discriminator is not None else None,
        "optimizer_g": opt_g.state_dict(),
        "optimizer_d": opt_d.state_dict() if opt_d is not None else None,
        "scaler": engine.scaler.state_dict(),
        "rng": rng_state(),
        "sampler": {"samples_per_rank": samples_seen, "world_size": engine.dist.world_size},
        "config": to_dict(cfg),
        "inputs": run_inputs(cfg),
    }
    ckpt.atomic_save(state, path)


def load_last(path: Path, models: Models, criteria: Criteria, opt_g, opt_d, engine: Engine, cfg: RunConfig) -> int:
    """Restore everything from ``last.pth``; returns the step to continue from."""
    state = ckpt.load_checkpoint_dict(path)
    if state.get("format") != LAST_FORMAT:
        if str(state.get("format", "")).startswith("cwd-seg/last/"):
            raise ckpt.CheckpointError(f"{path} was written by an older version of the toolkit ({state['format']}, "
                                       "before the typed configuration); finish it with that version, or start anew")
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint of this toolkit (no 'format' tag); "
                                   "released students are loaded with --student-init or evaluate.py --restore-from")
    diff = config_differences(state, cfg)
    if diff:
        raise ResumeError(f"{path} was written by a run with other settings ({'; '.join(diff)}); "
                          "use the same settings to resume, or another --save-name for a new run")
    check_same_inputs(path, state.get("inputs"), run_inputs(cfg))
    if state["sampler"]["world_size"] != engine.dist.world_size:
        raise ResumeError(f"{path} was written with {state['sampler']['world_size']} processes, "
                          f"this run has {engine.dist.world_size}; resume with the same number of processes")
    models.student_module.load_state_dict(state["student"])
    if models.connector is not None:
        models.connector.load_state_dict(state["connector"])
    criteria.terms.load_state_dict(state["terms"])
    if models.discriminator is not None:
        models.discriminator.load_state_dict(state["discriminator"])
    opt_g.load_state_dict(state["optimizer_g"])
    if opt_d is not None:
        opt_d.load_state_dict(state["optimizer_d"])
    engine.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return int(state["step"])


# --------------------------------------------------------------------------------------------------
# The files a run is built from, and config.json
# --------------------------------------------------------------------------------------------------
class ResumeError(ckpt.CheckpointError):
    """last.pth cannot be continued by this command (other settings, other input files, other world size)."""


def config_differences(state: dict, cfg: RunConfig) -> list[str]:
    """``"section.field: saved X, now Y"`` for every setting (not the free ones: paths, workers, logging)
    that differs between ``last.pth`` and ``cfg``."""
    return differences(state.get("config", {}), cfg)


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, cached per (path, size, mtime) so that each save does not re-read it; of a
    folder (a Hugging Face model folder), over its files' relative names and digests, in sorted order."""
    if Path(path).is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{file_sha256(file)}\n".encode())
        return digest.hexdigest()
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


INPUT_FLAGS = {"teacher": "--teacher-ckpt", "student_init": "--student-init"}


def input_files(cfg: RunConfig) -> dict[str, str | None]:
    """``{role: path}`` of the weight files the run is built from (None: not used, or random weights)."""
    m = cfg.models
    return {"teacher": m.teacher_ckpt if cfg.needs_teacher and m.teacher_ckpt != RANDOM else None,
            "student_init": m.student_init if m.student_init != RANDOM else None}


def check_input_files(cfg: RunConfig) -> None:
    """Refuse a missing weight file before anything is created (one line naming the flag)."""
    for role, path in input_files(cfg).items():
        if path is None:
            continue
        hf_folder = Path(path).is_dir() and (Path(path) / "config.json").is_file()  # a Hugging Face model folder
        if not Path(path).is_file() and not hf_folder:
            what = "is a folder" if Path(path).is_dir() else "no such file"
            hint = ("; see ckpt/README.md for the released files, or pass random (smoke tests only)"
                    if role == "teacher" else f"; see ckpt/README.md, or pass {INPUT_FLAGS[role]} random")
            raise ckpt.CheckpointError(f"{INPUT_FLAGS[role]} {path}: {what}{hint}")


def run_inputs(cfg: RunConfig) -> dict[str, dict | None]:
    """The weight files the run is built from, by content: ``{role: {"path", "sha256"} or None}``
    (None: not used, or random weights)."""
    return {role: None if p is None else {"path": str(p), "sha256": file_sha256(p)}
            for role, p in input_files(cfg).items()}


def check_same_inputs(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse to continue ``path`` with other teacher / student-initialisation files (by content, not path).
    Checkpoints written before inputs were recorded (``saved`` None) are not checked."""
    if saved is None:
        return
    diff = []
    for role, flag in INPUT_FLAGS.items():
        a, b = saved.get(role), now.get(role)
        if (a or {}).get("sha256") == (b or {}).get("sha256"):
            continue
        was = f"{a['path']} (sha256 {a['sha256'][:12]})" if a else "random weights"
        is_ = f"{b['path']} (sha256 {b['sha256'][:12]})" if b else "random weights"
        diff.append(f"{role.replace('_', ' ')} was {was}, {flag} now gives {is_}")
    if diff:
        raise ResumeError(f"{path} was started from other files: {'; '.join(diff)}; resume with the original "
                          "files, or start a new run with another --save-name")


def write_config(run_dir: Path, cfg: RunConfig, environment: dict[str, Any], resumed_at: int) -> None:
    """A fresh run writes ``config.json`` (``{"format", "config", "environment", "resumes"}``, itself a
    valid ``--config`` file); a resumed one keeps it and appends a record to ``"resumes"`` (step, time,
    host, command, and the free settings that now differ), so the file never claims what the run did not use."""
    path = Path(run_dir) / "config.json"
    config = to_dict(cfg)
    if resumed_at == 0 or not path.is_file():
        record = {"format": CONFIG_FORMAT, "config": config, "inputs": run_inputs(cfg), "environment": environment,
                  "resumes": []}
    else:
        record = json.loads(path.read_text())
        old = record.get("config", {})
        changed = {f"{section}.{k}": {"was": old.get(section, {}).get(k), "now": v}
                   for section, fields in config.items() for k, v in fields.items()
                   if old.get(section, {}).get(k) != v}
        record.setdefault("resumes", []).append({
            "step": resumed_at, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "command": shlex.join(["python", *sys.argv]), "changed": changed,
            "environment": environment,
        })
    ckpt.atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config`` part of a run folder's ``config.json`` (None when there is none)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record.get("config") if record.get("format") == CONFIG_FORMAT else None
