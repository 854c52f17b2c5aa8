"""The CA bundle and the proxy setting: how they are read, refused, and turned into what each
library takes; and how a certificate or proxy failure becomes one final line (`bk_blocks/network.py`)."""

from __future__ import annotations

import logging
import pickle
import ssl
from pathlib import Path

import pytest
import requests
import urllib3
from pydantic import ValidationError

from prefect_branchkey.bk_blocks import (
    BranchKeyCredentials,
    BranchKeySettings,
    CertificateError,
    ConfigurationError,
    ConnectionOptions,
    ProxyRefusedError,
)
from prefect_branchkey.bk_blocks.client import BranchKeyClient, LeafIdentity
from prefect_branchkey.bk_blocks.network import Egress, is_pem_text

from ..support.pki import other_ca_file, server_pki

PLATFORM_JSON = {"id": "leaf-uuid", "name": "hospital-a", "session_token": "s3cret-token-value",
                 "tree_id": "tree-uuid", "branch_id": "branch-uuid", "owner_id": "owner-uuid"}
LEAF = LeafIdentity("leaf-uuid", "hospital-a", "tree-uuid", "branch-uuid")


@pytest.fixture(scope="module")
def ca_pem(tmp_path_factory: pytest.TempPathFactory) -> str:
    return other_ca_file(tmp_path_factory.mktemp("ca")).read_text()


def test_pem_text_is_told_apart_from_a_path_by_its_begin_line(ca_pem: str) -> None:
    assert is_pem_text(ca_pem) and is_pem_text("\n  " + ca_pem)
    assert not is_pem_text("/etc/ssl/certs/hospital-ca.pem")
    assert ConnectionOptions(ca_bundle="  " + ca_pem).ca_bundle == ca_pem.strip() + "\n"
    assert ConnectionOptions(ca_bundle=" ~/ca.pem ").ca_bundle == "~/ca.pem"
    assert ConnectionOptions(ca_bundle="").ca_bundle is None


def test_a_path_is_not_checked_where_the_block_is_made() -> None:
    """The Block may be made on another machine than the leaf's: the file is looked for there."""
    assert ConnectionOptions(ca_bundle="/nowhere/ca.pem").ca_bundle == "/nowhere/ca.pem"


