"""Every `Settings` field as a command-line option, so that a setting is declared once (server/config.py).

A field becomes `--field-name` (underscores as dashes, a trailing `_s` for seconds dropped, as in
`--keep-alive`), or the names its `Flags` marker gives. Its description is the option's help, followed
by its environment twin, named from the field's path (`SD3_CONNECTIONS__KEEP_ALIVE_S`), and its
default; a `Literal` lists its choices in place of the value's name. One declaration, a flag and an
environment variable: the model is TGI's `#[clap(long, env)]` and vLLM's `EngineArgs.add_cli_args`.

pydantic-settings' own CLI (`CliSettingsSource`) drives argparse rather than typer, and names a
nested field `--model.id`: it would break the flags that scripts and the README already use.

A flag left out passes nothing, so the environment's value, or else the default, stands:
flag > environment > default. Click checks only that a number is a number; everything else is
validated by pydantic, for a flag exactly as for its twin, and a failure is one line naming both
the setting and its twin. Secrets have no flag, since a command line is visible to every user of
the machine (`ps`); the help lists their environment variables instead.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from rich.columns import Columns
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.padding import Padding
from rich.panel import Panel
from rich.text import Text
from typer.core import TyperCommand
from typer.models import OptionInfo

from server.config import Flags, Settings, Shortcut

_err = Console(stderr=True)
# `Annotated` of a type known only at run time (a field's), which a type checker cannot follow.
_Annotated: Any = Annotated
# The help panel of the top-level settings; a group's panel is named after the group.
_TOP_PANEL = "Server"
_METAVARS: dict[Any, str] = {bool: "", int: "INTEGER", float: "FLOAT", Decimal: "DECIMAL", Path: "PATH"}


@dataclass(frozen=True)
class SettingOption:
    """One leaf field of `Settings`, seen from the command line."""

    path: tuple[str, ...]  # ("connections", "keep_alive_s")
    field: FieldInfo

    @property
    def key(self) -> str:
        """The parameter's Python name, and `build_settings`' key: the path joined by `__`."""
        return "__".join(self.path)

    @property
    def env(self) -> str:
        config = Settings.model_config
        delimiter = config.get("env_nested_delimiter") or "__"
        return f"{config.get('env_prefix', '')}{delimiter.join(self.path)}".upper()

    @property
    def flags(self) -> tuple[str, ...]:
        for marker in self.field.metadata:
            if isinstance(marker, Flags):
                return marker.names
        name = self.path[-1].removesuffix("_s")  # the help says "seconds"
        return (f"--{name.replace('_', '-')}",)

    @property
    def shortcut(self) -> Shortcut | None:
        return next((m for m in self.field.metadata if isinstance(m, Shortcut)), None)

    @property
    def secret(self) -> bool:
        return SecretStr in _members(self.field.annotation)

    @property
    def panel(self) -> str:
        return self.path[0].capitalize() if len(self.path) > 1 else _TOP_PANEL

    @property
    def description(self) -> str:
        return self.field.description or ""

    @property
    def declarations(self) -> tuple[str, ...]:
        """The flags as click declares them: a switch has its `--no-` twin."""
        first, *rest = self.flags
        if _value_type(self.field.annotation) is bool:
            return (f"{first}/--no-{first.removeprefix('--')}", *rest)
        return self.flags

    @property
    def metavar(self) -> str:
        """What the value looks like: a `Literal`'s choices, or the name of its type."""
        choices = _choices(self.field.annotation)
        if choices:
            return "|".join(choices)
        value = _field_type(self.field.annotation)
        if get_origin(value) is list:
            return "TEXT ..."  # repeated: --cors-origins A --cors-origins B
        return _METAVARS.get(value, "TEXT")

    @property
    def default(self) -> str | None:
        """The default as the help shows it; None where unset means what the description says."""
        default = self.field.get_default(call_default_factory=True)
        if default is None or default == []:
            return None
        if isinstance(default, bool):
            return "on" if default else "off"
        return str(default)

    def option(self, *, hidden: bool = False) -> Any:
        """The typer option (for an `Annotated` parameter) that sets this field."""
        default = "" if self.default is None else f" [default: {self.default}]"
        return typer.Option(
            *self.declarations,
            # The default in the text: typer would show it in parentheses, as a computed one.
            help=escape(f"{self.description} [env var: {self.env}]{default}"),
            metavar=self.metavar or None,
            hidden=hidden,
        )

    def parameter(self) -> inspect.Parameter:
        value = _value_type(self.field.annotation)
        # None: the flag was not given, so the environment or the default decides. Hidden from
        # typer's help table, whose columns are too narrow at 80 columns: SettingsFlags prints it.
        return inspect.Parameter(
            self.key,
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=_Annotated[value | None, self.option(hidden=True)],
        )


