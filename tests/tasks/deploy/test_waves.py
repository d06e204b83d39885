"""The wave size: the machine's cores, or ELICE_DEPLOY_WAVE when it is a positive integer."""

from __future__ import annotations

import os

import pytest

from core.errors import PromotionRefused
from core.settings import Settings
from tasks.deploy.waves import deploy_wave_size


def test_the_wave_is_the_cores_unless_configured() -> None:
    unset = Settings.from_environ({})
    assert deploy_wave_size(unset.deploy_wave) == max(1, os.cpu_count() or 1)
    one = Settings.from_environ({"ELICE_DEPLOY_WAVE": "1"})
    assert deploy_wave_size(one.deploy_wave) == 1
    for bad in ("0", "-2", "two"):
        configured = Settings.from_environ({"ELICE_DEPLOY_WAVE": bad}).deploy_wave
        with pytest.raises(PromotionRefused, match="positive integer"):
            deploy_wave_size(configured)
