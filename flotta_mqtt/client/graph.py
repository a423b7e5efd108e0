"""Pictures of an artifact's bound DAG, from its retained status: DOT, Mermaid, SVG, PNG.

The status of an artifact of at most 300 jobs lists every job (`jobs`) and every lock
(`locks`); that is all a picture needs, so nothing here asks the scheduler anything.
Each job is a box coloured by its state; each lock an arrow from the job that must
complete to the job it holds back.

- `dot` and `mermaid` are text and need nothing else.
- `svg` uses Graphviz's `dot` program when it is installed (Debian: `graphviz`), and
  otherwise our own drawing (`drawing`).
- `png` needs Graphviz, or `cairosvg` to rasterise our own SVG.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flotta_mqtt.client.drawing import STATE_COLOURS, Colours, draw_svg
from flotta_mqtt.model import JobState
from flotta_mqtt.protocol import ArtifactStatus, JobSummary

Format = Literal["svg", "png", "dot", "mermaid"]
FORMATS: tuple[Format, ...] = ("svg", "png", "dot", "mermaid")
Engine = Literal["auto", "graphviz", "python"]


class GraphTooLarge(ValueError):
    """The status lists no jobs: the artifact is too large to draw, or not bound yet."""

    def __init__(self, status: ArtifactStatus) -> None:
        self.status = status
        if status.total == 0:
            reason = f"artifact {status.artifact_id} is {status.state}: it has no jobs to draw yet"
        else:
            reason = (
                f"artifact {status.artifact_id} has {status.total} jobs: too large to draw "
                "(statuses list every job only for artifacts of at most 300 jobs)"
            )
        super().__init__(reason)


@dataclass(frozen=True)
class Node:
    """One job as drawn."""

    id: int
    label: str  # a workflow task's name, else the job's worker
    sub: str  # the second line: step (or worker), state, attempt
    state: JobState
    details: str  # the tooltip: everything the status says about the job

    @property
    def colours(self) -> Colours:
        return STATE_COLOURS[self.state]


@dataclass
class JobDag:
    """An artifact's jobs and locks, ready to render."""

    artifact_id: str
    state: str
    nodes: list[Node]
    edges: list[tuple[int, int]]
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_status(cls, status: ArtifactStatus) -> JobDag:
        """The DAG a status describes; GraphTooLarge if it does not list its jobs and locks."""
        if status.jobs is None or status.locks is None:
            raise GraphTooLarge(status)
        nodes = [
            Node(job.id, job_label(job), job_subtitle(job), job.state, job_details(job))
            for job in sorted(status.jobs, key=lambda j: j.id)
        ]
        ids = {node.id for node in nodes}
        edges = [(a, b) for a, b in status.locks if a in ids and b in ids]
        counts = {str(state): n for state, n in status.counts.items()}
        return cls(status.artifact_id, str(status.state), nodes, edges, counts)

    @property
    def title(self) -> str:
        done = self.counts.get(str(JobState.COMPLETED), 0)
        return f"artifact {self.artifact_id} · {self.state} · {done}/{len(self.nodes)} completed"

    # --- text formats ----------------------------------------------------------------------

    def to_dot(self) -> str:
        """Graphviz DOT, left to right; each node has `class` and `id` for SVG styling."""
        lines = [
            f"digraph {_dot_quote(self.artifact_id)} {{",
            f"  graph [rankdir=LR, labelloc=t, fontname=Helvetica, fontsize=13, "
            f"nodesep=0.25, ranksep=0.6, label={_dot_quote(self.title)}];",
            '  node [shape=box, style="rounded,filled", fontname=Helvetica, fontsize=11, '
            "width=1.9, height=0.5, penwidth=1.5];",
            '  edge [color="#6b7280", arrowsize=0.7];',
        ]
        for node in self.nodes:
            colours = node.colours
            lines.append(
                f"  j{node.id} [label={_dot_quote(node.label + chr(10) + node.sub)}, "
                f'fillcolor="{colours.fill}", color="{colours.stroke}", '
                f'fontcolor="{colours.text}", class="job {node.state}", '
                f'id="job-{node.id}", tooltip={_dot_quote(node.details)}'
                + (', style="rounded,filled,dashed"' if node.state is JobState.CANCELLED else "")
                + "];"
            )
        lines += [f'  j{a} -> j{b} [class="lock"];' for a, b in self.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """A Mermaid flowchart, with one class per state."""
        lines = ["flowchart LR"]
        for node in self.nodes:
            text = _mermaid_text(f"{node.label}<br/>{node.sub}")
            lines.append(f'    j{node.id}["{text}"]:::{node.state}')
        lines += [f"    j{a} --> j{b}" for a, b in self.edges]
        for state, colours in STATE_COLOURS.items():
            lines.append(
                f"    classDef {state} fill:{colours.fill},stroke:{colours.stroke},"
                f"color:{colours.text}"
            )
        return "\n".join(lines) + "\n"

    # --- pictures ----------------------------------------------------------------------------

    def to_svg(self, engine: Engine = "auto") -> str:
        """An SVG picture: Graphviz's layout if it is installed (or asked for), else ours."""
        if engine == "graphviz" or (engine == "auto" and graphviz_available()):
            return _graphviz(self.to_dot(), "svg").decode()
        return draw_svg(self)

    def to_png(self, engine: Engine = "auto") -> bytes:
        """A PNG picture, by Graphviz or by cairosvg; RuntimeError naming both if neither."""
        if engine != "python" and graphviz_available():
            return _graphviz(self.to_dot(), "png")
        try:
            import cairosvg  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise RuntimeError(
                "PNG needs Graphviz (Debian: `apt-get install graphviz`) or cairosvg "
                "(`pip install cairosvg`); SVG, DOT and Mermaid work without either"
            ) from None
        png: bytes = cairosvg.svg2png(bytestring=draw_svg(self).encode())
        return png

    def render(self, fmt: Format, engine: Engine = "auto") -> bytes:
        """The picture or text in `fmt`, as bytes ready to write to a file."""
        if fmt == "dot":
            return self.to_dot().encode()
        if fmt == "mermaid":
            return self.to_mermaid().encode()
        if fmt == "svg":
            return self.to_svg(engine).encode()
        if fmt == "png":
            return self.to_png(engine)
        raise ValueError(f"unknown graph format {fmt!r}: one of {', '.join(FORMATS)}")


def job_label(job: JobSummary) -> str:
    """A workflow task's name, else the worker the job runs on."""
    return job.name or job.worker


def job_subtitle(job: JobSummary) -> str:
    """`step S · state` (a task: `state · worker`), and the attempt after the first."""
    first = f"{job.state} · {job.worker}" if job.name else f"step {job.step} · {job.state}"
    return first + (f" · try {job.attempt}" if job.attempt > 1 else "")


def job_details(job: JobSummary) -> str:
    parts = [f"job {job.id}", f"step {job.step}", f"worker {job.worker}", str(job.state)]
    if job.name:
        parts.insert(1, f"task {job.name}")
    if job.attempt > 1:
        parts.append(f"attempt {job.attempt}")
    if job.started_at and job.finished_at:
        parts.append(f"{job.finished_at - job.started_at:.3f} s")
    if job.size is not None:
        parts.append(f"product {job.size} B")
    if job.exit_code is not None:
        parts.append(f"exit {job.exit_code}")
    if job.error:
        parts.append(job.error)
    return " · ".join(parts)


def _dot_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _mermaid_text(text: str) -> str:
    return text.replace('"', "#quot;").replace("[", "#91;").replace("]", "#93;")


def graphviz_available() -> bool:
    return shutil.which("dot") is not None


def _graphviz(dot: str, fmt: str) -> bytes:
    binary = shutil.which("dot")
    if binary is None:
        raise RuntimeError("Graphviz's `dot` is not installed (Debian: `apt-get install graphviz`)")
    done = subprocess.run(
        [binary, f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"dot -T{fmt} failed: {done.stderr.decode(errors='replace')[:500]}")
    return done.stdout


def format_of(path: Path, default: Format = "svg") -> Format:
    """The format a file name asks for by its suffix (`.gv` is DOT, `.mmd` Mermaid)."""
    suffix = path.suffix.lower().lstrip(".")
    aliases: dict[str, Format] = {
        "svg": "svg",
        "png": "png",
        "dot": "dot",
        "gv": "dot",
        "mmd": "mermaid",
        "mermaid": "mermaid",
    }
    return aliases.get(suffix, default)


class GraphImage:
    """A DAG picture that shows itself inline in Jupyter (`_repr_svg_`), or saves to a file."""

    def __init__(self, dag: JobDag, engine: Engine = "auto") -> None:
        self.dag = dag
        self.engine: Engine = engine
        self._svg: str | None = None

    @property
    def svg(self) -> str:
        if self._svg is None:
            self._svg = self.dag.to_svg(self.engine)
        return self._svg

    @property
    def dot(self) -> str:
        return self.dag.to_dot()

    @property
    def mermaid(self) -> str:
        return self.dag.to_mermaid()

    def png(self) -> bytes:
        return self.dag.to_png(self.engine)

    def save(self, path: Path | str, fmt: Format | None = None) -> Path:
        """Write the picture to `path`, in `fmt` or the format its suffix names."""
        target = Path(path)
        target.write_bytes(self.dag.render(fmt or format_of(target), self.engine))
        return target

    def _repr_svg_(self) -> str:
        return self.svg

    def _repr_mimebundle_(
        self, include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
    ) -> dict[str, Any]:
        bundle: dict[str, Any] = {"image/svg+xml": self.svg, "text/plain": repr(self)}
        if include is not None:
            bundle = {k: v for k, v in bundle.items() if k in set(include)}
        if exclude is not None:
            bundle = {k: v for k, v in bundle.items() if k not in set(exclude)}
        return bundle

    def __repr__(self) -> str:
        return (
            f"<GraphImage {self.dag.title}: {len(self.dag.nodes)} jobs, "
            f"{len(self.dag.edges)} locks>"
        )
