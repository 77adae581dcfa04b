"""Command-line option types that check values while parsing, before any model loads; a bad value is reported
with the option's name, the value and what is expected."""

from __future__ import annotations

import click


class IntAtLeast(click.ParamType):
    """An integer no smaller than `least`."""

    def __init__(self, least: int = 1):
        self.least = least
        self.name = f"integer >= {least}"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not an integer; give an integer of at least {self.least}", param, ctx)
        if number < self.least:
            self.fail(f"{number} is too small; give an integer of at least {self.least}", param, ctx)
        return number


class PositiveInts(click.ParamType):
    """A comma-separated list of positive integers, such as `example`."""

    name = "N[,N...]"

    def __init__(self, example: str):
        self.example = example

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            numbers = ()
        if not numbers or min(numbers) < 1:
            self.fail(f"{value!r} is not a comma-separated list of positive integers; write e.g. {self.example}",
                      param, ctx)
        return numbers
