"""Evaluate a separation system with the official DCASE metrics: run it from checkpoints, score WAV files, or
build the challenge submission.

Inference mode loads a tagger and a separator (official Lightning checkpoints or our own), tags and separates
every dev-set soundscape, and prints CAPI-SDRi, the label accuracies and the parameter count like the official
evaluator; OUT/results.json holds the summary and per-soundscape details:

    python evaluate.py --tagger checkpoint/m2dat_1c.ckpt --separator checkpoint/resunetk.ckpt \\
        --data data/dev_set/synthesized/test --out eval_out/m2dat_1c [--save_waveforms] [--plots 5]

Scoring mode reads estimate WAVs written by any system and prints CAPI-SDRi (2026) or CA-SDRi (2025) with the
label accuracies, exactly as the official evaluator computes them:

    python evaluate.py --estimates DIR --data data/dev_set/synthesized/test --out results/
    python evaluate.py --estimates DIR --data data/dev_set/synthesized/test --metric ca-sdri

--report (with either mode) adds OUT/report/report.md and report.json: the numbers by kind of mixture, per-class
tagging and separation, the confusion matrix and, when the system runs, the split between tagger and separator
(report.py). --compare A B compares two result folders mixture by mixture, with paired bootstrap intervals:

    python evaluate.py --tagger T.ckpt --separator S.ckpt --data data/dev_set/synthesized/test --out A --report
    python evaluate.py --compare eval_out/A eval_out/B

Submission mode evaluates the dev test set, separates the evaluation set and packs OUT/A_F_task4_K.zip:

    python evaluate.py --submission --tagger T.ckpt --separator S.ckpt --author Doe --affiliation Lab --number 1 \\
        --data data/dev_set/synthesized/test --eval_data data/eval_set/synthesized/eval --out submission

Data layout: DATA/soundscape/<soundscape>.wav (4-channel mixtures, 32 kHz) and
DATA/oracle_target/<soundscape>_<i>_<label>.wav (mono references). Estimates in DIR are mono 32 kHz WAVs named
<soundscape>_<i>_<label>.wav (2026) or <soundscape>_<label>.wav (2025), as long as their mixture; a soundscape
without estimate files counts as predicted silence. Files that are not WAVs are listed and ignored.
OUT/results.json follows the official layout: {'CAPI-SDRi': {'mean'}, 'label_metrics': {...}, 'nparams' (inference
only), 'details': [...], 'config': {...}}. Each detail holds soundscape, ref_labels, est_labels, (inference only)
est_label_probabilities = the tagger's softmax probability of each est_label, one per output slot (the official
file calls it 'probabilities'), metrics = [{'metric': 'CAPI-SDRi', 'value'}, {'metric': 'label_metrics', 'value':
{acc, tp, fp, fn}}] and sources = every estimate paired with a reference ({'reference', 'estimate', 'sdri'}, see
report.pair_sources). The submission's dev_set_test_results.json keeps the official key names and nothing more.
Separated sources are written as OUT/waveforms/<soundscape>_<i>_<label>.wav (i = output slot after moving silent
slots last), 16-bit PCM like the official files (--float_wav: 32-bit float).
"""
import collections
import dataclasses
import json
import math
import os
import pickle
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
import torch

import report
from cli import StrictParser, add_config_flags, config_from_args
from devset import LABELS, NUM_SLOTS, SAMPLE_RATE, SILENCE, audio_info
from metrics import METRIC_NAMES, MetricAccumulator
from model import S5, count_parameters, load_separator, load_tagger
from synth import WaveformDataset, collate, index_sources, parse_source_name

MIXTURE_CHANNELS = 4  # microphones of every soundscape
RESULTS_FILENAME = "results.json"
DEV_RESULTS_FILENAME = "dev_set_test_results.json"  # submission: the dev test set results (official name)
EVAL_RESULTS_FILENAME = "eval_results.json"  # submission: estimate list with tagger probabilities
WAV_SUBTYPES = {False: "PCM_16", True: "FLOAT"}  # --float_wav -> soundfile subtype; PCM_16 = the official default
SUBMISSION_NAME_PART = re.compile(r"[A-Za-z0-9-]+")  # author / affiliation: no '_' (it separates the fields)
PLOT_FFT, PLOT_HOP, PLOT_RANGE_DB = 1024, 320, 80.0  # spectrogram plots: samples, samples, dB shown below the peak
OUTPUT_FOLDERS = {"save_waveforms": ("waveforms", "*.wav"), "plots": ("plots", "*.png"),  # flag -> folder, files
                  "report": ("report", "*")}
