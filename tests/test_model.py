"""Tests of model.py: sizes from the spec, parity with timm / nnAudio / torchlibrosa and with an independent
computation of the separator's masks, prediction semantics, fine-tuning sets and strict checkpoint loading.

    python -m pytest -q tests/test_model.py
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import model
from devset import LABELS, SAMPLE_RATE, SILENCE

SMALL_VIT = dict(embed_dim=128, depth=2, num_heads=2)  # ViT for fast tests; input/patch sizes stay official


def small_tagger(**overrides) -> model.Tagger:
    torch.manual_seed(0)
    tagger = model.build_tagger(model.TaggerConfig(**{**SMALL_VIT, **overrides}))
    randomise_batch_norms(tagger)
    return tagger.eval()


def small_separator(**overrides) -> model.Separator:
    torch.manual_seed(0)
    separator = model.Separator(model.SeparatorConfig(**{"base_channels": 4, **overrides}))
    randomise_batch_norms(separator)
    return separator.eval()


def randomise_batch_norms(module):
    """Non-trivial running statistics, so eval-mode parity checks see the normalisation."""
    generator = torch.Generator().manual_seed(1)
    for submodule in module.modules():
        if isinstance(submodule, torch.nn.modules.batchnorm._BatchNorm):
            submodule.running_mean.copy_(torch.randn(submodule.num_features, generator=generator) * 0.1)
            submodule.running_var.copy_(torch.rand(submodule.num_features, generator=generator) + 0.5)


def mixture(seconds=1.0, batch=2, seed=0):
    """Random 4-channel audio with a stretch of digital silence."""
    x = torch.randn(batch, 4, int(seconds * SAMPLE_RATE), generator=torch.Generator().manual_seed(seed)) * 0.1
    x[..., 1000:5000] = 0.0
    return x


def queries(rows):
    """[[label or None, ...] per item] -> one-hot [B, S, 18]."""
    q = torch.zeros(len(rows), len(rows[0]), len(LABELS))
    for b, row in enumerate(rows):
        for s, label in enumerate(row):
            if label is not None:
                q[b, s, LABELS.index(label)] = 1.0
    return q


def snr_db(estimate, reference):
    return 10 * torch.log10(reference.square().sum(-1) / (estimate - reference).square().sum(-1))


# ---------------------------------------------------------------------------------------------------------------
# Sizes and names


def test_full_size_parameter_counts_and_official_key_shapes():
    with torch.device("meta"):  # no memory, no initialisation
        tagger_1c = model.build_tagger(model.TaggerConfig())
        tagger_4c = model.build_tagger(model.TaggerConfig(num_channels=4))
        separator = model.Separator(model.SeparatorConfig())
    assert sum(p.numel() for p in tagger_1c.backbone.parameters()) == 85_492_994
    assert model.count_parameters(tagger_1c) == 98_905_403
    assert model.count_parameters(tagger_4c) == 134_294_843
    assert sum(p.numel() for p in separator.parameters()) == 26_740_971
    assert model.count_parameters(separator) == 29_888_747
    assert model.count_parameters(tagger_1c, separator) == 128_794_150
    assert model.count_parameters(tagger_4c, separator) == 164_183_590
    # Official state dicts minus the dropped front-end buffers: 183 - 4 tagger tensors, 342 - 5 separator tensors.
    assert len([k for k in tagger_1c.state_dict() if k.startswith("backbone.")]) == 151
    assert len(tagger_1c.state_dict()) == 179 and len(separator.state_dict()) == 337
    expected = {
        "backbone.pos_embed": (1, 311, 768), "backbone.norm_stats": (2,), "backbone.patch_embed.proj.weight": (768, 1, 16, 16),
        "backbone.blocks.11.attn.qkv.weight": (2304, 768), "backbone.blocks.0.mlp.fc2.weight": (768, 3072),
        "head_norm.running_var": (3840,), "head.m2d_out_norm.running_mean": (3840,), "head.linear.0.weight": (3072, 3840),
        "head.linear.1.bias": (3072,), "head.tracks.2.0.weight": (512, 1024), "head.tracks.0.3.weight": (19, 512),
    }
    for key, shape in expected.items():
        assert tuple(tagger_1c.state_dict()[key].shape) == shape, key
    assert tuple(tagger_4c.state_dict()["head.linear.0.weight"].shape) == (3072, 15360)
    expected = {
        "base.bn0.running_mean": (513,), "base.pre_conv.weight": (32, 4, 1, 1),
        "base.encoder_block2.conv_block1.shortcut.weight": (64, 32, 1, 1), "base.encoder_block2.conv_block1.shortcut.bias": (64,),
        "base.conv_block7a.conv_block1.conv2.weight": (384, 384, 3, 3), "base.decoder_block1.conv1.weight": (384, 384, 1, 2),
        "base.decoder_block3.conv1.weight": (384, 256, 2, 2), "base.decoder_block3.bn2.running_var": (384,),
        "base.decoder_block6.conv_block2.conv1.weight": (32, 64, 3, 3), "base.after_conv.weight": (36, 32, 1, 1),
        "base.out_conv.weight": (1, 4, 1, 1), "label_embedding.0.weight": (512, 54), "label_embedding.4.weight": (512,),
        "film.encoder_block1->conv_block1->beta1.weight": (32, 512), "film.decoder_block3->beta2.bias": (384,),
        "film.decoder_block6->conv_block2->beta1.weight": (64, 512), "film.conv_block7a->conv_block1->beta2.bias": (384,),
    }
    for key, shape in expected.items():
        assert tuple(separator.state_dict()[key].shape) == shape, key
    assert "base.encoder_block1.conv_block1.shortcut.weight" not in separator.state_dict()  # 32 -> 32: no shortcut
    assert len(separator.film) == 38


def test_output_shapes_and_unet_sizes_at_10_seconds():
    tagger = small_tagger()
    for seconds, frames in ((10, 62), (5, 32), (15, 93)):
        lms = torch.randn(1, 1, 80, int(seconds * SAMPLE_RATE) // 320 + 1)
        assert tuple(tagger.backbone(lms).shape) == (1, frames, 5 * 128)
    x = mixture(10, batch=1)
    assert tuple(tagger(x).shape) == (1, 3, 19)
    separator = small_separator(base_channels=2)
    sizes = {}
    for name in ["encoder_block1", "encoder_block5", "encoder_block6", "decoder_block1", "decoder_block6"]:
        getattr(separator.base, name).register_forward_hook(
            lambda module, args, output, name=name: sizes.__setitem__(name, (output[0] if isinstance(output, tuple) else output).shape[-2:]))
    with torch.no_grad():
        assert tuple(separator(x, queries([["Speech", None, "Cough"]])).shape) == (1, 3, 320000)
    assert sizes == {"encoder_block1": (1008, 256), "encoder_block5": (63, 16), "encoder_block6": (63, 8),
                     "decoder_block1": (63, 16), "decoder_block6": (2016, 512)}


# ---------------------------------------------------------------------------------------------------------------
# Parity with reference implementations


def test_vit_features_match_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=(80, 1001), patch_size=16, in_chans=1, num_classes=0, global_pool="token", **SMALL_VIT).eval()
    tagger = small_tagger()
    state = {**reference.state_dict(), "norm_stats": tagger.backbone.norm_stats}
    tagger.backbone.load_state_dict(state, strict=True)  # timm names load one to one

    def timm_encode(lms):  # the official encode_lms path written with timm's modules
        frames = lms.shape[-1]
        lms = F.pad(lms, (0, (16 - frames % 16) % 16))
        outputs = []
        for start in range(0, frames, 1001):
            x = reference.patch_embed.proj(lms[..., start:start + 1001])
            t = x.shape[-1]
            x = x.flatten(2).transpose(1, 2)
            rows = torch.tensor([f * 62 + i for f in range(5) for i in range(t)])
            x = x + reference.pos_embed[:, 1 + rows]
            cls = (reference.cls_token + reference.pos_embed[:, :1]).expand(len(x), -1, -1)
            x = reference.norm(reference.blocks(torch.cat([cls, x], 1)))[:, 1:]
            outputs.append(torch.cat([x[:, f * t:(f + 1) * t] for f in range(5)], dim=-1))
        return torch.cat(outputs, 1)

    with torch.no_grad():
        for frames in (1001, 501, 1501):
            lms = torch.randn(2, 1, 80, frames)
            ours, theirs = tagger.backbone(lms), timm_encode(lms)
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max() < 1e-4


def test_log_mel_matches_nnaudio():
    features = pytest.importorskip("nnAudio.features")
    reference = features.MelSpectrogram(sr=32000, n_fft=800, win_length=800, n_mels=80, hop_length=320, fmin=50,
                                        fmax=16000, center=True, power=2, verbose=False)
    waveform = mixture(1.5)[:, 0]
    expected = torch.log(reference(waveform) + model.LOG_EPS)
    ours = model.LogMel("32k")(waveform)
    assert ours.shape == expected.shape == (2, 80, 151)
    assert (ours - expected).abs().max() <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.LogMel("32k")(waveform).dtype == torch.float32


def test_stft_and_istft_match_torchlibrosa():
    stft = pytest.importorskip("torchlibrosa.stft")
    settings = dict(n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True, pad_mode="reflect",
                    freeze_parameters=True)
    reference_stft, reference_istft = stft.STFT(**settings), stft.ISTFT(**settings)
    waveform = mixture(0.5)[:, 0]
    real, imag = reference_stft(waveform)  # (B, 1, T, F)
    real, imag = real[:, 0], imag[:, 0]
    spectrum = torch.complex(real, imag)
    expected_wave = reference_istft(real[:, None], imag[:, None], waveform.shape[-1])
    separator = model.Separator(model.SeparatorConfig(base_channels=1))
    ours_real, ours_imag = separator.spectrogram(waveform)
    scale = spectrum.abs().max()
    assert (ours_real - real).abs().max() <= 1e-5 * scale and (ours_imag - imag).abs().max() <= 1e-5 * scale
    wave = separator.waveform(real, imag, waveform.shape[-1])
    assert (wave - expected_wave).abs().max() <= 1e-6 * max(1.0, expected_wave.abs().max())


def test_separator_matches_independent_mask_computation():
    """The official spectrogram / mask reconstruction computed with torchlibrosa and complex arithmetic from the same UNet feature maps."""
    stft = pytest.importorskip("torchlibrosa.stft")
    settings = dict(n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True, pad_mode="reflect",
                    freeze_parameters=True)
    separator = small_separator()
    x = mixture(0.5)
    q = queries([["Speech", None, "Speech"], ["Cough", "Dishes", None]])
    with torch.no_grad():
        ours = separator(x, q)
        B, C, L = x.shape
        real, imag = stft.STFT(**settings)(x.reshape(B * C, L))  # (B*C, 1, T, F)
        phase_sum = torch.complex(real, imag).view(B, C, *real.shape[2:])  # (B, C, T, F)
        magnitude = phase_sum.abs().square().clamp(min=1e-10).sqrt()
        mixture_phase = phase_sum / magnitude  # not unit length where the power is floored
        condition = separator.label_embedding(q.view(B, -1))
        betas = {name: layer(condition)[:, :, None, None] for name, layer in separator.film.items()}
        logits = separator.base(magnitude, betas).view(B, 3, C, 3, *magnitude.shape[2:])
        mask_phase = torch.complex(torch.tanh(logits[:, :, :, 1]), torch.tanh(logits[:, :, :, 2]))
        mask_phase = mask_phase / mask_phase.abs().clamp(min=1e-10)
        estimate = torch.relu(magnitude[:, None] * torch.sigmoid(logits[:, :, :, 0])) * mixture_phase[:, None] * mask_phase
        weight, bias = separator.base.out_conv.weight.view(C), separator.base.out_conv.bias
        mixed = torch.einsum("bsctf,c->bstf", estimate, weight.to(estimate.dtype)) + torch.complex(bias, bias)
        waves = stft.ISTFT(**settings)(mixed.real.reshape(B * 3, 1, *mixed.shape[2:]),
                                       mixed.imag.reshape(B * 3, 1, *mixed.shape[2:]), L).view(B, 3, L)
    active = [(0, 0), (0, 2), (1, 0), (1, 1)]
    for b, s in active:
        assert snr_db(ours[b, s], waves[b, s]) > 60
    assert torch.equal(ours[0, 1], torch.zeros(L)) and torch.equal(ours[1, 2], torch.zeros(L))


def test_single_slot_separator_runs_queries_as_a_batch():
    separator = small_separator(num_slots=1)
    x = mixture(0.5)
    q = queries([["Speech", "Cough", None], ["Dishes", None, None]])
    with torch.no_grad():
        together = separator(x, q)
        alone = separator(x[1:], q[1:, :1])
    assert together.shape == (2, 3, x.shape[-1])
    assert (together[1, 0] - alone[0, 0]).abs().max() < 1e-5
    assert not together[:, 2].any() and not together[1, 1].any()
    with pytest.raises(ValueError, match="3 slots"):
        small_separator()(x, q[:, :2])


def test_four_channel_features_are_channel_outermost():
    tagger = small_tagger(num_channels=4)
    x = mixture(1.0)
    seen = {}
    tagger.head.register_forward_hook(lambda module, args, output: seen.__setitem__("features", args[0]))
    with torch.no_grad():
        logits = tagger(x)
        expected = torch.cat([tagger.encode(x[:, c]) for c in range(4)], dim=-1)  # ch * 640 + f * 128 + d
        assert (seen["features"] - expected).abs().max() < 1e-5
        assert (tagger(x[:, [1, 0, 2, 3]]) - logits).abs().max() > 1e-4
    one_channel = small_tagger()
    with torch.no_grad():
        assert torch.equal(one_channel(x), one_channel(x[:, :1]))  # 1c reads the reference channel only


# ---------------------------------------------------------------------------------------------------------------
# Prediction, S5 and fine-tuning


def test_predict_2026_and_2025_semantics():
    tagger = small_tagger()
    logits = torch.full((1, 3, 19), -5.0)
    logits[0, 0, 18], logits[0, 1, 15], logits[0, 2, 3] = 3.0, 2.0, 1.0
    tagger.forward = lambda waveform: logits
    labels, probabilities = tagger.predict(mixture(0.1, batch=1))
    assert labels == [[SILENCE, "Speech", "Buzzer"]]
    assert torch.allclose(probabilities, logits.softmax(-1).max(-1).values)
    tagger_2025 = small_tagger(head="linear")
    scores = torch.tensor([[0.1] * 18, [0.1] * 18])
    scores[0, 2] = 0.3  # nothing above 0.5: the arg-max alone
    scores[1, [15, 2, 9, 0]] = torch.tensor([0.9, 0.8, 0.6, 0.55])  # four above: the three most probable
    tagger_2025.forward = lambda waveform: torch.logit(scores)
    labels, probabilities = tagger_2025.predict(mixture(0.1))
    assert labels == [["Blender", SILENCE, SILENCE], ["Blender", "FootSteps", "Speech"]]  # class-index order
    assert torch.allclose(probabilities, torch.tensor([[0.3, 0.0, 0.0], [0.8, 0.6, 0.9]]))


def test_s5_sorts_silence_to_the_end_and_separates():
    tagger, separator = small_tagger(), small_separator()
    logits = torch.full((2, 3, 19), -5.0)
    logits[0, 0, 18], logits[0, 1, 15], logits[0, 2, 18] = 2.0, 3.0, 1.0  # (silence, Speech, silence)
    logits[1, 0, 4], logits[1, 1, 18], logits[1, 2, 4] = 1.0, 2.0, 3.0  # (Clapping, silence, Clapping)
    tagger.forward = lambda waveform: logits
    x = mixture(0.5)
    output = model.S5(tagger, separator)(x)
    probabilities = logits.softmax(-1).max(-1).values
    assert output["label"] == [["Speech", SILENCE, SILENCE], ["Clapping", "Clapping", SILENCE]]
    assert torch.allclose(output["probabilities"], probabilities[:, [[1, 0, 2], [0, 2, 1]]].diagonal().T)
    with torch.no_grad():
        expected = separator(x, queries([["Speech", None, None], ["Clapping", "Clapping", None]]))
    assert torch.equal(output["waveform"], expected)
    assert not output["waveform"][0, 1:].any()


def test_second_look_drops_a_source_the_tagger_hears_as_silence():
    """The mixture is tagged (Speech, Dishes); alone, the Dishes estimate (all zero) is heard as silence: dropped."""
    tagger, separator = small_tagger(), small_separator()
    heard_as_silence = torch.full((3, 19), -5.0)
    heard_as_silence[:, 18] = 5.0

    def forward(waveform):
        if waveform.shape[0] == 1:  # the mixture
            logits = torch.full((1, 3, 19), -5.0)
            logits[0, 0, 15], logits[0, 1, 18], logits[0, 2, LABELS.index("Dishes")] = 3.0, 3.0, 3.0
            return logits
        speech = torch.full((3, 19), -5.0)
        speech[0, 15], speech[1:, 18] = 5.0, 5.0
        return torch.stack([speech if estimate.abs().sum() > 0 else heard_as_silence for estimate in waveform])
    tagger.forward = forward
    x = mixture(0.5)[:1]
    separator.forward = lambda mixture, queries: torch.stack([mixture[:, 0], 0 * mixture[:, 0], 0 * mixture[:, 0]], 1)
    assert model.S5(tagger, separator)(x)["label"] == [["Speech", "Dishes", SILENCE]]
    output = model.S5(tagger, separator, second_look=True)(x)
    assert output["label"] == [["Speech", SILENCE, SILENCE]] and not output["waveform"][0, 1:].any()
    assert torch.equal(output["waveform"][0, 0], x[0, 0])


def test_second_look_relabels_a_confidently_contradicted_source_and_separates_again():
    """Tagged (Speech, Dishes); alone, the Dishes estimate is heard as Cough with p 0.95: with relabel_confidence 0.9
    the slot becomes Cough and the mixture is separated again with the new queries; below 0.95, or without the option,
    nothing changes."""
    tagger, separator = small_tagger(), small_separator()
    cough = LABELS.index("Cough")

    def forward(waveform):
        if waveform.shape[0] == 1:  # the mixture
            logits = torch.full((1, 3, 19), -5.0)
            logits[0, 0, 15], logits[0, 1, LABELS.index("Dishes")], logits[0, 2, 18] = 3.0, 3.0, 3.0
            return logits
        heard = torch.full((len(waveform), 3, 19), -9.0)
        heard[:, 1:, 18] = 9.0
        heard[0, 0, 15], heard[1, 0, cough], heard[1, 0, 4] = 9.0, 9.0, 6.0  # Speech as Speech, Dishes as Cough (0.95)
        return heard
    tagger.forward = forward
    calls = []
    separator.forward = lambda mixture, queries: calls.append(queries.clone()) or queries[..., :1] * mixture[:, None, 0]
    x = mixture(0.5)[:1]
    assert model.S5(tagger, separator, second_look=True)(x)["label"] == [["Speech", "Dishes", SILENCE]]
    calls.clear()
    output = model.S5(tagger, separator, second_look=True, relabel_confidence=0.9)(x)
    assert output["label"] == [["Speech", "Cough", SILENCE]] and abs(output["probabilities"][0, 1] - 0.9526) < 1e-3
    assert len(calls) == 2 and calls[1][0, 1, cough] == 1 and calls[1][0, 1].sum() == 1
    assert model.S5(tagger, separator, second_look=True, relabel_confidence=0.96)(x)["label"][0][1] == "Dishes"


def test_iterative_refinement_starts_as_the_official_network(tmp_path):
    """iterations > 1 adds one zero-initialised input for the previous estimate: an official checkpoint loads into it
    and gives bit-identical outputs; only the last pass is differentiated, and it is fed the earlier estimate."""
    separator = small_separator()
    assert not any("feedback" in key for key in separator.state_dict())  # iterations 1: the official key set
    path = save_lightning(tmp_path / "resunetk.ckpt", official_separator_state(separator))
    checkpoint = model.read_checkpoint(path, "separator")
    refined = model.Separator(dataclasses.replace(checkpoint.config, iterations=3)).eval()
    model.load_weights(refined, checkpoint.weights, path)  # strict: only the feedback input may be missing
    x, q = mixture(0.5), queries([["Speech", None, "Cough"], ["Dishes", "Dishes", None]])
    with torch.no_grad():
        official = separator(x, q)
        assert torch.equal(refined(x, q), official)
        torch.nn.init.normal_(refined.base.feedback_conv.weight)
        assert torch.equal(refined(x, q, passes=1), official)  # the first pass is fed zeros
        assert not torch.allclose(refined(x, q), official)
    grad_enabled = []
    separate = refined.separate
    refined.separate = lambda *args: grad_enabled.append(torch.is_grad_enabled()) or separate(*args)
    refined.train()(x, q, passes=3).square().sum().backward()
    assert grad_enabled == [False, False, True] and refined.base.feedback_conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="iterations > 1"):
        separator(x, q, passes=2)


def trainable(tagger):
    return {name for name, parameter in tagger.named_parameters() if parameter.requires_grad}


def test_finetuning_trainable_sets():
    tagger = small_tagger(depth=4)
    head = {name for name, _ in tagger.named_parameters() if name.startswith("head.")}
    assert trainable(tagger) == head and all(k.startswith(("head.linear.", "head.tracks.")) for k in head)
    tagger.set_finetuning("2_blocks")
    two_blocks = {n for n, _ in tagger.named_parameters() if n.startswith(("backbone.blocks.2.", "backbone.blocks.3.", "backbone.norm."))}
    assert trainable(tagger) == head | two_blocks
    tagger.set_finetuning("all")
    assert trainable(tagger) == {n for n, _ in tagger.named_parameters()} - {"backbone.norm_stats"}
    assert trainable(small_tagger(num_channels=4)) == {n for n, _ in small_tagger(num_channels=4).named_parameters() if n.startswith("head.")}
    assert trainable(small_tagger(head="linear")) == {"head.weight", "head.bias"}
    for mode in ("3_block", "13_blocks", "everything"):
        with pytest.raises(ValueError, match="finetuning"):
            model.TaggerConfig(finetuning=mode)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def official_tagger_state(tagger, four_channel=False):
    """The state dict of an official Lightning tagger checkpoint."""
    features = pytest.importorskip("nnAudio.features")
    to_spec = features.MelSpectrogram(sr=32000, n_fft=800, win_length=800, n_mels=80, hop_length=320, fmin=50,
                                      fmax=16000, center=True, power=2, verbose=False).state_dict()
    inner = "model.m2d." if four_channel else "model."
    state = {f"{inner}to_spec.{k}": v for k, v in to_spec.items()}
    for key, value in tagger.state_dict().items():
        state[(inner if key.startswith(("backbone.", "head_norm.")) else "model.") + key] = value
    return state


def official_separator_state(separator):
    stft = pytest.importorskip("torchlibrosa.stft")
    settings = dict(n_fft=1024, hop_length=160, win_length=1024, window="hann", center=True, pad_mode="reflect",
                    freeze_parameters=True)
    state = {f"model.{k}": v for k, v in separator.state_dict().items()}
    state.update({f"model.base.stft.{k}": v for k, v in stft.STFT(**settings).state_dict().items()})
    state.update({f"model.base.istft.{k}": v for k, v in stft.ISTFT(**settings).state_dict().items()})
    return state


def save_lightning(path, state):
    torch.save({"state_dict": state, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "2.5.1"}, path)
    return str(path)


@pytest.mark.parametrize("variant", ["1c", "4c", "2025"])
def test_official_tagger_checkpoints_load_strictly(tmp_path, variant):
    tagger = small_tagger(num_channels=4 if variant == "4c" else 1, head="linear" if variant == "2025" else "avg_linear")
    with torch.no_grad():
        tagger.backbone.norm_stats.copy_(torch.tensor([-5.0, 3.0]))
    state = official_tagger_state(tagger, four_channel=variant == "4c")
    if variant == "4c":
        assert "model.m2d.backbone.cls_token" in state and "model.m2d.to_spec.stft.wsin" in state
    loaded = model.load_tagger(save_lightning(tmp_path / "m2dat.ckpt", state))
    assert not loaded.training and loaded.config == dataclasses.replace(tagger.config, finetuning="head")
    x = mixture(0.25)
    with torch.no_grad():
        assert torch.equal(loaded(x), tagger(x))
    bad = {**state, "model.head.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"do not fit this Tagger: unexpected 1 \(head.extra.weight\)"):
        model.load_tagger(save_lightning(tmp_path / "unexpected.ckpt", bad))
    bad = {k: v for k, v in state.items() if "blocks.1.norm2.bias" not in k}
    with pytest.raises(ValueError, match="backbone.blocks.1.norm2.bias"):
        model.load_tagger(save_lightning(tmp_path / "missing.ckpt", bad))


@pytest.mark.parametrize("num_slots", [3, 1])
def test_official_separator_checkpoints_load_strictly(tmp_path, num_slots):
    separator = small_separator(num_slots=num_slots)
    state = official_separator_state(separator)
    assert "model.film.decoder_block3->beta2.weight" in state and "model.base.istft.ola_window" in state
    loaded = model.load_separator(save_lightning(tmp_path / "resunetk.ckpt", state))
    assert not loaded.training and loaded.config == separator.config
    x, q = mixture(0.25), queries([["Speech", None, "Cough"], ["Dishes", "Dishes", None]])
    with torch.no_grad():
        assert torch.equal(loaded(x, q), separator(x, q))
    with pytest.raises(ValueError, match=r"unexpected 1 \(film.extra->beta1.weight\)"):
        model.load_separator(save_lightning(tmp_path / "bad.ckpt", {**state, "model.film.extra->beta1.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="base.bn0.running_mean"):
        model.load_separator(save_lightning(tmp_path / "bad.ckpt", {k: v for k, v in state.items() if "bn0.running_mean" not in k}))
    with pytest.raises(ValueError, match="expected a tagger"):
        model.load_tagger(str(tmp_path / "resunetk.ckpt"))


def test_own_checkpoint_round_trip_and_errors(tmp_path):
    tagger, separator = small_tagger(num_channels=4), small_separator()
    for kind, module in (("tagger", tagger), ("separator", separator)):
        torch.save({"kind": kind, "model_config": dataclasses.asdict(module.config), "model": module.state_dict(),
                    "step": 5}, tmp_path / f"{kind}.pt")
    loaded_tagger = model.load_tagger(str(tmp_path / "tagger.pt"))
    loaded_separator = model.load_separator(str(tmp_path / "separator.pt"))
    x, q = mixture(0.25), queries([["Speech", None, None], ["Cough", "Pour", "Typing"]])
    with torch.no_grad():
        assert torch.equal(loaded_tagger(x), tagger(x)) and torch.equal(loaded_separator(x, q), separator(x, q))
    assert not loaded_tagger.training and not loaded_separator.training
    with pytest.raises(ValueError, match="separator checkpoint, expected a tagger"):
        model.load_tagger(str(tmp_path / "separator.pt"))
    with pytest.raises(ValueError, match="model_config"):
        torch.save({"kind": "tagger", "model_config": {"width": 3}, "model": {}}, tmp_path / "bad.pt")
        model.load_tagger(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="missing.pt: checkpoint file not found"):
        model.load_tagger(str(tmp_path / "missing.pt"))


def test_m2d_weight_file_from_official_folder(tmp_path):
    assert model.parse_m2d_folder_name("m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly/w.pth") == ((80, 1001), (16, 16), "32k")
    assert model.parse_m2d_folder_name("m2d_vit_base-80x608p16x16-221006-mr7_enconly/w.pth") == ((80, 608), (16, 16), "16k")
    with pytest.raises(ValueError, match="sample-rate tag"):
        model.parse_m2d_folder_name("m2d-80x1001p16x16p44k-1/w.pth")
    source = small_tagger()
    state = {f"module.ar.runtime.backbone.{k}": v for k, v in source.backbone.state_dict().items() if k != "norm_stats"}
    state.update({"module.head.norm.running_mean": torch.full((640,), 0.5), "module.head.norm.running_var": torch.full((640,), 2.0),
                  "module.head.mlp.mlp.0.weight": torch.zeros(527, 640), "module.head.mlp.mlp.0.bias": torch.zeros(527),
                  "module.ar.runtime.to_spec.mel_basis": torch.zeros(80, 401)})
    folder = tmp_path / "m2d_as_vit_base-80x1001p16x16p32k-240413_AS-FT_enconly"
    folder.mkdir()
    path = folder / "weights_ep69it3124-0.47998.pth"
    torch.save({"model": state}, path)
    tagger = model.build_tagger(model.TaggerConfig(m2d_weights=str(path), **SMALL_VIT))
    for key, value in source.backbone.state_dict().items():
        expected = torch.tensor([-7.1, 4.2]) if key == "norm_stats" else value  # default statistics when absent
        assert torch.equal(tagger.backbone.state_dict()[key], expected), key
    assert torch.equal(tagger.head_norm.running_var, torch.full((640,), 2.0))
    del state["module.ar.runtime.backbone.norm.bias"]
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="norm.bias"):
        model.build_tagger(model.TaggerConfig(m2d_weights=str(path), **SMALL_VIT))
    with pytest.raises(ValueError, match="folder name"):
        model.build_tagger(model.TaggerConfig(m2d_weights=str(path), input_size=(80, 608), **SMALL_VIT))


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision and compilation


def test_bf16_autocast_and_no_graph_breaks():
    tagger, separator = small_tagger(num_channels=4), small_separator()
    x, q = mixture(0.25), queries([["Speech", None, "Cough"], ["Dishes", "Pour", None]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits, waves = tagger(x), separator(x, q)
    with torch.no_grad():
        assert (logits.float() - tagger(x)).abs().max() < 0.5
        assert waves.dtype == torch.float32 and snr_db(waves[0, 0], separator(x, q)[0, 0]) > 10
    assert not waves[0, 1].any()
    for module, inputs in ((tagger, (x,)), (separator, (x, q))):
        explanation = torch._dynamo.explain(module)(*inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
