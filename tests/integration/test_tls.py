"""TLS on the proxy and on direct ingress: real certificates, real HTTPS on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import flotilla
from flotilla import serve
from flotilla.serve.exceptions import ConfigError
from tests.conftest import free_port, local_only, running_cluster, wait_for

x509 = pytest.importorskip("cryptography.x509", reason="the tests make certificates with `cryptography`")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

pytestmark = pytest.mark.slow


def _name(cn: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool = False,
          san: bool = False, usage: Any = None) -> Any:
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(folder: str, password: bytes | None = None) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("flotilla test CA", ca_key, "flotilla test CA", ca_key, ca=True)
    server = _cert("127.0.0.1", server_key, "flotilla test CA", ca_key, san=True, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    client = _cert("client", client_key, "flotilla test CA", ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    pem = serialization.Encoding.PEM
    files: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        files[name] = os.path.join(folder, name + ".pem")
        with open(files[name], "wb") as f:
            f.write(data)

    def key_pem(key: Any, pw: bytes | None = None) -> bytes:
        enc = serialization.BestAvailableEncryption(pw) if pw else serialization.NoEncryption()
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, enc)

    write("ca", ca.public_bytes(pem))
    write("server", server.public_bytes(pem))
    write("server_key", key_pem(server_key, password))
    write("client", client.public_bytes(pem))
    write("client_key", key_pem(client_key))
    return files


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_pki(str(tmp_path_factory.mktemp("pki")), password=b"s3cret-pw")


@pytest.fixture(scope="module")
def cluster(pki: dict[str, str]) -> Iterator[str]:
    tls = {"ssl_certfile": pki["server"], "ssl_keyfile": pki["server_key"], "ssl_keyfile_password": "s3cret-pw"}
    with running_cluster(tls, num_cpus=4) as url:
        yield url.replace("http://", "https://")


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Hello:
    async def __call__(self, request: Any) -> dict[str, Any]:
        return {"scheme": request.url.scheme, "path": request.url.path}


def test_https_request_succeeds(url: str, pki: dict[str, str]) -> None:
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    assert url.startswith("https://127.0.0.1:")
    with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=pki["ca"]), timeout=10) as c:
        r = c.get("/hello/x")
        assert r.status_code == 200, r.text
        assert r.json() == {"scheme": "https", "path": "/hello/x"}
        assert c.get("/-/healthz").text == "success"


def test_plain_http_to_the_https_port_fails(url: str) -> None:
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    plain = url.replace("https://", "http://")
    try:
        r = httpx.get(plain + "/hello/x", timeout=5)
    except httpx.HTTPError:
        return  # the TLS server drops it
    assert r.status_code != 200


def test_unknown_ca_is_refused(url: str) -> None:
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/-/healthz", timeout=5)  # the system's CAs do not know ours


def test_missing_certificate_file_fails_start(pki: dict[str, str], tmp_path: Any) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=re.escape(f"{missing!r} does not exist")):
        serve.start(http_options={"port": free_port(), "ssl_certfile": missing, "ssl_keyfile": pki["server_key"]})


def test_unloadable_certificate_fails_in_the_head(pki: dict[str, str], tmp_path: Any) -> None:
    """A file that exists but is no certificate passes the driver's check; the head's load fails,
    naming it. Run on a second cluster (the module's already has its proxy)."""
    bad = tmp_path / "garbage.pem"
    bad.write_text("not a certificate\n")
    flotilla.shutdown()
    flotilla.init(num_cpus=1)
    with pytest.raises(Exception, match=re.escape(f"ssl_certfile {str(bad)!r}")):
        serve.start(http_options={"port": free_port(), "ssl_certfile": str(bad)})
    with pytest.raises(Exception, match=re.escape(f"ssl_keyfile {pki['server_key']!r}")):  # the wrong password
        serve.start(http_options={"port": free_port(), "ssl_certfile": pki["server"],
                                  "ssl_keyfile": pki["server_key"], "ssl_keyfile_password": "wrong"})
    assert serve.status().proxies.get("head") != "HEALTHY"


@local_only("direct ingress shares this machine's listening socket")
def test_client_certificates_required_and_direct_ingress(pki: dict[str, str]) -> None:
    """ssl_ca_certs: a client without a certificate is refused, one with ours is served; on
    direct ingress (replicas serve TLS themselves)."""
    tls = {"ssl_certfile": pki["server"], "ssl_keyfile": pki["server_key"], "ssl_keyfile_password": "s3cret-pw",
           "ssl_ca_certs": pki["ca"], "direct_ingress": True}
    with running_cluster(tls, num_cpus=2) as url:
        url = url.replace("http://", "https://")
        serve.run(Hello.bind(), name="hello", route_prefix="/hello")
        without = ssl.create_default_context(cafile=pki["ca"])
        with_cert = ssl.create_default_context(cafile=pki["ca"])
        with_cert.load_cert_chain(pki["client"], pki["client_key"])

        def served() -> Any:
            try:
                return httpx.get(url + "/hello/y", verify=with_cert, timeout=5)
            except httpx.HTTPError:
                return None

        r = wait_for(served, what="an HTTPS answer from a direct-ingress replica")
        assert r.status_code == 200 and r.json() == {"scheme": "https", "path": "/hello/y"}
        refused = False
        try:
            r = httpx.get(url + "/hello/y", verify=without, timeout=5)
            refused = r.status_code != 200
        except (httpx.HTTPError, ssl.SSLError):
            refused = True
        assert refused, "a client without a certificate was served"
