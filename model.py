"""Models of the DCASE 2026 Task 4 baseline in plain PyTorch: the M2D ViT audio tagger (1- and 4-channel, and the
2025 multi-label variant), the ResUNet30 separator with K label-query slots (ResUNetK; K = 1 is the 2025 ResUNet),
the S5 system that chains them, and the one reader of checkpoints (official Lightning files and our own).

Module and parameter names follow the official checkpoints (timm names for the ViT, '->' FiLM names for the
separator), so official weights load strictly through the small remap table next to `read_checkpoint`.

    python bench.py --only models        # forward + backward speed of these models
"""
import dataclasses
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

from devset import LABELS, NUM_SLOTS, SILENCE, label_vector

NUM_CLASSES = len(LABELS)  # 18 target classes: the separator's query size
TAGGER_CLASSES = NUM_CLASSES + 1  # the 2026 tagger adds 'silence' as class 18
LOG_EPS = float(torch.finfo(torch.float32).eps)  # added to the mel power before the log, as the official
MAG_EPS = 1e-10  # floor on the separator's STFT power (so magnitudes are >= 1e-5)
# Tagger heads -> what their outputs mean: 'slots' (2026: 3 slots x 19-way softmax, class 18 = silence, PIT
# cross-entropy) or 'multilabel' (2025: 18 sigmoids, multi-hot targets, binary cross-entropy). A new head is added
# here, and everything that depends on it (targets, loss, decoding) follows TaggerConfig.multilabel.
HEADS = {"avg_linear": "slots", "linear": "multilabel"}
FRONT_ENDS = {  # log-mel front ends by the sample-rate tag of the M2D folder name (as the official portable_m2d.py)
    "16k": dict(sample_rate=16000, n_fft=400, hop_length=160, n_mels=80, f_min=50.0, f_max=8000.0),
    "32k": dict(sample_rate=32000, n_fft=800, hop_length=320, n_mels=80, f_min=50.0, f_max=16000.0),
}


@dataclass
class TaggerConfig:
    num_channels: int = 1  # microphones read: 1 (the reference channel) or 4 (one shared backbone)
    ref_channel: int = 0  # channel index used by the 1-channel tagger
    head: str = "avg_linear"  # a key of HEADS: 'avg_linear' (2026: 3 slots x 19 classes), 'linear' (2025: 18 sigmoids)
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
        for broken, message in ((self.head not in HEADS, f"head={self.head!r}: expected one of {', '.join(HEADS)}"),
                                (self.num_channels < 1 or (self.head == "linear" and self.num_channels != 1),
                                 f"num_channels={self.num_channels}: expected 1 or 4 (only 1 for head 'linear')"),
                                (not 0 <= self.ref_channel < 4, f"ref_channel={self.ref_channel}: expected 0-3 (the 4 "
                                                                "microphones of the dev set's mixtures)"),
                                (self.sample_rate_tag not in FRONT_ENDS, f"sample_rate_tag={self.sample_rate_tag!r}: "
                                                                         f"expected one of {list(FRONT_ENDS)}"),
                                (bool(self.embed_dim % self.num_heads or self.input_size[0] % self.patch_size[0]),
                                 f"embed_dim {self.embed_dim} must divide by num_heads {self.num_heads} and mel bins "
                                 f"{self.input_size[0]} by patch height {self.patch_size[0]}")):
            if broken:
                raise ValueError(f"TaggerConfig.{message}")
        first_trainable_layer(self.finetuning, self.depth)  # validates the mode

    @property
    def multilabel(self) -> bool:
        """True for the 2025 head (sigmoids, multi-hot targets), False for the 2026 slot head (see HEADS)."""
        return HEADS[self.head] == "multilabel"


@dataclass
class SeparatorConfig:
    num_slots: int = NUM_SLOTS  # query slots K separated in one pass: 3 (ResUNetK) or 1 (2025 ResUNet)
    base_channels: int = 32  # UNet width: channels of the first block (official 32; 8 or 16 for a CPU demo)
    input_channels: int = 4  # microphones of the mixture
    n_fft: int = 1024  # STFT size = window length, samples
    hop_length: int = 160  # STFT hop, samples
    condition_dim: int = 512  # label embedding width
    iterations: int = 1  # passes, each also fed the previous estimate (CPJKU, DCASE 2025); 1 = the official network

    def __post_init__(self):
        if min(self.num_slots, self.base_channels, self.iterations) < 1:
            raise ValueError(f"SeparatorConfig: num_slots {self.num_slots}, base_channels {self.base_channels} and "
                             f"iterations {self.iterations} must be positive")


