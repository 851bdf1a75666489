"""The comparison figure of ``deepgrpo sim compare``: exact pass@1 of the training and the
held-out problems against the cumulative budget spent (tokens or rollouts), one line per
method, as an SVG document written directly.

Why not matplotlib: importing it and rendering a PNG costs about 1 s of CPU (seaborn: 2.5 s,
it imports pandas and scipy.stats), more than half of the whole time budget of ``sim compare``
(at most 2x ``import torch``, ``benchmarks/bench_sim.py``); the few lines, axes and labels of
this figure take a few milliseconds as SVG text, which every browser and editor displays. The
studies (``analysis/``) draw their figures with seaborn.
"""

from __future__ import annotations

import math
from typing import Any
from xml.sax.saxutils import escape

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
"""Line colours, in order (matplotlib's tab10)."""

PANEL_W, PANEL_H = 480, 400
"""Size of one panel in SVG user units (pixels)."""
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 58, 46
"""Margins of a panel's plotting area."""
LEGEND_W = 236
"""Width of one legend entry (the legend runs in rows under the panels)."""


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """About ``target`` round tick values (steps 1, 2 or 5 × 10^k) inside [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, k = [], 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _fmt_tick(v: float, step: float) -> str:
    if step >= 1:
        return f"{v:,.0f}"
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{v:.{digits}f}"


GRID_POINTS = 60
"""Budget points at which several seeds' curves are averaged."""


def seed_band(runs: list[list[dict[str, Any]]], col: str, unit: str) -> list[tuple[float, float, float, float]]:
    """``(x, mean, low, high)`` of ``col`` over several seeds' curves (each a list of history rows),
    interpolated linearly on :data:`GRID_POINTS` budgets from 0 to the least budget every seed
    reached; low/high bound the 95 % t-interval of the mean. Empty if a seed has no values."""
    from scipy.special import stdtrit  # several seeds only (lighter to import than scipy.stats)

    curves = [[(r[unit], r[col]) for r in rows if r.get(col) is not None and r[col] == r[col]] for rows in runs]
    if not curves or any(not c for c in curves):
        return []
    x_hi = min(c[-1][0] for c in curves)
    n = len(curves)
    q = float(stdtrit(n - 1, 0.975))
    out = []
    for i in range(GRID_POINTS + 1):
        x = x_hi * i / GRID_POINTS
        ys = [_interp(c, x) for c in curves]
        m = sum(ys) / n
        half = q * (sum((y - m) ** 2 for y in ys) / (n - 1)) ** 0.5 / n ** 0.5
        out.append((x, m, m - half, m + half))
    return out


