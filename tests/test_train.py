"""train.py: configuration, bad input, real 2-process DDP (gloo) with resume, exact resume, faults.

Tiny models and 1 s training clips keep every run to seconds on a CPU; validation uses 2 demo mixtures.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import load_separator, load_tagger

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "tagging": ["--tagger.embed_dim", "32", "--tagger.depth", "1", "--tagger.num_heads", "2",
                "--tagger.track_input_dim", "16", "--tagger.track_hidden_dim", "16",
                "--batch_size", "2", "--global_batch", "4"],  # the head's BatchNorm needs 2 mixtures per rank
    "separation": ["--separator.base_channels", "2", "--separator.condition_dim", "16",
                   "--separator.n_fft", "512", "--separator.hop_length", "256"],
}


def tiny_args(task: str, data_root: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["--task", task, "--preset", "demo", "--data_root", str(data_root), "--out_dir", str(out_dir),
            "--scene.duration", "1.0", "--scene.max_event_duration", "1.0", "--batch_size", "1", "--global_batch", "2", "--max_steps", "2",
            "--eval_interval", "2", "--eval_mixtures", "2", "--eval_batch_size", "1", "--log_interval", "1",
            "--num_workers", "0", *TINY[task], *extra]


def run_script(args: list[str], torchrun: bool = False, timeout: float = 240) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
        if torchrun else [sys.executable]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(launcher + ["train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_unknown_preset_flag_and_task_mismatch_name_the_valid_choices():
    with pytest.raises(SystemExit, match="valid presets: .*m2dat_1c.*resunetk_capisdr.*demo"):
        train.resolve_config(["--preset", "nope"])
    with pytest.raises(SystemExit, match=r"--lrate \(did you mean --lr"):
        train.resolve_config(["--lrate", "1"])
    with pytest.raises(SystemExit, match="separation presets: resunetk_capisdr"):
        train.resolve_config(["--task", "separation", "--preset", "m2dat_4c"])
    with pytest.raises(SystemExit, match="do not apply to --task separation"):
        train.resolve_config(["--task", "separation", "--tagger.depth", "2"])
    with pytest.raises(SystemExit, match="expected one of fp32, bf16, fp16"):
        train.resolve_config(["--dtype", "fp8"])


def test_precedence_defaults_preset_config_flags(tmp_path):
    _, config, model_config, scene, preset = train.resolve_config(["--preset", "m2dat_4c"])
    assert (config.task, preset, config.lr, config.global_batch) == ("tagging", "m2dat_4c", 1e-3, 128)
    assert model_config.num_channels == 4 and scene.nevent_range == (0, 3)
    _, config, _, _, preset = train.resolve_config(["--task", "separation"])
    assert preset == "resunetk_capisdr" and config.out_dir == "runs/separation_resunetk_capisdr"
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"train": {"task": "separation", "lr": 3e-4, "batch_size": 2},
                                       "scene": {"snr_range": [0, 10]}}))
    _, config, _, scene, _ = train.resolve_config(["--preset", "resunetk", "--config", str(config_file),
                                                   "--batch_size", "5"])
    assert (config.lr, config.batch_size, config.loss, scene.snr_range) == (3e-4, 5, "snr_masked", (0, 10))
    config_file.write_text(json.dumps({"train": {"learning_rate": 1.0}}))
    with pytest.raises(SystemExit, match="unknown key train.learning_rate"):
        train.resolve_config(["--config", str(config_file)])


def test_bad_data_root_names_the_data_commands(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        train.main(tiny_args("separation", tmp_path / "absent", tmp_path / "run"))
    assert "python data_prep.py demo" in str(error.value) and "python data_prep.py verify" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("task", ["tagging", "separation"])
def test_torchrun_two_processes_checkpoint_and_resume(task, demo_dev_set, tmp_path):
    out_dir = tmp_path / "run"
    first = run_script(tiny_args(task, demo_dev_set, out_dir), torchrun=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "world size 2 x accumulation 1" in first.stdout
    resumed = run_script(tiny_args(task, demo_dev_set, out_dir, "--resume", "--max_steps", "3"), torchrun=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    checkpoint = torch.load(out_dir / "last.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == 3 and checkpoint["world_size"] == 2
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["model"])
    entries = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries if entry["event"] == "train"] == [1, 2, 3]
    assert [entry["step"] for entry in entries if entry["event"] == "valid"] == [2, 3]
    assert json.loads((out_dir / "config.json").read_text())["train"]["max_steps"] == 3
    loader = load_tagger if task == "tagging" else load_separator
    for name in ("last.pt", "best.pt"):
        model = loader(str(out_dir / name))
        assert not model.training
    mixture = torch.randn(1, 4, 16000)
    with torch.no_grad():
        output = model(mixture) if task == "tagging" else model(mixture, torch.eye(18)[None, :3])
    assert torch.isfinite(output).all()


def test_resume_is_exact(demo_dev_set, tmp_path):
    """CPU fp32: 1 step + resume to 3 steps gives the same parameters as 3 uninterrupted steps."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(tiny_args("separation", demo_dev_set, straight, "--max_steps", "3", "--eval_interval", "100"))
    train.main(tiny_args("separation", demo_dev_set, split, "--max_steps", "1", "--eval_interval", "100"))
    interrupted = torch.load(split / "last.pt", map_location="cpu", weights_only=False)
    train.main(tiny_args("separation", demo_dev_set, split, "--max_steps", "3", "--resume"))
    expected = torch.load(straight / "last.pt", map_location="cpu", weights_only=False)
    actual = torch.load(split / "last.pt", map_location="cpu", weights_only=False)
    assert (interrupted["step"], actual["step"], expected["step"]) == (1, 3, 3)
    assert not torch.equal(interrupted["model"]["base.pre_conv.weight"], expected["model"]["base.pre_conv.weight"])
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    for key, value in expected["optimizer"]["state"][0].items():
        assert torch.equal(actual["optimizer"]["state"][0][key], value), key
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(tiny_args("separation", demo_dev_set, split))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the synthesizer overflows on purpose
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(demo_dev_set, tmp_path):
    train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--max_steps", "1"))
    # A reference level of +1000 dB overflows float32: the mixtures and the loss become non-finite.
    with pytest.raises(SystemExit, match="not finite.*step 1\\) is kept"):
        train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--max_steps", "3", "--resume",
                             "--scene.ref_db", "1000"))
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["step"] == 1


