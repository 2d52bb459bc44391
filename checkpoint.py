"""Checkpoints: what a run writes (last.pt, best.pt, config.json) and what starts a run from an earlier one.

Writing: the code version, the RNG states and an atomic save (temporary file, then rename). Reading: strict or
non-strict weight loading, --init_from files (ours or an official Lightning .ckpt, remapped by model.py's table),
the optimizer state mapped onto this model's parameters by name, and the checks that a checkpoint or run folder
fits this run's configuration. train.py's setup_model puts these together for --resume and --init_from.
"""
import dataclasses
import json
import os
import pickle
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from model import OFFICIAL_PREFIXES, remap_official_state_dict

# Model fields that do not change the weights' layout: which parameters train, and where the first weights came from.
TRAINING_ONLY_MODEL_FIELDS = ("finetuning", "m2d_weights")
# Frozen parameters of the official separator (torchlibrosa's STFT / ISTFT kernels) that ours computes with
# torch.stft instead: they hold a place in the official optimizer's parameter list but never any state.
OFFICIAL_ONLY_PARAMETERS = {"base.stft.conv_real.weight", "base.stft.conv_imag.weight", "base.istft.conv_real.weight",
                            "base.istft.conv_imag.weight"}


# ----------------------------------------------------------------------------------------------------------
# Writing: code version, RNG states, atomic save
# ----------------------------------------------------------------------------------------------------------
def code_version() -> str:
    """Short git hash of the code, '<hash>-dirty' when tracked files have uncommitted changes, or 'unknown'."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "") if commit \
            else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then an atomic rename: a crash never leaves a half-written checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------
# Reading: weights, --init_from files, optimizer state, configuration checks
# ----------------------------------------------------------------------------------------------------------
def compact_names(names: list[str], shown: int = 3) -> str:
    return f"{len(names)} ({', '.join(names[:shown])}{', ...' if len(names) > shown else ''})"


def config_differences(saved: dict, current, section: str) -> str:
    """'' when a checkpoint's model configuration gives weights of the same layout as this run's, otherwise one
    line such as 'checkpoint has separator.base_channels 8, this run 16' naming every field that differs."""
    current = dataclasses.asdict(current)

    def plain(value):  # configurations read back from JSON hold lists where the dataclass holds tuples
        return list(value) if isinstance(value, tuple) else value
    keys = [key for key in [*current, *(key for key in saved if key not in current)]
            if key not in TRAINING_ONLY_MODEL_FIELDS and plain(saved.get(key)) != plain(current.get(key))]
    if not keys:
        return ""
    return (f"checkpoint has {' and '.join(f'{section}.{key} {saved.get(key)}' for key in keys)}, this run "
            f"{' and '.join(str(current.get(key)) for key in keys)}")


def load_weights(model: torch.nn.Module, weights: dict, source: str, non_strict: bool, say) -> None:
    """Load a state dict. Strict: a missing, unexpected or differently shaped tensor is a one-line error.
    Non-strict: the tensors whose name and shape match are loaded, the others listed in one line."""
    own = model.state_dict()
    reshaped = [f"{key} {list(weights[key].shape)} in the checkpoint, {list(own[key].shape)} here"
                for key in weights if key in own and weights[key].shape != own[key].shape]
    problems = "; ".join(f"{label} {compact_names(keys)}" for label, keys in (
        ("missing", [key for key in own if key not in weights]),
        ("unexpected", [key for key in weights if key not in own]), ("other shape", reshaped)) if keys)
    if problems and not non_strict:
        raise SystemExit(f"{source}: the weights do not fit this model: {problems}"
                         f"{'; --init_non_strict loads the matching tensors only' if 'init_from' in source else ''}")
    matching = {key: value for key, value in weights.items() if key in own and value.shape == own[key].shape}
    model.load_state_dict(matching, strict=False)
    if problems:
        say(f"--init_non_strict: loaded {len(matching)} of {len(own)} tensors from {source}; {problems}")


def read_initial_checkpoint(path: str, kind: str, model: torch.nn.Module) -> tuple:
    """--init_from file -> (its model configuration, or None for an official checkpoint; weights with our key
    names; optimizer state dict or None; the names of the parameters in that optimizer's order or None).

    An official Lightning checkpoint's optimizer held all parameters of the official module in order, which are
    the parameter keys of its state_dict in order (buffers never enter an optimizer)."""
    source = f"--init_from {path}"
    if not Path(path).is_file():
        raise SystemExit(f"{source}: file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # trusted files; Lightning pickles
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ModuleNotFoundError) as error:
        raise SystemExit(f"{source}: cannot read it as a checkpoint ({type(error).__name__}: {error})")
    if isinstance(checkpoint, dict) and "kind" in checkpoint:
        if checkpoint["kind"] != kind:
            raise SystemExit(f"{source}: this is a {checkpoint['kind']} checkpoint, this run trains a {kind}")
        return (checkpoint["model_config"], checkpoint["model"], checkpoint.get("optimizer"),
                checkpoint.get("parameter_names"))
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)):
        raise SystemExit(f"{source}: neither a nanoS5 checkpoint nor a Lightning checkpoint with a state_dict")
    official = checkpoint["state_dict"]
    try:
        weights = remap_official_state_dict(official, kind, path)
    except ValueError as error:
        raise SystemExit(f"--init_from {error}")
    parameters = {name for name, _ in model.named_parameters()} | OFFICIAL_ONLY_PARAMETERS
    names = [next((new + key[len(old):] for old, new in OFFICIAL_PREFIXES[kind] if key.startswith(old)), key)
             for key in official]
    return (None, weights, (checkpoint.get("optimizer_states") or [None])[0],
            [name for name in names if name in parameters])


def map_optimizer_state(saved: dict, saved_names: list[str], model: torch.nn.Module, path: str) -> dict:
    """An optimizer state dict saved for the parameters `saved_names` (in that optimizer's order) -> the state
    dict for this model's parameters (all in one group, as ours and the official), matched by name. Parameters
    the saved optimizer never stepped (frozen before) start with no state, as AdamW's own first step does."""
    groups = saved.get("param_groups", [])
    if len(groups) != 1 or len(groups[0]["params"]) != len(saved_names):
        raise SystemExit(f"--init_optimizer: the optimizer in {path} has {len(groups)} parameter groups over "
                         f"{sum(len(group['params']) for group in groups)} parameters; expected one group over the "
                         f"{len(saved_names)} parameters of its model")
    own = dict(model.named_parameters())
    position = {name: index for index, name in enumerate(own)}
    state = {}
    for saved_id, name in zip(groups[0]["params"], saved_names):
        entry = saved["state"].get(saved_id)
        if entry is None or name not in own:
            continue
        shapes = {tuple(value.shape) for value in entry.values() if torch.is_tensor(value) and value.dim()}
        if shapes - {tuple(own[name].shape)}:
            raise SystemExit(f"--init_optimizer: the optimizer state of {name} in {path} has shape "
                             f"{sorted(shapes)}, the parameter here {list(own[name].shape)}")
        state[position[name]] = entry
    return {"state": state, "param_groups": [dict(groups[0], params=list(range(len(own))))]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load the per-parameter state (moments, step counts) of a saved optimizer state dict. The group settings
    (lr, betas, fused, ...) stay this optimizer's: torch's load_state_dict would replace them by the saved ones."""
    groups = [dict(group, params=saved_group["params"])
              for group, saved_group in zip(optimizer.state_dict()["param_groups"], saved["param_groups"])]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})


def flatten_record(record: dict) -> dict:
    """{'preset': 'demo', 'train': {'lr': 0.001}} -> {'preset': 'demo', 'train.lr': 0.001}"""
    flat = {}
    for section, values in record.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def check_config_json(out_dir: Path, record: dict) -> None:
    """A fresh run never writes into the folder of another run: an existing config.json must equal this run's
    (re-running the same command before its first checkpoint is fine)."""
    if not (out_dir / "config.json").is_file():
        return
    try:
        old = flatten_record(json.loads((out_dir / "config.json").read_text()))
    except (OSError, ValueError):
        old = {"config.json": "unreadable"}
    new = flatten_record(json.loads(json.dumps(record)))  # tuples -> lists, as read back from JSON
    differences = [f"{key} {old.get(key)!r} there, {new.get(key)!r} here"
                   for key in [*new, *(key for key in old if key not in new)] if old.get(key) != new.get(key)]
    if differences:
        raise SystemExit(f"{out_dir} already holds the config.json of another run ({'; '.join(differences[:3])}"
                         f"{'; ...' if len(differences) > 3 else ''}); choose another --out_dir or delete it")
