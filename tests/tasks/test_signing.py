"""Signed approval statements, made and checked with the real ssh-keygen."""

from __future__ import annotations

import base64
import hashlib
import pickle
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from core.errors import ApprovalError, ConfigError, SignatureRefused, SigningError
from tasks.signing import (
    NAMESPACE,
    ApprovalStatement,
    key_fingerprint,
    parse_allowed_signers,
    sign_statement,
    statement_from_json,
    verify_statement,
)

RUN_ID = "0b6f3c52-8d0e-4a43-9a53-6d8a2b1f0c11"
AUTH = "sha256:" + "a" * 64
MEDIA = "sha256:" + "b" * 64


@dataclass(frozen=True)
class Key:
    private: Path
    public: str  # "ssh-ed25519 AAAA..."

    def line(self, principal: str) -> str:
        return f"{principal} {self.public}\n"


def _keygen(tmp_path: Path, name: str) -> Key:
    path = tmp_path / name
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True
    )
    kind, blob, *_ = path.with_suffix(".pub").read_text().split()
    return Key(path, f"{kind} {blob}")


@pytest.fixture
def alice(tmp_path: Path) -> Key:
    return _keygen(tmp_path, "alice")


@pytest.fixture
def bob(tmp_path: Path) -> Key:
    return _keygen(tmp_path, "bob")


def _statement(**changes: object) -> ApprovalStatement:
    fields: dict[str, object] = {
        "run_id": RUN_ID,
        "environment": "production",
        "release_id": "3f9a0c1b2d4e",
        "digests": {"auth": AUTH, "media": MEDIA},
        "extra_env": {"auth": {"FEATURE_X": "on"}},
        "decision": "approve",
        "reason": "",
        "signed_at": datetime(2025, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        "signer": "alice",
    }
    fields.update(changes)
    return ApprovalStatement.model_validate(fields)


def _changed(statement: ApprovalStatement, **changes: object) -> ApprovalStatement:
    return ApprovalStatement.model_validate({**statement.model_dump(), **changes})


# --- the statement ----------------------------------------------------------------------


def test_canonical_is_sorted_compact_utf8_and_normalised() -> None:
    statement = _statement(
        digests={"media": MEDIA, "auth": AUTH},
        reason="grün",
        signed_at=datetime(2025, 5, 1, 14, 30, 15, 999, tzinfo=timezone(timedelta(hours=2))),
    )
    text = statement.canonical().decode("utf-8")
    assert text == (
        '{"decision":"approve","digests":{"auth":"' + AUTH + '","media":"' + MEDIA + '"},'
        '"environment":"production","extra_env":{"auth":{"FEATURE_X":"on"}},'
        '"format":"elice-devops-approval/v1","reason":"grün","release_id":"3f9a0c1b2d4e",'
        '"run_id":"' + RUN_ID + '","signed_at":"2025-05-01T12:30:15Z","signer":"alice"}'
    )
    same = _statement(run_id=RUN_ID.upper(), reason="grün")
    assert same.canonical() == statement.canonical()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"run_id": "not-a-uuid"}, "run_id"),
        ({"environment": "Prod"}, "environment"),
        ({"release_id": "3f9a0c1b2d4e\n"}, "release_id"),
        ({"digests": {}}, "digests"),
        ({"digests": {"auth": "sha256:abc"}}, "digests"),
        ({"extra_env": {"auth": {"BAD-NAME": "x"}}}, "extra_env"),
        ({"decision": "maybe"}, "decision"),
        ({"signed_at": datetime(2025, 5, 1, 12, 0)}, "timezone-aware"),
        ({"signer": "-I"}, "signer"),
        ({"signer": "alice,bob"}, "signer"),
        ({"decision": "reject", "reason": "  "}, "needs a reason"),
    ],
)
def test_statement_refuses_bad_fields(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        _statement(**changes)


def test_statement_is_frozen_and_round_trips_through_json() -> None:
    statement = _statement()
    with pytest.raises(ValueError, match="frozen"):
        statement.decision = "reject"  # type: ignore[misc]
    assert statement_from_json(statement.model_dump_json()) == statement
    assert statement_from_json(statement.model_dump(mode="json")) == statement
    with pytest.raises(SignatureRefused, match="run_id"):
        statement_from_json('{"run_id": "x"}')


# --- allowed signers --------------------------------------------------------------------


def test_parse_allowed_signers(alice: Key, bob: Key) -> None:
    text = (
        "# approvers\n\n"
        + alice.line("alice")
        + f'bob namespaces="{NAMESPACE}" {bob.public} bob@laptop\n'
    )
    assert parse_allowed_signers(text) == {"alice": (alice.public,), "bob": (bob.public,)}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("* {a}", "not a plain approver name"),
        ("!mallory {a}", "not a plain approver name"),
        ("alice,bob {a}", "one key proves one approver"),
        ("alice {a}\ncarol {a}", "one key proves one approver"),
        ("alice cert-authority {a}", "cert-authority"),
        ("alice", "no public key"),
        ("alice ssh-ed25519", "no public key"),
    ],
)
def test_parse_allowed_signers_refuses_ambiguity(alice: Key, line: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_allowed_signers(line.format(a=alice.public))


# --- sign and verify --------------------------------------------------------------------


def test_good_signature_verifies_and_names_the_key(alice: Key, bob: Key) -> None:
    statement = _statement()
    signature = sign_statement(statement, alice.private)
    assert signature.startswith("-----BEGIN SSH SIGNATURE-----")
    allowed = alice.line("alice") + bob.line("bob")
    assert verify_statement(statement, signature, allowed) == "alice"

    expected = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(alice.private.with_suffix(".pub"))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[1]
    assert key_fingerprint(signature) == expected

    rejection = _statement(decision="reject", reason="error rate up", signer="bob")
    assert verify_statement(rejection, sign_statement(rejection, bob.private), allowed) == "bob"


def test_signature_checked_by_ssh_keygen_itself(alice: Key, tmp_path: Path) -> None:
    """What the module signs is the canonical statement, in the project's namespace."""
    statement = _statement()
    sig = tmp_path / "s.sig"
    sig.write_text(sign_statement(statement, alice.private))
    signers = tmp_path / "allowed"
    signers.write_text(alice.line("alice"))
    args = ["-Y", "verify", "-f", str(signers), "-I", "alice", "-n", NAMESPACE, "-s", str(sig)]
    done = subprocess.run(
        ["ssh-keygen", *args],
        input=statement.canonical(),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "tamper",
    [
        {"digests": {"auth": "sha256:" + "c" * 64, "media": MEDIA}},
        {"digests": {"auth": AUTH}},
        {"decision": "reject", "reason": "flipped"},
        {"run_id": "0b6f3c52-8d0e-4a43-9a53-6d8a2b1f0c12"},
        {"environment": "staging"},
        {"release_id": "000000000000"},
        {"extra_env": {}},
        {"extra_env": {"auth": {"FEATURE_X": "off"}}},
        {"reason": "added later"},
        {"signed_at": datetime(2025, 5, 1, 12, 30, 16, tzinfo=UTC)},
    ],
)
def test_tampered_statement_is_refused(alice: Key, tamper: dict[str, object]) -> None:
    statement = _statement()
    signature = sign_statement(statement, alice.private)
    with pytest.raises(SignatureRefused, match="not good for this statement"):
        verify_statement(_changed(statement, **tamper), signature, alice.line("alice"))


def test_other_namespace_is_refused(alice: Key, tmp_path: Path) -> None:
    statement = _statement()
    done = subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(alice.private), "-n", "git"],
        input=statement.canonical(),
        capture_output=True,
        check=True,
    )
    with pytest.raises(SignatureRefused, match="namespace 'git'"):
        verify_statement(statement, done.stdout.decode(), alice.line("alice"))


