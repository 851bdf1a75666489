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


def _panel(x0: float, rows_by_label: dict[str, list[dict[str, Any]]], col: str, unit: str, ylabel: str,
           budget: int | None) -> list[str]:
    """SVG elements of one panel whose left edge is at ``x0``."""
    pts = [(r[unit], r[col]) for rows in rows_by_label.values() for r in rows
           if r.get(col) is not None and r[col] == r[col]]
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
    for i, rows in enumerate(rows_by_label.values()):
        color = COLORS[i % len(COLORS)]
        line = [(X(r[unit]), Y(r[col])) for r in rows if r.get(col) is not None and r[col] == r[col]]
        if not line:
            continue
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in line)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.6"/>')
        out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.8" fill="{color}"/>' for x, y in line)
    return out


def pass1_vs_budget_svg(rows: list[dict[str, Any]], title: str, unit: str = "tokens",
                        budget: int | None = None) -> str:
    """SVG text of ``pass1`` (left panel) and ``heldout_pass1`` (right panel, when any row has
    one) against ``unit``, one line per ``label`` in order of first appearance (rows: tidy
    history rows with ``label``, ``unit``, ``pass1`` and optionally ``heldout_pass1``), with
    the budget marked and a legend under the panels."""
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
    for k, line in enumerate(title.splitlines()):
        body.append(f'<text x="{width / 2:.1f}" y="{16 + 14 * k}" text-anchor="middle" font-size="10">'
                    f'{escape(line)}</text>')
    for i, (col, ylabel) in enumerate(panels):
        body.extend(_panel(PANEL_W * i, by_label, col, unit, ylabel, budget))
    for j, (label, color, dash) in enumerate(entries):
        x, y = 20 + LEGEND_W * (j % per_row), PANEL_H + 14 + 16 * (j // per_row)
        body.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 18}" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>')
        body.append(f'<text x="{x + 23}" y="{y}">{escape(label)}</text>')
    body.append("</svg>")
    return "\n".join(body) + "\n"