# ---- Tagger: log-mel front end, M2D ViT backbone, heads ----------------------------------------------------------
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
        input_size, patch_size = (tuple(int(v) for v in piece.split("x")) for piece in pieces[:2])
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
        self.patch_embed = nn.ModuleDict({"proj": nn.Conv2d(1, dim, config.patch_size, stride=config.patch_size)})
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
        x = self.patch_embed["proj"](x)  # (B, D, f, t)
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
        if not config.multilabel:
            self.head = HeadAvgLinear(feature_dim * config.num_channels, NUM_SLOTS, TAGGER_CLASSES,
                                      config.track_input_dim, config.track_hidden_dim)
        else:
            self.head = nn.Linear(feature_dim, NUM_CLASSES)
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)
        self.set_finetuning(config.finetuning)
        self.label_offsets = None  # [19] added to the logits before decoding (evaluate.py --thresholds), or None

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
        if self.config.multilabel:
            return self.head(self.head_norm(features.mean(1)))  # (B, 18)
        return self.head(features)  # (B, 3, 19)

    @torch.no_grad()
    def predict(self, waveform: torch.Tensor, threshold: float = 0.5) -> tuple[list[list[str]], torch.Tensor]:
        """waveform [B, C, L] -> (3 labels per item, probabilities [B, 3]), by labels_from_logits."""
        return self.labels_from_logits(self(waveform).float(), threshold)

    @torch.no_grad()
    def labels_from_logits(self, logits: torch.Tensor, threshold: float = 0.5) -> tuple[list[list[str]], torch.Tensor]:
        """logits -> (3 labels per item, probabilities [B, 3]). 2026: each slot's softmax arg-max (18 = silence); 2025:
        the classes with sigmoid >= threshold (1 to 3, most probable first) in class order, padded with silence."""
        logits = logits.float()
        if self.label_offsets is not None:  # per class (and silence): a tuned threshold
            logits = logits + self.label_offsets.to(logits.device)[:logits.shape[-1]]
        names = LABELS + (SILENCE,)
        if not self.config.multilabel:
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
    load_weights(tagger.backbone, {k: v for k, v in state.items() if k in names}, weight_file)
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