def setting_options(model: type[BaseModel] = Settings, path: tuple[str, ...] = ()) -> Iterator[SettingOption]:
    """The leaf fields of `model`, groups walked in declaration order."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_options(annotation, (*path, name))
        else:
            yield SettingOption((*path, name), field)


def setting_option(dotted: str) -> Any:
    """The option of one setting, for a command that takes it by hand: `Annotated[Path | None,
    setting_option("data_dir")]`."""
    (found,) = (option for option in setting_options() if ".".join(option.path) == dotted)
    return found.option()


class SettingsFlags:
    """A typer command's options derived from `Settings`: `@SettingsFlags()` on a function that takes
    `settings: Settings` gives it an option per setting (those under `only`, if given, and not under
    `leave_out`) and calls it with the `Settings` they build."""

    def __init__(self, *, only: Sequence[str] = (), leave_out: Sequence[str] = ()) -> None:
        def chosen(option: SettingOption) -> bool:
            return (not only or _under(option, only)) and not _under(option, leave_out)

        picked = [option for option in setting_options() if chosen(option)]
        self.options = [option for option in picked if not option.secret]
        self.secrets = [option for option in picked if option.secret]

    @property
    def command(self) -> type[TyperCommand]:
        """The typer command class (`cls=`) whose help lists these options after the command's own."""
        flags = self

        class SettingsCommand(TyperCommand):
            def format_help(self, ctx: Any, formatter: Any) -> None:
                super().format_help(ctx, formatter)
                flags.print_help()

        return SettingsCommand

    def print_help(self) -> None:
        """Each option in three parts the width of the terminal, as clap's long help has them: in
        typer's table, at 80 columns, the help column is too narrow for an environment variable
        such as SD3_CONNECTIONS__MAX_CONNECTIONS_PER_CLIENT."""
        console = Console(highlight=False)
        for panel, options in itertools.groupby(self.options, key=lambda option: option.panel):
            entries: list[RenderableType] = []
            for option in options:
                entries.extend(_help_entry(option))
            console.print(Panel(Group(*entries), title=panel, title_align="left", border_style="dim"))
        if self.secrets:
            entries = []
            for option in self.secrets:
                entries += [Text(option.env, style="bold yellow"), _indented(option.description)]
            title = "Secrets: no flag, as other users can read a command line"
            console.print(Panel(Group(*entries), title=title, title_align="left", border_style="dim"))

    def __call__(self, command: Callable[..., None]) -> Callable[..., None]:
        own = [
            parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for parameter in inspect.signature(command, eval_str=True).parameters.values()
            if parameter.name != "settings"
        ]
        generated: list[inspect.Parameter] = []
        for option in self.options:
            generated.append(option.parameter())
            if shortcut := option.shortcut:
                generated.append(_shortcut_parameter(shortcut))
        parameters = [*own, *generated]
        _check_unique(parameters)
        options = self.options

        @functools.wraps(command)
        def run(**values: Any) -> None:
            overrides: dict[str, Any] = {}
            for option in options:
                value = values.pop(option.key)
                if (shortcut := option.shortcut) and values.pop(_shortcut_key(shortcut)):
                    value = shortcut.value  # `--no-t5` wins over `--t5`, as it always did
                overrides[option.key] = value
            command(settings=build_settings(**overrides), **values)

        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return run


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the flags that were given on top (nested as `group__field`)."""
    nested: dict[str, Any] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        group, _, field = name.partition("__")
        if field:
            nested.setdefault(group, {})[field] = value
        else:
            nested[name] = value
    try:
        return Settings(**nested)
    except ValidationError as exc:  # one line naming each setting and its SD3_ twin, not a traceback
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))} (SD3_{'__'.join(map(str, e['loc'])).upper()}): "
            f"{e['msg']} (got {str(e.get('input'))[:40]!r})"
            for e in exc.errors()
        )
        _fail(f"Invalid settings: {problems}.")
        raise typer.Exit(2) from None
    except Exception as exc:  # pydantic-settings' SettingsError, e.g. a list variable that is not JSON
        _fail(f"Invalid settings: {exc}")
        raise typer.Exit(2) from None


def _help_entry(option: SettingOption) -> list[RenderableType]:
    names = Text(
        ", ".join(option.declarations[0].split("/") + list(option.declarations[1:])), style="bold cyan"
    )
    if option.metavar:
        names.append(f" {option.metavar}", style="yellow")
    trailer = [Text(f"[env var: {option.env}]", style="dim yellow")]
    if option.default is not None:
        trailer.append(Text(f"[default: {option.default}]", style="dim"))
    entries: list[RenderableType] = [names, _indented(option.description), _indented(Columns(trailer))]
    if shortcut := option.shortcut:
        entries += [Text(shortcut.flag, style="bold cyan"), _indented(shortcut.help)]
    return entries


def _indented(content: RenderableType) -> Padding:
    return Padding(Text(content) if isinstance(content, str) else content, (0, 0, 0, 4))


def _fail(message: str) -> None:
    # soft_wrap: one line whatever the terminal's width, so that logs and scripts see one sentence.
    _err.print(Text(message, style="red"), soft_wrap=True)


def _under(option: SettingOption, prefixes: Sequence[str]) -> bool:
    dotted = ".".join(option.path)
    return any(dotted == prefix or dotted.startswith(f"{prefix}.") for prefix in prefixes)


def _shortcut_key(shortcut: Shortcut) -> str:
    return shortcut.flag.removeprefix("--").replace("-", "_")


def _shortcut_parameter(shortcut: Shortcut) -> inspect.Parameter:
    return inspect.Parameter(
        _shortcut_key(shortcut),
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(shortcut.flag, help=escape(shortcut.help), hidden=True),
        ],
    )


def _check_unique(parameters: Sequence[inspect.Parameter]) -> None:
    """Two options with one flag would silently shadow each other: fail when the command is made."""
    seen: set[str] = set()
    for parameter in parameters:
        for meta in getattr(parameter.annotation, "__metadata__", ()):
            if not isinstance(meta, OptionInfo):
                continue
            implicit = f"--{parameter.name.replace('_', '-')}"  # typer's name for an undeclared flag
            for declaration in meta.param_decls or (implicit,):
                for flag in declaration.split("/"):
                    if flag in seen:
                        raise ValueError(f"two options of one command are named {flag}")
                    seen.add(flag)


def _members(annotation: Any) -> tuple[Any, ...]:
    """`X | None` → (X, NoneType); anything else → (itself,)."""
    if get_origin(annotation) in (Union, UnionType):
        return get_args(annotation)
    return (annotation,)


def _field_type(annotation: Any) -> Any:
    """`X | None` → X."""
    (value,) = (member for member in _members(annotation) if member is not NoneType)
    return value


def _value_type(annotation: Any) -> Any:
    """The type click parses the flag's value as; pydantic validates it after."""
    value = _field_type(annotation)
    if get_origin(value) is list:
        return list[str]
    if value in (bool, int, float, Path):
        return value
    return str  # a Literal, a Decimal, a str: as an environment variable, pydantic parses the text


def _choices(annotation: Any) -> tuple[str, ...]:
    for member in _members(annotation):
        if get_origin(member) is Literal:
            return tuple(str(choice) for choice in get_args(member))
    return ()
