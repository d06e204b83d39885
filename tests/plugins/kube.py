"""A real Kubernetes control plane on loopback, and a stand-in kubelet.

Session fixture `kube` yields a `KubeCluster`:

- etcd (Debian's `etcd-server`), kube-apiserver (RBAC, service accounts, its own PKI),
  kube-controller-manager (all default controllers: deployment, replicaset, HPA,
  garbage collector, namespace, node lifecycle, service-account tokens) and
  kube-scheduler, v1.24.0-alpha.1, each on free loopback ports; stopped by PID at the end
  (SIGTERM, then SIGKILL: an API server takes up to a minute to exit on its own);
- `StandInKubelet`, a thread speaking the real API: it registers Node `stand-in`
  (allocatable CPU and memory, so the real scheduler binds pods to it), renews its Lease,
  marks the pods bound to it Running and Ready (a podIP from 192.0.2.0/24, never reached),
  keeps pods of images marked broken waiting with a kubelet's reasons, and finishes
  graceful deletions after `DELETE_DELAY_S`. No container runs: traffic to pods can't be
  shown here (the simulator tests/k8s_sim does that).

The binaries come xz-compressed from the shared directory (`ELICE_K8S_DIR`, else
`../shared/k8s` beside the checkout or above it, else /work/shared/k8s) and are
decompressed once per machine into a cache (`ELICE_K8S_CACHE`, default
~/.cache/elice-devops/k8s-<version>), checked against SHA256SUMS, under a file lock
(xdist workers start their own planes at once).

API:
    kube.kubeconfig            path of the admin kubeconfig (system:masters)
    kube.admin                 a kubernetes.client.ApiClient with the admin credentials
    kube.kubelet               the StandInKubelet (kube.kubelet.broken[digest] = reason)
    kube.server                "https://127.0.0.1:<port>"
    kube.token_kubeconfig(token, path)     a kubeconfig for a bearer token
    kube.client_kubeconfig(cn, path, ...)  one for a client certificate of this (or another) CA
    kube.restart_apiserver()   stop the API server (SIGTERM) and start it again, same port
    kube.start_s               seconds the plane took to become usable
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import lzma
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.plugins.lifetime import stop, tied

VERSION = "v1.24.0-alpha.1"
BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHARED = Path("/work/shared/k8s")
NODE = "stand-in"
DELETE_DELAY_S = 1.0  # a kubelet stops containers, then reports the pod gone
TICK_S = 0.2  # the stand-in kubelet's loop while pods change
IDLE_TICK_S = 1.0
"""The loop once nothing changed for IDLE_AFTER ticks: a list of every pod five times a
second, for the whole session, was most of an idle control plane's CPU and the test
process's beside it. A pod made after a quiet spell waits up to this long to run."""
IDLE_AFTER = 10
LEASE_RENEW_S = 10.0
CRASH_RESTART_S = 2.0  # how often a crash-looping container "restarts"
READY_TIMEOUT_S = 60.0
INSTALL_HINT = "scripts/install-system-deps.sh installs Debian's etcd-server"
_TIMINGS: list[str] = []


# --------------------------------------------------------------------------- binaries


def shared_dir() -> Path:
    """Where the xz-compressed binaries are; a clear error naming the paths tried."""
    candidates = []
    if os.environ.get("ELICE_K8S_DIR"):
        candidates.append(Path(os.environ["ELICE_K8S_DIR"]))
    candidates += [parent / "shared" / "k8s" for parent in REPO.parents]
    candidates.append(DEFAULT_SHARED)
    for candidate in candidates:
        if all((candidate / f"{b}.xz").is_file() for b in BINARIES):
            return candidate
    tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
    msg = (
        f"the Kubernetes binaries ({', '.join(b + '.xz' for b in BINARIES)}) are missing: "
        f"tried {tried}; set ELICE_K8S_DIR to the directory holding them"
    )
    raise FileNotFoundError(msg)


def binaries() -> Path:
    """The decompressed binaries' directory (decompressed once, checked by SHA256SUMS)."""
    source = shared_dir()
    default_cache = Path.home() / ".cache" / "elice-devops" / f"k8s-{VERSION}"
    cache = Path(os.environ.get("ELICE_K8S_CACHE", default_cache))
    cache.mkdir(parents=True, exist_ok=True)
    sums = {
        line.split()[1].lstrip("*"): line.split()[0]
        for line in (source / "SHA256SUMS").read_text().splitlines()
        if line.strip()
    }
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in BINARIES:
            target, marker = cache / name, cache / f".{name}.sha256"
            if target.is_file() and marker.is_file() and marker.read_text() == sums[name]:
                continue
            digest = hashlib.sha256()
            partial = cache / f".{name}.partial"
            with lzma.open(source / f"{name}.xz") as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
            if digest.hexdigest() != sums[name]:
                partial.unlink()
                msg = f"{source / name}.xz decompresses to a binary whose sum is not in SHA256SUMS"
                raise RuntimeError(msg)
            partial.chmod(0o755)
            partial.replace(target)
            marker.write_text(sums[name])
    return cache


