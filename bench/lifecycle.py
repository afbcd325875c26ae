#!/usr/bin/env python3
"""Complete trade lifecycles through every service on one machine (issue 14's benchmark).

Everything is real and on loopback: two ``trustplane serve`` processes of one deployment (one
database, one issuer): the authorization server (token endpoint: exchange and client credentials;
RFC 7662 introspection) and the AuthZEN PDP; the reference services as three uvicorn processes
(``bench/lifecycle_app.py``: ``build_app`` around the PEP SDK), execution
(``https://execution.example/api``), allocation and settlement (``https://clearing.example/api``),
each accepting only tokens for its own audience, each service with its own store (docs/settlement.md,
"Stores": each process hands its owner's events to the other stores before it answers); the outbox
publishers to NATS JetStream (one per owner, in one process). PostgreSQL holds the deployment's
database and the four stores (five fresh databases, dropped at the end).

One lifecycle, from a subject token that rests on a mandate (alice's, as the code grant issues it;
minted with the deployment's key before the timed part, one per lifecycle, each with its own
``txn``): three token exchanges (RFC 8693, one per service audience, the mandate re-checked and the
exchange decided at each) and the approver's client-credentials token, concurrently; then
``POST /orders`` -> execute -> allocation proposed -> approved by the approver (four eyes) ->
settlement submitted (introspection of the mandate at event time) -> settled. Every service call
carries a fresh ``Idempotency-Key``, is authorized by the PDP over AuthZEN and is a transition with a
signed event in the outbox.

Reported per concurrency: complete lifecycles/s, lifecycle p50/p99, p50/p99 of each step (settlement
submit is the idempotent write on PostgreSQL), the CPU milliseconds per lifecycle of each process
(from /proc: the authorization server, the PDP, each service, the publisher, the PostgreSQL backends
of our five databases, this driver), commit -> JetStream ack p50/p99. Then, on three other
deployments linked by token exchange and SSF push (``tests/e2e/ssf_chain.py``, as
``tests/e2e/test_ssf.py``): revocation at A -> the derived token inactive at B and at C, p50/p99.
The load average is printed with every result: the machine may be shared.

The driver (this process) is the load generator and runs on the same cores as everything it
measures, so its CPU is taken from the servers: the timed part does nothing per request but send it
and read the answer. Each lifecycle's four token requests (form bodies with their signed client
assertions) and six Idempotency-Keys are made before the timed part (``Driver.prepare``), the steps'
JSON bodies once; the requests go as prepared bytes on pooled keep-alive HTTP/1.1 connections
(``bench/_http1.py``, a small client on asyncio protocols: no TLS, redirects or retries, nothing
parsed but the status line, the length and the body), on uvloop when installed; an answer's JSON is
parsed only where the lifecycle needs a value (orjson). httpx, which this driver used before, spent
about 10 times the CPU per request (its models, pool and anyio layers): the peer benchmark drives its
servers with wrk for the same reason. The setup still uses httpx (a few untimed calls).

  python bench/lifecycle.py                          # concurrency 1, 4, 16; 200 lifecycles each
  python bench/lifecycle.py --lifecycles 5 --quick   # the smoke run (tests/e2e/test_bench_lifecycle.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx  # the setup's few calls; the timed part uses _http1
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' live servers, SSF chain
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, token_endpoint, lifecycle_app
from _common import free_port, wait_ready
from _http1 import Answer, HttpError, Pool, origin_of, post
from _pgcount import CountingProxy
from token_endpoint import TICK, _create_pg_database, process_tree_ticks

from tests.conftest import EXECUTION, KEK, LEI, ClientKit, run_sync, wait_until
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    LiveServer,
    _die_with_parent,
    client_credentials_token,
    knows_client,
    register_client,
    running_servers,
)
from tests.e2e.ssf_chain import EXCHANGE, operator_client, percentile, start_chain
from tests.mandates.conftest import GRANTOR, TRADE

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ALLOCATION, CLEARING = "https://allocation.example/api", "https://clearing.example/api"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
#: The service processes: name -> the audience its PEP accepts.
SERVICES = {"execution": EXECUTION, "allocation": ALLOCATION, "settlement": CLEARING}
#: The desk's tokens: one exchange per service, narrowed to that service's scopes.
DESK = {
    "execution": "order:create trade:execute",
    "allocation": "allocation:propose",
    "settlement": "settlement:submit settlement:confirm",
}
#: Seconds a pooled connection may sit idle before the driver closes it instead of reusing it:
#: below the servers' keep-alive (``trustplane serve``: uvicorn's 5 s), or the driver races the
#: server's close with its next request on that connection and gets ``ReadError`` (a reset; at
#: concurrency 16 a lifecycle lasts ~5 s, so the connections of its token calls sit idle ~5 s).
CLIENT_IDLE = 2.0
STEPS = (
    "exchange_execution", "exchange_allocation", "exchange_settlement", "approver_token",
    "create", "execute", "propose", "approve", "submit", "confirm",
)  # fmt: skip
ORDER = {"account": "ACC-1", "instrument": "US0378331005", "side": "buy", "quantity": "1000",
         "amount": "1000000", "currency": "EUR"}  # fmt: skip
#: The steps' JSON bodies, serialised once.
ORDER_BODY = orjson.dumps(ORDER)
ALLOCATIONS_BODY = orjson.dumps({"allocations": [{"account": "SUB-1", "quantity": "1000"}]})
INSTRUCTIONS_BODY = orjson.dumps({"instructions": {"ssi": "DAKVDEFF", "method": "dvp"}})
SETTLED_BODY = orjson.dumps({"outcome": "settled"})
#: Seconds a prepared lifecycle's client assertions are valid (the server accepts at most 300).
ASSERTION_LIFETIME = 240


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ms_stats(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    return {
        "n": len(seconds),
        "p50_ms": round(1000 * statistics.median(seconds), 1),
        "p99_ms": round(1000 * percentile(seconds, 0.99), 1),
        "max_ms": round(1000 * max(seconds), 1),
    }


# --------------------------------------------------------------------------- the deployment


@dataclass
class Deployment:
    auth: LiveServer  # token endpoint, introspection
    pdp: LiveServer  # AuthZEN
    desk: ClientKit
    approver: ClientKit
    mandate: dict[str, Any]
    services: dict[str, str] = field(default_factory=dict)  # name -> base URL
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid


def setup_clients(a: LiveServer, pdp: LiveServer, work: Path) -> dict[str, Any]:
    """The desk (the mandate's grantee, exchanges its subject tokens), the approver, the services'
    PDP and introspection clients, and the mandate (created through the management API)."""
    api = a.issuer + "/mandates"
    admin = register_client(
        a, scopes=("mandate:view", "mandate:administer"), resources=(api,),
        introspection_resources=(),
    )  # fmt: skip
    scopes = [s for group in DESK.values() for s in group.split()]
    desk = operator_client(
        a, "desk", *(x for s in scopes for x in ("--scope", s)),
        *(x for r in SERVICES.values() for x in ("--resource", r)),
        "--authorization-details-type", "trade_instruction", "--grant-type", EXCHANGE,
    )  # fmt: skip
    approver = operator_client(
        a, "approver", "--scope", "allocation:approve", "--resource", ALLOCATION,
        "--grant-type", "client_credentials",
    )  # fmt: skip
    pdp_client = register_client(
        a, pdp, scopes=("decision:evaluate",), resources=(f"{a.issuer}/access/v1",),
        introspection_resources=(),
    )  # fmt: skip
    introspection = register_client(
        a, scopes=("order:create",), resources=(EXECUTION,), introspection_resources=(CLEARING,)
    )
    for kit in (desk, approver):
        wait_until(lambda kit=kit: knows_client(a, kit), PROPAGATION_TIMEOUT, kit.client_id)
    token = client_credentials_token(a, admin, "mandate:view mandate:administer", api)
    created = httpx.post(
        api,
        json={"grantor_lei": GRANTOR, "grantor_person": "alice", "grantee_client_id": desk.client_id,
              "scopes": scopes, "authorization_details": [TRADE], "accepted_by": "alice"},
        headers={"Authorization": f"Bearer {token}"}, timeout=10,
    )  # fmt: skip
    if created.status_code != 201:
        raise SystemExit(f"the mandate was not created: {created.status_code} {created.text}")
    (work / "clients.json").write_text(
        json.dumps({name: {"client_id": kit.client_id, "kid": kit.kid, "pem": kit.pem.decode()}
                    for name, kit in (("pdp", pdp_client), ("introspection", introspection))})
    )  # fmt: skip
    return {"desk": desk, "approver": approver, "mandate": created.json()}


def subject_tokens(a: LiveServer, desk: ClientKit, mandate: dict[str, Any], n: int) -> list[str]:
    """``n`` tokens as the code grant issues them (the deployment's key, alice, the mandate), each
    with its own ``txn``: the transaction of one lifecycle."""
    from trustplane.app import Services
    from trustplane.protocol.tokens import issue_access_token
    from trustplane.settings import Settings

    async def mint() -> list[str]:
        settings = Settings(
            database_url=a.env["TRUSTPLANE_DATABASE_URL"], key_encryption_key=KEK,
            data_dir=Path(a.env["TRUSTPLANE_DATA_DIR"]), issuer=a.issuer,
        )  # fmt: skip
        svc = Services.build(settings)
        try:
            ring = await svc.keys.load()
            ref = {"id": mandate["id"], "version": mandate.get("version", 1)}
            return [
                issue_access_token(
                    ring, issuer=a.issuer, subject="alice", client_id=desk.client_id,
                    audience=EXECUTION, scopes=tuple(" ".join(DESK.values()).split()),
                    lifetime=3600, extra={"lei": LEI, "mandate": ref, "txn": f"txn-lc-{uuid.uuid4()}",
                                          "authorization_details": [TRADE]},
                ).token
                for _ in range(n)
            ]  # fmt: skip
        finally:
            await svc.db.dispose()

    tokens: list[str] = run_sync(mint())
    return tokens


def store_env(ref_urls: dict[str, str], key_file: Path) -> dict[str, str]:
    return {
        **{f"LC_DATABASE_URL_{s.upper()}": url for s, url in ref_urls.items()},
        "LC_EVENT_KEY": str(key_file),
    }


async def create_schemas(ref_urls: dict[str, str], key_file: Path) -> None:
    """Each service's store (and its Idempotency-Key table), its event key made once here."""
    from trustplane.reference import serve

    os.environ.update(store_env(ref_urls, key_file))
    from lifecycle_app import store_settings

    stores = serve.open_stores(store_settings())
    await serve.create_schemas(stores)
    await serve.dispose(stores)


def launch(
    name: str, command: list[str], env: dict[str, str], work: Path
) -> subprocess.Popen[bytes]:
    log = (work / f"{name}.log").open("wb")
    return subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
        preexec_fn=_die_with_parent,
    )  # fmt: skip


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


@contextmanager
def services(
    deployment: Deployment, ref_urls: dict[str, str], nats: dict[str, str], work: Path
) -> Iterator[None]:
    """The three service processes and (``nats`` given) the publisher, stopped on exit."""
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "LC_ISSUER": deployment.auth.issuer,
        "LC_PDP": deployment.pdp.base_url,
        **store_env(ref_urls, work / "events.pem"),
        "LC_CLIENTS": str(work / "clients.json"),
    }
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, audience in SERVICES.items():
            port = free_port()
            command = [str(BIN / "uvicorn"), "--factory", "lifecycle_app:app_from_env"]
            command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
            command += ["--timeout-keep-alive", "60"]  # no stale connection between phases
            env = {**base, "LC_AUDIENCE": audience, "LC_SERVICE": name}
            processes.append(launch(name, command, env, work))
            deployment.pids[name] = processes[-1].pid
            deployment.services[name] = f"http://127.0.0.1:{port}"
        if nats:
            command = [sys.executable, str(HERE / "lifecycle_app.py"), "publish"]
            processes.append(launch("publisher", command, {**base, **nats}, work))
            deployment.pids["publisher"] = processes[-1].pid
        for url in deployment.services.values():
            wait_ready(f"{url}/healthz", timeout=180)  # a loaded machine imports slowly
        yield
    finally:
        for process in processes:
            stop(process)


