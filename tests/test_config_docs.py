from pathlib import Path

from slidefm.config_docs import render


def test_configuration_reference_is_current():
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == render(), "regenerate: python -m slidefm.config_docs > docs/configuration.md"


def test_resumable_keys_are_the_marked_options():
    """The resume check's allowed changes come from the same field metadata the docs mark, for every section."""
    from slidefm.config import resumable_keys
    from slidefm.config_docs import sections

    marked = {o.key for _, opts in sections() for o in opts if o.resume}
    assert resumable_keys() == marked
    assert {"trainer.max_steps", "data.num_workers", "run_dir", "model.aggregator.backend"} <= marked
    assert "optim.lr" not in marked and "data.views.crop" not in marked
