"""The results table: every figure beside its floor, and whether it met its target."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Row", "Report", "ms", "rate", "pct"]


def ms(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "n/a"
    value = seconds * 1000
    return f"{value:.3f} ms" if value < 1 else f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def rate(per_second: float, unit: str = "/s") -> str:
    if per_second != per_second:
        return "n/a"
    return f"{per_second:,.0f}{unit}" if per_second >= 100 else f"{per_second:.1f}{unit}"


def pct(share: float, digits: int = 1) -> str:
    return "n/a" if share != share else f"{share * 100:.{digits}f}%"


@dataclass
class Row:
    """One measured figure. ``ok`` is None where there is no target (or in smoke mode)."""

    section: str
    measure: str
    result: str
    floor: str = ""
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("met" if self.ok else "**MISSED**")


@dataclass
class Report:
    smoke: bool
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: list[tuple[str, str]] = field(default_factory=list)
    settings: list[tuple[str, str]] = field(default_factory=list)

    def add(self, section: str, measure: str, result: str, floor: str = "", target: str = "",
            ok: bool | None = None) -> None:
        self.rows.append(Row(section, measure, result, floor, target, None if self.smoke else ok))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def sections(self) -> list[str]:
        return list(dict.fromkeys(r.section for r in self.rows))

    def markdown(self, title: str, elapsed: float) -> str:
        out = [f"# {title}", ""]
        if self.smoke:
            out += ["Smoke run: tiny sizes, one short run per figure where noted, no thresholds checked.", ""]
        out += ["## Machine", "", "| | |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in self.machine]
        if self.settings:
            out += ["", "## Run settings", "", "| | |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in self.settings]
        out += ["", "## Results", "",
                "Each figure is the median of the repetitions shown in its row; the floor is what the same "
                "stack does with the broker's work taken out.", "",
                "| # | measure | result | beside (floor) | target | verdict |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            out.append(f"| {r.section} | {r.measure} | {r.result} | {r.floor} | {r.target} | {r.verdict} |")
        missed = [r for r in self.rows if r.ok is False]
        out += ["", f"Targets missed: {len(missed)}" + (" (" + "; ".join(
            f"{r.section} {r.measure}" for r in missed) + ")" if missed else "")]
        if self.notes:
            # General notes first, then by row, each row's notes in the order they were made.
            def row_of(note: str) -> int:
                match = re.match(r"Row (\d)", note)
                return int(match.group(1)) if match else 0

            out += ["", "## Notes", ""] + [f"- {n}" for n in sorted(self.notes, key=row_of)]
        out += ["", f"Total bench time: {elapsed:.0f} s.", ""]
        return "\n".join(out)
