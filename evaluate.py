"""Evaluate a separation system with the official DCASE metrics: run it from checkpoints, score WAV files, build
the challenge submission, or compare two evaluations.

    python evaluate.py --tagger checkpoint/m2dat_1c.ckpt --separator checkpoint/resunetk.ckpt \\
        --data data/dev_set/synthesized/test --out eval_out/m2dat_1c [--save_waveforms] [--report]
    python evaluate.py --estimates DIR --data data/dev_set/synthesized/test --out OUT [--metric ca-sdri] [--report]
    python evaluate.py --submission --tagger T.ckpt --separator S.ckpt --author Doe --affiliation Lab --number 1 \\
        --data data/dev_set/synthesized/test --eval_data data/eval_set/synthesized/eval --out submission
    python evaluate.py --compare eval_out/A eval_out/B      # B - A, mixture by mixture, with bootstrap intervals
    python evaluate.py --tune_thresholds --tagger runs/tagging_demo/best.pt   # -> runs/tagging_demo/thresholds.json

DATA holds soundscape/<soundscape>.wav (4-channel, 32 kHz) and oracle_target/<soundscape>_<i>_<label>.wav (a 2025
test set <soundscape>_<label>.wav: scored with CA-SDRi, its waveforms and submission get the 2025 names). Estimates
are mono WAVs named either way; a soundscape without any is predicted silence. OUT/results.json has the official
layout plus, per mixture, `est_label_probabilities` and `sources` (report.pair_sources); waveforms are 16-bit PCM
like the official files (i = the slot after silent slots moved last). Nothing existing is replaced without
--overwrite.
"""
import dataclasses
import json
import math
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import report
from cli import StrictParser, add_config_flags, atomic_path, config_from_args, resolve_device
from devset import (LABELS, NUM_SLOTS, SAMPLE_RATE, SILENCE, audio_info, index_sources, label_vector,
                    parse_source_name, read_audio, write_audio)
from metrics import METRIC_NAMES, MetricAccumulator, label_accuracies, label_counts
from model import S5, count_parameters, load_separator, load_tagger
from synth import MetadataDataset, collate

MIXTURE_CHANNELS = 4  # microphones of every soundscape
DEV_RESULTS_FILENAME = "dev_set_test_results.json"  # submission: the dev test set results (official name)
EVAL_RESULTS_FILENAME = "eval_results.json"  # submission: estimate list with tagger probabilities
SUBMISSION_NAME_PART = re.compile(r"[A-Za-z0-9-]+")  # author / affiliation: no '_' (it separates the fields)


@dataclass
class EvaluateConfig:
    estimates: str = ""  # scoring mode: folder of estimated source WAVs to score
    tagger: str = ""  # inference mode: tagger checkpoint (official .ckpt or ours)
    separator: str = ""  # inference mode: separator checkpoint (official .ckpt or ours)
    data: str = "data/dev_set/synthesized/test"  # folder holding soundscape/ and oracle_target/
    out: str = ""  # folder for results.json ('' = print only)
    metric: str = field(default="auto", metadata={"choices": ("auto", *METRIC_NAMES), "help": "capi-sdri (2026), "
                        "ca-sdri (2025: also the 2025 file names and package) or auto: by the data's reference names"})
    overwrite: bool = False  # replace an earlier run's results.json, waveforms and report
    save_waveforms: bool = False  # write OUT/waveforms/<soundscape>_<i>_<label>.wav (2025: <soundscape>_<label>.wav)
    float_wav: bool = False  # write 32-bit float WAVs instead of 16-bit PCM
    device: str = "auto"  # auto (CUDA if available), cpu or cuda
    bf16: bool = False  # bfloat16 autocast for the networks (the STFTs and metrics stay float32)
    tf32: bool = False  # TF32 matmuls on Ampere+ GPUs (off: torch's default; cuDNN convolutions use TF32 either way)
    batch_size: int = 2  # soundscapes per forward pass
    num_workers: int = 2  # DataLoader processes reading soundscapes ahead
    submission: bool = False  # build OUT/<author>_<affiliation>_task4_<number>[.zip] for the challenge
    author: str = ""  # submission: first author's last name
    affiliation: str = ""  # submission: institution abbreviation
    number: int = 1  # submission: system number (DCASE takes up to 4 per team)
    eval_data: str = "data/eval_set/synthesized/eval"  # submission: evaluation set (holding soundscape/, or it)
    report: bool = False  # also write OUT/report/report.md and report.json (report.py)
    tune_thresholds: bool = False  # per-class logit offsets from the validation mixtures -> thresholds.json by --tagger
    valid_metadata: str = "data/dev_set/metadata/valid.json"  # --tune_thresholds: the validation mixtures
    thresholds: str = ""  # a thresholds.json (--tune_thresholds) applied to the tagger's logits
    second_look: bool = False  # the tagger also hears each separated source alone; one it hears as silence is dropped
    relabel_confidence: float = 0.0  # relabel a source heard as another class at p >= this (--second_look; 0 = off)
    iterations: int = 0  # separator passes (0 = the checkpoint's iterations; > 1 needs a separator trained with them)
    compare: tuple[str, str] = field(default=("", ""), metadata={
        "help": "compare two result folders written by --out (B - A with 95 %% paired bootstrap intervals)",
        "metavar": ("A", "B")})


