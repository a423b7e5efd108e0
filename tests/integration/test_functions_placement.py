"""`@distributed` calls a newcomer makes first: a call that printed to one stream only, and
a batch in which one call asks for a label no worker has (a real mosquitto and cluster)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_functions import TIMEOUT, Cluster

from flotta_mqtt import CallFailed
from flotta_mqtt.broker import LocalBroker

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(broker: LocalBroker, tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(broker.url, tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def test_logs_of_a_call_that_wrote_to_stdout_only(cluster: Cluster) -> None:
    cluster.start("w0")
    mod = cluster.module(
        """
        from flotta_mqtt import distributed

        @distributed
        def quiet(word):
            print(word)
            return word
        """
    )
    handle = mod.quiet("hello")
    assert handle.unwrap(TIMEOUT) == "hello"
    assert handle.logs() == ("hello\n", "")


def test_a_call_no_worker_can_place_fails_alone_in_its_batch(cluster: Cluster) -> None:
    cluster.start("w0", "w1")
    mod = cluster.module(
        """
        from flotta_mqtt import distributed

        @distributed
        def double(x):
            return 2 * x

        @distributed(platform="gpu=yes")
        def on_gpu(x):
            return x
        """
    )
    before = [mod.double(x) for x in range(3)]
    stranded = mod.on_gpu(1)
    after = [mod.double(x) for x in range(3, 6)]

    with pytest.raises(CallFailed, match="gpu") as failed:
        stranded.unwrap(TIMEOUT)
    assert failed.value.error_type == "BindingError"
    assert [h.unwrap(TIMEOUT) for h in before + after] == [0, 2, 4, 6, 8, 10]
    # The placeable calls still share an artifact.
    assert len({h.artifact_id for h in before + after}) == 1
