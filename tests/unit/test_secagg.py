"""Secure aggregation without a broker: its pieces (Shamir, the primitives, fixed point),
then whole rounds run as the engine would (`dag_runner`), with a site dropping out before
or after each round, and the attacks: a reader of every product, a lying scheduler."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from typing import Any

import pyarrow as pa
import pytest
from dag_runner import INITIATOR, job_ready, run_artifact
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from leaks import unmasked
from pydantic import TypeAdapter
from test_query import TableDataset

from flotta_mqtt import analytics as operations
from flotta_mqtt.analytics import OperationError, PrivacyPolicy, PrivacyRefused, masking
from flotta_mqtt.analytics.secagg import crypto, shamir
from flotta_mqtt.analytics.secagg import site as secagg_site
from flotta_mqtt.model import (
    Artifact,
    BindingError,
    Collect,
    Finalize,
    Iterate,
    Job,
    NodeRef,
    Operation,
    Pairwise,
    Parallel,
    SchedulerContext,
    SecureAggregation,
    bind,
    job_count,
)
from flotta_mqtt.protocol.secagg import SecAggProduct

PRODUCT: TypeAdapter[Any] = TypeAdapter(SecAggProduct)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SITES = ("w0", "w1", "w2", "w3")
NOOP = Operation(name="noop")
# These sites answer exactly: what is checked is the sum, not the site's privacy policy
# (a noised answer, where a site asks for one, is summed the same way).
EXACT = PrivacyPolicy(exact=True)
ROUNDS = ("keys", "share", "mask", "reveal")  # each site's jobs, round by round

# --- Shamir over 2**521 - 1 ---------------------------------------------------------------

SECRETS = st.integers(0, shamir.PRIME - 1)


@SETTINGS
@given(SECRETS, st.data())
def test_any_threshold_of_shares_gives_the_secret_back(secret: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 9))
    threshold = data.draw(st.integers(1, n))
    randomness = data.draw(st.binary(min_size=74 * (threshold - 1), max_size=74 * threshold))
    shares = shamir.split(secret, range(1, n + 1), threshold, randomness)
    chosen = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=threshold, unique=True))
    assert shamir.combine({x: shares[x] for x in chosen}, threshold) == secret
    fewer = chosen[: threshold - 1]
    with pytest.raises(shamir.ShareError, match="fewer than the threshold"):
        shamir.combine({x: shares[x] for x in fewer}, threshold)


@SETTINGS
@given(SECRETS, st.integers(2, 6), st.binary(min_size=74 * 6, max_size=74 * 6), st.data())
def test_a_share_off_the_polynomial_is_an_error_never_a_wrong_secret(
    secret: int, threshold: int, randomness: bytes, data: st.DataObject
) -> None:
    shares = shamir.split(secret, range(1, threshold + 2), threshold, randomness)
    x = data.draw(st.sampled_from(sorted(shares)))
    shares[x] = (shares[x] + data.draw(st.integers(1, shamir.PRIME - 1))) % shamir.PRIME
    with pytest.raises(shamir.ShareError, match="not on the polynomial"):
        shamir.combine(shares, threshold)


def test_splitting_refuses_what_it_cannot_share() -> None:
    with pytest.raises(ValueError, match="not an element"):
        shamir.split(shamir.PRIME, [1, 2], 2, bytes(74))
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(1, [1, 1], 2, bytes(74))
    with pytest.raises(ValueError, match="never reach"):
        shamir.split(1, [1], 2, bytes(74))
    with pytest.raises(ValueError, match="random bytes"):
        shamir.split(1, [1, 2, 3], 3, bytes(74))


# --- the primitives -------------------------------------------------------------------------


def test_key_agreement_sealing_and_expansion() -> None:
    a, b, c = (crypto.new_private_key() for _ in range(3))
    a_pub, b_pub = crypto.public_key(a), crypto.public_key(b)
    key = crypto.agree(a, b_pub, "seal", "r", "a", "b")
    assert key == crypto.agree(b, a_pub, "seal", "r", "a", "b")  # both derive it
    assert key != crypto.agree(a, b_pub, "seal", "another round", "a", "b")
    assert key != crypto.agree(c, b_pub, "seal", "r", "a", "b")
    nonce, ciphertext = crypto.seal(key, b"share", "r|a|b")
    assert crypto.unseal(key, nonce, ciphertext, "r|a|b") == b"share"
    for wrong_key, context in [(key, "r|b|a"), (crypto.new_private_key(), "r|a|b")]:
        with pytest.raises(crypto.SealError):
            crypto.unseal(wrong_key, nonce, ciphertext, context)
    tampered = format(int(ciphertext, 16) ^ 1, "x").zfill(len(ciphertext))
    with pytest.raises(crypto.SealError):
        crypto.unseal(key, nonce, tampered, "r|a|b")
    with pytest.raises(crypto.SealError, match="no key agreement"):
        crypto.agree(a, "00" * 32, "seal", "r")  # a low-order point
    stream = crypto.expand(b"seed", 3, masking.BITS)
    assert stream == crypto.expand(b"seed", 3, masking.BITS) != crypto.expand(b"seeds", 3, 2176)
    assert all(0 <= v < masking.MODULUS for v in stream) and len(set(stream)) == 3


def test_a_vault_derives_the_same_secret_again_and_another_process_a_different_one() -> None:
    vault = crypto.Vault()
    assert vault.secret("mask", "r", "w0") == vault.secret("mask", "r", "w0")
    assert vault.secret("mask", "r", "w0") != vault.secret("mask", "r", "w1")
    assert vault.secret("mask", "r", "w0") != crypto.Vault().secret("mask", "r", "w0")


# --- fixed point in the masking ring ----------------------------------------------------------

FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=64)


@SETTINGS
@given(st.lists(FLOATS, max_size=30), st.lists(st.integers(0, masking.MODULUS - 1), max_size=30))
def test_masked_fixed_point_sums_are_exact_and_rounded_once(
    values: list[float], masks: list[int]
) -> None:
    """Whatever the masks, taking them off the masked sum gives the exact sum, rounded once
    (what math.fsum returns), for any floats whose exact sum a float can hold."""
    exact = sum((Fraction(v) for v in values), Fraction(0))
    assume(abs(exact) < 2**1023)
    masks = (masks + [0] * len(values))[: len(values)]
    masked = sum(
        (masking.fixed(v) + m) % masking.MODULUS for v, m in zip(values, masks, strict=True)
    )
    total = (masked - sum(masks)) % masking.MODULUS
    signed = total - masking.MODULUS if total >= masking.MODULUS // 2 else total
    assert masking.unfixed(signed) == float(exact) == math.fsum(values)


def test_fixed_point_range_is_every_float_and_a_sum_beyond_a_float_is_an_error() -> None:
    biggest = masking.fixed(1.7976931348623157e308)
    assert masking.fixed(5e-324) == 1  # the smallest step is the unit
    assert 2**64 * biggest < masking.MODULUS // 2  # 2**64 of the largest never wrap
    with pytest.raises(OperationError, match="beyond the range of a float"):
        masking.unfixed(2 * biggest)


# --- whole rounds, as the engine runs them ---------------------------------------------------


def site_data(
    seed: int = 3, sites: int = len(SITES)
) -> tuple[dict[str, TableDataset], dict[str, list[float]]]:
    rng = random.Random(seed)
    datasets, values = {}, {}
    for i in range(sites):
        site, rows = f"w{i}", rng.randint(10, 40)
        values[site] = [rng.uniform(-5, 50) for _ in range(rows)]
        x = [rng.gauss(0, 1) for _ in range(rows)]
        table = pa.table({"v": values[site], "x": x})
        datasets[site] = TableDataset(table, node=site, batch_rows=5)
        datasets[site].privacy = EXACT
    return datasets, values


def site_sum(data: TableDataset) -> float:
    """What a site's own sum job measures (in batches, as floats)."""
    definition, params = operations.lookup(Operation(name="sum", params={"column": "v"}))
    ctx = operations.JobContext(
        job=job_ready(plain(NOOP), next(iter(bind(plain(NOOP), context())))),
        node=data.node,
        inputs=[],
        data=data,
    )
    return float(definition.measure(params, ctx)[0])  # type: ignore[attr-defined]


