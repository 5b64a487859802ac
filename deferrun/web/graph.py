"""A task's pipeline as a picture: its upstream and downstream tasks a few levels each way,
drawn as server-rendered SVG for the task page and as rows for ``deferrun task ID --graph``.

Bounded (levels and tasks) so a fan-in of thousands stays one small picture that says what it
left out. Pure code over the store's ``task_detail``: no aiohttp, so the CLI imports it cheaply.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from deferrun.store import Store

#: how many levels up and down are drawn, and the most tasks in one picture
LEVELS = 3
MAX_NODES = 40
#: fill colour of a node by state (the page's state badges)
COLOURS = {
    "success": "#cfeccf",
    "failed": "#f6c9c9",
    "upstream_failed": "#f6c9c9",
    "running": "#ffe2b3",
    "deferred": "#dcd6fb",
    "queued": "#d7eaf7",
    "up_for_retry": "#d7eaf7",
    "up_for_reschedule": "#d7eaf7",
    "skipped": "#e4e4e4",
    "cancelled": "#e4e4e4",
}


@dataclass
class Node:
    id: str
    name: str
    state: str
    level: int  # < 0 upstream, 0 the task itself, > 0 downstream


@dataclass
class Graph:
    root: str
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: set[tuple[str, str]] = field(default_factory=set)  # (upstream id, downstream id)
    cut: list[str] = field(default_factory=list)  # what was left out, for people

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "nodes": [vars(n) for n in sorted(self.nodes.values(), key=_order)],
            "edges": [list(e) for e in sorted(self.edges)],
            "cut": self.cut,
        }


def _order(node: Node) -> tuple[int, str, str]:
    return node.level, node.name, node.id


async def walk(
    store: Store, task_id: str, levels: int = LEVELS, max_nodes: int = MAX_NODES
) -> Graph | None:
    """The pipeline around ``task_id``; None when there is no such task."""
    info = await store.get_task(task_id)
    if info is None:
        return None
    graph = Graph(task_id)
    graph.nodes[task_id] = Node(task_id, info.name, str(info.state), 0)
    details: dict[str, dict[str, Any]] = {}
    left_out: set[str] = set()

    async def neighbours(current: str, key: str) -> list[dict[str, Any]]:
        if current not in details:
            found = await store.task_detail(current)
            details[current] = found or {"upstream": [], "downstream": []}  # deleted meanwhile
        return list(details[current][key])

    for key, sign in (("upstream", -1), ("downstream", 1)):
        frontier = [task_id]
        for depth in range(1, levels + 1):
            later: list[str] = []
            for current in frontier:
                for other in await neighbours(current, key):
                    edge = (other["id"], current) if sign < 0 else (current, other["id"])
                    if other["id"] not in graph.nodes:
                        if len(graph.nodes) >= max_nodes:
                            left_out.add(other["id"])
                            continue
                        graph.nodes[other["id"]] = Node(
                            other["id"], other["name"], str(other["state"]), sign * depth
                        )
                        later.append(other["id"])
                    graph.edges.add(edge)
            frontier = later
            if not frontier:
                break
        else:  # the last level drawn: its own links, and whether the pipeline goes on
            beyond = False
            for current in frontier:
                for other in await neighbours(current, key):
                    if other["id"] in graph.nodes:
                        edge = (other["id"], current) if sign < 0 else (current, other["id"])
                        graph.edges.add(edge)
                    else:
                        beyond = True
            if beyond:
                graph.cut.append(f"more {key} tasks beyond {levels} levels, not drawn")
    if left_out:
        graph.cut.append(
            f"{len(left_out)} more neighbouring tasks not drawn (at most {max_nodes} tasks)"
        )
    return graph


def _columns(graph: Graph) -> list[list[Node]]:
    levels = sorted({n.level for n in graph.nodes.values()})
    return [
        sorted((n for n in graph.nodes.values() if n.level == level), key=_order)
        for level in levels
    ]


def rows(graph: Graph) -> list[list[str]]:
    """One row per task, upstream levels first: level, name, state, id, its upstreams drawn."""
    names = {n.id: n.name for n in graph.nodes.values()}
    out = []
    for column in _columns(graph):
        for n in column:
            after = sorted(names[u] for u, d in graph.edges if d == n.id)
            level = "this task" if n.level == 0 else f"{n.level:+d}"
            out.append([level, n.name, n.state, n.id, ", ".join(after) or "-"])
    return out


WIDTH, HEIGHT, GAP_X, GAP_Y, PAD = 170, 40, 56, 14, 10


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def svg(graph: Graph) -> str:
    """The graph as inline SVG: columns from upstream (left) to downstream, each task a link
    to its page, filled by state. Every stored text is escaped."""
    columns = _columns(graph)
    tallest = max(len(c) for c in columns)
    width = PAD * 2 + len(columns) * WIDTH + (len(columns) - 1) * GAP_X
    height = PAD * 2 + tallest * HEIGHT + (tallest - 1) * GAP_Y
    where: dict[str, tuple[float, float]] = {}
    for x_index, column in enumerate(columns):
        top = PAD + (tallest - len(column)) * (HEIGHT + GAP_Y) / 2
        for y_index, n in enumerate(column):
            where[n.id] = (PAD + x_index * (WIDTH + GAP_X), top + y_index * (HEIGHT + GAP_Y))
    parts = [
        f'<svg class="pipeline" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
        f'{height}" width="{width}" height="{height}" role="img" aria-label="pipeline of task '
        f'{html.escape(graph.root)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker>'
        "</defs>",
    ]
    for up, down in sorted(graph.edges):
        (x1, y1), (x2, y2) = where[up], where[down]
        x1, y1, y2 = x1 + WIDTH, y1 + HEIGHT / 2, y2 + HEIGHT / 2
        mid = (x1 + x2) / 2
        parts.append(
            f'<path class="edge" d="M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} '
            f'{x2:.0f},{y2:.0f}" fill="none" stroke="#777" marker-end="url(#arrow)"/>'
        )
    for n in graph.nodes.values():
        x, y = where[n.id]
        root = n.id == graph.root
        parts.append(
            f'<a class="node" href="/tasks/{html.escape(quote(n.id, safe=""))}" '
            f'data-task-id="{html.escape(n.id)}" data-state="{html.escape(n.state)}">'
            f"<title>{html.escape(n.name)} ({html.escape(n.state)}) {html.escape(n.id)}</title>"
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{WIDTH}" height="{HEIGHT}" rx="6" '
            f'fill="{COLOURS.get(n.state, "#eee")}" stroke="{"#2d2a4a" if root else "#999"}" '
            f'stroke-width="{3 if root else 1}"/>'
            f'<text x="{x + 8:.0f}" y="{y + 16:.0f}" font-size="12" font-weight="600">'
            f"{html.escape(_clip(n.name, 24))}</text>"
            f'<text x="{x + 8:.0f}" y="{y + 31:.0f}" font-size="11" fill="#555">'
            f"{html.escape(n.state)}</text></a>"
        )
    parts.append("</svg>")
    return "".join(parts)
