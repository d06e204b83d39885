"""The wave size: the machine's cores, or ELICE_DEPLOY_WAVE when it is a positive integer."""

from __future__ import annotations

import os

import pytest

from core.errors import PromotionRefused
from tasks.deploy.waves import deploy_wave_size


def test_the_wave_is_the_cores_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELICE_DEPLOY_WAVE", raising=False)
    assert deploy_wave_size() == max(1, os.cpu_count() or 1)
    monkeypatch.setenv("ELICE_DEPLOY_WAVE", "1")
    assert deploy_wave_size() == 1
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("ELICE_DEPLOY_WAVE", bad)
        with pytest.raises(PromotionRefused, match="positive integer"):
            deploy_wave_size()
