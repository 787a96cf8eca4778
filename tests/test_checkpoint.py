"""slidefm.checkpoint: safe reads (load, resume, init_from), the format check, the model rebuilt from the file."""

from __future__ import annotations

import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import slidefm
from slidefm import checkpoint
from slidefm.checkpoint import CheckpointError
from slidefm.cli import main as cli
from slidefm.config import register_configs

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.aggregator.dim=32", "model.embed_dim=32", "model.aggregator.heads=2", "model.aggregator.depth=1",
        "model.expression.hidden_dims=[32]", "data.max_tokens=256", "data.batch_size=8", "data.num_workers=0",
        "trainer.progress_bar=false", "trainer.log_every_n_steps=1"]


class Payload:
    """Unpickling this creates ``marker``: what a malicious checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cfg(cohort, run_dir, *extra):
    register_configs()
    with initialize_config_module("slidefm.recipes", version_base="1.3"):
        return compose("config", overrides=["recipe=mstar", f"data.cohort={cohort}", f"run_dir={run_dir}",
                                            *TINY, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from slidefm.train.run import train

    base = tmp_path_factory.mktemp("ckpt")
    cohort = base / "cohort"
    assert cli(["synth", str(cohort), "--patients", "16", "--seed", "2", "--dim", "32", "--genes", "100",
                "--min-side", "10", "--max-side", "12"]) == 0
    train(_cfg(cohort, base / "run", "trainer.max_steps=2"))
    return cohort, base / "run" / "checkpoints" / "last.ckpt"


def _poisoned(src: Path, dst: Path, marker: Path) -> Path:
    ck = checkpoint.read(src)
    ck["slidefm"]["version"]["note"] = Payload(marker)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, dst)
    return dst


def test_payload_really_runs_code_when_unpickled(tmp_path):
    # The refusal tests below mean something only if the payload would act when unpickled unsafely.
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_metadata_has_the_current_format(trained):
    ck = checkpoint.read(trained[1])
    meta = ck["slidefm"]
    assert meta["format"] == checkpoint.FORMAT
    assert meta["config"]["recipe"] == "mstar" and meta["in_dim"] == 32
    assert set(meta["version"]) >= {"slidefm", "torch"}


def test_poisoned_checkpoint_is_refused_on_load(trained, tmp_path, capsys):
    cohort, ckpt = trained
    marker = tmp_path / "pwned"
    bad = _poisoned(ckpt, tmp_path / "bad.ckpt", marker)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*bad.ckpt"):
        slidefm.load(bad)
    with pytest.raises(CheckpointError, match="refusing"):
        checkpoint.read(bad)
    assert cli(["export", "--checkpoint", str(bad), "--cohort", str(cohort), "--out", str(tmp_path / "x.h5ad"),
                "--no-progress", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to load checkpoint" in err[0]
    assert not marker.exists()
    assert not (tmp_path / "x.h5ad").exists()


def test_poisoned_checkpoint_is_refused_on_resume(trained, tmp_path):
    from slidefm.train.run import train

    cohort, ckpt = trained
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    _poisoned(ckpt, run_dir / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint .*last.ckpt"):
        train(_cfg(cohort, run_dir, "trainer.max_steps=3"))
    assert not marker.exists()


def test_poisoned_checkpoint_is_refused_as_init_from(trained, tmp_path):
    from slidefm.train.run import train

    cohort, ckpt = trained
    marker = tmp_path / "pwned"
    bad = _poisoned(ckpt, tmp_path / "bad.ckpt", marker)
    with pytest.raises(CheckpointError, match="refusing"):
        train(_cfg(cohort, tmp_path / "run", "trainer.max_steps=1", f"model.init_from={bad}"))
    assert not marker.exists()


def test_resume_reads_through_the_safe_reader(trained, tmp_path, monkeypatch):
    import shutil

    from slidefm.train.run import train

    cohort, ckpt = trained
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run_dir / "checkpoints" / "last.ckpt")
    seen = []
    real = checkpoint.read
    monkeypatch.setattr(checkpoint, "read", lambda path, **kw: seen.append(Path(path).name) or real(path, **kw))
    out = train(_cfg(cohort, run_dir, "trainer.max_steps=3"))
    assert out["global_step"] == 3  # continued from step 2
    assert seen == ["last.ckpt"]


@pytest.mark.parametrize("fmt,message", [(checkpoint.FORMAT + 1, "format 2, written by slidefm .*upgrade"),
                                         (None, "no valid format number"), (0, "unknown checkpoint format 0")])
def test_format_is_checked(trained, tmp_path, fmt, message):
    ck = checkpoint.read(trained[1])
    if fmt is None:
        del ck["slidefm"]["format"]
    else:
        ck["slidefm"]["format"] = fmt
    path = tmp_path / "x.ckpt"
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match=message):
        slidefm.load(path)


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a slidefm checkpoint"):
        checkpoint.read(tmp_path / "foreign.ckpt")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="holds a list"):
        checkpoint.read(tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.read(tmp_path / "junk.ckpt")


def test_rebuilt_model_and_encoder_state(trained):
    ck = checkpoint.read(trained[1])
    model, cfg = checkpoint.build_model(ck)
    assert cfg.model.aggregator.name == "transmil"
    enc = checkpoint.encoder_state(ck)
    assert enc.keys() == model.aggregator.state_dict().keys()
    for k, v in model.aggregator.state_dict().items():
        torch.testing.assert_close(v, enc[k], rtol=0, atol=0)
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items() if not k.startswith("model.aggregator.")}
    with pytest.raises(CheckpointError, match="no slide encoder weights"):
        checkpoint.encoder_state(ck)


def test_write_is_atomic_and_readable(trained, tmp_path):
    ck = checkpoint.read(trained[1])
    out = checkpoint.write(ck, tmp_path / "copy.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.ckpt"]
    assert checkpoint.read(out)["slidefm"]["in_dim"] == 32


def test_no_unsafe_load_anywhere():
    out = subprocess.run(["git", "grep", "-n", "-I", "-E", r"weights_only\s*=\s*False", "--", "."],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1, f"unsafe torch.load paths:\n{out.stdout}"
    # training, inference, export and evaluation read checkpoints through slidefm.checkpoint only
    out = subprocess.run(["git", "grep", "-n", "-E", r"^[^#]*torch\.load\(", "--", "slidefm/train", "slidefm/api.py",
                          "slidefm/export.py", "slidefm/commands", "evals", "objectives"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 1, f"torch.load outside slidefm/checkpoint.py:\n{out.stdout}"