# --------------------------------------------------------------------------- PKI


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Authority:
    """A certificate authority: signs the API server's and the clients' certificates."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self, cn: str, *, orgs: tuple[str, ...] = (), server: bool = False
    ) -> tuple[bytes, bytes]:
        """A certificate (PEM) and its key (PEM) for `cn` in groups `orgs`."""
        key = _key()
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        attrs += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in orgs]
        builder = _builder(x509.Name(attrs), self.cert.subject, key)
        if server:
            import ipaddress  # noqa: PLC0415

            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _builder(
    subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def kubeconfig_document(server: str, ca_pem: bytes, user: dict[str, str]) -> dict[str, Any]:
    """A kubeconfig with everything embedded, context `kube`."""
    import base64  # noqa: PLC0415

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kube",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "user", "user": user}],
        "contexts": [{"name": "kube", "context": {"cluster": "kube", "user": "user"}}],
        "current-context": "kube",
    }


def _cert_user(cert: bytes, key: bytes) -> dict[str, str]:
    import base64  # noqa: PLC0415

    return {
        "client-certificate-data": base64.b64encode(cert).decode(),
        "client-key-data": base64.b64encode(key).decode(),
    }


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            tied(args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(what: str, check: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready in {READY_TIMEOUT_S:.0f}s:\n{_tail(log)}")


# --------------------------------------------------------------------------- the plane


@dataclass
class KubeCluster:
    """A running control plane (see the module docstring)."""

    workdir: Path
    bin_dir: Path
    ca: Authority
    port: int
    etcd_url: str
    kubeconfig: Path
    admin: Any = None
    kubelet: StandInKubelet | None = None
    start_s: float = 0.0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def token_kubeconfig(self, token: str, path: Path) -> Path:
        """A kubeconfig at `path` authenticating with a bearer `token`."""
        document = kubeconfig_document(self.server, self.ca.pem, {"token": token})
        path.write_text(yaml.safe_dump(document))
        return path

    def client_kubeconfig(
        self, cn: str, path: Path, *, orgs: tuple[str, ...] = (), ca: Authority | None = None
    ) -> Path:
        """A kubeconfig for a client certificate of `ca` (default: this plane's CA)."""
        cert, key = (ca or self.ca).issue(cn, orgs=orgs)
        document = kubeconfig_document(self.server, self.ca.pem, _cert_user(cert, key))
        path.write_text(yaml.safe_dump(document))
        return path

    def apiserver_args(self) -> list[str]:
        d = self.workdir
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            "--advertise-address=127.0.0.1",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--service-account-issuer={self.server}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ]

    def start_apiserver(self) -> None:
        log = self.workdir / "kube-apiserver.log"
        proc = _spawn(self.apiserver_args(), log)
        self.procs["kube-apiserver"] = proc
        _wait("kube-apiserver", self._readyz, proc, log)

    def _readyz(self) -> bool:
        import ssl  # noqa: PLC0415
        import urllib.request  # noqa: PLC0415

        context = ssl.create_default_context(cafile=str(self.workdir / "ca.crt"))
        context.load_cert_chain(self.workdir / "admin.crt", self.workdir / "admin.key")
        with urllib.request.urlopen(f"{self.server}/readyz", context=context, timeout=2) as r:
            return bool(r.status == 200)

    def restart_apiserver(self) -> float:
        """Stop the API server as an operator would (SIGTERM; SIGKILL if it has not
        exited in 10 s) and start it again on its port; the seconds it was down."""
        down = time.monotonic()
        stop(self.procs["kube-apiserver"], timeout=10)
        self.start_apiserver()
        return time.monotonic() - down

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.stop()
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.procs:
                stop(self.procs[name], timeout=2)