# --------------------------------------------------------------------------- one lifecycle


class StepFailed(Exception):
    def __init__(self, step: str, answer: Answer) -> None:
        super().__init__(f"{step}: {answer.status} {answer.text[:300]}")
        self.step = step


class StepError(Exception):
    """A step's request got no answer (the connection failed, was closed, timed out): which step,
    which request to which server, and the error's chain."""

    def __init__(
        self, step: str, origin: tuple[str, int], request: bytes, error: Exception
    ) -> None:
        chain: list[str] = []
        cause: BaseException | None = error
        while cause is not None and len(chain) < 6:  # HttpError <- OSError
            chain.append(f"{type(cause).__name__}: {cause}".rstrip(": "))
            cause = cause.__cause__ or cause.__context__
        line = request[: request.find(b" HTTP/1.1")].decode("latin-1")
        super().__init__(f"{step}: {line} at http://{origin[0]}:{origin[1]}: {' <- '.join(chain)}")
        self.step = step


@dataclass
class Prepared:
    """One lifecycle's work done before the timed part: its four token requests (form bodies with
    their signed client assertions) and its six Idempotency-Keys. ``made``: when the assertions were
    signed (they expire; :meth:`Driver.lifecycle` signs again if they are close to it)."""

    subject: str
    tokens: list[tuple[str, bytes]]  # (step, the complete request)
    keys: list[str]
    made: float


