"""Command-line flags generated from the dataclass configs, shared by every script.

One flag per field: `--{prefix}{name}`, typed from the field's default, with the field's trailing `# comment`
(or `metadata["help"]`) and its default as the --help text. So `--help` always lists every knob and a new field
is a new flag without touching the parser.
"""
import argparse
import dataclasses
import inspect
import re


def field_comments(cls) -> dict[str, str]:
    """The trailing '# comment' of every field in a dataclass's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+)\s*:[^=\n]*=[^#\n]*#\s*(.*)$", source, flags=re.MULTILINE))


def add_config_flags(parser, cls, prefix: str = "", dest_prefix: str | None = None, layered: bool = False) -> None:
    """Add one flag per field of the dataclass `cls` to an argparse parser or argument group.

    The value lands in `dest_prefix + name` (default: the flag prefix). With layered=True an unset flag is left
    out of the namespace (argparse.SUPPRESS), so a caller can stack defaults < preset < file < flags.
    """
    dest_prefix = prefix if dest_prefix is None else dest_prefix
    comments = field_comments(cls)
    defaults = cls()
    for field in dataclasses.fields(cls):
        default = getattr(defaults, field.name)
        help_text = field.metadata.get("help") or comments.get(field.name, "")
        option = dict(dest=dest_prefix + field.name, default=argparse.SUPPRESS if layered else default,
                      help=f"{help_text} (default {default!r})".replace("%", "%%"))
        if isinstance(default, bool):
            option["action"] = argparse.BooleanOptionalAction
            if not layered:  # BooleanOptionalAction appends the default itself
                option["help"] = help_text.replace("%", "%%")
        else:
            option.update(metavar=field.name.upper(), choices=field.metadata.get("choices"))
            if isinstance(default, (tuple, list)):
                option.update(nargs=len(default) if isinstance(default, tuple) else "+",
                              type=type(default[0]) if default else str)
            else:
                option["type"] = type(default) if default is not None else str
        parser.add_argument(f"--{prefix}{field.name}", **option)


def config_from_args(arguments: argparse.Namespace, cls, dest_prefix: str = ""):
    """The dataclass `cls` built from the parsed flags that add_config_flags made for it."""
    values = vars(arguments)
    return cls(**{field.name: values[dest_prefix + field.name] for field in dataclasses.fields(cls)
                  if dest_prefix + field.name in values})
