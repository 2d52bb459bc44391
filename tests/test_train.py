"""train.py: configuration, bad input, real 2-process DDP (gloo) with resume, exact resume, faults, signals.

Tiny models and 1 s training clips keep every run to seconds on a CPU; validation uses 2 demo mixtures.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench
import cli
import model as model_module
import train
from model import Separator, SeparatorConfig, TaggerConfig, build_tagger, load_separator, load_tagger

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "tagging": ["--tagger.embed_dim", "32", "--tagger.depth", "2", "--tagger.num_heads", "2",
                "--tagger.track_input_dim", "16", "--tagger.track_hidden_dim", "16"],
    "separation": ["--separator.base_channels", "2", "--separator.condition_dim", "16",
                   "--separator.n_fft", "512", "--separator.hop_length", "256"],
}
BATCH = {"tagging": ["--batch_size", "2", "--global_batch", "4"],  # the head's BatchNorm needs 2 mixtures per rank
         "separation": ["--batch_size", "1", "--global_batch", "2"]}


def tiny_args(task: str, data_root: Path, out_dir: Path, *extra: str, batch: bool = True,
              preset: str = "demo") -> list[str]:
    """Flags of a tiny run; batch=False keeps the preset's global batch and lets train.py split it."""
    return ["--task", task, "--preset", preset, "--data_root", str(data_root), "--out_dir", str(out_dir),
            "--scene.duration", "1.0", "--scene.max_event_duration", "1.0", "--max_steps", "2",
            "--eval_interval", "2", "--eval_mixtures", "2", "--eval_batch_size", "1", "--log_interval", "1",
            "--num_workers", "0", *TINY[task], *(BATCH[task] if batch else []), *extra]


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


def test_batch_split_follows_the_world_size():
    # (global batch, world size, batch size, exact) -> (per-device batch, accumulation)
    assert train.split_batch(4, 2, 4, exact=False) == (2, 1)  # separator demo preset under 2 processes
    assert train.split_batch(4, 4, 4, exact=False) == (1, 1)
    assert train.split_batch(16, 4, 16, exact=False) == (4, 1)  # tagger demo preset under 4 processes
    assert train.split_batch(16, 1, 4, exact=False) == (4, 4)  # official separator on one GPU
    assert train.split_batch(6, 1, 4, exact=False) == (3, 2)  # only --global_batch given: largest batch that fits
    assert train.split_batch(16, 2, 4, exact=True) == (4, 2)
    with pytest.raises(SystemExit, match="--global_batch 16 cannot be split over world size 3: use --global_batch "
                                         "15 or 18"):
        train.split_batch(16, 3, 4, exact=False)
    with pytest.raises(SystemExit, match="--batch_size 3 does not divide the 8 mixtures per device .*use "
                                         "--batch_size 2 or 4"):
        train.split_batch(16, 2, 3, exact=True)


