"""A SIMULATOR of the Kubernetes API server, for tests. Not Kubernetes.

A real control plane now runs in the suite too (tests/plugins/kube.py); this fake
stays for what it cannot show there (traffic to pods, injected failures, a simulated
clock): a real HTTP server on
loopback speaking the real REST wire protocol (paths, verbs, content types, Status
objects, resourceVersion, 409 Conflict) for the few resources the pipeline uses:

- /version; POST selfsubjectaccessreviews (always allowed)
- /api/v1: namespaces, serviceaccounts, configmaps, secrets (the registry pull secret),
  services, persistentvolumeclaims, pods (list/get; pods are made by the simulated
  Deployment controller)
- /apis/apps/v1 deployments, /apis/autoscaling/v2 horizontalpodautoscalers,
  /apis/policy/v1 poddisruptionbudgets

Verbs: GET (item, list with equality labelSelector), POST, PUT (stale resourceVersion
-> 409), PATCH (application/apply-patch+yaml: server-side apply, needs fieldManager;
application/merge-patch+json; application/strategic-merge-patch+json, approximated
as a merge patch that merges lists of named items by name), DELETE.

Simplifications, on purpose: server-side apply replaces each top-level field the
applier sends (one field manager, no managedFields bookkeeping); a Deployment without
spec.replicas keeps its replicas (the HPA owns them, 1 on creation); no ReplicaSets;
no admission, no defaulting beyond a few fields.

The rollout model runs on simulated time (`now`), advanced one step (`step_seconds`)
by each GET of a Deployment or of pods, never by the wall clock, so tests are
deterministic (`now` can serve as the client's clock):
- a new pod is created per step (maxSurge 1) and is ready `pod_ready_s` later, then
  one old pod goes;
- a pod whose image (or digest) is in `bad_images` never becomes ready; it shows the
  waiting reason given there (ImagePullBackOff, ErrImagePull, CrashLoopBackOff,
  CreateContainerConfigError), or runs without ever being ready (NOT_READY: a failing
  readiness probe), and the old pods keep serving; after the progress
  deadline (`progress_deadline_s`, else the Deployment's progressDeadlineSeconds) of
  simulated time without progress the Progressing condition turns
  False / ProgressDeadlineExceeded.

What a real API server does that the deploy code must cope with, reproduced here:
- the HPA raises a new Deployment to its minReplicas only at its next sync
  (`hpa_sync_s`, 15 s like kube-controller-manager), not at once;
- a deleted pod (scale-down, rollout, Deployment deleted) terminates gracefully: it
  keeps its place in pod lists with a deletionTimestamp for `termination_grace_s`;
- rolling back from a rollout that exceeded its deadline, the controller reports the
  failed rollout's ProgressDeadlineExceeded condition at the new generation for the
  next `rollback_stale_reads` reads, then the truth.

The service proxy (`/api/v1/namespaces/<ns>/services/<name>:<port>/proxy/<path>`, GET):
answered as one of the Service's ready pods would answer (round robin), from the pod's
own container variables: /health and /ready 200, /version with its IMAGE_DIGEST,
APP_VERSION and GIT_COMMIT; 503 "no endpoints available" while no pod is ready, like
the real API server. No service code runs here: what a release's process answers is
tested on the docker target; this checks the path and the pod a health check reaches.

Fault injection: `fail_next(n, status)` answers the next n matching requests with
that status (500, 409, 503...); `delay_next(n, seconds)` stalls them (timeouts).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

# (group/version, plural) -> (kind, namespaced)
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("v1", "namespaces"): ("Namespace", False),
    ("v1", "serviceaccounts"): ("ServiceAccount", True),
    ("v1", "configmaps"): ("ConfigMap", True),
    ("v1", "secrets"): ("Secret", True),
    ("v1", "services"): ("Service", True),
    ("v1", "persistentvolumeclaims"): ("PersistentVolumeClaim", True),
    ("v1", "pods"): ("Pod", True),
    ("apps/v1", "deployments"): ("Deployment", True),
    ("autoscaling/v2", "horizontalpodautoscalers"): ("HorizontalPodAutoscaler", True),
    ("policy/v1", "poddisruptionbudgets"): ("PodDisruptionBudget", True),
}
PULL = "ImagePullBackOff"
ERR_PULL = "ErrImagePull"
CRASH = "CrashLoopBackOff"
CONFIG = "CreateContainerConfigError"
NOT_READY = "NotReady"  # running, never ready (a failing readiness probe): slow but alive
WAITING_MESSAGES = {
    PULL: 'Back-off pulling image "{image}"',
    ERR_PULL: 'failed to pull and unpack image "{image}": not found',
    CONFIG: 'configmap "{container}-settings" not found',
}
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-elice-simulator",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


@dataclass
class Fault:
    remaining: int
    status: int = 500
    delay_s: float = 0.0
    method: str | None = None
    path_contains: str | None = None

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_contains is None or self.path_contains in path)
        )


@dataclass
class _Rollout:
    last_progress: float = 0.0
    ready_at: dict[str, float] = field(default_factory=dict)
    stale_reads: int = 0


Key = tuple[str, str, str, str]  # group/version, plural, namespace ("" if cluster), name


class KubeSimulator:
    """A fake Kubernetes API server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        *,
        token: str | None = "simulator-token",
        step_seconds: float = 5.0,
        pod_ready_s: float = 5.0,
        progress_deadline_s: float | None = None,
        hpa_sync_s: float = 15.0,
        termination_grace_s: float = 10.0,
        rollback_stale_reads: int = 2,
    ) -> None:
        self.token = token
        self.step_seconds = step_seconds
        self.pod_ready_s = pod_ready_s
        self.progress_deadline_s = progress_deadline_s
        self.hpa_sync_s = hpa_sync_s
        self.termination_grace_s = termination_grace_s
        self.rollback_stale_reads = rollback_stale_reads
        self._hpa_synced: dict[tuple[str, str], float] = {}
        self._terminating: dict[tuple[str, str], float] = {}
        self.bad_images: dict[str, str] = {}
        self.requests: list[tuple[str, str, int, str]] = []  # method, path, status, content type
        self.faults: list[Fault] = []
        self.arrivals: list[tuple[str, str]] = []  # method, path; recorded before any delay
        self.now = 0.0
        self.deployment_reads: list[dict[str, Any]] = []  # every Deployment a GET served
        self.proxied: list[tuple[str, str, str]] = []  # namespace, service, path of proxy GETs
        self._proxy_turn = itertools.count()
        self.stale_conditions_served = 0
        self._store: dict[Key, dict[str, Any]] = {}
        self._rollouts: dict[tuple[str, str], _Rollout] = {}
        self._rv = itertools.count(1)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> KubeSimulator:
        handler = type("Handler", (_Handler,), {"sim": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self, down_s: float) -> threading.Thread:
        """Stop answering (connections refused) for `down_s` wall seconds, then serve
        again on the same port with the same state: an API server restart."""
        assert self._server is not None, "simulator not started"
        port = self._server.server_address[1]
        self.stop()

        def again() -> None:
            time.sleep(down_s)
            handler = type("Handler", (_Handler,), {"sim": self})
            self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
            self._server.daemon_threads = True
            self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
            self._thread.start()

        thread = threading.Thread(target=again, daemon=True)
        thread.start()
        return thread

    def __enter__(self) -> KubeSimulator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "simulator not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def kubeconfig(self, path: Path, context: str = "simulator") -> Path:
        """Write a kubeconfig whose context points at this simulator."""
        user: dict[str, Any] = {"token": self.token} if self.token else {}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": context,
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context}}],
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    # -- test controls

    def fail_next(
        self,
        count: int,
        status: int = 500,
        *,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Answer the next `count` matching requests with `status`."""
        with self._lock:
            self.faults.append(Fault(count, status, 0.0, method, path_contains))

    def delay_next(
        self,
        count: int,
        seconds: float,
        *,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Stall the next `count` matching requests for `seconds` before answering."""
        with self._lock:
            self.faults.append(Fault(count, 0, seconds, method, path_contains))

    def get(self, kind_plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A stored object by plural ("deployments"), namespace and name."""
        with self._lock:
            for (_gv, plural, ns, n), obj in self._store.items():
                if plural == kind_plural and ns == namespace and n == name:
                    return copy.deepcopy(obj)
        return None

    def list(self, kind_plural: str, namespace: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(o)
                for (gv, plural, ns, _), o in sorted(self._store.items())
                if plural == kind_plural and (not namespace or ns == namespace)
            ]

    def step(self, count: int = 1) -> None:
        """Advance the simulated controllers by `count` steps."""
        with self._lock:
            for _ in range(count):
                self.now += self.step_seconds
                self._reconcile()

    # -- request handling (called by the handler under the lock)

    def handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if path == "/version":
            return 200, dict(VERSION)
        if path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" and method == "POST":
            review = _load_body(body, headers)  # one all-powerful token: everything allowed
            return 201, {**review, "status": {"allowed": True, "reason": "simulated"}}
        proxied = SERVICE_PROXY.match(parts.path)
        if proxied:
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported here")
            namespace, name, rest = proxied["namespace"], proxied["name"], proxied["rest"] or "/"
            return self._proxy(namespace, name, rest)
        gv, plural, namespace, name, sub = _route(path)
        kind, namespaced = RESOURCES[(gv, plural)]
        if namespaced and namespace and (("v1", "namespaces", "", namespace) not in self._store):
            if method in {"POST", "PUT", "PATCH"}:
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found')
        if sub not in ("", "status"):
            raise ApiError(
                404, "NotFound", f"the server could not find the requested resource ({sub})"
            )
        if method == "GET" and plural in ("deployments", "pods"):
            self.step()
        if name == "":
            if method == "GET":
                return 200, self._list(gv, plural, kind, namespace, query.get("labelSelector", ""))
            if method == "POST":
                obj = _load_body(body, headers)
                return 201, self._create(gv, plural, kind, namespace, obj)
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        key = (gv, plural, namespace, name)
        if method == "GET":
            served = copy.deepcopy(self._existing(key, kind))
            if plural == "deployments":
                self.deployment_reads.append(copy.deepcopy(served))
            return 200, served
        if method == "DELETE":
            self._existing(key, kind)
            if plural != "pods":
                del self._store[key]
            if plural == "deployments":
                self._delete_pods(namespace, name)
                self._rollouts.pop((namespace, name), None)
            if plural == "pods":  # graceful: the server answers with the terminating pod
                self._delete_pod(self._store[key])
                return 200, copy.deepcopy(self._store[key])
            return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}
        if method == "PUT":
            return 200, self._update(key, kind, _load_body(body, headers), sub)
        if method == "PATCH":
            return self._patch(key, kind, headers.get("content-type", ""), body, query)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def _proxy(self, namespace: str, name: str, path: str) -> tuple[int, dict[str, Any]]:
        """A GET through the Service `name`, answered as a ready pod behind it would."""
        if ("v1", "services", namespace, name) not in self._store:
            raise ApiError(404, "NotFound", f'services "{name}" not found')
        ready = [p for p in self._pods_of(namespace, name) if _ready(p) and not _terminating(p)]
        if not ready:
            raise ApiError(
                503, "ServiceUnavailable", f'no endpoints available for service "{name}"'
            )
        pod = ready[next(self._proxy_turn) % len(ready)]
        self.proxied.append((namespace, name, path))
        env = {
            e["name"]: str(e.get("value", ""))
            for c in pod["spec"].get("containers", [])
            for e in c.get("env", [])
        }
        if path in ("/health", "/ready"):
            return 200, {"status": "ok", "pod": pod["metadata"]["name"]}
        if path == "/version":
            return 200, {
                "service": name,
                "version": env.get("APP_VERSION", ""),
                "release": env.get("APP_RELEASE", ""),
                "digest": env.get("IMAGE_DIGEST", ""),
                "commit": env.get("GIT_COMMIT", ""),
            }
        raise ApiError(404, "NotFound", f"{path}: not found (simulated pod)")

    # -- verbs

    def _existing(self, key: Key, kind: str) -> dict[str, Any]:
        obj = self._store.get(key)
        if obj is None:
            resource = f"{key[1]}.{key[0].split('/')[0]}" if "/" in key[0] else key[1]
            raise ApiError(404, "NotFound", f'{resource} "{key[3]}" not found')
        return obj

    def _list(
        self, gv: str, plural: str, kind: str, namespace: str, selector: str
    ) -> dict[str, Any]:
        wanted = dict(item.split("=", 1) for item in selector.split(",") if "=" in item)
        items = [
            copy.deepcopy(obj)
            for (g, p, ns, _), obj in sorted(self._store.items())
            if g == gv
            and p == plural
            and (not namespace or ns == namespace)
            and all((obj["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())
        ]
        return {
            "apiVersion": gv,
            "kind": f"{kind}List",
            "metadata": {"resourceVersion": str(next(self._rv))},
            "items": items,
        }

    def _create(
        self, gv: str, plural: str, kind: str, namespace: str, obj: dict[str, Any]
    ) -> dict[str, Any]:
        name = obj.get("metadata", {}).get("name", "")
        if not name:
            raise ApiError(422, "Invalid", f"{kind} is invalid: metadata.name: Required value")
        _check_identity(obj, gv, kind, name)
        key = (gv, plural, namespace, name)
        if key in self._store:
            raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
        return self._write(key, kind, obj, None)

    def _update(self, key: Key, kind: str, obj: dict[str, Any], sub: str) -> dict[str, Any]:
        current = self._existing(key, kind)
        _check_identity(obj, key[0], kind, key[3])
        sent = obj.get("metadata", {}).get("resourceVersion")
        if sent and sent != current["metadata"]["resourceVersion"]:
            raise _conflict(key)
        if sub == "status":
            merged = copy.deepcopy(current)
            merged["status"] = obj.get("status", {})
            return self._write(key, kind, merged, current)
        obj = copy.deepcopy(obj)
        obj["status"] = current.get("status", {})
        return self._write(key, kind, obj, current)

    def _patch(
        self, key: Key, kind: str, content_type: str, body: bytes, query: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        content_type = content_type.split(";", maxsplit=1)[0].strip()
        current = self._store.get(key)
        if content_type == "application/apply-patch+yaml":
            if not query.get("fieldManager"):
                raise ApiError(
                    400,
                    "BadRequest",
                    'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                    "is required for apply patch",
                )
            applied = yaml.safe_load(body.decode() or "{}") or {}
            _check_identity(applied, key[0], kind, key[3])
            sent = applied.get("metadata", {}).get("resourceVersion")
            if current is not None and sent and sent != current["metadata"]["resourceVersion"]:
                raise _conflict(key)
            if current is None:
                return 201, self._write(key, kind, applied, None)
            return 200, self._write(key, kind, _server_side_apply(current, applied), current)
        if current is None:
            current = self._existing(key, kind)  # raises NotFound
        patch = json.loads(body or b"{}")
        if content_type == "application/merge-patch+json":
            merged = _merge_patch(current, patch, by_name=False)
        elif content_type == "application/strategic-merge-patch+json":
            merged = _merge_patch(current, patch, by_name=True)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format: {content_type}",
            )
        sent = patch.get("metadata", {}).get("resourceVersion") if isinstance(patch, dict) else None
        if sent and sent != current["metadata"]["resourceVersion"]:
            raise _conflict(key)
        return 200, self._write(key, kind, merged, current)

    def _write(
        self, key: Key, kind: str, obj: dict[str, Any], current: dict[str, Any] | None
    ) -> dict[str, Any]:
        gv, _plural, namespace, name = key
        obj = copy.deepcopy(obj)
        obj["apiVersion"], obj["kind"] = gv, kind
        meta = obj.setdefault("metadata", {})
        meta["name"] = name
        if namespace:
            meta["namespace"] = namespace
        if current is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _timestamp()
            meta["generation"] = 1
        else:
            old = current["metadata"]
            meta["uid"], meta["creationTimestamp"] = old["uid"], old["creationTimestamp"]
            changed = obj.get("spec") != current.get("spec")
            meta["generation"] = old.get("generation", 1) + (1 if changed else 0)
        meta["resourceVersion"] = str(next(self._rv))
        if kind == "Deployment":
            spec = obj.setdefault("spec", {})
            spec.setdefault("progressDeadlineSeconds", 600)
            if "replicas" not in spec:
                previous = (current or {}).get("spec", {}).get("replicas")
                spec["replicas"] = previous if previous is not None else 1
            obj.setdefault("status", {})
            state = self._rollouts.setdefault((namespace, name), _Rollout(last_progress=self.now))
            if current is None or obj["spec"].get("template") != current["spec"].get("template"):
                state.last_progress = self.now
                conditions = (current or {}).get("status", {}).get("conditions") or []
                if any(c.get("reason") == "ProgressDeadlineExceeded" for c in conditions):
                    state.stale_reads = self.rollback_stale_reads
        if kind == "HorizontalPodAutoscaler" and current is None:
            self._hpa_synced[(namespace, name)] = self.now
        self._store[key] = obj
        return copy.deepcopy(obj)

    # -- the simulated controllers

    def _reconcile(self) -> None:
        for (namespace, name), gone_at in list(self._terminating.items()):
            if self.now + 1e-9 >= gone_at:
                self._store.pop(("v1", "pods", namespace, name), None)
                del self._terminating[(namespace, name)]
        for key, hpa in list(self._store.items()):
            if key[1] == "horizontalpodautoscalers":
                synced = self._hpa_synced.setdefault((key[2], key[3]), self.now)
                if self.now + 1e-9 >= synced + self.hpa_sync_s:
                    self._hpa_synced[(key[2], key[3])] = self.now
                    self._autoscale(key[2], hpa)
        for key in [k for k in self._store if k[1] == "deployments"]:
            self._roll(key)

    def _autoscale(self, namespace: str, hpa: dict[str, Any]) -> None:
        target = hpa["spec"]["scaleTargetRef"]["name"]
        key = ("apps/v1", "deployments", namespace, target)
        deployment = self._store.get(key)
        if deployment is None:
            return
        low, high = hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
        replicas = deployment["spec"]["replicas"]
        wanted = min(max(replicas, low), high)
        if wanted != replicas:
            deployment["spec"]["replicas"] = wanted
            deployment["metadata"]["generation"] += 1
            deployment["metadata"]["resourceVersion"] = str(next(self._rv))
            self._rollouts[(namespace, target)].last_progress = self.now

    def _roll(self, key: Key) -> None:
        _, _, namespace, name = key
        deployment = self._store[key]
        state = self._rollouts[(namespace, name)]
        spec, status = deployment["spec"], deployment.setdefault("status", {})
        template = spec["template"]
        template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[
            :10
        ]
        pods = [p for p in self._pods_of(namespace, name) if not _terminating(p)]
        new = [p for p in pods if p["metadata"]["labels"]["pod-template-hash"] == template_hash]
        old = [p for p in pods if p not in new]
        replicas = spec["replicas"]
        progressed = False
        for pod in new:
            progressed |= self._advance_pod(pod, state)
        ready_new = [p for p in new if _ready(p)]
        if len(new) > replicas:
            self._delete_pod(new[-1])
            new.pop()
            progressed = True
        elif len(new) < replicas and len(ready_new) == len(new):
            new.append(self._create_pod(deployment, template_hash, state))
            progressed = True
        if old and ready_new and len(old) + len(ready_new) > replicas:
            self._delete_pod(old[0])
            old.pop(0)
            progressed = True
        if progressed:
            state.last_progress = self.now
        all_pods = old + new
        available = sum(1 for p in all_pods if _ready(p))
        complete = len(new) == replicas and not old and available == replicas
        deadline = self.progress_deadline_s or spec.get("progressDeadlineSeconds", 600)
        if state.stale_reads > 0:  # the failed rollout's condition, at the new generation
            state.stale_reads -= 1
            self.stale_conditions_served += 1
            complete = False
        if complete:
            progressing = (
                "True",
                "NewReplicaSetAvailable",
                f'Deployment "{name}" has successfully progressed.',
            )
        elif self.now - state.last_progress > deadline or state.stale_reads > 0:
            progressing = (
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet of "{name}" has timed out progressing.',
            )
        else:
            progressing = ("True", "ReplicaSetUpdated", f'ReplicaSet of "{name}" is progressing.')
        status.update(
            {
                "observedGeneration": deployment["metadata"]["generation"],
                "replicas": len(all_pods),
                "updatedReplicas": len(new),
                "readyReplicas": available,
                "availableReplicas": available,
                "unavailableReplicas": max(0, replicas - available),
                "conditions": [
                    _condition(
                        "Available",
                        "True" if available >= replicas else "False",
                        "MinimumReplicasAvailable"
                        if available >= replicas
                        else "MinimumReplicasUnavailable",
                        "Deployment has minimum availability."
                        if available >= replicas
                        else "Deployment does not have minimum availability.",
                    ),
                    _condition("Progressing", *progressing),
                ],
            }
        )

    def _bad_reason(self, image: str) -> str | None:
        digest = image.rsplit("@", 1)[-1] if "@" in image else None
        return self.bad_images.get(image) or (self.bad_images.get(digest) if digest else None)

    def _create_pod(
        self, deployment: dict[str, Any], template_hash: str, state: _Rollout
    ) -> dict[str, Any]:
        namespace = deployment["metadata"]["namespace"]
        template = copy.deepcopy(deployment["spec"]["template"])
        labels = {
            **template.get("metadata", {}).get("labels", {}),
            "pod-template-hash": template_hash,
        }
        name = f"{deployment['metadata']['name']}-{template_hash}-{uuid.uuid4().hex[:5]}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _timestamp(),
                "resourceVersion": str(next(self._rv)),
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "name": deployment["metadata"]["name"],
                        "uid": deployment["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template.get("spec", {}),
            "status": {
                "phase": "Pending",
                "conditions": [_condition("Ready", "False", "ContainersNotReady", "")],
                "containerStatuses": [
                    {
                        "name": c["name"],
                        "image": c["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "started": False,
                        "state": {"waiting": {"reason": "ContainerCreating"}},
                    }
                    for c in template.get("spec", {}).get("containers", [])
                ],
            },
        }
        state.ready_at[name] = self.now + self.pod_ready_s
        self._store[("v1", "pods", namespace, name)] = pod
        return pod

    def _advance_pod(self, pod: dict[str, Any], state: _Rollout) -> bool:
        """Move a pod along its lifecycle; True when it changed in a way that counts as progress."""
        if _ready(pod) or self.now + 1e-9 < state.ready_at.get(pod["metadata"]["name"], 0):
            return False
        statuses = pod["status"]["containerStatuses"]
        bad = [(cs, self._bad_reason(cs["image"])) for cs in statuses]
        if any(reason == NOT_READY for _, reason in bad):
            for cs in statuses:
                cs.update({"started": True, "state": {"running": {"startedAt": _timestamp()}}})
            pod["status"]["phase"] = "Running"
            return False
        if any(reason for _, reason in bad):
            for cs, reason in bad:
                if reason in WAITING_MESSAGES:
                    message = WAITING_MESSAGES[reason].format(
                        image=cs["image"], container=cs["name"]
                    )
                    cs["state"] = {"waiting": {"reason": reason, "message": message}}
                elif reason:
                    cs["restartCount"] += 1
                    cs["lastState"] = {"terminated": {"reason": "Error", "exitCode": 1}}
                    cs["state"] = {
                        "waiting": {
                            "reason": CRASH,
                            "message": f"back-off restarting failed container {cs['name']}",
                        }
                    }
            pending = any(r in WAITING_MESSAGES for _, r in bad)
            pod["status"]["phase"] = "Pending" if pending else "Running"
            return False
        for cs in statuses:
            cs.update(
                {
                    "ready": True,
                    "started": True,
                    "imageID": cs["image"],
                    "state": {"running": {"startedAt": _timestamp()}},
                }
            )
        pod["status"]["phase"] = "Running"
        pod["status"]["conditions"] = [_condition("Ready", "True", "", "")]
        return True

    def _pods_of(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        return [
            pod
            for (g, p, ns, _), pod in sorted(self._store.items())
            if p == "pods"
            and ns == namespace
            and pod["metadata"]["ownerReferences"][0]["name"] == deployment
        ]

    def _delete_pod(self, pod: dict[str, Any]) -> None:
        """Graceful deletion: not ready at once, gone after `termination_grace_s`."""
        if not pod:
            return
        meta = pod["metadata"]
        key = (meta["namespace"], meta["name"])
        if key in self._terminating:
            return
        meta["deletionTimestamp"] = _timestamp()
        meta["deletionGracePeriodSeconds"] = int(self.termination_grace_s)
        meta["resourceVersion"] = str(next(self._rv))
        pod["status"]["conditions"] = [_condition("Ready", "False", "PodTerminating", "")]
        for cs in pod["status"].get("containerStatuses") or []:
            cs["ready"] = False
        self._terminating[key] = self.now + self.termination_grace_s

    def _delete_pods(self, namespace: str, deployment: str) -> None:
        for pod in self._pods_of(namespace, deployment):
            self._delete_pod(pod)


class _Handler(BaseHTTPRequestHandler):
    sim: KubeSimulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        sim = self.sim
        delay = 0.0
        with sim._lock:
            sim.arrivals.append((self.command, self.path))
            fault = next((f for f in sim.faults if f.matches(self.command, self.path)), None)
            if fault is not None:
                fault.remaining -= 1
                delay = fault.delay_s
        if delay:
            time.sleep(delay)
        try:
            if fault is not None and fault.status:
                reason = HTTPStatus(fault.status).phrase.replace(" ", "")
                raise ApiError(fault.status, reason, f"injected fault: {fault.status}")
            with sim._lock:
                code, payload = sim.handle(self.command, self.path, headers, body)
        except ApiError as exc:
            code, payload = (
                exc.code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": exc.message,
                    "reason": exc.reason,
                    "code": exc.code,
                },
            )
        except (KeyError, ValueError) as exc:
            code, payload = (
                404,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": f"the server could not find the requested resource: {exc}",
                    "reason": "NotFound",
                    "code": 404,
                },
            )
        with sim._lock:
            sim.requests.append((self.command, self.path, code, headers.get("content-type", "")))
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if headers.get("connection", "").lower() == "close":
                # as Go's net/http does: the client then opens a new connection for its
                # next request instead of reusing one this side closes
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


SERVICE_PROXY = re.compile(
    r"^/api/v1/namespaces/(?P<namespace>[^/]+)/services/(?P<name>[^/:]+)(:[^/]+)?"
    r"/proxy(?P<rest>/.*)?$"
)


def _route(path: str) -> tuple[str, str, str, str, str]:
    """(group/version, plural, namespace, name, subresource) of a resource path."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        gv, rest = "v1", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
    else:
        raise KeyError(path)
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        namespace, plural, tail = rest[1], rest[2], rest[3:]
    elif rest[:1] == ["namespaces"]:
        namespace, plural, tail = "", "namespaces", rest[1:]
    elif rest:
        namespace, plural, tail = "", rest[0], rest[1:]
    else:
        raise KeyError(path)
    if (gv, plural) not in RESOURCES:
        raise KeyError(f"{gv} {plural}")
    name = tail[0] if tail else ""
    sub = tail[1] if len(tail) > 1 else ""
    return gv, plural, namespace, name, sub


def _load_body(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    text = body.decode() or "{}"
    data = yaml.safe_load(text) if "yaml" in headers.get("content-type", "") else json.loads(text)
    if not isinstance(data, dict):
        raise ApiError(400, "BadRequest", "the request body is not an object")
    return data


def _check_identity(obj: dict[str, Any], gv: str, kind: str, name: str) -> None:
    if obj.get("apiVersion") not in (None, gv) or obj.get("kind") not in (None, kind):
        raise ApiError(
            400,
            "BadRequest",
            f"the body is a {obj.get('apiVersion')} {obj.get('kind')}, not {gv} {kind}",
        )
    body_name = obj.get("metadata", {}).get("name")
    if body_name not in (None, name):
        raise ApiError(
            400,
            "BadRequest",
            f"the name of the object ({body_name}) does not match the name on the URL ({name})",
        )


def _conflict(key: Key) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {key[1]} "{key[3]}": the object has been modified; '
        "please apply your changes to the latest version and try again",
    )


def _server_side_apply(current: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(current)
    for field_name, value in applied.items():
        if field_name in ("metadata", "status"):
            continue
        result[field_name] = copy.deepcopy(value)
    meta = result["metadata"]
    for part in ("labels", "annotations"):
        if part in applied.get("metadata", {}):
            meta[part] = {**(meta.get(part) or {}), **applied["metadata"][part]}
    return result


def _merge_patch(target: Any, patch: Any, *, by_name: bool) -> Any:
    if isinstance(patch, dict) and isinstance(target, dict):
        result = copy.deepcopy(target)
        for k, v in patch.items():
            if v is None:
                result.pop(k, None)
            else:
                result[k] = _merge_patch(result.get(k), v, by_name=by_name)
        return result
    if (
        by_name
        and isinstance(patch, list)
        and isinstance(target, list)
        and all(isinstance(i, dict) and "name" in i for i in [*patch, *target])
    ):
        merged = {i["name"]: copy.deepcopy(i) for i in target}
        for item in patch:
            merged[item["name"]] = _merge_patch(merged.get(item["name"]), item, by_name=True)
        return list(merged.values())
    return copy.deepcopy(patch)


def _terminating(pod: dict[str, Any]) -> bool:
    return "deletionTimestamp" in pod["metadata"]


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])


def _condition(kind: str, status: str, reason: str, message: str) -> dict[str, str]:
    stamp = _timestamp()
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastUpdateTime": stamp,
        "lastTransitionTime": stamp,
    }


def _timestamp() -> str:
    return datetime.now(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def simulated(**kwargs: Any) -> Iterator[KubeSimulator]:
    """A started simulator for a `with`/fixture; stopped afterwards."""
    sim = KubeSimulator(**kwargs).start()
    try:
        yield sim
    finally:
        sim.stop()


__all__ = ["CONFIG", "CRASH", "ERR_PULL", "PULL", "KubeSimulator", "simulated"]
