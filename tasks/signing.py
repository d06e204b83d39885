"""SSH signatures over approval statements, made and checked by OpenSSH's `ssh-keygen -Y`.

An approver signs an `ApprovalStatement` (what is approved or rejected, by whom, when)
with their SSH key; the pipeline verifies the signature against an allowed-signers file
whose principals are the approvers' names. All cryptography is OpenSSH's: this module
builds the bytes that are signed, runs `ssh-keygen`, and reads its verdict.

    sign_statement(statement, key_path)               -> armored signature (str)
    verify_statement(statement, signature, allowed)   -> the principal the signature proves
    key_fingerprint(signature)                        -> "SHA256:..." of the signing key
    parse_allowed_signers(text)                       -> principal -> public keys

Errors (defined in core.errors, below ApprovalError):

    ApprovalError
    ├── SigningError       ssh-keygen could not sign or check (missing, no key, timeout)
    └── SignatureRefused   the signature does not prove this statement by its signer
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import ConfigError, SignatureRefused, SigningError

NAMESPACE = "elice-devops-approval@elice"
"""The `ssh-keygen -n` namespace: a signature made for anything else never verifies here."""

STATEMENT_FORMAT = "elice-devops-approval/v1"
REQUEST_FORMAT = "elice-devops-promotion-request/v1"
PRINCIPAL_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}"
"""What an approver's name (an allowed-signers principal) may look like."""

SIGN_TIMEOUT_S = 120.0  # a passphrase prompt on the terminal counts against it
VERIFY_TIMEOUT_S = 30.0
MAX_SIGNATURE_CHARS = 16_384

_PRINCIPAL = re.compile(PRINCIPAL_PATTERN)
_NAME = re.compile(r"[a-z][a-z0-9-]{0,38}[a-z0-9]")
_RELEASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"
_KEY_TYPE = re.compile(
    r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)"
    r"|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
)


def canonical(document: dict[str, Any]) -> bytes:
    """The signed bytes of `document`: keys sorted at every level, no whitespace between
    tokens, non-ASCII as itself, UTF-8; `signed_at` as `YYYY-MM-DDTHH:MM:SSZ`."""
    fields = {**document, "signed_at": document["signed_at"].strftime("%Y-%m-%dT%H:%M:%SZ")}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8")


def environment_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        msg = f"environment must be a DNS-1123 label, got {value!r}"
        raise ValueError(msg)
    return value