def test_sigterm_writes_last_checkpoint_and_exits_cleanly(demo_dev_set, tmp_path):
    args = tiny_args("separation", demo_dev_set, tmp_path, "--max_steps", "100000", "--eval_interval", "100000")
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            break
    output.append(process.communicate(timeout=120)[0])
    assert process.returncode == 0, "".join(output)
    assert "stopped by a signal" in "".join(output)
    step = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["step"]
    assert 2 <= step < 100000


def test_torchrun_render_on_device_trains_checkpoints_and_resumes_exactly(demo_dev_set, tmp_path):
    """2 processes (gloo), workers read and each process renders its batches: 1 step + resume to 2 steps equals 2
    uninterrupted steps."""
    device_args = ("--render_on", "device", "--num_workers", "1", "--eval_interval", "2")
    straight, split = tmp_path / "straight", tmp_path / "split"
    runs = [(straight, ("--max_steps", "2")), (split, ("--max_steps", "1")), (split, ("--max_steps", "2", "--resume"))]
    for out_dir, extra in runs:
        result = run_script(tiny_args("separation", demo_dev_set, out_dir, *device_args, *extra), torchrun=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "cpu renders them" in result.stdout
    expected = torch.load(straight / "last.pt", map_location="cpu", weights_only=False)
    actual = torch.load(split / "last.pt", map_location="cpu", weights_only=False)
    assert (actual["step"], expected["step"], actual["world_size"]) == (2, 2, 2)
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    for key, value in expected["optimizer"]["state"][0].items():
        assert torch.equal(actual["optimizer"]["state"][0][key], value), key
    entries = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries if entry["event"] == "valid"] == [1, 2]


def test_validation_renders_once_and_tagging_validation_runs_the_model_once(demo_dev_set, tmp_path, monkeypatch):
    """Two validations read each validation scene once (the rendered set is kept, here in files because of a zero
    memory budget) and run the tagger once per batch."""
    import synth
    from model import Tagger
    reads, forwards, validations = [], [], []
    read_scene, forward, validate = synth.MetadataDataset.__getitem__, Tagger.forward, train.validate

    def counted_validate(*args):
        forwards.clear()
        result = validate(*args)
        validations.append(len(forwards))
        return result

    monkeypatch.setattr(synth.MetadataDataset, "__getitem__", lambda self, index: reads.append(index) or
                        read_scene(self, index))
    monkeypatch.setattr(Tagger, "forward", lambda self, waveform: forwards.append(1) or forward(self, waveform))
    monkeypatch.setattr(train, "validate", counted_validate)
    monkeypatch.setattr(train, "VALID_MEMORY_BYTES", 0)
    train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--render_on", "device", "--eval_interval", "1"))
    assert sorted(reads) == [0, 1]
    assert validations == [2, 2]  # forward calls of each validation: 2 batches of 1 mixture
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["mixtures"] for entry in entries if entry["event"] == "valid"] == [2, 2]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "config.json", "last.pt", "log.jsonl"]


def test_render_on_and_num_workers_defaults(monkeypatch):
    with pytest.raises(SystemExit, match="--render_on 'gpu': expected one of auto, device, workers"):
        train.resolve_config(["--render_on", "gpu"])
    with pytest.raises(SystemExit, match="--num_workers must be -1"):
        train.resolve_config(["--num_workers", "-2"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train.default_num_workers() == 3  # 4 cores per rank, one for the training process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert train.default_num_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.default_num_workers() == 1