@dataclass
class Driver:
    """The load generator: each request is prepared bytes on a pooled keep-alive connection
    (``_http1``), the answer's body parsed with orjson only where the lifecycle needs a value."""

    deployment: Deployment
    http: Pool
    steps: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})

    def __post_init__(self) -> None:
        self.auth, self.auth_host, _ = origin_of(self.deployment.auth.base_url)
        self.origins = {name: origin_of(url)[:2] for name, url in self.deployment.services.items()}

    def prepare(self, subject: str) -> Prepared:
        """The lifecycle's token requests and keys (outside the timed part)."""
        d = self.deployment
        exp = {"exp": int(time.time()) + ASSERTION_LIFETIME}
        requests = []
        for name in SERVICES:
            form = {"grant_type": EXCHANGE, "subject_token": subject, "subject_token_type": ACCESS,
                    "resource": SERVICES[name], "scope": DESK[name], **d.desk.auth(**exp)}  # fmt: skip
            requests.append((f"exchange_{name}", self._form(form)))
        approver = {"grant_type": "client_credentials", "scope": "allocation:approve",
                    "resource": ALLOCATION, **d.approver.auth(**exp)}  # fmt: skip
        requests.append(("approver_token", self._form(approver)))
        keys = [f'"{uuid.uuid4()}"' for _ in range(6)]
        return Prepared(subject, requests, keys, time.monotonic())

    def _form(self, form: dict[str, str]) -> bytes:
        body = urlencode(form).encode()
        return post(self.auth_host, "/token", "", body, "application/x-www-form-urlencoded")

    async def _call(
        self, step: str, origin: tuple[str, int], request: bytes, expect: int
    ) -> dict[str, Any]:
        started = time.monotonic()
        try:
            answer = await self.http.request(origin, request)
        except HttpError as exc:
            raise StepError(step, origin, request, exc) from exc
        self.steps[step].append(time.monotonic() - started)
        if answer.status != expect:
            raise StepFailed(step, answer)
        body: dict[str, Any] = orjson.loads(answer.body)
        return body

    async def _token(self, step: str, request: bytes) -> str:
        return str((await self._call(step, self.auth, request, 200))["access_token"])

    async def tokens(self, prepared: Prepared) -> dict[str, str]:
        got = await asyncio.gather(*(self._token(step, req) for step, req in prepared.tokens))
        return dict(zip([*SERVICES, "approver"], got, strict=True))

    def request(self, service: str, path: str, token: str, key: str, body: bytes = b"") -> bytes:
        host = self.origins[service][1]
        headers = f"Authorization: Bearer {token}\r\nIdempotency-Key: {key}\r\n"
        if not body:
            head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Content-Length: 0\r\n\r\n"
            return head.encode("latin-1")
        return post(host, path, headers, body, "application/json")

    async def _post(
        self, step: str, service: str, path: str, token: str, key: str, body: bytes = b""
    ) -> dict[str, Any]:
        request = self.request(service, path, token, key, body)
        return await self._call(
            step, self.origins[service][0], request, 201 if step == "create" else 200
        )

    async def lifecycle(self, prepared: Prepared) -> str:
        """One complete lifecycle; the trade id."""
        if time.monotonic() - prepared.made > ASSERTION_LIFETIME - 60:  # a long phase: re-sign
            prepared = self.prepare(prepared.subject)
        t = await self.tokens(prepared)
        k = prepared.keys
        trade = await self._post("create", "execution", "/orders", t["execution"], k[0], ORDER_BODY)
        path = f"/trades/{trade['trade_id']}"
        await self._post("execute", "execution", f"{path}/execute", t["execution"], k[1])
        await self._post("propose", "allocation", f"{path}/allocation", t["allocation"], k[2],
                         ALLOCATIONS_BODY)  # fmt: skip
        await self._post("approve", "allocation", f"{path}/allocation/approve", t["approver"], k[3])
        await self._post("submit", "settlement", f"{path}/settlement", t["settlement"], k[4],
                         INSTRUCTIONS_BODY)  # fmt: skip
        done = await self._post("confirm", "settlement", f"{path}/settlement/confirm",
                                t["settlement"], k[5], SETTLED_BODY)  # fmt: skip
        if done["to"] != "settled":
            raise RuntimeError(f"trade {trade['trade_id']} ended {done}")
        return str(trade["trade_id"])