@pytest.mark.parametrize(("value", "message"), [
    ("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", "does not load as CA certificates"),
    ("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n", "holds a private key"),
    ("some text\nover two lines", "a path to a PEM file, or PEM text"),
])
def test_a_bad_ca_bundle_is_refused_saying_why(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ConnectionOptions(ca_bundle=value)


def test_a_ca_bundle_with_verification_off_is_refused(ca_pem: str) -> None:
    with pytest.raises(ValidationError, match="verify_tls is off"):
        ConnectionOptions(ca_bundle=ca_pem, verify_tls=False)


@pytest.mark.parametrize(("value", "kept"), [
    ("http://proxy.example.org:3128", "http://proxy.example.org:3128"),
    ("http://proxy.example.org:3128/", "http://proxy.example.org:3128"),
    ("http://proxy.example.org", "http://proxy.example.org:80"),
    ("http://[::1]:3128", "http://[::1]:3128"),
    ("", None),
])
def test_proxy_url_is_an_http_proxy(value: str, kept: str | None) -> None:
    assert ConnectionOptions(proxy_url=value).proxy_url == kept


@pytest.mark.parametrize(("value", "message"), [
    ("https://proxy:3128", r"must be an http:// URL .*\(got a https URL\)"),
    ("socks5://proxy:1080", r"\(got a socks5 URL\)"),
    ("proxy:3128", "must be an http:// URL"),
    ("http://proxy:3128/path", "no path, query or fragment"),
    ("http://proxy:99999", "port that is not a number"),
])
def test_a_bad_proxy_url_is_refused_saying_why(value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ConnectionOptions(proxy_url=value)


def test_a_proxy_url_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(ValidationError, match="must not carry a user name or password") as error:
        BranchKeyCredentials.from_platform_json(PLATFORM_JSON, proxy_url="http://nurse:hunter2@proxy:3128")
    assert "hunter2" not in str(error.value)


def test_proxy_url_and_the_older_proxies_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="proxy_url or the older proxies, not both"):
        ConnectionOptions(proxy_url="http://proxy:3128", proxies={"https": "http://proxy:3128"})


def test_a_block_of_the_schema_before_these_fields_validates() -> None:
    old = {"leaf_id": "leaf-uuid", "leaf_name": "hospital-a", "session_token": "s3cret-token-value",
           "tree_id": "tree-uuid", "branch_id": "branch-uuid", "owner_id": "owner-uuid",
           "host": "https://app.branchkey.com", "verify_tls": True, "proxies": {"https": "http://proxy:8080"},
           "connect_timeout_s": 10.0, "read_timeout_s": 120.0, "notification_transport": "amqp",
           "amqp_host": None, "amqp_port": 5671, "amqp_tls": True, "keepalive_s": 20.0}
    block = BranchKeyCredentials.model_validate(old)
    assert block.ca_bundle is None and block.proxy_url is None and block.proxies == {"https": "http://proxy:8080"}


def test_the_settings_read_both_from_the_environment(monkeypatch: pytest.MonkeyPatch, ca_pem: str) -> None:
    for key, value in PLATFORM_JSON.items():
        monkeypatch.setenv("BRANCHKEY_" + {"id": "LEAF_ID", "name": "LEAF_NAME"}.get(key, key.upper()), value)
    monkeypatch.setenv("BRANCHKEY_CA_BUNDLE", ca_pem)
    monkeypatch.setenv("BRANCHKEY_PROXY_URL", "http://proxy.example.org:3128")
    block = BranchKeySettings(_env_file=None).to_block()
    assert block.ca_bundle == ca_pem and block.proxy_url == "http://proxy.example.org:3128"


def test_proxy_url_is_the_proxy_of_http_and_websocket() -> None:
    egress = Egress(ca_bundle=None, verify_tls=True, proxy_url="http://proxy:3128", proxies=None)
    assert egress.requests_proxies == {"http": "http://proxy:3128", "https": "http://proxy:3128"}
    assert egress.websocket_proxy == "http://proxy:3128"


def test_without_proxy_url_the_environment_decides_and_the_older_proxies_stay_http_only() -> None:
    egress = Egress(ca_bundle=None, verify_tls=True, proxy_url=None, proxies={"https": "http://old:8080"})
    assert egress.requests_proxies == {"https": "http://old:8080"}
    assert egress.websocket_proxy is True, "websockets then reads HTTPS_PROXY/NO_PROXY itself"


def test_the_older_proxies_warn_that_they_are_deprecated(caplog: pytest.LogCaptureFixture) -> None:
    options = ConnectionOptions(proxies={"https": "http://old:8080"})
    with caplog.at_level(logging.WARNING), BranchKeyClient(LEAF, "token", options):
        pass
    assert "`proxies` is deprecated" in caplog.text and "proxy_url" in caplog.text


def test_a_ca_path_is_what_requests_verifies_with(tmp_path: Path) -> None:
    pki = server_pki(tmp_path, ["platform.invalid"], ["127.0.0.1"])
    egress = Egress(ca_bundle=str(pki.ca_file), verify_tls=True, proxy_url=None, proxies=None)
    assert egress.requests_verify == str(pki.ca_file)
    context = egress.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "Throwaway test CA"),),)]


def test_pem_text_is_written_once_to_a_private_file_removed_at_close(ca_pem: str) -> None:
    options = ConnectionOptions(ca_bundle=ca_pem)
    client = BranchKeyClient(LEAF, "token", options)
    path = Path(str(client._egress.requests_verify))
    assert path.read_text() == options.ca_bundle and oct(path.stat().st_mode & 0o777) == "0o600"
    client.close()
    assert not path.exists()


def test_a_ca_path_missing_on_this_machine_fails_building_the_client() -> None:
    with pytest.raises(ConfigurationError, match=r"^ca_bundle /nowhere/ca.pem is not a file on this machine$"):
        BranchKeyClient(LEAF, "token", ConnectionOptions(ca_bundle="/nowhere/ca.pem"))


