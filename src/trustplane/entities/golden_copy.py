"""Reading a GLEIF golden-copy file (LEI-CDF 3.1 "Concatenated file", CSV) offline, as a stream.

A golden copy is about 3 GB of CSV (or a ZIP holding one CSV): it is read record by record, never
whole, so memory stays flat whatever its size. The header names the columns; only these are used:

- ``LEI`` (required), ``Entity.LegalName`` (required);
- ``Entity.LegalAddress.Country``, ``Registration.RegistrationStatus`` (optional).

A record that cannot go into the directory (bad LEI check digits, no legal name, a malformed country)
is skipped with its line number and the reason; the rest of the file goes on.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from trustplane.entities.model import EntityError, LegalEntity, Source, legal_entity

LEI = "LEI"
LEGAL_NAME = "Entity.LegalName"
COUNTRY = "Entity.LegalAddress.Country"
STATUS = "Registration.RegistrationStatus"


@dataclass(frozen=True, slots=True)
class Skipped:
    line: int
    lei: str
    #: Short, countable ("invalid LEI", "no legal name", ...).
    kind: str
    reason: str


@contextmanager
def _open_text(path: Path) -> Iterator[IO[str]]:
    """The CSV as text: the file itself, or the one ``.csv`` member of a ZIP (as GLEIF ships it)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.lower().endswith(".csv")]
            if len(members) != 1:
                raise EntityError(f"{path}: the ZIP must hold exactly one .csv file")
            with archive.open(members[0]) as raw:
                yield io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        return
    with path.open(encoding="utf-8-sig", newline="") as text:
        yield text


def _columns(header: list[str] | None, path: Path) -> tuple[int, int, int | None, int | None]:
    if header is None:
        raise EntityError(f"{path}: empty file")
    index = {name.strip(): i for i, name in enumerate(header)}
    missing = [name for name in (LEI, LEGAL_NAME) if name not in index]
    if missing:
        raise EntityError(
            f"{path}: not a GLEIF golden-copy CSV (LEI-CDF 3.1): no column {', '.join(missing)}"
        )
    return index[LEI], index[LEGAL_NAME], index.get(COUNTRY), index.get(STATUS)


def read_golden_copy(path: Path, now: int) -> Iterator[LegalEntity | Skipped]:
    """Each record as a checked :class:`LegalEntity`, or as :class:`Skipped` with the reason.
    Raises :class:`EntityError` (naming the file and line) when the file itself is unreadable."""
    try:
        with _open_text(path) as text:
            reader = csv.reader(text)
            try:
                lei_at, name_at, country_at, status_at = _columns(next(reader, None), path)
                width = max(i for i in (lei_at, name_at, country_at, status_at) if i is not None)
                for row in reader:
                    if len(row) <= width:
                        lei = row[lei_at][:40] if lei_at < len(row) else ""
                        yield Skipped(reader.line_num, lei, "too few columns", "too few columns")
                        continue
                    try:
                        yield legal_entity(
                            row[lei_at],
                            row[name_at],
                            row[country_at] if country_at is not None else None,
                            row[status_at] if status_at is not None else None,
                            Source.GLEIF,
                            now,
                        )
                    except EntityError as exc:
                        yield Skipped(reader.line_num, row[lei_at][:40], exc.kind, str(exc))
            except csv.Error as exc:
                raise EntityError(
                    f"{path}, line {reader.line_num}: malformed CSV ({exc})"
                ) from None
            except UnicodeDecodeError:
                raise EntityError(f"{path}, after line {reader.line_num}: not UTF-8") from None
    except OSError as exc:
        raise EntityError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except zipfile.BadZipFile as exc:
        raise EntityError(f"{path}: damaged ZIP ({exc})") from None
