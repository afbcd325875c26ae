"""The ``fapi2`` profile's settings: what ``profile = "fapi2"`` refuses at load, and the FAPI 2.0
Security Profile §5.3.2.1 clause 14 window (``iat``/``nbf`` up to 10 s ahead accepted, over 60 s
refused) derived from ``clock_skew``."""

from __future__ import annotations

from typing import get_args

import pytest

from trustplane.profile import FAPI2_ALGORITHMS, future_tolerance
from trustplane.settings import SettingsError, SigningAlgorithm, load_settings


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        # §5.3.2.1: no shared secrets under fapi2
        (
            {"client_auth_methods": '["private_key_jwt","client_secret_basic"]'},
            "client_auth_methods",
        ),
        # §5.3.2.1 clause 14: the skew must admit 10 s and refuse beyond 60 s
        ({"clock_skew": "5"}, "clock_skew"),
        ({"clock_skew": "120"}, "clock_skew"),
        # §5.3.2.2: codes live at most 60 s (a ceiling for every profile)
        ({"authorization_code_lifetime": "61"}, "authorization_code_lifetime"),
    ],
)
def test_fapi2_settings_that_break_the_profile_are_refused_at_load(
    overrides: dict[str, str], setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRUSTPLANE_PROFILE", "fapi2")
    for name, value in overrides.items():
        monkeypatch.setenv(f"TRUSTPLANE_{name.upper()}", value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.setting == setting
    assert f"TRUSTPLANE_{setting.upper()}" in str(caught.value)


def test_an_unknown_profile_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTPLANE_PROFILE", "fapi1")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.setting == "profile"


@pytest.mark.parametrize(("skew", "default", "fapi2"), [(0, 0, 10), (30, 30, 30), (300, 300, 60)])
def test_future_tolerance_is_the_fapi2_window(skew: int, default: int, fapi2: int) -> None:
    """§5.3.2.1 clause 14: at least 10 s, at most 60 s, whatever ``clock_skew`` says."""
    settings = load_settings(clock_skew=skew)
    assert future_tolerance(settings, False) == default
    assert future_tolerance(settings, True) == fapi2


def test_no_configurable_algorithm_is_outside_fapi2() -> None:
    """§5.4.1: PS256, ES256, EdDSA only; ``allowed_signing_algorithms`` cannot name anything else,
    so the fapi2 profile needs no algorithm rule of its own (this keeps it that way)."""
    assert set(get_args(SigningAlgorithm)) <= FAPI2_ALGORITHMS
    with pytest.raises(SettingsError):
        load_settings(allowed_signing_algorithms=("ES256", "RS256"))
