"""The README's settings table names every setting the code has."""

from pathlib import Path

from services.registry.settings import RegistrySettings
from shared.settings import settings_table


def test_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [name for name, _, _ in settings_table(RegistrySettings) if f"`{name}`" not in readme]
    assert missing == []
