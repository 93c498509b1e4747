"""The README's settings table names every setting the code has."""

from pathlib import Path

import pytest

from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.paramserver.settings import ParamServerSettings
from services.registry.settings import RegistrySettings
from services.scheduler.settings import SchedulerSettings
from services.training.settings import TrainingSettings
from shared.settings import settings_table


@pytest.mark.parametrize(
    "settings",
    [RegistrySettings, SchedulerSettings, ParamServerSettings, TrainingSettings, GatewaySettings, InferenceSettings],
)
def test_readme_documents_every_setting(settings: type) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [name for name, _, _ in settings_table(settings) if f"`{name}`" not in readme]
    assert missing == []
