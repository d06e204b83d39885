"""OCI registries: inspect, tag, copy and verify images over the distribution API.

Every read and write authenticates as the registry asks: the first request goes out
with what worked last time; a 401 answer's `WWW-Authenticate` challenge says how to
retry, `Basic` (the registry block's username and password) or `Bearer` (the
distribution token spec: fetch a token from the challenge's realm for its service and
scope, with the same credentials, then retry with it). Credentials go only to the
registry they belong to, and never over plain HTTP to a host that is not the
registry itself or loopback.

Copies between registries use Debian's `skopeo copy --all --preserve-digests` rather
than hand-written blob and manifest uploads: skopeo (containers/image, the library
Podman and CRI-O pull with) is maintained against real registries, ECR and Docker
Hub's quirks included; it uploads blobs before manifests, copies every manifest of an
image index, mounts blobs across repositories of the same registry instead of
re-uploading them, answers Bearer challenges itself and refuses any change of digest.
What stays here is what skopeo cannot do for us: its credentials go in a private auth
file (never a command line), and the copied digest is read back and verified.
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from blocks.catalog import ServiceSpec
from blocks.registry import OciRegistry
from core.errors import PromotionRefused, RegistryError, ToolError
from core.records import ImageRef
from tasks.masking import mask, scrub
from tasks.process import retry_on_tool_error, run_logger, run_tool, which

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_INDEX = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_ACCEPT = ", ".join([DOCKER_MANIFEST, OCI_MANIFEST, DOCKER_INDEX, OCI_INDEX])
LOOPBACK = ("127.", "localhost", "[::1]")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
COPY_TIMEOUT_S = 1800


# --- authentication ----------------------------------------------------------------------


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(CHALLENGE_PARAM.findall(rest))


def _is_loopback(host: str) -> bool:
    return host.startswith(LOOPBACK)


class RegistryAuth(httpx.Auth):
    """httpx authentication answering a registry's Basic or Bearer challenge.

    Tokens are kept for the life of the client; a 401 with a fresh challenge fetches a
    new one (another scope, or the old one expired).
    """

    requires_response_body = True

    def __init__(self, host: str, registry: OciRegistry | None) -> None:
        self.host = host
        self.insecure = registry.insecure if registry else _is_loopback(host)
        self._username = registry.username if registry else None
        self._password = registry.password if registry else None
        self._header: str | None = None

    @property
    def has_credentials(self) -> bool:
        """True when the registry block carries a username and a password."""
        return self._username is not None and self._password is not None

    def _basic(self) -> str | None:
        if self._username is None or self._password is None:
            return None
        pair = f"{self._username.get_secret_value()}:{self._password.get_secret_value()}"
        mask(self._password.get_secret_value())
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def _may_send_to(self, url: httpx.URL) -> bool:
        return url.scheme == "https" or self.insecure or _is_loopback(url.host)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Send; on a 401 challenge authenticate as it asks and send once more."""
        if self._header:
            request.headers["Authorization"] = self._header
        response = yield request
        if response.status_code != 401:
            return
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            header = self._basic()
            if header is None or not self._may_send_to(request.url):
                return
        elif scheme == "bearer" and params.get("realm"):
            header = yield from self._bearer(params)
        else:
            return
        self._header = header
        request.headers["Authorization"] = header
        yield request

    def _bearer(self, params: dict[str, str]) -> Generator[httpx.Request, httpx.Response, str]:
        realm = httpx.URL(params["realm"])
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.extend(("scope", scope) for scope in params.get("scope", "").split() if scope)
        headers = {}
        basic = self._basic()
        if basic is not None:
            if not self._may_send_to(realm):
                msg = (
                    f"registry {self.host} sends its credentials to {realm.host} over plain "
                    "HTTP; refusing (use an https token realm, or mark the registry insecure)"
                )
                raise RegistryError(msg)
            headers["Authorization"] = basic
        answer = yield httpx.Request("GET", realm, params=query, headers=headers)
        if answer.status_code != 200:
            msg = (
                f"token server {realm.host} refused a token for {self.host} "
                f"(HTTP {answer.status_code}): check the registry block's username and password"
            )
            raise RegistryError(msg)
        try:
            body = answer.json()
            token = str(body.get("token") or body.get("access_token") or "")
        except (ValueError, AttributeError) as exc:
            msg = f"token server {realm.host} answered something that is not a token"
            raise RegistryError(msg) from exc
        if not token:
            msg = f"token server {realm.host} answered no token for {self.host}"
            raise RegistryError(msg)
        return f"Bearer {token}"


