"""``--config RECIPE``: the prune command's options from a YAML or JSON file.

A recipe is a mapping of flag names (``structured``, ``target-macs`` or
``target_macs``, ``data``, ``distill: true``, ``ignore: [a*, b*]``) to values,
read as if they were typed before the command line's own flags: every value
goes through the same argparse types and checks as the flag, and a flag
given on the command line replaces the recipe's value (for repeatable flags
such as ``--ignore``, all of the recipe's). Paths are taken as on the
command line (relative to the working directory).

The *effective* recipe of a run (every option that differs from its
default, wherever it came from, as the strings that were parsed) is what
``recorded`` returns: the prune command stores it in the report and in the
written model's metadata (``onnxprune.recipe``), and it is itself a recipe:
``--config`` on it reproduces the run. Outputs, verbosity and the recipe
path itself are not part of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError

CONFIG_FLAG = "--config"
METADATA_KEY = "onnxprune.recipe"
# a run's outputs and how loudly it speaks: not part of what it computes
_NOT_RECORDED = {"model", "config", "help", "version", "output", "force", "report_path", "report", "plan_out",
                 "summary_md", "dry_run", "quiet", "verbose", "debug", "json", "plot"}
_BOOLEAN = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)


def add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(CONFIG_FLAG, metavar="RECIPE", help="options from a YAML or JSON file (flag names as keys, e.g. "
                   "'structured: 0.4'); flags given here override it; the report stores the effective recipe")


def config_path(argv: list[str]) -> str | None:
    """The value of the last ``--config`` in ``argv`` (None without one)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise UsageError(f"argument {CONFIG_FLAG}: expected one argument")
            path = argv[i + 1]
        elif arg.startswith(CONFIG_FLAG + "="):
            path = arg.split("=", 1)[1]
    return path


def read_recipe(path: str) -> dict:
    from ..planning.reading import parse_json, parse_yaml, read_text

    text = read_text(path, CONFIG_FLAG)  # bounded: size, nesting and YAML aliases (planning/reading.py)
    parse = parse_yaml if Path(path).suffix.lower() in (".yaml", ".yml") else parse_json
    mapping = parse(text, path, CONFIG_FLAG)
    if isinstance(mapping, dict) and isinstance(mapping.get("recipe"), dict):
        mapping = mapping["recipe"]  # a report: its effective recipe reproduces the run
    if not isinstance(mapping, dict):
        raise UsageError(f"{CONFIG_FLAG} {path}: expected a mapping of flag names to values")
    return mapping


def _action_for(parser: argparse.ArgumentParser, key) -> argparse.Action | None:
    if not isinstance(key, str):
        return None
    flag = "--" + key.lstrip("-").replace("_", "-")
    action = parser._option_string_actions.get(flag)  # argparse keeps no public index of its flags
    if action is None:
        action = next((a for a in parser._actions if a.dest == key and a.option_strings), None)
    return action


def _text(value, key: str, path: str) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        raise UsageError(f"{CONFIG_FLAG} {path}: '{key}' needs a single value, got {json.dumps(value)[:80]}")
    return str(value)


def _flag(action: argparse.Action) -> str:
    """The action's long flag (for a --x/--no-x switch, --x)."""
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def _tokens(action: argparse.Action, key: str, value, path: str) -> list[str]:
    """The command-line tokens that give ``action`` the recipe's ``value``."""
    flag = _flag(action)
    if isinstance(action, _BOOLEAN):
        if not isinstance(value, bool):
            raise UsageError(f"{CONFIG_FLAG} {path}: '{key}' is a switch: give true or false, got "
                             f"{json.dumps(value)[:80]}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value == isinstance(action, argparse._StoreTrueAction) else []
    values = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction):
        return [token for v in values for token in (flag, _text(v, key, path))]
    if isinstance(value, list):  # a comma-separated flag (--bench-batch 1,8)
        return [flag, ",".join(_text(v, key, path) for v in values)]
    return [flag, _text(value, key, path)]


def _given_on_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the command line itself sets: argv parsed with every default hidden."""
    saved = {a: a.default for a in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for action, default in saved.items():
            action.default = default


def expand_recipe(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the ``--config`` recipe's options put before the command line's (which win)."""
    path = config_path(argv)
    if path is None:
        return argv
    given = _given_on_command_line(parser, argv)
    tokens = []
    for key, value in read_recipe(path).items():
        action = _action_for(parser, key)
        if action is None or action.dest in ("config", "help", "version"):
            raise UsageError(f"{CONFIG_FLAG} {path}: unknown option '{str(key)[:80]}' (keys are the command's flag "
                             "names, e.g. structured, target-macs, data)")
        if action.dest not in given:
            tokens += _tokens(action, str(key), value, path)
    try:  # the recipe alone, so that a bad value is blamed on it
        parser.parse_args([*tokens, "MODEL"])
    except UsageError as exc:
        raise UsageError(f"{CONFIG_FLAG} {path}: {exc}") from None
    return tokens + argv


class RawValues:
    """Records the strings argparse converts for each dest, while in a ``with``."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser, self.raw, self._saved = parser, {}, {}

    def __enter__(self):
        for action in self.parser._actions:
            if action.type is not None and action.option_strings:
                self._saved[action] = action.type
                action.type = self._recording(action.dest, action.type)
        return self

    def _recording(self, dest, convert):
        def parse(text):
            value = convert(text)
            self.raw.setdefault(dest, []).append(text)
            return value
        return parse

    def __exit__(self, *exc):
        for action, convert in self._saved.items():
            action.type = convert


def _plain(text: str):
    """A recorded string as the recipe shows it: numbers as numbers, the rest as given."""
    for convert in (int, float):
        try:
            value = convert(text)
        except ValueError:
            continue
        return value if str(value) == text else text
    return text


def recorded(parser: argparse.ArgumentParser, args: argparse.Namespace, raw: dict) -> dict:
    """The effective recipe: each option that differs from its default, keyed by its flag name."""
    recipe = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_RECORDED or action.help == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, None)
        if value == action.default:
            continue
        key = _flag(action).lstrip("-")
        if isinstance(action, _BOOLEAN):
            recipe[key] = bool(value)
        elif action.dest in raw:
            texts = [_plain(t) for t in raw[action.dest]]
            recipe[key] = texts if isinstance(action, argparse._AppendAction) else texts[-1]
        elif isinstance(value, (str, int, float)) or (isinstance(value, list)
                                                      and all(isinstance(v, str) for v in value)):
            recipe[key] = value  # an untyped flag: its value is the string given
    return recipe
