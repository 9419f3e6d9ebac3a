"""Deployment certificates and node keys: what they name, who verifies them, how they are kept."""

import ipaddress
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedpeft import certs, cli
from fedpeft.errors import ConfigError


@pytest.fixture
def ca_dir(tmp_path):
    certs.make_ca(tmp_path / "ca")
    return tmp_path / "ca"


def _handshake(server_dir, ca_file, host: str) -> str:
    """A real TLS handshake over loopback: serve `server_dir`'s certificate, trust `ca_file`."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(server_dir / certs.SERVER_CERT, server_dir / certs.SERVER_KEY)
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(b"x")
            return tls.version()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_server_certificate_is_signed_by_the_ca_and_names_every_host(ca_dir, tmp_path):
    pair = certs.make_server_cert(tmp_path / "srv", ca_dir, ["superlink.example.org", "10.1.2.3"])
    ca = x509.load_pem_x509_certificate((ca_dir / certs.CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate(pair.public.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("10.1.2.3", "127.0.0.1", "::1")
    }
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(pair.private.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "superlink.example.org"])
def test_tls_handshake_succeeds_for_every_named_host(ca_dir, tmp_path, host):
    certs.make_server_cert(tmp_path / "srv", ca_dir, ["superlink.example.org"])
    assert _handshake(tmp_path / "srv", ca_dir / certs.CA_CERT, host).startswith("TLS")


def test_tls_handshake_fails_for_another_ca_or_an_unnamed_host(ca_dir, tmp_path):
    certs.make_server_cert(tmp_path / "srv", ca_dir)
    other = certs.make_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "srv", other.public, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "srv", ca_dir / certs.CA_CERT, "superlink.example.org")


def test_private_keys_are_readable_by_their_owner_only(ca_dir, tmp_path):
    pairs = [
        certs.make_server_cert(tmp_path / "srv", ca_dir),
        certs.make_node_keys(tmp_path / "keys", "node-1"),
    ]
    for path in [ca_dir / certs.CA_KEY, *(p.private for p in pairs)]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [ca_dir / certs.CA_CERT, *(p.public for p in pairs)]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o044, path


def test_a_planted_link_never_receives_a_key(tmp_path):
    """An attacker who can write the output folder links the key's name to a file they read;
    with --force the link is replaced, never written through, and the key is 0600 from birth."""
    out, stolen = tmp_path / "keys", tmp_path / "attacker-readable"
    out.mkdir()
    stolen.write_text("")
    (out / "node-1.key").symlink_to(stolen)
    with pytest.raises(ConfigError, match="already exists"):
        certs.make_node_keys(out, "node-1")  # a dangling or live link counts as existing
    pair = certs.make_node_keys(out, "node-1", force=True)
    assert stolen.read_text() == "" and not pair.private.is_symlink()
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_node_keys_are_what_flower_loads_and_belong_together(tmp_path):
    pair = certs.make_node_keys(tmp_path, "node-1")
    private = serialization.load_ssh_private_key(pair.private.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pair.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
    assert try_load_public_key(pair.public)  # what `flwr supernode register` reads
    signature = private.sign(b"challenge", ec.ECDSA(hashes.SHA256()))
    public.verify(signature, b"challenge", ec.ECDSA(hashes.SHA256()))
    other = certs.make_node_keys(tmp_path, "node-2")
    assert other.public.read_bytes() != pair.public.read_bytes()


def test_existing_files_are_not_overwritten_without_force(ca_dir, tmp_path):
    before = (ca_dir / certs.CA_KEY).read_bytes()
    with pytest.raises(ConfigError, match="already exists.*--force"):
        certs.make_ca(ca_dir)
    assert (ca_dir / certs.CA_KEY).read_bytes() == before
    certs.make_ca(ca_dir, force=True)
    assert (ca_dir / certs.CA_KEY).read_bytes() != before


def test_bad_input_names_the_fix(tmp_path, ca_dir):
    with pytest.raises(ConfigError, match="fedpeft certs ca"):
        certs.make_server_cert(tmp_path / "srv", tmp_path / "no-ca")
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        certs.make_server_cert(tmp_path / "srv", ca_dir, ["bad host!"])
    with pytest.raises(ConfigError, match="node name"):
        certs.make_node_keys(tmp_path, "../escape")
    with pytest.raises(ConfigError, match="--days"):
        certs.make_ca(tmp_path / "ca2", days=0)


def test_cli_writes_a_deployment_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "certs"
    assert cli.main(["certs", "ca", "--out", str(out)]) == 0
    assert cli.main(["certs", "server", "--out", str(out), "--host", "10.0.0.7"]) == 0
    assert cli.main(["certs", "node", "node-1", "node-2", "--out", str(out / "keys")]) == 0
    names = {p.name for p in out.rglob("*") if p.is_file()}
    assert names == {"ca.crt", "ca.key", "server.pem", "server.key"} | {
        f"node-{i}.{s}" for i in (1, 2) for s in ("key", "pub")
    }
    capsys.readouterr()
    assert cli.main(["certs", "server", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--force" in err[0]
