"""Shell scripts run in a private mount namespace (``unshare -m``, as root): a small tmpfs for a
full disk, or a read-only bind mount, that vanish with the script and never touch the machine's
own mounts. The fault tests use it; CI runs as root."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a private mount namespace (unshare -m) needs root; "
                                "CI runs as root")
"""Mark of every test that runs :func:`run_in_private_mounts`."""


def run_in_private_mounts(script: str, env: dict[str, str], cwd: Path | None = None,
                          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run shell ``script`` in a private mount namespace (the test carries :data:`needs_root`)."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)