def test_print_config_shows_each_value_and_its_origin(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.resolve_config(["--preset", "demo", "--task", "separation", "--lr", "0.01", "--print_config",
                              "--out_dir", str(tmp_path / "run")])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("task separation, preset demo")
    assert any(line.split() == ["--lr", "0.01", "flags"] for line in lines)
    assert any(line.split() == ["--max_steps", "300", "preset", "demo"] for line in lines)
    assert any(line.split() == ["--no-tf32", "default"] for line in lines)
    assert any(line.split() == ["--separator.base_channels", "16", "preset", "demo"] for line in lines)
    assert not (tmp_path / "run").exists()
    help_text = " ".join(train.build_parser().format_help().split())  # the official presets' values, per task
    assert "peak learning rate (default 0.0001 for tagging" not in help_text
    assert "peak learning rate (default 0.001 for tagging, 0.0001 for separation)" in help_text
    assert "(default (0, 3) for tagging, (1, 3) for separation)" in help_text  # scene.nevent_range
    assert "--separator.num_slots NUM_SLOTS query slots" in help_text
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        train.compute_loss(None, {"mixture": torch.zeros(1, 4, 10)}, "nope")


@pytest.mark.parametrize("kind", ["tagger", "separator"])
def test_official_optimizer_state_maps_by_parameter_name(kind, tmp_path):
    """A Lightning checkpoint's optimizer lists the official module's parameters in its own order: the ViT's
    norm_stats after the blocks, the separator's STFT kernels (which ours lacks) at the front."""
    if kind == "tagger":  # every parameter trains, so a shifted position would move a real state
        model = build_tagger(TaggerConfig(embed_dim=32, depth=2, num_heads=2, track_input_dim=16,
                                          track_hidden_dim=16, finetuning="all"))
    else:
        model = Separator(SeparatorConfig(base_channels=2, condition_dim=16))
    parameters = dict(model.named_parameters())
    order = [name for name in parameters if name != "backbone.norm_stats"]
    if kind == "tagger":
        order.insert(order.index("backbone.norm.bias") + 1, "backbone.norm_stats")
        official = {f"model.{name}": parameters[name] for name in order} | {"model.to_spec.stft.wsin": torch.ones(3)}
    else:
        kernels = {"base.stft.conv_real.weight": torch.nn.Parameter(torch.ones(5, 1, 8), requires_grad=False),
                   "base.stft.conv_imag.weight": torch.nn.Parameter(torch.ones(5, 1, 8), requires_grad=False)}
        parameters = kernels | parameters
        order = list(kernels) + order
        official = {f"model.{name}": parameters[name] for name in order}
    optimizer = torch.optim.AdamW([parameters[name] for name in order], lr=1e-3, amsgrad=True)
    for name in order:
        if parameters[name].requires_grad:
            parameters[name].grad = torch.randn_like(parameters[name])
    optimizer.step()
    torch.save({"state_dict": {key: value.detach() for key, value in official.items()},
                "optimizer_states": [optimizer.state_dict()]}, tmp_path / "official.ckpt")
    read = model_module.read_checkpoint(str(tmp_path / "official.ckpt"), kind)
    mapped = train.map_optimizer_state(read.optimizer, read.parameter_names, model, "official.ckpt")
    ours = list(dict(model.named_parameters()))
    assert len(mapped["state"]) == sum(parameter.requires_grad for parameter in model.parameters())
    for index, state in mapped["state"].items():
        expected = optimizer.state[parameters[ours[index]]]
        assert torch.equal(state["exp_avg"], expected["exp_avg"]), ours[index]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-5, amsgrad=True, fused=True)
    train.load_optimizer_state(fresh, mapped)
    assert fresh.param_groups[0]["fused"] and fresh.param_groups[0]["lr"] == 1e-5  # the group stays ours


