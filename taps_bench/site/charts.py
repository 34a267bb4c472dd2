"""Inline SVG charts for the static leaderboard: no JavaScript library and no CDN, so a page works from file://.

Every chart is a function from plain data to `Markup` (an SVG string). All text that comes from data (drafter and
task names) goes through `escape`, because a submitted drafter's name is untrusted. Colours come from one
colour-blind-safe palette (Okabe-Ito) so that the same drafter keeps its colour across a page's charts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup
from markupsafe import escape as _escape

PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


# Directional formatting characters (LRE..RLO, LRI..PDI, the marks): a name holding them could be drawn as another
# name. SVG text has no <bdi>; each label is its own <text> element, and the characters are dropped from it.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def escape(text: Any) -> Markup:
    """Escaped text from data, without the characters that would reorder it."""
    return _escape(_BIDI.sub("", str(text)))


def finite(value: Any) -> float | None:
    """A number a chart can draw, else None (stored data may hold a NaN, a string or nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _clip(text: str, n: int) -> Markup:
    """Escaped text, cut to n characters (the full text stays readable on hover via <title>)."""
    if len(text) <= n:
        return escape(text)
    return Markup("{}<title>{}</title>").format(escape(text[: n - 1] + "…"), escape(text))


def _svg(width: int, height: int, body: list[str], title: str) -> Markup:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}><title>{escape(title)}</title>')
    return Markup(head + "".join(body) + "</svg>")


def _legend(names: Sequence[str], x: int, y: int, clip: int = 60) -> list[str]:
    out = []
    for i, name in enumerate(names):
        yy = y + 14 * i
        out.append(f'<rect x="{x}" y="{yy - 8}" width="10" height="10" fill="{colour(i)}"/>'
                   f'<text x="{x + 14}" y="{yy + 1}">{_clip(name, clip)}</text>')
    return out


def depth_lines(title: str, series: dict[str, list[float | None]], width: int = 300, height: int = 190) -> Markup:
    """Conditional acceptance (0..1) per draft depth, one line per drafter; `series[name][d-1]` is depth d.
    The legend (one line per series) goes below the plot, which keeps its `height`."""
    left, right, top, bottom = 34, 10, 20, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    legend_y, total = height + 12, height + 14 * len(series) + 10
    depth = max((len(v) for v in series.values()), default=0)
    body = [f'<text x="{left}" y="13" font-weight="600">{escape(title)}</text>']
    for tick in (0, 0.5, 1):
        y = top + plot_h * (1 - tick)
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    if depth == 0:
        body.append(f'<text x="{left + 8}" y="{top + plot_h / 2:.0f}">no draft tokens recorded</text>')
        body += _legend(list(series), 8, legend_y)
        return _svg(width, total, body, title)
    step = plot_w / max(1, depth - 1)
    for d in range(depth):
        body.append(f'<text x="{left + d * step:.1f}" y="{height - 14}" text-anchor="middle">{d + 1}</text>')
    body.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 2}" text-anchor="middle">draft depth</text>')
    for i, (name, values) in enumerate(series.items()):
        points = [(left + d * step, top + plot_h * (1 - v)) for d, raw in enumerate(values)
                  if (v := finite(raw)) is not None]
        if not points:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        body.append(f'<polyline class="series" points="{path}" fill="none" stroke="{colour(i)}" stroke-width="2">'
                    f'<title>{escape(name)}</title></polyline>')
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour(i)}"/>' for x, y in points]
    body += _legend(list(series), 8, legend_y, clip=46)
    return _svg(width, total, body, title)