async def check_replay(driver: Driver, subject: str) -> None:
    """The idempotency keys are real: a submit re-sent with its key is replayed, not re-run."""
    prepared = driver.prepare(subject)
    t = await driver.tokens(prepared)
    trade = await driver._post("create", "execution", "/orders", t["execution"], prepared.keys[0],
                               ORDER_BODY)  # fmt: skip
    path = f"/trades/{trade['trade_id']}/execute"
    request = driver.request("execution", path, t["execution"], '"replay-check"')
    origin = driver.origins["execution"][0]
    first = await driver.http.request(origin, request)
    again = await driver.http.request(origin, request)
    if (first.status, again.status) != (200, 200) or again.header("idempotency-replayed") != "true":
        raise SystemExit(f"idempotency replay check failed: {first.text} / {again.text}")


# --------------------------------------------------------------------------- measuring


async def pg_backend_ticks(conn: Any, databases: list[str]) -> dict[int, int]:
    """CPU ticks of the PostgreSQL backends serving ``databases`` (other databases' are not ours)."""
    rows = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[]) AND pid <> "
        "pg_backend_pid()",
        databases,
    )
    return {pid: ticks for pid in (row["pid"] for row in rows) if (ticks := _ticks(pid)) >= 0}


def _ticks(pid: int) -> int:
    """utime + stime of one process, -1 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])


@dataclass
class Meter:
    """CPU of every process of the deployment over a phase."""

    pids: dict[str, int]
    admin_url: str
    databases: list[str]
    #: One connection for the whole run, opened at the first snapshot: on a machine where other
    #: benches fill PostgreSQL's ``max_connections``, a connection per snapshot may be refused.
    conn: Any = None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def snapshot(self) -> dict[str, Any]:
        return {
            "procs": {name: process_tree_ticks(pid) for name, pid in self.pids.items()},
            "pg": await pg_backend_ticks(await self._conn(), self.databases),
            "driver": time.process_time(),
        }

    async def _conn(self) -> Any:
        if self.conn is None:
            import asyncpg

            self.conn = await asyncpg.connect(self.admin_url.replace("+asyncpg", ""))
        return self.conn

    @staticmethod
    def per_lifecycle(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, float]:
        cpu = {
            name: (after["procs"][name] - ticks) / TICK for name, ticks in before["procs"].items()
        }
        cpu["postgres"] = sum(t - before["pg"].get(pid, 0) for pid, t in after["pg"].items()) / TICK
        cpu["driver"] = after["driver"] - before["driver"]
        cpu["total"] = sum(cpu.values())
        return {name: round(1000 * seconds / max(n, 1), 2) for name, seconds in cpu.items()}


#: Seconds an idle PostgreSQL 15 backend may keep its statistics before it reports them (its
#: ``PGSTAT_IDLE_INTERVAL``, 10 s): ``--count-pg`` waits this long before each snapshot.
PGSTAT_FLUSH = 11.0


def through_proxy(url: str) -> tuple[str, CountingProxy]:
    """``url`` pointed at a new counting proxy in front of its server (bench/_pgcount.py)."""
    parts = urlsplit(url)
    proxy = CountingProxy(parts.hostname or "127.0.0.1", parts.port or 5432, free_port()).start()
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.listen_port}")), proxy


async def pg_counts(
    conn: Any, proxies: dict[str, tuple[str, CountingProxy]], tables: Any
) -> dict[str, Any]:
    """Per database (by its label): the proxy's counts, and PostgreSQL's committed transactions and
    rows written (``pg_stat_database``; read after ``PGSTAT_FLUSH``); ``tables``: a connection to
    the deployment's database, whose rows written are also counted per table."""
    await asyncio.sleep(PGSTAT_FLUSH)
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        "SELECT datname, xact_commit, tup_inserted + tup_updated + tup_deleted AS written "
        "FROM pg_stat_database WHERE datname = ANY($1::text[])",
        [name for name, _ in proxies.values()],
    )
    stats = {row["datname"]: (row["xact_commit"], row["written"]) for row in rows}
    found: dict[str, Any] = {
        label: {**proxy.snapshot(), "commits": stats[name][0], "rows_written": stats[name][1]}
        for label, (name, proxy) in proxies.items()
    }
    written = await tables.fetch(
        "SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS written FROM pg_stat_user_tables"
    )
    found["tables"] = {row["relname"]: row["written"] for row in written}
    return found


def pg_per_lifecycle(before: dict[str, Any], after: dict[str, Any], n: int) -> dict[str, Any]:
    keys = ("round_trips", "execute", "query", "commits", "rows_written")
    n = max(n, 1)
    found: dict[str, Any] = {
        label: {k: round((after[label][k] - counts[k]) / n, 1) for k in keys}
        for label, counts in before.items()
        if label != "tables"
    }
    found["total"] = {k: round(sum(v[k] for v in found.values()), 1) for k in keys}
    tables = {
        name: round((rows - before["tables"].get(name, 0)) / n, 1)
        for name, rows in after["tables"].items()
    }
    found["deployment_tables"] = {k: v for k, v in sorted(tables.items()) if v}
    return found


#: What ``--pg-statements`` reads per statement (pg_stat_statements 1.10, PostgreSQL 15).
STATEMENT_COLUMNS = (
    "calls", "total_exec_time", "rows", "shared_blks_hit", "shared_blks_read",
    "shared_blks_dirtied", "shared_blks_written", "wal_records", "wal_fpi", "wal_bytes", "plans",
    "total_plan_time",
)  # fmt: skip


async def pg_statements_reset(conn: Any) -> str:
    """Before a phase (``--pg-statements``): a checkpoint (so that every phase starts with the same
    full-page images to write: the first change of each page after it), pg_stat_statements emptied;
    the WAL position (the server is the bench's own: all of its WAL is ours)."""
    await conn.execute("CHECKPOINT")
    await conn.execute("SELECT pg_stat_statements_reset()")
    return str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))