def utc_second(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        msg = "signed_at must be timezone-aware"
        raise ValueError(msg)
    return value.astimezone(UTC).replace(microsecond=0)


def principal(value: str) -> str:
    if not _PRINCIPAL.fullmatch(value):
        msg = f"signer must match {PRINCIPAL_PATTERN}, got {value!r}"
        raise ValueError(msg)
    return value


class ApprovalStatement(BaseModel):
    """What an approver signs: one decision about one promotion run, every digest included.

    Values are normalised on construction (run id as a lower-case UUID, `signed_at` in UTC
    to the second), so a statement rebuilt from its fields signs the same bytes.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str = Field(description="The paused promotion's flow run id (a UUID)")
    environment: str = Field(description="The target environment, e.g. production")
    release_id: str = Field(description="The promotion's release id")
    digests: dict[str, str] = Field(
        min_length=1, description="service -> the sha256 image digest it will run"
    )
    extra_env: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="service -> extra container variables deployed with it"
    )
    decision: Literal["approve", "reject"] = Field(description="approve or reject")
    reason: str = Field(default="", max_length=2000, description="Why (required to reject)")
    signed_at: datetime = Field(description="When the approver decided (timezone-aware)")
    signer: str = Field(description="The principal (approver name) the signer claims to be")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str) -> str:
        try:
            return str(UUID(value))
        except ValueError:
            msg = f"run_id must be a flow run UUID, got {value!r}"
            raise ValueError(msg) from None

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        return environment_name(value)

    @field_validator("release_id")
    @classmethod
    def _release_id(cls, value: str) -> str:
        if not _RELEASE.fullmatch(value):
            msg = f"release_id must match {_RELEASE.pattern}, got {value!r}"
            raise ValueError(msg)
        return value

    @field_validator("digests")
    @classmethod
    def _digests(cls, value: dict[str, str]) -> dict[str, str]:
        for service, digest in value.items():
            if not _NAME.fullmatch(service):
                msg = f"digests: {service!r} is not a service name (DNS-1123 label)"
                raise ValueError(msg)
            if not _DIGEST.fullmatch(digest):
                msg = f"digests: {service}: {digest!r} is not a sha256:<64 hex> digest"
                raise ValueError(msg)
        return value

    @field_validator("extra_env")
    @classmethod
    def _extra_env(cls, value: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        for key, variables in value.items():
            if not key or key != key.strip():
                msg = f"extra_env: {key!r} is not a service name"
                raise ValueError(msg)
            for name in variables:
                if not _ENV_VAR.fullmatch(name):
                    msg = f"extra_env: {key}: {name!r} is not an environment variable name"
                    raise ValueError(msg)
        return value

    @field_validator("signed_at")
    @classmethod
    def _signed_at(cls, value: datetime) -> datetime:
        return utc_second(value)

    @field_validator("signer")
    @classmethod
    def _signer(cls, value: str) -> str:
        return principal(value)

    @model_validator(mode="after")
    def _reason(self) -> ApprovalStatement:
        if self.decision == "reject" and not self.reason.strip():
            msg = "a rejection needs a reason"
            raise ValueError(msg)
        return self

    def canonical(self) -> bytes:
        """The exact bytes that are signed.

        A JSON object with the keys sorted at every level, no whitespace between tokens
        (`separators=(",", ":")`), non-ASCII characters as themselves, encoded as UTF-8;
        `format` names this layout, `signed_at` is `YYYY-MM-DDTHH:MM:SSZ`.
        """
        document: dict[str, Any] = {
            "format": STATEMENT_FORMAT,
            "run_id": self.run_id,
            "environment": self.environment,
            "release_id": self.release_id,
            "digests": self.digests,
            "extra_env": self.extra_env,
            "decision": self.decision,
            "reason": self.reason,
            "signed_at": self.signed_at,
            "signer": self.signer,
        }
        return canonical(document)


class PromotionRequest(BaseModel):
    """What a promoter signs to be known as who they are: where, what, when, and (for a
    workflow's key) the person the workflow ran for."""

    model_config = ConfigDict(frozen=True)

    environment: str = Field(description="The target environment")
    services: tuple[str, ...] = Field(default=(), description="The services asked for (sorted)")
    actor: str = Field(default="", max_length=100, description="A workflow's triggering login")
    signed_at: datetime = Field(description="When the request was made (timezone-aware)")
    signer: str = Field(description="The principal the signer claims to be")

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str) -> str:
        return environment_name(value)

    @field_validator("signed_at")
    @classmethod
    def _signed_at(cls, value: datetime) -> datetime:
        return utc_second(value)

    @field_validator("signer")
    @classmethod
    def _signer(cls, value: str) -> str:
        return principal(value)

    @field_validator("services")
    @classmethod
    def _services(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for service in value:
            if not _NAME.fullmatch(service):
                msg = f"services: {service!r} is not a service name"
                raise ValueError(msg)
        return tuple(sorted(set(value)))

    def canonical(self) -> bytes:
        """The exact bytes that are signed (same layout rules as `ApprovalStatement`)."""
        document = {
            "format": REQUEST_FORMAT,
            "environment": self.environment,
            "services": list(self.services),
            "actor": self.actor,
            "signed_at": self.signed_at,
            "signer": self.signer,
        }
        return canonical(document)


class Signable(Protocol):
    """A statement that can be signed: its claimed signer and its canonical bytes."""

    @property
    def signer(self) -> str: ...

    def canonical(self) -> bytes: ...


# --- allowed signers ----------------------------------------------------------------------


def parse_allowed_signers(text: str) -> dict[str, tuple[str, ...]]:
    """principal -> its public keys ("type base64"), from allowed-signers file content.

    Stricter than OpenSSH, so that a key proves one name: every principal is a plain
    approver name (no patterns, no negation), a key belongs to one principal only, and
    `cert-authority` lines are refused.

    Raises:
        ConfigError: a line breaks one of those rules or has no public key.
    """
    keys: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"allowed signers line {number}"
        at = next((i for i, f in enumerate(fields) if i > 0 and _KEY_TYPE.fullmatch(f)), None)
        if at is None or at + 1 >= len(fields):
            msg = f"{where}: no public key (expected: principal [options] type base64)"
            raise ConfigError(msg)
        if any("cert-authority" in f.lower() for f in fields[1:at]):
            msg = f"{where}: cert-authority is not accepted: list each approver's own key"
            raise ConfigError(msg)
        key = f"{fields[at]} {fields[at + 1]}"
        for signer in fields[0].split(","):
            if not _PRINCIPAL.fullmatch(signer):
                msg = f"{where}: principal {signer!r} is not a plain approver name"
                raise ConfigError(msg)
            if owner.setdefault(key, signer) != signer:
                msg = (
                    f"{where}: the key of {owner[key]!r} is listed for {signer!r} too: "
                    "one key proves one approver"
                )
                raise ConfigError(msg)
            if key not in keys.get(signer, ()):
                keys[signer] = (*keys.get(signer, ()), key)
    return keys


# --- signatures ---------------------------------------------------------------------------


def _read_string(blob: bytes, at: int) -> tuple[bytes, int]:
    if at + 4 > len(blob):
        raise ValueError
    size = int.from_bytes(blob[at : at + 4], "big")
    end = at + 4 + size
    if end > len(blob):
        raise ValueError
    return blob[at + 4 : end], end


def _signature_fields(signature: str) -> tuple[bytes, str]:
    """(public key blob, namespace) of an armored SSH signature.

    Raises:
        SignatureRefused: not an armored SSH signature.
    """
    text = signature.strip()
    if len(text) > MAX_SIGNATURE_CHARS or not (
        text.startswith(_ARMOR_BEGIN) and text.endswith(_ARMOR_END)
    ):
        msg = "not an armored SSH signature (-----BEGIN SSH SIGNATURE----- ...)"
        raise SignatureRefused(msg)
    body = "".join(text[len(_ARMOR_BEGIN) : -len(_ARMOR_END)].split())
    malformed = "the SSH signature is malformed (not an SSHSIG version 1 blob)"
    try:
        blob = base64.b64decode(body, validate=True)
    except binascii.Error:
        raise SignatureRefused(malformed) from None
    if not blob.startswith(b"SSHSIG") or int.from_bytes(blob[6:10], "big") != 1:
        raise SignatureRefused(malformed)
    try:
        public_key, at = _read_string(blob, 10)
        namespace, _ = _read_string(blob, at)
        return public_key, namespace.decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise SignatureRefused(malformed) from None


def key_fingerprint(signature: str) -> str:
    """The signing key's fingerprint, as `ssh-keygen -l` prints it ("SHA256:...").

    Raises:
        SignatureRefused: not an armored SSH signature.
    """
    public_key, _ = _signature_fields(signature)
    digest = base64.b64encode(hashlib.sha256(public_key).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _ssh_keygen() -> str:
    found = shutil.which("ssh-keygen")
    if found is None:
        msg = "ssh-keygen not found: install OpenSSH's client (Debian: openssh-client)"
        raise SigningError(msg)
    return found


def _run(args: list[str], data: bytes, timeout: float) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            [_ssh_keygen(), *args],
            input=data,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        msg = f"ssh-keygen -Y {args[1]} did not finish within {timeout:.0f}s"
        raise SigningError(msg) from None
    except OSError as exc:
        msg = f"cannot run ssh-keygen: {exc.strerror}"
        raise SigningError(msg) from exc


def _said(done: subprocess.CompletedProcess[bytes], tmp: str = "") -> str:
    text = done.stderr.decode("utf-8", "replace")
    if tmp:
        text = text.replace(tmp + "/", "")
    lines = text.strip().splitlines()
    return "; ".join(line for line in lines[-3:] if line) or f"exit status {done.returncode}"


def sign_statement(
    statement: Signable, key_path: Path | str, *, timeout: float = SIGN_TIMEOUT_S
) -> str:
    """Sign `statement.canonical()` with the SSH key at `key_path`; the armored signature.

    `key_path` is a private key, or a public key whose private half ssh-agent holds. A
    passphrase is asked for on the terminal by ssh-keygen itself.

    Raises:
        SigningError: no such key, ssh-keygen missing, or it could not sign.
    """
    key = Path(key_path).expanduser()
    if not key.is_file():
        msg = f"signing key {key}: no such file"
        raise SigningError(msg)
    done = _run(["-Y", "sign", "-f", str(key), "-n", NAMESPACE], statement.canonical(), timeout)
    signature = done.stdout.decode("ascii", "replace").strip()
    if done.returncode != 0 or not signature.startswith(_ARMOR_BEGIN):
        msg = f"ssh-keygen could not sign with {key}: {_said(done)}"
        raise SigningError(msg)
    return signature + "\n"


def _check_signer(
    statement: Signable,
    sig_file: Path,
    signers_file: Path,
    public_key: bytes,
    fingerprint: str,
    allowed: Mapping[str, Sequence[str]],
    timeout: float,
) -> None:
    """The signing key is allowed, and it is the claimed signer's; else SignatureRefused."""
    found = _run(
        ["-Y", "find-principals", "-s", str(sig_file), "-f", str(signers_file)], b"", timeout
    )
    principals = found.stdout.decode("utf-8", "replace").split()
    if found.returncode != 0 or not principals:
        msg = f"key {fingerprint} is not in the allowed signers"
        raise SignatureRefused(msg)
    if principals != [statement.signer]:
        msg = (
            f"statement claims signer {statement.signer!r}, "
            f"but key {fingerprint} belongs to {', '.join(principals)}"
        )
        raise SignatureRefused(msg)
    blob = base64.b64encode(public_key).decode()
    if not any(k.split()[1] == blob for k in allowed.get(statement.signer, ())):
        msg = f"key {fingerprint} is not listed for {statement.signer!r}"
        raise SignatureRefused(msg)


def verify_statement(
    statement: Signable,
    signature: str,
    allowed_signers: str,
    *,
    timeout: float = VERIFY_TIMEOUT_S,
) -> str:
    """The principal whose key signed exactly `statement`; refuses anything less.

    The signing key is looked up in `allowed_signers` (file content: principals are
    approver names); it must belong to `statement.signer`, and ssh-keygen must find the
    signature good for this statement's canonical bytes and `NAMESPACE`. Nothing in the
    statement is trusted except as the data that was signed.

    Raises:
        SignatureRefused: malformed signature, other namespace, key not allowed, key of
            another principal than the claimed signer, or a bad signature.
        ConfigError: `allowed_signers` breaks the rules of `parse_allowed_signers`.
        SigningError: ssh-keygen could not run.
    """
    public_key, namespace = _signature_fields(signature)
    fingerprint = key_fingerprint(signature)
    if namespace != NAMESPACE:
        msg = f"signature made for namespace {namespace!r}, not {NAMESPACE!r}"
        raise SignatureRefused(msg)
    allowed = parse_allowed_signers(allowed_signers)
    if not allowed:
        msg = "the allowed signers list is empty: no signature can be accepted"
        raise SignatureRefused(msg)
    with tempfile.TemporaryDirectory(prefix="elice-verify-") as tmp:
        sig_file, signers_file = Path(tmp) / "statement.sig", Path(tmp) / "allowed_signers"
        sig_file.write_text(signature.strip() + "\n", encoding="ascii")
        signers_file.write_text(allowed_signers, encoding="utf-8")
        _check_signer(statement, sig_file, signers_file, public_key, fingerprint, allowed, timeout)
        verified = _run(
            [
                "-Y",
                "verify",
                "-f",
                str(signers_file),
                "-I",
                statement.signer,
                "-n",
                NAMESPACE,
                "-s",
                str(sig_file),
            ],
            statement.canonical(),
            timeout,
        )
        if verified.returncode != 0:
            msg = (
                f"signature by {statement.signer!r} (key {fingerprint}) is not good for "
                f"this statement: {_said(verified, tmp)}"
            )
            raise SignatureRefused(msg)
    return statement.signer


def statement_from_json(data: str | bytes | Mapping[str, Any]) -> ApprovalStatement:
    """An `ApprovalStatement` from its JSON (or an already parsed mapping).

    Raises:
        SignatureRefused: not a valid statement (the message names the field).
    """
    try:
        if isinstance(data, Mapping):
            return ApprovalStatement.model_validate(dict(data))
        return ApprovalStatement.model_validate_json(data)
    except ValueError as exc:
        msg = f"not a valid approval statement: {exc}"
        raise SignatureRefused(msg) from exc