PROBABILITY_KEY = "est_label_probabilities"  # results.json: the chosen label's probability per slot
OFFICIAL_PROBABILITY_KEY = "probabilities"  # the same list under its official name (submission files)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------
@dataclass
class EvaluateConfig:
    estimates: str = field(default="", metadata={"help": "scoring mode: folder of estimated source WAVs to score"})
    tagger: str = field(default="", metadata={"help": "inference mode: tagger checkpoint (official .ckpt or ours)"})
    separator: str = field(default="", metadata={"help": "inference mode: separator checkpoint (official or ours)"})
    data: str = field(default="data/dev_set/synthesized/test",
                      metadata={"help": "folder holding soundscape/ and oracle_target/"})
    out: str = field(default="", metadata={"help": "folder for results.json ('' = print only)"})
    metric: str = field(default="capi-sdri", metadata={"help": "capi-sdri (2026) or ca-sdri (2025)",
                                                       "choices": tuple(METRIC_NAMES)})
    overwrite: bool = field(default=False, metadata={"help": "replace existing results.json, waveforms, plots"})
    save_waveforms: bool = field(default=False, metadata={"help": "write OUT/waveforms/<soundscape>_<i>_<label>.wav"})
    float_wav: bool = field(default=False, metadata={"help": "write 32-bit float WAVs instead of 16-bit PCM"})
    plots: int = field(default=0, metadata={"help": "spectrogram PNGs (OUT/plots) of the first N soundscapes; "
                                                    "needs matplotlib"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if available), cpu or cuda",
                                                  "choices": ("auto", "cpu", "cuda")})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast for the networks (fast on CUDA; the "
                                                        "STFTs and metrics stay float32)"})
    tf32: bool = field(default=False, metadata={"help": "TF32 matmuls on Ampere+ GPUs (off: torch's default, as "
                                                        "in train.py; cuDNN convolutions use TF32 either way)"})
    batch_size: int = field(default=2, metadata={"help": "soundscapes per forward pass"})
    num_workers: int = field(default=2, metadata={"help": "DataLoader processes reading soundscapes ahead"})
    submission: bool = field(default=False, metadata={"help": "build OUT/<author>_<affiliation>_task4_<number>"
                                                              "[.zip] for the challenge"})
    author: str = field(default="", metadata={"help": "submission: first author's last name"})
    affiliation: str = field(default="", metadata={"help": "submission: institution abbreviation"})
    number: int = field(default=1, metadata={"help": "submission: system number (DCASE takes up to 4 per team)"})
    eval_data: str = field(default="data/eval_set/synthesized/eval",
                           metadata={"help": "submission: evaluation set folder (holding soundscape/, or that "
                                             "folder itself)"})
    report: bool = field(default=False, metadata={"help": "also write OUT/report/report.md and report.json (by kind "
                                                          "of mixture, per class, tagger / separator split)"})
    compare: tuple[str, str] = field(default=("", ""), metadata={
        "help": "compare two result folders written by --out, mixture by mixture (B - A with 95 % paired bootstrap "
                "intervals); runs nothing else", "metavar": ("A", "B")})


def build_parser() -> StrictParser:
    """One flag per EvaluateConfig field; abbreviated or unknown flags are errors."""
    parser = StrictParser(description=__doc__)
    add_config_flags(parser, EvaluateConfig)
    return parser


def check_flags(config: EvaluateConfig) -> str | None:
    """The first inconsistent flag combination, as a message for parser.error (None when all is well)."""
    if any(config.compare):
        given = [f"--{name}" for name in ("estimates", "tagger", "separator", "out", "save_waveforms", "plots",
                                          "submission", "report") if getattr(config, name)]
        return f"--compare only reads two result folders and prints; drop {', '.join(given)}" if given else None
    if config.report and not config.out:
        return "--report writes OUT/report: pass --out DIR"
    if config.report and config.submission:
        return "--report goes with an evaluation run (--estimates, or --tagger/--separator without --submission)"
    inference_flags = [f"--{name}" for name in ("tagger", "separator", "save_waveforms", "float_wav", "plots",
                                                "submission") if getattr(config, name)]
    if config.estimates:
        return (f"--estimates scores existing files; it does not combine with {', '.join(inference_flags)}"
                if inference_flags else None)
    if not (config.tagger or config.separator):
        return "pass --tagger CKPT --separator CKPT (run the system) or --estimates DIR (score separated WAVs)"
    if not (config.tagger and config.separator):
        return f"inference needs both checkpoints: --{'separator' if config.tagger else 'tagger'} is missing"
    if config.batch_size < 1 or config.num_workers < 0 or config.plots < 0:
        return "--batch_size must be >= 1, --num_workers and --plots >= 0"
    if config.float_wav and not config.save_waveforms:
        return "--float_wav applies to --save_waveforms"
    if (config.save_waveforms or config.plots or config.submission) and not config.out:
        return "--save_waveforms, --plots and --submission write files: pass --out DIR"
    if config.submission:
        if config.save_waveforms or config.plots:
            return "--submission writes its own 16-bit WAVs; drop --save_waveforms / --float_wav / --plots"
        for name in ("author", "affiliation"):
            if not SUBMISSION_NAME_PART.fullmatch(getattr(config, name)):
                return (f"--submission needs --{name} made of letters, digits and '-' (got "
                        f"{getattr(config, name)!r}); the folder is <author>_<affiliation>_task4_<number>")
        if config.number < 1:
            return f"--number must be a positive submission number, got {config.number}"
    return None


class InputError(Exception):
    """Bad evaluation input; the message lists every offending file."""


def _problem_report(title: str, problems: list[str]) -> str:
    return f"{title} ({len(problems)}):\n" + "\n".join(f"  {problem}" for problem in problems)


# ----------------------------------------------------------------------------------------------------------
# File reading (shared by all modes)
# ----------------------------------------------------------------------------------------------------------
def list_soundscapes(data_dir: Path, need_references: bool = True) -> list[Path]:
    """Sorted mixture WAVs of DATA/soundscape; checks that the folders exist."""
    folders = [data_dir / "soundscape"] + ([data_dir / "oracle_target"] if need_references else [])
    missing = [str(folder) for folder in ([data_dir] if not data_dir.is_dir() else folders) if not folder.is_dir()]
    if missing:
        expected = " and ".join(f"DATA/{folder.name}" for folder in folders)
        raise InputError(_problem_report(f"missing data folder(s); expected {expected}", missing))
    paths = sorted(path for path in (data_dir / "soundscape").iterdir() if path.suffix == ".wav")
    if not paths:
        raise InputError(f"no .wav mixtures in {data_dir / 'soundscape'}")
    return paths


