"""The scheduler's histograms expose what Prometheus expects, however they are counted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flotta_mqtt.scheduler.metrics import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram


@given(
    st.sampled_from([LATENCY_BUCKETS, DURATION_BUCKETS]),
    st.lists(st.floats(min_value=-1.0, max_value=5000.0) | st.sampled_from(LATENCY_BUCKETS)),
)
def test_each_bucket_counts_every_value_up_to_its_bound(
    buckets: tuple[float, ...], values: list[float]
) -> None:
    histogram = Histogram(buckets)
    for value in values:
        histogram.observe(value)
    lines = histogram.lines("h")
    counts = [int(line.rsplit(" ", 1)[1]) for line in lines[: len(buckets)]]
    assert counts == [sum(max(0.0, v) <= bound for v in values) for bound in sorted(buckets)]
    assert lines[len(buckets)] == f'h_bucket{{le="+Inf"}} {len(values)}'
    assert lines[-1] == f"h_count {len(values)}"
