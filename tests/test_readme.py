"""The README documents every setting and shows the two commands CI relies on."""

from service.core.settings import Settings
from tests.conftest import REPO


def test_every_setting_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    undocumented = [
        f"LUSAI_{n.upper()}" for n in Settings.model_fields if f"`LUSAI_{n.upper()}`" not in readme
    ]
    assert not undocumented, f"add to the README configuration table: {undocumented}"


def test_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