def folder_state(folder: Path) -> dict:
    return {str(path): hashlib.sha1(path.read_bytes()).hexdigest() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def test_checkpoint_and_folder_mistakes_give_one_line_and_change_nothing(demo_dev_set, tmp_path, capsys):
    """Each mistake: non-zero exit, no traceback, a short message naming the flag, file or value, no file written."""
    run = tmp_path / "run"
    train.main(tiny_args("separation", demo_dev_set, run, "--max_steps", "1", "--eval_interval", "1"))
    partial = dict(torch.load(run / "last.pt", map_location="cpu", weights_only=False))
    partial["model"] = {key: value for key, value in partial["model"].items() if key != "base.pre_conv.bias"}
    torch.save(partial, tmp_path / "partial.pt")  # what a checkpoint looks like after a participant adds a tensor
    other = tmp_path / "other"
    other.mkdir()
    record = json.loads((run / "config.json").read_text())
    record["train"] |= {"lr": 0.5, "out_dir": str(other)}
    (other / "config.json").write_text(json.dumps(record))
    before = folder_state(tmp_path)
    cases = [
        (["--resume", "--separator.base_channels", "4"], run,
         ["separator.base_channels 2", "remove --separator.base_channels"]),
        (["--init_from", str(run / "last.pt"), "--separator.base_channels", "4"], tmp_path / "new",
         [f"--init_from {run / 'last.pt'}: checkpoint has separator.base_channels 2, this run 4"]),
        (["--init_from", str(run / "best.pt"), "--init_optimizer"], tmp_path / "new",
         [f"{run / 'best.pt'} holds no optimizer state"]),
        (["--init_from", str(tmp_path / "partial.pt")], tmp_path / "new",
         ["partial.pt: the weights do not fit this Separator: missing 1 (base.pre_conv.bias)", "--init_non_strict"]),
        ([], other, [f"{other} already holds the config.json of another run", "train.lr 0.5 there"]),
    ]
    for extra, out_dir, expected in cases:
        result = run_script(tiny_args("separation", demo_dev_set, out_dir, *extra))
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "Traceback" not in output, output
        assert len(output.strip().splitlines()) <= 2 and all(text in output for text in expected), output
        assert folder_state(tmp_path) == before and not (tmp_path / "new").exists(), extra
    # The deliberate partial load: the matching tensors are loaded and the rest listed in one line.
    train.main(tiny_args("separation", demo_dev_set, tmp_path / "new", "--init_from", str(tmp_path / "partial.pt"),
                         "--init_non_strict", "--max_steps", "1"))
    assert "--init_non_strict: loaded" in capsys.readouterr().out


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def log_entries(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_2025_presets_train_validate_continue_and_evaluate(demo_dev_set_2025, tmp_path):
    """On a 2025 demo set: m2dat_head (18 sigmoids, BCE, 1-3 events at the 2025 levels, 32 x 8 GPUs) with a
    validation, m2dat_head_blks from its last.pt with the head stage's optimizer and lr (the official -r), both 2025
    separators with a validation, and evaluate.py on the 2025 test set with CA-SDRi."""
    demo_dev_set = demo_dev_set_2025
    _, config, tagger, scene, _ = train.resolve_config(["--preset", "m2dat_head"])
    assert (config.global_batch, config.lr, tagger.head, tagger.finetuning) == (256, 1e-3, "linear", "head")
    assert (scene.nevent_range, scene.interference_range, scene.ref_db, scene.dupse_rate) == ((1, 3), (1, 2), -50, 0)
    head, blocks = tmp_path / "head", tmp_path / "blocks"
    first = run_script(tiny_args("tagging", demo_dev_set, head, "--tagger.m2d_weights", "", preset="m2dat_head"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "loss binary_cross_entropy" in first.stdout and "validation step 2 |" in first.stdout
    second = run_script(tiny_args("tagging", demo_dev_set, blocks, "--tagger.m2d_weights", "", "--init_from",
                                  str(head / "last.pt"), preset="m2dat_head_blks"))
    assert second.returncode == 0 and "validation step 2 |" in second.stdout, second.stdout + second.stderr
    assert "| lr 1.00e-03 |" in second.stdout  # the head stage's, restored with its optimizer
    assert load_tagger(str(blocks / "last.pt")).config.finetuning == "2_blocks"
    for preset in ("resunet", "resunetk"):
        result = run_script(tiny_args("separation", demo_dev_set, tmp_path / preset, preset=preset))
        assert result.returncode == 0 and "validation step 2 |" in result.stdout, result.stdout + result.stderr
    result = subprocess.run([sys.executable, "evaluate.py", "--tagger", str(head / "best.pt"), "--separator",
                             str(tmp_path / "resunetk" / "best.pt"), "--data", str(demo_dev_set / "test"), "--device",
                             "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.startswith("CA-SDRi: "), result.stdout + result.stderr
    assert "\nLabel prediction accuracy: " in result.stdout


def test_torchrun_second_tagger_stage_continues_the_optimizer(demo_dev_set, tmp_path):
    """The tagger demo preset under 2 processes without batch flags (head only, as the official first stage),
    then the m2dat_1c_2blks preset from its last.pt: weights, AdamW state and the head stage's lr 1e-3."""
    head, blocks = tmp_path / "head", tmp_path / "2blks"
    official_head_stage = ("--tagger.finetuning", "head", "--lr_schedule", "constant",  # M2D's patches, not the demo's
                           "--tagger.input_size", "80", "1001", "--tagger.patch_size", "16", "16")
    first = run_script(tiny_args("tagging", demo_dev_set, head, *official_head_stage, batch=False), torchrun=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "global batch 16 = batch 8 x world size 2 x accumulation 1" in first.stdout
    second = run_script(tiny_args("tagging", demo_dev_set, blocks, "--init_from", str(head / "last.pt"),
                                  "--tagger.m2d_weights", "", "--global_batch", "8", "--batch_size", "2",
                                  "--max_steps", "1", batch=False, preset="m2dat_1c_2blks"), torchrun=True)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "global batch 8 = batch 2 x world size 2 x accumulation 2" in second.stdout  # DDP no_sync micro-steps
    assert f"lr 0.001 from {head / 'last.pt'}" in second.stdout and "| lr 1.00e-03 |" in second.stdout
    assert json.loads((blocks / "config.json").read_text())["train"]["lr"] == 1e-3  # the yaml's 1e-5 is replaced
    before, after = load(head / "last.pt"), load(blocks / "last.pt")
    names = after["parameter_names"]
    steps = {name: int(after["optimizer"]["state"][index]["step"]) for index, name in enumerate(names)
             if index in after["optimizer"]["state"]}
    assert steps["head.linear.0.weight"] == 3  # 2 head-stage steps continued by 1
    assert steps["backbone.blocks.0.attn.qkv.weight"] == 1  # the 2 blocks of this tiny ViT train from here on
    assert "backbone.patch_embed.proj.weight" not in steps  # frozen in both stages
    head_index = before["parameter_names"].index("head.linear.0.weight")
    assert not torch.equal(after["optimizer"]["state"][names.index("head.linear.0.weight")]["max_exp_avg_sq"],
                           torch.zeros_like(before["optimizer"]["state"][head_index]["max_exp_avg_sq"]))
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in after["model"])
    for name in ("last.pt", "best.pt"):
        model = load_tagger(str(blocks / name))
        assert not model.training and model.config.finetuning == "2_blocks"
    assert "optimizer" not in load(blocks / "best.pt")  # best.pt: what evaluation and --init_from read


def workers_of(launcher: int) -> list[int]:
    """Process ids whose parent is `launcher` (torchrun starts each rank in its own session)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == launcher:
            children.append(int(stat.parent.name))
    return children


def test_torchrun_group_sigterm_then_resume_matches_an_uninterrupted_run(demo_dev_set, tmp_path):
    """A cluster stop: SIGTERM to the launcher's process group and to every rank's group (each rank gets it
    twice: once directly, once forwarded by torchrun). last.pt is written, and --resume from it ends with the
    same parameters as an uninterrupted run. The separator demo preset runs without batch flags."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    # The stopped run has a larger --max_steps (it must not finish first), so the lr must not depend on it.
    args = ["--max_steps", "6", "--eval_interval", "100000", "--checkpoint_interval", "100000", "--lr_schedule",
            "constant"]
    reference = run_script(tiny_args("separation", demo_dev_set, straight, *args, batch=False), torchrun=True)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert "global batch 4 = batch 2 x world size 2 x accumulation 1" in reference.stdout

    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *tiny_args("separation", demo_dev_set, stopped, *args, "--max_steps", "100000", batch=False)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.monotonic() + 180
    while not any(entry["event"] == "train" for entry in (log_entries(stopped) if (stopped / "log.jsonl").exists()
                                                          else [])):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0]
        time.sleep(0.05)
    ranks = workers_of(launcher.pid)
    assert len(ranks) == 2
    signalled = time.monotonic()
    for group in (launcher.pid, *ranks):
        os.killpg(group, signal.SIGTERM)
    output = launcher.communicate(timeout=120)[0]
    assert time.monotonic() - signalled < 30, output  # torchrun kills its workers 30 s after forwarding a signal
    assert "SIGTERM: stopping after this step" in output and "stopped by SIGTERM at step" in output, output
    step = load(stopped / "last.pt")["step"]
    assert 1 <= step < 6

    resumed = run_script(tiny_args("separation", demo_dev_set, stopped, *args, "--resume", batch=False),
                         torchrun=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {stopped / 'last.pt'} at step {step}; the training scenes continue at scene {4 * step}" \
        in resumed.stdout
    assert {"event": "resume", "path": str(stopped / "last.pt"), "step": step, "scene": 4 * step} in \
        log_entries(stopped)
    expected, actual = load(straight / "last.pt"), load(stopped / "last.pt")
    assert actual["step"] == expected["step"] == 6 and actual["world_size"] == 2
    for key, value in expected["model"].items():
        assert torch.equal(actual["model"][key], value), key
    assert [entry["step"] for entry in log_entries(stopped) if entry["event"] == "valid"] == [6]
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in actual["model"])
    model = load_separator(str(stopped / "best.pt"))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 4, 16000), torch.eye(18)[None, :3])).all()


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


def test_iterative_separator_trains_and_tensorboard_gets_the_log(demo_dev_set, tmp_path):
    """--separator.iterations 3 trains (1-3 passes per step) and validates; TensorBoard holds log.jsonl's numbers."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train.main(tiny_args("separation", demo_dev_set, tmp_path, "--separator.iterations", "3"))
    saved = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert saved["model_config"]["iterations"] == 3 and saved["model"]["base.feedback_conv.weight"].abs().sum() > 0
    assert not train.config_differences(SeparatorConfig(), SeparatorConfig(iterations=3), "separator", resume=False)
    assert "separator.iterations 1" in train.config_differences(SeparatorConfig(), SeparatorConfig(iterations=3),
                                                                "separator", resume=True)
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for event, key in (("train", "loss"), ("train", "grad_norm"), ("valid", "capi_sdri")):
        scalars = events.Scalars(f"{event}/{key}")
        assert [scalar.step for scalar in scalars] == [entry["step"] for entry in logged if entry["event"] == event]
        assert [scalar.value for scalar in scalars] == pytest.approx([entry[key] for entry in logged
                                                                      if entry["event"] == event], rel=1e-6)


def test_tensorboard_is_skipped_cleanly_without_the_package(demo_dev_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--max_steps", "1"))
    assert "tensorboard package is not installed" in capsys.readouterr().out
    assert (tmp_path / "log.jsonl").is_file() and (tmp_path / "last.pt").is_file()
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the synthesizer overflows on purpose
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(demo_dev_set, tmp_path):
    train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--max_steps", "1"))
    # A reference level of +1000 dB overflows float32: the mixtures and the loss become non-finite.
    with pytest.raises(SystemExit, match="not finite.*step 1\\) is kept"):
        train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--max_steps", "3", "--resume",
                             "--scene.ref_db", "1000"))
    assert torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["step"] == 1


def test_repeated_signals_are_one_stop_request(demo_dev_set, tmp_path):
    """SIGTERM and a SIGHUP right after it (as torchrun and a scheduler both deliver one): one stop, exit 0."""
    args = tiny_args("separation", demo_dev_set, tmp_path, "--max_steps", "100000", "--eval_interval", "100000")
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 2/"):
            process.send_signal(signal.SIGTERM)
            process.send_signal(signal.SIGHUP)
            break
    output.append(process.communicate(timeout=120)[0])
    output = "".join(output)  # Python runs pending handlers in signal-number order: SIGHUP's comes first
    assert process.returncode == 0, output
    assert output.count(": stopping after this step (last.pt is saved first); Ctrl-C again to abort") == 1, output
    assert "stopped by SIGHUP at step" in output, output
    step = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)["step"]
    assert 2 <= step < 100000


def send_sigterm_before(function):
    """`function`, preceded by a SIGTERM to this process (the signal lands exactly where the test wants it)."""
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)
    return wrapped


def test_stop_during_start_up_or_validation_exits_cleanly(demo_dev_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "freeze_unused_parameters", send_sigterm_before(train.freeze_unused_parameters))
    train.main(tiny_args("separation", demo_dev_set, tmp_path / "start"))
    assert "stopped by SIGTERM during start-up: nothing was trained" in capsys.readouterr().out
    assert not (tmp_path / "start" / "last.pt").exists()
    monkeypatch.undo()
    # Validation stops after its first batch (of 2); last.pt holds the step, best.pt is not written.
    monkeypatch.setattr(train, "validate", send_sigterm_before(train.validate))
    train.main(tiny_args("separation", demo_dev_set, tmp_path / "valid"))
    assert "stopped by SIGTERM at step 2" in capsys.readouterr().out
    assert torch.load(tmp_path / "valid" / "last.pt", map_location="cpu", weights_only=False)["step"] == 2
    assert not (tmp_path / "valid" / "best.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() gives the caller its handlers back


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


def test_tagging_validation_runs_the_model_once_per_batch(demo_dev_set, tmp_path, monkeypatch):
    """The labels of the validation accuracies come from the logits of the validation loss (no second forward)."""
    from model import Tagger
    forwards, validations = [], []
    forward, validate = Tagger.forward, train.validate

    def counted_validate(*args):
        forwards.clear()
        result = validate(*args)
        validations.append(len(forwards))
        return result

    monkeypatch.setattr(Tagger, "forward", lambda self, waveform: forwards.append(1) or forward(self, waveform))
    monkeypatch.setattr(train, "validate", counted_validate)
    train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--render_on", "device", "--eval_interval", "1"))
    assert validations == [2, 2]  # forward calls of each validation: 2 batches of 1 mixture
    entries = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [entry["mixtures"] for entry in entries if entry["event"] == "valid"] == [2, 2]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "tensorboard") == [
        "best.pt", "config.json", "last.pt", "log.jsonl"]


def test_render_on_and_num_workers_defaults(monkeypatch):
    with pytest.raises(SystemExit, match="--render_on 'gpu': expected one of auto, device, workers"):
        train.resolve_config(["--render_on", "gpu"])
    with pytest.raises(SystemExit, match=r"--num_workers must be at least -1 \(-1: automatic\), got -2"):
        train.resolve_config(["--num_workers", "-2"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert train.default_num_workers() == 3  # 4 cores per rank, one for the training process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert train.default_num_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert train.default_num_workers() == 1


def test_native_bf16_detection(monkeypatch):
    """Native bf16 needs the hardware (AVX512-BF16 or AMX) and torch's AVX512 kernels in use."""
    cases = [("x86_64", True, False, "AVX512", True), ("x86_64", False, True, "AVX512", True),
             ("x86_64", True, True, "AVX2", False),  # restricted with ATEN_CPU_CAPABILITY=avx2
             ("x86_64", False, False, "AVX512", False), ("x86_64", False, False, "AVX2", False),
             ("aarch64", False, False, "DEFAULT", None)]
    for machine, avx512_bf16, amx, capability, expected in cases:
        monkeypatch.setattr(cli.platform, "machine", lambda: machine)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert cli.cpu_has_native_bf16() is expected, (machine, avx512_bf16, amx, capability)
        assert (bench.machine(torch.device("cpu"))["bf16_on_cpu"] == "native") is bool(expected)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns_once(native, demo_dev_set, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    train.main(tiny_args("tagging", demo_dev_set, tmp_path, "--max_steps", "1", "--dtype", "bf16"))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "without native bf16" in line]
    assert len(warnings) == (0 if native else 1)
    assert (tmp_path / "last.pt").is_file()  # a warning, not an error: the run goes on