# --- OCI distribution API --------------------------------------------------------------


def split_repository(repository: str) -> tuple[str, str]:
    """'127.0.0.1:5000/elice/course' -> ('127.0.0.1:5000', 'elice/course').

    Raises:
        ValueError: no registry host or no path.
    """
    host, _, path = repository.partition("/")
    if not host or not path or "://" in repository:
        msg = f"repository {repository!r} must look like host[:port]/path"
        raise ValueError(msg)
    return host, path


def _registry_for(host: str, registry: OciRegistry | None) -> OciRegistry | None:
    """The block whose credentials may go to `host`.

    Raises:
        ValueError: the block is another registry's (its credentials must not go there).
    """
    if registry is not None and registry.address != host:
        msg = f"the registry block is for {registry.address}, the image is on {host}"
        raise ValueError(msg)
    return registry


DEFAULT_TIMEOUT_S = OciRegistry.model_fields["timeout_s"].default
"""A registry without a block (an image named by a registry the configuration does not
hold) waits as long as the block's default."""


def _client(host: str, registry: OciRegistry | None) -> httpx.Client:
    registry = _registry_for(host, registry)
    auth = RegistryAuth(host, registry)
    base = f"{'http' if auth.insecure else 'https'}://{host}"
    timeout = registry.timeout_s if registry is not None else DEFAULT_TIMEOUT_S
    return httpx.Client(base_url=base, auth=auth, timeout=timeout, trust_env=not auth.insecure)


