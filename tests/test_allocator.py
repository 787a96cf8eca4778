"""`slidefm train` re-executes itself under jemalloc when it is installed (slidefm.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from slidefm.allocator import GLIBC_TUNABLES, MALLOC_CONF, active, find_jemalloc, preload_env
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


def test_without_jemalloc_glibc_is_tuned():
    env = preload_env({"PATH": "/bin"}, platform="linux", find=lambda: None)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": GLIBC_TUNABLES, "SLIDEFM_ALLOCATOR_EXECED": "1"}
    assert _env(SLIDEFM_ALLOCATOR="glibc")["GLIBC_TUNABLES"] == GLIBC_TUNABLES  # asked for, though jemalloc is there
    assert "LD_PRELOAD" not in _env(SLIDEFM_ALLOCATOR="glibc")
    # the user's own tunables are kept as they are: nothing to re-execute for
    assert preload_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, platform="linux", find=lambda: None) is None


def test_missing_or_foreign_platform():
    assert preload_env({}, platform="darwin", find=lambda: LIB) is None
    assert preload_env({}, platform="darwin", find=lambda: None) is None
    with pytest.raises(SlidefmError, match="SLIDEFM_ALLOCATOR=jemalloc, but no jemalloc library is installed"):
        preload_env({"SLIDEFM_ALLOCATOR": "jemalloc"}, platform="linux", find=lambda: None)
    with pytest.raises(SlidefmError, match="SLIDEFM_ALLOCATOR='tcmalloc': must be one of auto, jemalloc, glibc, system"):
        _env(SLIDEFM_ALLOCATOR="tcmalloc")


def test_a_bad_choice_is_one_line_from_the_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "slidefm", "train", "--cfg", "job"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "SLIDEFM_ALLOCATOR": "tcmalloc"}, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "slidefm train: SLIDEFM_ALLOCATOR='tcmalloc': must be one of auto, jemalloc, glibc, system"]


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GLIBC_TUNABLES: Linux")
def test_train_command_reexecutes_under_tuned_glibc(tmp_path):
    """SLIDEFM_ALLOCATOR=glibc (what auto does without jemalloc): the command re-executes itself with the tunables,
    and glibc took them (mallinfo2 then reports no mmap'd chunks even after a 64 MiB allocation)."""
    code = textwrap.dedent("""
        import ctypes, sys
        from slidefm.allocator import active

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.mallinfo2.restype = ctypes.c_void_p, MallInfo2
        p = libc.malloc(64 << 20)
        print("allocator", active(), "mmapped", libc.mallinfo2().hblkhd, flush=True)
        libc.free(ctypes.c_void_p(p))
        sys.argv = ["slidefm", "train", "--cfg", "job"]
        from slidefm.cli import main
        sys.exit(main())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "SLIDEFM_ALLOCATOR": "glibc"})
    assert r.returncode == 0, r.stderr
    lines = [line.rsplit(" ", 1) for line in r.stdout.splitlines() if line.startswith("allocator")]
    assert [a for a, _ in lines] == ["allocator system mmapped", "allocator glibc mmapped"], r.stdout[:500]
    assert int(lines[0][1]) >= 64 << 20 and int(lines[1][1]) == 0  # glibc's default maps a 64 MiB chunk; tuned not


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
    assert "sets GLIBC_TUNABLES against that, or uses jemalloc when installed" in caplog.text
    caplog.clear()
    monkeypatch.setattr(alloc, "active", lambda: "glibc")
    assert log_allocator() == "glibc" and "glibc malloc with slidefm's GLIBC_TUNABLES" in caplog.text
    monkeypatch.setattr(alloc, "active", lambda: "system")
    caplog.clear()
    monkeypatch.setattr(alloc, "find_jemalloc", lambda: LIB)
    log_allocator()
    assert f"only the `slidefm train` command preloads it (elsewhere: LD_PRELOAD={LIB})" in caplog.text
    caplog.clear()
    monkeypatch.setenv("SLIDEFM_ALLOCATOR", "system")
    log_allocator()
    assert "allocator" not in caplog.text, "a chosen glibc is not worth a line"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GLIBC_TUNABLES: Linux")
def test_export_command_reexecutes_too(tmp_path):
    """`slidefm export` packs token batches of changing sizes every step, as training does: same allocator."""
    code = ("import sys; from slidefm.allocator import active; print('allocator', active(), flush=True); "
            "sys.argv = ['slidefm', 'export', '--help']; from slidefm.cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "SLIDEFM_ALLOCATOR": "glibc"})
    assert r.returncode == 0, r.stderr
    assert [ln for ln in r.stdout.splitlines() if ln.startswith("allocator")] == ["allocator system", "allocator glibc"]
    assert "usage: slidefm export" in r.stdout