def test_a_ca_file_that_holds_no_certificate_fails_building_the_client(tmp_path: Path) -> None:
    path = tmp_path / "empty.pem"
    path.write_text("nothing here\n")
    with pytest.raises(ConfigurationError, match="does not load as CA certificates"):
        BranchKeyClient(LEAF, "token", ConnectionOptions(ca_bundle=str(path)))


def test_verification_off_reaches_every_transport() -> None:
    egress = Egress(ca_bundle=None, verify_tls=False, proxy_url=None, proxies=None)
    assert egress.requests_verify is False
    assert egress.ssl_context().verify_mode == ssl.CERT_NONE


def _untrusted(code: int = 19, message: str = "self-signed certificate in certificate chain") -> Exception:
    """An untrusted certificate as requests raises it: three wrappers deep."""
    problem = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    problem.verify_code, problem.verify_message = code, message
    try:
        try:
            raise problem
        except ssl.SSLError as exc:
            raise requests.exceptions.SSLError(urllib3.exceptions.MaxRetryError(
                None, "/api/v1/run/x", exc)) from exc
    except requests.exceptions.SSLError as wrapped:
        return wrapped


def test_an_untrusted_certificate_is_one_final_line_naming_the_fix() -> None:
    egress = Egress(ca_bundle=None, verify_tls=True, proxy_url=None, proxies=None)
    error = egress.final_error(_untrusted(), "https://127.0.0.1:8443/api/v1/file/download/x?signature=secret")
    assert isinstance(error, CertificateError) and error.reason == "self-signed certificate in certificate chain"
    assert str(error) == ("TLS certificate of https://127.0.0.1:8443 not trusted: self-signed certificate in "
                          "certificate chain; give the Block the CA bundle that signed it (ca_bundle)")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_a_host_name_the_certificate_does_not_list_says_so() -> None:
    egress = Egress(ca_bundle=None, verify_tls=True, proxy_url=None, proxies=None)
    error = egress.final_error(_untrusted(62, "Hostname mismatch, certificate is not valid for 'x'."), "https://x")
    assert error is not None and str(error).endswith("the Block's host must be a name the certificate lists")


def test_a_proxy_that_refuses_the_tunnel_is_final_and_one_that_fails_is_not() -> None:
    egress = Egress(ca_bundle=None, verify_tls=True, proxy_url="http://proxy:3128", proxies=None)
    refused = requests.exceptions.ProxyError(OSError("Tunnel connection failed: 407 Proxy Authentication Required"))
    error = egress.final_error(refused, "https://app.branchkey.com")
    assert isinstance(error, ProxyRefusedError) and error.status_code == 407
    assert str(error) == ("proxy http://proxy:3128 refused the tunnel to app.branchkey.com: 407 Proxy Authentication "
                          "Required; it wants credentials, which proxy_url cannot carry")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    failed = requests.exceptions.ProxyError(OSError("Tunnel connection failed: 502 Bad Gateway"))
    assert egress.final_error(failed, "https://app.branchkey.com") is None
    assert egress.final_error(requests.ConnectionError("connection refused"), "https://app.branchkey.com") is None


def test_the_block_field_descriptions_say_which_transports_they_cover() -> None:
    fields = BranchKeyCredentials.model_fields
    assert "HTTP, WebSocket and AMQP" in (fields["ca_bundle"].description or "")
    assert "HTTP, WebSocket, AMQP" in (fields["proxy_url"].description or "")
    assert "Deprecated" in (fields["proxies"].description or "")


def test_a_proxy_with_a_plain_http_host_is_refused_as_it_would_see_the_token() -> None:
    with pytest.raises(ValidationError, match="http:// host would send the session token to the proxy in clear"):
        ConnectionOptions(host="http://platform.example.org", proxy_url="http://proxy:3128")


def test_a_proxy_with_amqp_without_tls_is_refused_as_it_would_see_the_token() -> None:
    with pytest.raises(ValidationError, match="turn amqp_tls on"):
        ConnectionOptions(proxy_url="http://proxy:3128", notification_transport="amqp")
    assert ConnectionOptions(proxy_url="http://proxy:3128", notification_transport="amqp", amqp_tls=True).amqp_tls
