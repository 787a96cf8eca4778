"""`python -m slidefm` from the repository root imports ./slidefm, not the installed package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import slidefm

ROOT = Path(__file__).resolve().parents[1]


def test_finder_maps_the_top_level_folders():
    finder = slidefm._source_checkout_finder()
    assert finder is not None  # this checkout keeps evals/ etc. beside slidefm/
    for name in slidefm.MAPPED_SUBPACKAGES:
        spec = finder.find_spec(f"slidefm.{name}")
        assert Path(spec.origin) == ROOT / name / "__init__.py"
    assert finder.find_spec("slidefm.cli") is None and finder.find_spec("evals") is None


def test_mapped_packages_import_from_the_repo_root_without_an_editable_install():
    """No site-packages path to slidefm at all: only the checkout on sys.path, as after `pip install .`
    with the repository root as the working directory."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
            "import slidefm.evals, slidefm.recipes, slidefm.objectives, slidefm.modalities; "
            "print(slidefm.evals.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "evals" / "__init__.py"