# What each mode reads; a flag outside its mode's set is an error naming both.
MODE_FLAGS = {
    "compare": {"compare"},
    "tune": {"tune_thresholds", "tagger", "valid_metadata", "overwrite", "device", "batch_size", "num_workers"},
    "estimates": {"estimates", "data", "out", "metric", "overwrite", "report"},
    "submission": {"submission", "tagger", "separator", "data", "out", "metric", "device", "bf16", "tf32",
                   "batch_size", "num_workers", "author", "affiliation", "number", "eval_data", "thresholds",
                   "second_look", "relabel_confidence", "iterations"},
    "inference": {"tagger", "separator", "data", "out", "metric", "overwrite", "save_waveforms", "float_wav", "device",
                  "bf16", "tf32", "batch_size", "num_workers", "report", "thresholds", "second_look",
                  "relabel_confidence", "iterations"},
}


def check_flags(config: EvaluateConfig) -> str | None:
    """The first inconsistent flag combination, as a message for parser.error (None when all is well)."""
    mode = ("compare" if any(config.compare) else "tune" if config.tune_thresholds else "estimates" if
            config.estimates else "submission" if config.submission else "inference")
    defaults = EvaluateConfig()
    given = [f"--{key}" for key in vars(config) if getattr(config, key) != getattr(defaults, key)
             and key not in MODE_FLAGS[mode]]
    if given:
        return f"--{ {'tune': 'tune_thresholds'}.get(mode, mode)} does not combine with {', '.join(given)}"
    if mode == "tune" and not config.tagger:
        return "--tune_thresholds needs --tagger CKPT"
    if mode == "inference" and not (config.tagger or config.separator):
        return "pass --tagger CKPT --separator CKPT (run the system) or --estimates DIR (score separated WAVs)"
    if mode in ("inference", "submission") and not (config.tagger and config.separator):
        return f"inference needs both checkpoints: --{'separator' if config.tagger else 'tagger'} is missing"
    if config.batch_size < 1 or config.num_workers < 0:
        return "--batch_size must be >= 1, --num_workers >= 0"
    if config.relabel_confidence and not (config.second_look and 0 < config.relabel_confidence <= 1):
        return f"--relabel_confidence {config.relabel_confidence}: expected a probability in (0, 1] with --second_look"
    if config.iterations < 0:
        return f"--iterations {config.iterations}: expected a number of passes >= 1 (0 = the checkpoint's)"
    if config.float_wav and not config.save_waveforms:
        return "--float_wav applies to --save_waveforms"
    if (config.save_waveforms or config.report or config.submission) and not config.out:
        return "--save_waveforms, --report and --submission write files: pass --out DIR"
    for name in ("author", "affiliation") if config.submission else ():
        if not SUBMISSION_NAME_PART.fullmatch(getattr(config, name)):
            return (f"--submission needs --{name} made of letters, digits and '-' (got {getattr(config, name)!r}); "
                    "the folder is <author>_<affiliation>_task4_<number>")
    if config.submission and config.number < 1:
        return f"--number must be a positive submission number, got {config.number}"
    return None


# ---- Reading soundscapes and source files ------------------------------------------------------------------------
class WaveformDataset(torch.utils.data.Dataset):
    """Soundscapes with 'label', 'label_vector', 'dry_sources' [R, 1, L] from target_dir, the same keys prefixed 'est_'
    from estimate_dir; fewer than NUM_SLOTS sources are padded with silence, more are all kept."""

    def __init__(self, soundscape_dir, target_dir=None, estimate_dir=None):
        self.files = sorted(Path(soundscape_dir).glob("*.wav"))
        self.sources = {prefix: index_sources(folder, [path.stem for path in self.files])[0]
                        for prefix, folder in (("", target_dir), ("est_", estimate_dir)) if folder is not None}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = self.files[index]
        mixture = torch.from_numpy(read_audio(path))
        item = {"mixture": mixture, "soundscape": path.stem}
        for prefix, sources_of in self.sources.items():
            labels = [label for _, label in sources_of[path.stem]]
            sources = [torch.from_numpy(read_audio(source)) for source, _ in sources_of[path.stem]]
            padding = max(NUM_SLOTS - len(labels), 0)
            silent = mixture.new_zeros(padding, 1, mixture.shape[-1])
            item |= {prefix + "label": labels + [SILENCE] * padding,
                     prefix + "label_vector": label_vector(labels + [SILENCE] * padding),
                     prefix + "dry_sources": torch.cat([torch.stack(sources), silent]) if sources else silent}
        return item


