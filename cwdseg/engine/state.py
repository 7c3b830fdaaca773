"""Resume state: everything ``last.pth`` holds (weights, optimisers, scaler, RNGs, sampler position, recipe)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cwdseg import checkpoint as ckpt
from cwdseg.engine.build import Engine, Models


RECIPE_KEYS = (
    "data_list", "input_size", "random_mirror", "random_scale", "num_classes", "ignore_label", "batch_size",
    "grad_accum", "num_steps", "lr_g", "lr_d", "momentum", "weight_decay", "power", "seed", "cwd", "cwd_feat",
    "norm_type", "divergence", "temperature", "lambda_cwd", "cwd_ignore_mask", "kd", "lambda_kd", "adv", "lambda_adv", "lambda_d",
    "lambda_gp", "teacher_arch", "student_arch", "amp",
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
    }
    ckpt.atomic_save(state, path)


def load_last(path: Path, models: Models, opt_g, opt_d, engine: Engine, args) -> int:
    """Restore everything from ``last.pth``; returns the step to continue from."""
    state = ckpt.load_checkpoint_dict(path)
    if state.get("format") != "cwd-seg/last/1":
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint of this toolkit (no 'format' tag); "
                                   "released students are loaded with --student-init or evaluate.py --restore-from")
    saved = state["recipe"]
    now = {k: jsonable(getattr(args, k)) for k in RECIPE_KEYS}
    diff = [f"{k}: saved {saved.get(k)!r}, now {now[k]!r}" for k in RECIPE_KEYS if saved.get(k) != now[k]]
    if diff:
        raise SystemExit(f"error: {path} was written by a run with other settings:\n  " + "\n  ".join(diff)
                         + "\nuse the same flags to resume, or another --save-name for a new run")
    if state["sampler"]["world_size"] != engine.dist.world_size:
        raise SystemExit(f"error: {path} was written with {state['sampler']['world_size']} processes, "
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


