"""Line charts of metrics per round as SVG, embedded in markdown artifacts as data URIs.

The Prefect UI strips inline `<svg>` from markdown but renders an image whose source is a
`data:image/svg+xml;base64,...` URI, so a chart needs no file server and no plotting
library: the SVG is written here, a few lines per series.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

from prefect_branchkey.bk_blocks.errors import UsageError

WIDTH, HEIGHT = 640, 300
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 34, 40
COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")

Series = Sequence[tuple[int, float]]


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (value - low) / ((high - low) or 1.0) * (end - start)


def line_chart_svg(title: str, series: Mapping[str, Series]) -> str:
    """An SVG line chart: x is the round, one coloured line (with a legend entry) per series."""
    points = [p for values in series.values() for p in values]
    if not points:
        raise UsageError("a chart needs at least one point")
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    plot_right, plot_bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def xy(point: tuple[int, float]) -> tuple[float, float]:
        return (_scale(point[0], x_low, x_high, LEFT, plot_right),
                _scale(point[1], y_low, y_high, plot_bottom, TOP))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
             f'<line x1="{LEFT}" y1="{plot_bottom}" x2="{plot_right}" y2="{plot_bottom}" stroke="#888"/>',
             f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{plot_bottom}" stroke="#888"/>']
    for fraction in (0.0, 0.5, 1.0):
        value = y_low + fraction * (y_high - y_low)
        y = _scale(value, y_low, y_high, plot_bottom, TOP)
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{plot_right}" y2="{y:.1f}" stroke="#eee"/>')
    for label, value in (("start", x_low), ("end", x_high)):
        x = _scale(value, x_low, x_high, LEFT, plot_right)
        anchor = "start" if label == "start" else "end"
        parts.append(f'<text x="{x:.1f}" y="{plot_bottom + 16}" text-anchor="{anchor}">round {value}</text>')
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        coordinates = [xy(p) for p in sorted(values)]
        if len(coordinates) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in coordinates)
        legend_y = TOP + 8 + 18 * index
        parts.append(f'<rect x="{plot_right + 14}" y="{legend_y - 9}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{plot_right + 32}" y="{legend_y + 1}">{escape(name[:16])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def markdown_image(alt: str, svg: str) -> str:
    """A markdown image whose source is the SVG itself (base64 data URI)."""
    encoded = base64.b64encode(svg.encode()).decode()
    return f"![{alt}](data:image/svg+xml;base64,{encoded})"
