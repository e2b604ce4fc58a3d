"""`make test` installs the Debian packages the tests need (chromium for the report
test, its font) when missing, once: checked with fake dpkg-query / apt-get / sudo
on PATH, so nothing is installed on the machine running this test."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_DPKG_QUERY = """#!/bin/sh
# dpkg-query -W -f='${Status}' PKG: installed when PKG is listed in $STATE
pkg=$(eval echo \\${$#})
grep -qx "$pkg" "$STATE" 2>/dev/null || exit 1
printf 'install ok installed'
"""
_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$LOG"
[ "$1" = install ] || exit 0
for a in "$@"; do case "$a" in -*|install) ;; *) echo "$a" >> "$STATE";; esac; done
"""
_SUDO = """#!/bin/sh
exec "$@"
"""


@pytest.fixture
def fake_debian(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("dpkg-query", _DPKG_QUERY), ("apt-get", _APT_GET), ("sudo", _SUDO)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "STATE": str(tmp_path / "installed"),
           "LOG": str(tmp_path / "apt.log")}
    (tmp_path / "installed").write_text("fonts-dejavu-core\nslurm-wlm\nmunge\n")
    return env, tmp_path


def _deps(env):
    return subprocess.run(["make", "-s", "--no-print-directory", "test-deps"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_make_test_installs_missing_debian_packages_once(fake_debian):
    env, tmp = fake_debian
    first = _deps(env)
    assert first.returncode == 0, first.stderr
    calls = (tmp / "apt.log").read_text().splitlines()
    assert calls[0] == "apt-get update -qq"
    assert calls[1].startswith("apt-get install -y -qq") and calls[1].split()[-1] == "chromium"  # only the missing one
    second = _deps(env)  # idempotent: all there now, apt-get not called again
    assert second.returncode == 0 and second.stdout == second.stderr == ""
    assert len((tmp / "apt.log").read_text().splitlines()) == 2
    with open(os.path.join(ROOT, "Makefile")) as f:
        assert any(line.startswith("test:") and "test-deps" in line for line in f)


def test_make_test_says_what_to_install_without_apt_get(fake_debian):
    env, tmp = fake_debian
    os.remove(tmp / "bin" / "apt-get")
    env["PATH"] = f"{tmp / 'bin'}"  # no system apt-get either
    sh = shutil.which("sh")
    os.symlink(sh, tmp / "bin" / "sh")
    for tool in ("grep", "id", "env"):
        os.symlink(shutil.which(tool), tmp / "bin" / tool)
    proc = subprocess.run([shutil.which("make"), "-s", "--no-print-directory", "test-deps"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "the tests need chromium" in proc.stderr
