"""A self-contained HTML report: inline PNG images (base64), SVG line charts, tables. No JavaScript, no CDN."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from torch import Tensor

from diffalign.io import encode_image

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; } td, th { border: 1px solid #ccc; padding: 0.3em 0.6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples { display: flex; flex-wrap: wrap; gap: 6px; } .sample { text-align: center; font-size: 11px; width: 76px; }
.sample img { width: 72px; height: 72px; image-rendering: pixelated; border: 2px solid #ccc; }
.sample.ok img { border-color: #2ca02c; } .sample.bad img { border-color: #d62728; }
.prompt { font-weight: 600; margin: 0.8em 0 0.3em; } .note { color: #666; font-size: 0.9em; }
.grid img { image-rendering: pixelated; width: 100%; max-width: 480px; }
"""


def png_data_uri(image: Tensor) -> str:
    """An image [3,H,W] in [0,1] as a data: URI."""
    return "data:image/png;base64," + base64.b64encode(encode_image(image)).decode()


def sample_gallery(
    images: Tensor, prompts: Sequence[str], gold: Sequence[float], proxy: Sequence[float] | None, per_prompt: int = 8
) -> str:
    """Samples grouped by prompt; green frame = gold all correct, red = not; caption: gold and proxy score."""
    parts = []
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt][:per_prompt]
        cells = []
        for i in idx:
            ok = gold[i] >= 1.0 - 1e-6
            label = f"gold {gold[i]:.2f}" + (f"<br>proxy {proxy[i]:.2f}" if proxy is not None else "")
            cells.append(
                f'<div class="sample {"ok" if ok else "bad"}"><img src="{png_data_uri(images[i])}" '
                f'alt="{html.escape(prompt)}"><br>{label}</div>'
            )
        parts.append(f'<div class="prompt">{html.escape(prompt)}</div><div class="samples">{"".join(cells)}</div>')
    return "\n".join(parts)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; floats are formatted to 3 decimals."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f'<td class="num">{value:.3f}</td>'
        return f"<td>{html.escape(str(value))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str = "step",
    width: int = 560,
    height: int = 260,
) -> str:
    """An SVG line chart of named (x, y) series with axes, ticks and a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        return f"<p class='note'>{html.escape(title)}: no data</p>"
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x1 = x0 + 1
    longest_name = max(len(name) for name in series)
    left, right, top, bottom = 50, 34 + 7 * longest_name, 28, 36  # the legend sits in the right margin
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
        f'<text x="{left}" y="16" font-weight="600">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
    ]
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        svg.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        svg.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{width - right}" y2="{sy(y):.1f}" stroke="#eee"/>')
        x = x0 + (x1 - x0) * k / 4
        tick = f"{x:.0f}" if x1 - x0 >= 10 else f"{x:.2g}"  # steps are integers, a sweep of scales is not
        svg.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{tick}</text>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">{x_label}</text>')
    for n, (name, values) in enumerate(series.items()):
        colour = PALETTE[n % len(PALETTE)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        svg.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        svg += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in values]
        svg.append(f'<rect x="{width - right + 10}" y="{top + 16 * n}" width="10" height="10" fill="{colour}"/>')
        svg.append(f'<text x="{width - right + 24}" y="{top + 16 * n + 9}">{html.escape(name)}</text>')
    svg.append("</svg>")
    return "".join(svg)


def page(title: str, body: str) -> str:
    """The whole HTML document."""
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )
