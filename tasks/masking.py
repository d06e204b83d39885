"""Secret values kept out of everything the pipeline shows: logs, artifacts, notices.

Two sources of secrets feed `scrub`: the values a caller names (a notice's webhook URL, a
registry login), and the values this process has been told to mask (`mask`) when it
loaded them: registry passwords, ECR tokens, the repository's read token. `run_tool`
scrubs every tool's output against both before anyone reads it, as a CI system masks
its secrets in a job log.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote, urlsplit

MIN_SECRET_PART = 8  # a URL part shorter than this is no secret by itself (see secret_parts)
MIN_MASKED = 6  # shorter values are not masked: replacing them would garble ordinary text

_masked: set[str] = set()
_masked_lock = threading.Lock()


def secret_parts(secret: str) -> set[str]:
    """`secret`, and the parts of it that are secret alone when it is an http(s) URL.

    An endpoint may echo only the path or the query of a webhook URL
    (`/services/T.../B.../XXXX`): the parts are the path, the path with the query, every
    tail of the path after its first segment (`T.../B.../XXXX`, `B.../XXXX`, `XXXX`; the
    only segment of a one-segment path), the query and each query value, and a password.
    Parts shorter than `MIN_SECRET_PART` characters alone are left in place.
    """
    parts = {secret}
    url = urlsplit(secret)
    if url.scheme not in ("http", "https") or not url.netloc:
        return parts
    segments = [s for s in url.path.split("/") if s]
    tails = ["/".join(segments[i:]) for i in range(1 if len(segments) > 1 else 0, len(segments))]
    query_values = [v for _, v in parse_qsl(url.query, keep_blank_values=True)]
    candidates = [*tails, *query_values, url.query, url.password or ""]
    if segments:
        candidates += [url.path, f"{url.path}?{url.query}" if url.query else url.path]
    parts.update(c for c in candidates if len(c) >= MIN_SECRET_PART)
    return parts


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret, its secret parts (`secret_parts`) and their URL-encoded
    forms replaced by `***`."""
    parts = {part for secret in secrets if secret for part in secret_parts(secret)}
    for part in sorted(parts, key=len, reverse=True):
        for form in sorted({part, quote(part, safe=""), quote(part)}, key=len, reverse=True):
            text = text.replace(form, "***")
    return text


def mask(*values: str | None) -> None:
    """Mask `values` in every tool output this process scrubs from now on (`scrub_masked`).

    Values shorter than `MIN_MASKED` characters are ignored: a password that short is
    no secret, and masking it would garble ordinary words.
    """
    with _masked_lock:
        _masked.update(v for v in values if v and len(v) >= MIN_MASKED)


def mask_auth_string(auth: str) -> None:
    """Mask a Prefect API auth string (`user:password`): itself, its password and the
    basic-auth credentials it is sent as (base64 of the whole)."""
    mask(auth, auth.partition(":")[2], base64.b64encode(auth.encode()).decode())


def mask_value(value: str) -> str:
    """`value`, masked from now on (`mask`): for a secret handed on in one expression."""
    mask(value)
    return value


def masked() -> frozenset[str]:
    """The values masked so far in this process."""
    with _masked_lock:
        return frozenset(_masked)


def scrub_masked(text: str, extra: Iterable[str | None] = ()) -> str:
    """`text` scrubbed of every masked value and of `extra`."""
    return scrub(text, [*masked(), *extra])
