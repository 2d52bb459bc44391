"""Models of the DCASE 2026 Task 4 baseline in plain PyTorch: the M2D ViT audio tagger (1- and 4-channel, and the
2025 multi-label variant), the ResUNet30 separator with K label-query slots (ResUNetK; K = 1 is the 2025 ResUNet),
the S5 system that chains them, and loaders for the official Lightning checkpoints and our own checkpoints.

Module and parameter names follow the official checkpoints (timm names for the ViT, '->' FiLM names for the
separator), so official weights load strictly through the small remap table next to `load_tagger`.

    python model.py --bench                                   # fwd+bwd ms and peak memory, batch 4 x 10 s
    python model.py --bench --device cpu --batch_size 2 --seconds 1
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python model.py --bench --device cpu
                                                              # as on a CPU without AVX-512 (torch, oneDNN, MKL)
"""
import dataclasses
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from cli import StrictParser, add_config_flags, config_from_args
from devset import LABELS, NUM_SLOTS, SAMPLE_RATE, SILENCE

NUM_CLASSES = len(LABELS)  # 18 target classes: the separator's query size
TAGGER_CLASSES = NUM_CLASSES + 1  # the 2026 tagger adds 'silence' as class 18
LOG_EPS = float(torch.finfo(torch.float32).eps)  # added to the mel power before the log, as the official
MAG_EPS = 1e-10  # floor on the separator's STFT power (so magnitudes are >= 1e-5)
# Log-mel front ends selected by the sample-rate tag of the M2D folder name (as the official portable_m2d.py).
FRONT_ENDS = {
    "16k": dict(sample_rate=16000, n_fft=400, hop_length=160, n_mels=80, f_min=50.0, f_max=8000.0),
    "32k": dict(sample_rate=32000, n_fft=800, hop_length=320, n_mels=80, f_min=50.0, f_max=16000.0),
}


@dataclass
class TaggerConfig:
    num_channels: int = 1  # microphones read: 1 (the reference channel) or 4 (one shared backbone)
    ref_channel: int = 0  # channel index used by the 1-channel tagger
    head: str = "avg_linear"  # 'avg_linear' (2026: 3 slots x 19 classes) or 'linear' (2025: 18-way sigmoid)
    finetuning: str = "head"  # trainable part: 'head', 'N_blocks' (N = 1..depth), 'backbone_out' or 'all'
    m2d_weights: str = ""  # M2D weight file (.pth) initialising the backbone; '' = random init
    sample_rate_tag: str = "32k"  # log-mel front end, '32k' or '16k' (must match the M2D folder name)
    input_size: tuple = (80, 1001)  # (mel bins, frames) of the pre-training input; frames = chunk length
    patch_size: tuple = (16, 16)  # (mel bins, frames) per ViT patch
    embed_dim: int = 768  # ViT width (channels)
    depth: int = 12  # ViT blocks
    num_heads: int = 12  # attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim
    track_input_dim: int = 1024  # HeadAvgLinear: features per slot after the shared Linear
    track_hidden_dim: int = 512  # HeadAvgLinear: hidden width of each slot's MLP

    def __post_init__(self):
        self.input_size, self.patch_size = tuple(self.input_size), tuple(self.patch_size)  # JSON gives lists
        if self.head not in ("avg_linear", "linear"):
            raise ValueError(f"TaggerConfig.head={self.head!r}: expected 'avg_linear' or 'linear'")
        if self.num_channels < 1 or (self.head == "linear" and self.num_channels != 1):
            raise ValueError(f"TaggerConfig.num_channels={self.num_channels}: expected 1 or 4 (only 1 for head 'linear')")
        if not 0 <= self.ref_channel < 4:
            raise ValueError(f"TaggerConfig.ref_channel={self.ref_channel}: expected 0-3 (the 4 microphones of the "
                             "dev set's mixtures)")
        if self.sample_rate_tag not in FRONT_ENDS:
            raise ValueError(f"TaggerConfig.sample_rate_tag={self.sample_rate_tag!r}: expected one of {list(FRONT_ENDS)}")
        first_trainable_layer(self.finetuning, self.depth)  # validates the mode
        if self.embed_dim % self.num_heads or self.input_size[0] % self.patch_size[0]:
            raise ValueError(f"TaggerConfig: embed_dim {self.embed_dim} must divide by num_heads {self.num_heads} and "
                             f"mel bins {self.input_size[0]} by patch height {self.patch_size[0]}")


@dataclass
class SeparatorConfig:
    num_slots: int = NUM_SLOTS  # query slots K separated in one pass: 3 (ResUNetK) or 1 (2025 ResUNet)
    base_channels: int = 32  # UNet width: channels of the first block (official 32; 8 or 16 for a CPU demo)
    input_channels: int = 4  # microphones of the mixture
    n_fft: int = 1024  # STFT size = window length, samples
    hop_length: int = 160  # STFT hop, samples
    condition_dim: int = 512  # label embedding width

    def __post_init__(self):
        if self.num_slots < 1 or self.base_channels < 1:
            raise ValueError(f"SeparatorConfig: num_slots {self.num_slots} and base_channels {self.base_channels} "
                             "must be positive")


# ----------------------------------------------------------------------------------------------------------------
# Tagger: log-mel front end, M2D ViT backbone, heads


def first_trainable_layer(mode: str, depth: int) -> int:
    """Index into the official fine-tuning layer list (m2dat.py) from which on everything is trainable."""
    blocks = re.fullmatch(r"(\d+)_blocks", mode)
    if mode in ("all", "backbone_out", "head"):
        return {"all": 0, "backbone_out": 6 + depth, "head": 9 + depth}[mode]
    if blocks and 1 <= int(blocks.group(1)) <= depth:
        return 6 + depth - int(blocks.group(1))
    raise ValueError(f"finetuning={mode!r}: expected 'head', 'backbone_out', 'all' or 'N_blocks' with N in 1..{depth}")


