"""deployments/monitoring: every overlay renders with the real kustomize, validates strictly,
and mounts monitoring/ where the configuration expects it.

The mounted volumes are laid out from the rendered ConfigMaps exactly as the kubelet would
(projected items, keys as files) and checked with the real promtool and amtool there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.deploy.manifests import KUBERNETES_VERSION, kustomize, overlay_names, validate_objects
from tests.monitoring.tools import (
    ALERTMANAGER_YML,
    MONITORING,
    PROMETHEUS_YML,
    REPO,
    as_file_sd,
    flags,
    load_yaml,
    run,
    tool,
)

MANIFESTS = REPO / "deployments" / "monitoring"
ENVS = ["dev", "staging", "production"]
NAMESPACE = "monitoring"
GRAFANA = MONITORING / "grafana"


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {env: kustomize(MANIFESTS / "overlays" / env, root=MONITORING) for env in ENVS}


def _of(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _config_map(objects: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].rsplit("-", 1)[0] == prefix
    ]
    return found


def _container(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    (container,) = _of(objects, "Deployment")[name]["spec"]["template"]["spec"]["containers"]
    return dict(container)


def materialize(
    objects: list[dict[str, Any]],
    deployment: str,
    mount_path: str,
    into: Path,
    secrets: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Write the volume `deployment` mounts at `mount_path` into `into`, as the kubelet would."""
    pod = _of(objects, "Deployment")[deployment]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_maps = _of(objects, "ConfigMap")
    if "configMap" in volume:
        sources = [{"configMap": volume["configMap"]}]
    else:
        sources = volume["projected"]["sources"]
    for source in sources:
        if "configMap" in source:
            data = config_maps[source["configMap"]["name"]]["data"]
            ref = source["configMap"]
        else:
            ref = source["secret"]
            data = (secrets or {})[ref["name"]]
        items = ref.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            target = into / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[item["key"]], encoding="utf-8")
    return into


def test_overlays_are_the_configured_environments_and_apart_from_the_services() -> None:
    assert sorted(p.name for p in (MANIFESTS / "overlays").iterdir()) == sorted(ENVS)
    # The services' overlay list (what deploys and promotions render) does not include them.
    assert overlay_names(REPO / "deployments") == sorted(ENVS)
    assert not (REPO / "deployments" / "overlays" / "monitoring").exists()