def heatmap(title: str, rows: Sequence[str], columns: Sequence[str], values: dict[tuple[str, str], float | None],
            low: float = 1.0) -> Markup:
    """A value per (row, column) as a coloured cell with its number (white = `low`, deep blue = the maximum)."""
    cell_w, cell_h, left, top = 78, 24, 210, 36
    width, height = left + cell_w * len(columns) + 10, top + cell_h * len(rows) + 8
    values = {k: finite(v) for k, v in values.items()}
    present = [v for v in values.values() if v is not None]
    high = max(present, default=low + 1)
    body = [f'<text x="4" y="14" font-weight="600">{escape(title)}</text>']
    for j, col in enumerate(columns):
        body.append(f'<text x="{left + cell_w * j + cell_w / 2:.0f}" y="{top - 8}" text-anchor="middle">'
                    f'{escape(col)}</text>')
    for i, row in enumerate(rows):
        y = top + cell_h * i
        body.append(f'<text x="{left - 6}" y="{y + 16}" text-anchor="end">{_clip(row, 34)}</text>')
        for j, col in enumerate(columns):
            v = values.get((row, col))
            x = left + cell_w * j
            if v is None:
                body.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" '
                            f'fill="#f3f3f3"/><text x="{x + cell_w / 2:.0f}" y="{y + 16}" text-anchor="middle" '
                            f'fill="#999">–</text>')
                continue
            t = 0.0 if high <= low else min(1.0, max(0.0, (v - low) / (high - low)))
            fill = f"rgb({int(255 - 215 * t)},{int(255 - 140 * t)},{int(255 - 60 * t)})"
            ink = "#fff" if t > 0.6 else "#000"
            body.append(f'<rect class="cell" x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" '
                        f'fill="{fill}"><title>{escape(row)} / {escape(col)}: {v:.2f}</title></rect>'
                        f'<text x="{x + cell_w / 2:.0f}" y="{y + 16}" text-anchor="middle" fill="{ink}">{v:.2f}</text>')
    return _svg(width, height, body, title)