def read_header(path: Path):
    """devset.audio_info, with an InputError naming the file when it is not readable audio."""
    try:
        return audio_info(path)
    except ValueError as error:
        raise InputError(f"{path}: not a readable WAV file ({str(error).removeprefix(f'{path}: ')})") from None


def check_audio_headers(soundscapes: list[Path], *source_indexes: dict) -> tuple[list[str], dict[str, int]]:
    """Sample rate, channel count and length of every mixture and source file, from the headers only.

    source_indexes: {soundscape: [(path, label)]} of the reference files first, then of estimate files. Each
    problem is reported once, on the file at fault: a mixture whose reference files all have another length is
    itself truncated or damaged (unless it has the usual mixture length and they do not), and its sources are
    then not measured against it. Returns (problems, {soundscape: samples} of the mixtures without problems).
    """
    files = list(dict.fromkeys(soundscapes + [path for index in source_indexes for sources in index.values()
                                              for path, _ in sources]))
    headers, problems = {}, []
    for path in files:
        try:
            headers[path] = read_header(path)
        except InputError as error:
            problems.append(str(error))
    frames = collections.Counter(headers[path].frames for path in soundscapes if path in headers)
    usual = next((length for length, count in frames.most_common(1)  # the length of most mixtures, if any
                  if count > 1 and count > len(soundscapes) / 2), None)
    lengths = {}
    for mixture_path in soundscapes:
        if mixture_path not in headers:
            continue  # unreadable, reported above
        mixture, known = headers[mixture_path], len(problems)
        if mixture.samplerate != SAMPLE_RATE or mixture.channels != MIXTURE_CHANNELS:
            problems.append(f"{mixture_path}: {mixture.samplerate} Hz, {mixture.channels} channels; expected "
                            f"{SAMPLE_RATE} Hz, {MIXTURE_CHANNELS} channels")
        sources = [[path for path, _ in index.get(mixture_path.stem, []) if path in headers]
                   for index in source_indexes]  # references first
        expected = mixture.frames
        reference_lengths = {headers[path].frames for path in (sources[0] if sources else [])}
        if len(reference_lengths) == 1 and expected not in reference_lengths:
            (length,) = reference_lengths
            if not (expected == usual and length != usual):
                problems.append(f"{mixture_path}: {'shorter' if expected < length else 'longer'} than its reference "
                                f"files ({expected} samples, they have {length}); is the soundscape truncated or "
                                "damaged?")
                expected = None
        for path in dict.fromkeys(path for paths in sources for path in paths):
            info, wrong = headers[path], []
            if info.samplerate != SAMPLE_RATE:
                wrong.append(f"sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz")
            if info.channels != 1:
                wrong.append(f"{info.channels} channels, expected mono")
            if expected is not None and info.frames != expected:
                wrong.append(f"length {info.frames} samples, expected {expected} (the mixture's)")
            if wrong:
                problems.append(f"{path}: " + "; ".join(wrong))
        if len(problems) == known:
            lengths[mixture_path.stem] = mixture.frames
    return problems, lengths


def soundscape_root(path: Path) -> Path:
    """The folder holding soundscape/: PATH itself, or its parent when PATH is the soundscape folder."""
    return path.parent if path.name == "soundscape" and not (path / "soundscape").is_dir() else path


def list_inputs(data_dir: Path, with_references: bool, batch_size: int):
    """Mixtures of DATA/soundscape (and their reference files), every header checked before any model runs.

    Returns (mixture paths, {soundscape: [(path, label)]} or None without references). Batches need mixtures of
    one length, so with batch_size > 1 differing lengths are an error too.
    """
    soundscapes = list_soundscapes(data_dir, need_references=with_references)
    references, problems = None, []
    if with_references:
        references, problems = index_sources(data_dir / "oracle_target", [path.stem for path in soundscapes])
    header_problems, mixture_lengths = check_audio_headers(soundscapes, *([references] if with_references else []))
    problems += header_problems
    lengths = set(mixture_lengths.values())  # of the mixtures without problems: only for those would batch 1 help
    if batch_size > 1 and len(lengths) > 1:
        problems.append(f"{data_dir / 'soundscape'}: mixtures of different lengths ({min(lengths)} to "
                        f"{max(lengths)} samples) cannot be batched; use --batch_size 1")
    if problems:
        raise InputError(_problem_report("bad evaluation input", problems))
    return soundscapes, references


def open_dataset(data_dir: Path, with_references: bool, batch_size: int) -> WaveformDataset:
    """synth.WaveformDataset of DATA (items: 'soundscape', 'mixture' float32 [4, L] and, with references, 'label'
    (>= 3 labels, silence-padded) and 'dry_sources' float32 [R, 1, L]), after list_inputs checked every file."""
    list_inputs(data_dir, with_references, batch_size)
    return WaveformDataset(data_dir / "soundscape", data_dir / "oracle_target" if with_references else None)


def collate_soundscapes(items: list[dict]) -> dict:
    """synth.collate after padding the references of a batch to a common count (a soundscape may have > 3)."""
    if "label" in items[0]:
        count = max(len(item["label"]) for item in items)
        for item in items:
            missing = count - len(item["label"])
            item["label"] = item["label"] + [SILENCE] * missing
            for key in ("label_vector", "dry_sources"):  # all-zero rows = silence
                item[key] = torch.cat([item[key], item[key].new_zeros(missing, *item[key].shape[1:])])
    return collate(items)


