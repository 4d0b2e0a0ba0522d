"""The one CSV writer of the project: cells a spreadsheet would run as a formula are neutralised.

Scan file names, scan ids, prompts and report text end up in ``summary.csv``, ``patches.csv``,
``scores.csv``, ``failures.csv``, split manifests and reader-study sheets. A cell starting with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return is evaluated by Excel, LibreOffice and
Google Sheets when the file is opened (``=HYPERLINK("evil.example","x")`` in a file name is enough).
OWASP's recommendation (CSV injection) is followed: such a cell is written with a leading single
quote, which spreadsheets show as text and do not evaluate, and every cell is quoted as needed by
the ``csv`` module.

Numbers are not text: ``-0.25`` or ``-3e-05`` (a number or a string that is exactly a plain
decimal number) is written unchanged, so negative coordinates and scores stay numbers in a
spreadsheet and in ``pandas.read_csv``.

The project's own readers go through :class:`DictReader` / :func:`reader`, which remove that quote
again, so a manifest written here and read back names the same paths.
"""
from __future__ import annotations

import csv
import numbers
import re
from typing import Iterable, Iterator

#: First characters that make a spreadsheet evaluate a cell (OWASP CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
#: Plain decimal numbers (optionally signed, with exponent): left alone.
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def neutralise(value):
    """``value`` as it is safe to write into a CSV cell (a prefixed quote when it would be a formula)."""
    if value is None or isinstance(value, (bool, numbers.Number)):
        return value
    text = value if isinstance(value, str) else str(value)
    if text and text.startswith(FORMULA_START) and not _NUMBER.match(text):
        return "'" + text
    return value


def restore(value):
    """Undo :func:`neutralise` on a cell read back (a quote followed by a formula character)."""
    if isinstance(value, str) and len(value) > 1 and value[0] == "'" and value[1:].startswith(FORMULA_START) \
            and not _NUMBER.match(value[1:]):
        return value[1:]
    return value


class _Writer:
    def __init__(self, handle, **kwargs):
        self._writer = csv.writer(handle, **kwargs)

    def writerow(self, row: Iterable):
        return self._writer.writerow([neutralise(v) for v in row])

    def writerows(self, rows: Iterable[Iterable]) -> None:
        for row in rows:
            self.writerow(row)

    @property
    def dialect(self):
        return self._writer.dialect


def writer(handle, **kwargs) -> _Writer:
    """Like ``csv.writer``; every cell goes through :func:`neutralise`."""
    return _Writer(handle, **kwargs)


class DictWriter(csv.DictWriter):
    """Like ``csv.DictWriter``; header and cells go through :func:`neutralise` (keys stay as given)."""

    def writerow(self, rowdict):
        return super().writerow({k: neutralise(v) for k, v in rowdict.items()})

    def writerows(self, rowdicts):
        for row in rowdicts:
            self.writerow(row)

    def writeheader(self):
        return self.writer.writerow([neutralise(f) for f in self.fieldnames])


def reader(handle, **kwargs) -> Iterator[list]:
    """Like ``csv.reader``, undoing the writer's neutralisation."""
    for row in csv.reader(handle, **kwargs):
        yield [restore(v) for v in row]


class DictReader(csv.DictReader):
    """Like ``csv.DictReader``, undoing the writer's neutralisation in the header and cells."""

    @property
    def fieldnames(self):
        names = csv.DictReader.fieldnames.fget(self)
        return None if names is None else [restore(n) for n in names]

    @fieldnames.setter
    def fieldnames(self, value):
        csv.DictReader.fieldnames.fset(self, value)

    def __next__(self):
        row = super().__next__()
        return {k: ([restore(x) for x in v] if isinstance(v, list) else restore(v)) for k, v in row.items()}
