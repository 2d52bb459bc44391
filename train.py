"""Train the M2D tagger or the ResUNetK separator: one loop for one process, one GPU or many (torchrun).

    python train.py --task tagging --preset demo             # demo tagger on data/dev_set, minutes on a CPU
    python train.py --task separation --preset demo          # demo separator
    torchrun --nproc_per_node=4 train.py --task tagging --preset m2dat_1c
    torchrun --nproc_per_node=4 train.py --task tagging --preset m2dat_1c_2blks --init_from runs/tagging_m2dat_1c/last.pt
    torchrun --nproc_per_node=4 train.py --task separation --preset resunetk_capisdr
    torchrun --nproc_per_node=8 train.py --task tagging --preset m2dat_head   # 2025: m2dat_head_blks, resunet(k)
    python train.py --out_dir runs/separation_demo --resume --max_steps 2000   # continue a run exactly
    python train.py --task separation --preset demo --print_config   # the values a run would use, and their origin

Configuration: dataclass defaults < --preset (default: the task's official recipe) < --config run/config.json
(with --resume: the run's own) < flags. The run folder gets config.json, log.jsonl, last.pt (everything --resume
needs) and best.pt (the weights of the lowest validation loss). The global batch is batch_size x world size x
accumulation. Training scenes are an endless stream, scene number a pure function of (step, micro-step, rank), so
--resume continues exactly. SIGINT, SIGTERM and SIGHUP stop all ranks after the step, with last.pt written.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cli import (add_config_flags, atomic_path, cpu_has_native_bf16, format_flag, keep_freed_memory, resolve_device,
                 unknown_flags_message)
from devset import LABELS, SAMPLE_RATE
from metrics import (binary_cross_entropy, capi_sdri, class_aware_pit_snr_loss, label_accuracies, label_counts,
                     masked_snr_loss, pit_cross_entropy, snr64)
from model import Separator, SeparatorConfig, TaggerConfig, build_tagger, load_weights, read_checkpoint
from synth import SCENE_2025, GeneratedDataset, MetadataDataset, Renderer, SceneConfig, collate

TASKS = ("tagging", "separation")
LOSSES = {"tagging": ("pit_cross_entropy", "binary_cross_entropy"),
          "separation": ("class_aware_pit_snr", "snr", "snr_masked")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
M2D_WEIGHTS = "checkpoint/m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly/weights_ep69it3124-0.47998.pth"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # each asks for a stop after the current step
REPEAT_SIGNAL_SECONDS = 5.0  # a signal repeated within this time is the same stop request (torchrun forwards it)
STATUS_READ_SECONDS = 2.0  # longest wall time between two reads of the step status (loss, stop request)
DATA_HINT = ("Create the small demo set with `python data_prep.py demo` (writes data/dev_set), or check a full "
             "development set with `python data_prep.py verify --data DIR` and pass it as --data_root DIR.")


@dataclasses.dataclass
class TrainConfig:
    task: str = "separation"  # 'tagging' (M2D tagger) or 'separation' (ResUNetK separator)
    loss: str = "auto"  # 'auto' (the model's official loss) or a name from LOSSES, e.g. 'snr_masked' (2025)
    data_root: str = "data/dev_set"  # dev_set folder: sound_event/, interference/, noise/, room_ir/, metadata/
    out_dir: str = ""  # run folder; '' = runs/<task>_<preset>
    init_from: str = ""  # checkpoint whose model weights start the run (ours or an official Lightning .ckpt)
    init_optimizer: bool = False  # also take the AdamW state and its lr from --init_from (unless --lr is given)
    init_non_strict: bool = False  # --init_from: load the tensors whose name and shape match, list the others
    seed: int = 0  # seeds the model initialisation and the scene stream
    max_steps: int = 200_000  # optimizer steps
    batch_size: int = 4  # largest mixtures per device and micro-step (exactly this when given as a flag)
    global_batch: int = 16  # mixtures per optimizer step over all devices; sets the gradient accumulation
    lr: float = 1e-4  # peak learning rate
    lr_schedule: str = "constant"  # 'constant' (official) or 'cosine' (decay to min_lr at max_steps)
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr (0 = none, official)
    min_lr: float = 0.0  # final learning rate of the cosine schedule
    weight_decay: float = 0.0  # AdamW decoupled weight decay (official 0)
    grad_clip: float = 0.5  # max 2-norm of all gradients (0 = no clipping; the norm is logged anyway)
    dtype: str = "fp32"  # autocast precision: 'fp32' (official), 'bf16' or 'fp16' (with a GradScaler)
    tf32: bool = False  # TF32 matmuls on Ampere+ GPUs (off: torch's default; cuDNN convolutions use TF32 either way)
    compile: bool = False  # torch.compile the training forward
    device: str = "auto"  # 'cpu', 'cuda' or 'auto' (cuda when available)
    num_workers: int = -1  # DataLoader processes per rank reading scenes (-1 = CPU cores per local rank - 1, >= 1)
    render_on: str = "auto"  # 'device' (workers read, the training device renders), 'workers', 'auto' (device on CUDA)
    rir_cache_megabytes: int = 2048  # MB of RIR spectra kept on the training device (--render_on device)
    prefetch_factor: int = 4  # batches each worker prepares ahead
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 632  # steps between validations (official: once per epoch)
    eval_mixtures: int = 0  # validation mixtures from valid.json (0 = all)
    eval_batch_size: int = 4  # validation mixtures per device and batch
    checkpoint_interval: int = 100  # steps between writes of last.pt (also written at every validation)
    tensorboard: bool = True  # also write the log and validation lines to OUT_DIR/tensorboard (if it is installed)


SECTIONS = {"train": TrainConfig, "tagger": TaggerConfig, "separator": SeparatorConfig, "scene": SceneConfig}
MODEL_SECTION = {"tagging": "tagger", "separation": "separator"}

# Official recipes (config/*.yaml; 4 GPUs for 2026): global_batch = GPUs x batch per GPU, eval_interval =
# dataset_length / global_batch (one validation per official epoch), max_steps = max_epochs x eval_interval where
# the official run was bounded. The second tagger stage keeps the yaml's lr 1e-5, but the official run was resumed
# with Lightning's `-r` from the head stage, restoring its AdamW state and lr 1e-3: init_optimizer does the same.
TAGGER_2026 = dict(batch_size=32, global_batch=128, lr=1e-3, eval_interval=196, eval_batch_size=16)
TAGGER_2BLKS = dict(batch_size=32, global_batch=128, lr=1e-5, init_optimizer=True, max_steps=5000, eval_interval=5,
                    eval_batch_size=16)
TAGGER_2025 = dict(head="linear", num_channels=1, finetuning="head", m2d_weights=M2D_WEIGHTS)
PRESETS = {
    "m2dat_1c": {"tagging": dict(train=dict(TAGGER_2026, max_steps=300 * 196), scene=dict(nevent_range=(0, 3)),
                                 tagger=dict(num_channels=1, finetuning="head", m2d_weights=M2D_WEIGHTS))},
    "m2dat_1c_2blks": {"tagging": dict(train=TAGGER_2BLKS, scene=dict(nevent_range=(0, 3)),
                                       tagger=dict(num_channels=1, finetuning="2_blocks", m2d_weights=M2D_WEIGHTS))},
    "m2dat_4c": {"tagging": dict(train=dict(TAGGER_2026, max_steps=300 * 196), scene=dict(nevent_range=(0, 3)),
                                 tagger=dict(num_channels=4, finetuning="head", m2d_weights=M2D_WEIGHTS))},
    "m2dat_4c_2blks": {"tagging": dict(train=TAGGER_2BLKS, scene=dict(nevent_range=(0, 3)),
                                       tagger=dict(num_channels=4, finetuning="2_blocks", m2d_weights=M2D_WEIGHTS))},
    "resunetk_capisdr": {"separation": dict(train=dict(loss="class_aware_pit_snr", batch_size=4, global_batch=16,
                                                       lr=1e-4, max_steps=200_000, eval_interval=632),
                                            separator=dict(num_slots=3))},
    # 2025 taggers (8 GPUs; 18 sigmoids, BCE): dataset_length 100000 and 600 (ceil per rank); the yaml's max_epochs -1
    # is bounded by the 2025 variants' 300 (head) and 1500 (blocks) epochs. Blocks: the -r resume quirk as in 2026.
    "m2dat_head": {"tagging": dict(train=dict(batch_size=32, global_batch=256, lr=1e-3, eval_interval=391,
                                              max_steps=300 * 391), scene=SCENE_2025, tagger=TAGGER_2025)},
    "m2dat_head_blks": {"tagging": dict(train=dict(batch_size=16, global_batch=128, lr=1e-5, init_optimizer=True,
                                                   eval_interval=5, max_steps=1500 * 5), scene=SCENE_2025,
                                        tagger=dict(TAGGER_2025, finetuning="2_blocks"))},
    # 2025 separators: the GPU count of these runs is not documented; 8 as for the 2025 tagger table.
    "resunet": {"separation": dict(train=dict(loss="snr", batch_size=5, global_batch=40, lr=1e-4, max_steps=200_000,
                                              eval_interval=2500), separator=dict(num_slots=1), scene=SCENE_2025)},
    "resunetk": {"separation": dict(train=dict(loss="snr_masked", batch_size=5, global_batch=40, lr=1e-4,
                                               max_steps=200_000, eval_interval=2500),
                                    separator=dict(num_slots=3), scene=SCENE_2025)},
    # Small models from scratch for the procedural demo set, minutes each on 2 CPU cores. The tagger sees whole 10 s
    # scenes through 16 x 32 patches (half the tokens of 16 x 16); the separator trains on 3 s clips with a coarser
    # STFT (its cost is in the full-resolution layers, not the width). In runs this short a cosine decay gives both a
    # better end point than the official constant lr. Validation stays on the 10 s valid.json mixtures.
    "demo": {"tagging": dict(train=dict(batch_size=16, global_batch=16, lr=1e-3, lr_schedule="cosine", max_steps=450,
                                        eval_interval=150, eval_batch_size=16, checkpoint_interval=50),
                             tagger=dict(finetuning="all", m2d_weights="", embed_dim=192, depth=4, num_heads=3,
                                         input_size=(80, 1024), patch_size=(16, 32)),
                             scene=dict(nevent_range=(0, 3))),
             "separation": dict(train=dict(batch_size=4, global_batch=4, lr=2e-3, lr_schedule="cosine", max_steps=300,
                                           eval_interval=150, checkpoint_interval=50),
                                separator=dict(base_channels=16, n_fft=512, hop_length=256),
                                scene=dict(duration=3.0))},
}
OFFICIAL_PRESET = {"tagging": "m2dat_1c", "separation": "resunetk_capisdr"}


# ---- Configuration: defaults < preset < --config < flags ---------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """Every field a flag; --help shows the values of the official presets (per task where they differ)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", help=f"named recipe: {', '.join(PRESETS)} (default: the task's official one, "
                                         f"{' / '.join(OFFICIAL_PRESET.values())})")
    parser.add_argument("--config", help="a run's config.json; its values override the preset")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last.pt")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration with the origin of each value, then exit")
    for section, cls in SECTIONS.items():
        tasks = [task for task in TASKS if MODEL_SECTION[task] == section] or list(TASKS)
        official = {task: dataclasses.asdict(cls()) | PRESETS[OFFICIAL_PRESET[task]][task].get(section, {})
                    for task in tasks}
        shown = {name: ", ".join(f"{official[task][name]!r} for {task}" for task in tasks)
                 if len({repr(official[task][name]) for task in tasks}) > 1 else repr(official[tasks[0]][name])
                 for name in official[tasks[0]]}
        # TrainConfig fields are plain flags (--lr); the others carry their section (--separator.base_channels).
        group = parser.add_argument_group(cls.__name__ if section == "train" else f"{cls.__name__} (--{section}.*)")
        add_config_flags(group, cls, prefix="" if section == "train" else f"{section}.", dest_prefix=f"{section}.",
                         layered=True, shown=shown)
    return parser


