"""Shell scripts run in a private mount namespace (``unshare -m``, as root): a small tmpfs for a
full disk, or a read-only bind mount, that vanish with the script and never touch the machine's
own mounts. The fault tests use it; CI runs as root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def run_in_private_mounts(script: str, env: dict[str, str], cwd: Path | None = None,
                          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run shell ``script`` in a private mount namespace; skip the test where none can be made."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to make a private mount namespace")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=timeout)
    err = p.stderr.lower()
    if p.returncode != 0 and ("unshare" in err or "mount" in err) and \
            ("operation not permitted" in err or "permission denied" in err):
        pytest.skip(f"cannot mount in a private namespace here: {p.stderr.strip()[:200]}")
    return p