def collate_soundscapes(items: list[dict]) -> dict:
    """collate after padding the references of a batch to one count (a soundscape may have more than 3)."""
    if "label" in items[0]:
        count = max(len(item["label"]) for item in items)
        for item in items:
            missing = count - len(item["label"])
            item["label"] = item["label"] + [SILENCE] * missing
            for key in ("label_vector", "dry_sources"):  # all-zero rows = silence
                item[key] = torch.cat([item[key], item[key].new_zeros(missing, *item[key].shape[1:])])
    return collate(items)


def problem_list(title: str, problems: list[str]) -> ValueError:
    return ValueError(f"{title} ({len(problems)}):\n" + "\n".join(f"  {problem}" for problem in problems))


def check_inputs(data_dir: Path, estimate_dir: Path | None = None, references: bool = True,
                 batch_size: int = 1) -> list[Path]:
    """Every file's name, rate, channels and length from its header, all problems in one ValueError -> mixture paths."""
    folders = [data_dir / "soundscape"] + ([data_dir / "oracle_target"] if references else [])
    missing = [str(folder) for folder in ([data_dir] if not data_dir.is_dir() else folders) if not folder.is_dir()]
    if missing:
        raise problem_list(f"missing data folder(s); expected {' and '.join(f'DATA/{f.name}' for f in folders)}",
                           missing)
    if estimate_dir is not None and not estimate_dir.is_dir():
        raise ValueError(f"estimate folder {estimate_dir} does not exist")
    soundscapes = sorted(path for path in (data_dir / "soundscape").iterdir() if path.suffix == ".wav")
    if not soundscapes:
        raise ValueError(f"no .wav mixtures in {data_dir / 'soundscape'}")
    indexes, problems = [], []
    for folder in ([data_dir / "oracle_target"] if references else []) + ([estimate_dir] if estimate_dir else []):
        index, found, ignored = index_sources(folder, [path.stem for path in soundscapes])
        indexes.append(index)
        problems += found
        if ignored:
            print(f"ignoring {len(ignored)} non-WAV entries in {folder}: {', '.join(ignored[:5])}"
                  + (" ..." if len(ignored) > 5 else ""), file=sys.stderr)
    headers = {}
    for path in dict.fromkeys(soundscapes + [path for index in indexes for files in index.values()
                                             for path, _ in files]):  # once, also if two folders are the same
        try:
            headers[path] = audio_info(path)
        except ValueError as error:
            problems.append(f"{path}: not a readable WAV file ({str(error).removeprefix(f'{path}: ')})")
    good_lengths = set()
    for mixture_path in (path for path in soundscapes if path in headers):
        mixture, known = headers[mixture_path], len(problems)
        if (mixture.samplerate, mixture.channels) != (SAMPLE_RATE, MIXTURE_CHANNELS):
            problems.append(f"{mixture_path}: {mixture.samplerate} Hz, {mixture.channels} channels; expected "
                            f"{SAMPLE_RATE} Hz, {MIXTURE_CHANNELS} channels")
        sources = [[path for path, _ in index[mixture_path.stem] if path in headers] for index in indexes]
        expected = mixture.frames
        reference_lengths = {headers[path].frames for path in (sources[0] if references and sources else [])}
        if len(reference_lengths) == 1 and expected not in reference_lengths:  # then the mixture is the damaged one
            (length,) = reference_lengths
            problems.append(f"{mixture_path}: {'shorter' if expected < length else 'longer'} than its reference files "
                            f"({expected} samples, they have {length}); is the soundscape truncated or damaged?")
            expected = None
        for path in dict.fromkeys(path for paths in sources for path in paths):
            info = headers[path]
            wrong = ([f"sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz"] * (info.samplerate != SAMPLE_RATE)
                     + [f"{info.channels} channels, expected mono"] * (info.channels != 1)
                     + [f"length {info.frames} samples, expected {expected} (the mixture's)"]
                     * (expected is not None and info.frames != expected))
            if wrong:
                problems.append(f"{path}: " + "; ".join(wrong))
        if len(problems) == known:
            good_lengths.add(mixture.frames)
    if batch_size > 1 and len(good_lengths) > 1:
        problems.append(f"{data_dir / 'soundscape'}: mixtures of different lengths ({min(good_lengths)} to "
                        f"{max(good_lengths)} samples) cannot be batched; use --batch_size 1")
    if problems:
        raise problem_list("bad evaluation input", problems)
    return soundscapes


