"""ReleaseStorage: its errors and its repr never show any part of the AWS secret key."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from blocks.storage import ReleaseStorage

SECRET = "s3cr3t/Zq9Vt+Wm4Kx7Lp2Rn8Hd5Fj1Gb6Yc0Tu"
CREDENTIALS = {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key": SECRET}


def _shows_secret(text: str) -> bool:
    """True when any 6 consecutive characters of the secret appear in `text`."""
    return any(SECRET[i : i + 6] in text for i in range(len(SECRET) - 5))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"kind": "s3", "bucket": "Bad_Bucket"}, "valid bucket name"),
        ({"kind": "s3", "bucket": "elice-ledger", "prefix": "/x/"}, "prefix must not"),
        ({"kind": "local", "bucket": "elice-ledger"}, "only meaningful with kind s3"),
        ({"kind": "ftp", "bucket": "elice-ledger"}, "kind"),
        (
            {
                "kind": "s3",
                "bucket": "elice-ledger",
                "credentials": {**CREDENTIALS, "region_name": 5},
            },
            "credentials.region_name",
        ),
    ],
)
def test_validation_errors_hide_the_secret_key(data: dict[str, Any], problem: str) -> None:
    # The credentials last: pydantic's truncated input shows the tail of the input.
    data = {**data, "credentials": data.get("credentials", CREDENTIALS)}
    with pytest.raises(ValidationError, match=problem) as info:
        ReleaseStorage.model_validate(data)
    assert not _shows_secret(str(info.value))
    assert not _shows_secret(repr(info.value))
    with pytest.raises(ValidationError) as info:
        ReleaseStorage(**data)
    assert not _shows_secret(f"{info.value} {info.value!r}")


def test_repr_hides_the_secret_key() -> None:
    storage = ReleaseStorage.model_validate(
        {"kind": "s3", "bucket": "elice-ledger", "credentials": CREDENTIALS}
    )
    assert storage.credentials is not None
    assert storage.credentials.aws_secret_access_key is not None
    assert storage.credentials.aws_secret_access_key.get_secret_value() == SECRET
    assert not _shows_secret(f"{storage} {storage!r}")
