"""How a job DAG is drawn: the states' palette, our own layered layout, and its SVG.

Used when Graphviz is not installed: layers by longest path from the sources, ordered
within each layer by the mean position of each job's predecessors to cut crossings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from flotta_mqtt.model import JobState

if TYPE_CHECKING:
    from flotta_mqtt.client.graph import JobDag


@dataclass(frozen=True)
class Colours:
    fill: str
    stroke: str
    text: str = "#1f2937"


# One palette for every renderer (the dashboard's dashboard.css uses the same colours).
STATE_COLOURS: dict[JobState, Colours] = {
    JobState.WAITING: Colours("#f3f4f6", "#9ca3af", "#4b5563"),
    JobState.READY: Colours("#e0f2fe", "#0ea5e9"),
    JobState.DISPATCHED: Colours("#dbeafe", "#3b82f6"),
    JobState.RUNNING: Colours("#fef3c7", "#d97706"),
    JobState.COMPLETED: Colours("#dcfce7", "#16a34a"),
    JobState.FAILED: Colours("#fee2e2", "#dc2626"),
    JobState.CANCELLED: Colours("#e5e7eb", "#6b7280", "#6b7280"),
    JobState.SKIPPED: Colours("#f5f3ff", "#a78bfa", "#6b7280"),
}

NODE_W, NODE_H = 180, 44
GAP_X, GAP_Y = 56, 16
MARGIN = 20
HEADER = 30  # the title line above the graph
LEGEND = 34  # the legend below it
FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
LABEL_CHARS, SUB_CHARS = 22, 27  # longer lines are cut with an ellipsis (tooltip: all)


def draw_svg(dag: JobDag) -> str:
    """Our own layout, drawn as SVG: layered left to right, arrows as curves."""
    positions, layers, rows = layout(dag)
    width = MARGIN * 2 + max(layers, 1) * NODE_W + max(layers - 1, 0) * GAP_X
    width = int(max(width, MARGIN * 2 + _legend_width()))
    height = HEADER + MARGIN * 2 + rows * NODE_H + max(rows - 1, 0) * GAP_Y + LEGEND
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="{FONT}" font-size="12">',
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse">'
        '<path d="M 0 0 L 10 5 L 0 10 z" fill="#6b7280"/></marker></defs>',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 6}" font-size="14" font-weight="600" '
        f'fill="#111827">{escape(dag.title)}</text>',
    ]
    for a, b in dag.edges:
        (xa, ya), (xb, yb) = positions[a], positions[b]
        x1, y1 = xa + NODE_W, ya + NODE_H / 2
        x2, y2 = xb, yb + NODE_H / 2
        bend = max(GAP_X / 2, (x2 - x1) / 2)
        out.append(
            f'<path class="lock" data-from="{a}" data-to="{b}" fill="none" '
            f'stroke="#9ca3af" stroke-width="1.4" marker-end="url(#arrow)" '
            f'd="M {x1:.1f} {y1:.1f} C {x1 + bend:.1f} {y1:.1f}, '
            f'{x2 - bend:.1f} {y2:.1f}, {x2:.1f} {y2:.1f}"/>'
        )
    for node in dag.nodes:
        x, y = positions[node.id]
        colours = STATE_COLOURS[node.state]
        dash = ' stroke-dasharray="4 3"' if node.state is JobState.CANCELLED else ""
        out.append(
            f'<g class="job {node.state}" id="job-{node.id}" data-job-id="{node.id}" '
            f'data-state="{node.state}"><title>{escape(node.details)}</title>'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="7" '
            f'fill="{colours.fill}" stroke="{colours.stroke}" stroke-width="1.6"{dash}/>'
            f'<text x="{x + 10}" y="{y + 18}" fill="{colours.text}" font-weight="600">'
            f"{escape(_cut(node.label, LABEL_CHARS))}</text>"
            f'<text x="{x + 10}" y="{y + 34}" fill="{colours.text}" font-size="11">'
            f"{escape(_cut(node.sub, SUB_CHARS))}</text></g>"
        )
    out += _legend(dag, y=height - LEGEND + 12)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _legend(dag: JobDag, y: float) -> list[str]:
    out = ['<g class="legend">']
    x = float(MARGIN)
    for state, colours in STATE_COLOURS.items():
        n = sum(1 for node in dag.nodes if node.state is state)
        text = f"{state} {n}"
        out.append(
            f'<rect x="{x}" y="{y}" width="12" height="12" rx="3" fill="{colours.fill}" '
            f'stroke="{colours.stroke}"/><text x="{x + 17}" y="{y + 10}" font-size="11" '
            f'fill="#374151">{escape(text)}</text>'
        )
        x += _legend_step(text)
    out.append("</g>")
    return out


def layout(dag: JobDag) -> tuple[dict[int, tuple[float, float]], int, int]:
    """Top-left corner of each job's box; the number of layers and of rows.

    Layer = longest path from a job without locks, so every arrow points rightwards.
    Within a layer, jobs start in (label, id) order and are then sorted a few times by
    the mean row of their predecessors (then successors): the barycentre heuristic.
    """
    ids = [node.id for node in dag.nodes]
    preds: dict[int, list[int]] = {i: [] for i in ids}
    succs: dict[int, list[int]] = {i: [] for i in ids}
    for a, b in dag.edges:
        preds[b].append(a)
        succs[a].append(b)
    layer: dict[int, int] = {}
    for job in _topological(ids, preds, succs):
        layer[job] = max((layer[p] + 1 for p in preds[job]), default=0)
    count = max(layer.values(), default=-1) + 1
    columns: list[list[int]] = [[] for _ in range(count)]
    for job in ids:
        columns[layer[job]].append(job)
    row = {job: float(i) for column in columns for i, job in enumerate(column)}
    for sweep in range(4):
        forward = sweep % 2 == 0
        neighbours = preds if forward else succs
        order = columns[1:] if forward else columns[-2::-1]
        for column in order:
            keys = {
                job: (
                    sum(row[n] for n in neighbours[job]) / len(neighbours[job])
                    if neighbours[job]
                    else row[job]
                )
                for job in column
            }
            column.sort(key=lambda job: (keys[job], row[job]))
            for i, job in enumerate(column):
                row[job] = float(i)
    rows = max((len(column) for column in columns), default=0)
    positions: dict[int, tuple[float, float]] = {}
    for index, column in enumerate(columns):
        x = MARGIN + index * (NODE_W + GAP_X)
        offset = (rows - len(column)) * (NODE_H + GAP_Y) / 2  # centre short columns
        for i, job in enumerate(column):
            positions[job] = (float(x), HEADER + MARGIN + offset + i * (NODE_H + GAP_Y))
    return positions, count, rows


def _topological(
    ids: list[int], preds: Mapping[int, list[int]], succs: Mapping[int, list[int]]
) -> list[int]:
    waiting = {job: len(preds[job]) for job in ids}
    ready = [job for job in ids if waiting[job] == 0]
    order: list[int] = []
    while ready:
        job = ready.pop()
        order.append(job)
        for nxt in succs[job]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(ids):
        raise ValueError("the locks form a cycle: not a DAG")
    return order


def _legend_step(text: str) -> float:
    return 28 + 6.5 * len(text)


def _legend_width() -> float:
    return sum(_legend_step(f"{state} 000") for state in STATE_COLOURS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