def resolve_config(argv=None) -> tuple[argparse.Namespace, TrainConfig, object, SceneConfig, str]:
    """-> (parsed flags, train config, model config, scene config, preset name); errors end the program in one line."""
    parser = build_parser()
    cli, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SystemExit(unknown_flags_message(unknown, parser))
    flags = {section: {} for section in SECTIONS}
    for dest, value in vars(cli).items():
        if "." in dest:
            flags[dest.split(".")[0]][dest.split(".", 1)[1]] = value
    config_path = cli.config
    if cli.resume and not config_path:
        if not flags["train"].get("out_dir"):
            raise SystemExit("--resume needs --out_dir (the run folder holding config.json and last.pt)")
        config_path = str(Path(flags["train"]["out_dir"]) / "config.json")
    file_values = {}
    if config_path:
        try:
            file_values = json.loads(Path(config_path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{'--config' if cli.config else '--resume'} {config_path}: cannot read a JSON run "
                             f"configuration ({error})")
        if set(file_values) - set(SECTIONS) - {"preset"}:
            raise SystemExit(f"{config_path}: unknown sections {sorted(set(file_values) - set(SECTIONS) - {'preset'})}"
                             f"; valid: preset, {', '.join(SECTIONS)}")
    # The task decides which preset recipe and which model section apply.
    preset = cli.preset or file_values.get("preset")
    if preset is not None and preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    task = flags["train"].get("task") or file_values.get("train", {}).get("task")
    task_origin = "flags" if flags["train"].get("task") else config_path
    if task is None:
        task = next(iter(PRESETS[preset])) if preset and len(PRESETS[preset]) == 1 else "separation"
        task_origin = f"preset {preset}" if preset else "default"
    if task not in TASKS:
        raise SystemExit(f"unknown --task {task!r}; valid tasks: {', '.join(TASKS)}")
    preset = preset or OFFICIAL_PRESET[task]
    if task not in PRESETS[preset]:
        valid = [name for name, recipes in PRESETS.items() if task in recipes]
        raise SystemExit(f"preset {preset!r} has no {task} recipe; {task} presets: {', '.join(valid)}")
    model_section = MODEL_SECTION[task]
    for section in set(MODEL_SECTION.values()) - {model_section}:
        if flags[section] or file_values.get(section):
            raise SystemExit(f"--{section}.* settings do not apply to --task {task}")

    values = {section: dataclasses.asdict(cls()) for section, cls in SECTIONS.items()}
    origins = {section: dict.fromkeys(values[section], "default") for section in SECTIONS}
    for origin, layer in ((f"preset {preset}", PRESETS[preset][task]), (config_path, file_values), ("flags", flags)):
        for section, overrides in layer.items():
            for key, value in (overrides.items() if section in SECTIONS else ()):
                if key not in values[section]:
                    raise SystemExit(f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(values[section])}")
                values[section][key] = tuple(value) if isinstance(values[section][key], tuple) else value
                origins[section][key] = origin
    values["train"]["task"], origins["train"]["task"] = task, task_origin
    if not values["train"]["out_dir"]:
        values["train"]["out_dir"], origins["train"]["out_dir"] = f"runs/{task}_{preset}", "runs/<task>_<preset>"
    try:
        train, model, scene = (SECTIONS[name](**values[name]) for name in ("train", model_section, "scene"))
    except (TypeError, ValueError) as error:
        raise SystemExit(f"invalid configuration: {error}")
    if cli.print_config:
        if train.init_optimizer and origins["train"]["lr"] != "flags":
            origins["train"]["lr"] += ", replaced by the lr saved in --init_from (--init_optimizer)"
        print(f"task {task}, preset {preset}: the values of this run (defaults < preset < --config < flags)")
        for section in ("train", model_section, "scene"):
            for key, value in values[section].items():
                name = key if section == "train" else f"{section}.{key}"
                print(f"  {format_flag(name, value):<56} {origins[section][key]}")
    check_train_config(train, model)
    if cli.print_config:
        raise SystemExit(0)
    return cli, train, model, scene, preset


def check_train_config(config: TrainConfig, model_config) -> None:
    choices = {"dtype": tuple(DTYPES), "lr_schedule": ("constant", "cosine"), "device": ("auto", "cpu", "cuda"),
               "loss": ("auto",) + LOSSES[config.task], "render_on": ("auto", "device", "workers")}
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise SystemExit(f"--{name} {getattr(config, name)!r}: expected one of {', '.join(valid)}")
    minimum = dict.fromkeys(("max_steps", "batch_size", "global_batch", "log_interval", "eval_batch_size",
                             "checkpoint_interval", "eval_interval"), 1) | {"num_workers": -1, "rir_cache_megabytes": 0}
    for name, least in minimum.items():
        if getattr(config, name) < least:
            raise SystemExit(f"--{name} must be at least {least}{' (-1: automatic)' * (least == -1)}, got "
                             f"{getattr(config, name)}")
    if loss_name(config, model_config) == "snr" and model_config.num_slots != 1:
        raise SystemExit("--loss snr trains a single-query separator: set --separator.num_slots 1")
    if config.init_optimizer and not config.init_from:
        raise SystemExit("--init_optimizer (on in the *_2blks presets) continues the optimizer of an earlier stage: "
                         "pass --init_from with that run's last.pt (e.g. runs/tagging_m2dat_1c/last.pt), or "
                         "--no-init_optimizer to start with a fresh optimizer")
    if config.init_non_strict and not config.init_from:
        raise SystemExit("--init_non_strict applies to --init_from, which is not set")


def loss_name(config: TrainConfig, model_config) -> str:
    if config.loss != "auto":
        return config.loss
    if config.task == "tagging":
        return "binary_cross_entropy" if model_config.multilabel else "pit_cross_entropy"
    return "snr" if model_config.num_slots == 1 else "class_aware_pit_snr"


# ---- Set-up: processes, batch split, model and optimizer, checkpoints --------------------------------------------
def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = resolve_device(device_name)
    except ValueError as error:
        raise SystemExit(str(error))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world_size > 1:  # device_id binds NCCL to this rank's GPU at once instead of at the first collective
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return rank, world_size, device


def split_batch(global_batch: int, world_size: int, batch_size: int, exact: bool) -> tuple[int, int]:
    """(per-device batch, accumulation) for the global batch: the largest divisor up to batch_size, or exactly it."""
    per_device, remainder = divmod(global_batch, world_size)
    if remainder or not per_device:
        lower = global_batch // world_size * world_size
        options = " or ".join(str(value) for value in (lower, lower + world_size) if value > 0)
        raise SystemExit(f"--global_batch {global_batch} cannot be split over world size {world_size}: use "
                         f"--global_batch {options} (a multiple of the world size)")
    divisors = [value for value in range(1, per_device + 1) if per_device % value == 0]
    if not exact:
        batch_size = max(value for value in divisors if value <= batch_size)
    elif batch_size not in divisors:
        options = " or ".join(str(value) for value in ([max(d for d in divisors if d < batch_size)] +
                                                         [d for d in divisors if d > batch_size][:1]))
        raise SystemExit(f"--batch_size {batch_size} does not divide the {per_device} mixtures per device "
                         f"(--global_batch {global_batch} / world size {world_size}): use --batch_size {options}, "
                         "or another --global_batch")
    return batch_size, per_device // batch_size


def freeze_unused_parameters(model: torch.nn.Module, task: str) -> list[str]:
    """Freeze (and name) the parameters a probe pass never reaches (the official separator's unused decoder `beta2`
    FiLM layers and `bn2`): AdamW never changes them, and DDP then needs no find_unused_parameters."""
    was_training = model.training
    model.eval()
    mixture = torch.randn(1, 4, SAMPLE_RATE)  # (B, C, L)
    output = model(mixture) if task == "tagging" else model(mixture, torch.eye(len(LABELS))[None, :3])
    output.float().square().sum().backward()
    unused = [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]
    for name, parameter in model.named_parameters():
        parameter.grad = None
        parameter.requires_grad_(parameter.requires_grad and name not in unused)
    model.train(was_training)
    return unused


def config_differences(saved, current, section: str, resume: bool) -> str:
    """'' when a checkpoint's model configuration gives this run's weight layout, else the fields that differ."""
    saved, current = (json.loads(json.dumps(dataclasses.asdict(config))) for config in (saved, current))
    free = ("finetuning", "m2d_weights") + ("iterations",) * (not resume)  # a new feedback input starts at zero
    keys = [key for key in current if key not in free and saved.get(key) != current[key]]
    hint = f"; --resume keeps the run's model: remove {' '.join(f'--{section}.{key}' for key in keys)}" * resume
    return (f"checkpoint has {' and '.join(f'{section}.{key} {saved.get(key)}' for key in keys)}, this run "
            f"{' and '.join(str(current.get(key)) for key in keys)}{hint}") if keys else ""


def map_optimizer_state(saved: dict, saved_names: list[str], model: torch.nn.Module, path: str) -> dict:
    """An optimizer state saved for the parameters `saved_names` (in its order) -> one for this model's, by name."""
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
            raise SystemExit(f"--init_optimizer: the optimizer state of {name} in {path} has shape {sorted(shapes)}, "
                             f"the parameter here {list(own[name].shape)}")
        state[position[name]] = entry
    return {"state": state, "param_groups": [dict(groups[0], params=list(range(len(own))))]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A saved optimizer's per-parameter state; unlike torch's load_state_dict, the group settings stay ours."""
    groups = [dict(group, params=saved_group["params"])
              for group, saved_group in zip(optimizer.state_dict()["param_groups"], saved["param_groups"])]
    optimizer.load_state_dict({"state": saved["state"], "param_groups": groups})


def setup_model(cli, config: TrainConfig, model_config, device: torch.device, world_size: int, say) -> tuple:
    """The model (from last.pt with --resume, or --init_from) on the device, fused AdamW and the GradScaler with their
    saved state -> (config with the lr in force, model, optimizer, scaler, step, best validation loss, frozen names)."""
    kind = MODEL_SECTION[config.task]
    try:
        model = build_tagger(model_config) if kind == "tagger" else Separator(model_config)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot build the {kind}: {error}\n(the official taggers start from the M2D weight file, "
                         "see the README; --tagger.m2d_weights '' starts from random weights)")
    path = str(Path(config.out_dir) / "last.pt") if cli.resume else config.init_from
    flag = "--resume" if cli.resume else "--init_from"
    checkpoint, optimizer_state = None, None
    if path:
        try:
            checkpoint = read_checkpoint(path, kind)
            difference = checkpoint.saved and config_differences(checkpoint.config, model_config, kind, cli.resume)
            if difference:
                raise ValueError(f"{path}: {difference}")
            skipped = load_weights(model, checkpoint.weights, path, strict=cli.resume or not config.init_non_strict)
        except ValueError as error:
            hint = "; --init_non_strict loads the matching tensors only" * ("do not fit" in str(error) and not cli.resume)
            raise SystemExit(f"{flag} {error}{hint}")
        if skipped:
            say(f"--init_non_strict: loaded the tensors of {path} that fit; left out: {skipped}")
        optimizer_state = checkpoint.optimizer if cli.resume else None
        if config.init_optimizer and not cli.resume:
            if checkpoint.optimizer is None or checkpoint.parameter_names is None:
                raise SystemExit(f"--init_optimizer: {config.init_from} holds no optimizer state (best.pt keeps the "
                                 "weights only): use the run's last.pt, or --no-init_optimizer")
            optimizer_state = map_optimizer_state(checkpoint.optimizer, checkpoint.parameter_names, model,
                                                  config.init_from)
            saved_lr = checkpoint.optimizer["param_groups"][0]["lr"]
            given = "train.lr" in vars(cli)  # an --lr on the command line wins over the saved one
            config = config if given else dataclasses.replace(config, lr=saved_lr)
            say(f"--init_optimizer: AdamW state of {len(optimizer_state['state'])} parameter tensors and lr "
                f"{saved_lr:g} from {config.init_from}{f'; --lr {config.lr:g} given, it wins' if given else ''}")
    unused = freeze_unused_parameters(model, config.task)
    model.to(device)
    if world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # official sync_batchnorm True
    # One group over all parameters, frozen ones included, as the official: a saved state maps onto it one to one.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay, amsgrad=True, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")
    if optimizer_state is not None:
        load_optimizer_state(optimizer, optimizer_state)
    if not cli.resume:
        return config, model, optimizer, scaler, 0, math.inf, unused
    saved = checkpoint.saved
    scaler.load_state_dict(saved["scaler"])
    random.setstate(saved["rng"]["python"])  # after the probe pass of freeze_unused_parameters, which draws numbers
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return config, model, optimizer, scaler, saved["step"], saved["best_metric"], unused


def code_version() -> str:
    """Short git hash of the code, '<hash>-dirty' with uncommitted changes to tracked files, or 'unknown'."""
    try:
        git = [subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
               .stdout.strip() for args in (("rev-parse", "--short", "HEAD"), ("status", "-s", "-uno"))]
    except (OSError, subprocess.SubprocessError):
        git = ["", ""]
    return (git[0] + "-dirty" * bool(git[1])) if git[0] else "unknown"


def check_config_json(out_dir: Path, record: dict) -> None:
    """A fresh run never writes into another run's folder: an existing config.json must equal this run's."""
    if not (out_dir / "config.json").is_file():
        return
    try:
        old = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        old = {"config.json": "unreadable"}
    new = json.loads(json.dumps(record))  # tuples -> lists, as read back from JSON
    flat = [{f"{section}.{key}": value for section, values in layer.items()
             for key, value in (values.items() if isinstance(values, dict) else [("", values)])} for layer in (old, new)]
    differences = [f"{key.rstrip('.')} {flat[0].get(key)!r} there, {flat[1].get(key)!r} here"
                   for key in dict.fromkeys([*flat[1], *flat[0]]) if flat[0].get(key) != flat[1].get(key)]
    if differences:
        raise SystemExit(f"{out_dir} already holds the config.json of another run ({'; '.join(differences[:3])}"
                         f"{'; ...' if len(differences) > 3 else ''}); choose another --out_dir or delete it")


# ---- Data: the dev-set check, the step-numbered scene stream, loaders, the validation set rendered once ----------
def check_data_root(root: Path, scene: SceneConfig) -> None:
    """Fail early, naming the commands that fix it, when the dev set lacks a folder training reads."""
    needed = ["sound_event/train", "noise/train", "room_ir/train", "metadata/valid.json"]
    needed += ["interference/train"] if max(scene.interference_range) > 0 else []
    problems = [f"{root / name} is missing" + (" (the official layout splits each source folder into train/ and "
                                               "valid/)" if (root / name.split("/")[0]).is_dir() else "")
                for name in needed if not (root / name).exists()]
    if not problems and max(scene.interference_range) > 0 and not any((root / "interference/train").iterdir()):
        problems.append(f"{root / 'interference/train'} holds no class folders (scene.interference_range "
                        f"{scene.interference_range}; `python data_prep.py add-data` adds them)")
    if problems:
        raise SystemExit(f"data root {root} is not a usable dev_set: {'; '.join(problems)}.\n{DATA_HINT}")


def dataset_options(task: str, model_config) -> dict:
    """The official DatasetS3 settings: tagger targets [3, 19] (2025: multi-hot [18]), separator queries [3, 18] with
    all-zero silence rows and dry targets; 1-channel taggers get the channels up to their reference one."""
    if task == "separation":
        return dict(label_vector_mode="stack", silence_label_mode="zeros", return_sources=True)
    return dict(label_vector_mode="multihot" if model_config.multilabel else "stack",
                silence_label_mode="zeros" if model_config.multilabel else "onehot", return_sources=False,
                num_channels=model_config.ref_channel + 1 if model_config.num_channels == 1 else None)


def default_num_workers() -> int:
    """CPU cores per rank of this machine minus one for training itself, at least 1 (16 cores, 4 ranks: 3)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


def scene_number(step: int, micro_step: int, accumulation: int, rank: int, world_size: int, batch_size: int) -> int:
    """The first scene of a micro-batch, a function of (step, micro-step, rank) only: a resumed run sees the same."""
    return ((step * accumulation + micro_step) * world_size + rank) * batch_size


def step_batches(start: int, max_steps: int, accumulation: int, rank: int, world_size: int, batch_size: int):
    """The scene numbers of every micro-batch this rank trains on (a DataLoader batch_sampler)."""
    for step in range(start, max_steps):
        for micro_step in range(accumulation):
            first = scene_number(step, micro_step, accumulation, rank, world_size, batch_size)
            yield list(range(first, first + batch_size))


def tensorboard_writer(out_dir: Path, say):
    """A TensorBoard writer on OUT_DIR/tensorboard, or None when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(out_dir / "tensorboard"))
    except ImportError:
        say("TensorBoard: the tensorboard package is not installed (pip install tensorboard); log.jsonl only")


def ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C and SIGTERM: the main process shuts them down after saving."""
    for signum in STOP_SIGNALS[:2]:
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset, workers: int, config, device, persistent: bool, **options):
    """Worker processes prepare batches ahead, so that a step does not wait for data."""
    parallel = dict(num_workers=workers, prefetch_factor=config.prefetch_factor, persistent_workers=persistent,
                    worker_init_fn=ignore_stop_signals) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, collate_fn=collate, pin_memory=device.type == "cuda", **parallel,
                                       **options)


