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
- a dict field with metadata={"flags": f} becomes one flag per entry of f() ({name: Option}, as
  objectives.option_flags gives them), unset by default; the flags that are set fill the dict;
- a class that extends other config dataclasses gets their fields, and so their flags, declared
  once where the library declares them (sub_config builds the library's config back from it);
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


def comments(cls) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """({field: the comment after it}, {field: its '# --- group' heading}, the headings in the
    order --help shows them: cls's own first, then those of the dataclasses it extends)."""
    helps, groups, order = {}, {}, []
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        group, own = klass.__name__, []
        try:
            source = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # defined where no source file exists (an interactive session)
            source = []
        for line in source:
            heading = re.match(r"\s*# ---\s*(.+)", line)
            if heading:
                group = heading.group(1).strip()
                own.append(group)
                continue
            m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.+)", line)
            if m:
                helps[m.group(1)], groups[m.group(1)] = m.group(2).strip(), group
        order = own + [g for g in order if g not in own]
    return helps, groups, order


def sub_config(cls, cfg, **given):
    """A `cls` (a library config that cfg's class extends) from cfg's values of its fields, with
    `given` in place of some: the script's settings handed to the library."""
    return cls(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)}, **given})


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
    helps, groups, order = comments(cls)
    arg_groups = {g: p.add_argument_group(g) for g in order}
    p.generated = {}  # dict field -> the names of the flags that fill it
    names = {f.name for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        g = groups.get(f.name, "options")
        g = arg_groups.setdefault(g, p.add_argument_group(g))
        if "flags" in f.metadata:
            p.generated[f.name] = _add_generated(g, f, names)
            continue
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


def _add_generated(group, f, names) -> list[str]:
    """The flags of dict field f (metadata "flags": a callable giving {name: Option}), each unset
    (None) by default. Returns their names."""
    specs = f.metadata["flags"]()
    for name, spec in specs.items():
        if name in names:
            raise ValueError(f"the option {name!r} of --{f.name} has the name of a setting (--{name}): rename the option")
        kw = dict(default=None, help=spec.help.replace("%", "%%") + " (default: the objective's own)")
        if spec.kind is bool:
            group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(f"--{name}", type=spec.kind, choices=spec.choices, **kw)
    return list(specs)


def parse_config(cls, argv=None, description: str = "", presets: dict | None = None, exclude=(),
                 preload: dict | None = None, **fixed):
    """The config of a command line: cls(**flags, **fixed). A bad value exits with the usage line
    and a message naming the flag (exit code 2); --help lists every flag with its default.
    preload: {field: load(value)} for flags read before the parser is built (a file that adds
    choices or flags, like --objectives); a ValueError from load is that flag's error."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # the flags read before the parser exists
    pre.add_argument("--preset", default=next(iter(presets)) if presets else None)
    for name in preload or {}:
        pre.add_argument(f"--{name}", default="")
    early = vars(pre.parse_known_args(argv)[0])
    for name, load in (preload or {}).items():
        try:
            if early[name]:
                load(early[name])
        except ValueError as e:
            build_parser(cls, description).error(f"--{name} {e}")
    preset = early["preset"] if presets and early["preset"] in presets else next(iter(presets or {}), None)
    p = build_parser(cls, description, presets, preset, tuple(exclude) + tuple(fixed))
    args = vars(p.parse_args(argv))
    args.pop("preset", None)
    for field, flags in p.generated.items():
        values = {name: args.pop(name) for name in flags}
        args[field] = {name: value for name, value in values.items() if value is not None}
    try:
        return cls(**args, **fixed)
    except ConfigError as e:
        p.error(f"--{e.field} {e.message}")
    except ValueError as e:
        p.error(str(e))