@pytest.mark.parametrize("env", ENVS)
def test_overlay_validates_strictly(rendered: dict[str, list[dict[str, Any]]], env: str) -> None:
    objects = rendered[env]
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
    } <= kinds
    assert sorted(_of(objects, "Deployment")) == [
        "alertmanager",
        "grafana",
        "kube-state-metrics",
        "prometheus",
    ]
    assert validate_objects(objects, KUBERNETES_VERSION) == []
    namespaced = [o for o in objects if o["kind"] not in {"Namespace", "ClusterRole"}]
    namespaced = [o for o in namespaced if o["kind"] != "ClusterRoleBinding"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {NAMESPACE}


def test_strict_validation_catches_a_broken_monitoring_object(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    prometheus = json.loads(json.dumps(_of(rendered["dev"], "Deployment")["prometheus"]))
    prometheus["spec"]["template"]["spec"]["containers"][0]["argz"] = ["--x"]
    role = json.loads(json.dumps(_of(rendered["dev"], "ClusterRole")["elice-prometheus"]))
    role["rules"][0]["verbs"] = "get"
    problems = validate_objects([prometheus, role])
    assert len(problems) == 2, problems
    assert "argz" in problems[0]
    assert problems[1].startswith("ClusterRole/elice-prometheus: rules.0.verbs")


def test_rbac_lets_prometheus_discover_pods_and_read_the_kubelet(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["production"]
    pod = _of(objects, "Deployment")["prometheus"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    assert account in _of(objects, "ServiceAccount")
    (binding,) = [
        b
        for b in _of(objects, "ClusterRoleBinding").values()
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in b["subjects"]
    ]
    role = _of(objects, "ClusterRole")[binding["roleRef"]["name"]]
    core = [r for r in role["rules"] if r.get("apiGroups") == [""]]
    granted = {(res, verb) for r in core for res in r["resources"] for verb in r["verbs"]}
    for resource in ("pods", "nodes", "nodes/metrics", "endpoints", "services"):
        for verb in ("get", "list", "watch"):
            assert (resource, verb) in granted, f"prometheus cannot {verb} {resource}"
    assert not any("secrets" in r.get("resources", []) for r in role["rules"])
    # Discovery roles the scrape config uses are covered by the grant.
    roles = {
        sd["role"]
        for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]
        for sd in job.get("kubernetes_sd_configs", [])
    }
    # Kubernetes discovery lists and watches the role's resources (endpoints: also services, pods).
    needed = {"node": {"nodes"}, "pod": {"pods"}, "endpoints": {"endpoints", "services", "pods"}}
    for sd_role in roles:
        for resource in needed[sd_role]:
            assert {(resource, "list"), (resource, "watch")} <= granted, (sd_role, resource)


@pytest.mark.parametrize("env", ENVS)
def test_prometheus_runs_the_flags_file_with_15d_retention(
    rendered: dict[str, list[dict[str, Any]]], env: str
) -> None:
    container = _container(rendered[env], "prometheus")
    expected = [f"--{k}" if v is None else f"--{k}={v}" for k, v in flags().items()]
    assert container["args"] == expected
    assert "--storage.tsdb.retention.time=15d" in container["args"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/prometheus", flags()["storage.tsdb.path"]} <= mounts


def test_mounted_prometheus_config_finds_its_rules(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """promtool reads the config as mounted: rules/*.yml resolve next to prometheus.yml."""
    etc = materialize(rendered["staging"], "prometheus", "/etc/prometheus", tmp_path / "etc")
    assert (etc / "prometheus.yml").read_text(encoding="utf-8") == PROMETHEUS_YML.read_text(
        encoding="utf-8"
    )
    config = as_file_sd(load_yaml(etc / "prometheus.yml"), tmp_path)
    config["rule_files"] = [
        str(etc / pattern) for pattern in load_yaml(PROMETHEUS_YML)["rule_files"]
    ]
    checked = etc / "checked.yml"
    checked.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = run(tool("promtool"), "check", "config", checked)
    for name in ("alerts.yml", "recording.yml"):
        assert str(etc / "rules" / name) in proc.stdout, proc.stdout
    assert "FAILED" not in proc.stdout + proc.stderr


def test_alertmanager_reads_its_secrets_where_the_config_points(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = rendered["production"]
    secrets = {
        "alertmanager-secrets": {
            "pagerduty-routing-key": "k3y\n",
            "slack-webhook-url": "https://hooks.slack.invalid/services/T/B/X\n",
        }
    }
    etc = materialize(objects, "alertmanager", "/etc/alertmanager", tmp_path, secrets)
    config = load_yaml(etc / "alertmanager.yml")
    assert config == load_yaml(ALERTMANAGER_YML)
    files = [
        value
        for receiver in config["receivers"]
        for kind in ("pagerduty_configs", "slack_configs")
        for entry in receiver.get(kind, [])
        for key, value in entry.items()
        if key.endswith("_file")
    ]
    assert len(files) == 2
    for path in files:
        assert path.startswith("/etc/alertmanager/")
        assert (etc / path.removeprefix("/etc/alertmanager/")).is_file(), path
    # Run amtool on the mounted layout, the secret paths pointing into it.
    text = (etc / "alertmanager.yml").read_text(encoding="utf-8")
    (etc / "local.yml").write_text(text.replace("/etc/alertmanager/", f"{etc}/"), encoding="utf-8")
    assert "SUCCESS" in run(tool("amtool"), "check-config", etc / "local.yml").stdout
    container = _container(objects, "alertmanager")
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in container["args"]


def test_services_match_what_the_configuration_addresses(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["production"]
    services = _of(objects, "Service")
    config = load_yaml(PROMETHEUS_YML)
    (target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.rsplit(":", 1)
    name, namespace, _ = host.split(".", 2)
    assert (name, namespace) == ("alertmanager", NAMESPACE)
    assert services[name]["spec"]["ports"][0]["port"] == int(port)

    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["url"] == f"http://prometheus.{NAMESPACE}.svc:9090"
    assert services["prometheus"]["spec"]["ports"][0]["port"] == 9090

    # kube-state-metrics as the scrape job keeps it: label and port name.
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "kube-state-metrics")
    wanted = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]}
    ksm = services["kube-state-metrics"]
    label = wanted["__meta_kubernetes_service_label_app_kubernetes_io_name"]
    assert ksm["metadata"]["labels"]["app.kubernetes.io/name"] == label
    port_names = [p["name"] for p in ksm["spec"]["ports"]]
    assert wanted["__meta_kubernetes_endpoint_port_name"] in port_names
    assert NAMESPACE in job["kubernetes_sd_configs"][0]["namespaces"]["names"]


def test_grafana_provisions_the_datasource_and_dashboards(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = rendered["dev"]
    container = _container(objects, "grafana")
    env = {e["name"]: e.get("value") for e in container["env"]}
    provisioning = env["GF_PATHS_PROVISIONING"]
    mounted = materialize(objects, "grafana", str(provisioning), tmp_path / "provisioning")
    assert (mounted / "datasources" / "prometheus.yml").is_file()
    providers = load_yaml(mounted / "dashboards" / "elice.yml")["providers"]
    (provider,) = providers
    assert provider["updateIntervalSeconds"] == 30
    dashboards = materialize(
        objects, "grafana", provider["options"]["path"], tmp_path / "dashboards"
    )
    shipped = sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json"))
    assert sorted(p.name for p in dashboards.iterdir()) == shipped
    for name in shipped:
        board = json.loads((dashboards / name).read_text(encoding="utf-8"))
        assert board["refresh"] == "30s", name
    # No login without the admin Secret; no anonymous access.
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == {"grafana-admin"}


def test_overlays_size_prometheus_storage(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def storage(env: str) -> str | None:
        claims = _of(rendered[env], "PersistentVolumeClaim")
        pod = _of(rendered[env], "Deployment")["prometheus"]["spec"]["template"]["spec"]
        (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
        if "emptyDir" in data:
            assert not claims
            return None
        assert data["persistentVolumeClaim"]["claimName"] in claims
        return str(
            claims[data["persistentVolumeClaim"]["claimName"]]["spec"]["resources"]["requests"][
                "storage"
            ]
        )

    assert [storage(env) for env in ENVS] == [None, "20Gi", "100Gi"]


def test_every_pod_meets_the_restricted_pod_security_standard(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["production"]
    namespace = _of(objects, "Namespace")[NAMESPACE]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, deployment in _of(objects, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["limits"], name
            assert "@" in container["image"] or ":" in container["image"].rsplit("/", 1)[-1]
