"""A job's JobReady, built in one place for the two that need it: dispatch, which sends
it, and the size check at submission, which measures the largest it can be sent as."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from pydantic import TypeAdapter

from flotta_mqtt.model import Artifact, Job, JobGraph, JobRole, Operation
from flotta_mqtt.model.operation import FiniteJsonObject
from flotta_mqtt.protocol import MAX_MESSAGE_BYTES, JobReady, Resource, serialize

# A job's params as its JobReady writes them: the same serializer, the same bytes.
_PARAMS = TypeAdapter(FiniteJsonObject)
# What dispatch adds to a job's message, at its widest: the largest attempt number, a
# cache scope of the most characters a scope has, the longer of an exit handler's outcomes.
_WIDEST_ATTEMPT = 2**63 - 1
_WIDEST_SCOPE = "x" * 128
_WIDEST_OUTCOME = "Succeeded"


def uses_cache(job: Job) -> bool:
    """Whether a job is a workflow task with `cache`: its message says whose cache."""
    return job.kind == "tasks" and job.operation.params.get("cache") is True


def job_message(
    artifact: Artifact,
    job: Job,
    attempt: int,
    inputs: list[Resource],
    cache_scope: str | None,
    outcome: str,
) -> JobReady:
    """A job's message; an exit handler is told the workflow's `outcome`. Validated (in
    pydantic's compiled core, faster than model_construct's Python loop over the fields):
    raises ValidationError for a value that no worker would accept."""
    operation = job.operation
    if job.handler is not None:  # it runs once the others are final: tell it how they went
        params = {**operation.params, "workflow_status": outcome}
        operation = Operation.model_construct(name=operation.name, params=params)
    return JobReady(
        artifact_id=artifact.id,
        job_id=job.id,
        attempt=attempt,
        project=artifact.project,
        seed=artifact.seed,
        step=job.step,
        kind=job.kind,
        role=job.role,
        iteration=job.iteration,
        operation=operation,
        inputs=inputs,
        cache_scope=cache_scope,
    )


def job_sizes(artifact: Artifact, graph: JobGraph) -> Iterator[tuple[Job, int]]:
    """Each job with the size of the largest message without inputs it can be sent as,
    exactly, without encoding each job's: its frame (the message with job id 0, round 0
    and no params, dispatch's fields at their widest), encoded once per kind of job, plus
    its id's and its round's digits and its params, the fields jobs of one kind differ in.
    Only a task's params differ from job to job; a step's other jobs of one operation
    share theirs."""
    frames: dict[tuple[str, JobRole, str, bool], int] = {}
    shared: dict[tuple[str, JobRole, str], int] = {}
    for job in graph.jobs:
        cached = uses_cache(job)
        key = (job.step, job.role, job.operation.name)
        frame = frames.get((*key, cached))
        if frame is None:
            frame = frames[(*key, cached)] = _frame(artifact, job, cached)
        if job.kind == "tasks":
            params = _params_size(job)
        elif (params := shared.get(key, -1)) < 0:
            params = shared[key] = _params_size(job)
        yield job, frame + len(str(job.id)) + len(str(job.iteration)) + params


def _frame(artifact: Artifact, job: Job, cached: bool) -> int:
    bare = Operation.model_construct(name=job.operation.name, params={})
    job = replace(job, id=0, iteration=0, operation=bare, handler=None)
    scope = _WIDEST_SCOPE if cached else None
    message = job_message(artifact, job, _WIDEST_ATTEMPT, [], scope, _WIDEST_OUTCOME)
    return len(serialize(message)) - len("0") - len("0") - len(_PARAMS.dump_json({}))


def _params_size(job: Job) -> int:
    params = job.operation.params
    if job.handler is not None:
        params = {**params, "workflow_status": _WIDEST_OUTCOME}
    return len(_PARAMS.dump_json(params))


def oversize_job(artifact: Artifact, graph: JobGraph) -> str | None:
    """Why a job's JobReady would be over MAX_MESSAGE_BYTES, if one's could be: it could
    never be dispatched, and its artifact would wait for it forever.

    A job's message is at least its largest encoding without inputs (see job_sizes) plus,
    per input, the shortest Resource naming a product of this artifact.
    """
    shortest = Resource(url=f"artifacts/{artifact.id}/jobs/0~1~product", sha256="0" * 64, size=0)
    per_input = len(serialize(shortest)) + 1
    for job, size in job_sizes(artifact, graph):
        inputs = graph.graph.in_degree(job.id)
        if size + per_input * inputs > MAX_MESSAGE_BYTES:
            consumed = f" and its {inputs} inputs" if inputs else ""
            return (
                f"job {job.id} (step {job.step}) cannot be sent to its worker: its parameters"
                f"{consumed} make a message over the broker's {MAX_MESSAGE_BYTES}-byte limit; "
                "put large data in the resource store, or collect fewer products into one job"
            )
    return None