def _write_pki(workdir: Path) -> Authority:
    ca = Authority.create("elice-test-kube-ca")
    (workdir / "ca.crt").write_bytes(ca.pem)
    cert, key = ca.issue("kube-apiserver", server=True)
    (workdir / "apiserver.crt").write_bytes(cert)
    (workdir / "apiserver.key").write_bytes(key)
    cert, key = ca.issue("admin", orgs=("system:masters",))
    (workdir / "admin.crt").write_bytes(cert)
    (workdir / "admin.key").write_bytes(key)
    sa = _key()
    (workdir / "sa.key").write_bytes(_pem_key(sa))
    (workdir / "sa.pub").write_bytes(
        sa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return ca


def _start_etcd(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.fail(f"etcd is missing: {INSTALL_HINT}")
    client, peer, metrics = _free_port(), _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
    log = workdir / "etcd.log"
    proc = _spawn(
        [
            etcd,
            "--name=local",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=local=http://127.0.0.1:{peer}",
            f"--listen-metrics-urls=http://127.0.0.1:{metrics}",
            "--unsafe-no-fsync",
        ],
        log,
    )

    def healthy() -> bool:
        import urllib.request  # noqa: PLC0415

        with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
            return b"true" in r.read()

    _wait("etcd", healthy, proc, log)
    return proc, url


def _start_controllers(kube: KubeCluster) -> None:
    d, admin = kube.workdir, str(kube.kubeconfig)
    kube.procs["kube-controller-manager"] = _spawn(
        [
            str(kube.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={admin}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={_free_port()}",
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.crt'}",
            "--horizontal-pod-autoscaler-sync-period=2s",
            "--profiling=false",
        ],
        d / "kube-controller-manager.log",
    )
    kube.procs["kube-scheduler"] = _spawn(
        [
            str(kube.bin_dir / "kube-scheduler"),
            f"--kubeconfig={admin}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={_free_port()}",
        ],
        d / "kube-scheduler.log",
    )


def start_cluster(workdir: Path) -> KubeCluster:
    """Start etcd, the API server, the controllers and the stand-in kubelet; wait until a
    pod can be scheduled (the Node is Ready) and namespaces get their service account."""
    from kubernetes import config  # noqa: PLC0415

    started = time.monotonic()
    bin_dir = binaries()
    ca = _write_pki(workdir)
    etcd, etcd_url = _start_etcd(workdir)
    kube = KubeCluster(workdir, bin_dir, ca, _free_port(), etcd_url, workdir / "admin.kubeconfig")
    kube.procs["etcd"] = etcd
    try:
        admin = _cert_user(
            (workdir / "admin.crt").read_bytes(), (workdir / "admin.key").read_bytes()
        )
        kube.kubeconfig.write_text(yaml.safe_dump(kubeconfig_document(kube.server, ca.pem, admin)))
        kube.start_apiserver()
        _start_controllers(kube)
        kube.admin = config.new_client_from_config(str(kube.kubeconfig))  # type: ignore[no-untyped-call]
        kube.kubelet = StandInKubelet(config.new_client_from_config(str(kube.kubeconfig)))  # type: ignore[no-untyped-call]
        kube.kubelet.start()
        _wait_usable(kube)
    except BaseException:
        kube.stop()
        raise
    kube.start_s = time.monotonic() - started
    return kube


def _wait_usable(kube: KubeCluster) -> None:
    """The Node is Ready and the default namespace has its service account."""
    from kubernetes import client  # noqa: PLC0415

    core: Any = client.CoreV1Api(kube.admin)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, proc in kube.procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited:\n{_tail(kube.workdir / f'{name}.log')}")
        with contextlib.suppress(Exception):
            core.read_namespaced_service_account("default", "default")
            node = core.read_node(NODE)
            if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions):
                return
        time.sleep(0.1)
    pytest.fail(f"the control plane did not become usable in {READY_TIMEOUT_S:.0f}s")


# --------------------------------------------------------------------------- kubelet


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class StandInKubelet:
    """What a kubelet tells the API server, without running anything.

    `broken` maps a substring of an image reference (a digest) to the reason its pods
    keep waiting with: ImagePullBackOff, ErrImagePull, CrashLoopBackOff (restartCount
    rising, lastState.terminated exit 1), CreateContainerConfigError, or NotReady
    (running, never ready). Errors of one tick are kept in `errors` and retried.
    """

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client  # noqa: PLC0415

        self.core: Any = client.CoreV1Api(api_client)
        self.coordination: Any = client.CoordinationV1Api(api_client)
        self.broken: dict[str, str] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stand-in-kubelet", daemon=True)
        self._deleting: dict[str, float] = {}
        self._crashed: dict[str, float] = {}
        self._ips = 0
        self._lease_renewed = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        registered = False
        quiet = 0  # ticks in a row with nothing to do
        while not self._stop.is_set():
            try:
                if not registered:
                    self._register()
                    registered = True
                if time.monotonic() - self._lease_renewed > LEASE_RENEW_S:
                    self._renew_lease()
                quiet = 0 if self._sync_pods() else quiet + 1
            except Exception as exc:
                quiet = 0
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                del self.errors[:-20]
            self._stop.wait(TICK_S if quiet < IDLE_AFTER else IDLE_TICK_S)

    def _register(self) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(node)
        capacity = {"cpu": "64", "memory": "256Gi", "pods": "500"}
        status = {
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": "192.0.2.1"}],
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "stand-in kubelet is posting ready status",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
                "nodeInfo": {"kubeletVersion": VERSION},
            }
        }
        self.core.patch_node_status(NODE, status)

    def _renew_lease(self) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": NODE, "namespace": "kube-node-lease"},
            "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": now},
        }
        try:
            self.coordination.patch_namespaced_lease(NODE, "kube-node-lease", body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.coordination.create_namespaced_lease("kube-node-lease", body)
        self._lease_renewed = time.monotonic()

    def _sync_pods(self) -> bool:
        """Bring the pods bound to the node up to date; True when anything changed or is
        waiting on a timer (a deletion's delay, a crash loop's restarts)."""
        response = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={NODE}", _preload_content=False
        )
        busy = False
        for pod in json.loads(response.data)["items"]:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                self._finish_deletion(meta)
                busy = True
                continue
            status = self._status(pod)
            if status is not None:
                self.core.patch_namespaced_pod_status(
                    meta["name"], meta["namespace"], {"status": status}
                )
                busy = True
            elif meta["uid"] in self._crashed:
                busy = True
        return busy

    def _finish_deletion(self, meta: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        first = self._deleting.setdefault(meta["uid"], time.monotonic())
        if time.monotonic() - first < DELETE_DELAY_S:
            return
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        self._deleting.pop(meta["uid"], None)

    def _reason(self, image: str) -> str | None:
        return next((r for key, r in self.broken.items() if key in image), None)

    def _status(self, pod: dict[str, Any]) -> dict[str, Any] | None:
        """The status to report for `pod`, or None when it already says so."""
        uid, current = pod["metadata"]["uid"], pod.get("status") or {}
        container = pod["spec"]["containers"][0]
        reason = self._reason(container["image"])
        statuses = current.get("containerStatuses") or []
        restarts = statuses[0].get("restartCount", 0) if statuses else 0
        if reason == "CrashLoopBackOff":
            last = self._crashed.get(uid, 0.0)
            if statuses and time.monotonic() - last < CRASH_RESTART_S:
                return None
            self._crashed[uid] = time.monotonic()
            restarts += 1 if statuses else 0
        elif statuses and _reported(statuses[0], reason):
            return None  # reported once; nothing changes for a running or stuck pod
        ready = reason is None
        if not current.get("podIP"):
            self._ips += 1
        ip = current.get("podIP") or f"192.0.2.{10 + self._ips % 240}"
        return {
            "phase": "Running" if reason in (None, "NotReady", "CrashLoopBackOff") else "Pending",
            "hostIP": "192.0.2.1",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": current.get("startTime") or _now(),
            "conditions": [
                {"type": t, "status": "True" if ok else "False", "lastTransitionTime": _now()}
                for t, ok in (
                    ("Initialized", True),
                    ("Ready", ready),
                    ("ContainersReady", ready),
                    ("PodScheduled", True),
                )
            ],
            "containerStatuses": [_container_status(container, reason, restarts)],
        }


def _reported(status: dict[str, Any], reason: str | None) -> bool:
    """`status` already says what `reason` (None: running and ready) means."""
    state = status.get("state") or {}
    if reason in (None, "NotReady"):
        return "running" in state and bool(status.get("ready")) == (reason is None)
    return bool((state.get("waiting") or {}).get("reason") == reason)


def _container_status(
    container: dict[str, Any], reason: str | None, restarts: int
) -> dict[str, Any]:
    messages = {
        "ImagePullBackOff": f'Back-off pulling image "{container["image"]}"',
        "ErrImagePull": "rpc error: code = NotFound desc = manifest unknown",
        "CrashLoopBackOff": "back-off 10s restarting failed container",
        "CreateContainerConfigError": 'configmap "missing" not found',
    }
    status: dict[str, Any] = {
        "name": container["name"],
        "image": container["image"],
        "imageID": container["image"] if "@" in container["image"] else "",
        "ready": reason is None,
        "started": reason in (None, "NotReady"),
        "restartCount": restarts,
    }
    if reason in (None, "NotReady"):
        status["state"] = {"running": {"startedAt": _now()}}
        return status
    status["state"] = {"waiting": {"reason": reason, "message": messages[reason]}}
    if reason == "CrashLoopBackOff":
        status["lastState"] = {
            "terminated": {
                "exitCode": 1,
                "reason": "Error",
                "startedAt": _now(),
                "finishedAt": _now(),
            }
        }
    return status


# --------------------------------------------------------------------------- fixture


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeCluster]:
    """A real control plane for the session (see the module docstring)."""
    workdir = Path(tempfile.mkdtemp(prefix="elice-kube-"))
    cluster = start_cluster(workdir)
    _TIMINGS.append(f"control plane ({VERSION}) usable in {cluster.start_s:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _TIMINGS:
        terminalreporter.write_line(f"kube: {line}")