# ---- Loss, validation, learning rate -----------------------------------------------------------------------------
def compute_loss(model, batch: dict, loss: str, generator: torch.Generator | None = None, passes: int = 0) -> tuple:
    """(float64 loss, model output) of one batch. The 2025 single-query ResUNet ('snr') trains on one non-silent slot
    per mixture drawn from `generator`; validation (generator None) scores every non-silent slot. passes: separator
    passes (0 = its configured iterations)."""
    if loss not in sum(LOSSES.values(), ()):
        raise ValueError(f"unknown loss {loss!r}; expected one of {', '.join(sum(LOSSES.values(), ()))}")
    mixture = batch["mixture"]  # (B, 4, L)
    if loss == "pit_cross_entropy":
        logits = model(mixture).float()  # (B, 3, 19)
        return pit_cross_entropy(logits, batch["label_vector"])[0], logits
    if loss == "binary_cross_entropy":
        logits = model(mixture).float()  # (B, 18)
        return binary_cross_entropy(logits.sigmoid(), batch["label_vector"]), logits
    queries, targets = batch["label_vector"], batch["dry_sources"][:, :, 0]  # (B, 3, 18), (B, 3, L)
    active = (queries != 0).any(-1)  # (B, 3)
    if loss == "snr" and generator is not None:
        slot = torch.multinomial(active.float().cpu(), 1, generator=generator).to(mixture.device)  # (B, 1)
        query = queries.gather(1, slot[:, :, None].expand(-1, -1, queries.shape[-1]))  # (B, 1, 18)
        target = targets.gather(1, slot[:, :, None].expand(-1, -1, targets.shape[-1]))  # (B, 1, L)
        preds = model(mixture, query, passes).float()  # (B, 1, L)
        return -snr64(preds[:, 0], target[:, 0]).mean(), preds
    preds = model(mixture, queries, passes).float()  # (B, 3, L)
    if loss == "class_aware_pit_snr":
        return class_aware_pit_snr_loss(preds, targets, queries)[0], preds
    if loss == "snr_masked":
        return masked_snr_loss(preds, targets, active), preds
    return -snr64(preds, targets)[active].mean(), preds  # 'snr' validation: every real source


