"""Train the M2D tagger or the ResUNetK separator: one loop for one process, one GPU or many (torchrun).

    python train.py --task tagging --preset demo             # demo tagger on data/dev_set, a few minutes on CPU
    python train.py --task separation --preset demo          # demo separator
    python train.py --task separation --preset resunetk_capisdr --device cuda --dtype bf16
    torchrun --nproc_per_node=4 train.py --task tagging --preset m2dat_1c
    torchrun --nproc_per_node=4 train.py --task tagging --preset m2dat_1c_2blks \
        --init_from runs/tagging_m2dat_1c/last.pt            # second stage: weights, AdamW state and lr 1e-3
    python train.py --out_dir runs/separation_demo --resume --max_steps 2000   # continue a run exactly
    python train.py --task separation --preset demo --print_config   # the values a run would use, and their origin
    python train.py --help                                   # every knob, generated from the dataclasses

Configuration precedence: dataclass defaults < --preset (default: the task's official 2026 recipe) <
--config run/config.json (with --resume: the run's own config.json) < command-line flags. The run folder gets
config.json (the resolved configuration), log.jsonl (one JSON line per log step and validation), last.pt (the
full training state) and best.pt (the weights of the lowest validation loss); both load with
model.load_tagger / model.load_separator.

The global batch is split as batch_size x world size x accumulation: the per-device batch is the largest one,
at most --batch_size, that divides global_batch / world_size (exactly --batch_size when given on the command
line), so a preset runs unchanged under any number of processes that divides its global batch.

SIGINT, SIGTERM and SIGHUP ask for a stop: every rank finishes its step (or its validation batch), rank 0 writes
last.pt, and all ranks exit with status 0. The same signal arriving again within REPEAT_SIGNAL_SECONDS is the
same request (torchrun forwards what it receives, and cluster schedulers signal every process); a later second
Ctrl-C aborts at once.

Differences from the official Lightning recipe, on purpose (the README lists all of them):
* Training length is counted in optimizer steps and the scene stream is endless: scene number
  ((step * accumulation + micro_step) * world_size + rank) * batch_size + item, each a pure function of
  (seed, number). This is what makes --resume exact; the official epochs of `dataset_length` generated scenes
  map to `eval_interval` = dataset_length / global_batch steps.
* Parameters that never receive a gradient (the separator's decoder beta2 FiLM layers and decoder bn2) are
  found once with a probe pass and frozen, instead of paying find_unused_parameters on every step.
* SyncBatchNorm needs CUDA; CPU runs under torchrun keep per-rank BatchNorm statistics.
* Mixtures are rendered on the training device (--render_on device, the default on CUDA; render.BatchRenderer): the
  loader workers only draw the scenes and read the audio. Only what the task uses is rendered (the 1-channel
  tagger: channel 0 and no dry targets). The validation mixtures are rendered once per process and kept; the
  official code synthesizes every validation mixture again at every validation.
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import pickle
import random
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (check_config_json, code_version, config_differences, load_optimizer_state, load_weights,
                        map_optimizer_state, read_initial_checkpoint, rng_states, save_checkpoint, set_rng_states)
from cli import add_config_flags, unknown_flags_message
from cluster import STOP_SIGNALS, StepStatus, StopRequest, setup_distributed, split_batch
from devset import LABELS, SAMPLE_RATE
from metrics import (binary_cross_entropy, capi_sdri, class_aware_pit_snr_loss, label_accuracies, label_counts,
                     masked_snr_loss, pit_cross_entropy, snr, snr_loss)
from model import SeparatorConfig, TaggerConfig, build_separator, build_tagger, cpu_has_native_bf16
from render import BatchRenderer, keep_heap_memory, spectra_megabytes
from synth import GeneratedDataset, MetadataDataset, SceneConfig
from training_data import (DATA_HINT, StepBatches, ValidationSet, check_data_root, default_num_workers, label_modes,
                           make_loader, mixture_channels)

TASKS = ("tagging", "separation")
LOSSES = {"tagging": ("pit_cross_entropy", "binary_cross_entropy"),
          "separation": ("class_aware_pit_snr", "snr", "snr_masked")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_HEAP_KEEP_MEGABYTES = 2047  # freed memory a CPU training process keeps for the next step (render.keep_heap_memory)
M2D_WEIGHTS = "checkpoint/m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly/weights_ep69it3124-0.47998.pth"


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
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
    max_steps: int = 200_000  # optimizer steps (official separator: unlimited epochs of 632 steps)
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
    num_workers: int = -1  # DataLoader processes per rank that read scenes (-1 = CPU cores per local rank - 1, >= 1)
    render_on: str = "auto"  # 'device' (workers read, the training device renders), 'workers', 'auto' (device on CUDA)
    rir_cache_megabytes: int = 2048  # MB of RIR spectra kept on the training device (--render_on device)
    spectrum_cache_dir: str = ""  # folder for RIR spectra shared by processes and runs ('' = off; 10 MB per position)
    prefetch_factor: int = 4  # batches each worker prepares ahead
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 632  # steps between validations (official: once per epoch)
    eval_mixtures: int = 0  # validation mixtures from valid.json (0 = all)
    eval_batch_size: int = 4  # validation mixtures per device and batch
    checkpoint_interval: int = 100  # steps between writes of last.pt (also written at every validation)


SECTIONS = {"train": TrainConfig, "tagger": TaggerConfig, "separator": SeparatorConfig, "scene": SceneConfig}
MODEL_SECTION = {"tagging": "tagger", "separation": "separator"}

# Official recipes (the official config/*.yaml; 4 GPUs for 2026). global_batch = GPUs x batch/GPU; eval_interval =
# dataset_length / global_batch, i.e. one validation per official epoch; max_steps = max_epochs x eval_interval
# where the official run was bounded, otherwise a generous budget (the official runs were stopped by hand).
# The second tagger stage keeps the yaml's lr 1e-5, but the official run was resumed with Lightning's `-r` from the
# head stage, which restored that stage's AdamW state and its lr 1e-3: init_optimizer does the same.
TAGGER_2026 = dict(batch_size=32, global_batch=128, lr=1e-3, eval_interval=196, eval_batch_size=16)
TAGGER_2BLKS = dict(batch_size=32, global_batch=128, lr=1e-5, init_optimizer=True, max_steps=5000, eval_interval=5,
                    eval_batch_size=16)
SCENE_2025 = dict(ref_db=-50.0, nevent_range=(1, 3), dupse_rate=0.0, interference_range=(1, 2))
PRESETS = {
    "m2dat_1c": {"tagging": dict(train=dict(TAGGER_2026, max_steps=300 * 196),
                                 tagger=dict(num_channels=1, finetuning="head", m2d_weights=M2D_WEIGHTS),
                                 scene=dict(nevent_range=(0, 3)))},
    "m2dat_1c_2blks": {"tagging": dict(train=TAGGER_2BLKS,
                                       tagger=dict(num_channels=1, finetuning="2_blocks", m2d_weights=M2D_WEIGHTS),
                                       scene=dict(nevent_range=(0, 3)))},
    "m2dat_4c": {"tagging": dict(train=dict(TAGGER_2026, max_steps=300 * 196),
                                 tagger=dict(num_channels=4, finetuning="head", m2d_weights=M2D_WEIGHTS),
                                 scene=dict(nevent_range=(0, 3)))},
    "m2dat_4c_2blks": {"tagging": dict(train=TAGGER_2BLKS,
                                       tagger=dict(num_channels=4, finetuning="2_blocks", m2d_weights=M2D_WEIGHTS),
                                       scene=dict(nevent_range=(0, 3)))},
    "resunetk_capisdr": {"separation": dict(train=dict(loss="class_aware_pit_snr", batch_size=4, global_batch=16,
                                                       lr=1e-4, max_steps=200_000, eval_interval=632),
                                            separator=dict(num_slots=3))},
    # 2025 separators: the GPU count of these runs is not documented; 8 as for the 2025 tagger table.
    # Our synthesizer is the 2026 one with the 2025 levels (no duplicated classes, 1-2 interferers).
    "resunet": {"separation": dict(train=dict(loss="snr", batch_size=5, global_batch=40, lr=1e-4,
                                              max_steps=200_000, eval_interval=2500),
                                   separator=dict(num_slots=1), scene=SCENE_2025)},
    "resunetk": {"separation": dict(train=dict(loss="snr_masked", batch_size=5, global_batch=40, lr=1e-4,
                                               max_steps=200_000, eval_interval=2500),
                                    separator=dict(num_slots=3), scene=SCENE_2025)},
    # Small models from scratch for the procedural demo set, a few minutes each on 2 CPU cores (README). The tagger
    # sees whole 10 s scenes (the test mixtures are 10 s) through 16 x 32 patches, half the tokens of 16 x 16. The
    # separator trains on 3 s clips with a coarser STFT (512 / 256): its cost is dominated by full-resolution
    # spectrogram layers, not by the width. In runs this short a cosine decay of the lr gives both models a better
    # end point than the official constant lr. Validation stays on the 10 s valid.json mixtures.
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
        epilog="The defaults shown above are the code defaults (the dataclass fields). A preset (by default the "
               "task's official recipe) overrides them, --config overrides the preset and flags override all; "
               "--print_config shows the values a run would use and where each one comes from.")
    parser.add_argument("--preset", help=f"named recipe: {', '.join(PRESETS)} (default: the task's official one); "
                                         "it overrides the code defaults shown below")
    parser.add_argument("--config", help="a run's config.json; its values override the preset")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last.pt")
    parser.add_argument("--print_config", action="store_true",
                        help="print the resolved configuration with the origin of each value, then exit")
    for section, cls in SECTIONS.items():
        # TrainConfig fields are plain flags (--lr); the others carry their section (--separator.base_channels).
        group = parser.add_argument_group(cls.__name__ if section == "train" else
                                          f"{cls.__name__} (--{section}.* flags)")
        add_config_flags(group, cls, prefix="" if section == "train" else f"{section}.",
                         dest_prefix=f"{section}.", layered=True)
    return parser


def merge_section(values: dict, overrides: dict, section: str, origin: str, origins: dict) -> None:
    """Apply overrides to one section's values in place and note their origin; unknown keys are errors naming the
    valid ones."""
    for key, value in overrides.items():
        if key not in values:
            raise SystemExit(f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(values)}")
        values[key] = tuple(value) if isinstance(values[key], tuple) and isinstance(value, list) else value
        origins[key] = origin


def format_flag(name: str, value) -> str:
    """A value as the command-line flag that sets it: --lr 0.001, --no-tf32, --scene.snr_range 5.0 20.0."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, (tuple, list)):
        return f"--{name} {' '.join(str(item) for item in value)}"
    return f"--{name} {value if value != '' else repr(value)}"


