"""What every script shares on the command line: flags generated from dataclass configs, a parser that accepts
whole flag names only and answers a typo with the closest valid flags, the device choice and the CPU
heap setting, and atomic file writes.

One flag per dataclass field, `--{prefix}{name}`, typed from the field's default, with the field's trailing
`# comment` (or metadata["help"]) as its help text: a new field is a new flag without touching a parser.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import difflib
import inspect
import os
import platform
import re
import sys
from pathlib import Path

import torch

SUGGESTIONS = 3  # closest valid flags named for a mistyped one


def field_comments(cls) -> dict[str, str]:
    """The trailing '# comment' of every field in a dataclass's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.*)$", source, flags=re.MULTILINE))


def add_config_flags(parser, cls, prefix: str = "", dest_prefix: str | None = None, layered: bool = False,
                     shown: dict | None = None) -> None:
    """One flag per field of dataclass `cls`, its value in `dest_prefix + name`. layered=True leaves unset flags out, so
    a caller can stack defaults < preset < file < flags; `shown` replaces the defaults --help prints."""
    dest_prefix = prefix if dest_prefix is None else dest_prefix
    comments, defaults = field_comments(cls), cls()
    for field in dataclasses.fields(cls):
        default = getattr(defaults, field.name)
        help_text = (field.metadata.get("help") or comments.get(field.name, "")).replace("%", "%%")
        option = dict(dest=dest_prefix + field.name, default=argparse.SUPPRESS if layered else default,
                      help=f"{help_text} (default {(shown or {}).get(field.name, repr(default))})")
        if isinstance(default, bool):
            option["action"] = argparse.BooleanOptionalAction
            if not layered and not shown:  # BooleanOptionalAction appends the default itself
                option["help"] = help_text
        else:
            option.update(metavar=field.metadata.get("metavar", field.name.upper()),
                          choices=field.metadata.get("choices"))
            if isinstance(default, (tuple, list)):
                option.update(nargs=len(default) if isinstance(default, tuple) else "+",
                              type=type(default[0]) if default else str)
            else:
                option["type"] = type(default) if default is not None else str
        parser.add_argument(f"--{prefix}{field.name}", **option)


def format_flag(name: str, value) -> str:
    """A value as the flag that sets it: --lr 0.001, --no-tf32, --scene.snr_range 5.0 20.0."""
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no-{name}"
    if isinstance(value, (tuple, list)):
        return f"--{name} {' '.join(str(item) for item in value)}"
    return f"--{name} {value if value != '' else repr(value)}"


def config_from_args(arguments: argparse.Namespace, cls):
    """The dataclass `cls` built from the parsed flags that add_config_flags made for it."""
    values = vars(arguments)
    return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name in values})


def valid_flags(parser: argparse.ArgumentParser, arguments: argparse.Namespace | None = None) -> list[str]:
    """Every long flag of the parser, and of the sub-command named in `arguments`."""
    flags = []
    for action in parser._actions:
        flags += [option for option in action.option_strings if option.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(arguments, action.dest, None))
            flags += valid_flags(chosen, arguments) if chosen is not None else []
    return flags


def unknown_flags_message(unknown: list[str], parser, arguments=None) -> str:
    """One line naming each unknown flag with the valid flags it starts or resembles, and stray values."""
    valid = valid_flags(parser, arguments)
    parts = []
    for position, argument in enumerate(unknown):
        if argument.startswith("-"):
            name = argument.split("=", 1)[0]
            # --help and the --no-* forms of boolean flags are valid, but never what a typo meant
            candidates = [flag for flag in valid if flag != "--help" and (name.startswith("--no-")
                                                                           or not flag.startswith("--no-"))]
            close = [flag for flag in candidates if flag.startswith(name)][:SUGGESTIONS]
            close = close or difflib.get_close_matches(name, candidates, SUGGESTIONS)
            parts.append(f"{name} (did you mean {' or '.join(close)}?)" if close else
                         f"{name} (no valid flag is close to it; --help lists them all)")
        elif position == 0 or not unknown[position - 1].startswith("-") or "=" in unknown[position - 1]:
            parts.append(f"{argument!r} (a value without a flag)")  # after an unknown flag it is its value
    return f"unknown argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"


class StrictParser(argparse.ArgumentParser):
    """No abbreviated flags (`--sep` never silently means `--separator`), unknown_flags_message, one-line errors."""

    def __init__(self, **options):
        options.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**options, allow_abbrev=False)

    def parse_args(self, args=None, namespace=None):
        arguments, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_flags_message(unknown, self, arguments))
        return arguments

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; a ValueError when it is not usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu or cuda") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA devices (check the driver "
                         "and the torch wheel's CUDA version), or use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu or cuda")
    return device


def cpu_has_native_bf16() -> bool | None:
    """Whether torch computes bf16 in hardware here (AVX512-BF16 or AMX, AVX512 kernels); None when not x86."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    hardware = any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return hardware and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def keep_freed_memory(device: torch.device) -> None:
    """On the CPU, keep freed memory mapped (glibc): each step frees its activations, and by default faulting them
    back in costs about 20 % of a demo training step (BENCHMARKS.md)."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if device.type == "cpu" and mallopt is not None:
        mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: arrays up to 1 GiB come from the heap ...
        mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: ... and up to 2 GiB of free heap stays mapped


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name next to `path` for the block to write, renamed to `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
