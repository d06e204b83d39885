"""Registries that need a login (htpasswd Basic, distribution token auth), for real.

Two `docker-registry` processes on loopback, one behind Basic auth, one behind a token
server; images are copied between them with skopeo and pulled by a clean engine.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import docker
import httpx
import pytest
from pydantic import SecretStr

from blocks.registry import OciRegistry
from core.errors import PromotionRefused, RegistryError, ToolError
from core.records import ImageRef
from tasks.registry import (
    MANIFEST_ACCEPT,
    OCI_INDEX,
    copy_image,
    copy_image_by_digest,
    fetch_manifest,
    image_exists,
    manifest_digest,
    parse_challenge,
    read_labels,
    verify_release_image,
)
from tests.plugins.registries import TOKEN_SERVICE, AuthRegistry, TokenServer


@pytest.fixture(scope="module")
def in_basic(
    pushed_image: ImageRef, oci_registry: OciRegistry, basic_registry: AuthRegistry
) -> ImageRef:
    """The session's image copied from the local registry into the Basic-auth one."""
    return copy_image.fn(pushed_image, basic_registry.block, source=oci_registry)


@pytest.fixture(scope="module")
def in_token(
    in_basic: ImageRef, basic_registry: AuthRegistry, token_registry: AuthRegistry
) -> ImageRef:
    """...and from there into the token-auth one (credentials on both sides)."""
    return copy_image.fn(
        in_basic, token_registry.block, source=basic_registry.block, tags=["v1", "staging"]
    )


def test_parse_challenge() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert parse_challenge(header) == (
        "bearer",
        {
            "realm": "https://auth.example/token",
            "service": "reg",
            "scope": "repository:a/b:pull,push",
        },
    )
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_the_registries_really_ask_for_a_login(
    basic_registry: AuthRegistry, token_registry: AuthRegistry, token_server: TokenServer
) -> None:
    basic = httpx.get(f"http://{basic_registry.address}/v2/", timeout=10)
    assert basic.status_code == 401
    assert parse_challenge(basic.headers["WWW-Authenticate"])[0] == "basic"
    bearer = httpx.get(f"http://{token_registry.address}/v2/", timeout=10)
    assert bearer.status_code == 401
    scheme, params = parse_challenge(bearer.headers["WWW-Authenticate"])
    assert (scheme, params["realm"], params["service"]) == (
        "bearer",
        token_server.realm,
        TOKEN_SERVICE,
    )


def test_anonymous_and_wrong_logins_are_refused(
    in_token: ImageRef,
    in_basic: ImageRef,
    basic_registry: AuthRegistry,
    token_registry: AuthRegistry,
) -> None:
    for image, registry in ((in_basic, basic_registry), (in_token, token_registry)):
        with pytest.raises(RegistryError, match="refused anonymous access"):
            image_exists(image.repository, image.digest, registry.anonymous())
        with pytest.raises(RegistryError, match="refused anonymous access"):
            image_exists(image.repository, image.digest)
        wrong = registry.block.model_copy(update={"password": SecretStr("not-the-password")})
        with pytest.raises(RegistryError) as caught:
            read_labels(image.repository, image.digest, wrong)
        assert "not-the-password" not in str(caught.value)
        assert registry.password not in str(caught.value)
        with pytest.raises(PromotionRefused, match="cannot read"):
            verify_release_image.fn(image, registry.anonymous())


def test_copy_into_basic_auth_keeps_digest_and_labels(
    pushed_image: ImageRef, in_basic: ImageRef, basic_registry: AuthRegistry
) -> None:
    block = basic_registry.block
    assert in_basic.digest == pushed_image.digest
    assert in_basic.repository == block.repository(pushed_image.service)
    assert manifest_digest(in_basic.repository, pushed_image.tag, block) == pushed_image.digest
    labels = read_labels(in_basic.repository, in_basic.digest, block)
    assert labels["org.opencontainers.image.revision"] == pushed_image.commit
    assert verify_release_image.fn(in_basic, block) == in_basic


def test_copy_between_authenticated_registries_uses_tokens(
    in_basic: ImageRef, in_token: ImageRef, token_registry: AuthRegistry, token_server: TokenServer
) -> None:
    block = token_registry.block
    assert in_token.digest == in_basic.digest
    assert in_token.tag == "v1"
    for tag in ("v1", "staging"):
        assert manifest_digest(in_token.repository, tag, block) == in_basic.digest
    assert verify_release_image.fn(in_token, block) == in_token
    _, path = in_token.repository.split("/", 1)
    granted = [r for r in token_server.requests if r["sub"] == token_registry.username]
    assert any(f"repository:{path}:pull,push" in (r["scope"] or []) for r in granted)


def test_a_clean_engine_pulls_the_copy_by_digest(
    in_token: ImageRef, token_registry: AuthRegistry, clean_engine: docker.DockerClient
) -> None:
    # (Anonymous access is refused at the registry: test_anonymous_and_wrong_logins_are_
    # refused. The engine is not asked here: it caches a bearer token it got for another
    # module's authenticated pull of this registry, so its anonymous pull may pass.)
    auth = {"username": token_registry.username, "password": token_registry.password}
    pulled = clean_engine.images.pull(in_token.repository, tag=in_token.digest, auth_config=auth)
    assert f"{in_token.repository}@{in_token.digest}" in pulled.attrs["RepoDigests"]
    assert pulled.labels["org.opencontainers.image.revision"] == in_token.commit