@torch.no_grad()
def validate(model, batches, config: TrainConfig, loss: str, autocast, world_size: int, stop) -> dict:
    """Validation loss and CAPI-SDRi with oracle labels (separation) or label accuracies (tagging), gathered over ranks;
    a stop request ends it after the current batch (the result then covers fewer mixtures)."""
    model.eval()
    records, scores = [], []  # (loss, mixtures) per batch; per-mixture scores
    for batch in batches:  # on the device, rendered
        with autocast:
            value, estimated = compute_loss(model, batch, loss)  # separation: estimated [B, 3, L]
        if config.task == "tagging":
            estimated = model.labels_from_logits(estimated)[0]  # labels, 3 per mixture
        records.append((value.item(), len(batch["label"])))
        for b, labels in enumerate(batch["label"]):
            scores.append(label_counts(estimated[b], labels) if config.task == "tagging" else
                          capi_sdri(labels, estimated[b].cpu(), labels, batch["dry_sources"][b, :, 0].cpu(),
                                    batch["mixture"][b, 0].cpu()))
        if stop.requested:
            break
    model.train()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (records, scores))
        records, scores = [r for part in gathered for r in part[0]], [s for part in gathered for s in part[1]]
    result = {"loss": sum(value * count for value, count in records) / sum(count for _, count in records),
              "mixtures": sum(count for _, count in records)}
    if config.task == "tagging":
        result["accuracy_mix"], result["accuracy_src"] = label_accuracies(scores)
    else:
        counted = [score for score in scores if score is not None]
        result["capi_sdri"] = sum(counted) / len(counted) if counted else float("nan")
    return result


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- Stop requests and the step status every rank reads together -------------------------------------------------
class StopRequest:
    """SIGINT, SIGTERM and SIGHUP as a request to stop after the step. torchrun forwards signals and schedulers signal
    every process, so a repeat within REPEAT_SIGNAL_SECONDS is the same request; a later Ctrl-C aborts at once."""

    def __init__(self, announce: bool):
        self.announce, self.signal_name, self.first_arrival = announce, None, 0.0
        self.pid = os.getpid()  # forked DataLoader workers inherit the handler; only this process stops
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:
            return
        if self.signal_name is None:
            self.signal_name, self.first_arrival = signal.Signals(signum).name, time.monotonic()
            if self.announce:  # os.write, not print: the main thread may be inside a print right now
                os.write(2, f"\n{self.signal_name}: stopping after this step (last.pt is saved first); Ctrl-C again "
                            "to abort\n".encode())
        elif signum == signal.SIGINT and time.monotonic() - self.first_arrival > REPEAT_SIGNAL_SECONDS:
            raise KeyboardInterrupt

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, device, world_size: int) -> bool:
        """True on every rank when any rank has a request (a collective: all ranks call it together)."""
        flag = torch.tensor([float(self.requested)], device=device)
        if world_size > 1:
            dist.all_reduce(flag)
        return flag.item() > 0