def _request(
    repository: str,
    method: str,
    what: str,
    registry: OciRegistry | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One distribution API call, authenticated as the registry asks.

    Raises:
        RegistryError: the registry refused access (401/403): not worth a retry.
        ToolError: the registry is unreachable, or answered 5xx or 429: a blip, never an
            answer about the image (retried by the caller's task).
    """
    host, path = split_repository(repository)
    try:
        with _client(host, registry) as client:
            answer = client.request(method, f"/v2/{path}/{what}", **kwargs)
    except httpx.HTTPError as exc:
        msg = f"registry {host} unreachable for {method} {path}/{what}: {exc}"
        raise ToolError(msg) from exc
    if answer.status_code >= 500 or answer.status_code == 429:
        wait = answer.headers.get("Retry-After")
        msg = (
            f"registry {host} is unavailable for {method} {path}/{what} "
            f"(HTTP {answer.status_code}{f', retry after {wait}s' if wait else ''})"
        )
        raise ToolError(msg)
    if answer.status_code in (401, 403):
        who = (
            "the configured credentials"
            if registry and registry.username and registry.password
            else "anonymous access (no credentials configured for it)"
        )
        msg = (
            f"registry {host} refused {who} for {method} {path}/{what} "
            f"(HTTP {answer.status_code}): set the registry block's username and password"
        )
        raise RegistryError(msg)
    return answer


def fetch_manifest(
    repository: str, reference: str, registry: OciRegistry | None = None
) -> httpx.Response:
    """GET the manifest (or index) `repository:reference`.

    Raises:
        RegistryError: not found, or access refused.
    """
    answer = _request(
        repository, "GET", f"manifests/{reference}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    if answer.status_code != 200:
        msg = f"{repository}:{reference}: manifest not found (HTTP {answer.status_code})"
        raise RegistryError(msg)
    return answer


def _head_digest(repository: str, reference: str, registry: OciRegistry | None) -> str | None:
    """The digest of `repository:reference`, None when the registry says 404."""
    answer = _request(
        repository, "HEAD", f"manifests/{reference}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    if answer.status_code == 404:
        return None
    digest = str(answer.headers.get("Docker-Content-Digest", ""))
    if answer.status_code != 200 or not digest.startswith("sha256:"):
        msg = f"{repository}:{reference}: no manifest digest (HTTP {answer.status_code})"
        raise RegistryError(msg)
    return digest


def manifest_digest(repository: str, tag: str, registry: OciRegistry | None = None) -> str:
    """The digest `repository:tag` points at (HEAD with the manifest Accept header).

    Raises:
        RegistryError: the tag does not exist, or access was refused.
    """
    digest = _head_digest(repository, tag, registry)
    if digest is None:
        msg = f"{repository}:{tag}: no manifest digest (HTTP 404)"
        raise RegistryError(msg)
    return digest


def image_exists(repository: str, digest: str, registry: OciRegistry | None = None) -> bool:
    """True when the registry holds a manifest with this digest.

    Raises:
        RegistryError: access refused.
        ToolError: unreachable, or an answer that is neither yes nor no.
    """
    answer = _request(
        repository, "HEAD", f"manifests/{digest}", registry, headers={"Accept": MANIFEST_ACCEPT}
    )
    if answer.status_code in (200, 404):
        return answer.status_code == 200
    msg = f"{repository}@{digest}: registry answered HTTP {answer.status_code}"
    raise ToolError(msg)


def image_config(
    repository: str, digest: str, registry: OciRegistry | None = None
) -> dict[str, Any]:
    """The image configuration blob (the `config` of `docker inspect`, plus history)."""
    manifest = fetch_manifest(repository, digest, registry).json()
    config_digest = manifest.get("config", {}).get("digest")
    if not config_digest:
        msg = f"{repository}@{digest}: manifest has no config (an index?)"
        raise RegistryError(msg)
    blob = _request(repository, "GET", f"blobs/{config_digest}", registry, follow_redirects=True)
    if blob.status_code != 200:
        msg = f"{repository}@{digest}: config blob missing (HTTP {blob.status_code})"
        raise RegistryError(msg)
    config: dict[str, Any] = blob.json()
    return config


def read_labels(
    repository: str, digest: str, registry: OciRegistry | None = None
) -> dict[str, str]:
    """The labels of the image at `repository@digest`, read from its config blob."""
    labels = image_config(repository, digest, registry).get("config", {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def put_tag(repository: str, digest: str, new_tag: str, registry: OciRegistry | None) -> str:
    """Point `new_tag` at the manifest `digest` by PUTting the same bytes under the tag.

    Raises:
        ValueError: the tag is not a valid tag.
        RegistryError: the digest is unknown or the registry changed it.
    """
    if not TAG_RE.match(new_tag):
        msg = f"tag {new_tag!r} is not a valid image tag ([A-Za-z0-9_.-], max 128)"
        raise ValueError(msg)
    manifest = fetch_manifest(repository, digest, registry)
    media_type = manifest.headers.get("Content-Type", DOCKER_MANIFEST).split(";")[0]
    answer = _request(
        repository,
        "PUT",
        f"manifests/{new_tag}",
        registry,
        content=manifest.content,
        headers={"Content-Type": media_type},
    )
    stored = answer.headers.get("Docker-Content-Digest", "")
    if answer.status_code != 201 or stored != digest:
        msg = f"{repository}:{new_tag}: tag copy failed (HTTP {answer.status_code}, {stored!r})"
        raise RegistryError(msg)
    return digest


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2))
def copy_tag(
    repository: str, digest: str, new_tag: str, registry: OciRegistry | None = None
) -> str:
    """Point `new_tag` at the manifest `digest` (same bytes: the digest is unchanged).

    Raises:
        RegistryError: the digest is unknown or the registry changed it.
    """
    put_tag(repository, digest, new_tag, registry)
    run_logger().info("tagged %s@%s as %s", repository, digest[:19], new_tag)
    return digest


# --- copies between registries -----------------------------------------------------------


def _authfile(directory: Path, name: str, host: str, registry: OciRegistry | None) -> Path:
    """A containers-auth.json holding only `registry`'s credentials (0600, private dir)."""
    auths: dict[str, dict[str, str]] = {}
    if registry is not None and registry.username and registry.password:
        pair = f"{registry.username.get_secret_value()}:{registry.password.get_secret_value()}"
        mask(registry.password.get_secret_value())
        auths[host] = {"auth": base64.b64encode(pair.encode()).decode()}
    path = directory / name
    path.touch(mode=0o600)
    path.write_text(json.dumps({"auths": auths}), encoding="utf-8")
    return path


def _scrub(text: str, registries: Sequence[OciRegistry | None]) -> str:
    secrets = [
        secret.get_secret_value()
        for registry in registries
        if registry
        for secret in (registry.password, registry.username)
        if secret is not None
    ]
    return scrub(text, secrets)


def _skopeo() -> str:
    try:
        return which("skopeo")
    except ToolError as exc:
        msg = "skopeo is not installed: apt-get install skopeo (Debian), then retry"
        raise ToolError(msg) from exc


def _is_insecure(host: str, registry: OciRegistry | None) -> bool:
    return registry.insecure if registry else _is_loopback(host)


def skopeo_copy_arguments(
    source: str,
    target: str,
    *,
    source_authfile: Path,
    target_authfile: Path,
    source_insecure: bool,
    target_insecure: bool,
    digestfile: Path,
) -> list[str]:
    """The `skopeo copy` command line: every manifest of an index, digests preserved.

    No `--retry-times`: skopeo retries a refusal (403) as readily as a blip; the copy's
    task retries only what its output shows may pass (`registry_failure_may_pass`).
    """
    return [
        "copy",
        "--all",
        "--preserve-digests",
        f"--src-authfile={source_authfile}",
        f"--dest-authfile={target_authfile}",
        f"--src-tls-verify={str(not source_insecure).lower()}",
        f"--dest-tls-verify={str(not target_insecure).lower()}",
        f"--digestfile={digestfile}",
        f"docker://{source}",
        f"docker://{target}",
    ]


def _copy_hosts(
    image: ImageRef,
    target_repository: str,
    tags: Sequence[str],
    source: OciRegistry | None,
    target: OciRegistry | None,
) -> tuple[str, str]:
    """The source and target hosts of a copy, its arguments checked before anything is copied.

    Raises:
        ValueError: a bad repository, digest or tag, or a registry block for another host.
    """
    source_host, _ = split_repository(image.repository)
    target_host, _ = split_repository(target_repository)
    _registry_for(source_host, source)
    _registry_for(target_host, target)
    if not DIGEST_RE.match(image.digest):
        msg = f"{image.service}: digest {image.digest!r} is not sha256:<64 hex digits>"
        raise ValueError(msg)
    if not tags:
        msg = f"{image.service}: copying {image.reference} needs at least one tag in the target"
        raise ValueError(msg)
    for tag in tags:
        if not TAG_RE.match(tag):
            msg = f"tag {tag!r} is not a valid image tag ([A-Za-z0-9_.-], max 128)"
            raise ValueError(msg)
    return source_host, target_host


_REFUSED = re.compile(
    r"unauthorized|denied|forbidden|authentication required|manifest unknown|name unknown"
    r"|blob unknown|digest (?:mismatch|invalid)|status(?: ?code)?:? ?4(?:0\d|1\d)\b|\b4[01]\d \(",
    re.IGNORECASE,
)
_BLIP = re.compile(
    r"connection refused|connection reset|broken pipe|no such host|i/o timeout|dial tcp"
    r"|timeout|\bEOF\b|status(?: ?code)?:? ?(?:5\d\d|429)\b|\b(?:5\d\d|429) \(|too ?many ?requests"
    r"|service unavailable|bad gateway|gateway time",
    re.IGNORECASE,
)


def registry_failure_may_pass(output: str) -> bool:
    """Whether a failed transfer's message is a blip (refused or reset connection, timeout,
    an answer cut short, 5xx, 429): worth a retry. A refusal (401/403, unknown image, a
    digest mismatch) is final, whatever else the message says.

    Both skopeo's copy and the engine's push (Podman's, through the same containers/image
    library; Docker's) word registry errors this way: one classification for both."""
    return _BLIP.search(output) is not None and not registry_refused(output)


def registry_refused(output: str) -> bool:
    """Whether a failed transfer's message is a registry's refusal (401/403, unknown
    image, a digest mismatch): final, never retried."""
    return _REFUSED.search(output) is not None


def copy_image_by_digest(
    image: ImageRef,
    target_repository: str,
    tags: Sequence[str],
    *,
    source: OciRegistry | None = None,
    target: OciRegistry | None = None,
) -> ImageRef:
    """Copy `image` (an image or an image index) to `target_repository`, digest unchanged.

    Blobs first, then the manifests, then each tag; the digest is read back from the
    target. A copy within one registry mounts the blobs from the source repository.

    Raises:
        ValueError: a bad repository, digest or tag, or a registry block for another
            host (before anything is copied).
        RegistryError: a registry refused access or the image; the digest changed.
        ToolError: skopeo is missing, or a registry is unreachable.
    """
    source_host, target_host = _copy_hosts(image, target_repository, tags, source, target)
    skopeo = _skopeo()
    destination = f"{target_repository}:{tags[0]}"
    with tempfile.TemporaryDirectory(prefix="registry-copy-") as tmp:
        directory = Path(tmp)
        args = skopeo_copy_arguments(
            f"{image.repository}@{image.digest}",
            destination,
            source_authfile=_authfile(directory, "source.json", source_host, source),
            target_authfile=_authfile(directory, "target.json", target_host, target),
            source_insecure=_is_insecure(source_host, source),
            target_insecure=_is_insecure(target_host, target),
            digestfile=directory / "digest",
        )
        done = run_tool([skopeo, *args], timeout=COPY_TIMEOUT_S)
        output = _scrub(done.excerpt(20), [source, target])
        if not done.ok:
            error = ToolError if registry_failure_may_pass(output) else RegistryError
            msg = f"copying {image.reference} to {destination} failed:\n{output}"
            raise error(msg)
        copied = (directory / "digest").read_text(encoding="utf-8").strip()
    if copied != image.digest:
        msg = f"{destination}: the copy has digest {copied}, not {image.digest}"
        raise RegistryError(msg)
    for tag in tags[1:]:
        put_tag(target_repository, image.digest, tag, target)
    stored = manifest_digest(target_repository, tags[0], target)
    if stored != image.digest:
        msg = f"{destination}: the registry reports {stored}, not {image.digest}"
        raise RegistryError(msg)
    run_logger().info("copied %s to %s (%s)", image.reference, destination, image.digest[:19])
    return image.model_copy(update={"repository": target_repository, "tag": tags[0]})


@task(
    task_run_name="copy_image-{image.service}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_condition_fn=retry_on_tool_error,
)
def copy_image(
    image: ImageRef,
    target: OciRegistry,
    *,
    source: OciRegistry | None = None,
    tags: Sequence[str] | None = None,
) -> ImageRef:
    """Copy `image` by digest into `target`'s repository of the service.

    Args:
        image: the image where it is now (repository@digest).
        target: the registry to copy into (its credentials are used for the writes).
        source: the block of the image's registry, for its credentials (None: anonymous).
        tags: tags in the target (default: the image's tag, else `sha-<commit[:12]>`).

    Raises:
        ValueError: bad input (before anything is copied).
        RegistryError: refused or changed; ToolError: unreachable (retried).
    """
    chosen = list(tags) if tags is not None else [image.tag or f"sha-{image.commit[:12]}"]
    return copy_image_by_digest(
        image, target.repository(image.service), chosen, source=source, target=target
    )


# --- CI and promotion ----------------------------------------------------------------------


@task(
    task_run_name="find_published_image-{service.name}",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_tool_error,
)
def find_published_image(
    service: ServiceSpec, version: str, commit: str, registry: OciRegistry
) -> ImageRef | None:
    """The image already pushed for this exact version, or None (then it is built).

    Its `commit` is the one its revision label names (the commit it was built from).

    Raises:
        RegistryError: the registry refused access (a wrong login is not "not found").
    """
    repository = registry.repository(service.name)
    digest = _head_digest(repository, version, registry)
    if digest is None:
        return None
    # The same content (same version) built from an earlier commit: the image names the
    # commit it was built from, and promotion checks that label, so the record must too.
    built_from = read_labels(repository, digest, registry).get(
        "org.opencontainers.image.revision", ""
    )
    run_logger().info(
        "%s %s is already published as %s (built from %s)",
        service.name,
        version,
        digest[:19],
        built_from[:12] or "an unlabelled commit",
    )
    return ImageRef(
        service=service.name,
        repository=repository,
        digest=digest,
        tag=version,
        version=version,
        commit=built_from or commit,
    )


@task(
    task_run_name="verify_release_image-{image.service}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_tool_error,
)
def verify_release_image(image: ImageRef, registry: OciRegistry | None = None) -> ImageRef:
    """The digest is in the registry and its revision label is the recorded commit.

    Args:
        registry: the block of the image's registry, for its credentials
            (None: anonymous reads).

    Raises:
        ValueError: `registry` is another host's block.
        PromotionRefused: the image is gone, was built from another commit, or the
            registry refused the credentials.
        ToolError: the registry is unreachable (retried).
    """
    host, _ = split_repository(image.repository)
    _registry_for(host, registry)
    try:
        exists = image_exists(image.repository, image.digest, registry)
    except RegistryError as exc:
        msg = f"{image.service}: cannot read {image.reference}: {exc}"
        raise PromotionRefused(msg) from exc
    if not exists:
        msg = f"{image.service}: {image.reference} is not in the registry"
        raise PromotionRefused(msg)
    try:
        labels = read_labels(image.repository, image.digest, registry)
    except RegistryError as exc:
        msg = f"{image.service}: cannot read the labels of {image.reference}: {exc}"
        raise PromotionRefused(msg) from exc
    revision = labels.get("org.opencontainers.image.revision", "")
    if image.commit and revision != image.commit:
        msg = (
            f"{image.service}: {image.short} was built from {revision or '(no revision label)'}, "
            f"but the ledger records commit {image.commit}"
        )
        raise PromotionRefused(msg)
    run_logger().info(
        "%s: %s verified in the registry (commit %s)", image.service, image.short, revision
    )
    return image