# ----------------------------------------------------------------------------------------------------------
# Scoring and aggregation
# ----------------------------------------------------------------------------------------------------------
class Progress:
    """A single stderr line with count, rate and ETA; redrawn in place on a terminal, else every 10 s."""

    def __init__(self, total: int, what: str = "mixtures", verb: str = "scored"):
        self.total, self.what, self.verb, self.done = total, what, verb, 0
        self.start = self.last = time.perf_counter()
        self.interactive = sys.stderr.isatty()
        self.shown = False

    def step(self, count: int = 1):
        self.done += count
        now = time.perf_counter()
        if now - self.last < (0.5 if self.interactive else 10.0) and self.done < self.total:
            return
        if not self.shown and self.done == self.total:
            return  # a run that finished before the first report needs no progress line
        self.last, self.shown = now, True
        rate = self.done / max(now - self.start, 1e-9)
        line = (f"{self.verb} {self.done}/{self.total} {self.what} ({rate:.1f}/s, "
                f"ETA {(self.total - self.done) / rate:.0f} s)")
        print(("\r" + line) if self.interactive else line, end="" if self.interactive else "\n",
              file=sys.stderr, flush=True)
        if self.interactive and self.done == self.total:
            print(file=sys.stderr)


def score_mixtures(accumulator: MetricAccumulator, est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures,
                   soundscapes) -> list[float | None]:
    """accumulator.update (arguments and shapes as there), then each mixture's estimates paired with its
    references (report.pair_sources), kept in its record as 'sources'. Returns the per-mixture values."""
    values = accumulator.update(est_labels, est_waveforms, ref_labels, ref_waveforms, mixtures, soundscapes)
    for b, record in enumerate(accumulator.details[-len(values):]):
        record["sources"] = report.pair_sources(record["est_labels"], est_waveforms[b], record["ref_labels"],
                                                ref_waveforms[b], record["pairs"])
    return values


def score_estimates(data_dir: Path, estimate_dir: Path, metric: str) -> tuple[MetricAccumulator, dict]:
    """Check every input file first (all problems in one error), then score mixture by mixture.

    Returns the accumulator (per-mixture details and summary) and timings {'mixtures', 'read_seconds',
    'metric_seconds'}.
    """
    soundscapes = list_soundscapes(data_dir)
    if not estimate_dir.is_dir():
        raise InputError(f"estimate folder {estimate_dir} does not exist")
    names = [path.stem for path in soundscapes]
    references, reference_problems = index_sources(data_dir / "oracle_target", names)
    estimates, estimate_problems = index_sources(estimate_dir, names)
    problems = reference_problems + estimate_problems
    problems += check_audio_headers(soundscapes, references, estimates)[0]
    if problems:
        raise InputError(_problem_report("bad evaluation input", problems))
    if not any(estimates.values()):
        print(f"warning: no estimate WAVs in {estimate_dir}; every mixture is scored as predicted silence",
              file=sys.stderr)

    accumulator = MetricAccumulator(metric)
    progress = Progress(len(soundscapes))
    read_seconds = 0.0
    dataset = WaveformDataset(data_dir / "soundscape", data_dir / "oracle_target", estimate_dir=estimate_dir)
    for index in range(len(dataset)):
        start = time.perf_counter()
        item = dataset[index]
        read_seconds += time.perf_counter() - start
        score_mixtures(accumulator, [item["est_label"]], item["est_dry_sources"][None, :, 0], [item["label"]],
                       item["dry_sources"][None, :, 0], item["mixture"][None, 0],
                       [item["soundscape"]])  # (1, S, L), (1, R, L), (1, L) = mic channel 0
        progress.step()
    timing = {"mixtures": len(soundscapes), "read_seconds": read_seconds, "metric_seconds": accumulator.seconds}
    return accumulator, timing


def _json_number(value):
    """NaN and None both become JSON null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def build_results(accumulator: MetricAccumulator, config: EvaluateConfig, nparams: int | None = None,
                  probabilities: dict[str, list[float]] | None = None, models: dict | None = None) -> dict:
    """The official results.json layout (plus the 2025 variant for --metric ca-sdri) with each mixture's source
    pairing added. Inference adds nparams, the tagger's probability of each chosen label per output slot (under
    PROBABILITY_KEY) and the model configs (under config.models)."""
    summary = accumulator.summary()
    name = summary["metric"]
    if accumulator.metric == "capi-sdri":
        label_metrics = {"accuracy_mix": _json_number(summary["accuracy_mix"]),
                         "accuracy_src": _json_number(summary["accuracy_src"])}
    else:
        label_metrics = {"accuracy": _json_number(summary["accuracy_mix"])}
    details = []
    for item in accumulator.details:
        detail = {"soundscape": item["soundscape"], "ref_labels": item["ref_labels"], "est_labels": item["est_labels"]}
        if probabilities is not None:
            detail[PROBABILITY_KEY] = probabilities[item["soundscape"]]
        detail["metrics"] = [{"metric": name, "value": _json_number(item["value"])},
                             {"metric": "label_metrics", "value": item["label_counts"]}]
        detail["sources"] = item["sources"]
        details.append(detail)
    results = {name: {"mean": _json_number(summary["mean"])}, "label_metrics": label_metrics}
    if nparams is not None:
        results["nparams"] = nparams
    record = dataclasses.asdict(config) | ({"models": models} if models else {})
    return results | {"details": details, "config": record}


def official_layout(results: dict) -> dict:
    """build_results' dict with exactly the official per-mixture keys (for the submission package)."""
    details = [{OFFICIAL_PROBABILITY_KEY if key == PROBABILITY_KEY else key: value
                for key, value in detail.items() if key != "sources"} for detail in results["details"]]
    return results | {"details": details}


# ----------------------------------------------------------------------------------------------------------
# Printing and writing
# ----------------------------------------------------------------------------------------------------------
def _format(value) -> str:
    return "nan" if value is None else f"{value:.3f}"


