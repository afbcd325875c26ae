"""What every ``trustplane`` command shares: settings, the deployment, the services, output, errors.

Every command reads the same settings as the server. A wrong setting, or a deployment that cannot be
found or opened, ends the command with one line on stderr naming the setting (or the option) and
exit code 2. Command modules import this module only (never the package), so the package can import
every command module without a circle.

How a command finds its deployment (README "How the CLI finds its deployment"): ``--data-dir`` or
``TRUSTPLANE_DATA_DIR`` (default ``.trustplane`` in the current directory) holds the SQLite file and
the key-encryption key file, unless ``TRUSTPLANE_DATABASE_URL`` names the database. Only ``migrate``
and ``serve`` create a deployment; every other command opens an existing one and creates nothing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from trustplane.startup import quiet_gc

if TYPE_CHECKING:
    from trustplane.protocol.scopes import Vocabulary
    from trustplane.services import Services
    from trustplane.settings import Settings, SettingsError
    from trustplane.storage.db import Database

T = TypeVar("T")
out = Console(soft_wrap=True)  # banner lines stay whole in logs and narrow terminals
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the terminal width
JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]

#: Settings given as options to the whole command line (``trustplane --data-dir X ...``); the root
#: callback sets them for each invocation.
global_options: dict[str, object] = {}


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit (2: settings or usage, 1: the operation was refused)."""
    err.print(f"[red]trustplane:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
    """The root command group: a :class:`SettingsError` raised by anything a command calls (loading
    settings, opening the deployment, starting the server) is one line and exit code 2, never a
    traceback."""

    def invoke(self, ctx: typer.Context) -> object:  # type: ignore[override]  # typer vendors click
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # the settings module is imported by the commands that read settings (``--help`` and
            # the commands that need none do not pay for pydantic-settings): if it is not loaded,
            # nothing raised a SettingsError
            settings = sys.modules.get("trustplane.settings")
            if settings is not None and isinstance(exc, settings.SettingsError):
                fail(str(exc))
            raise


def _settings(**overrides: object) -> Settings:
    """The deployment's settings; ``overrides`` (command-line options, ``None`` = not given) win.
    A wrong option is reported as the option (``--port``), not as its variable."""
    with quiet_gc():
        from trustplane.settings import SettingsError, load_settings

    given = {k: v for k, v in {**global_options, **overrides}.items() if v is not None}
    try:
        return load_settings(**given)
    except SettingsError as exc:
        if exc.setting is not None and exc.setting in given:
            reason = str(exc).partition(": ")[2]
            fail(f"invalid option --{exc.setting.replace('_', '-')}: {reason}")
        fail(str(exc))


def _run(coro: Coroutine[object, object, T]) -> T:
    import asyncio

    from trustplane.settings import SettingsError

    try:
        return asyncio.run(coro)
    except SettingsError as exc:
        fail(str(exc))


def database_setting(settings: Settings) -> str:
    """The setting that says where the database is."""
    return "TRUSTPLANE_DATABASE_URL" if settings.database_url else "TRUSTPLANE_DATA_DIR"


async def open_database(settings: Settings, *, create: bool) -> Database:
    """The deployment's database, checked before use: a SQLite file that exists (``create=False``:
    nothing is created, not even its directory) or can be made (``create=True``: ``migrate`` and
    ``serve``), or a PostgreSQL server that answers within a few seconds."""
    with quiet_gc():
        from trustplane.settings import SettingsError
        from trustplane.storage.db import (
            Database,
            DatabaseMissing,
            DatabaseUnavailable,
            check_sqlite_file,
            sqlite_path,
        )

    setting = database_setting(settings)
    path = sqlite_path(settings.effective_database_url)
    try:
        if path is not None:
            check_sqlite_file(path, create=create)
            if not create:
                _check_kek_file(settings)
        db = Database(settings.effective_database_url)
    except DatabaseMissing as exc:
        raise SettingsError(f"{exc} ({setting}): {_where_hint(settings)}", setting) from None
    except DatabaseUnavailable as exc:
        raise SettingsError(f"invalid setting {setting}: {exc}: {_fix_hint(setting)}") from None
    try:
        await db.probe()
    except DatabaseUnavailable as exc:
        await db.dispose()
        raise SettingsError(f"invalid setting {setting}: {exc}: {_fix_hint(setting)}") from None
    return db


def _where_hint(settings: Settings) -> str:
    if settings.database_url:
        return "set TRUSTPLANE_DATABASE_URL to the deployment's database"
    found = _default_data_dir_above(settings)
    there = f" (there is one at {found}: --data-dir {found})" if found else ""
    return (
        "run the command where the deployment's .trustplane directory is, or point "
        f"--data-dir / TRUSTPLANE_DATA_DIR (or TRUSTPLANE_DATABASE_URL) at it{there}; "
        "`trustplane migrate` would create a new, empty deployment instead"
    )


def _default_data_dir_above(settings: Settings) -> Path | None:
    """With the default (relative) data directory, a deployment in a folder above the current one:
    named in the hint, never used without being asked."""
    default = Path(".trustplane")
    if settings.data_dir != default:
        return None
    for folder in Path.cwd().parents:
        if (folder / default / "trustplane.db").is_file():
            return folder / default
    return None


def _fix_hint(setting: str) -> str:
    if setting == "TRUSTPLANE_DATA_DIR":
        return "point --data-dir / TRUSTPLANE_DATA_DIR at a writable directory"
    return "check TRUSTPLANE_DATABASE_URL and that the database server is running"


def _check_kek_file(settings: Settings) -> None:
    """An existing embedded deployment keeps its key-encryption key beside the database: without
    the file, a command would make a new key that decrypts nothing."""
    from trustplane.keys.crypto import KEK_FILE
    from trustplane.settings import SettingsError

    kek = (settings.data_dir / KEK_FILE).absolute()
    if settings.key_encryption_key is None and settings.is_embedded and not kek.is_file():
        raise SettingsError(
            f"no key-encryption key at {kek} (TRUSTPLANE_DATA_DIR): restore the file, or set "
            "TRUSTPLANE_KEY_ENCRYPTION_KEY to the key the deployment was created with",
            "key_encryption_key",
        )


def build_services(settings: Settings, db: Database) -> Services:
    """``Services.build`` with a configuration file's error named by its setting."""
    with quiet_gc():
        from trustplane.protocol.scopes import VocabularyError
        from trustplane.services import Services

    try:
        return Services.build(settings, db)
    except VocabularyError as exc:
        raise _scopes_error(settings, exc) from None


def vocabulary(settings: Settings) -> Vocabulary:
    """The deployment's scope vocabulary (``TRUSTPLANE_SCOPES_FILE``) with trustplane's own APIs."""
    from trustplane.protocol.scopes import VocabularyError, load_vocabulary, with_internal_apis

    try:
        return with_internal_apis(load_vocabulary(settings.scopes_file), settings.issuer)
    except VocabularyError as exc:
        raise _scopes_error(settings, exc) from None


def _scopes_error(settings: Settings, exc: Exception) -> SettingsError:
    from trustplane.settings import SettingsError

    where = f"{settings.scopes_file}: " if str(settings.scopes_file) not in str(exc) else ""
    return SettingsError(f"invalid setting TRUSTPLANE_SCOPES_FILE: {where}{exc}", "scopes_file")


async def check_schema(settings: Settings, db: Database) -> None:
    """Commands other than ``migrate`` need the current schema; say which database is behind."""
    with quiet_gc():
        from trustplane.storage.db import describe
        from trustplane.storage.migrate import pending

    if await pending(db):
        fail(
            f"the database schema of {describe(db.url)} is not up to date "
            f"({database_setting(settings)}): run `trustplane migrate` with the same settings"
        )


async def _with_services(settings: Settings, fn: Callable[[Services], Awaitable[T]]) -> T:
    """Open the existing deployment (creating nothing), build the services, run ``fn``, dispose."""
    db = await open_database(settings, create=False)
    try:
        await check_schema(settings, db)
        return await fn(build_services(settings, db))
    finally:
        await db.dispose()


def _emit_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ts)) if ts else "-"
