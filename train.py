"""Train the M2D tagger or the ResUNetK separator: one loop for one process, one GPU or many (torchrun).

    python train.py --task tagging --preset demo             # demo tagger on data/dev_set, a few minutes on CPU
    python train.py --task separation --preset demo          # demo separator
    python train.py --task separation --preset resunetk_capisdr --device cuda --dtype bf16
    torchrun --nproc_per_node=4 train.py --task tagging --preset m2dat_1c
    python train.py --task tagging --preset m2dat_1c_2blks --init_from runs/tagging_m2dat_1c/best.pt
    python train.py --out_dir runs/separation_demo --resume --max_steps 2000   # continue a run exactly
    python train.py --help                                   # every knob, generated from the dataclasses

Configuration precedence: dataclass defaults < --preset (default: the task's official 2026 recipe) <
--config run/config.json (with --resume: the run's own config.json) < command-line flags. The run folder gets
config.json (the resolved configuration), log.jsonl (one JSON line per log step and validation), last.pt and
best.pt (lowest validation loss); both checkpoints load with model.load_tagger / model.load_separator.

Differences from the official Lightning recipe, on purpose:
* Training length is counted in optimizer steps and the scene stream is endless: scene number
  ((step * accumulation + micro_step) * world_size + rank) * batch_size + item, each a pure function of
  (seed, number). This is what makes --resume exact; the official epochs of `dataset_length` generated scenes
  map to `eval_interval` = dataset_length / global_batch steps.
* --init_from loads weights only (fresh AdamW state, the configured lr). The official 2-blocks stage was
  started with Lightning's `-r`, which also restored the head stage's optimizer state and with it lr 1e-3 and
  the AMSGrad moments (SPEC 7.4); to get closer to that, pass --lr 1e-3 as well.
* Parameters that never receive a gradient (the separator's decoder beta2 FiLM layers and decoder bn2) are
  found once with a probe pass and frozen, instead of paying find_unused_parameters on every step.
* SyncBatchNorm needs CUDA; CPU runs under torchrun keep per-rank BatchNorm statistics.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import resource
import shutil
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

from cli import add_config_flags, unknown_flags_message
from metrics import (binary_cross_entropy, capi_sdri, class_aware_pit_snr_loss, label_accuracies, label_counts,
                     masked_snr_loss, pit_cross_entropy, snr, snr_loss)
from model import SeparatorConfig, TaggerConfig, build_separator, build_tagger, load_separator, load_tagger
from synth import (LABELS, SAMPLE_RATE, GeneratedDataset, MetadataDataset, SceneConfig, collate,
                   keep_heap_memory)

TASKS = ("tagging", "separation")
LOSSES = {"tagging": ("pit_cross_entropy", "binary_cross_entropy"),
          "separation": ("class_aware_pit_snr", "snr", "snr_masked")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_HEAP_KEEP_MEGABYTES = 2047  # freed memory a CPU training process keeps for the next step (synth.keep_heap_memory)
M2D_WEIGHTS = "checkpoint/m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly/weights_ep69it3124-0.47998.pth"
DATA_HINT = ("Create the small demo set with `python data_prep.py demo` (writes data/dev_set), or check a full "
             "development set with `python data_prep.py verify --data DIR` and pass it as --data_root DIR.")


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainConfig:
    task: str = "separation"  # 'tagging' (M2D tagger) or 'separation' (ResUNetK separator)
    loss: str = "auto"  # 'auto' (the model's official loss) or a name from LOSSES, e.g. 'snr_masked' (2025)
    data_root: str = "data/dev_set"  # dev_set folder: sound_event/, interference/, noise/, room_ir/, metadata/
    out_dir: str = ""  # run folder; '' = runs/<task>_<preset>
    init_from: str = ""  # checkpoint whose model weights start the run (weights only, ours or official)
    seed: int = 0  # seeds the model initialisation and the scene stream
    max_steps: int = 200_000  # optimizer steps (official separator: unlimited epochs of 632 steps)
    batch_size: int = 4  # mixtures per device and micro-step
    global_batch: int = 16  # mixtures per optimizer step over all devices; sets the gradient accumulation
    lr: float = 1e-4  # peak learning rate
    lr_schedule: str = "constant"  # 'constant' (official) or 'cosine' (decay to min_lr at max_steps)
    warmup_steps: int = 0  # steps of linear warmup from 0 to lr (0 = none, official)
    min_lr: float = 0.0  # final learning rate of the cosine schedule
    weight_decay: float = 0.0  # AdamW decoupled weight decay (official 0)
    grad_clip: float = 0.5  # max 2-norm of all gradients (0 = no clipping; the norm is logged anyway)
    dtype: str = "fp32"  # autocast precision: 'fp32' (official), 'bf16' or 'fp16' (with a GradScaler)
    tf32: bool = True  # TF32 matmuls and convolutions on Ampere+ GPUs (torch enables it for cuDNN convs by default)
    compile: bool = False  # torch.compile the training forward
    device: str = "auto"  # 'cpu', 'cuda' or 'auto' (cuda when available)
    num_workers: int = 2  # DataLoader worker processes per rank that synthesize scenes
    spectrum_cache_dir: str = ""  # folder for RIR spectra shared by workers and runs ('' = off; 8 MB per position)
    prefetch_factor: int = 4  # batches each worker prepares ahead
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 632  # steps between validations (official: once per epoch)
    eval_mixtures: int = 0  # validation mixtures from valid.json (0 = all)
    eval_batch_size: int = 4  # validation mixtures per device and batch
    checkpoint_interval: int = 100  # steps between writes of last.pt (also written at every validation)


SECTIONS = {"train": TrainConfig, "tagger": TaggerConfig, "separator": SeparatorConfig, "scene": SceneConfig}
MODEL_SECTION = {"tagging": "tagger", "separation": "separator"}

# Official recipes (SPEC 7.4). global_batch = GPUs x batch/GPU; eval_interval = dataset_length / global_batch,
# i.e. one validation per official epoch; max_steps = max_epochs x eval_interval where the official run was
# bounded, otherwise a generous budget (the official runs were stopped by hand).
TAGGER_2026 = dict(batch_size=32, global_batch=128, lr=1e-3, eval_interval=196, eval_batch_size=16)
TAGGER_2BLKS = dict(batch_size=32, global_batch=128, lr=1e-5, max_steps=5000, eval_interval=5, eval_batch_size=16)
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
    # Small models from scratch for the procedural demo set, a few minutes each on 2 CPU cores (README). The
    # separator trains on 3 s clips with a coarser STFT (512 / 256): its cost is dominated by full-resolution
    # spectrogram layers, not by the width. Validation stays on the 10 s valid.json mixtures.
    "demo": {"tagging": dict(train=dict(batch_size=16, global_batch=16, lr=1e-3, max_steps=300, eval_interval=100,
                                        eval_batch_size=16, checkpoint_interval=50),
                             tagger=dict(finetuning="all", m2d_weights="", embed_dim=192, depth=4, num_heads=3),
                             scene=dict(nevent_range=(0, 3))),
             "separation": dict(train=dict(batch_size=4, global_batch=4, lr=1e-3, max_steps=300, eval_interval=150,
                                           checkpoint_interval=50),
                                separator=dict(base_channels=16, n_fft=512, hop_length=256),
                                scene=dict(duration=3.0))},
}
OFFICIAL_PRESET = {"tagging": "m2dat_1c", "separation": "resunetk_capisdr"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--preset", help=f"named recipe: {', '.join(PRESETS)} (default: the task's official one)")
    parser.add_argument("--config", help="a run's config.json; its values override the preset")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its last.pt")
    for section, cls in SECTIONS.items():
        # TrainConfig fields are plain flags (--lr); the others carry their section (--separator.base_channels).
        group = parser.add_argument_group(cls.__name__ if section == "train" else
                                          f"{cls.__name__} (--{section}.* flags)")
        add_config_flags(group, cls, prefix="" if section == "train" else f"{section}.",
                         dest_prefix=f"{section}.", layered=True)
    return parser


def merge_section(values: dict, overrides: dict, section: str, origin: str) -> None:
    """Apply overrides to one section's values in place; unknown keys are errors naming the valid ones."""
    for key, value in overrides.items():
        if key not in values:
            raise SystemExit(f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(values)}")
        values[key] = tuple(value) if isinstance(values[key], tuple) and isinstance(value, list) else value


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
            raise SystemExit(f"--config {config_path}: cannot read a JSON run configuration ({error})")
        unknown_sections = set(file_values) - set(SECTIONS) - {"preset"}
        if unknown_sections:
            raise SystemExit(f"{config_path}: unknown sections {sorted(unknown_sections)}; valid: preset, "
                             f"{', '.join(SECTIONS)}")

    # The task decides which preset recipe and which model section apply.
    preset_name = cli.preset or file_values.get("preset")
    task = flags["train"].get("task") or file_values.get("train", {}).get("task")
    if preset_name is not None and preset_name not in PRESETS:
        raise SystemExit(f"unknown preset {preset_name!r}; valid presets: {', '.join(PRESETS)}")
    if task is None:
        task = next(iter(PRESETS[preset_name])) if preset_name and len(PRESETS[preset_name]) == 1 else "separation"
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

    values = {section: dataclasses.asdict(cls()) for section, cls in SECTIONS.items()}
    for origin, layer in ((f"preset {preset_name}", PRESETS[preset_name][task]), (config_path, file_values),
                          ("flags", flags)):
        for section, overrides in layer.items():
            if section in SECTIONS:
                merge_section(values[section], overrides, section, origin)
    values["train"]["task"] = task
    if not values["train"]["out_dir"]:
        values["train"]["out_dir"] = f"runs/{task}_{preset_name}"
    try:
        train = TrainConfig(**values["train"])
        model = SECTIONS[model_section](**values[model_section])
        scene = SceneConfig(**values["scene"])
    except (TypeError, ValueError) as error:
        raise SystemExit(f"invalid configuration: {error}")
    check_train_config(train, model)
    return cli, train, model, scene, preset_name