def print_results(results: dict, timing: dict | None = None):
    """The official summary lines; with timing also the time spent reading files and computing metrics."""
    name = next(key for key in results if key in METRIC_NAMES.values())
    print(f"{name}: {_format(results[name]['mean'])}")
    label_metrics = results["label_metrics"]
    if "accuracy_mix" in label_metrics:
        print(f"Accuracy (mixture): {_format(label_metrics['accuracy_mix'])}")
        print(f"Accuracy (source) : {_format(label_metrics['accuracy_src'])}")
    else:
        print(f"Label accuracy: {_format(label_metrics['accuracy'])}")
    if "nparams" in results:
        print(f"Total parameters: {results['nparams']:,}")
    if timing and timing["mixtures"]:
        mixtures = timing["mixtures"]
        print(f"Metric computation: {1e3 * timing['metric_seconds'] / mixtures:.3f} ms per mixture "
              f"(file reading {1e3 * timing['read_seconds'] / mixtures:.1f} ms per mixture, {mixtures} mixtures)")


def results_path(out: str, overwrite: bool) -> Path | None:
    """OUT/results.json, or None without --out; refuses an existing file unless overwrite (checked before
    scoring so no work is lost)."""
    if not out:
        return None
    path = Path(out) / RESULTS_FILENAME
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    return path


def write_results(results: dict, path: Path):
    """Atomic write: a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------
# Inference: tag and separate with the S5 system
# ----------------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device (check the driver and the torch wheel's CUDA "
                         "version), or use --device cpu")
    return torch.device(name)


def load_checkpoint(loader, path: str, kind: str):
    """model.load_tagger / load_separator with every failure turned into an InputError naming the file."""
    try:
        return loader(path)
    except (FileNotFoundError, ValueError) as error:  # model.py's messages already name the file
        raise InputError(str(error)) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, AttributeError) as error:
        raise InputError(f"{path}: cannot read it as a {kind} checkpoint ({type(error).__name__}: {error})") from None


def load_system(config: EvaluateConfig, device: torch.device) -> tuple[S5, int, dict]:
    """(S5 system in eval mode on device, parameter count as the official evaluator reports it, model record)."""
    tagger = load_checkpoint(load_tagger, config.tagger, "tagger")
    separator = load_checkpoint(load_separator, config.separator, "separator")
    if separator.config.input_channels != MIXTURE_CHANNELS:
        raise InputError(f"{config.separator}: the separator reads {separator.config.input_channels} channels, "
                         f"expected {MIXTURE_CHANNELS} (the soundscapes' microphones)")
    system = S5(tagger, separator).to(device).eval()
    torch.set_float32_matmul_precision("high" if config.tf32 else "highest")  # 'highest' is torch's default
    models = {"tagger": config.tagger, "tagger_config": dataclasses.asdict(tagger.config),
              "separator": config.separator, "separator_config": dataclasses.asdict(separator.config)}
    return system, count_parameters(system), models


def separate_all(system: S5, dataset: WaveformDataset, config: EvaluateConfig, device: torch.device,
                 timing: dict):
    """Yields (batch, est_labels, probabilities float32 [B, 3], waveforms float32 [B, 3, L]) on the CPU in
    soundscape order, while DataLoader workers read the next batches. Adds to timing['model_seconds'] and
    timing['soundscapes']."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers,
                                         collate_fn=collate_soundscapes, pin_memory=device.type == "cuda")
    progress = Progress(len(dataset), "soundscapes", "separated")
    for batch in loader:
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            output = system(batch["mixture"].to(device, non_blocking=True))
        waveforms = output["waveform"].float().cpu()  # (B, 3, L); the copy also waits for the GPU
        timing["model_seconds"] += time.perf_counter() - start
        timing["soundscapes"] += len(waveforms)
        yield batch, output["label"], output["probabilities"].float().cpu(), waveforms
        progress.step(len(waveforms))


def source_filename(soundscape: str, slot: int, label: str) -> str:
    """Official estimate name; slot = output slot after the silent slots were moved last."""
    return f"{soundscape}_{slot}_{label}.wav"


def write_sources(folder: Path, soundscape: str, labels: list[str], waveforms: torch.Tensor,
                  subtype: str) -> list[tuple[int, str]]:
    """Writes the non-silent slots of waveforms [3, L] as mono 32 kHz WAVs -> [(slot, file name)]. PCM_16 quantises
    and clips to [-1, 1] exactly like the official sf.write default."""
    written = []
    for slot, label in enumerate(labels):
        if label == SILENCE:
            continue
        path = folder / source_filename(soundscape, slot, label)
        if path.exists():
            raise InputError(f"{path} already exists; refusing to overwrite it")
        soundfile.write(str(path), waveforms[slot].numpy(), SAMPLE_RATE, subtype=subtype)
        written.append((slot, path.name))
    return written


