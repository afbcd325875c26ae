"""Mutual TLS end to end with real processes: ``trustplane serve`` terminating TLS itself, and
``trustplane serve`` behind a real nginx (Debian nginx-light) that terminates TLS and forwards the
client certificate in a header. Clients are registered with ``trustplane clients add`` and talk
HTTPS with httpx client certificates.

* direct TLS: ``tls_client_auth`` at /token over a real handshake; no certificate is 401
  ``invalid_client``; a certificate from another CA fails the handshake;
* proxy mode: ``tls_client_auth`` and ``self_signed_tls_client_auth`` through nginx; a client that
  sends the certificate header itself through nginx gets nothing from it (nginx replaces it); the
  same header sent straight to trustplane from an address outside ``trusted_proxies`` is ignored and
  counted (``trustplane_client_cert_header_ignored_total{reason="untrusted_peer"}``).
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EXECUTION, LEI, free_port, wait_until
from tests.e2e.conftest import (
    PROPAGATION_TIMEOUT,
    START_TIMEOUT,
    LiveServer,
    LiveServers,
    running_servers,
    settings_env,
)
from tests.tls.pki import CLIENT_DN, CLIENT_URI, Pki, build_pki, escaped_pem, public_jwks

pytestmark = pytest.mark.e2e

NGINX = "/usr/sbin/nginx"
HEADER = "X-SSL-Client-Cert"
MTLS_METHODS = '["private_key_jwt", "tls_client_auth", "self_signed_tls_client_auth"]'
TOKEN_FORM = {"grant_type": "client_credentials", "scope": "order:create", "resource": EXECUTION}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return build_pki(tmp_path_factory.mktemp("pki"))


def tls(pki: Pki, cert: str | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting ``cert`` (a stem of :class:`Pki`)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(*pki.pair(cert))
    return ctx


def add_client(server: LiveServer, *args: str) -> str:
    base = ["clients", "add", "--lei", LEI, "--scope", "order:create", "--resource", EXECUTION]
    return str(server.cli_json(*base, *args)["client_id"])


def token(base_url: str, client_id: str, **kw: Any) -> httpx.Response:
    with httpx.Client(timeout=10, **kw) as http:
        return http.post(f"{base_url}/token", data={**TOKEN_FORM, "client_id": client_id})


def wait_for_client(base_url: str, client_id: str, **kw: Any) -> None:
    """Bounded wait until the server has loaded a client the CLI just registered."""
    wait_until(
        lambda: token(base_url, client_id, **kw).status_code == 200,
        PROPAGATION_TIMEOUT,
        f"server to authenticate {client_id}",
    )


# --------------------------------------------------------------------------- direct TLS


@dataclass
class TlsServer:
    server: LiveServer
    pki: Pki

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def verify(self, cert: str | None = None) -> ssl.SSLContext:
        return tls(self.pki, cert)


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    directory = tmp_path_factory.mktemp("tls-server")
    port = free_port()
    data_dir = directory / "data"
    data_dir.mkdir()
    env = settings_env(
        f"sqlite+aiosqlite:///{data_dir / 'trustplane.db'}",
        data_dir,
        port=str(port),
        tls_certificate=str(pki.path("server.crt")),
        tls_key=str(pki.path("server.key")),
        tls_client_ca=str(pki.ca_file),
        client_auth_methods=MTLS_METHODS,
    )
    server = LiveServer(port, f"https://127.0.0.1:{port}", env, data_dir / "server.log")
    server.launch()
    try:
        wait_until(
            lambda: _healthy(f"https://127.0.0.1:{port}", tls(pki), server),
            START_TIMEOUT,
            "the TLS server to answer /healthz",
        )
        yield TlsServer(server, pki)
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-4000:]


def _healthy(url: str, ca: ssl.SSLContext, server: LiveServer) -> bool:
    assert server.process is not None
    if server.process.poll() is not None:
        pytest.fail(f"the TLS server exited:\n{server.log()[-4000:]}")
    try:
        return httpx.get(f"{url}/healthz", verify=ca, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_direct_tls_client_auth(tls_server: TlsServer) -> None:
    client_id = add_client(
        tls_server.server, "--auth-method", "tls_client_auth", "--tls-subject", f"dn={CLIENT_DN}"
    )
    with_cert = {"verify": tls_server.verify("client")}
    wait_for_client(tls_server.url, client_id, **with_cert)

    issued = token(tls_server.url, client_id, **with_cert)
    without = token(tls_server.url, client_id, verify=tls_server.verify())

    assert issued.status_code == 200
    assert issued.json()["token_type"] == "Bearer"
    assert without.status_code == 401
    assert without.json()["error"] == "invalid_client"


def test_direct_tls_wrong_subject_is_invalid_client(tls_server: TlsServer) -> None:
    client_id = add_client(
        tls_server.server, "--auth-method", "tls_client_auth", "--tls-subject", "dns=other.example"
    )
    time.sleep(1.0)  # several refresh intervals: the server knows the client by now
    response = token(tls_server.url, client_id, verify=tls_server.verify("client"))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_direct_tls_certificate_of_another_ca_fails_the_handshake(tls_server: TlsServer) -> None:
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        token(tls_server.url, "x", verify=tls_server.verify("stranger"))


def test_direct_tls_discovery(tls_server: TlsServer) -> None:
    doc = httpx.get(
        f"{tls_server.url}/.well-known/oauth-authorization-server", verify=tls_server.verify()
    ).json()
    assert doc["issuer"] == tls_server.url
    assert doc["mtls_endpoint_aliases"]["token_endpoint"] == f"{tls_server.url}/token"
    banner = tls_server.server.log()
    assert "client certs  TLS handshake (optional), verified against " in banner
    assert "operations    https://127.0.0.1:" in banner


def test_curl_walk_through(tls_server: TlsServer) -> None:
    """The README's ``curl --cert`` walk-through, literally."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    client_id = add_client(
        tls_server.server, "--auth-method", "tls_client_auth", "--tls-subject", f"uri={CLIENT_URI}"
    )
    with_cert = {"verify": tls_server.verify("client")}
    wait_for_client(tls_server.url, client_id, **with_cert)
    cert, key = tls_server.pki.pair("client")
    out = subprocess.run(
        [curl, "-sS", "--cacert", str(tls_server.pki.ca_file), "--cert", cert, "--key", key,
         "-d", "grant_type=client_credentials", "-d", f"client_id={client_id}",
         "-d", "scope=order:create", "--data-urlencode", f"resource={EXECUTION}",
         f"{tls_server.url}/token"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["token_type"] == "Bearer"


# --------------------------------------------------------------------------- nginx in front


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki}/server.crt;
        ssl_certificate_key {pki}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384;
        # ask for a certificate, let trustplane validate it (self-signed clients need this)
        ssl_verify_client optional_no_ca;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_set_header Host $http_host;
            proxy_set_header {header} $ssl_client_escaped_cert;
        }}
    }}
}}
"""


@dataclass
class Proxied:
    server: LiveServer
    url: str  # nginx
    pki: Pki


@pytest.fixture(scope="module")
def proxied(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    if not Path(NGINX).exists():
        pytest.skip("nginx is not installed (Debian package nginx-light)")
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    with running_servers(tmp_path_factory.mktemp("proxied")) as servers:
        server = _start_upstream(servers, pki, port)
        conf = directory / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=directory, port=port, pki=pki.directory, upstream=server.port, header=HEADER
            )
        )
        nginx = subprocess.Popen(
            [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"https://127.0.0.1:{port}"
            wait_until(
                lambda: _nginx_up(url, pki, nginx, directory), START_TIMEOUT, "nginx to proxy"
            )
            yield Proxied(server, url, pki)
        finally:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(10)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait(10)


def _start_upstream(servers: LiveServers, pki: Pki, nginx_port: int) -> LiveServer:
    return servers.start(
        issuer=f"https://127.0.0.1:{nginx_port}",
        tls_client_cert_header=HEADER,
        trusted_proxies='["127.0.0.1/32"]',  # nginx; the spoofing client comes from 127.0.0.2
        tls_client_ca=str(pki.ca_file),
        client_auth_methods=MTLS_METHODS,
    )


def _nginx_up(url: str, pki: Pki, nginx: subprocess.Popen[bytes], directory: Path) -> bool:
    if nginx.poll() is not None:
        log = (directory / "error.log").read_text(errors="replace")
        pytest.fail(f"nginx exited {nginx.returncode}:\n{log}")
    try:
        return httpx.get(f"{url}/healthz", verify=tls(pki), timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_proxy_mode_tls_client_auth(proxied: Proxied) -> None:
    client_id = add_client(
        proxied.server, "--auth-method", "tls_client_auth", "--tls-subject", f"dn={CLIENT_DN}"
    )
    wait_for_client(proxied.url, client_id, verify=tls(proxied.pki, "client"))

    other_ca = token(proxied.url, client_id, verify=tls(proxied.pki, "stranger"))
    without = token(proxied.url, client_id, verify=tls(proxied.pki))

    # nginx (optional_no_ca) forwards the stranger's certificate; trustplane validates the chain
    assert other_ca.status_code == 401
    assert other_ca.json()["error"] == "invalid_client"
    assert without.status_code == 401
    assert without.json()["error"] == "invalid_client"


def test_proxy_mode_self_signed_tls_client_auth(proxied: Proxied) -> None:
    jwks = Path(proxied.server.env["TRUSTPLANE_DATA_DIR"]) / "self-signed-jwks.json"
    jwks.write_text(json.dumps(public_jwks(proxied.pki.self_signed.key)))
    client_id = add_client(
        proxied.server, "--auth-method", "self_signed_tls_client_auth", "--jwks-file", str(jwks)
    )
    wait_for_client(proxied.url, client_id, verify=tls(proxied.pki, "self_signed"))

    wrong = token(proxied.url, client_id, verify=tls(proxied.pki, "client"))
    assert wrong.status_code == 401
    assert wrong.json()["error"] == "invalid_client"


def test_header_sent_through_nginx_by_the_client_is_replaced(proxied: Proxied) -> None:
    client_id = add_client(
        proxied.server, "--auth-method", "tls_client_auth", "--tls-subject", f"uri={CLIENT_URI}"
    )
    wait_for_client(proxied.url, client_id, verify=tls(proxied.pki, "client"))

    with httpx.Client(
        verify=tls(proxied.pki), timeout=10
    ) as http:  # no client certificate at the handshake
        response = http.post(
            f"{proxied.url}/token",
            data={**TOKEN_FORM, "client_id": client_id},
            headers={HEADER: escaped_pem(proxied.pki.client)},
        )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_header_spoofed_from_a_non_proxy_address_is_ignored_and_counted(proxied: Proxied) -> None:
    client_id = add_client(
        proxied.server, "--auth-method", "tls_client_auth", "--tls-subject", f"dn={CLIENT_DN}"
    )
    wait_for_client(proxied.url, client_id, verify=tls(proxied.pki, "client"))
    before = _ignored(proxied.server)
    spoofer = httpx.HTTPTransport(local_address="127.0.0.2")  # not in trusted_proxies
    with httpx.Client(transport=spoofer, timeout=10) as http:
        response = http.post(
            f"{proxied.server.base_url}/token",
            data={**TOKEN_FORM, "client_id": client_id},
            headers={HEADER: escaped_pem(proxied.pki.client)},
        )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert _ignored(proxied.server) == before + 1
    assert f"header {HEADER} from trusted proxies 127.0.0.1/32" in proxied.server.log()


def _ignored(server: LiveServer) -> float:
    text = httpx.get(f"{server.ops_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('trustplane_client_cert_header_ignored_total{reason="untrusted_peer"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