def secure(operation: Operation, **settings: Any) -> Artifact:
    step = Parallel(operation, Collect(), secure=SecureAggregation(**settings))
    return Artifact(project="p", steps=[step, Finalize(operation)])


def plain(operation: Operation) -> Artifact:
    return Artifact(project="p", steps=[Parallel(operation, Collect()), Finalize(operation)])


def silent(sites: tuple[str, ...], round_: str | None) -> Any:
    """A drop rule: `sites` fall silent at `round_` (None: nobody does)."""
    return lambda job: job.worker in sites and job.operation.name == f"secagg.{round_}"


def dropping(site: str, round_: str | None) -> Any:
    return silent((site,), round_)


def only(datasets: dict[str, Any], sites: set[str]) -> dict[str, Any]:
    return {site: data for site, data in datasets.items() if site in sites}


@pytest.mark.parametrize("round_", [None, *ROUNDS])
def test_the_sum_covers_exactly_the_sites_whose_masked_input_came_in(round_: str | None) -> None:
    """A site silent at keys, share or mask is left out, its pairwise masks recovered from
    the others' shares; one silent only at reveal is in (its masked input was)."""
    datasets, _ = site_data()
    covered = set(SITES) - ({"w1"} if round_ in ("keys", "share", "mask") else set())
    for name, params in [("sum", {"column": "v"}), ("count", {}), ("mean", {"column": "v"})]:
        operation = Operation(name=name, params=params)
        got, _ = run_artifact(secure(operation), datasets, dropping("w1", round_))
        expected, _ = run_artifact(plain(operation), only(datasets, covered))
        assert math.isclose(got, expected, rel_tol=1e-12), (name, round_)
        if name == "sum":  # exactly the sum of the sites' sums, rounded once
            assert got == math.fsum(site_sum(datasets[site]) for site in covered)