def _interp(curve: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear curve's value at ``x`` (its first value before it starts)."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 > x0 else 1.0)
    return curve[-1][1]


def _panel(x0: float, rows_by_label: dict[str, list[dict[str, Any]]], col: str, unit: str, ylabel: str,
           budget: int | None, note: str | None = None) -> list[str]:
    """SVG elements of one panel whose left edge is at ``x0``: one line per label, or with
    several seeds per label (rows with ``seed``), the mean over seeds with its 95 % band."""
    seeds = {lab: _by_seed(rows) for lab, rows in rows_by_label.items()}
    bands = {lab: seed_band(runs, col, unit) for lab, runs in seeds.items() if len(runs) > 1}
    pts = [(r[unit], r[col]) for lab, rows in rows_by_label.items() if lab not in bands for r in rows
           if r.get(col) is not None and r[col] == r[col]]
    pts += [(x, y) for band in bands.values() for x, _, lo, hi in band for y in (lo, hi)]
    xs = [p[0] for p in pts] + ([budget] if budget is not None else []) + [0]
    ys = [p[1] for p in pts]
    x_hi = max(xs) or 1
    y_lo, y_hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    y_lo, y_hi = max(0.0, math.floor(y_lo * 10) / 10), min(1.0, math.ceil(y_hi * 10) / 10)
    if y_hi <= y_lo:
        y_lo, y_hi = max(0.0, y_lo - 0.1), min(1.0, y_hi + 0.1)
    left, right = x0 + MARGIN_L, x0 + PANEL_W - MARGIN_R
    top, bottom = MARGIN_T, PANEL_H - MARGIN_B

    def X(v: float) -> float:
        return left + (right - left) * v / x_hi

    def Y(v: float) -> float:
        return bottom - (bottom - top) * (v - y_lo) / (y_hi - y_lo)

    out = [f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="white" stroke="#999"/>']
    xt, yt = nice_ticks(0, x_hi), nice_ticks(y_lo, y_hi)
    xstep = xt[1] - xt[0] if len(xt) > 1 else 1.0
    ystep = yt[1] - yt[0] if len(yt) > 1 else 0.1
    for v in xt:
        out.append(f'<line x1="{X(v):.1f}" y1="{top}" x2="{X(v):.1f}" y2="{bottom}" stroke="#e8e8e8"/>')
        out.append(f'<text x="{X(v):.1f}" y="{bottom + 15}" text-anchor="middle">{_fmt_tick(v, xstep)}</text>')
    for v in yt:
        out.append(f'<line x1="{left}" y1="{Y(v):.1f}" x2="{right}" y2="{Y(v):.1f}" stroke="#e8e8e8"/>')
        out.append(f'<text x="{left - 5}" y="{Y(v) + 4:.1f}" text-anchor="end">{_fmt_tick(v, ystep)}</text>')
    out.append(f'<text x="{(left + right) / 2:.1f}" y="{PANEL_H - 10}" text-anchor="middle">'
               f'{escape(unit)} spent (cumulative)</text>')
    out.append(f'<text transform="translate({x0 + 16},{(top + bottom) / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    if budget is not None:
        out.append(f'<line x1="{X(budget):.1f}" y1="{top}" x2="{X(budget):.1f}" y2="{bottom}" stroke="#444" '
                   f'stroke-dasharray="3,3"/>')
    if note:
        for k, text in enumerate(_wrap(note, 70)):
            out.append(f'<text x="{(left + right) / 2:.1f}" y="{top + 16 + 13 * k}" text-anchor="middle" '
                       f'fill="#555">{escape(text)}</text>')
    for i, (label, rows) in enumerate(rows_by_label.items()):
        color = COLORS[i % len(COLORS)]
        if label in bands:
            band = bands[label]
            if not band:
                continue
            outline = [(X(x), Y(hi)) for x, _, _, hi in band] + [(X(x), Y(lo)) for x, _, lo, _ in reversed(band)]
            out.append(f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in outline)}" fill="{color}" '
                       f'fill-opacity="0.15" stroke="none"/>')
            mean = " ".join(f"{X(x):.1f},{Y(m):.1f}" for x, m, _, _ in band)
            out.append(f'<polyline points="{mean}" fill="none" stroke="{color}" stroke-width="1.6"/>')
            continue
        line = [(X(r[unit]), Y(r[col])) for r in rows if r.get(col) is not None and r[col] == r[col]]
        if not line:
            continue
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.8" fill="{color}"/>' for x, y in line)
    return out


def _by_seed(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A label's rows split by ``seed`` (one list if the rows have no seed)."""
    runs: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(r.get("seed"), []).append(r)
    return list(runs.values())


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most about ``width`` characters, broken at spaces."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def pass1_vs_budget_svg(rows: list[dict[str, Any]], title: str, unit: str = "tokens",
                        budget: int | None = None, note: str | None = None) -> str:
    """SVG text of ``pass1`` (left panel) and ``heldout_pass1`` (right panel, when any row has
    one) against ``unit``, one line per ``label`` in order of first appearance (rows: tidy
    history rows with ``label``, ``unit``, ``pass1`` and optionally ``heldout_pass1`` and ``seed``;
    a label with several seeds is drawn as their mean with a 95 % band), with the budget marked,
    ``note`` (if any) written across the held-out panel, and a legend under the panels."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    panels = [("pass1", "exact pass@1, training problems")]
    if any(r.get("heldout_pass1") is not None and r["heldout_pass1"] == r["heldout_pass1"] for r in rows):
        panels.append(("heldout_pass1", "exact pass@1, held-out problems"))
    width = PANEL_W * len(panels)
    # legend under the panels: LEGEND_W-wide entries, as many per row as fit
    entries = [(label, COLORS[i % len(COLORS)], "") for i, label in enumerate(by_label)]
    if budget is not None:
        entries.append((f"budget ({budget:,} {unit})", "#444", ' stroke-dasharray="3,3"'))
    per_row = max(1, width // LEGEND_W)
    height = PANEL_H + 8 + 16 * math.ceil(len(entries) / per_row)
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>']
    for k, line in enumerate(t for part in title.splitlines() for t in _wrap(part, int(width / 5.4))):
        body.append(f'<text x="{width / 2:.1f}" y="{16 + 14 * k}" text-anchor="middle" font-size="10">'
                    f'{escape(line)}</text>')
    for i, (col, ylabel) in enumerate(panels):
        body.extend(_panel(PANEL_W * i, by_label, col, unit, ylabel, budget, note if col == "heldout_pass1" else None))
    for j, (label, color, dash) in enumerate(entries):
        x, y = 20 + LEGEND_W * (j % per_row), PANEL_H + 14 + 16 * (j // per_row)
        body.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 18}" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>')
        body.append(f'<text x="{x + 23}" y="{y}">{escape(label)}</text>')
    body.append("</svg>")
    return "\n".join(body) + "\n"
