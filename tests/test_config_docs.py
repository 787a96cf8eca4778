from pathlib import Path

from slidefm.config_docs import render


def test_configuration_reference_is_current():
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == render(), "regenerate: python -m slidefm.config_docs > docs/configuration.md"