async def pg_statements(
    conn: Any, admin_url: str, databases: list[str], wal_before: str, n: int
) -> dict[str, Any]:
    """After a phase: every statement of our databases per lifecycle (pg_stat_statements, the
    top-level ones and, apart, those run inside the stores' functions), the totals per database
    (top level only: a function's call includes what its statements did), and the WAL written
    over the whole server (commit records included, which no statement is charged with), from and
    to which position, and that WAL by record type and relation (:func:`wal_records`)."""
    wal_after = str(await conn.fetchval("SELECT pg_current_wal_lsn()::text"))
    diff = "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)"
    wal = float(await conn.fetchval(diff, wal_after, wal_before))
    labels = {databases[0]: "deployment", **{d: d.rsplit("_", 1)[1] for d in databases[1:]}}
    columns = ", ".join(f"s.{c}" for c in STATEMENT_COLUMNS)
    sql = f"SELECT d.datname, s.toplevel, s.query, {columns} FROM pg_stat_statements s "  # noqa: S608 - constants
    sql += "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = ANY($1::text[])"
    rows = await conn.fetch(sql, databases)
    n = max(n, 1)
    statements = []
    for row in rows:
        found = {c: float(row[c]) / n for c in STATEMENT_COLUMNS}
        found["mean_exec_ms"] = float(row["total_exec_time"]) / max(row["calls"], 1)
        query = " ".join(row["query"].split())
        statements.append({"db": labels[row["datname"]], "toplevel": row["toplevel"],
                           "query": query, **found})  # fmt: skip
    statements.sort(key=lambda s: -s["total_exec_time"])
    totals: dict[str, dict[str, float]] = {}
    for s in statements:
        if s["toplevel"]:
            for key in (s["db"], "all"):
                t = totals.setdefault(key, dict.fromkeys(STATEMENT_COLUMNS, 0.0))
                for c in STATEMENT_COLUMNS:
                    t[c] += s[c]
    return {"wal_bytes_per_lifecycle": wal / n, "wal": [wal_before, wal_after], "lifecycles": n,
            "totals": totals, "statements": statements,
            "wal_records": await wal_records(conn, admin_url, wal_before, wal_after, n)}  # fmt: skip


async def wal_records(
    conn: Any, admin_url: str, start: str, end: str, n: int
) -> list[dict[str, Any]]:
    """The WAL between ``start`` and ``end`` per lifecycle, by record type and by the relation of
    its first block (pg_walinspect, when it is installed beside pg_stat_statements; [] without)."""
    import asyncpg

    if not await conn.fetchval("SELECT 1 FROM pg_extension WHERE extname = 'pg_walinspect'"):
        return []
    rows = await conn.fetch(
        "SELECT resource_manager || '/' || split_part(record_type, ' ', 1) AS kind, "
        "substring(block_ref from 'rel [0-9]+/([0-9]+)/[0-9]+') AS db, "
        "substring(block_ref from 'rel [0-9]+/[0-9]+/([0-9]+)') AS node, count(*) AS records, "
        "sum(record_length) AS bytes, sum(fpi_length) AS fpi_bytes "
        "FROM pg_get_wal_records_info($1::text::pg_lsn, $2::text::pg_lsn) GROUP BY 1, 2, 3",
        start, end,
    )  # fmt: skip
    names = {
        str(r["oid"]): r["datname"]
        for r in await conn.fetch("SELECT oid, datname FROM pg_database")
    }
    relations: dict[tuple[str, str], str] = {}
    server = admin_url.replace("+asyncpg", "").rsplit("/", 1)[0]
    for oid in {r["db"] for r in rows if r["db"] in names}:
        try:
            other = await asyncpg.connect(f"{server}/{names[oid]}")
        except (OSError, asyncpg.PostgresError):
            continue
        try:
            for r in await other.fetch("SELECT relfilenode::text AS node, relname FROM pg_class"):
                relations[(oid, r["node"])] = r["relname"]
        finally:
            await other.close()
    found = []
    for r in rows:
        relation = relations.get((r["db"], r["node"]), r["node"] or "-")
        found.append({"kind": r["kind"], "db": names.get(r["db"] or "", r["db"] or "-"),
                      "relation": relation, "records": r["records"] / n,
                      "bytes": float(r["bytes"]) / n, "fpi_bytes": float(r["fpi_bytes"]) / n})  # fmt: skip
    found.sort(key=lambda x: -(x["bytes"]))
    return found


def print_statements(found: dict[str, Any], path: Path) -> None:
    """The totals per database and the costliest statements; everything appended to ``path``."""
    print(f"    pg_stat_statements per lifecycle (WAL over the server "
          f"{found['wal_bytes_per_lifecycle']:.0f} bytes):")  # fmt: skip
    head = "calls", "exec ms", "rows", "hit", "dirtied", "WAL rec", "WAL bytes"
    keys = ("calls", "total_exec_time", "rows", "shared_blks_hit", "shared_blks_dirtied",
            "wal_records", "wal_bytes")  # fmt: skip
    print("      " + "".ljust(12) + "".join(h.rjust(10) for h in head))
    for db, t in sorted(found["totals"].items()):
        print("      " + db.ljust(12) + "".join(f"{t[k]:10.2f}" for k in keys))
    print("      the costliest statements (top level; '>' inside a function):")
    for s in found["statements"][:30]:
        mark = " " if s["toplevel"] else ">"
        print(f"      {mark}{s['db'][:10].ljust(11)}" + "".join(f"{s[k]:10.2f}" for k in keys)
              + f"  {s['query'][:110]}")  # fmt: skip
    if found["wal_records"]:
        print("      WAL per lifecycle by record type and relation (records, bytes, of which "
              "full-page images):")  # fmt: skip
        for w in found["wal_records"][:25]:
            print(f"        {w['records']:8.2f} {w['bytes']:9.0f} {w['fpi_bytes']:9.0f}  "
                  f"{w['kind']:<24} {w['db'][-10:]:<11} {w['relation']}")  # fmt: skip
    with path.open("a") as handle:
        handle.write(json.dumps(found) + "\n")