def stacked_shares(title: str, bars: dict[str, dict[str, float]], names: Sequence[str]) -> Markup:
    """One horizontal bar per label (a task), split by each name's share (routing decisions per drafter)."""
    left, bar_w, bar_h, top = 110, 300, 18, 24
    legend_top = top + (bar_h + 6) * len(bars) + 10
    width, height = left + bar_w + 20, legend_top + 14 * len(names) + 4
    body = [f'<text x="4" y="14" font-weight="600">{_clip(title, 70)}</text>']
    for i, (label, shares) in enumerate(bars.items()):
        y, x = top + (bar_h + 6) * i, float(left)
        body.append(f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{_clip(label, 18)}</text>')
        for k, name in enumerate(names):
            share = finite(shares.get(name)) or 0.0
            if share <= 0:
                continue
            w = bar_w * share
            body.append(f'<rect class="share" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                        f'fill="{colour(k)}"><title>{escape(name)}: {share:.1%}</title></rect>')
            if w > 34:
                body.append(f'<text x="{x + w / 2:.1f}" y="{y + 13}" text-anchor="middle" fill="#fff">'
                            f'{share:.0%}</text>')
            x += w
    body += _legend(names, left, legend_top)
    return _svg(width, height, body, title)


def paired_bars(title: str, groups: dict[str, tuple[float | None, float | None]], unit: str,
                labels: tuple[str, str] = ("accepted", "rejected")) -> Markup:
    """Two bars per group (e.g. mean confidence of accepted vs rejected draft tokens, per drafter)."""
    left, bar_h, top, plot_w = 190, 10, 24, 240
    groups = {g: (finite(a), finite(b)) for g, (a, b) in groups.items()}
    high = max((abs(v) for pair in groups.values() for v in pair if v is not None), default=1.0) or 1.0
    height = top + 28 * len(groups) + 34
    body = [f'<text x="4" y="14" font-weight="600">{escape(title)}</text>']
    for i, (group, pair) in enumerate(groups.items()):
        y = top + 28 * i
        body.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{_clip(group, 30)}</text>')
        for k, v in enumerate(pair):
            if v is None:
                continue
            w = plot_w * v / high
            body.append(f'<rect class="bar" x="{left}" y="{y + k * (bar_h + 2)}" width="{w:.1f}" height="{bar_h}" '
                        f'fill="{colour(k)}"><title>{escape(group)} {labels[k]}: {v:.3f} {escape(unit)}</title>'
                        f'</rect><text x="{left + w + 4:.1f}" y="{y + k * (bar_h + 2) + 9}">{v:.2f}</text>')
    body += _legend(list(labels), left, height - 24)
    return _svg(left + plot_w + 60, height, body, title)


def calibration_lines(title: str, series: dict[str, list[tuple[float, float, float]]], top: float, x_label: str,
                      diagonal: bool = False, width: int = 320, height: int = 210) -> Markup:
    """Acceptance (0..1) against a binned signal (0..top), one line per series of (bin middle, acceptance, draft
    tokens in the bin); `diagonal`: the line a calibrated confidence would follow. The legend goes below."""
    left, right, top_pad, bottom = 34, 10, 20, 30
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    total = height + 14 * len(series) + 12
    body = [f'<text x="{left}" y="13" font-weight="600">{_clip(title, 52)}</text>']
    for tick in (0, 0.5, 1):
        y = top_pad + plot_h * (1 - tick)
        body.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                    f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    top = top if (t := finite(top)) is not None and t > 0 else 1.0
    for tick, anchor in ((0, "middle"), (0.5, "middle"), (1, "end")):
        x = left + plot_w * tick
        body.append(f'<text x="{x:.1f}" y="{height - 16}" text-anchor="{anchor}">{top * tick:.2g}</text>')
    body.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 3}" text-anchor="middle">{escape(x_label)}</text>')
    if diagonal:
        body.append(f'<line class="diagonal" x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" '
                    f'y2="{top_pad}" stroke="#999" stroke-dasharray="4 3"><title>calibrated</title></line>')
    for i, (name, bins) in enumerate(series.items()):
        pts = [(left + plot_w * min(1.0, mid / top), top_pad + plot_h * (1 - rate), mid, rate, n)
               for raw_mid, raw_rate, raw_n in bins
               if (mid := finite(raw_mid)) is not None and (rate := finite(raw_rate)) is not None
               and (n := finite(raw_n)) is not None and 0 <= rate <= 1]
        if not pts:
            continue
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, *_ in pts)
        body.append(f'<polyline class="calib" points="{path}" fill="none" stroke="{colour(i)}" stroke-width="2">'
                    f'<title>{escape(name)}</title></polyline>')
        body += [f'<circle class="calib-bin" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour(i)}"><title>'
                 f'{escape(name)}: {escape(x_label)} ≈ {mid:.2f}: {rate:.0%} of {n:.0f} draft tokens accepted'
                 f'</title></circle>' for x, y, mid, rate, n in pts]
    body += _legend(list(series), 8, height + 12, clip=46)
    return _svg(width, total, body, title)


def whisker(value: float | None, interval: Sequence[float] | None, low: float, high: float) -> Markup:
    """A small inline whisker (HTML and CSS, no SVG): the interval as a bar and the value as a dot, placed on the
    column's common scale [low, high] so that the rows' whiskers compare."""
    v = finite(value)
    lo, hi = (finite(interval[0]), finite(interval[1])) if interval is not None and len(interval) == 2 else (None,
                                                                                                           None)
    if v is None or lo is None or hi is None:
        return Markup("")
    span = high - low if high > low else 1.0

    def at(x: float) -> float:
        return max(0.0, min(100.0, 100 * (x - low) / span))

    left, right = at(min(lo, hi)), at(max(lo, hi))
    return Markup(f'<span class="whisker" aria-hidden="true"><span class="bar" style="left:{left:.1f}%;'
                  f'width:{max(right - left, 1.0):.1f}%"></span><span class="dot" style="left:{at(v):.1f}%">'
                  f'</span></span>')
