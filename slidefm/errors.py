"""User-facing errors: printed by the CLI without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class SlidefmError(Exception):
    """An error caused by the user's input or configuration; the CLI prints it and exits 2."""


class OptionError(SlidefmError, ValueError):
    """A config option holds a value outside its allowed set (a ``Literal`` field of its dataclass)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: which file, which row/slide, and what."""

    file: str
    where: str
    message: str
    level: str = "error"  # "error" or "warning"

    def __str__(self) -> str:
        loc = f"{self.file}" + (f" [{self.where}]" if self.where else "")
        return f"{self.level}: {loc}: {self.message}"


class CohortError(SlidefmError):
    """The cohort breaks the contract; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = [p for p in problems if p.level == "error"]
        lines = [str(p) for p in self.problems]
        super().__init__(f"{len(lines)} problem(s) in cohort:\n" + "\n".join("  " + s for s in lines))