def resolve_config(argv=None) -> tuple[argparse.Namespace, TrainConfig, object, SceneConfig, str]:
    """defaults < preset < --config file < flags -> (cli, train config, model config, scene config, preset)."""
    parser = build_parser()
    cli, unknown = parser.parse_known_args(argv)
    if unknown:
        raise SystemExit(unknown_flags_message(unknown, parser))
    flags = {section: {} for section in SECTIONS}
    for dest, value in vars(cli).items():
        if "." in dest:
            section, key = dest.split(".", 1)
            flags[section][key] = value
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
        unknown_sections = set(file_values) - set(SECTIONS) - {"preset"}
        if unknown_sections:
            raise SystemExit(f"{config_path}: unknown sections {sorted(unknown_sections)}; valid: preset, "
                             f"{', '.join(SECTIONS)}")

    # The task decides which preset recipe and which model section apply.
    preset_name = cli.preset or file_values.get("preset")
    task = flags["train"].get("task") or file_values.get("train", {}).get("task")
    if preset_name is not None and preset_name not in PRESETS:
        raise SystemExit(f"unknown preset {preset_name!r}; valid presets: {', '.join(PRESETS)}")
    task_origin = "flags" if flags["train"].get("task") else config_path
    if task is None:
        task = next(iter(PRESETS[preset_name])) if preset_name and len(PRESETS[preset_name]) == 1 else "separation"
        task_origin = f"preset {preset_name}" if preset_name else "default"
    if task not in TASKS:
        raise SystemExit(f"unknown --task {task!r}; valid tasks: {', '.join(TASKS)}")
    preset_name = preset_name or OFFICIAL_PRESET[task]
    if task not in PRESETS[preset_name]:
        valid = [name for name, recipes in PRESETS.items() if task in recipes]
        raise SystemExit(f"preset {preset_name!r} has no {task} recipe; {task} presets: {', '.join(valid)}")
    model_section = MODEL_SECTION[task]
    for section in SECTIONS:
        if section in MODEL_SECTION.values() and section != model_section and (flags[section]
                                                                                 or file_values.get(section)):
            raise SystemExit(f"--{section}.* settings do not apply to --task {task}")
    if cli.resume:  # the weights in last.pt fit the run's own model configuration: flags may only repeat it
        saved = dataclasses.asdict(SECTIONS[model_section]()) | file_values.get(model_section, {})
        changed = [key for key, value in flags[model_section].items()
                   if json.dumps(value) != json.dumps(saved.get(key))]  # JSON: tuples and lists compare equal
        if changed:
            raise SystemExit(f"--resume keeps the model of the run in {config_path}, which has "
                             f"{', '.join(f'{model_section}.{key} {saved.get(key)}' for key in changed)}; remove "
                             f"{', '.join(f'--{model_section}.{key}' for key in changed)}")

    values = {section: dataclasses.asdict(cls()) for section, cls in SECTIONS.items()}
    origins = {section: dict.fromkeys(values[section], "default") for section in SECTIONS}
    for origin, layer in ((f"preset {preset_name}", PRESETS[preset_name][task]), (config_path, file_values),
                          ("flags", flags)):
        for section, overrides in layer.items():
            if section in SECTIONS:
                merge_section(values[section], overrides, section, origin, origins[section])
    values["train"]["task"], origins["train"]["task"] = task, task_origin
    if not values["train"]["out_dir"]:
        values["train"]["out_dir"] = f"runs/{task}_{preset_name}"
        origins["train"]["out_dir"] = "runs/<task>_<preset>"
    try:
        train = TrainConfig(**values["train"])
        model = SECTIONS[model_section](**values[model_section])
        scene = SceneConfig(**values["scene"])
    except (TypeError, ValueError) as error:
        raise SystemExit(f"invalid configuration: {error}")
    if cli.print_config:
        if train.init_optimizer and origins["train"]["lr"] != "flags":
            origins["train"]["lr"] += ", replaced by the lr saved in --init_from (--init_optimizer)"
        print(f"task {task}, preset {preset_name}: the values of this run (defaults < preset < --config < flags)")
        for section in ("train", model_section, "scene"):
            for key, value in values[section].items():
                name = key if section == "train" else f"{section}.{key}"
                print(f"  {format_flag(name, value):<56} {origins[section][key]}")
    check_train_config(train, model)
    if cli.print_config:
        raise SystemExit(0)
    return cli, train, model, scene, preset_name