def parse_m2d_folder_name(weight_file: str) -> tuple[tuple, tuple, str]:
    """M2D configuration from the weight file's folder name, e.g. 'm2d_as_vit_base-80x1001p16x16p32k-240413_...'
    -> ((80, 1001), (16, 16), '32k'); the sample-rate tag defaults to '16k' when absent (as in portable_m2d.py)."""
    name = Path(weight_file).parent.name
    fields = name.split("-")
    pieces = fields[1].split("p")[:3] if len(fields) > 1 else []
    try:
        input_size = tuple(int(v) for v in pieces[0].split("x"))
        patch_size = tuple(int(v) for v in pieces[1].split("x"))
        assert len(input_size) == 2 and len(patch_size) == 2
    except (IndexError, ValueError, AssertionError):
        raise ValueError(f"{weight_file}: folder name {name!r} should look like "
                         "'<model>-80x1001p16x16p32k-<date>...' (input size, patch size, sample-rate tag)") from None
    tag = pieces[2] if len(pieces) > 2 else "16k"
    if tag not in FRONT_ENDS:
        raise ValueError(f"{weight_file}: sample-rate tag {tag!r} in the folder name; expected one of {list(FRONT_ENDS)}")
    return input_size, patch_size, tag


class LogMel(nn.Module):
    """Log-mel spectrogram equal to nnAudio's MelSpectrogram (Slaney scale and norm, power 2) plus log(x + eps)."""

    def __init__(self, sample_rate_tag: str = "32k"):
        super().__init__()
        settings = FRONT_ENDS[sample_rate_tag]
        self.n_fft, self.hop_length = settings["n_fft"], settings["hop_length"]
        # torchaudio builds the bank in the default dtype; float64 matches nnAudio to 2e-9 (float32: 7e-8).
        # It is built on the CPU so that a model can also be created on the 'meta' device.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            with torch.device("cpu"):
                bank = torchaudio.functional.melscale_fbanks(
                    self.n_fft // 2 + 1, settings["f_min"], settings["f_max"], settings["n_mels"],
                    settings["sample_rate"], norm="slaney", mel_scale="slaney")
        finally:
            torch.set_default_dtype(default_dtype)
        self.register_buffer("mel_basis", bank.T.float(), persistent=False)  # (n_mels, n_freq)
        self.register_buffer("window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [N, L] -> log-mel [N, n_mels, 1 + L // hop], always float32."""
        with torch.autocast(waveform.device.type, enabled=False):
            spec = torch.stft(waveform.float(), self.n_fft, self.hop_length, window=self.window, center=True,
                              pad_mode="reflect", return_complex=True)  # (N, F, T)
            power = torch.view_as_real(spec).pow(2).sum(-1)  # (N, F, T)
            return torch.log(self.mel_basis @ power + LOG_EPS)  # (N, n_mels, T)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: tuple, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, dim, patch_size, stride=patch_size)


class VisionTransformer(nn.Module):
    """The M2D ViT (timm parameter names). Tokens are frequency-major: token index = f * t + time."""

    def __init__(self, config: TaggerConfig):
        super().__init__()
        dim = config.embed_dim
        self.grid = (config.input_size[0] // config.patch_size[0], config.input_size[1] // config.patch_size[1])
        self.chunk_frames, self.patch_frames = config.input_size[1], config.patch_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.norm_stats = nn.Parameter(torch.tensor([-7.1, 4.2]), requires_grad=False)  # log-mel mean, std
        self.patch_embed = PatchEmbed(config.patch_size, dim)
        self.blocks = nn.ModuleList(Block(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def encode_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1, n_mels, frames <= chunk] -> features [B, t, grid_f * D]."""
        x = self.patch_embed.proj(x)  # (B, D, f, t)
        B, D, f, t = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, f*t, D), frequency-major
        # Short inputs keep the first t time columns of every frequency row of the position table.
        pos = self.pos_embed[:, 1:].view(1, self.grid[0], self.grid[1], D)[:, :, :t].reshape(1, f * t, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x + pos], dim=1)  # (B, 1 + f*t, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)[:, 1:]  # (B, f*t, D)
        return x.reshape(B, f, t, D).permute(0, 2, 1, 3).reshape(B, t, f * D)  # (B, t, f*D), index f*D + d

    def forward(self, lms: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel [B, 1, n_mels, T] -> features [B, t, grid_f * D]; long inputs run in chunks."""
        frames = lms.shape[-1]
        lms = F.pad(lms, (0, (-frames) % self.patch_frames))  # zero pad in the normalised domain
        chunks = math.ceil(frames / self.chunk_frames)
        return torch.cat([self.encode_chunk(lms[..., i * self.chunk_frames:(i + 1) * self.chunk_frames])
                          for i in range(chunks)], dim=1)


class HeadAvgLinear(nn.Module):
    """Time average -> BatchNorm (no affine) -> shared Linear+LayerNorm+ReLU -> one MLP per output slot."""

    def __init__(self, feature_dim: int, num_outputs: int, num_classes: int, track_input_dim: int, track_hidden_dim: int):
        super().__init__()
        self.num_outputs, self.track_input_dim = num_outputs, track_input_dim
        self.m2d_out_norm = nn.BatchNorm1d(feature_dim, affine=False)
        self.linear = nn.Sequential(nn.Linear(feature_dim, num_outputs * track_input_dim),
                                    nn.LayerNorm(num_outputs * track_input_dim), nn.ReLU())
        self.tracks = nn.ModuleList(
            nn.Sequential(nn.Linear(track_input_dim, track_hidden_dim), nn.LayerNorm(track_hidden_dim), nn.ReLU(),
                          nn.Linear(track_hidden_dim, num_classes)) for _ in range(num_outputs))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, T, D] -> logits [B, num_outputs, num_classes]."""
        x = self.linear(self.m2d_out_norm(features.mean(1)))  # (B, outputs * track_input_dim)
        x = x.view(-1, self.num_outputs, self.track_input_dim)  # (B, outputs, track_input_dim)
        return torch.stack([track(x[:, i]) for i, track in enumerate(self.tracks)], dim=1)


class Tagger(nn.Module):
    """M2D audio tagger. 2026 head: logits [B, 3, 19] (class 18 = silence); 2025 head: logits [B, 18] (sigmoid)."""

    def __init__(self, config: TaggerConfig):
        super().__init__()
        self.config = config
        self.log_mel = LogMel(config.sample_rate_tag)
        self.backbone = VisionTransformer(config)
        feature_dim = config.embed_dim * self.backbone.grid[0]  # 3840 for ViT-Base on 80 mel bins
        # Kept for key compatibility: the 2026 heads do not use it, the 2025 head normalises with it.
        self.head_norm = nn.BatchNorm1d(feature_dim, affine=False)
        if config.head == "avg_linear":
            self.head = HeadAvgLinear(feature_dim * config.num_channels, NUM_SLOTS, TAGGER_CLASSES,
                                      config.track_input_dim, config.track_hidden_dim)
        else:
            self.head = nn.Linear(feature_dim, NUM_CLASSES)
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.set_finetuning(config.finetuning)

    def set_finetuning(self, mode: str) -> None:
        """requires_grad as the official fine-tuning list (m2dat.py); norm_stats always stays frozen."""
        backbone = self.backbone
        # Official order: cls_token, pos_embed, patch_embed, pos_drop, patch_drop, norm_pre, blocks..., norm,
        # fc_norm, head_drop, head_norm, head (the dropout/identity entries own no parameters).
        layers = [backbone.cls_token, backbone.pos_embed, backbone.patch_embed, None, None, None, *backbone.blocks,
                  backbone.norm, None, None, self.head_norm, self.head]
        first = first_trainable_layer(mode, len(backbone.blocks))
        for index, layer in enumerate(layers):
            parameters = [layer] if isinstance(layer, nn.Parameter) else layer.parameters() if layer is not None else []
            for parameter in parameters:
                parameter.requires_grad_(index >= first)
        self.config.finetuning = mode

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [N, L] -> features [N, t, feature_dim] (62 x 3840 for 10 s)."""
        mean, std = self.backbone.norm_stats
        lms = (self.log_mel(waveform) - mean) / std  # (N, n_mels, T)
        return self.backbone(lms.unsqueeze(1))  # (N, t, feature_dim)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [B, C, L] (or [B, L]) -> logits [B, 3, 19] (2026) or [B, 18] (2025, pre-sigmoid)."""
        if waveform.dim() == 2:
            waveform = waveform.unsqueeze(1)  # (B, 1, L)
        if self.config.num_channels == 1:
            waveform = waveform[:, self.config.ref_channel:self.config.ref_channel + 1]  # (B, 1, L)
        B, C, L = waveform.shape
        if C != self.config.num_channels:
            raise ValueError(f"tagger expects {self.config.num_channels} channels, got waveform of shape {tuple(waveform.shape)}")
        features = self.encode(waveform.reshape(B * C, L))  # (B*C, t, D)
        features = features.view(B, C, *features.shape[1:]).permute(0, 2, 1, 3).flatten(2)  # (B, t, C*D), channel outermost
        if self.config.head == "linear":
            return self.head(self.head_norm(features.mean(1)))  # (B, 18)
        return self.head(features)  # (B, 3, 19)

    @torch.no_grad()
    def predict(self, waveform: torch.Tensor, threshold: float = 0.5) -> tuple[list[list[str]], torch.Tensor]:
        """waveform [B, C, L] -> (3 labels per item, probabilities [B, 3]), by labels_from_logits."""
        return self.labels_from_logits(self(waveform).float(), threshold)

    @torch.no_grad()
    def labels_from_logits(self, logits: torch.Tensor, threshold: float = 0.5) -> tuple[list[list[str]], torch.Tensor]:
        """logits of forward -> (3 labels per item, probabilities [B, 3]).

        2026: per slot the arg-max of the softmax over 19 classes (silence = 18) and its probability.
        2025: classes with sigmoid >= threshold (at least the arg-max, at most the 3 most probable), listed in
        class-index order and padded with 'silence' (probability 0) to 3 slots.
        """
        logits = logits.float()
        names = LABELS + (SILENCE,)
        if self.config.head == "avg_linear":
            probabilities, indices = logits.softmax(-1).max(-1)  # (B, 3)
            return [[names[i] for i in row] for row in indices.tolist()], probabilities
        scores = logits.sigmoid()  # (B, 18)
        labels, probabilities = [], torch.zeros(len(scores), NUM_SLOTS, device=scores.device)
        for b, row in enumerate(scores):
            chosen = sorted(row.argsort(descending=True)[:max(1, min(NUM_SLOTS, int((row >= threshold).sum())))].tolist())
            labels.append([names[i] for i in chosen] + [SILENCE] * (NUM_SLOTS - len(chosen)))
            probabilities[b, :len(chosen)] = row[chosen]
        return labels, probabilities


def load_m2d_weights(tagger: Tagger, weight_file: str) -> None:
    """Initialise the backbone (and head_norm statistics) from an official M2D weight file, strictly."""
    checkpoint = torch.load(weight_file, map_location="cpu", weights_only=False)  # trusted official file
    state = checkpoint.get("model", checkpoint)
    state = {key.replace("module.ar.runtime.backbone.", ""): value for key, value in state.items()}
    state.setdefault("norm_stats", torch.tensor([-7.1, 4.2]))
    head_weight = state.get("module.head.mlp.mlp.0.weight")
    if head_weight is not None and head_weight.shape[-1] == tagger.config.embed_dim:
        raise ValueError(f"{weight_file}: flat-feature M2D heads (feature dim {head_weight.shape[-1]}) are not supported")
    names = {name for name, _ in tagger.backbone.named_parameters()}
    _load_strict(tagger.backbone, {k: v for k, v in state.items() if k in names}, weight_file)
    if "module.head.norm.running_mean" in state:  # EVAR fine-tuning head statistics
        tagger.head_norm.running_mean.copy_(state["module.head.norm.running_mean"])
        tagger.head_norm.running_var.copy_(state["module.head.norm.running_var"])


def build_tagger(config: TaggerConfig) -> Tagger:
    """A tagger from its config; with m2d_weights the backbone starts from that M2D file."""
    if config.m2d_weights:
        input_size, patch_size, tag = parse_m2d_folder_name(config.m2d_weights)
        if (input_size, patch_size, tag) != (config.input_size, config.patch_size, config.sample_rate_tag):
            raise ValueError(f"{config.m2d_weights}: folder name gives input_size {input_size}, patch_size {patch_size}, "
                             f"sample rate {tag}, but the config has {config.input_size}, {config.patch_size}, "
                             f"{config.sample_rate_tag}")
    tagger = Tagger(config)
    if config.m2d_weights:
        with torch.no_grad():
            load_m2d_weights(tagger, config.m2d_weights)
    return tagger


# ----------------------------------------------------------------------------------------------------------------
# Separator: ResUNet30 with K query slots


class ConvBlockRes(nn.Module):
    """Pre-activation residual block; FiLM biases are added after each BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, name: str):
        super().__init__()
        self.name = name  # FiLM path prefix, e.g. 'encoder_block1->conv_block1'
        self.bn1, self.bn2 = nn.BatchNorm2d(in_channels, momentum=0.01), nn.BatchNorm2d(out_channels, momentum=0.01)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.film_sizes = {f"{name}->beta1": in_channels, f"{name}->beta2": out_channels}

    def forward(self, x: torch.Tensor, betas: dict) -> torch.Tensor:
        """x [B, C_in, T, F] -> [B, C_out, T, F]."""
        h = self.conv1(F.leaky_relu(self.bn1(x) + betas[f"{self.name}->beta1"], 0.01))
        h = self.conv2(F.leaky_relu(self.bn2(h) + betas[f"{self.name}->beta2"], 0.01))
        return self.shortcut(x) + h


class EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, downsample: tuple, name: str):
        super().__init__()
        self.downsample = downsample
        self.conv_block1 = ConvBlockRes(in_channels, out_channels, f"{name}->conv_block1")
        self.film_sizes = self.conv_block1.film_sizes

    def forward(self, x: torch.Tensor, betas: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C_in, T, F] -> (pooled [B, C_out, T/dt, F/df], skip [B, C_out, T, F])."""
        skip = self.conv_block1(x, betas)
        return F.avg_pool2d(skip, self.downsample), skip


class DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, upsample: tuple, name: str):
        super().__init__()
        self.name = name
        self.conv1 = nn.ConvTranspose2d(in_channels, out_channels, upsample, stride=upsample, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels, momentum=0.01)
        self.bn2 = nn.BatchNorm2d(in_channels, momentum=0.01)  # unused, as in the official model
        self.conv_block2 = ConvBlockRes(2 * out_channels, out_channels, f"{name}->conv_block2")
        # beta2 has a FiLM layer in the official model although nothing uses it.
        self.film_sizes = {f"{name}->beta1": in_channels, f"{name}->beta2": in_channels, **self.conv_block2.film_sizes}

    def forward(self, x: torch.Tensor, skip: torch.Tensor, betas: dict) -> torch.Tensor:
        """x [B, C_in, T, F], skip [B, C_out, T*ut, F*uf] -> [B, C_out, T*ut, F*uf]."""
        h = self.conv1(F.leaky_relu(self.bn1(x) + betas[f"{self.name}->beta1"], 0.01))
        return self.conv_block2(torch.cat([h, skip], dim=1), betas)


class ResUNet30Base(nn.Module):
    """The UNet on [B, C, T, F] magnitudes, with bn0 over frequency bins and a 6-level encoder/decoder."""

    def __init__(self, config: SeparatorConfig):
        super().__init__()
        c = config.base_channels
        widths = [c, c, 2 * c, 4 * c, 8 * c, 12 * c, 12 * c]  # 32, 32, 64, 128, 256, 384, 384 officially
        pools = [(2, 2)] * 5 + [(1, 2)]
        self.bn0 = nn.BatchNorm2d(config.n_fft // 2 + 1, momentum=0.01)
        self.pre_conv = nn.Conv2d(config.input_channels, c, 1)
        for i in range(6):
            setattr(self, f"encoder_block{i + 1}", EncoderBlock(widths[i], widths[i + 1], pools[i], f"encoder_block{i + 1}"))
        self.conv_block7a = EncoderBlock(widths[6], widths[6], (1, 1), "conv_block7a")
        for i in range(6):
            setattr(self, f"decoder_block{i + 1}",
                    DecoderBlock(widths[min(6, 7 - i)], widths[6 - i], pools[5 - i], f"decoder_block{i + 1}"))
        self.after_conv = nn.Conv2d(c, config.input_channels * 3 * config.num_slots, 1)
        self.out_conv = nn.Conv2d(config.input_channels, 1, 1)
        self.time_multiple = 2 ** sum(p[0] == 2 for p in pools)  # 32

    def forward(self, magnitude: torch.Tensor, betas: dict) -> torch.Tensor:
        """magnitude [B, C, T, F] -> mask logits [B, C*3*K, T, F]."""
        frames = magnitude.shape[2]
        x = self.bn0(magnitude.transpose(1, 3)).transpose(1, 3)  # (B, C, T, F), statistics per frequency bin
        x = F.pad(x, (0, 0, 0, (-frames) % self.time_multiple))[..., :-1]  # (B, C, T', F-1): drop Nyquist
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC convolutions are faster on GPUs
        x = self.pre_conv(x)
        skips = []
        for i in range(1, 7):
            x, skip = getattr(self, f"encoder_block{i}")(x, betas)
            skips.append(skip)
        x, _ = self.conv_block7a(x, betas)
        for i in range(1, 7):
            x = getattr(self, f"decoder_block{i}")(x, skips[-i], betas)
        x = self.after_conv(x)  # (B, C*3*K, T', F-1)
        return F.pad(x, (0, 1))[:, :, :frames]  # (B, C*3*K, T, F), zero logits for the Nyquist bin


class Separator(nn.Module):
    """ResUNet30 label-queried separator. K = 3 separates three query slots at once; K = 1 runs each query alone."""

    def __init__(self, config: SeparatorConfig):
        super().__init__()
        self.config = config
        self.base = ResUNet30Base(config)
        self.label_embedding = nn.Sequential(
            nn.Linear(NUM_CLASSES * config.num_slots, config.condition_dim), nn.LayerNorm(config.condition_dim),
            nn.ReLU(), nn.Linear(config.condition_dim, config.condition_dim), nn.LayerNorm(config.condition_dim),
            nn.ReLU())
        sizes = {}
        for block in self.base.children():
            sizes.update(getattr(block, "film_sizes", {}))
        self.film = nn.ModuleDict({name: nn.Linear(config.condition_dim, size) for name, size in sizes.items()})
        self.register_buffer("window", torch.hann_window(config.n_fft, periodic=True), persistent=False)

    def spectrogram(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """waveform [N, L] -> (real, imag) each [N, T, F] float32."""
        spec = torch.stft(waveform.float(), self.config.n_fft, self.config.hop_length, window=self.window,
                          center=True, pad_mode="reflect", return_complex=True)  # (N, F, T)
        real_imag = torch.view_as_real(spec).transpose(1, 2)  # (N, T, F, 2)
        return real_imag[..., 0], real_imag[..., 1]

    def waveform(self, real: torch.Tensor, imag: torch.Tensor, length: int) -> torch.Tensor:
        """(real, imag) each [N, T, F] -> waveform [N, length]."""
        spec = torch.complex(real, imag).transpose(1, 2)  # (N, F, T)
        return torch.istft(spec, self.config.n_fft, self.config.hop_length, window=self.window, center=True,
                           length=length)

    def separate(self, mixture: torch.Tensor, label_vector: torch.Tensor) -> torch.Tensor:
        """mixture [B, C, L], label_vector [B, K*18] -> waveforms [B, K, L] (before the silence mask)."""
        B, C, L = mixture.shape
        K = self.config.num_slots
        with torch.autocast(mixture.device.type, enabled=False):
            real, imag = self.spectrogram(mixture.reshape(B * C, L))  # (B*C, T, F)
            real, imag = real.view(B, C, *real.shape[1:]), imag.view(B, C, *imag.shape[1:])  # (B, C, T, F)
            magnitude = (real.square() + imag.square()).clamp(min=MAG_EPS).sqrt()
            cos, sin = real / magnitude, imag / magnitude
        condition = self.label_embedding(label_vector)  # (B, 512)
        betas = {name: layer(condition)[:, :, None, None] for name, layer in self.film.items()}  # (B, C_i, 1, 1)
        logits = self.base(magnitude, betas)  # (B, C*3*K, T, F)
        with torch.autocast(mixture.device.type, enabled=False):
            logits = logits.float().view(B, K, C, 3, *logits.shape[2:])  # (B, K, C, 3, T, F)
            mask_magnitude = torch.sigmoid(logits[:, :, :, 0])  # (B, K, C, T, F)
            mask_real, mask_imag = torch.tanh(logits[:, :, :, 1]), torch.tanh(logits[:, :, :, 2])
            mask_norm = (mask_real.square() + mask_imag.square()).sqrt().clamp(min=1e-10)
            mask_cos, mask_sin = mask_real / mask_norm, mask_imag / mask_norm
            cos, sin, magnitude = cos.unsqueeze(1), sin.unsqueeze(1), magnitude.unsqueeze(1)  # (B, 1, C, T, F)
            out_magnitude = F.relu(magnitude * mask_magnitude)
            out_real = out_magnitude * (cos * mask_cos - sin * mask_sin)  # (B, K, C, T, F)
            out_imag = out_magnitude * (sin * mask_cos + cos * mask_sin)
            # One 1x1 conv mixes the microphones, applied (with its bias) to the real and imaginary parts alike.
            out_real = self.base.out_conv(out_real.flatten(0, 1)).squeeze(1)  # (B*K, T, F)
            out_imag = self.base.out_conv(out_imag.flatten(0, 1)).squeeze(1)
            return self.waveform(out_real, out_imag, L).view(B, K, L)

    def forward(self, mixture: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """mixture [B, 4, L], one-hot queries [B, Q, 18] (all-zero row = silent slot) -> waveforms [B, Q, L].

        K = 3 models need Q == 3; K = 1 models separate the Q queries as a batch. Silent slots are exactly 0.
        """
        B, Q, _ = queries.shape
        K = self.config.num_slots
        if mixture.dim() != 3 or mixture.shape[1] != self.config.input_channels:
            raise ValueError(f"separator expects a mixture [B, {self.config.input_channels}, L], got {tuple(mixture.shape)}")
        if queries.shape[-1] != NUM_CLASSES or (K > 1 and Q != K):
            raise ValueError(f"separator with {K} slots expects queries [B, {K if K > 1 else 'Q'}, {NUM_CLASSES}], "
                             f"got {tuple(queries.shape)}")
        active = (queries != 0).any(-1).float()  # (B, Q)
        if K == 1:
            mixture = mixture.repeat_interleave(Q, dim=0)  # (B*Q, C, L)
        waveforms = self.separate(mixture, queries.reshape(-1, K * NUM_CLASSES).float())  # (B*Q/K, K, L)
        return waveforms.reshape(B, Q, -1) * active.unsqueeze(-1)  # (B, Q, L)


def build_separator(config: SeparatorConfig) -> Separator:
    return Separator(config)


def count_parameters(*modules: nn.Module) -> int:
    """Parameters counted like the official evaluate.py, i.e. including the separator's frozen conv STFT/ISTFT
    kernels that torch.stft replaces here (3,147,776 for n_fft 1024)."""
    total = 0
    for module in modules:
        total += sum(p.numel() for p in module.parameters())
        for separator in (m for m in module.modules() if isinstance(m, Separator)):
            n_fft = separator.config.n_fft
            total += 2 * (n_fft // 2 + 1) * n_fft + 2 * n_fft * n_fft
    return total


# ----------------------------------------------------------------------------------------------------------------
# S5 system


class S5(nn.Module):
    """Tag the mixture, move silent slots to the end (stable), separate the named sources."""

    def __init__(self, tagger: Tagger, separator: Separator):
        super().__init__()
        self.tagger, self.separator = tagger, separator

    @torch.no_grad()
    def forward(self, mixture: torch.Tensor) -> dict:
        """mixture [B, 4, L] -> {'label': 3 names per item, 'probabilities' [B, 3], 'waveform' [B, 3, L]}."""
        labels, probabilities = self.tagger.predict(mixture)
        orders = [sorted(range(NUM_SLOTS), key=lambda i: row[i] == SILENCE) for row in labels]
        labels = [[row[i] for i in order] for row, order in zip(labels, orders)]
        probabilities = torch.stack([p[order] for p, order in zip(probabilities, orders)])
        queries = torch.zeros(len(labels), NUM_SLOTS, NUM_CLASSES, device=mixture.device)
        for b, row in enumerate(labels):
            for s, label in enumerate(row):
                if label != SILENCE:
                    queries[b, s, LABELS.index(label)] = 1.0
        return {"label": labels, "probabilities": probabilities, "waveform": self.separator(mixture, queries)}


# ----------------------------------------------------------------------------------------------------------------
# Loading official Lightning checkpoints and our own checkpoints

# The whole remap from the official Lightning checkpoints: key prefixes renamed in order (first
# match wins) and keys dropped because this implementation computes them (nnAudio / torchlibrosa buffers and
# frozen STFT kernels). Any other key is an error.
OFFICIAL_PREFIXES = {
    "tagger": (("model.m2d.", ""), ("model.", "")),  # 4-channel taggers nest the backbone in 'm2d'
    "separator": (("model.", ""),),
}
OFFICIAL_DROPPED = {
    "tagger": {"to_spec.mel_basis", "to_spec.stft.wsin", "to_spec.stft.wcos", "to_spec.stft.window_mask"},
    "separator": {"base.stft.conv_real.weight", "base.stft.conv_imag.weight", "base.istft.conv_real.weight",
                  "base.istft.conv_imag.weight", "base.istft.ola_window"},
}


def remap_official_state_dict(state_dict: dict, kind: str, source: str) -> dict:
    """Official Lightning state dict -> our key names, following OFFICIAL_PREFIXES and OFFICIAL_DROPPED."""
    remapped, unknown = {}, []
    for key, value in state_dict.items():
        prefix = next(((old, new) for old, new in OFFICIAL_PREFIXES[kind] if key.startswith(old)), None)
        name = prefix[1] + key[len(prefix[0]):] if prefix else None
        if name is None or name in remapped:
            unknown.append(key)
        elif name not in OFFICIAL_DROPPED[kind]:
            remapped[name] = value
    if unknown:
        raise ValueError(f"{source}: keys not in the official {kind} layout: {', '.join(unknown)}")
    return remapped


def _load_strict(module: nn.Module, state_dict: dict, source: str) -> None:
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source}: state dict does not match {type(module).__name__}; "
                         f"missing keys: {result.missing_keys or 'none'}; unexpected keys: {result.unexpected_keys or 'none'}")


def _read_checkpoint(path: str, kind: str) -> tuple[str, dict]:
    """-> ('ours', checkpoint) or ('official', Lightning state_dict); errors name the file and the problem."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # trusted files; Lightning needs pickle
    if isinstance(checkpoint, dict) and "kind" in checkpoint:
        if checkpoint["kind"] != kind:
            raise ValueError(f"{path}: this is a {checkpoint['kind']} checkpoint, expected a {kind} checkpoint")
        return "ours", checkpoint
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
        found = "separator" if any(k.startswith("model.base.") for k in state) else (
            "tagger" if any(".backbone." in k for k in state) else "unknown")
        if found != kind:
            raise ValueError(f"{path}: this Lightning checkpoint holds a {found} model, expected a {kind}")
        return "official", state
    raise ValueError(f"{path}: neither a nanoS5 checkpoint (with 'kind') nor a Lightning checkpoint (with 'state_dict')")


def _config_from(checkpoint: dict, config_class, path: str):
    try:
        return config_class(**checkpoint["model_config"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: bad 'model_config' for {config_class.__name__}: {error}") from None


def load_tagger(path: str) -> Tagger:
    """A tagger in eval mode from our checkpoint or an official one (m2dat_1c/4c.ckpt, 2025 m2dat.ckpt)."""
    origin, checkpoint = _read_checkpoint(path, "tagger")
    if origin == "ours":
        config = dataclasses.replace(_config_from(checkpoint, TaggerConfig, path), m2d_weights="")
        state = checkpoint["model"]
    else:
        state = remap_official_state_dict(checkpoint, "tagger", path)
        # The variant follows from the keys; the ViT size from the shapes (64 channels per attention head).
        embed_dim = state["backbone.pos_embed"].shape[-1]
        config = TaggerConfig(
            num_channels=4 if any(k.startswith("model.m2d.") for k in checkpoint) else 1,
            head="linear" if "head.weight" in state else "avg_linear",
            patch_size=tuple(state["backbone.patch_embed.proj.weight"].shape[-2:]), embed_dim=embed_dim,
            depth=len({k.split(".")[2] for k in state if k.startswith("backbone.blocks.")}),
            num_heads=max(1, embed_dim // 64))
        if config.head == "avg_linear":
            config.track_input_dim = state["head.linear.0.weight"].shape[0] // NUM_SLOTS
            config.track_hidden_dim = state["head.tracks.0.0.weight"].shape[0]
    tagger = Tagger(config)
    _load_strict(tagger, state, path)
    return tagger.eval()


def load_separator(path: str) -> Separator:
    """A separator in eval mode from our checkpoint or an official one (2026/2025 resunetk.ckpt, 2025 resunet.ckpt)."""
    origin, checkpoint = _read_checkpoint(path, "separator")
    if origin == "ours":
        config = _config_from(checkpoint, SeparatorConfig, path)
        state = checkpoint["model"]
    else:
        state = remap_official_state_dict(checkpoint, "separator", path)
        out_channels, base_channels = state["base.after_conv.weight"].shape[:2]
        input_channels = state["base.pre_conv.weight"].shape[1]
        config = SeparatorConfig(num_slots=out_channels // (3 * input_channels), base_channels=base_channels,
                                 input_channels=input_channels, condition_dim=state["label_embedding.0.weight"].shape[0])
    separator = Separator(config)
    _load_strict(separator, state, path)
    return separator.eval()


# ----------------------------------------------------------------------------------------------------------------
# Benchmark


def cpu_has_native_bf16() -> bool | None:
    """Whether torch computes bf16 on this CPU in hardware: an x86 CPU with AVX512-BF16 or AMX, with torch's AVX512
    kernels in use. Elsewhere (AVX2-only CPUs, or torch restricted by ATEN_CPU_CAPABILITY=avx2) bf16 is emulated and
    a bf16 autocast training step is several times slower than fp32. None on other architectures (not detected)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    hardware = any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return hardware and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def cpu_summary() -> str:
    """CPU model, torch threads, torch's kernel level and the bf16 support for benchmark headers, e.g. 'AMD EPYC,
    2 threads, torch kernels AVX2, bf16 emulated (slower than fp32)'."""
    name = platform.processor() or "unknown CPU"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    native = cpu_has_native_bf16()
    bf16 = {True: "native", False: "emulated (slower than fp32)", None: "support not detected"}[native]
    return f"{name}, {torch.get_num_threads()} threads, torch kernels {torch.backends.cpu.get_cpu_capability()}, bf16 {bf16}"


class ConvSTFTSeparator(Separator):
    """The same network with the official torchlibrosa-style conv1d STFT / conv + overlap-add ISTFT, for timing."""

    def __init__(self, config: SeparatorConfig):
        super().__init__(config)
        n, bins = config.n_fft, config.n_fft // 2 + 1
        angle = 2 * math.pi * torch.outer(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64)) / n
        window = torch.hann_window(n, periodic=True, dtype=torch.float64)
        self.register_buffer("stft_real", (torch.cos(angle[:bins]) * window).float()[:, None], persistent=False)
        self.register_buffer("stft_imag", (-torch.sin(angle[:bins]) * window).float()[:, None], persistent=False)
        self.register_buffer("istft_real", (torch.cos(angle) / n * window[:, None]).float()[..., None], persistent=False)
        self.register_buffer("istft_imag", (torch.sin(angle) / n * window[:, None]).float()[..., None], persistent=False)

    def spectrogram(self, waveform):
        x = F.pad(waveform.float()[:, None], (self.config.n_fft // 2,) * 2, mode="reflect")  # (N, 1, L + n_fft)
        real = F.conv1d(x, self.stft_real, stride=self.config.hop_length)  # (N, F, T)
        imag = F.conv1d(x, self.stft_imag, stride=self.config.hop_length)
        return real.transpose(1, 2), imag.transpose(1, 2)

    def waveform(self, real, imag, length):
        n, hop = self.config.n_fft, self.config.hop_length
        real, imag = real.transpose(1, 2), imag.transpose(1, 2)  # (N, F, T)
        full_real = torch.cat([real, real[:, 1:-1].flip(1)], dim=1)  # (N, n_fft, T), Hermitian spectrum
        full_imag = torch.cat([imag, -imag[:, 1:-1].flip(1)], dim=1)
        frames = F.conv1d(full_real, self.istft_real) - F.conv1d(full_imag, self.istft_imag)  # (N, n_fft, T)
        T = frames.shape[-1]
        size = (1, (T - 1) * hop + n)
        signal = F.fold(frames, size, (1, n), stride=(1, hop)).flatten(1)  # (N, samples)
        envelope = F.fold(self.window.square()[None, :, None].expand(1, n, T), size, (1, n), stride=(1, hop)).flatten(1)
        return (signal / envelope.clamp(min=1e-11))[:, n // 2:n // 2 + length]


def time_train_step(model: nn.Module, inputs: tuple, dtype: torch.dtype, steps: int, device: torch.device) -> tuple:
    """Median forward+backward wall ms over `steps` after one warm-up (the median resists a busy machine), median
    process CPU ms (on a machine shared with other jobs, with one torch thread, the compute time of one core) and
    peak memory in MiB (CUDA only)."""
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            output = model(*inputs)
        output.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
        cpu_times.append((time.process_time() - cpu_start) * 1000)
    memory = f"{torch.cuda.max_memory_allocated() / 2 ** 20:8.0f} MiB" if device.type == "cuda" else "     n/a"
    return sorted(times)[len(times) // 2], sorted(cpu_times)[len(cpu_times) // 2], memory


class SpectrogramRoundTrip(nn.Module):
    """STFT of the mixture and ISTFT of three slots, as in one separator step, without the UNet."""

    def __init__(self, separator: Separator):
        super().__init__()
        self.separator = separator
        self.gain = nn.Parameter(torch.ones(()))  # stands in for the masks: gradients flow back through the ISTFT

    def forward(self, mixture: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        B, C, L = mixture.shape
        with torch.autocast(mixture.device.type, enabled=False):  # as in Separator.separate
            real, imag = self.separator.spectrogram(mixture.reshape(B * C, L))  # (B*C, T, F)
            real = real.view(B, 1, C, *real.shape[1:]).expand(B, NUM_SLOTS, -1, -1, -1).mean(2).flatten(0, 1)  # (B*3, T, F)
            imag = imag.view(B, 1, C, *imag.shape[1:]).expand(B, NUM_SLOTS, -1, -1, -1).mean(2).flatten(0, 1)
            return self.separator.waveform(real * self.gain, imag * self.gain, L).view(B, NUM_SLOTS, L)


@dataclass
class BenchConfig:
    device: str = "auto"  # 'cpu', 'cuda' or 'auto' (cuda when available)
    batch_size: int = 4  # mixtures per step; >= 2, the heads' BatchNorm trains on batch statistics
    seconds: float = 10.0  # s, input length
    steps: int = 5  # timed steps per measurement
    finetuning: str = "head"  # tagger trainable part during the benchmark
    base_channels: int = 32  # separator width


def main():
    parser = StrictParser(description=__doc__)
    parser.add_argument("--bench", action="store_true", help="time forward+backward of the models")
    add_config_flags(parser, BenchConfig)
    arguments = parser.parse_args()
    if not arguments.bench:
        parser.print_help()
        return
    config = config_from_args(arguments, BenchConfig)
    if config.batch_size < 2:
        parser.error("--batch_size must be at least 2 (train-mode BatchNorm needs more than one item)")
    if config.steps < 1 or config.seconds <= 0:
        parser.error(f"--steps {config.steps} --seconds {config.seconds}: expected a positive number of each")
    if config.device == "auto":
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(config.device)
    torch.manual_seed(0)
    mixture = torch.randn(config.batch_size, 4, int(config.seconds * SAMPLE_RATE), device=device) * 0.1
    queries = torch.zeros(config.batch_size, NUM_SLOTS, NUM_CLASSES, device=device)
    queries[:, 0, 0] = queries[:, 1, 5] = 1.0
    separator_config = SeparatorConfig(base_channels=config.base_channels)
    models = {
        "tagger 1c": (build_tagger(TaggerConfig(finetuning=config.finetuning)), (mixture,)),
        "tagger 4c": (build_tagger(TaggerConfig(num_channels=4, finetuning=config.finetuning)), (mixture,)),
        "separator (torch.stft)": (build_separator(separator_config), (mixture, queries)),
        "separator (conv STFT, official)": (ConvSTFTSeparator(separator_config), (mixture, queries)),
        "STFT+ISTFT only (torch.stft)": (SpectrogramRoundTrip(Separator(SeparatorConfig(base_channels=1))), (mixture, queries)),
        "STFT+ISTFT only (conv, official)": (SpectrogramRoundTrip(ConvSTFTSeparator(SeparatorConfig(base_channels=1))),
                                             (mixture, queries)),
    }
    print(f"device {device}, batch {config.batch_size} x {config.seconds} s, tagger finetuning '{config.finetuning}', "
          f"separator width {config.base_channels}")
    if device.type == "cpu":
        print(f"cpu: {cpu_summary()}")
    for name, (model, inputs) in models.items():
        model.to(device)
        for dtype in (torch.float32, torch.bfloat16):
            ms, cpu_ms, memory = time_train_step(model, inputs, dtype, config.steps, device)
            print(f"{name:32s} {str(dtype).replace('torch.', ''):9s} fwd+bwd {ms:9.1f} ms   process CPU {cpu_ms:9.1f} ms"
                  f"   peak {memory}")
        model.cpu()


if __name__ == "__main__":
    main()