async def outbox_drained(ref_urls: dict[str, str]) -> int:
    """The rows not yet published, over the owners' outboxes."""
    from sqlalchemy import func, select

    from trustplane.reference.machine import OWNERS
    from trustplane.reference.store import outbox
    from trustplane.storage.db import Database

    left = 0
    for owner in OWNERS:
        db = Database(ref_urls[owner])
        try:
            async with db.read() as conn:
                query = (
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                )
                left += int((await conn.execute(query)).scalar_one())
        finally:
            await db.dispose()
    return left


async def ack_latencies(
    deployment: Deployment, ref_urls: dict[str, str], acks: Path
) -> list[float]:
    """Wait until the outboxes are published, then collect the publishers' latencies since last
    time."""
    deadline = time.monotonic() + 60
    while await outbox_drained(ref_urls):
        if time.monotonic() > deadline:
            raise SystemExit("the publisher did not drain the outbox in 60 s")
        await asyncio.sleep(0.2)
    seen = len(_lines(acks))
    os.kill(deployment.pids["publisher"], signal.SIGUSR1)
    for _ in range(600):  # the publisher answers at its next turn of the event loop
        if len(lines := _lines(acks)) > seen:
            latencies: list[float] = json.loads(lines[-1])
            return latencies
        await asyncio.sleep(0.05)
    raise SystemExit("the publisher did not report its ack latencies")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def idle_cpu(meter: Meter, seconds: float) -> dict[str, float]:
    """What each process spends with no request at all (its timers and polls), per second."""
    before = await meter.snapshot()
    await asyncio.sleep(seconds)
    after = await meter.snapshot()
    per_second = Meter.per_lifecycle(before, after, 1)
    per_second["total"] -= per_second.pop("driver")  # the bench itself, asleep
    return {name: round(ms / seconds, 1) for name, ms in per_second.items()}


async def phase(
    driver: Driver, meter: Meter, lifecycles: list[Prepared], concurrency: int
) -> dict[str, Any]:
    queue = list(reversed(lifecycles))
    durations: list[float] = []
    failures: dict[str, int] = {}
    for steps in driver.steps.values():
        steps.clear()

    async def worker() -> None:
        while queue:
            prepared = queue.pop()
            started = time.monotonic()
            try:
                await driver.lifecycle(prepared)
            except (StepFailed, StepError) as exc:  # counted, and the run goes on
                failures[exc.step] = failures.get(exc.step, 0) + 1
                if sum(failures.values()) <= 3:
                    print(f"    failure at {time.strftime('%H:%M:%S')}: {type(exc).__name__}: "
                          f"{exc}", flush=True)  # fmt: skip
                continue
            durations.append(time.monotonic() - started)

    load_before, before = load(), await meter.snapshot()
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - started
    after = await meter.snapshot()
    return {
        "concurrency": concurrency,
        "lifecycles": len(durations),
        "failed": failures,
        "wall_s": round(wall, 2),
        "lifecycles_per_s": round(len(durations) / wall, 1),
        "lifecycle": ms_stats(durations),
        "steps": {step: ms_stats(values) for step, values in driver.steps.items()},
        "cpu_ms_per_lifecycle": Meter.per_lifecycle(before, after, len(durations)),
        "load_avg_before": load_before,
        "load_avg_after": load(),
    }


# --------------------------------------------------------------------------- output