def check_train_config(config: TrainConfig, model_config) -> None:
    choices = {"dtype": tuple(DTYPES), "lr_schedule": ("constant", "cosine"), "device": ("auto", "cpu", "cuda"),
               "loss": ("auto",) + LOSSES[config.task], "render_on": ("auto", "device", "workers")}
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise SystemExit(f"--{name} {getattr(config, name)!r}: expected one of {', '.join(valid)}")
    for name in ("max_steps", "batch_size", "global_batch", "log_interval", "eval_batch_size",
                 "checkpoint_interval"):
        if getattr(config, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.num_workers < -1:
        raise SystemExit(f"--num_workers must be -1 (automatic) or at least 0, got {config.num_workers}")
    if config.rir_cache_megabytes < 0:
        raise SystemExit(f"--rir_cache_megabytes must be at least 0, got {config.rir_cache_megabytes}")
    if config.task == "separation" and resolve_loss(config, model_config) == "snr" and model_config.num_slots != 1:
        raise SystemExit("--loss snr trains a single-query separator: set --separator.num_slots 1")
    if config.init_optimizer and not config.init_from:
        raise SystemExit("--init_optimizer (on in the *_2blks presets) continues the optimizer of an earlier stage: "
                         "pass --init_from with that run's last.pt (e.g. runs/tagging_m2dat_1c/last.pt), or "
                         "--no-init_optimizer to start with a fresh optimizer")
    if config.init_non_strict and not config.init_from:
        raise SystemExit("--init_non_strict applies to --init_from, which is not set")


def resolve_loss(config: TrainConfig, model_config) -> str:
    if config.loss != "auto":
        return config.loss
    if config.task == "tagging":
        return "binary_cross_entropy" if model_config.head == "linear" else "pit_cross_entropy"
    return "snr" if model_config.num_slots == 1 else "class_aware_pit_snr"


# ----------------------------------------------------------------------------------------------------------
# Helpers: model and optimizer, learning rate, loss, validation, log values
# ----------------------------------------------------------------------------------------------------------
def freeze_unused_parameters(model: torch.nn.Module, task: str) -> list[str]:
    """Freeze the trainable parameters that a forward/backward pass never reaches and return their names.

    The official separator owns decoder `beta2` FiLM layers and decoder `bn2` layers that its forward never uses
    (official resunet_mod.py); Lightning ran DDP with find_unused_parameters=True for them, costing an extra graph
    traversal every step. They can never receive a gradient, so AdamW never changes them: freezing them is
    numerically the same, keeps their keys in the checkpoint, and lets plain DDP run. A one-second probe
    (eval mode, so no BatchNorm statistics change) finds them without hard-coding names.
    """
    was_training = model.training
    model.eval()
    mixture = torch.randn(1, 4, SAMPLE_RATE)  # (B, C, L)
    if task == "tagging":
        output = model(mixture)
    else:
        output = model(mixture, torch.eye(len(LABELS))[None, :3])  # (B, 3, 18) three non-silent queries
    output.float().square().sum().backward()
    unused = [name for name, parameter in model.named_parameters()
              if parameter.requires_grad and parameter.grad is None]
    for name, parameter in model.named_parameters():
        parameter.grad = None
        if name in unused:
            parameter.requires_grad_(False)
    model.train(was_training)
    return unused


def setup_model(cli, config: TrainConfig, model_config, device: torch.device, world_size: int, say) -> tuple:
    """Build the model, load last.pt (--resume) or --init_from, freeze what never gets a gradient, move it to the
    device and build fused AdamW and the GradScaler with their saved state.

    -> (config with the lr in force, model, optimizer, scaler, step, best validation loss, frozen names)."""
    kind = MODEL_SECTION[config.task]
    try:
        model = build_tagger(model_config) if kind == "tagger" else build_separator(model_config)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot build the {kind}: {error}\n(the official taggers start from the M2D weight file, "
                         "see the README; --tagger.m2d_weights '' starts from random weights)")
    checkpoint, optimizer_state = None, None
    if cli.resume:
        last_path = Path(config.out_dir) / "last.pt"
        try:
            checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            raise SystemExit(f"--resume {last_path}: cannot read it ({type(error).__name__}: {error})")
        difference = config_differences(checkpoint["model_config"], model_config, kind)
        if difference:
            raise SystemExit(f"--resume {last_path}: {difference}")
        load_weights(model, checkpoint["model"], f"--resume {last_path}", False, say)
        optimizer_state = checkpoint["optimizer"]
    elif config.init_from:
        saved_config, weights, saved_optimizer, saved_names = read_initial_checkpoint(config.init_from, kind, model)
        difference = config_differences(saved_config, model_config, kind) if saved_config is not None else ""
        if difference:
            raise SystemExit(f"--init_from {config.init_from}: {difference}")
        load_weights(model, weights, f"--init_from {config.init_from}", config.init_non_strict, say)
        if config.init_optimizer:
            if saved_optimizer is None or saved_names is None:
                raise SystemExit(f"--init_optimizer: {config.init_from} holds no optimizer state (best.pt keeps the "
                                 "weights only): use the run's last.pt, or --no-init_optimizer")
            optimizer_state = map_optimizer_state(saved_optimizer, saved_names, model, config.init_from)
            saved_lr = saved_optimizer["param_groups"][0]["lr"]
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
    step, best_loss = 0, math.inf
    if checkpoint is not None:
        scaler.load_state_dict(checkpoint["scaler"])
        step, best_loss = checkpoint["step"], checkpoint["best_metric"]
        set_rng_states(checkpoint["rng"])  # after the probe pass of freeze_unused_parameters, which draws numbers
    return config, model, optimizer, scaler, step, best_loss, unused


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def compute_loss(model, batch: dict, loss_name: str, generator: torch.Generator | None = None) -> tuple:
    """(loss, model output) of one batch; the loss is a float64 scalar (metrics.py computes it in float64).

    For the 2025 single-query ResUNet ('snr'), training picks one non-silent slot per mixture at random from
    `generator` (the official 2025 one-label training); validation (generator None) scores every non-silent slot
    instead.
    """
    if loss_name not in sum(LOSSES.values(), ()):
        raise ValueError(f"unknown loss {loss_name!r}; expected one of {', '.join(sum(LOSSES.values(), ()))}")
    mixture = batch["mixture"]  # (B, 4, L)
    if loss_name == "pit_cross_entropy":
        logits = model(mixture).float()  # (B, 3, 19)
        return pit_cross_entropy(logits, batch["label_vector"])[0], logits
    if loss_name == "binary_cross_entropy":
        logits = model(mixture).float()  # (B, 18)
        return binary_cross_entropy(logits.sigmoid(), batch["label_vector"]), logits
    queries, targets = batch["label_vector"], batch["dry_sources"][:, :, 0]  # (B, 3, 18), (B, 3, L)
    active = (queries != 0).any(-1)  # (B, 3)
    if loss_name == "snr" and generator is not None:
        slot = torch.multinomial(active.float().cpu(), 1, generator=generator).to(mixture.device)  # (B, 1)
        query = queries.gather(1, slot[:, :, None].expand(-1, -1, queries.shape[-1]))  # (B, 1, 18)
        target = targets.gather(1, slot[:, :, None].expand(-1, -1, targets.shape[-1]))  # (B, 1, L)
        preds = model(mixture, query).float()  # (B, 1, L)
        return snr_loss(preds[:, 0], target[:, 0]), preds
    preds = model(mixture, queries).float()  # (B, 3, L)
    if loss_name == "class_aware_pit_snr":
        return class_aware_pit_snr_loss(preds, targets, queries)[0], preds
    if loss_name == "snr_masked":
        return masked_snr_loss(preds, targets, active), preds
    return -snr(preds.double(), targets.double())[active].mean(), preds  # 'snr' validation: every real source


@torch.no_grad()
def validate(model, loader, config: TrainConfig, loss_name: str, device, autocast, world_size: int,
             stop=None) -> dict:
    """Validation loss over this rank's share of valid.json, plus CAPI-SDRi with oracle labels (separation) or
    the label accuracies (tagging; the labels come from the logits of the loss, by the tagger's predict rule); the
    per-mixture records of all ranks are gathered before averaging. A stop request (StopRequest) ends it after the
    current batch: the result then covers fewer mixtures."""
    model.eval()
    records = []  # (loss, mixtures) per batch and per-mixture scores
    scores = []
    for batch in loader:  # already on the device
        with autocast:
            loss, estimated = compute_loss(model, batch, loss_name)  # separation: estimated [B, 3, L]
        if config.task == "tagging":
            estimated = model.labels_from_logits(estimated)[0]  # labels, 3 per mixture
        records.append((loss.item(), len(batch["label"])))
        for b, labels in enumerate(batch["label"]):
            if config.task == "tagging":
                scores.append(label_counts(estimated[b], labels))
            else:
                scores.append(capi_sdri(labels, estimated[b].cpu(), labels, batch["dry_sources"][b, :, 0].cpu(),
                                        batch["mixture"][b, 0].cpu()))
        if stop is not None and stop.requested:
            break
    model.train()
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (records, scores))
        records = [record for part in gathered for record in part[0]]
        scores = [score for part in gathered for score in part[1]]
    result = {"loss": sum(loss * count for loss, count in records) / sum(count for _, count in records),
              "mixtures": sum(count for _, count in records)}
    if config.task == "tagging":
        result["accuracy_mix"], result["accuracy_src"] = label_accuracies(scores)
    else:
        counted = [score for score in scores if score is not None]
        result["capi_sdri"] = sum(counted) / len(counted) if counted else float("nan")
    return result


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak RSS


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def timed(iterable, totals: dict, key: str):
    """Yield the items of iterable, adding the seconds spent waiting for each one to totals[key]."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        totals[key] += time.perf_counter() - start
        yield item


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    cli, config, model_config, scene, preset = resolve_config(argv)
    rank, local_rank, world_size, device = setup_distributed(config.device)
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        train(cli, config, model_config, scene, preset, rank, local_rank, world_size, device)
        if world_size > 1:  # no rank exits, or tears the process group down, before rank 0 has saved
            dist.barrier()
    finally:
        for signum, handler in handlers.items():  # train() installs its own; a caller gets its handlers back
            signal.signal(signum, handler)
        if world_size > 1:
            # DDP sits in reference cycles: free it (and the gloo work it holds) now, not during interpreter
            # shutdown, where releasing that work can abort the process.
            gc.collect()
            dist.destroy_process_group()


def train(cli, config: TrainConfig, model_config, scene: SceneConfig, preset: str, rank: int, local_rank: int,
          world_size: int, device: torch.device) -> None:
    master = rank == 0
    say = print if master else (lambda *args, **kwargs: None)
    stop = StopRequest(announce=master)  # from here on a signal is a request to stop, agreed by all ranks
    stop.install()
    tagging = config.task == "tagging"
    kind = MODEL_SECTION[config.task]  # 'tagger' or 'separator': checkpoint kind and config section
    batch_size, accumulation = split_batch(config.global_batch, world_size, config.batch_size,
                                           exact="train.batch_size" in vars(cli))
    config = dataclasses.replace(config, batch_size=batch_size)
    loss_name = resolve_loss(config, model_config)
    data_root, out_dir = Path(config.data_root), Path(config.out_dir)
    last_path, best_path, log_path = out_dir / "last.pt", out_dir / "best.pt", out_dir / "log.jsonl"
    check_data_root(data_root, scene)
    if cli.resume and not last_path.is_file():
        raise SystemExit(f"--resume: {last_path} does not exist (nothing to continue)")
    if not cli.resume and last_path.exists():
        raise SystemExit(f"{out_dir} already holds a run ({last_path}); pass --resume to continue it or choose "
                         "another --out_dir")
    if preset.endswith("2blks") and not config.init_from and not cli.resume:
        say(f"warning: preset {preset} is the second tagger stage; without --init_from it starts from the "
            "M2D weights and a fresh head")
    if device.type == "cpu" and config.dtype == "bf16" and cpu_has_native_bf16() is False:
        say("warning: --dtype bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and several times "
            "slower than fp32 here; `python model.py --bench --device cpu` compares the two")
    if device.type == "cpu":  # keep freed activations mapped: page faults cost ~20 % of a CPU step
        keep_heap_memory(CPU_HEAP_KEEP_MEGABYTES)
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
        train_model = DistributedDataParallel(train_model, device_ids=[local_rank] if synced else None,
                                              gradient_as_bucket_view=True, broadcast_buffers=not synced)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    autocast = torch.autocast(device.type, dtype=DTYPES[config.dtype], enabled=config.dtype != "fp32")

    # Data: an endless stream of generated scenes indexed by step, and the fixed metadata validation set. Loader
    # workers read the scenes; they render them too (--render_on workers), or device_batch renders each batch on
    # the training device, only the channels and targets the task uses.
    render_on = config.render_on if config.render_on != "auto" else "device" if device.type == "cuda" else "workers"
    workers = config.num_workers if config.num_workers >= 0 else default_num_workers()
    cache = config.spectrum_cache_dir or None
    if cache:  # checked here: the workers and the training step would fail on it mid-run
        try:
            Path(cache).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SystemExit(f"--spectrum_cache_dir {cache}: cannot create the folder ({error.strerror})")
        if not os.access(cache, os.W_OK | os.X_OK):
            raise SystemExit(f"--spectrum_cache_dir {cache}: not writable")
    options = dict(label_modes(config.task, model_config), spectrum_cache_dir=cache, render=render_on == "workers",
                   num_channels=mixture_channels(config.task, model_config))
    sampler = StepBatches(step, config.max_steps, accumulation, rank, world_size, config.batch_size)
    try:
        train_set = GeneratedDataset(data_root, scene, length=config.max_steps * config.global_batch,
                                     seed=config.seed, **options)
        valid_set = MetadataDataset(data_root / "metadata" / "valid.json", data_root=data_root, **options)
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"data root {data_root}: {error}\n{DATA_HINT}")
    valid_count = min(len(valid_set), config.eval_mixtures or len(valid_set))
    valid_set = torch.utils.data.Subset(valid_set, range(rank, valid_count, world_size))
    device_batch = BatchRenderer(device, config.rir_cache_megabytes, cache)
    train_loader = make_loader(train_set, workers, config, device, True, batch_sampler=sampler)
    valid_loader = ValidationSet(make_loader(valid_set, min(workers, 2), config, device, False,
                                             batch_size=config.eval_batch_size),
                                 device, len(valid_set), config.eval_batch_size, out_dir, cache)

    # Run folder, resolved configuration and start-up summary.
    record = {"preset": preset, "train": dataclasses.asdict(config), kind: dataclasses.asdict(model_config),
              "scene": dataclasses.asdict(scene)}
    if not cli.resume:
        check_config_json(out_dir, record)
    version = code_version()
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    total = sum(parameter.numel() for parameter in model.parameters())
    say(f"{config.task} | preset {preset} | loss {loss_name} | {kind} {total / 1e6:.2f} M parameters, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable | device {device} x {world_size} | "
        f"dtype {config.dtype}{' | TF32 matmuls' if config.tf32 else ''}{' | compiled' if config.compile else ''}")
    say(f"global batch {config.global_batch} = batch {config.batch_size} x world size {world_size} x "
        f"accumulation {accumulation} | steps {step} -> {config.max_steps} | {valid_count} validation mixtures | "
        f"out_dir {out_dir}")
    if render_on == "device":
        rooms = train_set.index.rooms
        needed = spectra_megabytes(rooms, scene.duration, options["num_channels"], options["return_sources"])
        say(f"data: {workers} loader workers per rank read the scenes, {device} renders them; the RIR spectra of all "
            f"{sum(room.num_positions for room in rooms)} training positions take {needed:.0f} MB of "
            f"--rir_cache_megabytes {config.rir_cache_megabytes}" + ("" if needed <= config.rir_cache_megabytes else
                                                                   " (too small: misses are read from the SOFA "
                                                                   "files in the training process)"))
    else:
        say(f"data: {workers} loader workers per rank read and render the scenes")
    norm_batch = config.batch_size * (world_size if synced else 1)  # mixtures one BatchNorm layer sees at once
    if norm_batch < config.global_batch:
        say(f"warning: BatchNorm normalises over {norm_batch} mixtures ({'all ranks' if synced else 'per device'}), "
            f"not over the global batch of {config.global_batch} as in the official runs (SyncBatchNorm over 4 "
            "GPUs, no accumulation); see 'BatchNorm under accumulation' in the README")
    if unused:
        say(f"{len(unused)} parameter tensors never get a gradient and are frozen (no find_unused_parameters): "
            f"{', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")

    def log(entry: dict) -> None:
        if master:
            with open(log_path, "a") as file:
                file.write(json.dumps(entry) + "\n")

    def save(path: Path, full: bool) -> None:
        """last.pt (full): everything --resume needs; best.pt: what evaluation and --init_from read."""
        if not master:
            return
        state = {"kind": kind, "model_config": dataclasses.asdict(model_config), "model": model.state_dict(),
                 "config": record, "step": step, "best_metric": best_loss, "code_version": version,
                 "torch_version": torch.__version__, "world_size": world_size}
        if full:
            state |= {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "rng": rng_states(),
                      "parameter_names": [name for name, _ in model.named_parameters()]}  # in the optimizer's order
        save_checkpoint(path, state)

    log({"event": "start", "task": config.task, "preset": preset, "step": step, "world_size": world_size,
         "batch_size": config.batch_size, "accumulation": accumulation, "device": str(device),
         "code_version": version, "torch_version": torch.__version__, "python_version": sys.version.split()[0]})
    if cli.resume:
        scene_number = step * config.global_batch  # the first scene of step `step` (StepBatches numbering)
        say(f"resumed from {last_path} at step {step}; the training scenes continue at scene {scene_number}")
        log({"event": "resume", "path": str(last_path), "step": step, "scene": scene_number})
    if step >= config.max_steps:
        say(f"nothing to do: the run is at step {step} and --max_steps is {config.max_steps}")
        return
    if stop.agreed(device, world_size):
        say(f"stopped by {stop.signal_name or 'a signal on another rank'} during start-up: nothing was trained"
            f"{f'; {last_path} still holds step {step}' if cli.resume else ''}")
        return

    # Training loop. The step status (loss, non-finite values, stop request) stays on the device and is read by
    # all ranks together only when status.due(step): see StepStatus.
    train_model.train()
    waits = {"data": 0.0}  # seconds the loop waited for batches
    batches = timed(train_loader, waits, "data")
    status = StepStatus(config, device, world_size, step, check_gradients=not scaler.is_enabled())
    window = {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "seconds": 0.0}
    saved_step = step if cli.resume else None
    while step < config.max_steps:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro_step in range(accumulation):
            batch = device_batch(next(batches))  # on the device, rendered
            generator = None
            if loss_name == "snr":  # the 2025 single-query draw, a function of the scene number like the data
                generator = torch.Generator().manual_seed(config.seed + sampler.first_index(step, micro_step))
            last_micro_step = micro_step == accumulation - 1
            with nullcontext() if world_size == 1 or last_micro_step else train_model.no_sync():
                with autocast:
                    loss = compute_loss(train_model, batch, loss_name, generator)[0]
                scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
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
            raise SystemExit(f"steps {step - report['steps'] + 1}-{step}: the training loss or gradient is not "
                             f"finite; stopping ({kept}). Try a lower --lr, --dtype fp32, or check the data with "
                             "`python data_prep.py verify`.")
        for key in ("steps", "loss", "grad_norm", "seconds"):
            window[key] += report[key]
        if step % config.log_interval == 0 or step == config.max_steps or report["stop"]:
            seconds_per_step = window["seconds"] / window["steps"]
            entry = {"event": "train", "step": step, "loss": window["loss"] / window["steps"], "lr": lr,
                     "grad_norm": window["grad_norm"] / window["steps"], "ms_per_step": 1000 * seconds_per_step,
                     "mixtures_per_s": config.global_batch / seconds_per_step,
                     "data_wait": min(1.0, waits["data"] / window["seconds"]), "memory_gb": memory_gb(device),
                     "eta_s": (config.max_steps - step) * seconds_per_step}
            say(f"step {step}/{config.max_steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | grad norm "
                f"{entry['grad_norm']:.3f} | {entry['ms_per_step']:.0f} ms/step | {entry['mixtures_per_s']:.3g} "
                f"mix/s | data wait {100 * entry['data_wait']:.1f}% | mem {entry['memory_gb']:.2f} GB | "
                f"eta {format_seconds(entry['eta_s'])}", flush=True)
            log(entry)
            window, waits["data"] = dict.fromkeys(window, 0.0), 0.0

        stopped = report["stop"]
        if not stopped and (step % config.eval_interval == 0 or step == config.max_steps):
            result = validate(model, valid_loader, config, loss_name, device, autocast, world_size, stop)
            stopped = stop.agreed(device, world_size)  # a stop during validation ends it early on that rank
            if result["mixtures"] == valid_count:
                improved = result["loss"] < best_loss
                best_loss = min(best_loss, result["loss"])
                if improved:
                    save(best_path, full=False)
                metric = (f"CAPI-SDRi {result['capi_sdri']:.2f} dB" if not tagging else
                          f"accuracy mixture {result['accuracy_mix']:.1f}% source {result['accuracy_src']:.1f}%")
                say(f"validation step {step} | loss {result['loss']:.4f} | {metric} | {result['mixtures']} "
                    f"mixtures{' | new best' if improved else ''}", flush=True)
                log({"event": "valid", "step": step, **result, "best_loss": best_loss})
            save(last_path, full=True)
            saved_step = step
        elif stopped or step % config.checkpoint_interval == 0:
            save(last_path, full=True)
            saved_step = step
        if stopped:
            say(f"stopped by {stop.signal_name or 'a signal on another rank'} at step {step}; wrote {last_path}. "
                f"Continue with: python train.py --out_dir {out_dir} --resume", flush=True)
            return
        status.restart_clock()
    say(f"done: {step} steps, best validation loss {best_loss:.4f}; checkpoints in {out_dir}")


if __name__ == "__main__":
    main()
