"""Settings: defaults, ``TRUSTPLANE_`` environment, TOML file; every wrong setting is one line naming
the variable, in the library and on the command line."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import KEK
from trustplane.settings import Settings, SettingsError, load_settings

TRUSTPLANE = str(Path(sys.executable).parent / "trustplane")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets: no TRUSTPLANE_* from the caller's shell, no stray files in the cwd."""
    for name in list(os.environ):
        if name.startswith("TRUSTPLANE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def failure(**env: str) -> str:
    """Set the environment, load, and return the SettingsError message (which must be one line)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        with pytest.raises(SettingsError) as caught:
            load_settings()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_defaults() -> None:
    settings = load_settings()

    assert settings.access_token_lifetime == 300
    assert settings.clock_skew == 60
    assert settings.signing_algorithm == "ES256"
    assert settings.issuer == "http://127.0.0.1:8000"
    assert settings.client_auth_methods == ("private_key_jwt",)
    assert settings.key_rotation_interval == 90 * 86400
    assert settings.key_next_publication == 86400
    assert settings.allow_insecure_loopback_jwks_uri is False
    assert settings.redis_url == ""
    assert settings.key_encryption_key is None
    assert settings.effective_database_url == "sqlite+aiosqlite:///.trustplane/trustplane.db"
    assert settings.is_embedded is True


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTPLANE_ACCESS_TOKEN_LIFETIME", "600")
    monkeypatch.setenv("TRUSTPLANE_SIGNING_ALGORITHM", "EdDSA")
    monkeypatch.setenv("TRUSTPLANE_ISSUER", "https://as.example")
    monkeypatch.setenv(
        "TRUSTPLANE_CLIENT_AUTH_METHODS", '["private_key_jwt","client_secret_basic"]'
    )
    monkeypatch.setenv("CLOCK_SKEW", "5")  # no prefix: not ours

    settings = load_settings()

    assert settings.access_token_lifetime == 600
    assert settings.signing_algorithm == "EdDSA"
    assert settings.issuer == "https://as.example"
    assert settings.client_auth_methods == ("private_key_jwt", "client_secret_basic")
    assert settings.clock_skew == 60


def test_default_issuer_follows_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTPLANE_PORT", "9001")

    assert load_settings().issuer == "http://127.0.0.1:9001"
    assert load_settings(host="::1").issuer == "http://[::1]:9001"


def test_toml_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "trustplane.toml"
    config.write_text(
        'issuer = "https://as.example"\n'
        "access_token_lifetime = 120\n"
        "clock_skew = 10\n"
        'client_auth_methods = ["private_key_jwt", "client_secret_post"]\n'
    )
    monkeypatch.setenv("TRUSTPLANE_CONFIG", str(config))
    monkeypatch.setenv("TRUSTPLANE_CLOCK_SKEW", "5")  # the environment wins over the file

    settings = load_settings()

    assert settings.issuer == "https://as.example"
    assert settings.access_token_lifetime == 120
    assert settings.clock_skew == 5
    assert settings.client_auth_methods == ("private_key_jwt", "client_secret_post")
    assert load_settings(clock_skew=1).clock_skew == 1  # explicit arguments win over both


def test_unknown_key_in_the_toml_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "trustplane.toml"
    config.write_text("access_token_lifetime = 120\ntoken_lifetime = 60\n")

    message = failure(TRUSTPLANE_CONFIG=str(config))

    assert message == (
        f"invalid setting TRUSTPLANE_CONFIG: config file {config}: unknown setting(s) token_lifetime"
    )


def test_unreadable_toml_file_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("access_token_lifetime = \n")

    assert failure(TRUSTPLANE_CONFIG=str(broken)).startswith(
        f"invalid setting TRUSTPLANE_CONFIG: cannot read config file {broken}: "
    )
    assert failure(TRUSTPLANE_CONFIG=str(tmp_path / "absent.toml")).startswith(
        "invalid setting TRUSTPLANE_CONFIG: cannot read config file "
    )


def test_invalid_value_in_the_toml_file_names_the_variable(tmp_path: Path) -> None:
    config = tmp_path / "trustplane.toml"
    config.write_text("access_token_lifetime = 5000\n")

    assert failure(TRUSTPLANE_CONFIG=str(config)) == (
        "invalid setting TRUSTPLANE_ACCESS_TOKEN_LIFETIME: Input should be less than or equal to 900"
    )


HTTPS = "Value error, must use https (plain http is allowed only on a loopback host)"
NO_QUERY = "Value error, must be an absolute URL without query or fragment"
KEK_SIZE = "Value error, must be 32 bytes, base64url-encoded"
NOT_INT = "Input should be a valid integer, unable to parse string as an integer"
SHORT_KEK = base64.urlsafe_b64encode(b"k" * 31).rstrip(b"=").decode()
#: 35 bytes. A fixed value, not the session's random KEK: the test ids are the same in every process
#: (pytest-xdist workers collect the suite each and must agree on it).
LONG_KEK = base64.urlsafe_b64encode(b"k" * 35).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TRUSTPLANE_ACCESS_TOKEN_LIFETIME", "901", "Input should be less than or equal to 900"),
        ("TRUSTPLANE_ACCESS_TOKEN_LIFETIME", "5000", "Input should be less than or equal to 900"),
        ("TRUSTPLANE_ACCESS_TOKEN_LIFETIME", "29", "Input should be greater than or equal to 30"),
        ("TRUSTPLANE_ACCESS_TOKEN_LIFETIME", "five", NOT_INT),
        ("TRUSTPLANE_CLOCK_SKEW", "301", "Input should be less than or equal to 300"),
        ("TRUSTPLANE_SIGNING_ALGORITHM", "HS256", "Input should be 'ES256', 'EdDSA' or 'PS256'"),
        ("TRUSTPLANE_SIGNING_ALGORITHM", "none", "Input should be 'ES256', 'EdDSA' or 'PS256'"),
        ("TRUSTPLANE_ISSUER", "http://as.example", HTTPS),
        ("TRUSTPLANE_ISSUER", "http://10.0.0.1:8000", HTTPS),
        ("TRUSTPLANE_ISSUER", "ftp://as.example", HTTPS),
        ("TRUSTPLANE_ISSUER", "https://as.example/", "Value error, must not end with '/'"),
        ("TRUSTPLANE_ISSUER", "https://as.example/tenant/", "Value error, must not end with '/'"),
        ("TRUSTPLANE_ISSUER", "https://as.example?tenant=1", NO_QUERY),
        ("TRUSTPLANE_ISSUER", "https://as.example#x", NO_QUERY),
        ("TRUSTPLANE_ISSUER", "as.example", NO_QUERY),
        ("TRUSTPLANE_ISSUER", "https://as.example:99999", "Value error, must be an absolute URL"),
        ("TRUSTPLANE_KEY_ENCRYPTION_KEY", "not-a-key", KEK_SIZE),
        ("TRUSTPLANE_KEY_ENCRYPTION_KEY", SHORT_KEK, KEK_SIZE),
        ("TRUSTPLANE_KEY_ENCRYPTION_KEY", LONG_KEK, KEK_SIZE),
        ("TRUSTPLANE_PORT", "70000", "Input should be less than or equal to 65535"),
        (
            "TRUSTPLANE_LOG_LEVEL",
            "verbose",
            "Input should be 'debug', 'info', 'warning' or 'error'",
        ),
        ("TRUSTPLANE_CLIENT_AUTH_METHODS", "private_key_jwt", "must be a JSON array of strings"),
        (
            "TRUSTPLANE_SURVEILLANCE_ISSUANCE_FACTOR",
            "0.5",
            "Input should be greater than or equal to 1",
        ),
        (
            "TRUSTPLANE_SURVEILLANCE_ISSUANCE_FLOOR",
            "0",
            "Input should be greater than or equal to 1",
        ),
        (
            "TRUSTPLANE_SURVEILLANCE_CLAIM_FAILURE_WINDOW",
            "5",
            "Input should be greater than or equal to 10",
        ),
        (
            "TRUSTPLANE_SURVEILLANCE_CLAIM_FAILURE_REASONS",
            "[]",
            "Tuple should have at least 1 item after validation, not 0",
        ),
        (
            "TRUSTPLANE_CLIENT_AUTH_METHODS",
            '["none"]',
            "Input should be 'private_key_jwt', 'client_secret_basic', 'client_secret_post', "
            "'tls_client_auth' or 'self_signed_tls_client_auth'",
        ),
    ],
)
def test_wrong_settings_are_one_line_naming_the_variable(
    variable: str, value: str, expected: str
) -> None:
    assert failure(**{variable: value}) == f"invalid setting {variable}: {expected}"


def test_a_public_bind_address_needs_an_explicit_https_issuer() -> None:
    """The derived default issuer (http://0.0.0.0:8000) is not acceptable: say which setting to set."""
    assert failure(TRUSTPLANE_HOST="0.0.0.0") == f"invalid setting TRUSTPLANE_ISSUER: {HTTPS}"
    assert load_settings(host="0.0.0.0", issuer="https://as.example").host == "0.0.0.0"


def test_the_kek_value_is_never_echoed() -> None:
    secret = "c2VjcmV0LWJ1dC13cm9uZy1sZW5ndGg"

    assert secret not in failure(TRUSTPLANE_KEY_ENCRYPTION_KEY=secret)


@pytest.mark.parametrize(
    "issuer",
    [
        "https://as.example",
        "https://as.example/tenant-a",
        "https://as.example:8443",
        "http://127.0.0.1:8000",
        "http://127.0.0.2",
        "http://localhost:8000",
        "http://[::1]:8000",
    ],
)
def test_accepted_issuers(issuer: str) -> None:
    assert load_settings(issuer=issuer).issuer == issuer


@pytest.mark.parametrize("lifetime", [30, 900])
def test_lifetime_bounds_are_inclusive(lifetime: int) -> None:
    assert load_settings(access_token_lifetime=lifetime).access_token_lifetime == lifetime


def test_a_valid_kek_is_kept_secret() -> None:
    settings = load_settings(key_encryption_key=KEK)

    assert settings.key_encryption_key is not None
    assert settings.key_encryption_key.get_secret_value() == KEK
    assert KEK not in repr(settings)


def test_settings_are_frozen() -> None:
    settings = load_settings()

    with pytest.raises(ValueError, match=r"frozen"):
        settings.clock_skew = 1  # type: ignore[misc]
    assert isinstance(settings, Settings)


# --------------------------------------------------------------------------- command line


def run_cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRUSTPLANE_")}
    environment.update(
        COLUMNS="40",  # a narrow terminal must not wrap the error line
        TRUSTPLANE_DATA_DIR=str(tmp_path / "data"),
        **env,
    )
    return subprocess.run(
        [TRUSTPLANE, *args],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_refuses_a_lifetime_above_the_maximum(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "keys", "list", TRUSTPLANE_ACCESS_TOKEN_LIFETIME="5000")

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "trustplane: invalid setting TRUSTPLANE_ACCESS_TOKEN_LIFETIME: "
        "Input should be less than or equal to 900"
    ]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()  # nothing was created


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"TRUSTPLANE_CLIENT_AUTH_METHODS": "private_key_jwt"},
            "trustplane: invalid setting TRUSTPLANE_CLIENT_AUTH_METHODS: "
            "must be a JSON array of strings",
        ),
        (
            {"TRUSTPLANE_CONFIG": "[cfg]/trustplane.toml"},
            "trustplane: invalid setting TRUSTPLANE_CONFIG: config file [cfg]/trustplane.toml: "
            "unknown setting(s) lifetime",
        ),
    ],
)
def test_cli_other_setting_errors_are_one_line(
    tmp_path: Path, env: dict[str, str], line: str
) -> None:
    (tmp_path / "[cfg]").mkdir()
    (tmp_path / "[cfg]" / "trustplane.toml").write_text("lifetime = 1\n")

    result = run_cli(tmp_path, "keys", "list", **env)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [line]
    assert result.stdout == ""
