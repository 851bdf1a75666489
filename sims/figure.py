"""The comparison figure (seaborn): exact pass@1 against cumulative rollouts, one line per method.

Importing seaborn + matplotlib costs about 1 s of CPU, a fifth of the 5 s budget of
``deepgrpo sim compare``. :class:`FigureWorker` therefore renders in a separate Python process
started *before* training: the child imports seaborn on the second core while the parent
trains, then turns the rows it receives on stdin into PNG bytes on stdout. The child never
imports torch or the ``sims`` package (this file is run by path and needs only seaborn).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any


def pass1_vs_rollouts_png(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG bytes of ``pass1`` against ``rollouts``, hue = ``label`` (rows: tidy history rows)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    frame = pd.DataFrame(rows)
    start = frame.loc[frame["rollouts"] == 0, "pass1"]
    trained = frame[frame["rollouts"] > 0]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    sns.lineplot(data=trained, x="rollouts", y="pass1", hue="label", marker="o", markersize=3,
                 linewidth=1.6, ax=ax)
    if len(start):
        ax.axhline(float(start.mean()), color="0.4", linestyle=":", linewidth=1.2,
                   label="pre-trained policy (0 rollouts)")
    ax.set_xscale("log")
    ax.set_xlabel("rollouts used (cumulative, log scale)")
    ax.set_ylabel("exact pass@1 (mean over all problems)")
    ax.set_title(title, fontsize=8)
    ax.legend(title=None, fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class FigureWorker:
    """A child process that pre-imports seaborn and renders one figure on request.

    ``render(rows, title)`` sends the rows and returns the PNG bytes; ``close()`` stops the
    child if it was never used. Falls back to rendering in-process if the child cannot start.
    """

    def __init__(self) -> None:
        code = f"import runpy; runpy.run_path({__file__!r}, run_name='__main__')"
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        except OSError:
            self.proc = None

    def render(self, rows: list[dict[str, Any]], title: str) -> bytes:
        if self.proc is None:
            return pass1_vs_rollouts_png(rows, title)
        payload = json.dumps({"rows": rows, "title": title}).encode()
        out, err = self.proc.communicate(payload)
        proc, self.proc = self.proc, None
        if proc.returncode != 0 or not out.startswith(b"\x89PNG"):
            raise RuntimeError(f"figure process failed (exit {proc.returncode}): {err.decode(errors='replace').strip()}")
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "FigureWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _child() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (import while the parent trains)
    import seaborn  # noqa: F401

    request = json.loads(sys.stdin.buffer.read() or b"null")
    if request is None:
        return
    sys.stdout.buffer.write(pass1_vs_rollouts_png(request["rows"], request["title"]))
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    _child()
