"""Configuration: the embedded default loads; bad input names the file, field and problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from blocks.catalog import ServiceCatalog
from blocks.config import load_blocks, load_config, load_file, save_as_blocks
from blocks.environments import EnvironmentCatalog
from core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "config" / "pipeline.yaml"


def _write(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(DEFAULT.read_text())
    mutate(data)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_describes_twelve_services_and_three_environments() -> None:
    cfg = load_file(DEFAULT)
    assert len(cfg.catalog.services) == 12
    assert cfg.environments.names() == ["dev", "staging", "production"]
    prod = cfg.environment("production")
    assert (prod.namespace, prod.replicas.min, prod.replicas.max, prod.log_level) == (
        "elice-devops-prod",
        3,
        10,
        "WARN",
    )
    assert prod.paged
    assert cfg.environment("staging").namespace == "elice-devops-stg"
    assert cfg.environment("dev").storage == "minio"
    assert prod.storage == "s3"
    assert sorted(cfg.catalog.dependents_of_lib("authn")) == [
        "api-gateway",
        "assessment",
        "enrollment",
        "payment",
        "user",
    ]
    # servicekit reaches every service, directly or through authn
    assert len(cfg.catalog.dependents_of_lib("servicekit")) == 12


def test_every_catalog_service_exists_in_the_monorepo() -> None:
    cfg = load_file(DEFAULT)
    for svc in cfg.catalog.services:
        assert (REPO / svc.path / "pyproject.toml").is_file(), svc.name
        assert (REPO / svc.path / "src" / svc.package / "main.py").is_file(), svc.name
    for lib in cfg.catalog.libs:
        assert (REPO / lib.path / "pyproject.toml").is_file(), lib.name


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["services"][0].update(port="eighty"), "services[0]: port"),
        (lambda d: d["services"][1].update(port=8001), "duplicate ports [8001]"),
        (lambda d: d["services"][2].update(libs=["nope"]), "unknown libs ['nope']"),
        (
            lambda d: d["environments"][2].update(approvers=["mallory"]),
            "approvers: the approval policy is not part of the pipeline configuration",
        ),
        (lambda d: d["environments"][0].update(log_level="LOUD"), "environments[0]: log_level"),
        (lambda d: d["environments"][1].update(promotes_from="qa"), "promotes_from 'qa'"),
        (lambda d: d["environments"][0]["replicas"].update(max=0), "environments[0]: replicas.max"),
        (lambda d: d.update(colour="blue"), "unknown top-level keys ['colour']"),
        (lambda d: d.pop("services"), "services: field required"),
        (lambda d: d["performance"].update(max_p95_ratio=0.5), "performance: max_p95_ratio"),
        (lambda d: d["environments"][0].update(target="nomad"), "environments[0]: target"),
        (
            lambda d: d["environments"][1].update(registry={"kind": "gcr", "block": "x"}),
            "environments[1]: registry.kind",
        ),
        (
            lambda d: d["environments"][1].update(registry={"kind": "oci", "block": "Not_A_Name"}),
            "environments[1]: registry.block",
        ),
    ],
)
def test_invalid_configuration_names_file_field_and_problem(tmp_path, mutate, expected) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(ConfigError) as caught:
        load_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert expected in message


def test_the_default_ships_everywhere_through_docker_and_the_ci_registry() -> None:
    for env in load_file(DEFAULT).environments.environments:
        assert (env.target, env.registry) == ("docker", None), env.name


def test_the_aws_setup_names_each_environments_ecr_registry_and_kubernetes() -> None:
    aws = load_file(REPO / "config" / "pipeline.aws.yaml")
    default = load_file(DEFAULT)
    assert aws.catalog == default.catalog  # extends: the services are the default's
    assert aws.performance == default.performance
    assert aws.environments.names() == default.environments.names()
    for env in aws.environments.environments:
        assert env.target == "kubernetes"
        assert env.registry is not None
        assert (env.registry.kind, env.registry.block) == ("ecr", f"elice-ecr-{env.name}")
        base = default.environment(env.name)
        assert env.model_dump(exclude={"target", "registry"}) == base.model_dump(
            exclude={"target", "registry"}
        )


def test_extends_replaces_whole_sections_and_goes_one_level_deep(tmp_path: Path) -> None:
    base = _write(tmp_path, lambda d: None)
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"extends": base.name, "performance": {"requests": 5}}))
    cfg = load_file(child)
    assert cfg.performance.requests == 5
    assert len(cfg.catalog.services) == 12
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(yaml.safe_dump({"extends": child.name}))
    with pytest.raises(ConfigError, match="must be a mapping that extends nothing"):
        load_file(grandchild)
    dangling = tmp_path / "dangling.yaml"
    dangling.write_text(yaml.safe_dump({"extends": "absent.yaml"}))
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read configuration"):
        load_file(dangling)


def test_unreadable_and_malformed_files_are_config_errors(tmp_path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_file(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_file(broken)


def test_unknown_service_and_environment_lookups_list_the_known_ones() -> None:
    cfg = load_file(DEFAULT)
    with pytest.raises(ConfigError, match="known services: api-gateway"):
        cfg.service("billing")
    with pytest.raises(ConfigError, match="known: dev, staging, production"):
        cfg.environment("qa")
    with pytest.raises(ConfigError, match="unknown services"):
        cfg.catalog.select(["auth", "billing"])


def test_configuration_round_trips_through_saved_prefect_blocks() -> None:
    cfg = load_file(DEFAULT)
    names = save_as_blocks(cfg)
    assert len(names) == 2
    loaded = load_blocks()
    assert isinstance(loaded.catalog, ServiceCatalog)
    assert isinstance(loaded.environments, EnvironmentCatalog)
    assert loaded.catalog.names() == cfg.catalog.names()
    assert loaded.environment("production") == cfg.environment("production")
    assert load_config("blocks").catalog.get("payment").coverage_threshold == 90