# ---- Results: the official layout, printed and written -----------------------------------------------------------
def score_mixtures(accumulator: MetricAccumulator, est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures,
                   soundscapes) -> list[float | None]:
    """accumulator.update, each mixture's estimate-reference pairs (report.pair_sources) kept as 'sources'."""
    values = accumulator.update(est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures, soundscapes)
    for b, record in enumerate(accumulator.details[-len(values):]):
        record["sources"] = report.pair_sources(record["est_labels"], est_waveforms[b], record["ref_labels"],
                                                ref_waveforms[b], record["pairs"])
    return values


def number(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value  # JSON null


def build_results(accumulator: MetricAccumulator, config: EvaluateConfig, nparams=None, probabilities=None,
                  models=None) -> dict:
    """The official results.json layout (2025: label_metrics = {'accuracy'}) plus each mixture's source pairs, and
    from inference the label probabilities and the models."""
    summary = accumulator.summary()
    label_metrics = ({"accuracy_mix": number(summary["accuracy_mix"]), "accuracy_src": number(summary["accuracy_src"])}
                     if accumulator.metric == "capi-sdri" else {"accuracy": number(summary["accuracy_mix"])})
    details = []
    for item in accumulator.details:
        detail = {key: item[key] for key in ("soundscape", "ref_labels", "est_labels")}
        if probabilities is not None:
            detail["est_label_probabilities"] = probabilities[item["soundscape"]]
        details.append(detail | {"metrics": [{"metric": summary["metric"], "value": number(item["value"])},
                                             {"metric": "label_metrics", "value": item["label_counts"]}],
                                 "sources": item["sources"]})
    results = {summary["metric"]: {"mean": number(summary["mean"])}, "label_metrics": label_metrics}
    return results | ({"nparams": nparams} if nparams is not None else {}) | {
        "details": details, "config": dataclasses.asdict(config) | ({"models": models} if models else {})}


def print_results(results: dict, timing: dict | None = None):
    """The official summary lines; with timing also the time spent reading files and computing metrics."""
    name = report.metric_name(results)
    titles = {"accuracy_mix": "Accuracy (mixture)", "accuracy_src": "Accuracy (source) ",
              "accuracy": "Label prediction accuracy"}  # 2025: printed with 2 decimals, as the official
    lines = {name: results[name]["mean"]} | {titles[key]: value for key, value in results["label_metrics"].items()}
    for title, value in lines.items():
        print(f"{title}: {'nan' if value is None else f'{value:.2f}' if title.startswith('Label') else f'{value:.3f}'}")
    if "nparams" in results:
        print(f"Total parameters: {results['nparams']:,}")
    if timing:
        print(f"Metric computation: {1e3 * timing['metric_seconds'] / timing['mixtures']:.3f} ms per mixture (file "
              f"reading {1e3 * timing['read_seconds'] / timing['mixtures']:.1f} ms per mixture, {timing['mixtures']} "
              "mixtures)")


def write_json(value: dict, path: Path):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2) + "\n")


def output_folders(config: EvaluateConfig) -> list[Path]:
    """The folders this run fills; an earlier run's results.json or files there are an error unless --overwrite."""
    out = Path(config.out)
    if config.out and (out / "results.json").exists() and not config.overwrite:
        raise ValueError(f"{out / 'results.json'} already exists; pass --overwrite to replace it, or another --out")
    folders = [out / name for flag, name in (("save_waveforms", "waveforms"), ("report", "report"))
               if getattr(config, flag)]
    stale = [str(folder) for folder in folders if folder.is_dir() and any(folder.iterdir())]
    if stale and not config.overwrite:
        raise ValueError(f"{', '.join(stale)} already hold files of an earlier run; pass --overwrite to replace them "
                         "or choose another --out")
    return folders


def prepare_folders(folders: list[Path]):
    """Empty folders (an earlier run's files, with --overwrite, must not mix with this run's)."""
    for folder in folders:
        removed = [path.unlink() for path in folder.iterdir() if path.is_file()] if folder.is_dir() else []
        if removed:
            print(f"removed {len(removed)} files of an earlier run from {folder}", file=sys.stderr)
        folder.mkdir(parents=True, exist_ok=True)


