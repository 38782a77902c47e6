"""Test certificates made with openssl: a CA, server and client certificates, expired ones."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Pki", "needs_openssl", "new_token"]

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificates")

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def new_token() -> tuple[str, str]:
    """A random token and its SHA-256 hex digest (what the daemon's settings hold)."""
    token = secrets.token_urlsafe(24)
    return token, hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Pair:
    """A certificate and its key."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


class Pki:
    """Certificate authorities and the certificates they sign, in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str) -> Pair:
        """A self-signed CA."""
        pair = Pair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        _openssl(
            "req", "-x509", *_EC, "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "2", "-subj", f"/CN={name}"
        )
        return pair

    def issue(self, name: str, ca: Pair, *, cn: str, san: str | None = None, days: int = 2) -> Pair:
        """A certificate signed by ``ca``; ``days=-1`` makes one that has already expired."""
        pair = Pair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        csr = self.directory / f"{name}.csr"
        _openssl("req", "-new", *_EC, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={cn}")
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
            "-days", str(days), "-extfile", str(extensions), "-out", str(pair.cert),
        )  # fmt: skip
        return pair

    def server(self, ca: Pair, name: str = "server") -> Pair:
        """A daemon certificate for localhost and 127.0.0.1."""
        return self.issue(name, ca, cn="localhost", san="DNS:localhost,IP:127.0.0.1")
