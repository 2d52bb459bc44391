"""Every benchmark of the project in one command: synthesis, models, training throughput of the official recipes,
evaluation and the metric. Prints one table that names the machine and writes the numbers to bench.json.

    python bench.py --device cpu --quick            # minutes on a CPU
    python bench.py --device cuda --quick           # every GPU cell of BENCHMARKS.md, within 8 minutes on one GPU
    python bench.py --only synthesis,metric         # some sections only
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench.py --device cpu
                                                    # as on a CPU without AVX-512 (torch, oneDNN, MKL)

The synthesis, training and evaluation sections run on a dev-set-like demo set (rooms of 48 positions x 4 channels x
174763 taps, events up to 10 s), built once in --data when it is missing. Models start from random weights.
"""
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import data_prep
import model
import synth
import train
from cli import (StrictParser, add_config_flags, config_from_args, cpu_has_native_bf16, keep_freed_memory,
                 resolve_device)
from devset import LABELS, NUM_SLOTS, SAMPLE_RATE, SILENCE
from metrics import capi_sdri

SECTIONS = ("synthesis", "models", "training", "evaluation", "metric")
RECIPES = ("m2dat_1c", "m2dat_4c", "resunetk_capisdr")


@dataclasses.dataclass
class BenchConfig:
    device: str = "auto"  # 'cpu', 'cuda' or 'auto'
    quick: bool = False  # fewer repetitions: minutes instead of tens of minutes
    only: str = ",".join(SECTIONS)  # comma-separated sections to run
    data: str = "bench_data"  # the dev-set-like demo set (built here when missing: 1.2 GB)
    out: str = "bench.json"  # where the numbers are written


# ---- Helpers -----------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    """CPU model, torch's kernel level, native bf16, threads, GPU and versions: the header of every result."""
    name = platform.processor() or "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": name, "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "bf16_on_cpu": {True: "native", False: "emulated", None: "not detected"}[cpu_has_native_bf16()],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none",
            "torch": torch.__version__, "python": platform.python_version()}


def timed(function, repeats: int, device) -> float:
    """Median wall seconds of `function` over `repeats` calls after one warm-up (waits for the GPU)."""
    def once():  # each call ends with the GPU idle, so the next one starts clean
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    once()
    return statistics.median([once() for _ in range(repeats)])


