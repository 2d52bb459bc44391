"""What the training loop reads: the dev-set check, the label layout and channels each task needs, the numbered
scene stream (StepBatches: which scenes every rank, micro-step and step draws), the DataLoaders, and the
validation set that is rendered once and kept (ValidationSet).

The datasets themselves are synth.py's (GeneratedDataset for training, MetadataDataset for validation).
"""
import json
import os
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch

from devset import LABELS
from render import BatchRenderer
from synth import SceneConfig, collate

VALID_MEMORY_BYTES = 2 * 2**30  # per rank: a larger rendered validation set goes to files in the run folder
DATA_HINT = ("Create the small demo set with `python data_prep.py demo` (writes data/dev_set), or check a full "
             "development set with `python data_prep.py verify --data DIR` and pass it as --data_root DIR.")


# ----------------------------------------------------------------------------------------------------------
# Data root, label layout, loaders
# ----------------------------------------------------------------------------------------------------------
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
    """Label vector layout the task's loss expects (official DatasetS3): tagger [3, 19] (2025: multi-hot [18]),
    separator queries [3, 18] with all-zero silence rows."""
    if task == "tagging" and model_config.head == "avg_linear":
        return dict(label_vector_mode="stack", silence_label_mode="onehot", return_sources=False)
    if task == "tagging":
        return dict(label_vector_mode="multihot", silence_label_mode="zeros", return_sources=False)
    return dict(label_vector_mode="stack", silence_label_mode="zeros", return_sources=True)


def mixture_channels(task: str, model_config) -> int | None:
    """Mixture channels the model reads: the 1-channel taggers only need channels up to the reference one."""
    if task == "tagging" and model_config.num_channels == 1:
        return model_config.ref_channel + 1
    return None  # all of the room's


def default_num_workers() -> int:
    """DataLoader workers per rank: the CPU cores this process may use, shared by the ranks of this machine, minus
    one for the training process itself, and at least one (2 cores, 1 rank: 1; 16 cores, 4 ranks: 3)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)


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


def make_loader(dataset, workers: int, config, device: torch.device, persistent: bool,
                **options) -> torch.utils.data.DataLoader:
    """Worker processes synthesize batches ahead (prefetch) so that the step does not wait for data."""
    parallel = dict(num_workers=workers, prefetch_factor=config.prefetch_factor, persistent_workers=persistent,
                    worker_init_fn=ignore_signals_in_worker) if workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, collate_fn=collate, pin_memory=device.type == "cuda", **parallel,
                                       **options)


# ----------------------------------------------------------------------------------------------------------
# Validation mixtures
# ----------------------------------------------------------------------------------------------------------
class ValidationSet:
    """This rank's validation mixtures, rendered once (at the first validation) and kept for all later ones.

    They stay in memory up to VALID_MEMORY_BYTES per rank and otherwise go to memory-mapped files in the run folder
    (the official separator validation keeps 4 mixture channels and 3 dry targets: about 9 MB per 10 s mixture).
    The files are unlinked at creation, so they vanish with the process whatever way it ends. The single rendering
    pass keeps no RIR spectra beyond each batch, so the training device's cache stays as it is. Iterating yields
    batches of `batch_size` on the device.
    """

    def __init__(self, loader, device: torch.device, count: int, batch_size: int, folder: Path, cache_dir):
        self.loader, self.count, self.batch_size, self.folder = loader, count, batch_size, folder
        self.renderer = BatchRenderer(device, 0, cache_dir)
        self.stored = None  # key -> tensor [count, ...] or list [count]

    def _render(self) -> dict:
        stored, start = {}, 0
        for batch in self.loader:
            batch = self.renderer(batch)
            batch.pop("metadata", None)
            tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
            if not stored:
                in_memory = self.count * sum(value[0].nbytes for value in tensors.values()) <= VALID_MEMORY_BYTES
                if not in_memory:
                    self.folder.mkdir(parents=True, exist_ok=True)
                for key, value in batch.items():
                    shape = (self.count, *value.shape[1:]) if key in tensors else None
                    if shape is None:
                        stored[key] = []
                    elif in_memory:
                        stored[key] = torch.empty(shape, dtype=value.dtype)
                    else:
                        file = tempfile.TemporaryFile(dir=self.folder)
                        dtype = torch.empty(0, dtype=value.dtype).numpy().dtype
                        stored[key] = torch.from_numpy(np.memmap(file, dtype, "w+", shape=shape))
            size = len(batch["label"])
            for key, value in batch.items():
                if key in tensors:
                    stored[key][start:start + size].copy_(value)
                else:
                    stored[key] += value
            start += size
        self.renderer = BatchRenderer(self.renderer.device, 0)  # frees the RIR spectra of the rendering pass
        return stored

    def __iter__(self):
        if self.stored is None:
            self.stored = self._render()
        for start in range(0, self.count, self.batch_size):
            yield self.renderer({key: value[start:start + self.batch_size] for key, value in self.stored.items()})
