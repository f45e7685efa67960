"""Reading values from a parsed TOML study: each checked for its type and range, each
error naming the key path, so a typo costs a second, not a half-finished run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.checks import Choice, check_positive_int, parse_choice
from ..core.schema import SAFE_NAME
from ..theory.threat import Norm, ThreatModel, parse_eps
from .spec import config_error


def expect(value: object, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and kind is not bool:
        raise config_error(where, f"expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise config_error(where, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def choice(kind: type[Choice], value: object, where: str) -> Choice:
    try:
        return parse_choice(kind, value, "protocol")
    except ValueError as err:
        raise config_error(where, str(err)) from err


def checked(check: Callable[[object, str], Any], value: object, where: str) -> Any:
    """``check(value, name)`` with its error given the key path."""
    try:
        return check(value, where.rsplit(".", 1)[-1])
    except ValueError as err:
        raise config_error(where, str(err)) from err


def positive_int(value: object, where: str) -> int:
    number: int = checked(check_positive_int, value, where)
    return number


def check_name(name: str, where: str) -> None:
    if not SAFE_NAME.fullmatch(name):
        raise config_error(
            where,
            f"name {name!r}: use letters, digits and . _ + = - (starting with a letter or "
            "digit, at most 80 characters); names become file names in the output folder",
        )


def unknown_keys(table: Mapping[str, object], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        prefix = f"{where}." if where else ""
        raise config_error(
            f"{prefix}{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})"
        )


def threat(value: object, where: str) -> ThreatModel:
    table = expect(value, dict, where, "a table like {norm = 'Linf', eps = '8/255'}")
    unknown_keys(table, {"norm", "eps"}, where)
    try:
        return ThreatModel(table.get("norm", ""), table.get("eps", 0))
    except (ValueError, TypeError) as err:
        raise config_error(where, str(err)) from err


def threat_grid(value: object, where: str) -> tuple[ThreatModel, ...]:
    table = expect(value, dict, where, "a table like {Linf = ['1/10'], L2 = [1.0]}")
    threats = []
    for norm_name, radii in table.items():
        try:
            norm = Norm.parse(norm_name)
        except ValueError as err:
            raise config_error(f"{where}.{norm_name}", str(err)) from err
        for index, eps in enumerate(expect(radii, list, f"{where}.{norm_name}", "a list")):
            try:
                threat = ThreatModel(norm, parse_eps(eps))
            except (ValueError, TypeError) as err:
                raise config_error(f"{where}.{norm_name}[{index}]", str(err)) from err
            if threat in threats:
                raise config_error(f"{where}.{norm_name}[{index}]", f"{threat} is given twice")
            threats.append(threat)
    if not threats:
        raise config_error(where, "no threat model given")
    return tuple(threats)


def dataclass_from(
    cls: Callable[..., Any], fields: set[str], table: Mapping[str, Any], where: str
) -> Any:
    unknown_keys(table, fields, where)
    try:
        return cls(**table)
    except (ValueError, TypeError) as err:
        raise config_error(where, str(err)) from err


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def converted(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Values that TOML cannot spell: threat models from tables."""
    converted = dict(table)
    if "threat" in converted:
        converted["threat"] = threat(converted["threat"], f"{where}.threat")
    return converted


# What an encoder spec may be given besides its source (resolve_encoder's arguments).
LOAD_KEYS = {"weights", "layer", "resize", "trust_checkpoint", "trust_code", "options"}


def load_options(table: Mapping[str, Any], base: Path, where: str) -> dict[str, Any]:
    options: dict[str, Any] = dict(
        expect(table.get("options", {}), dict, f"{where}.options", "a table")
    )
    if "weights" in table:
        path = base / expect(table["weights"], str, f"{where}.weights", "a file path")
        if not path.is_file():
            raise config_error(f"{where}.weights", f"weights file not found: {path}")
        options["checkpoint"] = str(path)
    if "layer" in table:
        options["layer"] = expect(table["layer"], str, f"{where}.layer", "a module name")
    for flag in ("resize", "trust_checkpoint", "trust_code"):
        if flag in table:
            options[flag] = expect(table[flag], bool, f"{where}.{flag}", "true or false")
    return options
