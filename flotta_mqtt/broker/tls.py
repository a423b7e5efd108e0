"""Certificates for a TLS listener: a private CA, the broker's certificate, client certificates.

Made with the `openssl` CLI (EC P-256: instant to generate, supported by mosquitto and
Python's ssl). For development, tests and small deployments that have no PKI of their own.
The CA key never leaves the output directory; only the broker's key is handed to the broker
(see `identities.broker_readable`).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flotta_mqtt.broker.identities import NAME, broker_readable, write_private

CA_DAYS = 3650
CERT_DAYS = 825  # what browsers and most TLS stacks accept for a leaf certificate
DEFAULT_NAMES = ("localhost", "127.0.0.1")
HOST_NAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*$"
)


@dataclass
class TlsFiles:
    """Where the generated files are. `clients` maps a client's name to (cert, key)."""

    ca_file: Path
    ca_key: Path
    cert_file: Path
    key_file: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)


def generate_tls(
    out_dir: Path,
    names: Sequence[str] = (),
    clients: Sequence[str] = (),
    server_name: str = "flotta-mqtt broker",
) -> TlsFiles:
    """Write ca.crt/ca.key (kept if present), server.crt/key and `<client>.crt/key`.

    The server certificate is valid for localhost, 127.0.0.1 and `names` (host names or IP
    addresses). A client certificate's subject CN is the client's name, which the broker
    can take as the username (`use_identity_as_username`).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not installed (Debian: apt-get install openssl)")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(
        ca_file=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        cert_file=out_dir / "server.crt",
        key_file=out_dir / "server.key",
    )
    if not (files.ca_file.exists() and files.ca_key.exists()):
        write_private(files.ca_key, "")
        _run(
            openssl,
            "req", "-x509", "-new", *_NEW_KEY, "-keyout", files.ca_key, "-out", files.ca_file,
            "-days", str(CA_DAYS), "-subj", "/CN=flotta-mqtt CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        files.ca_file.chmod(0o644)
    alt_names = ",".join(_alt_name(name) for name in dict.fromkeys([*DEFAULT_NAMES, *names]))
    _issue(
        openssl,
        files,
        subject=server_name,
        extensions=f"subjectAltName={alt_names}\nextendedKeyUsage=serverAuth\n",
        cert=files.cert_file,
        key=files.key_file,
    )
    files.cert_file.chmod(0o644)
    broker_readable(files.key_file)
    for client in clients:
        if not NAME.fullmatch(client):
            raise ValueError(f"{client!r} is not a node name")
        cert, key = out_dir / f"{client}.crt", out_dir / f"{client}.key"
        _issue(
            openssl,
            files,
            subject=client,
            extensions="extendedKeyUsage=clientAuth\n",
            cert=cert,
            key=key,
        )
        cert.chmod(0o644)
        key.chmod(0o600)  # the client's own, like its password
        files.clients[client] = (cert, key)
    return files


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _issue(
    openssl: str, files: TlsFiles, subject: str, extensions: str, cert: Path, key: Path
) -> None:
    """Make a key and a certificate for `subject`, signed by the CA."""
    with tempfile.TemporaryDirectory() as scratch:
        request, extfile = Path(scratch) / "request.csr", Path(scratch) / "ext.cnf"
        extfile.write_text(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n" + extensions
        )
        write_private(key, "")  # openssl keeps the mode of the file it overwrites
        _run(openssl, "req", "-new", *_NEW_KEY, "-keyout", key, "-out", request, "-subj",
             f"/CN={subject}")  # fmt: skip
        _run(
            openssl,
            "x509", "-req", "-in", request, "-CA", files.ca_file, "-CAkey", files.ca_key,
            "-set_serial", str(secrets.randbits(63)), "-days", str(CERT_DAYS),
            "-extfile", extfile, "-out", cert,
        )  # fmt: skip


def _alt_name(name: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(name)}"
    except ValueError:
        pass
    if not HOST_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is neither a host name nor an IP address")
    return f"DNS:{name}"


def _run(*args: str | Path) -> None:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} failed: {result.stderr.strip()}")
