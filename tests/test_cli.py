"""The command line: fast top-level help, `train --help` from the configs, one-line mistakes with nothing written."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from slidefm.cli import COMMANDS, build_parser, main as cli

TINY = ["recipe=mstar", "model.aggregator.dim=32", "model.embed_dim=32", "model.aggregator.heads=2",
        "model.expression.hidden_dims=[32]", "data.max_tokens=256", "data.batch_size=8", "data.num_workers=0"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, make_synth_cohort):
    return make_synth_cohort(tmp_path_factory.mktemp("cli") / "c", patients=16, seed=2, genes=100, max_side=12)


def test_top_level_help_imports_no_heavy_module():
    code = ("import sys; from slidefm.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'pandas', 'hydra', 'anndata') if m in sys.modules]\n"
            "assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name.replace("_", "-") in out.stdout


def test_every_command_parser_builds():
    parser = build_parser(every=True)
    for name in COMMANDS:
        if name == "train":  # Hydra's: no argparse help of its own
            continue
        with pytest.raises(SystemExit, match="0"):  # each add_parser ran; argparse exits 0 after printing
            parser.parse_args([name.replace("_", "-"), "--help"])


def test_train_help_lists_every_group_and_option(capsys):
    from slidefm.config import OptimConfig, TrainerConfig
    from slidefm.config_docs import groups, sections

    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for group, choices in groups():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(group + " "))
        assert all(c in line for c in choices), line
    n = 0
    for _, opts in sections():
        for o in opts:
            assert f"  {o.key} " in out, o.key
            n += 1
    assert n > 100
    # types, defaults and help text come from the dataclass fields
    for cls, prefix in ((TrainerConfig, "trainer"), (OptimConfig, "optim")):
        for f in dataclasses.fields(cls):
            line_i = next(i for i, ln in enumerate(out.splitlines()) if ln.strip().startswith(f"{prefix}.{f.name} "))
            lines = out.splitlines()
            assert " = " in lines[line_i]
            assert f.metadata["help"].split()[0] in lines[line_i + 1], f.name
    assert "trainer.grad_checkpointing" in out and "bool = False" in out


@pytest.mark.parametrize("args,message", [
    (["data.cohort={missing}"], r"data\.cohort: .*missing: cohort directory not found"),
    ([], r"missing required option data\.cohort \(the cohort directory\): add data\.cohort=DIR"),
    (["data.cohort={cohort}", "data.cohortt=3"], r"unknown option 'data\.cohortt' \(did you mean data\.cohort\?\)"),
    (["data.cohort={cohort}", "+data.cohortt=3"], r"unknown option 'data\.cohortt' \(did you mean data\.cohort\?\)"),
    (["data.cohort={cohort}", "+model.aggregator.depht=3"], r"unknown option 'model\.aggregator\.depht' \(did you"),
    (["data.cohort={cohort}", "recipe=nope"], r"recipe=nope: no such choice; available: .*mstar"),
    (["data.cohort={cohort}", "trainer.max_steps=abc"], r"trainer\.max_steps=abc: .*could not be converted"),
    (["data.cohort"], r"Error parsing override 'data\.cohort'"),
    (["data.cohort={cohort}", "--bogus"], r"unrecognized arguments: --bogus"),
    (["data.cohort={cohort}", "model.init_from={missing}"], r"model\.init_from: checkpoint .* does not exist"),
])
def test_train_mistakes_are_one_line_and_write_nothing(args, message, cohort, tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    args = [a.format(cohort=cohort, missing=tmp_path / "missing") for a in args]
    assert cli(["train", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("slidefm train: ") and re.search(message, err[0]), err[0]
    assert list(tmp_path.iterdir()) == []  # no outputs/ run directory, no log


def test_error_inside_the_job_is_one_line_and_removes_the_run_dir(cohort, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(cohort, bad)
    victim = sorted((bad / "features").glob("*.h5"))[0]
    victim.write_bytes(b"not hdf5")
    run_dir = tmp_path / "run"
    assert cli(["train", *TINY, f"data.cohort={bad}", f"hydra.run.dir={run_dir}", "trainer.max_steps=1"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("slidefm")]
    assert len(err) == 1 and victim.stem in err[0], err
    assert not run_dir.exists()


def test_progress_bar_counts_steps_of_max_steps(cohort, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(["train", *TINY, f"data.cohort={cohort}", f"hydra.run.dir={run_dir}", "trainer.max_steps=3",
                "trainer.progress_bar=true"]) == 0
    out = capsys.readouterr().out.replace("\r", "\n")
    assert "train: 100%" in out and "3/3" in out
    assert "Epoch" not in out and "/-" not in out
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_other_commands_one_line(tmp_path, capsys):
    assert cli(["export", "--cohort", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "required: --checkpoint, --out" in err[0]
    assert cli(["export", "--checkpoint", str(tmp_path / "x.ckpt"), "--cohort", str(tmp_path / "nope"),
                "--out", str(tmp_path / "o.h5ad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slidefm export: error: {tmp_path / 'nope'}: cohort directory not found"]
    assert cli(["nope"]) == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_internal_error_is_one_line_unless_debugging(monkeypatch, capsys):
    import slidefm.commands.synth as synth

    def boom(args):
        raise ValueError("a bug\nsecond line")

    monkeypatch.setattr(synth, "run", boom)
    assert cli(["synth", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slidefm synth: internal error: ValueError: a bug (set SLIDEFM_DEBUG=1 for the traceback, "
                   "and please report it)"]
    monkeypatch.setenv("SLIDEFM_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug"):
        cli(["synth", "x"])
