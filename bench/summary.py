"""The benchmark's closing table (issue 16's cells), pure: numbers in, Markdown out.

A cell holds one value per rep for the relay and for Postfix, measured interleaved in the same
run; it prints median [min-max] of each and the per-rep ratio relay/Postfix (rep i of the relay
against rep i of Postfix, the two measured back to back), with the command that produced it.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def spread(values: list[float | None], digits: int = 0) -> str:
    """'median [min-max]' of the values present ('-' if none; the bare value if only one)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    f = f"{{:,.{digits}f}}"
    if len(vals) == 1:
        return f.format(vals[0])
    return f"{f.format(statistics.median(vals))} [{f.format(min(vals))}-{f.format(max(vals))}]"


def per_rep_ratios(a: list[float | None], b: list[float | None]) -> list[float]:
    """a[i] / b[i] for every rep where both were measured (and b is not zero)."""
    return [x / y for x, y in zip(a, b) if x is not None and y]


@dataclass
class Cell:
    name: str
    command: str
    unit: str = "msgs/s"
    relay: list[float | None] = field(default_factory=list)
    postfix: list[float | None] = field(default_factory=list)
    digits: int = 0
    higher_is_better: bool = True
    note: str = ""
    compare: bool = True  # False: both columns shown, no ratio (e.g. the load generator's own CPU)

    def ratios(self) -> list[float]:
        return per_rep_ratios(self.relay, self.postfix) if self.compare else []

    def ratio_text(self) -> str:
        r = self.ratios()
        if not r:
            return "-"
        reps = ", ".join(f"{x:.2f}" for x in r)
        return f"{spread(r, 2)} (per rep {reps})" if len(r) > 1 else f"{r[0]:.2f}"

    def verdict(self) -> str:
        """'better'/'worse' than Postfix only when every rep agrees; else 'mixed'."""
        r = self.ratios()
        if not r:
            return ""
        good = [x > 1 if self.higher_is_better else x < 1 for x in r]
        return "better in every rep" if all(good) else "worse in every rep" if not any(good) else "mixed"


def table(cells: list[Cell]) -> str:
    """One row a cell; the commands listed once below, each row naming its own by letter."""
    letters: dict[str, str] = {}
    for c in cells:
        letters.setdefault(c.command, chr(ord("A") + len(letters)))
    lines = ["| cell | relay | Postfix | ratio relay/Postfix | | command |",
             "|---|---|---|---|---|---|"]
    for c in cells:
        unit = f" {c.unit}" if c.unit else ""
        pf = spread(c.postfix, c.digits) + unit if c.postfix else ""
        lines.append(f"| {c.name} | {spread(c.relay, c.digits)}{unit} | {pf} | {c.ratio_text()} | "
                     f"{c.verdict() or c.note} | {letters[c.command]} |")
    lines.append("")
    for cmd, letter in letters.items():
        lines.append(f"- {letter}: `{cmd}`")
    return "\n".join(lines)
