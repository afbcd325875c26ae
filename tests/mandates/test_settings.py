"""The mandate component's settings: wrong values stop start-up with one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from trustplane.app import Services
from trustplane.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("nats_url", "http://127.0.0.1:4222", "TRUSTPLANE_NATS_URL: String should match pattern"),
        ("nats_stream", "has space", "TRUSTPLANE_NATS_STREAM"),
        ("nats_subject", "a b", "TRUSTPLANE_NATS_SUBJECT"),
        ("mandate_default_lifetime", 10, "TRUSTPLANE_MANDATE_DEFAULT_LIFETIME"),
        ("mandate_cache_size", -1, "TRUSTPLANE_MANDATE_CACHE_SIZE"),
    ],
)
def test_invalid_values(name: str, value: object, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(**{name: value})


def test_a_bad_types_directory_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{")
    settings = load_settings(authorization_details_types_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(
        SettingsError,
        match=r"^invalid setting TRUSTPLANE_AUTHORIZATION_DETAILS_TYPES_DIR: .*broken.json: not a valid JSON Schema",
    ):
        Services.build(settings)