def test_federated_averaging_of_a_linear_model_equals_the_plain_one() -> None:
    datasets, _ = site_data()
    params = {"features": ["x"], "label": "v", "test_fraction": 0.0}
    operation = Operation(name="linear_regression", params=params)
    for round_ in (None, "mask"):
        covered = set(SITES) - ({"w1"} if round_ else set())
        got, _ = run_artifact(secure(operation), datasets, dropping("w1", round_))
        expected, _ = run_artifact(plain(operation), only(datasets, covered))
        assert got["n"] == expected["n"] and got["metrics"] is None
        theta = [got["model"]["intercept"], *got["model"]["coef"]]
        oracle = [expected["model"]["intercept"], *expected["model"]["coef"]]
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(theta, oracle, strict=True))


@SETTINGS
@given(st.integers(1, 30), st.integers(2, 40), st.text(min_size=5, max_size=20))
def test_secagg_plus_neighbourhoods_are_symmetric_regular_and_agreed(
    n: int, neighbours: int, round_: str
) -> None:
    sites = [f"s{i}" for i in range(n)]
    circles = secagg_site.neighbourhoods(round_, sites, neighbours)
    assert circles == secagg_site.neighbourhoods(round_, list(reversed(sites)), neighbours)
    size = min(n, 2 * (neighbours // 2) + 1)
    for me, circle in circles.items():
        assert me in circle and len(circle) == size == len(set(circle))
        assert all(me in circles[other] for other in circle)  # u ~ v exactly when v ~ u
    assert secagg_site.neighbourhoods(round_, sites, None) == {s: sorted(sites) for s in sites}


@pytest.mark.parametrize("round_", [None, "share", "mask", "reveal"])
def test_secagg_plus_sums_over_sparse_neighbourhoods_with_a_dropout(round_: str | None) -> None:
    """Seven sites, each sharing with and masking against two others only."""
    datasets, _ = site_data(sites=7)
    operation = Operation(name="sum", params={"column": "v"})
    got, products = run_artifact(secure(operation, neighbours=2), datasets, dropping("w3", round_))
    covered = set(datasets) - ({"w3"} if round_ in ("share", "mask") else set())
    assert got == math.fsum(site_sum(datasets[site]) for site in covered)
    dealt = [PRODUCT.validate_json(p) for p in products.values() if b"secagg_shares" in p]
    assert dealt and all(len(d.sealed) == 3 for d in dealt)  # itself and two neighbours
    with pytest.raises(OperationError, match=r"needs 4 sites .* a neighbourhood holds 3"):
        run_artifact(secure(operation, neighbours=2, threshold=4), datasets)


def test_federated_averaging_rounds_of_a_logistic_model_run_secure_in_an_iterate() -> None:
    """Each round's masked inputs consume the model the previous round's Finalize made;
    the secure rounds train the same model as the plain ones."""
    datasets, _ = site_data()
    for data in datasets.values():
        values = data.table.column("v").to_pylist()
        data.table = data.table.append_column("y", pa.array([int(v > 20) for v in values]))
    params = {"features": ["x", "v"], "label": "y", "test_fraction": 0.0, "local_steps": 2}
    operation = Operation(name="logistic_regression", params=params)
    models = []
    for secure_step in (None, SecureAggregation()):
        rounds = Iterate(
            3, [Parallel(operation, Collect(), secure=secure_step), Finalize(operation)]
        )
        got, _ = run_artifact(Artifact(project="p", steps=[rounds]), datasets)
        assert got["round"] == 2
        models.append([got["model"]["intercept"], *got["model"]["coef"]])
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(*models, strict=True))


@pytest.mark.parametrize("round_", [None, *ROUNDS])
def test_no_product_gives_a_site_away(round_: str | None) -> None:
    """Every product a reader of the store (or the scheduler) sees, searched for each site's
    sum, count, and their exact fixed point, alone or as a difference of two numbers."""
    datasets, values = site_data()
    sums: dict[str, float | int] = {site: math.fsum(v) for site, v in values.items()}
    counts = {f"{site} rows": len(v) for site, v in values.items()}
    operation = Operation(name="mean", params={"column": "v"})
    _, products = run_artifact(secure(operation), datasets, dropping("w2", round_))
    graph_products = [data for job, data in sorted(products.items())][:-2]  # not the sum
    assert unmasked(graph_products, {**sums, **counts}) == []
    for data in graph_products:  # and every one is a message of the protocol
        assert PRODUCT.validate_json(data).type.startswith("secagg_")
    # The control: the same search finds every site in a plain Parallel's products.
    _, exposed = run_artifact(plain(operation), datasets)
    found = unmasked(list(exposed.values()), {**sums, **counts})
    assert all(any(f.startswith(f"{site}'s") for f in found) for site in SITES), found


def test_with_fewer_sites_than_the_threshold_the_round_fails_unmasking_no_one() -> None:
    datasets, _ = site_data()
    operation = Operation(name="sum", params={"column": "v"})
    with pytest.raises(
        OperationError, match=r"2 sites of its neighbourhood sent masked inputs \(w0, w3\), fewer"
    ):
        run_artifact(secure(operation), datasets, silent(("w1", "w2"), "mask"))
    # The same at the sites: with two silent before dealing, nobody sends a masked input.
    with pytest.raises(
        OperationError, match=r"2 sites of its neighbourhood dealt shares .* it stops here"
    ):
        run_artifact(secure(operation), datasets, silent(("w1", "w2"), "share"))
    with pytest.raises(OperationError, match="a threshold of 2 of 4 sites is not a majority"):
        run_artifact(secure(operation, threshold=2), datasets)
    with pytest.raises(OperationError, match="needs 5 sites"):
        run_artifact(secure(operation, threshold=5), datasets)


def test_a_site_whose_policy_gives_no_exact_answer_is_not_bypassed() -> None:
    """Its masked input is its own answer as its policy allows: refused here, as a plain
    sum would be (with epsilon, a noised one, paid for from its budget, is summed)."""
    datasets, _ = site_data()
    datasets["w1"].privacy = PrivacyPolicy()  # the default: noised answers only
    with pytest.raises(PrivacyRefused, match="worker w1: project p gives no exact sum"):
        run_artifact(secure(Operation(name="sum", params={"column": "v"})), datasets)


def test_a_lying_scheduler_gets_at_most_one_of_a_sites_two_secrets() -> None:
    """The attack: the scheduler tells two revealers that w1's masked input came in and two
    that it did not, hoping for both w1's self-mask seed and its mask key, which together
    unmask w1's input. Each revealer gives one of the two, and a threshold of 3 of 4 is
    more than either half."""
    datasets, _ = site_data()
    operation = Operation(name="sum", params={"column": "v"})
    artifact = secure(operation)
    _, products = run_artifact(artifact, datasets)
    graph = bind(artifact, context())
    masked_w1 = next(j.id for j in graph if (j.worker, j.operation.name) == ("w1", "secagg.mask"))
    reveals = {}
    for job in graph:
        if job.operation.name != "secagg.reveal":
            continue
        told = [p for p in graph.consumes(job.id) if job.worker in ("w0", "w2") or p != masked_w1]
        ctx = operations.JobContext(
            job=job_ready(artifact, job),
            node=job.worker,
            inputs=[json.loads(products[p]) for p in told],
            data=datasets[job.worker],
        )
        reveals[job.worker] = operations.run(ctx)
    self_shares = [r for r in reveals.values() if "w1" in r["self_masks"]]
    key_shares = [r for r in reveals.values() if "w1" in r["mask_keys"]]
    assert len(self_shares) == 2 and len(key_shares) == 2  # each told its story...
    assert not any("w1" in r["self_masks"] and "w1" in r["mask_keys"] for r in reveals.values())
    for shares, kind in [(self_shares, "self_masks"), (key_shares, "mask_keys")]:
        points = {r[kind]["w1"]["x"]: int(r[kind]["w1"]["y"], 16) for r in shares}
        with pytest.raises(shamir.ShareError):  # ...and neither half reaches 3
            shamir.combine(points, 3)


def test_a_site_restarted_mid_round_cannot_take_part(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets, _ = site_data()
    artifact = secure(Operation(name="count"))
    _, products = run_artifact(artifact, datasets)
    graph = bind(artifact, context())
    monkeypatch.setattr(secagg_site, "VAULT", crypto.Vault())  # its memory is gone
    job = next(j for j in graph if (j.worker, j.operation.name) == ("w0", "secagg.share"))
    ctx = operations.JobContext(
        job=job_ready(artifact, job),
        node="w0",
        inputs=[json.loads(products[p]) for p in graph.consumes(job.id)],
        data=datasets["w0"],
    )
    with pytest.raises(OperationError, match="w0 restarted since it advertised its keys"):
        operations.run(ctx)


# --- binding ------------------------------------------------------------------------------------


def context() -> SchedulerContext:
    return SchedulerContext(
        initiator=NodeRef(id=INITIATOR), workers=[NodeRef(id=site) for site in SITES]
    )


def test_a_secure_parallel_binds_to_four_rounds_per_site_and_an_unmasking() -> None:
    operation = Operation(name="sum", params={"column": "v"})
    artifact = secure(operation, dropout=7.0)
    graph = bind(artifact, context())
    assert len(graph) == job_count(artifact.steps, len(SITES)) == 4 * len(SITES) + 2
    rounds: dict[str, list[Job]] = {}
    for job in graph:
        rounds.setdefault(job.operation.name, []).append(job)
    for i, name in enumerate(ROUNDS):
        jobs = rounds[f"secagg.{name}"]
        assert [j.worker for j in jobs] == list(SITES) and all(j.dropout == 7.0 for j in jobs)
        earlier = {j.id for r in ROUNDS[:i] for j in rounds[f"secagg.{r}"]}
        assert all(set(graph.consumes(j.id)) == earlier for j in jobs)
    (unmask,) = rounds["secagg.unmask"]
    assert unmask.worker == INITIATOR and unmask.dropout is None
    assert len(graph.consumes(unmask.id)) == 4 * len(SITES)
    (final,) = rounds["sum"]
    assert graph.consumes(final.id) == [unmask.id]


def test_a_secure_parallel_ends_with_one_job_and_refuses_what_it_cannot_sum() -> None:
    operation = Operation(name="sum", params={"column": "v"})
    with pytest.raises(ValueError, match="Pairwise needs as many jobs"):
        Artifact(
            project="p",
            steps=[
                Parallel(operation, Pairwise(), secure=SecureAggregation()),
                Parallel(operation),
            ],
        )
    for threshold in (1, 0.5, 1.5):
        with pytest.raises(ValueError):
            SecureAggregation(threshold=threshold)
    with pytest.raises(BindingError, match="needs workers"):
        bind(secure(operation), SchedulerContext(initiator=NodeRef(id=INITIATOR), workers=[]))
    artifact = secure(Operation(name="variance", params={"column": "v"}))
    graph = bind(artifact, context())
    with pytest.raises(OperationError, match="'variance' cannot run under secure aggregation"):
        operations.lookup(next(j for j in graph if j.operation.name == "secagg.mask").operation)