class StepStatus:
    """Loss, non-finite values and gradient norm summed on the device, read with the stop request by all ranks together
    at log, checkpoint and validation steps and about every STATUS_READ_SECONDS (a step derived from the reduced step
    time): no other step waits for the device, and a stop is honoured within seconds."""

    def __init__(self, config: TrainConfig, device, world_size: int, step: int, check_gradients: bool):
        self.config, self.device, self.world_size, self.check_gradients = config, device, world_size, check_gradients
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, non-finite steps, gradient norm
        self.steps, self.next_read, self.clock = 0, step + 1, time.perf_counter()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss) | (~torch.isfinite(grad_norm) if self.check_gradients else False)
        self.sums += torch.stack([loss.double(), bad.double(), grad_norm.double()])
        self.steps += 1

    def due(self, step: int) -> bool:
        config = self.config
        return step >= self.next_read or step == config.max_steps or any(
            step % interval == 0 for interval in (config.log_interval, config.checkpoint_interval, config.eval_interval))

    def read(self, step: int, stop_requested: bool) -> dict:
        """All-reduce and read (a collective) -> steps, loss, grad_norm, seconds, non_finite, stop (any rank)."""
        host = torch.tensor([float(stop_requested), time.perf_counter() - self.clock], dtype=torch.float64)
        status = torch.cat([self.sums, host.to(self.device)])
        if self.world_size > 1:
            dist.all_reduce(status)
        loss, non_finite, grad_norm, stop, seconds = (value / self.world_size for value in status.tolist())
        report = {"steps": self.steps, "loss": loss, "grad_norm": grad_norm, "seconds": seconds,
                  "non_finite": non_finite > 0, "stop": stop > 0}
        interval = int(STATUS_READ_SECONDS * self.steps / max(seconds, 1e-9))
        self.next_read = step + max(1, min(self.config.log_interval, interval))
        self.sums.zero_()
        self.steps, self.clock = 0, time.perf_counter()
        return report


