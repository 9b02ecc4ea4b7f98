"""
Command lines generated from config dataclasses, so that every setting is declared once: its name,
type, default and the comment that explains it.

    @dataclass
    class TrainConfig:
        # --- run                                               <- a group of flags in --help
        seed: int = 1337           # seeds data order, init     <- the help of --seed
        ...

    cfg = parse_config(TrainConfig, argv, description=__doc__, presets=PRESETS)

- every field becomes the flag --<field>; its help is the comment after the field;
- the default shown in --help is the field's (or the chosen --preset's), so nothing can disagree;
- bool fields are switches (--flag, --no-flag); `x | None = None` leaves the choice to the library;
- `tuple[float, ...]` fields read a comma-separated list (--gammas 0,0.5,1); any other callable
  annotation is the reader of its flag;
- field(metadata={"choices": ...}) gives argparse choices (a callable is asked at parse time);
- the config checks itself in __post_init__ and raises ConfigError(field, message); the command
  line turns it into the usage line and `--<field> <message>`, exit code 2.
"""

import argparse
import dataclasses
import inspect
import re
import types
import typing


class ConfigError(ValueError):
    """A bad setting: `field` names it (a command line turns it into --<field>), `message` says why."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field} {message}")
        self.field, self.message = field, message


def comments(cls) -> tuple[dict[str, str], dict[str, str]]:
    """({field: the comment after it}, {field: its '# --- group' heading}) from the source of cls
    and of the dataclasses it extends."""
    helps, groups = {}, {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        group = klass.__name__
        try:
            source = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # defined where no source file exists (an interactive session)
            source = []
        for line in source:
            heading = re.match(r"\s*# ---\s*(.+)", line)
            if heading:
                group = heading.group(1).strip()
                continue
            m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.+)", line)
            if m:
                helps[m.group(1)], groups[m.group(1)] = m.group(2).strip(), group
    return helps, groups


def _base_type(annotation):
    """int for `int`, `int | None` and `Optional[int]`; for `tuple[float, ...]` a reader of a
    comma-separated list, "0,0.5" -> (0.0, 0.5)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        kind = typing.get_args(annotation)[0]
        read = lambda text: tuple(kind(x) for x in text.split(",") if x)
        read.__name__ = f"comma-separated {kind.__name__}"  # argparse's message: invalid <__name__> value
        return read
    return annotation


def build_parser(cls, description: str = "", presets: dict | None = None, preset: str | None = None,
                 exclude=()) -> argparse.ArgumentParser:
    """An ArgumentParser with one flag per field of dataclass `cls` (except `exclude`), its defaults
    taken from cls with presets[preset] applied."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--flag value ...]   (--help lists every flag and its default)",
                                allow_abbrev=False)
    defaults = {**{f.name: f.default for f in dataclasses.fields(cls)}, **((presets or {}).get(preset) or {})}
    if presets:
        p.add_argument("--preset", default=preset, choices=sorted(presets),
                       help=f"bundle of defaults: {', '.join(sorted(presets))} (default: %(default)s)")
    helps, groups = comments(cls)
    arg_groups = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        g = groups.get(f.name, "options")
        g = arg_groups.setdefault(g, p.add_argument_group(g))
        kind, choices = _base_type(f.type), f.metadata.get("choices")
        text = f.metadata.get("help") or helps.get(f.name, "")
        kw = dict(default=defaults[f.name], help=text.replace("%", "%%") + " (default: %(default)s)")
        if kind is bool:
            g.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            if choices is not None:
                kw["choices"] = choices() if callable(choices) else choices
            g.add_argument(f"--{f.name}", type=kind, **kw)
    return p


def parse_config(cls, argv=None, description: str = "", presets: dict | None = None, exclude=(), **fixed):
    """The config of a command line: cls(**flags, **fixed). A bad value exits with the usage line
    and a message naming the flag (exit code 2); --help lists every flag with its default."""
    preset = None
    if presets:
        pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        pre.add_argument("--preset", default=next(iter(presets)))
        preset = pre.parse_known_args(argv)[0].preset
        if preset not in presets:
            preset = next(iter(presets))  # the full parser rejects the bad name with its choices
    p = build_parser(cls, description, presets, preset, tuple(exclude) + tuple(fixed))
    args = vars(p.parse_args(argv))
    args.pop("preset", None)
    try:
        return cls(**args, **fixed)
    except ConfigError as e:
        p.error(f"--{e.field} {e.message}")
    except ValueError as e:
        p.error(str(e))