def write_outputs(config: EvaluateConfig, results: dict, folders: list[Path], system: dict, oracle_results=None):
    """results.json, the report (with --report) and one line per written folder."""
    if config.out:
        write_json(results, Path(config.out) / "results.json")
        print(f"wrote {Path(config.out) / 'results.json'}")
    if config.report:
        report.write_report(Path(config.out) / "report", results, oracle_results, system, config.data)
    for folder in folders:
        names = sorted(path.name for path in folder.iterdir())
        print(f"wrote {len(names)} files to {folder}" + (f" ({', '.join(names)})" if len(names) <= 5 else ""))


# ---- Inference: tag and separate with the S5 system --------------------------------------------------------------
def load_system(config: EvaluateConfig, device: torch.device) -> tuple[S5, int, dict]:
    """(S5 system in eval mode on the device, parameter count as the official evaluator reports it, model record)."""
    tagger, separator = load_tagger(config.tagger), load_separator(config.separator)
    if separator.config.input_channels != MIXTURE_CHANNELS:
        raise ValueError(f"{config.separator}: the separator reads {separator.config.input_channels} channels, "
                         f"expected {MIXTURE_CHANNELS} (the soundscapes' microphones)")
    if config.thresholds:
        tagger.label_offsets = read_thresholds(Path(config.thresholds))
    if config.iterations > 1 and not hasattr(separator.base, "feedback_conv"):
        raise ValueError(f"--iterations {config.iterations}: {config.separator} was trained with iterations 1 (it has "
                         "no input for the previous estimate)")
    separator.config.iterations = config.iterations or separator.config.iterations
    system = S5(tagger, separator, config.second_look, config.relabel_confidence).to(device).eval()
    torch.set_float32_matmul_precision("high" if config.tf32 else "highest")  # 'highest' is torch's default
    models = {"tagger": config.tagger, "thresholds": config.thresholds, "second_look": config.second_look,
              "relabel_confidence": config.relabel_confidence,
              "tagger_config": dataclasses.asdict(tagger.config),
              "separator": config.separator, "separator_config": dataclasses.asdict(separator.config)}
    return system, count_parameters(system), models