# ---- Main --------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    cli, config, model_config, scene, preset = resolve_config(argv)
    rank, world_size, device = setup_distributed(config.device)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        train(cli, config, model_config, scene, preset, rank, world_size, device)
        if world_size > 1:  # no rank exits, or tears the process group down, before rank 0 has saved
            dist.barrier()
    finally:
        for signum, handler in handlers.items():  # train() installs its own; a caller gets its handlers back
            signal.signal(signum, handler)
        if world_size > 1:
            gc.collect()  # DDP sits in reference cycles: free it (and its gloo work) now, not at interpreter exit
            dist.destroy_process_group()


def train(cli, config: TrainConfig, model_config, scene: SceneConfig, preset: str, rank: int, world_size: int,
          device: torch.device) -> None:
    master = rank == 0
    say = print if master else (lambda *args, **kwargs: None)
    stop = StopRequest(announce=master)  # from here on a signal is a request to stop, agreed by all ranks
    kind = MODEL_SECTION[config.task]
    batch_size, accumulation = split_batch(config.global_batch, world_size, config.batch_size,
                                           exact="train.batch_size" in vars(cli))
    config = dataclasses.replace(config, batch_size=batch_size)
    loss = loss_name(config, model_config)
    data_root, out_dir = Path(config.data_root), Path(config.out_dir)
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.jsonl"
    check_data_root(data_root, scene)
    if cli.resume and not last_path.is_file():
        raise SystemExit(f"--resume: {last_path} does not exist (nothing to continue)")
    if not cli.resume and last_path.exists():
        raise SystemExit(f"{out_dir} already holds a run ({last_path}); pass --resume to continue it or choose "
                         "another --out_dir")
    if device.type == "cpu" and config.dtype == "bf16" and cpu_has_native_bf16() is False:
        say("warning: --dtype bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is several times slower than fp32")
    keep_freed_memory(device)
    torch.set_float32_matmul_precision("high" if config.tf32 else "highest")  # 'highest' (no TF32) is torch's default
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: find the fastest convolutions once
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    config, model, optimizer, scaler, step, best_loss, unused = setup_model(cli, config, model_config, device,
                                                                             world_size, say)
    train_model = torch.compile(model) if config.compile else model
    synced = world_size > 1 and device.type == "cuda"  # SyncBatchNorm: BatchNorm statistics over all ranks
    if world_size > 1:  # under SyncBatchNorm the buffers are equal on all ranks: no broadcast before each forward
        train_model = DistributedDataParallel(train_model, device_ids=[device.index] if synced else None,
                                              gradient_as_bucket_view=True, broadcast_buffers=not synced)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    autocast = torch.autocast(device.type, dtype=DTYPES[config.dtype], enabled=config.dtype != "fp32")

    # Data: an endless stream of generated scenes numbered by step, and the fixed validation set. Loader workers
    # read the scenes; they render them too (--render_on workers), or `renderer` renders each batch on the device.
    render_on = config.render_on if config.render_on != "auto" else "device" if device.type == "cuda" else "workers"
    workers = config.num_workers if config.num_workers >= 0 else default_num_workers()
    options = dataset_options(config.task, model_config) | dict(render=render_on == "workers")
    numbering = (accumulation, rank, world_size, config.batch_size)
    try:
        train_set = GeneratedDataset(data_root, scene, length=config.max_steps * config.global_batch, seed=config.seed,
                                     **options)
        valid_set = MetadataDataset(data_root / "metadata" / "valid.json", data_root=data_root, **options)
    except (OSError, ValueError, KeyError) as error:  # every problem of the dev set, in one line
        raise SystemExit(f"data root {data_root}: {'; '.join(map(str.strip, str(error).splitlines()))}\n{DATA_HINT}")
    valid_count = min(len(valid_set), config.eval_mixtures or len(valid_set))
    valid_set = torch.utils.data.Subset(valid_set, range(rank, valid_count, world_size))
    renderer = Renderer(data_root, device, config.rir_cache_megabytes)
    train_loader = make_loader(train_set, workers, config, device, True,
                               batch_sampler=step_batches(step, config.max_steps, *numbering))
    valid_loader = make_loader(valid_set, min(workers, 2), config, device, False, batch_size=config.eval_batch_size)

    # Run folder, resolved configuration and start-up summary.
    record = {"preset": preset, "train": dataclasses.asdict(config), kind: dataclasses.asdict(model_config),
              "scene": dataclasses.asdict(scene)}
    if not cli.resume:
        check_config_json(out_dir, record)
    version = code_version()
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    say(f"{config.task} | preset {preset} | loss {loss} | {kind} {sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
        f" M parameters, {sum(p.numel() for p in trainable) / 1e6:.2f} M trainable | device {device} x {world_size} | "
        f"dtype {config.dtype}{' | TF32 matmuls' if config.tf32 else ''}{' | compiled' if config.compile else ''}")
    say(f"global batch {config.global_batch} = batch {config.batch_size} x world size {world_size} x accumulation "
        f"{accumulation} | steps {step} -> {config.max_steps} | {valid_count} validation mixtures | out_dir {out_dir}")
    say(f"data: {workers} loader workers per rank read the scenes, "
        f"{f'{device} renders them' if render_on == 'device' else 'and render them'}")
    norm_batch = config.batch_size * (world_size if synced else 1)  # mixtures one BatchNorm layer sees at once
    if norm_batch < config.global_batch:
        say(f"warning: BatchNorm normalises over {norm_batch} mixtures, not over the global batch of "
            f"{config.global_batch} as the official runs; a larger --batch_size restores it if it fits in memory")
    if unused:
        say(f"{len(unused)} parameter tensors never get a gradient and are frozen (no find_unused_parameters): "
            f"{', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")

    writer = tensorboard_writer(out_dir, say) if master and config.tensorboard else None

    def log(entry: dict) -> None:
        if master:
            with open(log_path, "a") as file:
                file.write(json.dumps(entry) + "\n")
            if writer and entry["event"] in ("train", "valid"):  # the same numbers, for the official baseline's viewer
                for key, value in entry.items():
                    if key != "step" and isinstance(value, (int, float)):
                        writer.add_scalar(f"{entry['event']}/{key}", value, entry["step"])
                writer.flush()

    def save(path: Path, full: bool) -> None:
        """last.pt (full): everything --resume needs; best.pt: what evaluation and --init_from read."""
        if not master:
            return
        state = {"kind": kind, "model_config": dataclasses.asdict(model_config), "model": model.state_dict(),
                 "config": record, "step": step, "best_metric": best_loss, "code_version": version,
                 "torch_version": torch.__version__, "world_size": world_size}
        if full:
            rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            state |= {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                      "parameter_names": [name for name, _ in model.named_parameters()]}  # in the optimizer's order
        with atomic_path(path) as temporary:
            torch.save(state, temporary)

    log({"event": "start", "task": config.task, "preset": preset, "step": step, "world_size": world_size,
         "batch_size": config.batch_size, "accumulation": accumulation, "device": str(device),
         "code_version": version, "torch_version": torch.__version__, "python_version": sys.version.split()[0]})
    if cli.resume:
        say(f"resumed from {last_path} at step {step}; the training scenes continue at scene "
            f"{step * config.global_batch}")
        log({"event": "resume", "path": str(last_path), "step": step, "scene": step * config.global_batch})
    if step >= config.max_steps:
        say(f"nothing to do: the run is at step {step} and --max_steps is {config.max_steps}")
        return
    if stop.agreed(device, world_size):
        say(f"stopped by {stop.signal_name or 'a signal on another rank'} during start-up: nothing was trained"
            f"{f'; {last_path} still holds step {step}' if cli.resume else ''}")
        return

    # The loop. The step status (loss, non-finite values, stop request) stays on the device until status.due(step).
    train_model.train()
    batches, waited = iter(train_loader), 0.0  # seconds the loop waited for batches
    status = StepStatus(config, device, world_size, step, check_gradients=not scaler.is_enabled())
    window = dict.fromkeys(("steps", "loss", "grad_norm", "seconds"), 0.0)
    iterations = getattr(model_config, "iterations", 1)  # separator passes
    saved_step = step if cli.resume else None
    while step < config.max_steps:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro_step in range(accumulation):
            start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - start
            batch = renderer(batch)  # on the device, rendered
            # Training draws are functions of the scene numbers, like the data: the 2025 single query per mixture, and
            # 1 to `iterations` separator passes, the same on every rank (SyncBatchNorm gathers in every pass).
            generator = torch.Generator().manual_seed(config.seed + scene_number(step, micro_step, *numbering))
            draw = torch.Generator().manual_seed(config.seed + step * accumulation + micro_step)
            passes = int(torch.randint(1, iterations + 1, (), generator=draw))
            with nullcontext() if world_size == 1 or micro_step == accumulation - 1 else train_model.no_sync():
                with autocast:
                    value = compute_loss(train_model, batch, loss, generator, passes)[0]
                scaler.scale(value / accumulation).backward()
            loss_sum += value.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        status.add(loss_sum / accumulation, grad_norm)
        if not status.due(step):
            continue

        report = status.read(step, stop.requested)
        if report["non_finite"]:
            kept = f"the last good checkpoint {last_path} (step {saved_step}) is kept" if saved_step is not None \
                else "no checkpoint was written yet"
            raise SystemExit(f"steps {step - report['steps'] + 1}-{step}: the training loss or gradient is not finite; "
                             f"stopping ({kept}). Try a lower --lr, --dtype fp32, or check the data with "
                             "`python data_prep.py verify`.")
        for key in window:
            window[key] += report[key]
        if step % config.log_interval == 0 or step == config.max_steps or report["stop"]:
            seconds = window["seconds"] / window["steps"]
            entry = {"event": "train", "step": step, "loss": window["loss"] / window["steps"], "lr": lr,
                     "grad_norm": window["grad_norm"] / window["steps"], "ms_per_step": 1000 * seconds,
                     "mixtures_per_s": config.global_batch / seconds, "data_wait": min(1.0, waited / window["seconds"]),
                     "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # Linux: peak RSS in KiB
                     "eta_s": (config.max_steps - step) * seconds}
            eta = int(entry["eta_s"])
            say(f"step {step}/{config.max_steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | grad norm "
                f"{entry['grad_norm']:.3f} | {entry['ms_per_step']:.0f} ms/step | {entry['mixtures_per_s']:.3g} mix/s | "
                f"data wait {100 * entry['data_wait']:.1f}% | mem {entry['memory_gb']:.2f} GB | eta "
                f"{f'{eta // 3600}h{eta % 3600 // 60:02d}m' if eta >= 3600 else f'{eta // 60}m{eta % 60:02d}s'}",
                flush=True)
            log(entry)
            window, waited = dict.fromkeys(window, 0.0), 0.0

        stopped = report["stop"]
        if not stopped and (step % config.eval_interval == 0 or step == config.max_steps):
            result = validate(model, (renderer(batch) for batch in valid_loader), config, loss, autocast,
                              world_size, stop)
            stopped = stop.agreed(device, world_size)  # a stop during validation ends it early on that rank
            if result["mixtures"] == valid_count:
                improved = result["loss"] < best_loss
                best_loss = min(best_loss, result["loss"])
                if improved:
                    save(best_path, full=False)
                metric = (f"CAPI-SDRi {result['capi_sdri']:.2f} dB" if config.task == "separation" else
                          f"accuracy mixture {result['accuracy_mix']:.1f}% source {result['accuracy_src']:.1f}%")
                say(f"validation step {step} | loss {result['loss']:.4f} | {metric} | {result['mixtures']} mixtures"
                    f"{' | new best' if improved else ''}", flush=True)
                log({"event": "valid", "step": step, **result, "best_loss": best_loss})
        if stopped or step % config.checkpoint_interval == 0 or step % config.eval_interval == 0 \
                or step == config.max_steps:
            save(last_path, full=True)
            saved_step = step
        if stopped:
            say(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; wrote {last_path}. "
                f"Continue with: python train.py --out_dir {out_dir} --resume", flush=True)
            return
        status.clock = time.perf_counter()  # validation and checkpoint writing are not step time
    say(f"done: {step} steps, best validation loss {best_loss:.4f}; checkpoints in {out_dir}")


if __name__ == "__main__":
    main()