def print_phase(result: dict[str, Any]) -> None:
    life, steps = result["lifecycle"], result["steps"]
    print(
        f"  concurrency {result['concurrency']:>3}: {result['lifecycles']:>5} lifecycles in "
        f"{result['wall_s']:6.1f} s = {result['lifecycles_per_s']:6.1f}/s  lifecycle p50 "
        f"{_ms(life, 'p50_ms')} ms p99 {_ms(life, 'p99_ms')} ms  failed "
        f"{sum(result['failed'].values())}  load {' '.join(map(str, result['load_avg_after']))}",
        flush=True,
    )
    print("    step p50/p99 ms: " + ", ".join(
        f"{s} {_ms(v, 'p50_ms')}/{_ms(v, 'p99_ms')}" for s, v in steps.items()
    ))  # fmt: skip
    cpu = result["cpu_ms_per_lifecycle"]
    print("    CPU ms/lifecycle: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    for label, c in result.get("pg_per_lifecycle", {}).items():
        if label == "deployment_tables":
            print("    rows written per lifecycle in the deployment's database, by table: "
                  + ", ".join(f"{table} {rows:g}" for table, rows in c.items()))  # fmt: skip
            continue
        print(f"    PostgreSQL per lifecycle, {label}: {c['execute']:.1f} statements (Execute) + "
              f"{c['query']:.1f} simple queries, {c['round_trips']:.1f} round trips, "
              f"{c['commits']:.1f} commits, {c['rows_written']:.1f} rows written")  # fmt: skip
    if "jetstream_ack" in result:
        ack = result["jetstream_ack"]
        print(f"    commit -> JetStream ack over {ack['n']} events: p50 {ack.get('p50_ms')} ms, "
              f"p99 {ack.get('p99_ms')} ms")  # fmt: skip


def _ms(stats: dict[str, float], key: str) -> str:
    return f"{stats[key]:.0f}" if key in stats else "-"


def print_table(summary: dict[str, Any]) -> None:
    print("\nlifecycle bench (all processes on this machine; load average = 1/5/15 min)")
    head = f"{'conc':>4} {'life/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'submit p50/p99':>15} "
    head += f"{'ack p50/p99':>12} {'CPU ms/life':>11}  top hops (CPU ms)            load"
    print(head)
    for r in summary["phases"]:
        cpu = r["cpu_ms_per_lifecycle"]
        top = sorted((k for k in cpu if k != "total"), key=lambda k: -cpu[k])[:3]
        life, sub, ack = r["lifecycle"], r["steps"]["submit"], r.get("jetstream_ack", {})
        print(
            f"{r['concurrency']:>4} {r['lifecycles_per_s']:>7.1f} {_ms(life, 'p50_ms'):>7} "
            f"{_ms(life, 'p99_ms'):>7} {_ms(sub, 'p50_ms'):>7}/{_ms(sub, 'p99_ms'):<7} "
            f"{_ms(ack, 'p50_ms'):>5}/{_ms(ack, 'p99_ms'):<6} {cpu['total']:>11.1f}  "
            + ", ".join(f"{k} {cpu[k]:.0f}" for k in top).ljust(28)
            + f"  {' '.join(map(str, r['load_avg_after']))}"
        )
    for name, stats in summary.get("revocation", {}).items():
        if isinstance(stats, dict) and "p50_ms" in stats:
            print(f"revocation at A -> derived token inactive at {name[-1].upper()} over "
                  f"{stats['n']} rounds: p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms,"
                  f" max {stats['max_ms']:.0f} ms (load {' '.join(map(str, summary['revocation']['load_avg']))})")  # fmt: skip


# --------------------------------------------------------------------------- main


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for the driver's event loop when installed (it is with uvicorn's extras): less of the
    driver's CPU per request than asyncio's own loop; asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def drive(
    deployment: Deployment, subjects: list[str], args: argparse.Namespace, ctx: dict[str, Any]
) -> list[dict[str, Any]]:
    meter = Meter(
        {"auth": deployment.auth.process.pid, "pdp": deployment.pdp.process.pid,  # type: ignore[union-attr]
         **deployment.pids}, args.database_url, ctx["databases"],
    )  # fmt: skip
    results = []
    http = Pool(idle=CLIENT_IDLE, timeout=30)
    try:
        await meter.snapshot()  # its connection, before the phases
        if ctx["proxies"]:  # the deployment's tables (pg_stat_user_tables is per database)
            import asyncpg

            ctx["tables"] = await asyncpg.connect(ctx["deployment_url"].replace("+asyncpg", ""))
        driver = Driver(deployment, http)
        await check_replay(driver, subjects.pop())
        for _ in range(args.warmup):
            await driver.lifecycle(driver.prepare(subjects.pop()))
        ctx["idle_cpu_ms_per_s"] = await idle_cpu(meter, args.idle)
        print(f"  idle CPU ms/s over {args.idle:g} s (timers, polling; included in the per-lifecycle "
              f"figures): {ctx['idle_cpu_ms_per_s']}", flush=True)  # fmt: skip
        for concurrency in args.concurrency:
            batch, subjects[:] = subjects[: args.lifecycles], subjects[args.lifecycles :]
            prepared = [driver.prepare(subject) for subject in batch]  # before the timed part
            await asyncio.sleep(args.rest)
            proxies, tables = ctx["proxies"], ctx.get("tables")
            counts = await pg_counts(await meter._conn(), proxies, tables) if tables else None
            if args.pg_statements:
                wal_before = await pg_statements_reset(await meter._conn())
            result = await phase(driver, meter, prepared, concurrency)
            if args.pg_statements:
                result["pg_statements"] = await pg_statements(
                    await meter._conn(),
                    args.database_url,
                    ctx["databases"],
                    wal_before,
                    result["lifecycles"],
                )
            if tables and counts:
                after = await pg_counts(await meter._conn(), proxies, tables)
                result["pg_per_lifecycle"] = pg_per_lifecycle(counts, after, result["lifecycles"])
            if ctx["nats"]:
                result["jetstream_ack"] = ms_stats(
                    await ack_latencies(deployment, ctx["ref_urls"], ctx["acks"])
                )
            print_phase(result)
            if "pg_statements" in result:
                print_statements(result["pg_statements"], args.pg_statements)
            results.append(result)
    finally:
        http.close()
        await meter.close()
        if ctx.get("tables") is not None:
            await ctx["tables"].close()
    return results


async def stream_counts(nats_url: str, prefix: str, delete: bool = False) -> dict[str, int]:
    """Messages in each of our streams (``delete``: then the streams are deleted)."""
    import nats
    from nats.js.errors import NotFoundError

    from trustplane.reference.jetstream import DOMAINS, stream_name

    nc = await nats.connect(nats_url)
    counts = {}
    try:
        js = nc.jetstream()
        for domain in DOMAINS:
            name = stream_name(prefix, domain)
            try:
                counts[domain] = (await js.stream_info(name)).state.messages
                if delete:
                    await js.delete_stream(name)
            except NotFoundError:  # no event of this domain was published
                counts[domain] = 0
    finally:
        await nc.close()
    return counts


async def outbox_rows(ref_urls: dict[str, str]) -> int:
    """The events written, over the owners' outboxes (one per owned transition)."""
    from sqlalchemy import func, select

    from trustplane.reference.machine import OWNERS
    from trustplane.reference.store import outbox
    from trustplane.storage.db import Database

    rows = 0
    for owner in OWNERS:
        db = Database(ref_urls[owner])
        try:
            async with db.read() as conn:
                query = select(func.count()).select_from(outbox)
                rows += int((await conn.execute(query)).scalar_one())
        finally:
            await db.dispose()
    return rows


def _patient_servers() -> None:
    """The tests' live servers must be healthy within 45 s; on a machine shared with other jobs a
    bench gives them longer."""
    import tests.e2e.conftest as live

    live.START_TIMEOUT = max(live.START_TIMEOUT, 180.0)