def test_an_image_index_is_copied_whole(
    pushed_image: ImageRef, oci_registry: OciRegistry, basic_registry: AuthRegistry
) -> None:
    child = fetch_manifest(pushed_image.repository, pushed_image.digest, oci_registry)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": child.headers["Content-Type"].split(";")[0],
                "digest": pushed_image.digest,
                "size": len(child.content),
                "platform": {"architecture": "amd64", "os": "linux"},
            }
        ],
    }
    body = json.dumps(index).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    put = httpx.put(
        f"http://{oci_registry.address}/v2/{pushed_image.repository.split('/', 1)[1]}"
        f"/manifests/index-{pushed_image.short[7:15]}",
        content=body,
        headers={"Content-Type": OCI_INDEX},
        timeout=30,
    )
    assert put.status_code == 201, put.text
    as_index = pushed_image.model_copy(update={"digest": digest})
    target = basic_registry.block.repository("course-index")
    copied = copy_image_by_digest(
        as_index, target, ["multi"], source=oci_registry, target=basic_registry.block
    )
    assert copied.digest == digest
    got = fetch_manifest(target, "multi", basic_registry.block)
    assert got.headers["Content-Type"].startswith(OCI_INDEX)
    assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
    assert image_exists(target, pushed_image.digest, basic_registry.block)
    assert read_labels(target, pushed_image.digest, basic_registry.block)


def test_a_copy_within_one_registry_mounts_the_blobs(
    in_basic: ImageRef, basic_registry: AuthRegistry
) -> None:
    target = basic_registry.block.repository("course-mirror")
    before = basic_registry.log.read_text(encoding="utf-8", errors="replace")
    copy_image_by_digest(
        in_basic, target, ["mounted"], source=basic_registry.block, target=basic_registry.block
    )
    lines = basic_registry.log.read_text(encoding="utf-8", errors="replace")[len(before) :]
    manifest = fetch_manifest(in_basic.repository, in_basic.digest, basic_registry.block).json()
    layers = {layer["digest"] for layer in manifest["layers"]}
    mounted = set(
        re.findall(
            r'"POST /v2/elice/course-mirror/blobs/uploads/\?[^"]*'
            r'mount=(sha256%3A[0-9a-f]{64})[^"]*" 201',
            lines,
        )
    )
    uploaded = set(
        re.findall(
            r'"PUT /v2/elice/course-mirror/blobs/uploads/[^"]*digest=(sha256%3A[0-9a-f]{64})', lines
        )
    )
    assert {d.replace("sha256:", "sha256%3A") for d in layers} <= mounted, lines[-3000:]
    # only the small config blob travels again (skopeo does not mount configs)
    assert uploaded <= {manifest["config"]["digest"].replace("sha256:", "sha256%3A")}
    assert manifest_digest(target, "mounted", basic_registry.block) == in_basic.digest


def test_bad_input_fails_before_any_copy(
    pushed_image: ImageRef, oci_registry: OciRegistry, basic_registry: AuthRegistry
) -> None:
    other = basic_registry.block.model_copy(update={"address": "127.0.0.1:1"})
    target = basic_registry.block.repository("never")
    with pytest.raises(ValueError, match=r"registry block is for 127\.0\.0\.1:1"):
        copy_image_by_digest(pushed_image, target, ["x"], source=oci_registry, target=other)
    with pytest.raises(ValueError, match="not a valid image tag"):
        copy_image_by_digest(pushed_image, target, ["bad tag"], target=basic_registry.block)
    with pytest.raises(ValueError, match="at least one tag"):
        copy_image_by_digest(pushed_image, target, [], target=basic_registry.block)
    with pytest.raises(ValueError, match="registry block is for"):
        verify_release_image.fn(pushed_image, basic_registry.block)
    answer = httpx.head(
        f"http://{basic_registry.address}/v2/elice/never/manifests/x",
        auth=(basic_registry.username, basic_registry.password),
        headers={"Accept": MANIFEST_ACCEPT},
        timeout=10,
    )
    assert answer.status_code == 404


def test_refused_copy_names_no_secret(
    pushed_image: ImageRef, oci_registry: OciRegistry, basic_registry: AuthRegistry
) -> None:
    wrong = basic_registry.block.model_copy(update={"password": SecretStr("wrong-password-xyz")})
    with pytest.raises(RegistryError) as caught:
        copy_image.fn(pushed_image, wrong, source=oci_registry)
    assert "wrong-password-xyz" not in str(caught.value)
    assert "wrong-password-xyz" not in repr(wrong)


def test_missing_skopeo_says_what_to_install(
    pushed_image: ImageRef,
    basic_registry: AuthRegistry,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolError, match="apt-get install skopeo"):
        copy_image.fn(pushed_image, basic_registry.block)