# ---- Separator: ResUNet30 with K query slots ---------------------------------------------------------------------
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
        if config.iterations > 1:  # the previous estimates as K more input channels, starting at zero weight
            self.feedback_conv = nn.Conv2d(config.num_slots, c, 1, bias=False)
            nn.init.zeros_(self.feedback_conv.weight)
        for i in range(6):
            setattr(self, f"encoder_block{i + 1}", EncoderBlock(widths[i], widths[i + 1], pools[i], f"encoder_block{i + 1}"))
        self.conv_block7a = EncoderBlock(widths[6], widths[6], (1, 1), "conv_block7a")
        for i in range(6):
            setattr(self, f"decoder_block{i + 1}",
                    DecoderBlock(widths[min(6, 7 - i)], widths[6 - i], pools[5 - i], f"decoder_block{i + 1}"))
        self.after_conv = nn.Conv2d(c, config.input_channels * 3 * config.num_slots, 1)
        self.out_conv = nn.Conv2d(config.input_channels, 1, 1)
        self.time_multiple = 2 ** sum(p[0] == 2 for p in pools)  # 32

    def forward(self, magnitude: torch.Tensor, betas: dict, feedback: torch.Tensor | None = None) -> torch.Tensor:
        """magnitude [B, C, T, F], feedback (iterations > 1: log1p magnitudes of the previous estimates, zero in the
        first pass) [B, K, T, F] -> mask logits [B, C*3*K, T, F]."""
        frames, padding = magnitude.shape[2], (0, 0, 0, (-magnitude.shape[2]) % self.time_multiple)
        x = self.bn0(magnitude.transpose(1, 3)).transpose(1, 3)  # (B, C, T, F), statistics per frequency bin
        x = F.pad(x, padding)[..., :-1]  # (B, C, T', F-1): drop Nyquist
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC convolutions are faster on GPUs
        x = self.pre_conv(x)
        if feedback is not None:
            x = x + self.feedback_conv(F.pad(feedback, padding)[..., :-1])  # (B, c, T', F-1)
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

    def separate(self, mixture: torch.Tensor, label_vector: torch.Tensor, previous: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """mixture [B, C, L], label_vector [B, K*18], previous (iterations > 1: the last pass's waveforms, None in
        the first) [B, K, L] -> waveforms [B, K, L] (before the silence mask)."""
        B, C, L = mixture.shape
        K = self.config.num_slots
        with torch.autocast(mixture.device.type, enabled=False):
            real, imag = self.spectrogram(mixture.reshape(B * C, L))  # (B*C, T, F)
            real, imag = real.view(B, C, *real.shape[1:]), imag.view(B, C, *imag.shape[1:])  # (B, C, T, F)
            magnitude = (real.square() + imag.square()).clamp(min=MAG_EPS).sqrt()
            cos, sin = real / magnitude, imag / magnitude
            feedback = None
            if hasattr(self.base, "feedback_conv"):  # log1p(0) = 0 in the first pass: the feedback conv adds exactly 0
                feedback = torch.zeros(B, K, *magnitude.shape[2:], device=mixture.device)  # (B, K, T, F)
                if previous is not None:
                    real, imag = self.spectrogram(previous.reshape(B * K, L))
                    feedback = torch.log1p(torch.sqrt(real.square() + imag.square())).view(B, K, *real.shape[1:])
        condition = self.label_embedding(label_vector)  # (B, 512)
        betas = {name: layer(condition)[:, :, None, None] for name, layer in self.film.items()}  # (B, C_i, 1, 1)
        logits = self.base(magnitude, betas, feedback)  # (B, C*3*K, T, F)
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

    def forward(self, mixture: torch.Tensor, queries: torch.Tensor, passes: int = 0) -> torch.Tensor:
        """mixture [B, 4, L], one-hot queries [B, Q, 18] (all-zero row = silent slot) -> waveforms [B, Q, L], silent
        slots exactly 0. K = 3 models need Q == 3; K = 1 models separate the Q queries as a batch. passes (0 = the
        configured iterations): only the last one is differentiated; it is fed the earlier one's estimate."""
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
        label_vector, waveforms = queries.reshape(-1, K * NUM_CLASSES).float(), None
        passes = passes or self.config.iterations
        if passes > 1 and not hasattr(self.base, "feedback_conv"):
            raise ValueError(f"{passes} separator passes need a separator built with iterations > 1 (a feedback input)")
        for done in range(1, passes + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and done == passes):
                waveforms = self.separate(mixture, label_vector, waveforms)  # (B*Q/K, K, L)
        return waveforms.reshape(B, Q, -1) * active.unsqueeze(-1)  # (B, Q, L)


def count_parameters(*modules: nn.Module) -> int:
    """Parameters as the official evaluate.py counts them: with the frozen conv STFT kernels torch.stft replaces."""
    stft_sizes = [m.config.n_fft for module in modules for m in module.modules() if isinstance(m, Separator)]
    return (sum(p.numel() for module in modules for p in module.parameters())
            + sum(2 * (n_fft // 2 + 1) * n_fft + 2 * n_fft * n_fft for n_fft in stft_sizes))


# ---- S5 system ---------------------------------------------------------------------------------------------------
def silence_last(labels, *per_slot):
    """The slots of each item reordered (stable) so that silent ones come last: labels and [B, 3, ...] tensors."""
    orders = [sorted(range(NUM_SLOTS), key=lambda i: row[i] == SILENCE) for row in labels]
    return ([[row[i] for i in order] for row, order in zip(labels, orders)],
            *(torch.stack([item[order] for item, order in zip(tensor, orders)]) for tensor in per_slot))


class S5(nn.Module):
    """Tag the mixture, move silent slots to the end (stable), separate the named sources. second_look: the tagger
    also hears each separated source alone (KAIST, DCASE 2025), and a source it hears as silence is dropped;
    relabel_confidence > 0: a source it hears as another class with at least that probability takes that label, and
    its mixture is separated again."""

    def __init__(self, tagger: Tagger, separator: Separator, second_look: bool = False,
                 relabel_confidence: float = 0.0):
        super().__init__()
        self.tagger, self.separator = tagger, separator
        self.second_look, self.relabel_confidence = second_look, relabel_confidence

    def separate(self, mixture: torch.Tensor, labels: list) -> torch.Tensor:
        """mixture [B, 4, L], 3 labels per item -> waveforms [B, 3, L], silent slots exactly 0."""
        return self.separator(mixture, torch.stack([label_vector(row) for row in labels]).to(mixture.device))

    @torch.no_grad()
    def forward(self, mixture: torch.Tensor) -> dict:
        """mixture [B, 4, L] -> {'label': 3 names per item, 'probabilities' [B, 3], 'waveform' [B, 3, L]}."""
        labels, probabilities = silence_last(*self.tagger.predict(mixture))
        waveform = self.separate(mixture, labels)
        named = [(b, s) for b, row in enumerate(labels) for s, label in enumerate(row) if label != SILENCE]
        if self.second_look and named:  # each estimate as every microphone's signal, all in one batch
            estimates = torch.stack([waveform[b, s] for b, s in named])[:, None]
            heard, heard_probabilities = self.tagger.predict(estimates.expand(-1, self.tagger.config.num_channels, -1))
            relabelled = set()
            for (b, s), row, row_probabilities in zip(named, heard, heard_probabilities.tolist()):
                if all(label == SILENCE for label in row):
                    labels[b][s], waveform[b, s] = SILENCE, 0.0
                elif self.relabel_confidence > 0 and labels[b][s] not in row:
                    probability, label = max((p, name) for p, name in zip(row_probabilities, row) if name != SILENCE)
                    if probability >= self.relabel_confidence:
                        labels[b][s], probabilities[b, s] = label, probability
                        relabelled.add(b)
            if relabelled:
                again = sorted(relabelled)
                waveform[again] = self.separate(mixture[again], [labels[b] for b in again])
            labels, probabilities, waveform = silence_last(labels, probabilities, waveform)
        return {"label": labels, "probabilities": probabilities, "waveform": waveform}


# ---- Checkpoints: official Lightning files and our own (evaluation, --init_from, --resume) -----------------------
# The whole remap from the official Lightning checkpoints: key prefixes renamed (first match wins), and the keys this
# implementation computes instead of storing (nnAudio / torchlibrosa buffers, frozen STFT kernels), each True where
# the official module holds it as a parameter: it then has a place in the official optimizer's list, never any state.
# Any other key is an error.
OFFICIAL_PREFIXES = {
    "tagger": (("model.m2d.", ""), ("model.", "")),  # 4-channel taggers nest the backbone in 'm2d'
    "separator": (("model.", ""),),
}
OFFICIAL_DROPPED = {
    "tagger": dict.fromkeys(("to_spec.mel_basis", "to_spec.stft.wsin", "to_spec.stft.wcos", "to_spec.stft.window_mask"),
                            False),
    "separator": dict.fromkeys(("base.stft.conv_real.weight", "base.stft.conv_imag.weight", "base.istft.conv_real.weight",
                                "base.istft.conv_imag.weight"), True) | {"base.istft.ola_window": False},
}
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm statistics: never in an optimizer
CONFIGS = {"tagger": TaggerConfig, "separator": SeparatorConfig}


@dataclass
class Checkpoint:
    """A checkpoint file with our key names. config: saved, or implied by an official file's shapes; optimizer: over
    `parameter_names` in that order; saved: our checkpoint dict (step, RNG states, ...), None for an official file."""
    config: TaggerConfig | SeparatorConfig
    weights: dict
    optimizer: dict | None = None
    parameter_names: list | None = None
    saved: dict | None = None


def read_checkpoint(path: str, kind: str) -> Checkpoint:
    """Our checkpoint or an official Lightning one of a 'tagger' or 'separator'; a ValueError naming the file."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: checkpoint file not found")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)  # trusted files; Lightning needs pickle
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ImportError) as error:
        raise ValueError(f"{path}: cannot read it as a {kind} checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(raw, dict) and "kind" in raw:
        if raw["kind"] != kind:
            raise ValueError(f"{path}: this is a {raw['kind']} checkpoint, expected a {kind} checkpoint")
        try:
            config = CONFIGS[kind](**raw["model_config"])
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: bad 'model_config' for {CONFIGS[kind].__name__}: {error}") from None
        return Checkpoint(config, raw["model"], raw.get("optimizer"), raw.get("parameter_names"), raw)
    if not (isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict)):
        raise ValueError(f"{path}: neither a nanoS5 checkpoint (with 'kind') nor a Lightning checkpoint (with "
                         "'state_dict')")
    state = raw["state_dict"]
    found = "separator" if any(k.startswith("model.base.") for k in state) else (
        "tagger" if any(".backbone." in k for k in state) else "unknown")
    if found != kind:
        raise ValueError(f"{path}: this Lightning checkpoint holds a {found} model, expected a {kind}")
    names, unknown = [], []
    for key in state:
        prefix = next(((old, new) for old, new in OFFICIAL_PREFIXES[kind] if key.startswith(old)), None)
        name = prefix[1] + key[len(prefix[0]):] if prefix else None
        if name is None or name in names:
            unknown.append(key)
        else:
            names.append(name)
    if unknown:
        raise ValueError(f"{path}: keys not in the official {kind} layout: {', '.join(unknown)}")
    weights = {name: value for name, value in zip(names, state.values()) if name not in OFFICIAL_DROPPED[kind]}
    parameters = [name for name in names if OFFICIAL_DROPPED[kind].get(name, not name.endswith(BUFFER_SUFFIXES))]
    optimizer = (raw.get("optimizer_states") or [None])[0]
    return Checkpoint(official_config(weights, kind, 4 if any(k.startswith("model.m2d.") for k in state) else 1),
                      weights, optimizer, parameters)


def official_config(weights: dict, kind: str, num_channels: int) -> TaggerConfig | SeparatorConfig:
    """The model configuration an official state dict implies: the variant from its keys, sizes from shapes."""
    if kind == "separator":
        out_channels, base_channels = weights["base.after_conv.weight"].shape[:2]
        input_channels = weights["base.pre_conv.weight"].shape[1]
        return SeparatorConfig(num_slots=out_channels // (3 * input_channels), base_channels=base_channels,
                               input_channels=input_channels, condition_dim=weights["label_embedding.0.weight"].shape[0])
    embed_dim = weights["backbone.pos_embed"].shape[-1]  # 64 channels per attention head, as ViT-Base
    config = TaggerConfig(num_channels=num_channels, head="linear" if "head.weight" in weights else "avg_linear",
                          patch_size=tuple(weights["backbone.patch_embed.proj.weight"].shape[-2:]), embed_dim=embed_dim,
                          depth=len({k.split(".")[2] for k in weights if k.startswith("backbone.blocks.")}),
                          num_heads=max(1, embed_dim // 64))
    if not config.multilabel:
        config.track_input_dim = weights["head.linear.0.weight"].shape[0] // NUM_SLOTS
        config.track_hidden_dim = weights["head.tracks.0.0.weight"].shape[0]
    return config


def load_weights(module: nn.Module, weights: dict, source: str, strict: bool = True) -> str:
    """Load a state dict; strict: any missing, unexpected or reshaped tensor is a ValueError naming them, non-strict:
    the matching tensors are loaded -> the line listing the others ('' if none)."""
    own = module.state_dict()
    reshaped = [f"{key} {list(weights[key].shape)} in the checkpoint, {list(own[key].shape)} here"
                for key in weights if key in own and weights[key].shape != own[key].shape]
    # A separator with iterations > 1 starting from one without the feedback input (official): that input starts at 0.
    missing = [key for key in own if key not in weights and not key.endswith("feedback_conv.weight")]
    problems = "; ".join(f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                         for label, keys in (("missing", missing),
                                             ("unexpected", [key for key in weights if key not in own]),
                                             ("other shape", reshaped)) if keys)
    if problems and strict:
        raise ValueError(f"{source}: the weights do not fit this {type(module).__name__}: {problems}")
    module.load_state_dict({key: value for key, value in weights.items()
                            if key in own and value.shape == own[key].shape}, strict=False)
    return problems


def load_tagger(path: str) -> Tagger:
    """A tagger in eval mode from our checkpoint or an official one (the M2D file is not needed: weights follow)."""
    checkpoint = read_checkpoint(path, "tagger")
    tagger = Tagger(dataclasses.replace(checkpoint.config, m2d_weights=""))
    load_weights(tagger, checkpoint.weights, path)
    return tagger.eval()


def load_separator(path: str) -> Separator:
    """A separator in eval mode from our checkpoint or an official one."""
    checkpoint = read_checkpoint(path, "separator")
    separator = Separator(checkpoint.config)
    load_weights(separator, checkpoint.weights, path)
    return separator.eval()