def check_train_config(config: TrainConfig, model_config) -> None:
    choices = {"dtype": tuple(DTYPES), "lr_schedule": ("constant", "cosine"), "device": ("auto", "cpu", "cuda"),
               "loss": ("auto",) + LOSSES[config.task]}
    for name, valid in choices.items():
        if getattr(config, name) not in valid:
            raise SystemExit(f"--{name} {getattr(config, name)!r}: expected one of {', '.join(valid)}")
    for name in ("max_steps", "batch_size", "global_batch", "log_interval", "eval_batch_size",
                 "checkpoint_interval"):
        if getattr(config, name) < 1:
            raise SystemExit(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.task == "separation" and resolve_loss(config, model_config) == "snr" and model_config.num_slots != 1:
        raise SystemExit("--loss snr trains a single-query separator: set --separator.num_slots 1")


def resolve_loss(config: TrainConfig, model_config) -> str:
    if config.loss != "auto":
        return config.loss
    if config.task == "tagging":
        return "binary_cross_entropy" if model_config.head == "linear" else "pit_cross_entropy"
    return "snr" if model_config.num_slots == 1 else "class_aware_pit_snr"


# ----------------------------------------------------------------------------------------------------------
# Helpers: distributed set-up, data, model, loss
# ----------------------------------------------------------------------------------------------------------
def setup_distributed(device_name: str) -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    rank, local_rank, world_size = (int(os.environ.get(name, default)) for name, default in
                                    (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    return rank, local_rank, world_size, device


def check_data_root(root: Path, scene: SceneConfig) -> None:
    """Fail early, with the commands that fix it, when the dev set lacks what training reads: the train folders of
    the official layout (sound_event/train/<Label>, noise/train, room_ir/train/*.sofa, interference/train) and
    metadata/valid.json."""
    needed = ["sound_event/train", "noise/train", "room_ir/train", "metadata/valid.json"]
    if max(scene.interference_range) > 0:
        needed.append("interference/train")
    problems = []
    for name in needed:
        if not (root / name).exists():
            unsplit = name.endswith("/train") and (root / name.split("/")[0]).is_dir()
            problems.append(f"{root / name} is missing" + (" (the official layout splits each source folder into "
                                                           "train/ and valid/)" if unsplit else ""))
    if not problems:
        if not any((root / "room_ir" / "train").rglob("*.sofa")):
            problems.append(f"{root / 'room_ir/train'} holds no .sofa room files")
        missing = [label for label in LABELS if not (root / "sound_event" / "train" / label).is_dir()]
        if missing:
            problems.append(f"{root / 'sound_event/train'} lacks the class folders {', '.join(missing)}")
        if max(scene.interference_range) > 0 and not any(path.is_dir() for path in
                                                         (root / "interference" / "train").iterdir()):
            problems.append(f"{root / 'interference/train'} holds no class folders (scene.interference_range "
                            f"{scene.interference_range}; `python data_prep.py add-data` adds them)")
        try:
            entries = json.loads((root / "metadata" / "valid.json").read_text())
            assert isinstance(entries, list) and entries
        except (OSError, ValueError, AssertionError):
            problems.append(f"{root / 'metadata/valid.json'} is not a non-empty JSON list of metadata entries")
    if problems:
        raise SystemExit(f"data root {root} is not a usable dev_set: {'; '.join(problems)}.\n{DATA_HINT}")


def label_modes(task: str, model_config) -> dict:
    """Label vector layout the task's loss expects (SPEC 2.6): tagger [3, 19] (or 2025 multi-hot [18]),
    separator queries [3, 18] with all-zero silence rows."""
    if task == "tagging" and model_config.head == "avg_linear":
        return dict(label_vector_mode="stack", silence_label_mode="onehot", return_sources=False)
    if task == "tagging":
        return dict(label_vector_mode="multihot", silence_label_mode="zeros", return_sources=False)
    return dict(label_vector_mode="stack", silence_label_mode="zeros", return_sources=True)


class StepBatches(torch.utils.data.Sampler):
    """Scene numbers of every micro-batch this rank trains on from `start_step` to `max_steps`.

    The number is a function of (step, micro-step, rank, item) only, so each rank and worker draws distinct
    scenes, and a resumed run continues with exactly the scenes the uninterrupted run would have seen.
    """

    def __init__(self, start_step: int, max_steps: int, accumulation: int, rank: int, world_size: int,
                 batch_size: int):
        self.start_step, self.max_steps, self.accumulation = start_step, max_steps, accumulation
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def first_index(self, step: int, micro_step: int) -> int:
        return ((step * self.accumulation + micro_step) * self.world_size + self.rank) * self.batch_size

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            for micro_step in range(self.accumulation):
                first = self.first_index(step, micro_step)
                yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.accumulation


def ignore_signals_in_worker(worker_id: int) -> None:
    """Ctrl-C and SIGTERM are handled by the main process, which shuts the workers down after saving."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, workers: int, config: TrainConfig, device: torch.device, persistent: bool,
                **options) -> torch.utils.data.DataLoader:
    """Worker processes synthesize batches ahead (prefetch) so that the step does not wait for data."""
    parallel = dict(num_workers=workers, prefetch_factor=config.prefetch_factor, persistent_workers=persistent,
                    worker_init_fn=ignore_signals_in_worker) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, collate_fn=collate, pin_memory=device.type == "cuda", **parallel,
                                       **options)


def freeze_unused_parameters(model: torch.nn.Module, task: str) -> list[str]:
    """Freeze the trainable parameters that a forward/backward pass never reaches and return their names.

    The official separator owns decoder `beta2` FiLM layers and decoder `bn2` layers that its forward never uses
    (SPEC 3.3-3.4); Lightning ran DDP with find_unused_parameters=True for them, which costs an extra graph
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
    `generator` (SPEC 4.4); validation (generator None) scores every non-silent slot instead.
    """
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


def to_device(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


@torch.no_grad()
def validate(model, loader, config: TrainConfig, loss_name: str, device, autocast, world_size: int) -> dict:
    """Validation loss over this rank's share of valid.json, plus CAPI-SDRi with oracle labels (separation) or
    the label accuracies (tagging); the per-mixture records of all ranks are gathered before averaging."""
    model.eval()
    records = []  # (loss, mixtures) per batch and per-mixture scores
    scores = []
    for batch in loader:
        batch = to_device(batch, device)
        with autocast:
            loss, estimated = compute_loss(model, batch, loss_name)  # separation: estimated [B, 3, L]
            if config.task == "tagging":
                estimated = model.predict(batch["mixture"])[0]  # labels, 3 per mixture
        records.append((loss.item(), len(batch["label"])))
        for b, labels in enumerate(batch["label"]):
            if config.task == "tagging":
                scores.append(label_counts(estimated[b], labels))
            else:
                scores.append(capi_sdri(labels, estimated[b].cpu(), labels, batch["dry_sources"][b, :, 0].cpu(),
                                        batch["mixture"][b, 0].cpu()))
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


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
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


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB: peak RSS


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    cli, config, model_config, scene, preset = resolve_config(argv)
    rank, local_rank, world_size, device = setup_distributed(config.device)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        train(cli, config, model_config, scene, preset, rank, local_rank, world_size, device)
        if world_size > 1:  # no rank tears the process group down while another still uses it
            dist.barrier()
    finally:
        for signum, handler in handlers.items():  # train() installs its own; a caller gets its handlers back
            signal.signal(signum, handler)
        if world_size > 1:
            dist.destroy_process_group()


def train(cli, config: TrainConfig, model_config, scene: SceneConfig, preset: str, rank: int, local_rank: int,
          world_size: int, device: torch.device) -> None:
    master = rank == 0
    say = print if master else (lambda *args, **kwargs: None)
    tagging = config.task == "tagging"
    kind = MODEL_SECTION[config.task]  # 'tagger' or 'separator': checkpoint kind and config section
    accumulation, remainder = divmod(config.global_batch, config.batch_size * world_size)
    if remainder or not accumulation:
        raise SystemExit(f"--global_batch {config.global_batch} must be a multiple of --batch_size "
                         f"{config.batch_size} x world size {world_size} = {config.batch_size * world_size}")
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
    if device.type == "cpu":  # keep freed activations mapped: page faults cost ~20 % of a CPU step
        keep_heap_memory(CPU_HEAP_KEEP_MEGABYTES)
    torch.backends.cuda.matmul.allow_tf32 = config.tf32
    torch.backends.cudnn.allow_tf32 = config.tf32
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)

    # Model: build, load weights, freeze the parameters no gradient reaches, move, wrap.
    try:
        model = build_tagger(model_config) if tagging else build_separator(model_config)
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot build the {kind}: {error}\n(the official taggers start from the M2D weight file, "
                         "see the README; --tagger.m2d_weights '' starts from random weights)")
    if config.init_from and not cli.resume:
        try:
            source = (load_tagger if tagging else load_separator)(config.init_from)
            model.load_state_dict(source.state_dict())
        except (OSError, ValueError, RuntimeError) as error:
            raise SystemExit(f"--init_from {config.init_from}: {error}")
    checkpoint = torch.load(last_path, map_location="cpu", weights_only=False) if cli.resume else None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    unused = freeze_unused_parameters(model, config.task)
    model.to(device)
    if world_size > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # official sync_batchnorm True
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=config.weight_decay, amsgrad=True)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")
    step, best_loss = 0, math.inf
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        step, best_loss = checkpoint["step"], checkpoint["best_metric"]
        set_rng_states(checkpoint["rng"])
        del checkpoint
    train_model = torch.compile(model) if config.compile else model
    if world_size > 1:
        train_model = DistributedDataParallel(train_model, device_ids=[local_rank] if device.type == "cuda" else None)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    autocast = torch.autocast(device.type, dtype=DTYPES[config.dtype], enabled=config.dtype != "fp32")

    # Data: an endless stream of generated scenes indexed by step, and the fixed metadata validation set.
    modes = label_modes(config.task, model_config)
    sampler = StepBatches(step, config.max_steps, accumulation, rank, world_size, config.batch_size)
    try:
        cache = config.spectrum_cache_dir or None
        train_set = GeneratedDataset(data_root, scene, length=config.max_steps * config.global_batch,
                                     seed=config.seed, spectrum_cache_dir=cache, **modes)
        valid_set = MetadataDataset(data_root / "metadata" / "valid.json", data_root=data_root,
                                    spectrum_cache_dir=cache, **modes)
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"data root {data_root}: {error}\n{DATA_HINT}")
    valid_count = min(len(valid_set), config.eval_mixtures or len(valid_set))
    valid_set = torch.utils.data.Subset(valid_set, range(rank, valid_count, world_size))
    train_loader = make_loader(train_set, config.num_workers, config, device, True, batch_sampler=sampler)
    valid_loader = make_loader(valid_set, min(config.num_workers, 2), config, device, False,
                               batch_size=config.eval_batch_size)

    # Run folder, resolved configuration and start-up summary.
    record = {"preset": preset, "train": dataclasses.asdict(config), kind: dataclasses.asdict(model_config),
              "scene": dataclasses.asdict(scene)}
    version = code_version()
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    total = sum(parameter.numel() for parameter in model.parameters())
    say(f"{config.task} | preset {preset} | loss {loss_name} | {kind} {total / 1e6:.2f} M parameters, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable | device {device} x {world_size} | "
        f"dtype {config.dtype}{' | compiled' if config.compile else ''}")
    say(f"global batch {config.global_batch} = batch {config.batch_size} x world size {world_size} x "
        f"accumulation {accumulation} | steps {step} -> {config.max_steps} | {valid_count} validation mixtures | "
        f"out_dir {out_dir}")
    if unused:
        say(f"{len(unused)} parameter tensors never get a gradient and are frozen (no find_unused_parameters): "
            f"{', '.join(unused[:4])}{', ...' if len(unused) > 4 else ''}")
    if world_size > 1 and device.type != "cuda":
        say("note: SyncBatchNorm needs CUDA; on CPU each rank normalises with its own batch statistics")

    def log(entry: dict) -> None:
        if master:
            with open(log_path, "a") as file:
                file.write(json.dumps(entry) + "\n")

    def save(path: Path) -> None:
        if master:
            save_checkpoint(path, {
                "kind": kind, "model_config": dataclasses.asdict(model_config), "model": model.state_dict(),
                "config": record, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "rng": rng_states(), "best_metric": best_loss, "code_version": version,
                "torch_version": torch.__version__, "world_size": world_size})

    log({"event": "start", "step": step, "world_size": world_size, "accumulation": accumulation,
         "device": str(device), "code_version": version, "torch_version": torch.__version__,
         "python_version": sys.version.split()[0]})
    if step >= config.max_steps:
        say(f"nothing to do: the run is at step {step} and --max_steps is {config.max_steps}")
        return

    # SIGTERM / SIGINT set a flag; all ranks agree on it at the end of a step, save last.pt and exit cleanly.
    stop_request = []

    def request_stop(signum, frame):
        if stop_request:
            raise KeyboardInterrupt  # a second signal interrupts at once
        stop_request.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    # Training loop.
    train_model.train()
    batches = iter(train_loader)
    window = {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "seconds": 0.0, "wait": 0.0}
    saved_step = step if cli.resume else None
    while step < config.max_steps:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro_step in range(accumulation):
            wait_start = time.perf_counter()
            batch = to_device(next(batches), device)
            window["wait"] += time.perf_counter() - wait_start
            generator = None
            if loss_name == "snr":  # the 2025 single-query draw, a function of the scene number like the data
                generator = torch.Generator().manual_seed(config.seed + sampler.first_index(step, micro_step))
            last_micro_step = micro_step == accumulation - 1
            with nullcontext() if world_size == 1 or last_micro_step else train_model.no_sync():
                with autocast:
                    loss = compute_loss(train_model, batch, loss_name, generator)[0]
                scaler.scale(loss / accumulation).backward()
            loss_sum += loss.detach()
        # One small all-reduce per step: mean loss, non-finite flag and stop request agree on every rank.
        status = torch.stack([loss_sum / accumulation, (~torch.isfinite(loss_sum)).double(),
                              torch.tensor(float(bool(stop_request)), dtype=torch.float64, device=device)])
        if world_size > 1:
            dist.all_reduce(status)
        step_loss, non_finite, stop = status.tolist()
        if non_finite:
            kept = f"the last good checkpoint {last_path} (step {saved_step}) is kept" if saved_step is not None \
                else "no checkpoint was written yet"
            raise SystemExit(f"step {step + 1}: the training loss is not finite; stopping ({kept}). Try a lower "
                             "--lr, --dtype fp32, or check the data with `python data_prep.py verify`.")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window["steps"] += 1
        window["loss"] += step_loss / world_size
        window["grad_norm"] += grad_norm.item()
        window["seconds"] += time.perf_counter() - start

        if step % config.log_interval == 0 or step == config.max_steps or stop:
            seconds_per_step = window["seconds"] / window["steps"]
            entry = {"event": "train", "step": step, "loss": window["loss"] / window["steps"], "lr": lr,
                     "grad_norm": window["grad_norm"] / window["steps"], "ms_per_step": 1000 * seconds_per_step,
                     "mixtures_per_s": config.global_batch / seconds_per_step,
                     "data_wait": window["wait"] / window["seconds"], "memory_gb": memory_gb(device),
                     "eta_s": (config.max_steps - step) * seconds_per_step}
            say(f"step {step}/{config.max_steps} | loss {entry['loss']:.4f} | lr {lr:.2e} | grad norm "
                f"{entry['grad_norm']:.3f} | {entry['ms_per_step']:.0f} ms/step | {entry['mixtures_per_s']:.3g} "
                f"mix/s | data wait {100 * entry['data_wait']:.1f}% | mem {entry['memory_gb']:.2f} GB | "
                f"eta {format_seconds(entry['eta_s'])}", flush=True)
            log(entry)
            window = dict.fromkeys(window, 0.0) | {"steps": 0}

        if stop:
            save(last_path)
            say(f"stopped by a signal at step {step}; wrote {last_path}. Continue with: python train.py "
                f"--out_dir {out_dir} --resume", flush=True)
            return
        if step % config.eval_interval == 0 or step == config.max_steps:
            result = validate(model, valid_loader, config, loss_name, device, autocast, world_size)
            improved = result["loss"] < best_loss
            best_loss = min(best_loss, result["loss"])
            save(last_path)
            if improved and master:  # best.pt = this last.pt, copied and renamed atomically
                shutil.copyfile(last_path, best_path.with_name(best_path.name + ".tmp"))
                os.replace(best_path.with_name(best_path.name + ".tmp"), best_path)
            saved_step = step
            metric = (f"CAPI-SDRi {result['capi_sdri']:.2f} dB" if not tagging else
                      f"accuracy mixture {result['accuracy_mix']:.1f}% source {result['accuracy_src']:.1f}%")
            say(f"validation step {step} | loss {result['loss']:.4f} | {metric} | {result['mixtures']} mixtures"
                f"{' | new best' if improved else ''}", flush=True)
            log({"event": "valid", "step": step, **result, "best_loss": best_loss})
        elif step % config.checkpoint_interval == 0:
            save(last_path)
            saved_step = step
    say(f"done: {step} steps, best validation loss {best_loss:.4f}; checkpoints in {out_dir}")


if __name__ == "__main__":
    main()
