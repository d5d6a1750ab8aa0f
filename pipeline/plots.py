"""Self-contained SVG plots for reports (no script, no external resource, no library)."""

from __future__ import annotations

from html import escape

WIDTH = 640
ROW = 34
LEFT = 110
RIGHT = 20
TOP = 10
AXIS = 30


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile of sorted ``values`` (the 'type 7' definition)."""
    position = (len(values) - 1) * q
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def box_plot(title: str, groups: dict[str, list[float]], unit: str = "") -> str:
    """One horizontal box (min, quartiles, median, max) with its points, per group, each
    group in a ``<g class="group" data-group="name">``."""
    present = {name: sorted(v) for name, v in groups.items() if v}
    everything = [x for v in present.values() for x in v]
    low, high = (min(everything), max(everything)) if everything else (0.0, 1.0)
    if high == low:
        low, high = low - 1, high + 1
    span = high - low
    low, high = low - span * 0.05, high + span * 0.05
    height = TOP + ROW * max(len(groups), 1) + AXIS

    def x(value: float) -> float:
        return LEFT + (value - low) / (high - low) * (WIDTH - LEFT - RIGHT)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}"'
        f' viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{escape(title)}">'
    ]
    for row, (name, values) in enumerate(groups.items()):
        mid = TOP + ROW * row + ROW / 2
        # One <g> per group, named, so a reader (or a test) can tell whose marks are whose.
        parts.append(
            f'<g class="group" data-group="{escape(name)}">'
            f'<text x="{LEFT - 8}" y="{mid + 4:.1f}" text-anchor="end" font-size="12">'
            f"{escape(name)} (n={len(values)})</text>"
        )
        if not values:
            parts.append("</g>")
            continue
        v = sorted(values)
        q1, med, q3 = quantile(v, 0.25), quantile(v, 0.5), quantile(v, 0.75)
        parts += [
            f'<line x1="{x(v[0]):.1f}" x2="{x(v[-1]):.1f}" y1="{mid:.1f}" y2="{mid:.1f}"'
            ' stroke="#555"/>',
            f'<rect x="{x(q1):.1f}" y="{mid - 9:.1f}" width="{max(x(q3) - x(q1), 1):.1f}"'
            ' height="18" fill="#cfe0f3" stroke="#2b5d8a"/>',
            f'<line x1="{x(med):.1f}" x2="{x(med):.1f}" y1="{mid - 9:.1f}" y2="{mid + 9:.1f}"'
            ' stroke="#1b3a57" stroke-width="2"/>',
        ]
        parts += [
            f'<circle cx="{x(value):.1f}" cy="{mid:.1f}" r="2.5" fill="#c0392b"'
            ' fill-opacity="0.6"/>'
            for value in v
        ]
        parts.append("</g>")
    base = TOP + ROW * max(len(groups), 1)
    parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{base}" y2="{base}" stroke="#333"/>')
    for i in range(5):
        value = low + (high - low) * i / 4
        parts.append(
            f'<text x="{x(value):.1f}" y="{base + 16}" text-anchor="middle" font-size="11">'
            f"{value:.3g}</text>"
        )
    parts.append(
        f'<text x="{WIDTH - RIGHT}" y="{base + 28}" text-anchor="end" font-size="11">'
        f"{escape(unit)}</text></svg>"
    )
    return "".join(parts)
