"""What a run trusts comes from its host, never from what the Prefect API stores.

Against a real git repository and the session's real Prefect server: with a trust
file, the repository, the configuration, the ledger's store and each registry's address
are the ones the host pins; blocks saved through the API under the names the pipeline
once read (`elice-repository`, `elice-release-storage`, `elice-registry`) change none
of them, and a registry block at another address breaks the run with a clear error.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ObjectNotFound
from prefect_aws import S3Bucket

from blocks.config import load_config
from blocks.docker_target import DockerTarget
from blocks.repository import pinned_repository
from blocks.storage import STORAGE_BLOCK, ReleaseStorage, release_storage
from core.errors import ConfigError
from core.settings import Settings
from core.trust import TrustRoots
from tasks.deploy.target import DOCKER_TARGET_BLOCK, block_digest, environment_target
from tasks.trusted import pipeline_config
from tests.tasks.ci_checkout import REPO, commit_all, git
from tests.trust import SavedRepository, trust_file_for


@pytest.fixture
def remote(tmp_path: Path) -> tuple[Path, Path]:
    """A work tree whose `main` (pushed to a bare remote) holds the configuration."""
    work = tmp_path / "work"
    (work / "config").mkdir(parents=True)
    base = yaml.safe_load((REPO / "config" / "pipeline.yaml").read_text(encoding="utf-8"))
    (work / "config" / "base.yaml").write_text(yaml.safe_dump(base), encoding="utf-8")
    (work / "config" / "pipeline.yaml").write_text(
        yaml.safe_dump({"extends": "base.yaml", "environments": base["environments"][:1]}),
        encoding="utf-8",
    )
    git(tmp_path, "init", "-q", "-b", "main", str(work))
    commit_all(work, "configuration")
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    return work, bare


def _settings(path: Path, **extra: str) -> Settings:
    return Settings.from_environ({"ELICE_TRUST_FILE": str(path), **extra})


def test_the_configuration_is_the_protected_branchs_as_committed(
    remote: tuple[Path, Path], tmp_path: Path
) -> None:
    work, bare = remote
    settings = _settings(trust_file_for(tmp_path, bare, config="config/pipeline.yaml"))
    (work / "config" / "pipeline.yaml").write_text("services: []\n", encoding="utf-8")  # unpushed
    config = pipeline_config(settings)
    assert [e.name for e in config.environments.environments] == ["dev"]  # extends, from main
    assert len(config.catalog.services) == 12
    assert "config/pipeline.yaml on main of elice/monorepo" in config.source
    with pytest.raises(ConfigError, match=r"configuration '/tmp/x.yaml' refused"):
        pipeline_config(settings, "/tmp/x.yaml")
    with pytest.raises(ConfigError, match=r"configuration 'blocks' refused"):
        pipeline_config(_settings(settings.trust_file or tmp_path, ELICE_CONFIG="blocks"))
    # a person's machine (config: null) chooses its own
    own = _settings(trust_file_for(tmp_path / "own", bare, config=None))
    assert len(pipeline_config(own).environments.environments) == 3


def test_saved_blocks_choose_neither_the_repository_nor_the_ledger(
    remote: tuple[Path, Path], tmp_path: Path
) -> None:
    _, bare = remote
    SavedRepository(url=str(tmp_path / "elsewhere.git")).save("elice-repository", overwrite=True)
    ReleaseStorage(kind="local", path=str(tmp_path / "planted")).save(STORAGE_BLOCK, overwrite=True)
    try:
        pinned = _settings(trust_file_for(tmp_path, bare))
        assert pinned_repository(pinned).url == str(bare)
        assert pinned_repository(pinned).label == "elice/monorepo"
        local = Settings.from_environ({"ELICE_REPO": str(REPO)})
        assert pinned_repository(local).url == str(REPO)
        storage = release_storage(pinned)
        assert (storage.kind, storage.path) == ("local", "")  # the host's state dir
        with pytest.raises(ConfigError, match="ELICE_STORAGE=blocks on a host with a trust file"):
            release_storage(_settings(pinned.trust_file or tmp_path, ELICE_STORAGE="blocks"))
    finally:
        with contextlib.suppress(ValueError, ObjectNotFound):
            SavedRepository.delete("elice-repository")
        with contextlib.suppress(ValueError, ObjectNotFound):
            ReleaseStorage.delete(STORAGE_BLOCK)


def test_a_pinned_s3_ledger_uses_the_hosts_credentials(tmp_path: Path) -> None:
    pinned = trust_file_for(
        tmp_path, "/srv/r", ledger="s3://elice-releases/prod", s3_endpoint="http://127.0.0.1:9"
    )
    storage = release_storage(_settings(pinned))
    assert (storage.kind, storage.bucket, storage.prefix) == ("s3", "elice-releases", "prod")
    assert storage.credentials is None  # the host's ambient AWS configuration, never a block
    assert storage.endpoint_url == "http://127.0.0.1:9"
    ledger = storage.filesystem("ledger")
    assert isinstance(ledger, S3Bucket)
    assert ledger.bucket_folder == "prod/ledger"
    with pytest.raises(ValueError, match="absolute directory or s3://bucket/prefix"):
        TrustRoots(repository="/srv/r", environments=("dev",), ledger="relative/dir")


def test_a_deploy_target_block_is_used_only_as_pinned(tmp_path: Path) -> None:
    """A saved `elice-docker` block decides the engine and extra container variables: with
    trust roots it must be the content they pin; a rewrite through the API is refused."""
    env = load_config().environment("dev")
    DockerTarget(docker_host="unix:///run/engine.sock").save(DOCKER_TARGET_BLOCK, overwrite=True)
    try:
        saved = DockerTarget.load(DOCKER_TARGET_BLOCK)
        pinned = TrustRoots(
            repository="/srv/r",
            environments=("dev",),
            blocks={DOCKER_TARGET_BLOCK: block_digest(saved)},
        )
        unpinned = pinned.model_copy(update={"blocks": {}})
        with pytest.raises(ConfigError, match="'elice-docker' is not pinned in the trust file"):
            environment_target(env, roots=unpinned)
        target = environment_target(env, roots=pinned)
        assert target.docker is not None
        assert target.docker.docker_host == "unix:///run/engine.sock"
        DockerTarget(
            docker_host="unix:///run/engine.sock",
            environment_env={"dev": {"PYTHONSTARTUP": "/tmp/evil.py"}},
        ).save(DOCKER_TARGET_BLOCK, overwrite=True)
        with pytest.raises(ConfigError, match="'elice-docker' changed since the trust file pinned"):
            environment_target(env, roots=pinned)
        assert environment_target(env, roots=None).docker is not None  # a person's machine
    finally:
        with contextlib.suppress(ValueError, ObjectNotFound):
            DockerTarget.delete(DOCKER_TARGET_BLOCK)