def run_lifecycles(args: argparse.Namespace, work: Path, tag: str) -> dict[str, Any]:
    from trustplane.reference.machine import SERVICES as STORES
    from trustplane.storage.db import Database
    from trustplane.storage.migrate import upgrade

    prefix = f"{args.db_prefix}_{tag}"
    names = [prefix, *(f"{prefix}_{s}" for s in STORES)]
    server_url = args.database_url.rsplit("/", 1)[0]
    as_url = f"{server_url}/{names[0]}"
    ref_urls = {s: f"{server_url}/{prefix}_{s}" for s in STORES}
    nats = {} if args.no_nats else {
        "LC_NATS_URL": args.nats_url, "LC_NATS_PREFIX": prefix,
        "LC_ACKS_FILE": str(work / "acks.jsonl"),
    }  # fmt: skip
    with ExitStack() as cleanup:
        for name in names:
            asyncio.run(_create_pg_database(args.database_url, name))
            cleanup.callback(
                lambda name=name: asyncio.run(_create_pg_database(args.database_url, name, True))
            )

        async def migrate() -> None:
            db = Database(as_url)
            await upgrade(db)
            await db.dispose()

        if nats:
            cleanup.callback(lambda: asyncio.run(stream_counts(args.nats_url, prefix, delete=True)))
        run_sync(migrate())
        run_sync(create_schemas(ref_urls, work / "events.pem"))
        proxies: dict[str, tuple[str, CountingProxy]] = {}
        served_as, served_ref = as_url, dict(ref_urls)
        if args.count_pg:  # every process's connections through a counting proxy per database
            served_as, proxy = through_proxy(as_url)
            proxies["deployment"] = (names[0], proxy)
            for s in STORES:
                served_ref[s], proxy = through_proxy(ref_urls[s])
                proxies[s] = (f"{prefix}_{s}", proxy)
            for _, proxy in proxies.values():
                cleanup.callback(proxy.stop)
        servers = cleanup.enter_context(running_servers(work / "servers"))
        # the cache refresh interval at its default (the tests' live servers poll every 0.2 s)
        auth, pdp = servers.start_cluster(2, served_as, cache_refresh_interval="1")
        made = setup_clients(auth, pdp, work)
        deployment = Deployment(auth, pdp, made["desk"], made["approver"], made["mandate"])
        total = 1 + args.warmup + args.lifecycles * len(args.concurrency)
        subjects = subject_tokens(auth, deployment.desk, deployment.mandate, total)
        cleanup.enter_context(services(deployment, served_ref, nats, work))
        print(
            f"lifecycle: 2 trustplane serve (token endpoint + introspection; AuthZEN PDP) on "
            f"PostgreSQL, 3 services (uvicorn, 1 worker each) with 4 stores on PostgreSQL, publisher "
            f"{'to ' + args.nats_url if nats else 'off'}; {os.cpu_count()} CPUs, load average "
            f"{' '.join(map(str, load()))}",
            flush=True,
        )
        ctx = {"databases": names, "nats": bool(nats), "ref_urls": ref_urls,
               "acks": work / "acks.jsonl", "proxies": proxies, "deployment_url": as_url}  # fmt: skip
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            phases = runner.run(drive(deployment, subjects, args, ctx))
        summary: dict[str, Any] = {"idle_cpu_ms_per_s": ctx["idle_cpu_ms_per_s"], "phases": phases}
        rows = asyncio.run(outbox_rows(ref_urls))
        summary["outbox_rows"] = rows
        if nats:
            messages = sum(asyncio.run(stream_counts(args.nats_url, prefix)).values())
            summary["jetstream"] = {"messages": messages, "outbox_rows": rows}
            if messages != rows:
                print(f"WARNING: {messages} messages in JetStream, {rows} outbox rows")
    return summary


def run_revocation(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with running_servers(work / "ssf") as servers:
        linked = start_chain(servers)
        print(f"revocation: 3 deployments linked by SSF push, {args.ssf_rounds} rounds, "
              f"load average {' '.join(map(str, load()))}", flush=True)  # fmt: skip
        at_b, at_c = linked.revocation_latencies(args.ssf_rounds)
    return {"at_b": ms_stats(at_b), "at_c": ms_stats(at_c), "load_avg": load()}


def arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL URL: five fresh databases are made on its server")  # fmt: skip
    ap.add_argument("--db-prefix", default="tp_bench_lc",
                    help="the five databases' names start with it (then a random tag)")  # fmt: skip
    ap.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    ap.add_argument("--no-nats", action="store_true", help="no publisher (no ack latencies)")
    ap.add_argument("--lifecycles", type=int, default=200, help="per concurrency")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--warmup", type=int, default=5, help="lifecycles before the first phase")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measured")
    ap.add_argument("--rest", type=float, default=1.0, help="seconds between phases")
    ap.add_argument("--ssf-rounds", type=int, default=50, help="0: no revocation part")
    ap.add_argument("--quick", action="store_true",
                    help="concurrency 1 and 2, 1 warm-up, 3 revocation rounds")  # fmt: skip
    ap.add_argument("--count-pg", action="store_true",
                    help="count PostgreSQL statements, round trips, commits and rows written per "
                         "lifecycle and database (a proxy in this process: its CPU is the driver's; "
                         "11 s of waiting around each phase for PostgreSQL's statistics)")  # fmt: skip
    ap.add_argument("--pg-statements", type=Path, metavar="FILE",
                    help="per phase, each statement's cost per lifecycle from pg_stat_statements, "
                         "appended to FILE as JSON (the server must be the bench's own, with "
                         "the extension in --database-url's database: a checkpoint and a reset "
                         "of its statistics before each phase)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="append the summary as one JSON line to this file")
    args = ap.parse_args()
    if args.quick:
        args.concurrency, args.warmup, args.rest, args.idle = [1, 2], 1, 0.0, 1.0
        args.ssf_rounds = min(args.ssf_rounds, 3)
    return args


def main() -> None:
    args = arguments()
    _patient_servers()
    work = Path(tempfile.mkdtemp(prefix="tp-bench-lifecycle-"))
    summary: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_start": load()}
    try:
        summary.update(run_lifecycles(args, work, uuid.uuid4().hex[:8]))
        if args.ssf_rounds:
            summary["revocation"] = run_revocation(args, work)
    except BaseException:
        for log in sorted(work.rglob("*.log")):
            print(f"--- {log.relative_to(work)} (tail)", *log.read_text().splitlines()[-15:],
                  sep="\n")  # fmt: skip
        raise
    print_table(summary)
    if args.json:
        with args.json.open("a") as handle:
            handle.write(json.dumps(summary) + "\n")
    if any(p["failed"] for p in summary["phases"]):  # the processes' logs say why
        print(f"lifecycles failed: the processes' logs are kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
