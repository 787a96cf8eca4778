"""`slidefm train` re-executes itself under jemalloc when it is installed (slidefm.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slidefm.allocator import MALLOC_CONF, active, find_jemalloc, preload_env
from slidefm.errors import SlidefmError

LIB = "libjemalloc.so.2"


def _env(**kw):
    return preload_env(kw, platform="linux", find=lambda: LIB)


def test_auto_preloads_jemalloc_and_keeps_the_rest_of_the_environment():
    env = _env(PATH="/bin", LD_PRELOAD="libfoo.so")
    assert env["LD_PRELOAD"] == f"{LIB}:libfoo.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == MALLOC_CONF and env["SLIDEFM_ALLOCATOR_EXECED"] == "1"
    assert _env(MALLOC_CONF="narenas:2")["MALLOC_CONF"] == "narenas:2", "the user's MALLOC_CONF is overridden"


@pytest.mark.parametrize("environ", [
    {"SLIDEFM_ALLOCATOR": "system"},
    {"SLIDEFM_ALLOCATOR_EXECED": "1"},  # the re-executed process: never again
    {"LD_PRELOAD": "/opt/lib/libjemalloc.so"},  # the user preloaded it already
])
def test_no_reexec(environ):
    assert _env(**environ) is None


def test_missing_or_foreign_platform():
    assert preload_env({}, platform="linux", find=lambda: None) is None
    assert preload_env({}, platform="darwin", find=lambda: LIB) is None
    with pytest.raises(SlidefmError, match="SLIDEFM_ALLOCATOR=jemalloc, but no jemalloc library is installed"):
        preload_env({"SLIDEFM_ALLOCATOR": "jemalloc"}, platform="linux", find=lambda: None)
    with pytest.raises(SlidefmError, match="SLIDEFM_ALLOCATOR='tcmalloc': must be one of auto, jemalloc, system"):
        _env(SLIDEFM_ALLOCATOR="tcmalloc")


def test_a_bad_choice_is_one_line_from_the_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slidefm", "train", "--cfg", "job"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "SLIDEFM_ALLOCATOR": "tcmalloc"}, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "slidefm train: SLIDEFM_ALLOCATOR='tcmalloc': must be one of auto, jemalloc, system"]


def test_train_command_reexecutes_under_jemalloc(tmp_path):
    """Skipped where jemalloc is not installed, unless SLIDEFM_REQUIRE_JEMALLOC=1 (set by .ci/run): then it fails."""
    if find_jemalloc() is None or not sys.platform.startswith("linux"):
        if os.environ.get("SLIDEFM_REQUIRE_JEMALLOC") == "1":
            pytest.fail("SLIDEFM_REQUIRE_JEMALLOC=1 but no jemalloc library is installed")
        pytest.skip("jemalloc not installed")
    # What the console script does: main() without argv. The snippet prints the allocator it runs on, so the
    # first process prints "system" and the re-executed one "jemalloc"; `--cfg job` then prints the config.
    code = ("import sys; from slidefm.allocator import active; print('allocator', active(), flush=True); "
            "sys.argv = ['slidefm', 'train', '--cfg', 'job']; from slidefm.cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PATH": "/usr/bin:/bin"})
    lines = [line for line in r.stdout.splitlines() if line.startswith("allocator")]
    assert r.returncode == 0, r.stderr
    assert lines == ["allocator system", "allocator jemalloc"], r.stdout[:500]
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "SLIDEFM_ALLOCATOR": "system"})
    assert [ln for ln in off.stdout.splitlines() if ln.startswith("allocator")] == ["allocator system"]


def test_this_process_reports_an_allocator():
    assert active() in ("jemalloc", "system")


def test_training_logs_which_allocator_it_runs_on(monkeypatch, caplog):
    import logging

    import slidefm.allocator as alloc
    from slidefm.train.run import log_allocator

    caplog.set_level(logging.INFO, logger="slidefm.train")
    monkeypatch.setattr(alloc, "active", lambda: "jemalloc")
    assert log_allocator() == "jemalloc" and "allocator: jemalloc (SLIDEFM_ALLOCATOR=system" in caplog.text
    caplog.clear()
    monkeypatch.setattr(alloc, "active", lambda: "system")
    monkeypatch.setattr(alloc, "find_jemalloc", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    log_allocator()
    assert "install jemalloc (apt install libjemalloc2)" in caplog.text
    caplog.clear()
    monkeypatch.setattr(alloc, "find_jemalloc", lambda: LIB)
    log_allocator()
    assert f"only the `slidefm train` command preloads it (elsewhere: LD_PRELOAD={LIB})" in caplog.text
    caplog.clear()
    monkeypatch.setenv("SLIDEFM_ALLOCATOR", "system")
    log_allocator()
    assert "allocator" not in caplog.text, "a chosen glibc is not worth a line"
