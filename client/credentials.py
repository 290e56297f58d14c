"""Which credentials a client command uses: a token (flag, file or env), a CA, or --insecure."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from polyarch.proto.trust import ClientTrust, fetch_pinned_ca, parse_token

TOKEN_ENV = "POLYARCH_TOKEN"
TOKEN_FILE_ENV = "POLYARCH_TOKEN_FILE"
CA_FILE_ENV = "POLYARCH_CA_FILE"
INSECURE_ENV = "POLYARCH_INSECURE"


class CredentialsError(Exception):
    """Credentials given wrongly (unreadable file, malformed token); exit code 2."""


@dataclass(frozen=True)
class Credentials:
    """What the user gave. `resolve` turns it into a ClientTrust (may dial to pin the CA)."""

    token: str | None = None
    ca_pem: bytes | None = None
    insecure: bool = False
    server_name: str | None = None

    def __repr__(self) -> str:  # never print the token
        return f"Credentials(token={'set' if self.token else None}, insecure={self.insecure})"

    def resolve(self, address: str) -> ClientTrust:
        """Blocking: with a token and no CA file, reads the coordinator's CA from its TLS
        chain and accepts it only if it matches the token's pin."""
        if self.insecure:
            return ClientTrust(insecure=True)
        root = self.ca_pem
        if root is None and self.token is not None:
            pin = parse_token(self.token).ca_sha256
            if pin is not None:
                root = fetch_pinned_ca(address, pin)
        return ClientTrust(root_pem=root, token=self.token, server_name=self.server_name)


def read_secret_file(path: str, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not text:
        raise CredentialsError(f"{what} {path} is empty")
    return text


def credentials_from_args(args: argparse.Namespace, require_token: bool = True) -> Credentials:
    """--insecure / $POLYARCH_INSECURE=1, --token / --token-file / $POLYARCH_TOKEN(_FILE),
    --ca-file / $POLYARCH_CA_FILE, --tls-server-name."""
    insecure = bool(getattr(args, "insecure", False)) or os.environ.get(INSECURE_ENV) == "1"
    if insecure:
        return Credentials(insecure=True)
    token = getattr(args, "token", None)
    token_file = getattr(args, "token_file", None)
    if token and token_file:
        raise CredentialsError("give --token or --token-file, not both")
    if token_file:
        token = read_secret_file(token_file, "token file")
    if not token:
        token = os.environ.get(TOKEN_ENV) or None
    if not token and os.environ.get(TOKEN_FILE_ENV):
        token = read_secret_file(os.environ[TOKEN_FILE_ENV], f"${TOKEN_FILE_ENV}")
    if token:
        try:
            parse_token(token)
        except ValueError as exc:
            raise CredentialsError(str(exc)) from None
    if not token and require_token:
        raise CredentialsError(
            "no token: pass --token, --token-file or $POLYARCH_TOKEN (an admin finds the first "
            "one in the coordinator's DATA_DIR/admin.token), or --insecure for a coordinator "
            "started with --insecure"
        )
    ca_file = getattr(args, "ca_file", None) or os.environ.get(CA_FILE_ENV)
    ca_pem = None
    if ca_file:
        try:
            ca_pem = Path(ca_file).read_bytes()
        except OSError as exc:
            raise CredentialsError(f"cannot read CA file {ca_file}: {exc.strerror}") from None
    return Credentials(token, ca_pem, False, getattr(args, "tls_server_name", None))


def add_credential_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every client command (and the agent, for enrolment) takes."""
    add = parser.add_argument
    add("--token", metavar="TOKEN", help=f"API token (or ${TOKEN_ENV}, ${TOKEN_FILE_ENV})")
    add("--token-file", metavar="FILE", help="file holding the token")
    add("--ca-file", metavar="PEM", help=f"trust this CA, not the token's pin (${CA_FILE_ENV})")
    add("--tls-server-name", metavar="NAME", help="name in the coordinator's certificate")
    add("--insecure", action="store_true",
        help=f"plaintext, no token, for a --insecure coordinator (${INSECURE_ENV}=1)")  # fmt: skip
