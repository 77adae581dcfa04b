"""Real disk faults for the tests: tmpfs mounts (root only; the test is skipped elsewhere), filled up or remounted
read-only at the moment a write happens."""

from __future__ import annotations

import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def mounted_tmpfs(point: Path, *options: str, size: str = "2m"):
    """A real tmpfs at `point` (made here), unmounted afterwards."""
    point.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(point)]
    if shutil.which("mount") is None or subprocess.run(command, capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def remount(point: Path, mode: str) -> None:
    """mode: ro or rw."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(point)], check=True)


def fill(point: Path, leave: int = 0) -> None:
    """Take the free space of the mount but `leave` bytes: later writes get ENOSPC from the kernel."""
    with open(point / "filler", "wb") as f:
        f.write(bytes(shutil.disk_usage(point).free - leave))