def separate_all(system: S5, dataset, config: EvaluateConfig, device, oracle: bool = False):
    """Yields (batch, labels, probabilities [B, 3], waveforms [B, 3, L], oracle waveforms or None) on the CPU, and
    prints the speed at the end; with oracle the separator also runs with the (first 3) reference labels."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                                         collate_fn=collate_soundscapes, pin_memory=device.type == "cuda")
    done, model_seconds, start, shown = 0, 0.0, time.perf_counter(), time.perf_counter()
    for batch in loader:
        started = time.perf_counter()
        mixture = batch["mixture"].to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            output = system(mixture)
            oracle_waveforms = (system.separator(mixture, batch["label_vector"][:, :NUM_SLOTS].to(device))
                                if oracle else None)
        waveforms = output["waveform"].float().cpu()  # (B, 3, L); the copy also waits for the GPU
        model_seconds += time.perf_counter() - started
        yield (batch, output["label"], output["probabilities"].float().cpu(), waveforms,
               None if oracle_waveforms is None else oracle_waveforms.float().cpu())
        done += len(waveforms)
        if time.perf_counter() - shown > 10:  # a progress line every 10 s
            shown = time.perf_counter()
            print(f"separated {done}/{len(dataset)} soundscapes ({done / (shown - start):.1f}/s)", file=sys.stderr)
    print(f"Inference speed: {done / (time.perf_counter() - start):.2f} soundscapes/s overall, "
          f"{done / max(model_seconds, 1e-9):.2f} soundscapes/s in the networks ({done} soundscapes, batch "
          f"{config.batch_size}, {device.type}{', bf16' if config.bf16 else ''})", file=sys.stderr)


def write_sources(folder: Path, soundscape: str, labels, waveforms, subtype="PCM_16", slots=True) -> list:
    """The non-silent slots of waveforms [3, L] as <soundscape>_<slot>_<label>.wav (2025, slots=False:
    <soundscape>_<label>.wav; its labels are distinct), PCM_16 as the official -> [(slot, name)]."""
    written = [(slot, f"{soundscape}_{slot}_{label}.wav" if slots else f"{soundscape}_{label}.wav")
               for slot, label in enumerate(labels) if label != SILENCE]
    for slot, name in written:
        write_audio(folder / name, waveforms[slot].numpy(), subtype)
    return written


def evaluate_system(system: S5, dataset, config: EvaluateConfig, device, waveform_dir=None, oracle=False):
    """Separate and score every soundscape -> (accumulator, {soundscape: probabilities}, oracle accumulator)."""
    accumulator, oracle_accumulator = MetricAccumulator(config.metric), MetricAccumulator(config.metric)
    probabilities = {}
    for batch, labels, slot_probabilities, waveforms, oracle_waveforms in separate_all(system, dataset, config, device,
                                                                                       oracle):
        references = batch["dry_sources"][:, :, 0]  # (B, R, L)
        score_mixtures(accumulator, labels, waveforms, batch["label"], references, batch["mixture"][:, 0],
                       batch["soundscape"])
        if oracle:
            score_mixtures(oracle_accumulator, [row[:NUM_SLOTS] for row in batch["label"]], oracle_waveforms,
                           batch["label"], references, batch["mixture"][:, 0], batch["soundscape"])
        for b, soundscape in enumerate(batch["soundscape"]):
            probabilities[soundscape] = slot_probabilities[b].tolist()
            if waveform_dir is not None:
                write_sources(waveform_dir, soundscape, labels[b], waveforms[b],
                              "FLOAT" if config.float_wav else "PCM_16", slots=config.metric != "ca-sdri")
    return accumulator, probabilities, oracle_accumulator if oracle else None


# ---- The four modes ----------------------------------------------------------------------------------------------
def run_inference(config: EvaluateConfig):
    """Separate the test set, print and write the official results (and the report with its oracle-label run)."""
    folders = output_folders(config)
    device = resolve_device(config.device)
    check_inputs(Path(config.data), batch_size=config.batch_size)
    system, nparams, models = load_system(config, device)
    prepare_folders(folders)
    data = Path(config.data)
    accumulator, probabilities, oracle = evaluate_system(
        system, WaveformDataset(data / "soundscape", data / "oracle_target"), config, device,
        Path(config.out) / "waveforms" if config.save_waveforms else None, oracle=config.report)
    results = build_results(accumulator, config, nparams, probabilities, models)
    print_results(results)
    write_outputs(config, results, folders, {"tagger": config.tagger, "separator": config.separator},
                  build_results(oracle, config) if oracle is not None else None)


def run_scoring(config: EvaluateConfig):
    """Score estimate WAVs, print the summary, write OUT/results.json (and the report)."""
    torch.set_num_threads(1)  # the per-mixture work is small; threads only add overhead
    folders = output_folders(config)
    data, estimates = Path(config.data), Path(config.estimates)
    check_inputs(data, estimates)
    dataset = WaveformDataset(data / "soundscape", data / "oracle_target", estimates)
    if not any(dataset.sources["est_"].values()):
        print(f"warning: no estimate WAVs in {estimates}; every mixture is scored as predicted silence",
              file=sys.stderr)
    accumulator, read_seconds, metric_seconds = MetricAccumulator(config.metric), 0.0, 0.0
    for index in range(len(dataset)):
        start = time.perf_counter()
        item = dataset[index]
        middle = time.perf_counter()
        score_mixtures(accumulator, [item["est_label"]], item["est_dry_sources"][None, :, 0], [item["label"]],
                       item["dry_sources"][None, :, 0], item["mixture"][None, 0], [item["soundscape"]])
        read_seconds, metric_seconds = read_seconds + middle - start, metric_seconds + time.perf_counter() - middle
    results = build_results(accumulator, config)
    print_results(results, {"mixtures": len(dataset), "read_seconds": read_seconds, "metric_seconds": metric_seconds})
    prepare_folders(folders)
    write_outputs(config, results, folders, {"estimates": config.estimates})


def run_compare(config: EvaluateConfig):
    """--compare A B: the paired comparison of two results.json files, printed."""
    loaded = []
    for folder in config.compare:
        path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
        if not path.is_file():
            raise ValueError(f"--compare {folder}: no results.json there; expected a folder written by evaluate.py "
                             "--out (or its results.json)")
        try:
            loaded.append((str(path), json.loads(path.read_text())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a readable results file ({error})") from None
    (name_a, results_a), (name_b, results_b) = loaded
    print(report.format_comparison(report.compare_results(results_a, results_b, name_a, name_b)))


def run_submission(config: EvaluateConfig):
    """As the official generate_waveform.sh: OUT/N/{eval_out/, eval_results.json, dev_set_test_results.json}, N.zip;
    2025 (--metric ca-sdri): OUT/N_out/eval_out/<soundscape>_<label>.wav only, N_out.zip."""
    slots = config.metric != "ca-sdri"
    name = f"{config.author}_{config.affiliation}_task4_{config.number}" + ("" if slots else "_out")
    out, folder = Path(config.out), Path(config.out) / name
    if (folder / "eval_out").is_dir() and any((folder / "eval_out").iterdir()):
        raise ValueError(f"{folder / 'eval_out'} exists and is not empty; remove it or choose another --number")
    existing = [str(path) for path in (folder / DEV_RESULTS_FILENAME, folder / EVAL_RESULTS_FILENAME,
                                       out / f"{name}.zip") if path.exists()]
    if existing:
        raise ValueError(f"refusing to overwrite {', '.join(existing)}; remove them or choose another --number")
    device = resolve_device(config.device)
    data, eval_root = Path(config.data), soundscape_root(Path(config.eval_data))
    check_inputs(data, batch_size=config.batch_size)
    eval_soundscapes = check_inputs(eval_root, references=False, batch_size=config.batch_size)
    system, nparams, models = load_system(config, device)

    print(f"[1/3] dev test set {data}" + f" -> {folder / DEV_RESULTS_FILENAME}" * slots, file=sys.stderr)
    accumulator, probabilities, _ = evaluate_system(
        system, WaveformDataset(data / "soundscape", data / "oracle_target"), config, device)
    results = build_results(accumulator, config, nparams, probabilities, models)
    print_results(results)
    official = [{"probabilities" if key == "est_label_probabilities" else key: value
                 for key, value in detail.items() if key != "sources"} for detail in results["details"]]
    if slots:
        write_json(results | {"details": official}, folder / DEV_RESULTS_FILENAME)

    print(f"[2/3] evaluation set {eval_root / 'soundscape'} -> {folder / 'eval_out'}", file=sys.stderr)
    (folder / "eval_out").mkdir(parents=True, exist_ok=True)
    entries = []
    for batch, labels, slot_probabilities, waveforms, _ in separate_all(
            system, WaveformDataset(eval_root / "soundscape"), config, device):
        for b, soundscape in enumerate(batch["soundscape"]):
            written = write_sources(folder / "eval_out", soundscape, labels[b], waveforms[b], slots=slots)
            entries.append({"soundscape": soundscape, "estimate": [
                {"filename": filename, "label": labels[b][slot], "probability": float(slot_probabilities[b, slot])}
                for slot, filename in written]})
    if slots:
        write_json({"nparams": nparams, "probabilities": entries,
                    "config": dataclasses.asdict(config) | {"models": models}}, folder / EVAL_RESULTS_FILENAME)

    print("[3/3] checking and packing the submission", file=sys.stderr)
    verify_submission(folder, eval_soundscapes, slots)
    members = sorted((folder / "eval_out").iterdir())
    members += [folder / EVAL_RESULTS_FILENAME, folder / DEV_RESULTS_FILENAME] if slots else []
    with atomic_path(out / f"{name}.zip") as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as package:
            for path in members:
                package.write(path, path.relative_to(out).as_posix())
    print(f"wrote {out / f'{name}.zip'} ({len(members) - 2 * slots} WAVs for {len(entries)} eval soundscapes, "
          f"{(out / f'{name}.zip').stat().st_size / 2**20:.1f} MiB)")


# ---- Per-class thresholds: offsets added to the tagger's logits, tuned on the validation mixtures ---------------
THRESHOLD_GRID = [step / 2 for step in range(-8, 9)]  # offsets tried per class, in logit units


def tune_thresholds(tagger, logits: torch.Tensor, references: list) -> tuple[torch.Tensor, tuple, tuple]:
    """(offsets [19], (accuracy_mix, accuracy_src) without, with them): coordinate ascent over THRESHOLD_GRID, class
    by class (silence last) in two passes, maximising the mixture label accuracy, then the source accuracy (the
    tagger's share of CAPI-SDRi: a wrong label multiset costs its sources); ties keep the offset nearest 0."""
    def accuracies(offsets):
        tagger.label_offsets = offsets
        labels, _ = tagger.labels_from_logits(logits)
        mix, src = label_accuracies([label_counts(est, ref) for est, ref in zip(labels, references)])
        return mix, (0.0 if math.isnan(src) else src)
    offsets = torch.zeros(len(LABELS) + 1)
    before = best = accuracies(offsets)
    for _ in range(2):
        for k in range(logits.shape[-1]):
            for value in sorted(THRESHOLD_GRID, key=abs):
                trial = offsets.clone()
                trial[k] = value
                if (found := accuracies(trial)) > best:
                    best, offsets = found, trial
    tagger.label_offsets = None
    return offsets, before, best


def read_thresholds(path: Path) -> torch.Tensor:
    """The offsets [19] of a thresholds.json, refused when it was tuned for another label set."""
    try:
        tuned = json.loads(path.read_text())
        offsets = torch.tensor(tuned["offsets"], dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a thresholds.json written by --tune_thresholds ({error})") from None
    if tuned.get("labels") != [*LABELS, SILENCE] or offsets.shape != (len(LABELS) + 1,):
        raise ValueError(f"{path}: thresholds for another label set ({tuned.get('labels')}); expected the 18 classes "
                         "and silence of this tagger")
    return offsets


def run_tune(config: EvaluateConfig):
    """--tune_thresholds: the tagger once over the validation mixtures, the offsets to TAGGER_FOLDER/thresholds.json."""
    path = Path(config.tagger).with_name("thresholds.json")
    if path.exists() and not config.overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it")
    device = resolve_device(config.device)
    tagger = load_tagger(config.tagger).to(device).eval()
    validation = MetadataDataset(config.valid_metadata, return_sources=False)
    loader = torch.utils.data.DataLoader(validation, batch_size=config.batch_size, num_workers=config.num_workers,
                                         collate_fn=collate)
    logits, references = [], []
    with torch.no_grad():
        for batch in loader:
            logits.append(tagger(batch["mixture"].to(device)).float().cpu())
            references += batch["label"]
    offsets, before, after = tune_thresholds(tagger, torch.cat(logits), references)
    write_json({"labels": [*LABELS, SILENCE], "offsets": offsets.tolist(), "tagger": config.tagger,
                "valid_metadata": config.valid_metadata, "mixtures": len(references),
                "accuracy_without": before, "accuracy_with": after}, path)
    print(f"validation ({len(references)} mixtures) accuracy mixture / source: {before[0]:.2f} / {before[1]:.2f} "
          f"without, {after[0]:.2f} / {after[1]:.2f} with the offsets; wrote {path}")


def test_set_year(data_dir: Path) -> int:
    """2025 when every reference file is named <soundscape>_<label>.wav (the 2025 dev_set/test), else 2026."""
    soundscapes = [path.stem for path in (data_dir / "soundscape").glob("*.wav")]
    if not soundscapes or not (data_dir / "oracle_target").is_dir():
        return 2026
    names = [(soundscape, path.name) for soundscape, files in index_sources(data_dir / "oracle_target", soundscapes)[0]
             .items() for path, _ in files]
    return 2025 if names and all(parse_source_name(*name)[0] is None for name in names) else 2026


def soundscape_root(path: Path) -> Path:
    """The folder holding soundscape/: PATH itself, or its parent when PATH is the soundscape folder."""
    return path.parent if path.name == "soundscape" and not (path / "soundscape").is_dir() else path


def verify_submission(folder: Path, soundscapes: list[Path], slots=True):
    """The official checks: eval_out holds <soundscape>_<i>_<label>.wav files, exactly those eval_results.json lists
    (2025, slots=False: <soundscape>_<label>.wav files)."""
    index, problems, ignored = index_sources(folder / "eval_out", [path.stem for path in soundscapes])
    expected = "'<soundscape>_<i>_<label>.wav' (with the output slot i)" if slots else "'<soundscape>_<label>.wav'"
    problems += [f"{path}: expected {expected}" for soundscape, sources in index.items() for path, _ in sources
                 if (parse_source_name(soundscape, path.name)[0] is None) == slots]
    if slots:
        listed = {estimate["filename"]: estimate["label"] for entry in json.loads(
            (folder / EVAL_RESULTS_FILENAME).read_text())["probabilities"] for estimate in entry["estimate"]}
        written = {path.name: label for sources in index.values() for path, label in sources}
        if listed != written or ignored:
            problems.append(f"{folder / EVAL_RESULTS_FILENAME}: lists {len(listed)} files, eval_out holds "
                            f"{len(written) + len(ignored)} (differences: {sorted(set(listed) ^ set(written))[:5]})")
    elif ignored:
        problems.append(f"{folder / 'eval_out'}: entries that are not WAV files: {', '.join(ignored[:5])}")
    if problems:
        raise problem_list("submission check failed", problems)


def main():
    parser = StrictParser(description=__doc__)
    add_config_flags(parser, EvaluateConfig)
    config = config_from_args(parser.parse_args(), EvaluateConfig)
    problem = check_flags(config)
    if problem:
        parser.error(problem)
    mode = (run_compare if any(config.compare) else run_tune if config.tune_thresholds else run_scoring if
            config.estimates else run_submission if config.submission else run_inference)
    try:
        if config.metric == "auto" and mode in (run_inference, run_scoring, run_submission):  # modes that score
            config.metric = "ca-sdri" if test_set_year(Path(config.data)) == 2025 else "capi-sdri"
        mode(config)
    except (ValueError, OSError) as error:  # bad input: its message names the file or flag; no traceback
        message = str(error)  # raised in a DataLoader worker, it comes with the worker's traceback: keep the error
        message = message.strip().splitlines()[-1].split(": ", 1)[-1] if "Original Traceback" in message else message
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