def evaluate_system(system: S5, dataset: WaveformDataset, config: EvaluateConfig, device: torch.device,
                    waveform_dir: Path | None = None, plot_dir: Path | None = None, oracle: bool = False):
    """Separate every soundscape and score it against its oracle targets (mixture = mic channel 0, like the
    official evaluator). Returns (accumulator, {soundscape: 3 slot probabilities}, timing, oracle accumulator).

    With oracle, the separator also runs with the reference labels as queries (the first 3 of a mixture with
    more) and that output is scored in a second accumulator (else None): what the separator delivers when the
    tagger is perfect."""
    accumulator = MetricAccumulator(config.metric)
    oracle_accumulator = MetricAccumulator(config.metric) if oracle else None
    probabilities, timing = {}, {"model_seconds": 0.0, "soundscapes": 0, "oracle_seconds": 0.0}
    start = time.perf_counter()
    for batch, labels, slot_probabilities, waveforms in separate_all(system, dataset, config, device, timing):
        references = batch["dry_sources"][:, :, 0]  # (B, R, L)
        values = score_mixtures(accumulator, labels, waveforms, batch["label"], references,
                                batch["mixture"][:, 0], batch["soundscape"])  # (B, 3, L), (B, R, L), (B, L)
        if oracle_accumulator is not None:
            oracle_start = time.perf_counter()
            queries = batch["label_vector"][:, :NUM_SLOTS]  # (B, 3, 18) one-hot rows, silence = zeros
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                oracle_waveforms = system.separator(batch["mixture"].to(device), queries.to(device))
            oracle_waveforms = oracle_waveforms.float().cpu()  # (B, 3, L)
            timing["oracle_seconds"] += time.perf_counter() - oracle_start
            score_mixtures(oracle_accumulator, [row[:NUM_SLOTS] for row in batch["label"]], oracle_waveforms,
                           batch["label"], references, batch["mixture"][:, 0], batch["soundscape"])
        for b, soundscape in enumerate(batch["soundscape"]):
            probabilities[soundscape] = slot_probabilities[b].tolist()
            if waveform_dir is not None:
                write_sources(waveform_dir, soundscape, labels[b], waveforms[b], WAV_SUBTYPES[config.float_wav])
            if plot_dir is not None and len(probabilities) <= config.plots:
                caption = "no target sources" if values[b] is None else \
                    f"{METRIC_NAMES[config.metric]} {values[b]:.2f} dB"
                plot_soundscape(plot_dir / f"{soundscape}.png", f"{soundscape}: {caption}", batch["mixture"][b, 0],
                                (batch["label"][b], references[b]),
                                (labels[b], waveforms[b], slot_probabilities[b]))
    timing["seconds"] = time.perf_counter() - start
    return accumulator, probabilities, timing, oracle_accumulator


def print_speed(timing: dict, config: EvaluateConfig, device: torch.device):
    count = timing["soundscapes"]
    print(f"Inference speed: {count / timing['seconds']:.2f} soundscapes/s overall, "
          f"{count / max(timing['model_seconds'], 1e-9):.2f} soundscapes/s in the networks ({count} soundscapes, "
          f"batch {config.batch_size}, {device.type}{', bf16' if config.bf16 else ''})"
          + (f"; the oracle-label pass took {timing['oracle_seconds']:.1f} s more" if timing.get("oracle_seconds")
             else ""))


# ----------------------------------------------------------------------------------------------------------
# Spectrogram plots (matplotlib is optional)
# ----------------------------------------------------------------------------------------------------------
def matplotlib_figure():
    """matplotlib's Figure class (no pyplot, so no display is needed); a clear error when it is missing."""
    figure = report.figure_class()
    if figure is None:
        raise InputError("--plots needs matplotlib, which is not installed: pip install matplotlib "
                         "(or run without --plots)")
    return figure


def log_spectrogram(waveform: torch.Tensor) -> torch.Tensor:
    """waveform [L] -> magnitude in dB [F, T]."""
    spectrum = torch.stft(waveform.float(), PLOT_FFT, PLOT_HOP, window=torch.hann_window(PLOT_FFT),
                          return_complex=True)  # (F, T)
    return 20 * torch.log10(spectrum.abs() + 1e-8)


