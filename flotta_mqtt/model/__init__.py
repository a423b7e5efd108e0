"""The model layer: artifacts, steps, distributions, binding and state machines. No I/O."""

from flotta_mqtt.model.artifact import Artifact
from flotta_mqtt.model.binding import Job, JobGraph, bind, job_count
from flotta_mqtt.model.context import NodeRef, SchedulerContext
from flotta_mqtt.model.distribution import Collect, Distribute, Distribution, Pairwise, RoundRobin
from flotta_mqtt.model.errors import BindingError, IllegalTransition, StaleAttempt
from flotta_mqtt.model.ids import SafeId
from flotta_mqtt.model.locks import LockTable
from flotta_mqtt.model.operation import Operation
from flotta_mqtt.model.query import AllOf, AnyOf, Compare, Filter, Not
from flotta_mqtt.model.registry import (
    CODE_EXECUTOR,
    DashboardEntry,
    GroupEntry,
    Registry,
    WorkbenchEntry,
    WorkerEntry,
)
from flotta_mqtt.model.states import (
    ARTIFACT_FINAL,
    JOB_DONE,
    JOB_FINAL,
    ArtifactState,
    JobState,
    JobStatus,
    check_artifact_transition,
    check_job_transition,
)
from flotta_mqtt.model.steps import (
    Finalize,
    Initialize,
    Iterate,
    JobRole,
    Parallel,
    SecureAggregation,
    Sequential,
    Step,
    Tasks,
    check_steps,
)
from flotta_mqtt.model.workflow import Task, Workflow, candidates, task_graph

__all__ = [
    "ARTIFACT_FINAL",
    "CODE_EXECUTOR",
    "JOB_DONE",
    "JOB_FINAL",
    "AllOf",
    "AnyOf",
    "Artifact",
    "ArtifactState",
    "BindingError",
    "Collect",
    "Compare",
    "DashboardEntry",
    "Distribute",
    "Distribution",
    "Filter",
    "Finalize",
    "GroupEntry",
    "IllegalTransition",
    "Initialize",
    "Iterate",
    "Job",
    "JobGraph",
    "JobRole",
    "JobState",
    "JobStatus",
    "LockTable",
    "NodeRef",
    "Not",
    "Operation",
    "Pairwise",
    "Parallel",
    "Registry",
    "RoundRobin",
    "SafeId",
    "SchedulerContext",
    "SecureAggregation",
    "Sequential",
    "StaleAttempt",
    "Step",
    "Task",
    "Tasks",
    "WorkbenchEntry",
    "WorkerEntry",
    "Workflow",
    "bind",
    "candidates",
    "check_artifact_transition",
    "check_job_transition",
    "check_steps",
    "job_count",
    "task_graph",
]