def test_namespace_restriction_in_allowed_signers_is_honoured(alice: Key) -> None:
    statement = _statement()
    signature = sign_statement(statement, alice.private)
    restricted = f'alice namespaces="git" {alice.public}\n'
    with pytest.raises(SignatureRefused, match="not permitted for use in signature namespace"):
        verify_statement(statement, signature, restricted)


def test_key_not_in_allowed_signers_is_refused(alice: Key, bob: Key) -> None:
    statement = _statement(signer="bob")
    signature = sign_statement(statement, alice.private)
    fingerprint = key_fingerprint(signature)
    with pytest.raises(SignatureRefused, match="not in the allowed signers") as info:
        verify_statement(statement, signature, bob.line("bob"))
    assert fingerprint in str(info.value)
    with pytest.raises(SignatureRefused, match="empty"):
        verify_statement(statement, signature, "# nobody yet\n")


def test_signer_claiming_another_principal_is_refused(alice: Key, bob: Key) -> None:
    """Mallory (bob's key here) signs a statement that says alice approved."""
    claims_alice = _statement(signer="alice")
    signature = sign_statement(claims_alice, bob.private)
    allowed = alice.line("alice") + bob.line("bob")
    with pytest.raises(SignatureRefused, match=r"claims signer 'alice'.*belongs to bob"):
        verify_statement(claims_alice, signature, allowed)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "approved",
        "-----BEGIN SSH SIGNATURE-----\nnot base64!\n-----END SSH SIGNATURE-----",
        "-----BEGIN SSH SIGNATURE-----\n"
        + base64.b64encode(b"SSHSIG\x00\x00\x00\x01\xff\xff").decode()
        + "\n-----END SSH SIGNATURE-----",
        "-----BEGIN SSH SIGNATURE-----\n"
        + base64.b64encode(b"x" * 64).decode()
        + "\n-----END SSH SIGNATURE-----",
        "-----BEGIN SSH SIGNATURE-----\n" + "A" * 20_000 + "\n-----END SSH SIGNATURE-----",
    ],
)
def test_garbage_signature_is_refused(alice: Key, garbage: str) -> None:
    with pytest.raises(SignatureRefused, match="signature"):
        verify_statement(_statement(), garbage, alice.line("alice"))


def test_signature_with_a_corrupted_body_is_refused(alice: Key) -> None:
    statement = _statement()
    lines = sign_statement(statement, alice.private).splitlines()
    body = base64.b64decode("".join(lines[1:-1]))
    flipped = body[:-1] + bytes([body[-1] ^ 1])  # the last byte of the ed25519 signature
    encoded = base64.b64encode(flipped).decode()
    forged = "\n".join([lines[0], encoded, lines[-1]])
    with pytest.raises(SignatureRefused, match="not good for this statement"):
        verify_statement(statement, forged, alice.line("alice"))


def test_signing_errors_are_clear(tmp_path: Path, alice: Key) -> None:
    with pytest.raises(SigningError, match="no such file"):
        sign_statement(_statement(), tmp_path / "missing")
    not_a_key = tmp_path / "not-a-key"
    not_a_key.write_text("hello\n")
    with pytest.raises(SigningError, match="could not sign with"):
        sign_statement(_statement(), not_a_key)
    assert issubclass(SigningError, ApprovalError)
    assert issubclass(SignatureRefused, ApprovalError)


def test_errors_survive_pickling(alice: Key, bob: Key) -> None:
    statement = _statement()
    signature = sign_statement(statement, bob.private)
    with pytest.raises(SignatureRefused) as info:
        verify_statement(statement, signature, alice.line("alice") + bob.line("bob"))
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is SignatureRefused
    assert str(copy) == str(info.value)


def test_fingerprint_matches_the_public_key_blob(alice: Key) -> None:
    blob = base64.b64decode(alice.public.split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert key_fingerprint(sign_statement(_statement(), alice.private)) == expected