def plot_soundscape(path: Path, title: str, mixture: torch.Tensor, references: tuple, estimates: tuple):
    """One PNG: spectrograms of mixture [L], references (labels, [R, L]) and estimates (labels, [3, L],
    probabilities [3]) on one colour scale, silent slots left out."""
    ref_labels, ref_waveforms = references
    est_labels, est_waveforms, probabilities = estimates
    rows = [("mixture (mic 0)", mixture)]
    rows += [(f"reference {slot}: {label}", ref_waveforms[slot])
             for slot, label in enumerate(ref_labels) if label != SILENCE]
    rows += [(f"estimate {slot}: {label} (p = {probabilities[slot]:.2f})", est_waveforms[slot])
             for slot, label in enumerate(est_labels) if label != SILENCE]
    spectrograms = [log_spectrogram(waveform) for _, waveform in rows]
    top = max(float(spectrogram.max()) for spectrogram in spectrograms)
    figure = matplotlib_figure()(figsize=(10, 1.6 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 1, sharex=True, squeeze=False)[:, 0]
    extent = (0, mixture.shape[-1] / SAMPLE_RATE, 0, SAMPLE_RATE / 2000)  # seconds, kHz
    for axis, (name, _), spectrogram in zip(axes, rows, spectrograms):
        image = axis.imshow(spectrogram.numpy(), origin="lower", aspect="auto", extent=extent, cmap="magma",
                            vmin=top - PLOT_RANGE_DB, vmax=top, interpolation="nearest")
        axis.set_title(name, loc="left", fontsize=9)
        axis.set_ylabel("kHz")
    axes[-1].set_xlabel("time (s)")
    figure.colorbar(image, ax=list(axes), label="dB")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------------------
# Submission package (the official generate_waveform.py behaviour)
# ----------------------------------------------------------------------------------------------------------
def submission_name(config: EvaluateConfig) -> str:
    return f"{config.author}_{config.affiliation}_task4_{config.number}"


def check_submission_target(out: Path, name: str):
    """Refuses to touch an existing submission: a non-empty eval_out (the official check), its JSONs or zip."""
    eval_out = out / name / "eval_out"
    if eval_out.is_dir() and any(eval_out.iterdir()):
        raise InputError(f"{eval_out} exists and is not empty; remove it or choose another --number")
    existing = [str(path) for path in (out / name / DEV_RESULTS_FILENAME, out / name / EVAL_RESULTS_FILENAME,
                                       out / f"{name}.zip") if path.exists()]
    if existing:
        raise InputError(f"refusing to overwrite {', '.join(existing)}; remove them or choose another --number")


def separate_eval_set(system: S5, dataset: WaveformDataset, config: EvaluateConfig, device: torch.device,
                      eval_out: Path) -> tuple[list[dict], dict]:
    """16-bit WAVs of every non-silent slot -> ([{'soundscape', 'estimate': [{'filename', 'label',
    'probability'}]}], timing); probability = the tagger's max softmax of that slot."""
    entries, timing = [], {"model_seconds": 0.0, "soundscapes": 0}
    start = time.perf_counter()
    for batch, labels, probabilities, waveforms in separate_all(system, dataset, config, device, timing):
        for b, soundscape in enumerate(batch["soundscape"]):
            written = write_sources(eval_out, soundscape, labels[b], waveforms[b], WAV_SUBTYPES[False])
            entries.append({"soundscape": soundscape, "estimate": [
                {"filename": filename, "label": labels[b][slot], "probability": float(probabilities[b, slot])}
                for slot, filename in written]})
    timing["seconds"] = time.perf_counter() - start
    return entries, timing


def verify_dev_results(path: Path, data_dir: Path):
    """The soundscapes of dev_set_test_results.json are exactly the WAVs of DATA/soundscape, each once."""
    listed = [detail["soundscape"] for detail in json.loads(path.read_text())["details"]]
    present = sorted(wav.stem for wav in (data_dir / "soundscape").glob("*.wav"))
    if len(set(listed)) != len(listed) or sorted(listed) != present:
        raise InputError(f"{path}: its soundscapes do not match {data_dir / 'soundscape'} "
                         f"(missing: {sorted(set(present) - set(listed))[:5]}, "
                         f"extra: {sorted(set(listed) - set(present))[:5]})")


def verify_eval_output(folder: Path, soundscapes: list[Path]):
    """Checks the written files like the official script, and their audio format: every eval_out file is
    <soundscape>_<i>_<label>.wav of exactly one soundscape with a valid label, mono 32 kHz 16-bit PCM as long as
    its mixture, and eval_results.json lists exactly these files (each once, with the same label)."""
    frames = {path.stem: read_header(path).frames for path in soundscapes}
    files = sorted(path.name for path in (folder / "eval_out").iterdir())  # non-WAV entries fail the list check
    index, problems = index_sources(folder / "eval_out", list(frames))
    for soundscape, sources in index.items():
        for path, _ in sources:
            if parse_source_name(soundscape, path.name)[0] is None:
                problems.append(f"{path}: expected '<soundscape>_<i>_<label>.wav' (with the output slot i)")
                continue
            info = read_header(path)
            if (info.samplerate, info.channels, info.subtype, info.frames) != (SAMPLE_RATE, 1, "PCM_16",
                                                                               frames[soundscape]):
                problems.append(f"{path}: {info.samplerate} Hz, {info.channels} channels, {info.subtype}, "
                                f"{info.frames} samples; expected {SAMPLE_RATE} Hz mono PCM_16 of "
                                f"{frames[soundscape]} samples")
    estimates = [estimate for entry in json.loads((folder / EVAL_RESULTS_FILENAME).read_text())["probabilities"]
                 for estimate in entry["estimate"]]
    listed = [estimate["filename"] for estimate in estimates]
    if len(set(listed)) != len(listed) or set(listed) != set(files):
        problems.append(f"{folder / EVAL_RESULTS_FILENAME}: lists {len(listed)} files, eval_out holds {len(files)} "
                        f"(differences: {sorted(set(listed) ^ set(files))[:5]})")
    problems += [f"{folder / EVAL_RESULTS_FILENAME}: {estimate['filename']} has label {estimate['label']!r}"
                 for estimate in estimates if not estimate["filename"].endswith(f"_{estimate['label']}.wav")
                 or estimate["label"] not in LABELS]
    if problems:
        raise InputError(_problem_report("submission check failed", problems))


def zip_submission(out: Path, name: str) -> Path:
    """OUT/N.zip holding N/eval_out/*.wav, N/eval_results.json and N/dev_set_test_results.json (like `zip -r`)."""
    folder = out / name
    members = sorted((folder / "eval_out").iterdir())
    members += [folder / EVAL_RESULTS_FILENAME, folder / DEV_RESULTS_FILENAME]
    archive, temporary = out / f"{name}.zip", out / f"{name}.zip.tmp"
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as package:
        for path in members:
            package.write(path, path.relative_to(out).as_posix())
    os.replace(temporary, archive)
    return archive


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def output_folders(config: EvaluateConfig) -> dict[Path, str]:
    """The folders this run writes files into -> the pattern of its files there."""
    return {Path(config.out) / name: pattern for flag, (name, pattern) in OUTPUT_FOLDERS.items()
            if getattr(config, flag)}


def earlier_files(folders: dict[Path, str], overwrite: bool) -> dict[Path, list[Path]]:
    """Files of an earlier run in the output folders; an error unless overwrite (checked before any work)."""
    stale = {folder: sorted(path for path in folder.glob(pattern) if path.is_file())
             for folder, pattern in folders.items() if folder.is_dir()}
    stale = {folder: paths for folder, paths in stale.items() if paths}
    if stale and not overwrite:
        raise InputError(f"{', '.join(map(str, stale))} already hold files of an earlier run; pass --overwrite to "
                         "replace them or choose another --out")
    return stale


def prepare_folders(folders: dict[Path, str], stale: dict[Path, list[Path]]):
    """Removes the earlier run's files (old estimates must not mix with the new ones), creates the folders."""
    for folder, paths in stale.items():
        for path in paths:
            path.unlink()
        print(f"removed {len(paths)} files of an earlier run from {folder}", file=sys.stderr)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)


