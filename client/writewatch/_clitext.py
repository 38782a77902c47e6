"""Text to values and back for the command line: numbers, ranges, category masks, KEY=VALUE
pairs, protobuf messages as JSON, enum names without their prefix."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import typer
from google.protobuf.message import Message

from ._types import PageCategory

__all__ = ["message_to_json", "parse_mask", "parse_number", "parse_pairs", "parse_range", "short_name"]

_SIZE_SUFFIXES = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NUMBER = re.compile(r"(?P<number>0[xob][0-9a-f_]+|[0-9_]+)(?P<suffix>[kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_number(text: str | int) -> int:
    """An address or size: decimal or 0x hex, with an optional K/M/G/T (binary) suffix."""
    if isinstance(text, int):  # typer also passes defaults through the parser
        return text
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a number (examples: 4096, 0x7f0000000000, 16M)")
    return int(match["number"], 0) * _SIZE_SUFFIXES[match["suffix"].lower()]


def parse_range(text: str) -> tuple[int, int]:
    """``START-END`` (end exclusive) or ``START+SIZE``."""
    for separator in ("-", "+"):
        start, found, rest = text.partition(separator)
        if found:
            first, second = parse_number(start), parse_number(rest)
            return (first, second) if separator == "-" else (first, first + second)
    raise typer.BadParameter(f"{text!r} is not a range (START-END or START+SIZE)")


def parse_mask(text: str | int) -> int:
    """PAGE_IS_* bits: names joined by ``,`` or ``|`` (PRESENT,WRITTEN), or a number."""
    if isinstance(text, int):
        return text
    mask = 0
    for part in re.split(r"[,|]", text):
        name = part.strip().upper().removeprefix("PAGE_IS_")
        if not name:
            continue
        if name in PageCategory.__members__:
            mask |= PageCategory[name]
        else:
            try:
                mask |= parse_number(name)
            except typer.BadParameter:
                names = ", ".join(PageCategory.__members__)
                raise typer.BadParameter(f"unknown category {part!r} (one of {names}, or a number)") from None
    return mask


def parse_pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict."""
    pairs: dict[str, str] = {}
    for item in items or ():
        key, found, value = item.partition("=")
        if not found or not key:
            raise typer.BadParameter(f"{what} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def message_to_json(message: Message) -> dict[str, Any]:
    """A protobuf message as JSON-ready data: field names as in the .proto, 64-bit integers as
    numbers (json_format would make them strings) and enums as their names."""
    data: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        value = getattr(message, descriptor.name)
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            data[descriptor.name] = dict(value)
        elif descriptor.is_repeated:
            data[descriptor.name] = [_field_json(descriptor, item) for item in value]
        elif descriptor.containing_oneof is not None and not message.HasField(descriptor.name):
            # Only fields with explicit presence (oneof, proto3 optional) can be "unset".
            data[descriptor.name] = None
        else:
            data[descriptor.name] = _field_json(descriptor, value)
    return data


def _field_json(descriptor: Any, value: Any) -> Any:
    if descriptor.enum_type is not None:
        enum_value = descriptor.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if isinstance(value, Message):
        return message_to_json(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def short_name(enum: Any, value: int) -> str:
    """An enum value's name without its type prefix: ATTACH_MODE_INJECT -> INJECT."""
    name: str = enum.Name(value)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.DESCRIPTOR.name).upper() + "_"
    return name.removeprefix(prefix)
