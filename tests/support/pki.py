"""Throwaway certificate authorities for tests: a CA made on the spot, and a server certificate it
signs for the names and addresses given. Nothing is kept beyond the test's own directory; EC
keys, so making one costs milliseconds. Certificates carry the extensions strict verification
(Python 3.13's default `VERIFY_X509_STRICT`) asks for."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerPki:
    """A CA's certificate and a server certificate it signed, as PEM files in one directory."""

    ca_file: Path
    certfile: Path
    keyfile: Path

    @property
    def ca_pem(self) -> str:
        return self.ca_file.read_text()


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def make_authority(common_name: str) -> _Authority:
    """A self-signed CA that may sign server certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (_builder(_name(common_name), _name(common_name), key.public_key())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    return _Authority(key, certificate)


def server_pki(directory: Path, names: list[str], addresses: list[str],
               ca_name: str = "Throwaway test CA") -> ServerPki:
    """A new CA and a server certificate it signed for `names` (DNS) and `addresses` (IP), written
    to `directory` as ca.pem, server.pem and server-key.pem (the key owner-only)."""
    directory.mkdir(parents=True, exist_ok=True)
    authority = make_authority(ca_name)
    key = ec.generate_private_key(ec.SECP256R1())
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    certificate = (_builder(_name(names[0] if names else addresses[0]), authority.certificate.subject, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                                  critical=False)
                   .sign(authority.key, hashes.SHA256()))
    pki = ServerPki(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    pki.ca_file.write_bytes(authority.certificate.public_bytes(serialization.Encoding.PEM))
    pki.certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    pki.keyfile.touch(mode=0o600)
    pki.keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    return pki


def other_ca_file(directory: Path) -> Path:
    """The certificate of a CA that signed nothing the test serves: a wrong CA bundle."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "other-ca.pem"
    path.write_bytes(make_authority("Some other CA").certificate.public_bytes(serialization.Encoding.PEM))
    return path
