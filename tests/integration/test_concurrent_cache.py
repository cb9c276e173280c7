"""Two pytest processes on one cold cache build the image once and both use it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SUITE = '''
import pytest

@pytest.mark.vm(image="tiny")
def test_tiny(vm):
    assert vm.run("cat /etc/os-release").ok
'''


def test_two_runs_on_a_cold_cache_build_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "VMFIX_"))}
    procs = []
    for n in (1, 2):
        suite = tmp_path / f"suite{n}"
        suite.mkdir()
        (suite / "test_t.py").write_text(SUITE)
        log = open(tmp_path / f"run{n}.log", "wb")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--vm-cache={cache}",
                                        str(suite)], cwd=suite, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    outputs = []
    for n, (proc, log) in enumerate(procs, 1):
        assert proc.wait(900) == 0, (tmp_path / f"run{n}.log").read_text()[-3000:]
        log.close()
        outputs.append((tmp_path / f"run{n}.log").read_text())
    builders = [out for out in outputs if "[vmfixtures] building image tiny" in out]
    assert len(builders) == 1, "exactly one run builds the image"
    assert any("[vmfixtures] waiting for another run building image tiny" in out for out in outputs)
    assert len(list((cache / "images").glob("tiny-*"))) == 1
    assert len(list((cache / "states").glob("tiny-*"))) == 1
