"""A live progress bar of an artifact's jobs, for `ArtifactHandle.wait(progress=True)`."""

from __future__ import annotations

from flotta_mqtt.model import JOB_DONE
from flotta_mqtt.protocol import ArtifactStatus


class ProgressBar:
    """A live rich progress bar of jobs done out of total."""

    def __init__(self, artifact_id: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task(f"artifact {artifact_id[:12]}", total=None)
        self._progress.start()

    def update(self, status: ArtifactStatus) -> None:
        done = sum(status.counts.get(state, 0) for state in JOB_DONE)  # skipped too
        self._progress.update(
            self._task,
            total=status.total or None,
            completed=done,
            description=f"artifact {status.artifact_id[:12]} {status.state}",
        )

    def close(self) -> None:
        self._progress.stop()