# ---- Sections: each returns rows (item, value, unit) -------------------------------------------------------------
def bench_synthesis(config: BenchConfig, device, data: Path) -> list:
    """Worker ms per mixture, device mixtures/s on whole batches, one-at-a-time rendering, `data_prep.py render`."""
    rows, count, threads = [], 32 if config.quick else 96, torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker's view: one core
    styles = (("tagger-style (1 channel, no dry)", synth.SceneConfig(nevent_range=(0, 3)),
               dict(num_channels=1, return_sources=False), 32),
              ("separator-style (4 channels + dry)", synth.SceneConfig(), {}, 4))
    for name, scene, options, batch_size in styles:
        dataset = synth.GeneratedDataset(data, scene, length=count, seed=0, render=False, **options)
        batches = []

        def read():
            batches[:] = [synth.collate([dataset[index] for index in range(first, first + batch_size)])
                          for first in range(0, count, batch_size)]
        rows.append((f"synthesis: worker, {name}", 1000 * timed(read, 2, torch.device("cpu")) / count, "ms/mixture"))
        renderer = synth.Renderer(data, device, 4096)
        rows.append((f"synthesis: {device.type} renders batches of {batch_size}, {name}",
                     count / timed(lambda: [renderer(batch) for batch in batches], 2, device), "mixtures/s"))
        rendering = synth.GeneratedDataset(data, scene, length=count // 4, seed=0, **options)
        rows.append((f"synthesis: worker renders one mixture at a time, {name}",
                     1000 * timed(lambda: [rendering[index] for index in range(count // 4)], 1,
                                  torch.device("cpu")) / (count // 4), "ms/mixture"))
    files = [path for path, _ in synth.metadata_files(data / "metadata" / "valid.json")]
    scenes = [json.loads(path.read_text()) for path in files]
    for megabytes, name in ((0, "every RIR read and transformed"), (data_prep.RENDER_CACHE_MEGABYTES, "default cache")):
        renderer = synth.Renderer(data, "cpu", megabytes)
        seconds = timed(lambda: [renderer.render_scene(scene) for scene in scenes], 1, torch.device("cpu"))
        rows.append((f"synthesis: data_prep.py render, one core, {name}", 1000 * seconds / len(scenes), "ms/mixture"))
    torch.set_num_threads(threads)
    return rows


def bench_models(config: BenchConfig, device) -> list:
    """Forward + backward ms of the full-size models, batch 2 x 10 s (CPU: 1 s), fp32 / bf16 / compiled."""
    rows, seconds = [], 10.0 if device.type == "cuda" else 1.0
    keep_freed_memory(device)  # as train.py runs them
    torch.manual_seed(0)
    mixture = torch.randn(2, 4, int(seconds * SAMPLE_RATE), device=device) * 0.1
    queries = torch.zeros(2, NUM_SLOTS, len(LABELS), device=device)
    queries[:, 0, 0] = queries[:, 1, 5] = 1.0
    models = {"tagger 1c": (model.Tagger(model.TaggerConfig()), (mixture,)),
              "tagger 4c": (model.Tagger(model.TaggerConfig(num_channels=4)), (mixture,)),
              "separator ResUNetK": (model.Separator(model.SeparatorConfig()), (mixture, queries))}
    variants = [("fp32", False), ("bf16", False)] + ([("bf16 + compile", True)] if device.type == "cuda" else [])
    for name, (module, inputs) in models.items():
        module.to(device).train()
        for variant, compiled in variants:
            forward = torch.compile(module) if compiled else module

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant != "fp32"):
                    output = forward(*inputs)
                output.float().square().mean().backward()
                module.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            milliseconds = 1000 * timed(step, 2 if config.quick else 5, device)
            memory = f" ({torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB)" if device.type == "cuda" else ""
            rows.append((f"models: {name}, {variant}, fwd+bwd batch 2 x {seconds:g} s", milliseconds, "ms" + memory))
        module.cpu()
    return rows


def bench_training(config: BenchConfig, device, data: Path) -> list:
    """The official recipes as train.py runs them (per-device batch, random weights): the last log window's numbers."""
    rows, window = [], (2 if device.type == "cpu" else 10 if config.quick else 30)
    variants = [("fp32", [])] + ([("bf16", ["--dtype", "bf16"]), ("bf16 + compile", ["--dtype", "bf16", "--compile"])]
                                 if device.type == "cuda" else [])
    for recipe in RECIPES:
        for variant, flags in variants:
            if variant.endswith("compile") and config.quick and recipe == "m2dat_4c":
                continue
            with tempfile.TemporaryDirectory() as folder:
                task = "separation" if recipe.startswith("resunet") else "tagging"
                command = [sys.executable, "train.py", "--task", task, "--preset", recipe, "--data_root", str(data),
                           "--out_dir", folder + "/run", "--device", device.type, "--max_steps", str(2 * window),
                           "--log_interval", str(window), "--eval_interval", "1000000", "--checkpoint_interval",
                           "1000000", "--global_batch", str(train.PRESETS[recipe][task]["train"]["batch_size"]), *flags]
                command += ["--tagger.m2d_weights", ""] if task == "tagging" else []
                result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
                entries = [json.loads(line) for line in (Path(folder) / "run" / "log.jsonl").read_text().splitlines()
                           if '"train"' in line] if result.returncode == 0 else []
            if not entries:
                rows.append((f"training: {recipe}, {variant}", float("nan"), f"failed, exit {result.returncode} "
                             f"(-9: killed, e.g. out of memory) {result.stderr.strip()[-200:]}"))
                continue
            last = entries[-1]
            rows.append((f"training: {recipe}, {variant}, per device {last['mixtures_per_s'] * last['ms_per_step'] / 1000:.0f}"
                         f" mixtures", last["mixtures_per_s"], f"mixtures/s ({last['ms_per_step']:.0f} ms/step, data "
                         f"wait {100 * last['data_wait']:.1f} %, {last['memory_gb']:.2f} GB)"))
    return rows


def bench_evaluation(config: BenchConfig, device, data: Path) -> list:
    """evaluate.py with full-size random-weight taggers (1c) and ResUNetK on the set's test soundscapes."""
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        for kind, module in (("tagger", model.Tagger(model.TaggerConfig())),
                             ("separator", model.Separator(model.SeparatorConfig()))):
            torch.save({"kind": kind, "model_config": dataclasses.asdict(module.config), "model": module.state_dict()},
                       f"{folder}/{kind}.pt")
        result = subprocess.run([sys.executable, "evaluate.py", "--tagger", f"{folder}/tagger.pt", "--separator",
                                 f"{folder}/separator.pt", "--data", str(data / "synthesized" / "test"), "--device",
                                 device.type], capture_output=True, text=True, cwd=Path(__file__).parent)
    line = next((line for line in result.stderr.splitlines() if line.startswith("Inference speed")), "")
    value = float(line.split()[2]) if line else float("nan")
    return [("evaluation: M2D-AT 1c + ResUNetK, batch 2", value, "soundscapes/s" if line else result.stderr[-200:])]


def bench_metric(config: BenchConfig, device) -> list:
    """CAPI-SDRi ms per 10 s mixture on one core: distinct classes, a duplicated class, a miss and a false positive."""
    generator, length, threads = torch.Generator().manual_seed(0), 10 * SAMPLE_RATE, torch.get_num_threads()
    torch.set_num_threads(1)
    pool = []
    for _ in range(10):  # about 100 MB, so that the waveforms are not cache-resident, as in evaluate.py
        references = torch.randn(NUM_SLOTS, length, generator=generator)
        pool.append((references + 0.3 * torch.randn(NUM_SLOTS, length, generator=generator), references,
                     references.sum(0) + 0.1 * torch.randn(length, generator=generator)))
    cases = [(["Speech", "Dishes", "Pour"], ["Speech", "Dishes", "Pour"]),
             (["Speech", "Speech", "Dishes"], ["Speech", "Speech", "Dishes"]),
             (["Speech", "Blender", SILENCE], ["Speech", "Dishes", "Pour"])]
    count = 50 if config.quick else 200
    calls = [(est, estimates, ref, references, mixture) for est, ref in cases for estimates, references, mixture in pool]
    seconds = timed(lambda: [capi_sdri(*calls[i % len(calls)]) for i in range(count)], 1, torch.device("cpu"))
    torch.set_num_threads(threads)
    return [("metric: CAPI-SDRi, one core", 1000 * seconds / count, "ms/mixture")]


def main():
    parser = StrictParser(description=__doc__)
    add_config_flags(parser, BenchConfig)
    config = config_from_args(parser.parse_args(), BenchConfig)
    wanted = config.only.split(",")
    if unknown := set(wanted) - set(SECTIONS):
        parser.error(f"--only {config.only}: unknown sections {', '.join(sorted(unknown))}; expected some of "
                     f"{', '.join(SECTIONS)}")
    try:
        device = resolve_device(config.device)
    except ValueError as error:
        parser.error(str(error))
    data = Path(config.data) / "dev_set"
    if set(wanted) & {"synthesis", "training", "evaluation"} and not data.exists():
        print(f"building the dev-set-like bench set in {data} ...", file=sys.stderr)
        data_prep.make_demo(config.data, data_prep.DemoConfig(rir_length=174763, event_seconds_max=10,
                                                              valid_mixtures=32, test_mixtures=8))
    header = machine(device)
    runs = {"synthesis": lambda: bench_synthesis(config, device, data), "models": lambda: bench_models(config, device),
            "training": lambda: bench_training(config, device, data),
            "evaluation": lambda: bench_evaluation(config, device, data), "metric": lambda: bench_metric(config, device)}
    rows = [row for section in SECTIONS if section in wanted for row in runs[section]()]
    print(" | ".join(f"{key} {value}" for key, value in header.items()))
    width = max(len(item) for item, _, _ in rows)
    for item, value, unit in rows:
        print(f"{item:<{width}}  {value:10.2f}  {unit}")
    Path(config.out).write_text(json.dumps({"machine": header, "quick": config.quick,
                                            "results": [dict(zip(("item", "value", "unit"), row)) for row in rows]},
                                           indent=2) + "\n")
    print(f"wrote {config.out}")


if __name__ == "__main__":
    main()
