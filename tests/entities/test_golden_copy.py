"""Reading GLEIF golden-copy files: the LEI-CDF 3.1 CSV columns, skipped records with their line and
reason, ZIP and BOM, files that are not golden copies, and that memory stays flat (streaming)."""

from __future__ import annotations

import tracemalloc
import zipfile
from pathlib import Path

import pytest

from trustplane.entities.golden_copy import Skipped, read_golden_copy
from trustplane.entities.model import EntityError, LegalEntity, Source

SAMPLE = Path(__file__).parent / "fixtures" / "golden_copy_sample.csv"
HEADER = (
    '"LEI","Entity.LegalName","Entity.LegalAddress.Country","Registration.RegistrationStatus"\r\n'
)


def read(path: Path) -> tuple[list[LegalEntity], list[Skipped]]:
    records = list(read_golden_copy(path, now=1_700_000_000))
    return (
        [r for r in records if isinstance(r, LegalEntity)],
        [r for r in records if isinstance(r, Skipped)],
    )


def test_the_sample_file() -> None:
    entities, skipped = read(SAMPLE)
    assert [(e.lei, e.legal_name, e.country, e.registration_status) for e in entities] == [
        ("5493001KJTIIGC8Y1R12", "Arranger Securities Europe S.A.", "LU", "ISSUED"),
        ("529900T8BM49AURSDO55", "Meridian Asset Management GmbH", "DE", "ISSUED"),
        ("213800LAPSEDTEST0076", 'Société Générale "Test", Paris branch', "FR", "LAPSED"),
        ("984500RETIRED0000035", "Retired Holdings Limited", "GB", "RETIRED"),  # a newline inside
    ]
    assert all(e.source is Source.GLEIF and e.updated_at == 1_700_000_000 for e in entities)
    assert [(s.line, s.lei, s.kind) for s in skipped] == [
        (7, "529900T8BM49AURSDO56", "invalid LEI"),
        (8, "5299000J2N45DDNE4Y28", "no legal name"),
        (9, "5299000J2N45DDNE4Y28", "invalid country"),
        (10, "5299000J2N45DDNE4Y28", "too few columns"),
    ]
    assert "check digits" in skipped[0].reason
    assert "'Germany'" in skipped[2].reason


def test_a_zip_as_gleif_publishes_it_and_a_byte_order_mark(tmp_path: Path) -> None:
    archive = tmp_path / "20261201-gleif-concatenated-file-lei2.csv.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("20261201-gleif-concatenated-file-lei2.csv", "\ufeff" + SAMPLE.read_text())
    assert read(archive) == read(SAMPLE)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b'"LEI","Name"\r\n', "no column Entity.LegalName"),
        (b'"lei","Entity.LegalName"\r\n', "no column LEI"),
        (HEADER.encode() + b'"5493001KJTIIGC8Y1R12","Caf\xe9 SA","LU","ISSUED"\r\n', "not UTF-8"),
    ],
    ids=["empty", "no-name-column", "no-lei-column", "latin-1"],
)
def test_files_that_are_not_golden_copies(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "file.csv"
    path.write_bytes(content)
    with pytest.raises(EntityError, match=message) as caught:
        read(path)
    assert str(path) in str(caught.value)


def test_a_zip_with_two_csv_files_and_a_missing_file(tmp_path: Path) -> None:
    archive = tmp_path / "two.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.csv", HEADER)
        z.writestr("b.csv", HEADER)
    with pytest.raises(EntityError, match=r"exactly one \.csv"):
        read(archive)
    with pytest.raises(EntityError, match="cannot be read"):
        read(tmp_path / "absent.csv")


def test_memory_stays_flat_whatever_the_file_size(tmp_path: Path) -> None:
    """About 16 MB of CSV is read record by record: the peak is a small fraction of the file."""
    path = tmp_path / "big.csv"
    filler = "x" * 400
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(HEADER.rstrip("\r\n") + ',"Padding"\r\n')
        for i in range(40_000):
            out.write(f'"5493001KJTIIGC8Y1R12","Entity {i}","LU","ISSUED","{filler}"\r\n')
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_golden_copy(path, now=0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 40_000
    assert size > 16_000_000
    assert peak < size / 20, f"peak {peak} bytes while reading {size} bytes"