def write_outputs(config: EvaluateConfig, results: dict, output: Path | None, folders: dict[Path, str],
                  system: dict, oracle_results: dict | None = None):
    """results.json, the report (with --report) and one line per written folder."""
    if output is not None:
        write_results(results, output)
        print(f"wrote {output}")
    if config.report:
        report.write_report(Path(config.out) / "report", results, oracle_results, system, config.data)
        if report.figure_class() is None:
            print(report.NO_FIGURES, file=sys.stderr)
    for folder, pattern in folders.items():
        names = sorted(path.name for path in folder.glob(pattern))
        print(f"wrote {len(names)} files to {folder}" + (f" ({', '.join(names)})" if len(names) <= 5 else ""))


def run_scoring(config: EvaluateConfig):
    """--estimates mode: score WAV files, print the summary, write OUT/results.json (and the report)."""
    torch.set_num_threads(1)  # the per-mixture work is small; threads only add overhead
    output = results_path(config.out, config.overwrite)
    folders = output_folders(config)
    stale = earlier_files(folders, config.overwrite)
    accumulator, timing = score_estimates(Path(config.data), Path(config.estimates), config.metric)
    results = build_results(accumulator, config)
    print_results(results, timing)
    prepare_folders(folders, stale)
    write_outputs(config, results, output, folders, {"estimates": config.estimates})


def run_inference(config: EvaluateConfig):
    """--tagger/--separator mode: separate the dev test set, print and write the official results (and the
    report, with its oracle-label run)."""
    output = results_path(config.out, config.overwrite)
    if config.plots:
        matplotlib_figure()  # fail before the long run, not after it
    folders = output_folders(config)
    stale = earlier_files(folders, config.overwrite)
    device = resolve_device(config.device)
    dataset = open_dataset(Path(config.data), True, config.batch_size)
    system, nparams, models = load_system(config, device)
    prepare_folders(folders, stale)
    accumulator, probabilities, timing, oracle = evaluate_system(
        system, dataset, config, device, waveform_dir=Path(config.out) / "waveforms" if config.save_waveforms else None,
        plot_dir=Path(config.out) / "plots" if config.plots else None, oracle=config.report)
    results = build_results(accumulator, config, nparams, probabilities, models)
    print_results(results)
    print_speed(timing, config, device)
    write_outputs(config, results, output, folders, {"tagger": config.tagger, "separator": config.separator},
                  build_results(oracle, config) if oracle is not None else None)


def run_compare(config: EvaluateConfig):
    """--compare A B: the paired comparison of two results.json files, printed."""
    loaded = []
    for folder in config.compare:
        path = Path(folder) / RESULTS_FILENAME if Path(folder).is_dir() else Path(folder)
        if not path.is_file():
            raise InputError(f"--compare {folder}: no {RESULTS_FILENAME} there; expected a folder written by "
                             "evaluate.py --out (or its results.json)")
        try:
            loaded.append((str(path), json.loads(path.read_text())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{path}: not a readable results file ({error})") from None
    (name_a, results_a), (name_b, results_b) = loaded
    try:
        comparison = report.compare_results(results_a, results_b, name_a, name_b)
    except ValueError as error:
        raise InputError(str(error)) from None
    print(report.format_comparison(comparison))


def run_submission(config: EvaluateConfig):
    """--submission mode: dev test results, eval-set WAVs and probabilities, the official checks, the zip."""
    out, name = Path(config.out), submission_name(config)
    folder = out / name
    check_submission_target(out, name)
    device = resolve_device(config.device)
    dev_dataset = open_dataset(Path(config.data), True, config.batch_size)
    eval_root = soundscape_root(Path(config.eval_data))
    eval_soundscapes, _ = list_inputs(eval_root, False, config.batch_size)
    system, nparams, models = load_system(config, device)

    print(f"[1/3] dev test set {config.data} -> {folder / DEV_RESULTS_FILENAME}", file=sys.stderr)
    accumulator, probabilities, timing, _ = evaluate_system(system, dev_dataset, config, device)
    results = build_results(accumulator, config, nparams, probabilities, models)
    print_results(results)
    print_speed(timing, config, device)
    write_results(official_layout(results), folder / DEV_RESULTS_FILENAME)
    verify_dev_results(folder / DEV_RESULTS_FILENAME, Path(config.data))

    print(f"[2/3] evaluation set {eval_root / 'soundscape'} -> {folder / 'eval_out'}", file=sys.stderr)
    (folder / "eval_out").mkdir(parents=True, exist_ok=True)
    entries, timing = separate_eval_set(system, WaveformDataset(eval_root / "soundscape"), config, device,
                                        folder / "eval_out")
    print_speed(timing, config, device)
    write_results({"nparams": nparams, "probabilities": entries,
                   "config": dataclasses.asdict(config) | {"models": models}}, folder / EVAL_RESULTS_FILENAME)

    print("[3/3] checking and packing the submission", file=sys.stderr)
    verify_eval_output(folder, eval_soundscapes)
    archive = zip_submission(out, name)
    count = sum(len(entry["estimate"]) for entry in entries)
    print(f"wrote {archive} ({count} WAVs for {len(entries)} eval soundscapes, "
          f"{archive.stat().st_size / 2**20:.1f} MiB)")


def main():
    parser = build_parser()
    config = config_from_args(parser.parse_args(), EvaluateConfig)
    problem = check_flags(config)
    if problem:
        parser.error(problem)
    try:
        if any(config.compare):
            run_compare(config)
        elif config.estimates:
            run_scoring(config)
        elif config.submission:
            run_submission(config)
        else:
            run_inference(config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
