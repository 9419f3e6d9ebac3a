"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, node key pairs.

The SuperLink serves TLS with a certificate signed by a private CA (`make_ca`, `make_server_cert`);
SuperNodes and the `flwr` CLI trust that CA with `--root-certificates` / `root-certificates`. Each
SuperNode authenticates with an EC key pair on a NIST curve (`make_node_keys`): the private key in
OpenSSH format for `flower-supernode --auth-supernode-private-key`, the public key in OpenSSH format
for `flwr supernode register`. Private keys are written readable by their owner only.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import ConfigError

#: Names the server certificate always covers, so a SuperLink on this machine is reachable.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class KeyPair:
    """Paths of a written certificate (or public key) and its private key."""

    public: Path
    private: Path


def _write(path: Path, data: bytes, private: bool, force: bool) -> None:
    """Write a key or certificate: into a new O_EXCL temporary file, then `os.replace`.

    The temporary file is created 0600 (a private key is never readable by others, not even for
    a moment), refuses to follow a link, and replaces `path` in one step; a link planted at
    `path` is replaced, never written through.
    """
    if (path.exists() or path.is_symlink()) and not force:
        raise ConfigError(f"{path} already exists: remove it or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not private:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ConfigError(f"--days={days} must be at least 1")
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return start, start + datetime.timedelta(days=days)


def make_ca(
    out: Path, common_name: str = "fedpeft CA", days: int = 365, force: bool = False
) -> KeyPair:
    """Write a self-signed CA certificate and its key (`ca.crt`, `ca.key`) into `out`."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    pair = KeyPair(out / CA_CERT, out / CA_KEY)
    _write(pair.private, _pem_key(key), private=True, force=force)
    _write(pair.public, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return pair


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = ca_dir / CA_CERT, ca_dir / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(f"{path} not found: create the CA first with `fedpeft certs ca`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError as exc:
        raise ConfigError(f"{ca_dir} holds no readable CA certificate and key ({exc})") from exc
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ConfigError(f"{cert_path} and {key_path} do not belong together: recreate the CA")
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise ConfigError(f"--host {host!r} is neither an IP address nor a DNS name") from None
        return x509.DNSName(host)


def make_server_cert(
    out: Path,
    ca_dir: Path,
    hosts: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> KeyPair:
    """Write the SuperLink's certificate and key (`server.pem`, `server.key`), signed by the CA.

    The certificate names localhost, 127.0.0.1 and ::1 plus every given host (IP or DNS name):
    clients must reach the SuperLink by one of these names, or TLS verification fails.
    """
    ca_cert, ca_key = _load_ca(ca_dir)
    names = list(dict.fromkeys([*hosts, *LOCAL_HOSTS]))
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(end, ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    pair = KeyPair(out / SERVER_CERT, out / SERVER_KEY)
    _write(pair.private, _pem_key(key), private=True, force=force)
    _write(pair.public, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    return pair


def make_node_keys(out: Path, name: str, force: bool = False) -> KeyPair:
    """Write a SuperNode's P-384 key pair in OpenSSH format: `<name>.key` and `<name>.pub`."""
    if not _NODE_NAME.match(name):
        raise ConfigError(
            f"node name {name!r} must be letters, digits, '.', '_' or '-' (e.g. node-1)"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pair = KeyPair(out / f"{name}.pub", out / f"{name}.key")
    _write(pair.private, private, private=True, force=force)
    _write(pair.public, public + f" {name}\n".encode(), private=False, force=force)
    return pair


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add `fedpeft certs ca|server|node` to the CLI's subcommands."""
    certs = subparsers.add_parser("certs", help="make TLS certificates and SuperNode keys")
    kinds = certs.add_subparsers(dest="certs_command", required=True)
    ca = kinds.add_parser("ca", help="a private CA: ca.crt (give to every node), ca.key")
    server = kinds.add_parser("server", help="the SuperLink's server.pem and server.key")
    server.add_argument("--ca", type=Path, help="folder holding ca.crt and ca.key (default: --out)")
    server.add_argument(
        "--host",
        action="append",
        default=[],
        help="a name or IP the nodes use to reach the SuperLink (repeat for several); "
        "localhost and 127.0.0.1 are always included",
    )
    node = kinds.add_parser("node", help="SuperNode key pairs: <name>.key and <name>.pub")
    node.add_argument("names", nargs="+", help="one name per node, e.g. node-1 node-2")
    for parser in (ca, server, node):
        parser.add_argument("--out", type=Path, required=True, help="folder to write into")
        parser.add_argument("--force", action="store_true", help="overwrite existing files")
    for parser in (ca, server):
        parser.add_argument("--days", type=int, default=365, help="validity (default 365)")


def run_subcommand(args: argparse.Namespace) -> list[KeyPair]:
    """Run `fedpeft certs ...` and print what was written."""
    out = args.out.expanduser()
    if args.certs_command == "ca":
        pairs = [make_ca(out, days=args.days, force=args.force)]
    elif args.certs_command == "server":
        ca_dir = (args.ca or args.out).expanduser()
        pairs = [make_server_cert(out, ca_dir, args.host, days=args.days, force=args.force)]
    else:
        pairs = [make_node_keys(out, name, force=args.force) for name in args.names]
    for pair in pairs:
        print(f"wrote {pair.public} and {pair.private} (private: keep it secret)")
    return pairs
