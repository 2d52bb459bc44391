"""Command-line flags generated from the dataclass configs, shared by every script.

One flag per field: `--{prefix}{name}`, typed from the field's default, with the field's trailing `# comment`
(or `metadata["help"]`) and its default as the --help text. So `--help` always lists every knob and a new field
is a new flag without touching the parser. StrictParser makes every script treat flags alike: whole flag names
only, and a mistyped flag is answered with one line naming it and the closest valid flags.
"""
import argparse
import dataclasses
import difflib
import inspect
import re

SUGGESTIONS = 3  # closest valid flags named for a mistyped one


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
            option.update(metavar=field.metadata.get("metavar", field.name.upper()),
                          choices=field.metadata.get("choices"))
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


def unknown_flags_message(unknown: list[str], parser: argparse.ArgumentParser,
                          arguments: argparse.Namespace | None = None) -> str:
    """One line for the arguments argparse could not place: each unknown flag with the valid flags that start
    with it or look like it (or words saying there are none), and stray values that follow no flag.
    `arguments` (the parsed namespace) selects the chosen sub-command, whose flags are then the valid ones."""
    valid = valid_flags(parser, arguments)
    parts = []
    for position, argument in enumerate(unknown):
        if argument.startswith("-"):
            name = argument.split("=", 1)[0]
            # --help and the --no-* forms of boolean flags are valid, but never what a typo meant
            candidates = [flag for flag in valid if flag != "--help" and (name.startswith("--no-")
                                                                           or not flag.startswith("--no-"))]
            # an abbreviation names the flags it starts; otherwise the most similar names are the likely meaning
            close = [flag for flag in candidates if flag.startswith(name)][:SUGGESTIONS]
            close = close or difflib.get_close_matches(name, candidates, SUGGESTIONS)
            parts.append(f"{name} (did you mean {' or '.join(close)}?)" if close else
                         f"{name} (no valid flag is close to it; --help lists them all)")
        elif position == 0 or not unknown[position - 1].startswith("-") or "=" in unknown[position - 1]:
            parts.append(f"{argument!r} (a value without a flag)")  # after an unknown flag it is its value
    return f"unknown argument{'s' if len(parts) > 1 else ''}: {', '.join(parts)}"


def valid_flags(parser: argparse.ArgumentParser, arguments: argparse.Namespace | None = None) -> list[str]:
    """Every long flag of the parser, and of the sub-command named in `arguments`."""
    flags = []
    for action in parser._actions:
        flags += [option for option in action.option_strings if option.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(arguments, action.dest, None))
            flags += valid_flags(chosen, arguments) if chosen is not None else []
    return flags


class StrictParser(argparse.ArgumentParser):
    """ArgumentParser for every script: no abbreviated flags (so `--sep` never silently means `--separator`),
    unknown flags answered by unknown_flags_message, and every error as one line without the usage block.
    Sub-command parsers made with add_subparsers() are StrictParsers too."""

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
