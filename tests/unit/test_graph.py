"""DAG pictures from a status alone (client/graph.py): no broker needed."""

from __future__ import annotations

import itertools
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.client import graph as graph_module
from flotta_mqtt.client.drawing import NODE_H, NODE_W, layout
from flotta_mqtt.client.graph import GraphImage, GraphTooLarge, JobDag, format_of
from flotta_mqtt.model import ArtifactState, JobState
from flotta_mqtt.protocol import ArtifactStatus, JobSummary

SVG = "{http://www.w3.org/2000/svg}"


def status_of(
    states: list[JobState],
    locks: list[tuple[int, int]],
    names: list[str | None] | None = None,
) -> ArtifactStatus:
    jobs = [
        JobSummary(
            id=i,
            step=str(i % 3),
            worker=f"w{i % 4}",
            state=state,
            attempt=2 if state is JobState.FAILED else 1,
            name=names[i] if names else None,
            error="boom <&>" if state is JobState.FAILED else None,
        )
        for i, state in enumerate(states)
    ]
    counts: dict[JobState, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return ArtifactStatus(
        artifact_id="a-1",
        project="p",
        state=ArtifactState.RUNNING,
        seq=1,
        total=len(states),
        counts=counts,
        jobs=jobs,
        locks=locks,
        updated_at=1.0,
    )


DIAMOND = status_of(
    [JobState.COMPLETED, JobState.RUNNING, JobState.FAILED, JobState.WAITING],
    [(0, 1), (0, 2), (1, 3), (2, 3)],
    names=['a "quoted" <task>', "b & c", "[c]", None],
)


def classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def test_our_svg_has_one_box_per_job_and_one_arrow_per_lock_coloured_by_state() -> None:
    root = ET.fromstring(JobDag.from_status(DIAMOND).to_svg(engine="python"))
    jobs = [e for e in root.iter(f"{SVG}g") if "job" in classes(e)]
    locks = [e for e in root.iter(f"{SVG}path") if "lock" in classes(e)]
    assert [e.get("data-state") for e in jobs] == ["completed", "running", "failed", "waiting"]
    assert sorted((int(e.get("data-from", -1)), int(e.get("data-to", -1))) for e in locks) == [
        (0, 1),
        (0, 2),
        (1, 3),
        (2, 3),
    ]
    texts = ["".join(e.itertext()) for e in jobs]
    assert 'a "quoted" <task>' in texts[0]  # escaped in the XML, itself once parsed
    assert "boom <&>" in texts[2] and "attempt 2" in texts[2]  # the tooltip
    fills = {e.get("data-state"): e.find(f"{SVG}rect").get("fill") for e in jobs}  # type: ignore[union-attr]
    assert len(set(fills.values())) == 4


def test_dot_and_mermaid_quote_what_they_carry() -> None:
    dag = JobDag.from_status(DIAMOND)
    dot = dag.to_dot()
    assert r'label="a \"quoted\" <task>\ncompleted · w0"' in dot
    assert dot.count(" -> ") == 4 and 'class="job failed"' in dot
    mermaid = dag.to_mermaid()
    assert 'j0["a #quot;quoted#quot; <task><br/>completed · w0"]:::completed' in mermaid
    assert 'j2["#91;c#93;<br/>failed · w2 · try 2"]:::failed' in mermaid
    assert mermaid.count(" --> ") == 4


def test_a_status_without_jobs_cannot_be_drawn_and_says_why() -> None:
    big = DIAMOND.model_copy(update={"jobs": None, "locks": None, "total": 4000})
    with pytest.raises(GraphTooLarge, match="has 4000 jobs: too large to draw"):
        JobDag.from_status(big)
    unbound = DIAMOND.model_copy(
        update={"jobs": None, "locks": None, "total": 0, "state": ArtifactState.SUBMITTED}
    )
    with pytest.raises(GraphTooLarge, match="is submitted: it has no jobs to draw yet"):
        JobDag.from_status(unbound)


def test_png_without_graphviz_or_cairosvg_names_both(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_module, "graphviz_available", lambda: False)
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # import fails
    with pytest.raises(RuntimeError, match=r"PNG needs Graphviz .* or cairosvg"):
        JobDag.from_status(DIAMOND).to_png()
    # SVG still works, with our own layout.
    assert JobDag.from_status(DIAMOND).to_svg().startswith("<svg")


def test_the_notebook_picture_and_saving_by_suffix(tmp_path: Path) -> None:
    picture = GraphImage(JobDag.from_status(DIAMOND), engine="python")
    assert picture._repr_svg_() == picture.svg
    assert set(picture._repr_mimebundle_(include=["image/svg+xml"])) == {"image/svg+xml"}
    assert set(picture._repr_mimebundle_(exclude=["image/svg+xml"])) == {"text/plain"}
    assert picture.save(tmp_path / "g.gv").read_text().startswith('digraph "a-1"')
    assert picture.save(tmp_path / "g.mmd").read_text().startswith("flowchart LR")
    ET.parse(picture.save(tmp_path / "g.svg"))
    assert format_of(Path("x.PNG")) == "png" and format_of(Path("x")) == "svg"


@st.composite
def dags(draw: st.DrawFn) -> ArtifactStatus:
    n = draw(st.integers(min_value=1, max_value=40))
    pairs = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
    edges = {(a, b) for a, b in draw(st.lists(pairs, max_size=80)) if a < b}
    states = draw(st.lists(st.sampled_from(list(JobState)), min_size=n, max_size=n))
    return status_of(states, sorted(edges))


@settings(max_examples=60, deadline=None)
@given(dags())
def test_layout_points_every_lock_rightwards_without_overlaps(status: ArtifactStatus) -> None:
    dag = JobDag.from_status(status)
    positions, layers, rows = layout(dag)
    assert layers >= 1 and rows >= 1
    assert set(positions) == {node.id for node in dag.nodes}
    for a, b in dag.edges:
        assert positions[a][0] + NODE_W < positions[b][0]
    corners = list(positions.values())
    assert len(set(corners)) == len(corners)
    for x, y in corners:
        assert x >= 0 and y >= 0
    by_column: dict[float, list[float]] = {}
    for x, y in corners:
        by_column.setdefault(x, []).append(y)
    for ys in by_column.values():
        ys.sort()
        assert all(b - a >= NODE_H for a, b in itertools.pairwise(ys))
    root = ET.fromstring(dag.to_svg(engine="python"))
    assert len([e for e in root.iter() if "job" in classes(e)]) == len(dag.nodes)
    assert len([e for e in root.iter() if "lock" in classes(e)]) == len(dag.edges)
