"""ResourceStore against a local directory, a real S3 API (moto's server on loopback) and a
real Azure Blob Storage API (Azurite on loopback): one suite, every backend."""

from __future__ import annotations

import base64
import hashlib
import os
import select
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pydantic
import pytest
import s3fs
from azurite import AzureAccount, azurite
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moto.server import ThreadedMotoServer

from flotta_mqtt.transport.settings import MAX_READ_BYTES
from flotta_mqtt.transport.store import (
    INLINE_BYTES,
    IntegrityError,
    Resource,
    ResourceNotFound,
    ResourceRefused,
    ResourceStore,
    sha256_hex,
)

pytestmark = pytest.mark.integration

DUMMY_CREDENTIALS = {"key": "testing", "secret": "testing"}


def _wait_until_answers(endpoint: str, timeout: float = 10.0) -> None:
    """Bounded poll: the server thread is listening once it answers any HTTP request."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1.0):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    _wait_until_answers(endpoint)
    yield endpoint
    server.stop()


def _raw_s3(endpoint: str) -> Any:
    """An s3fs client of its own, to act behind the store's back (no shared caches)."""
    return s3fs.S3FileSystem(
        **DUMMY_CREDENTIALS,
        client_kwargs={"endpoint_url": endpoint},
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@dataclass
class Backend:
    """A store plus raw access to its backend, bypassing the store."""

    store: ResourceStore
    raw_write: Callable[[str, bytes], None]
    list_dir: Callable[[str], list[str]]
    options: dict[str, Any]  # the store's storage options


def _local_backend(tmp_path: Path) -> Backend:
    def local_path(url: str) -> Path:
        assert url.startswith("file://")
        return Path(url.removeprefix("file://"))

    def raw_write(url: str, data: bytes) -> None:
        local_path(url).write_bytes(data)

    def list_dir(url: str) -> list[str]:
        return sorted(os.listdir(local_path(url)))

    return Backend(ResourceStore((tmp_path / "store").as_uri()), raw_write, list_dir, {})


def _s3_backend(endpoint: str) -> Backend:
    raw = _raw_s3(endpoint)
    bucket = f"test-{uuid.uuid4().hex}"
    raw.mkdir(bucket)
    options = {"endpoint_url": endpoint, **DUMMY_CREDENTIALS}

    def raw_write(url: str, data: bytes) -> None:
        raw.pipe_file(url, data)

    def list_dir(url: str) -> list[str]:
        return sorted(os.path.basename(p) for p in raw.ls(url, detail=False))

    return Backend(ResourceStore(f"s3://{bucket}/root", options), raw_write, list_dir, options)


@pytest.fixture(scope="module")
def azure_account(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureAccount]:
    try:
        server = azurite(tmp_path_factory.mktemp("azurite"))
        account = server.__enter__()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    yield account
    server.__exit__(None, None, None)


def _raw_azure(account: AzureAccount) -> Any:
    """An adlfs client of its own, to act behind the store's back (no shared caches)."""
    return fsspec.filesystem(
        "az", connection_string=account.connection_string, skip_instance_cache=True
    )


def _azure_backend(account: AzureAccount, scheme: str = "az") -> Backend:
    raw = _raw_azure(account)
    container = f"test-{uuid.uuid4().hex}"
    raw.mkdir(container)

    def raw_write(url: str, data: bytes) -> None:
        raw.pipe_file(url, data)

    def list_dir(url: str) -> list[str]:
        raw.invalidate_cache()
        return sorted(os.path.basename(p.rstrip("/")) for p in raw.ls(url, detail=False))

    store = ResourceStore(f"{scheme}://{container}/root", account.options)
    return Backend(store, raw_write, list_dir, account.options)


@pytest.fixture(params=["file", "s3", "az"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return _local_backend(tmp_path)
    if request.param == "az":
        return _azure_backend(request.getfixturevalue("azure_account"))
    return _s3_backend(request.getfixturevalue("s3_endpoint"))


def stored(data: bytes) -> bytes:
    """`data` padded past INLINE_BYTES, so that a product of it goes to the store."""
    return data.ljust(INLINE_BYTES + 1, b".")


class TestResourceStore:
    """The same behaviour is required from every backend."""

    def test_round_trip(self, backend: Backend) -> None:
        store = backend.store
        data = stored(b'{"result": 42}')
        resource = store.put_product("art-1", "job-1", 1, data)
        assert resource.url == store.product_url("art-1", "job-1", 1)
        assert resource.sha256 == hashlib.sha256(data).hexdigest()
        assert resource.size == len(data)
        assert resource.media_type == "application/json"
        assert store.exists(resource.url)
        assert store.get(resource) == data
        assert store.get_bytes(resource.url) == data

    def test_a_tiny_product_travels_inline(self, backend: Backend) -> None:
        store = backend.store
        data = b"x" * INLINE_BYTES
        resource = store.put_product("tiny", "j", 1, data)
        assert resource.url.startswith("data:application/json;base64,")
        assert len(resource.url) < 170
        assert store.get(resource) == data
        assert not store.exists(store.product_url("tiny", "j", 1))  # nothing written
        bigger = store.put_product("tiny", "j", 2, data + b"x")
        assert bigger.url == store.product_url("tiny", "j", 2)
        assert store.get(bigger) == data + b"x"

    def test_an_inline_product_is_verified_like_any_other(self, backend: Backend) -> None:
        store = backend.store
        resource = store.put_product("tiny", "j", 1, b'{"count": 7}')
        forged = resource.model_copy(
            update={"url": "data:application/json;base64," + base64.b64encode(b"9").decode()}
        )
        with pytest.raises(IntegrityError):
            store.get(forged)
        for bad in ("data:application/json,7", "data:;base64,!!!", "data:nothing"):
            with pytest.raises(ResourceNotFound, match="resource not found"):
                store.get(resource.model_copy(update={"url": bad}))

    def test_media_type_is_kept(self, backend: Backend) -> None:
        store = backend.store
        resource = store.put_product("a", "j", 0, b"\x00\x01", media_type="application/x-npy")
        assert resource.media_type == "application/x-npy"
        assert store.get(resource) == b"\x00\x01"

    def test_product_url_derivation(self, backend: Backend) -> None:
        store = backend.store
        url = store.product_url("art.7", "job_3-b", 2, name="model.bin")
        assert url == f"{store.root}/artifacts/art.7/jobs/job_3-b~2~model.bin"
        default = store.product_url("a", "j", 1)
        assert default == f"{store.root}/artifacts/a/jobs/j~1~product"
        assert store.product_url("a", "j", 1) != store.product_url("a", "j", 2)

    def test_unsafe_segments_rejected(self, backend: Backend) -> None:
        bad_segments = ["", ".", "..", "a/b", "../etc", "a b", "a\n", "é", "x" * 129]
        for field in ("artifact_id", "job_id", "name"):
            for bad in bad_segments:
                ids = {"artifact_id": "a", "job_id": "j", "name": "product"} | {field: bad}
                with pytest.raises(ValueError, match=field):
                    backend.store.product_url(
                        ids["artifact_id"], ids["job_id"], 1, name=ids["name"]
                    )
        with pytest.raises(ValueError, match="attempt"):
            backend.store.product_url("a", "j", -1)

    def test_tampered_bytes_raise_integrity_error(self, backend: Backend) -> None:
        store = backend.store
        resource = store.put_product("a", "j", 1, stored(b"original"))
        backend.raw_write(resource.url, b"tampered")
        with pytest.raises(IntegrityError) as info:
            store.get(resource)
        message = str(info.value)
        assert resource.url in message
        assert resource.sha256 in message
        assert sha256_hex(b"tampered") in message

    def test_missing_url_raises_resource_not_found(self, backend: Backend) -> None:
        store = backend.store
        url = store.product_url("a", "never-written", 1)
        assert not store.exists(url)
        with pytest.raises(ResourceNotFound, match=url):
            store.get_bytes(url)
        missing = Resource(url=url, sha256=sha256_hex(b""), size=0)
        with pytest.raises(ResourceNotFound, match=url):
            store.get(missing)

    def test_delete(self, backend: Backend) -> None:
        store = backend.store
        resource = store.put_product("a", "j", 1, stored(b"x"))
        store.delete(resource.url)
        assert not store.exists(resource.url)
        with pytest.raises(ResourceNotFound):
            store.get(resource)
        store.delete(resource.url)  # already gone: not an error

    def test_put_is_idempotent(self, backend: Backend) -> None:
        store = backend.store
        first = store.put_product("a", "j", 1, stored(b"same bytes"))
        second = store.put_product("a", "j", 1, stored(b"same bytes"))
        assert first == second
        assert store.get(second) == stored(b"same bytes")

    def test_no_temporary_sibling_left_behind(self, backend: Backend) -> None:
        store = backend.store
        for payload in (b"one", b"two", b"three"):
            resource = store.put_product("a", "j", 1, stored(payload))
        directory = resource.url.rsplit("/", 1)[0]
        assert backend.list_dir(directory) == ["j~1~product"]

    def test_concurrent_reader_never_sees_partial_file(self, backend: Backend) -> None:
        store = backend.store
        url = store.product_url("a", "j", 1)
        payloads = [b"a" * 200_000, b"b" * 300_000]
        store.put(url, payloads[0])
        done = threading.Event()
        seen: list[bytes] = []

        def writer() -> None:
            try:
                for i in range(30):
                    store.put(url, payloads[i % 2])
            finally:
                done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        while not done.is_set():
            seen.append(store.get_bytes(url))
        thread.join()
        assert seen
        assert all(data in payloads for data in seen)

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(data=st.binary(max_size=10_000))
    def test_round_trip_property(self, backend: Backend, data: bytes) -> None:
        store = backend.store
        resource = store.put_product("prop", sha256_hex(data)[:16], 1, data)
        assert resource.sha256 == hashlib.sha256(data).hexdigest()
        assert resource.size == len(data)
        assert store.get(resource) == data


def test_plain_local_path_is_a_file_root(tmp_path: Path) -> None:
    root = tmp_path / "plain" / "store"
    store = ResourceStore(str(root))
    assert root.is_dir()
    assert store.root == root.as_uri()
    resource = store.put_product("a", "j", 1, stored(b"data"))
    assert (root / "artifacts/a/jobs/j~1~product").read_bytes() == stored(b"data")
    assert store.get(resource) == stored(b"data")


def test_a_folder_removed_behind_the_store_is_made_again(tmp_path: Path) -> None:
    store = ResourceStore(str(tmp_path / "store"))
    store.put_product("a", "1", 1, stored(b"first"))
    shutil.rmtree(tmp_path / "store" / "artifacts" / "a")  # e.g. an artifact cleaned up
    resource = store.put_product("a", "2", 1, stored(b"second"))
    assert store.get(resource) == stored(b"second")


# --- attacks: what a hostile worker or store writer can make a reader open ------------------


def forged(url: str, data: bytes) -> Resource:
    """A Resource naming `url` with the true size and sha256 of `data`: only the URL check
    (or the cap) stands between the reader and those bytes."""
    return Resource(url=url, sha256=sha256_hex(data), size=len(data))


def test_urls_outside_the_store_are_refused_without_opening(
    backend: Backend, s3_endpoint: str
) -> None:
    store = backend.store
    other = _s3_backend(s3_endpoint).store  # another bucket, holding what the URL names
    elsewhere = other.put(f"{other.root}/artifacts/a/jobs/x", stored(b"other bucket"))
    with socket.create_server(("127.0.0.1", 0)) as listening:
        attempts = [
            forged("file:///etc/passwd", Path("/etc/passwd").read_bytes()),
            forged(f"http://127.0.0.1:{listening.getsockname()[1]}/x", b"1"),
            forged("/dev/zero", bytes(10)),
            forged("../../x", b"x"),
            forged(f"{store.root}/../x", b"x"),
            forged(f"{store.root}/artifacts/../../x", b"x"),
            forged(f"{store.root}/a//b", b"x"),
            forged(f"{store.root}/a%2F..%2F..%2Fx", b"x"),
            forged(f"{store.root}/a?b", b"x"),
            forged(f"{store.root}-sibling/a", b"x"),
            forged(f"{store.root}::file:///etc/passwd", b"x"),
            elsewhere,
        ]
        for resource in attempts:
            with pytest.raises(ResourceRefused) as refused:
                store.get(resource)
            assert str(refused.value) == f"refused {resource.url}: not a key under {store.root}"
        assert select.select([listening], [], [], 0)[0] == [], "a connection came in"


def test_a_read_for_an_artifact_stays_in_its_folder(backend: Backend) -> None:
    store = backend.store
    theirs = store.put_product("theirs", "0", 1, stored(b"another artifact's product"))
    with pytest.raises(ResourceRefused) as refused:
        store.get(theirs, store.artifact_root("mine"))
    assert str(refused.value).endswith(f"not a key under {store.root}/artifacts/mine")
    assert store.get(theirs, store.artifact_root("theirs")) == stored(b"another artifact's product")


def test_a_declared_size_over_the_cap_is_refused_before_opening(backend: Backend) -> None:
    store = backend.store
    # Nothing is stored there: opening it would raise ResourceNotFound.
    huge = Resource(url=store.product_url("a", "j", 1), sha256="0" * 64, size=2**30)
    with pytest.raises(ResourceRefused) as refused:
        store.get(huge)
    assert str(refused.value) == (
        f"refused {huge.url}: its declared size, {2**30} bytes, is over the read cap of "
        f"{MAX_READ_BYTES} bytes (storage max_read_bytes)"
    )
    small = ResourceStore(store.root, backend.options, max_read=100)
    exact = small.put_product("a", "j", 2, b"y" * 100)
    assert small.get(exact) == b"y" * 100
    with pytest.raises(ResourceRefused, match="over the read cap of 100 bytes"):
        small.get(small.put_product("a", "j", 3, b"y" * 101))


def test_more_bytes_than_declared_stop_the_read_and_fail(backend: Backend) -> None:
    store = backend.store
    resource = store.put_product("a", "j", 1, stored(b"declared"))
    backend.raw_write(resource.url, stored(b"declared") + b"and far more" * 10_000)
    with pytest.raises(IntegrityError) as failed:
        store.get(resource)
    assert str(failed.value) == f"{resource.url} holds more than its declared {resource.size} bytes"
    empty = store.put(store.product_url("a", "empty", 1), b"")
    assert store.get(empty) == store.get_bytes(empty.url) == b""
    backend.raw_write(empty.url, b"!")
    with pytest.raises(IntegrityError, match="more than its declared 0 bytes"):
        store.get(empty)


def test_a_local_read_stops_at_the_declared_size(tmp_path: Path) -> None:
    """A 1 TiB sparse file declared as 10 bytes: the read takes 11 and fails at once."""
    store = ResourceStore(str(tmp_path / "store"))
    resource = store.put(store.product_url("a", "j", 1), bytes(10))
    with open(tmp_path / "store/artifacts/a/jobs/j~1~product", "r+b") as file:
        file.truncate(2**40)
    with pytest.raises(IntegrityError, match="holds more than its declared 10 bytes"):
        store.get(resource)


def test_links_devices_and_fifos_inside_a_local_store_are_refused(tmp_path: Path) -> None:
    """What someone with write access to a local store could plant under a product's name."""
    store = ResourceStore(str(tmp_path / "store"))
    folder = tmp_path / "store/artifacts/a"
    folder.mkdir(parents=True)
    passwd = Path("/etc/passwd").read_bytes()
    (folder / "link").symlink_to("/etc/passwd")
    (folder / "linked").symlink_to("/etc")
    (folder / "zero").symlink_to("/dev/zero")
    os.mkfifo(folder / "fifo")  # an open would block for ever, a read never end
    cases = {
        "link": ("a symbolic link", passwd),
        "linked/passwd": ("it resolves outside the store", passwd),
        "zero": ("a symbolic link", bytes(10)),
        "fifo": ("not a regular file", b""),
    }
    for name, (reason, data) in cases.items():
        url = f"{store.root}/artifacts/a/{name}"
        with pytest.raises(ResourceRefused) as refused:
            store.get(forged(url, data))
        assert str(refused.value) == f"refused {url}: {reason}"


def test_storage_options_are_not_mutated(s3_endpoint: str) -> None:
    bucket = f"test-{uuid.uuid4().hex}"
    _raw_s3(s3_endpoint).mkdir(bucket)
    options: dict[str, Any] = {"endpoint_url": s3_endpoint, **DUMMY_CREDENTIALS}
    snapshot = dict(options)
    store = ResourceStore(f"s3://{bucket}", options)
    assert options == snapshot
    assert store.root == f"s3://{bucket}"
    assert store.get(store.put_product("a", "j", 1, stored(b"{}"))) == stored(b"{}")


@pytest.mark.parametrize(
    "fields",
    [
        {"sha256": "A" * 64},
        {"sha256": "a" * 63},
        {"sha256": "g" * 64},
        {"size": -1},
    ],
)
def test_resource_rejects_invalid_fields(fields: dict[str, Any]) -> None:
    valid: dict[str, Any] = {"url": "file:///x", "sha256": "a" * 64, "size": 0}
    with pytest.raises(pydantic.ValidationError):
        Resource(**{**valid, **fields})


def test_resource_is_frozen() -> None:
    resource = Resource(url="file:///x", sha256="a" * 64, size=0)
    with pytest.raises(pydantic.ValidationError):
        resource.size = 1  # type: ignore[misc]


def test_azure_reads_stay_in_the_store_container_and_prefix(azure_account: AzureAccount) -> None:
    """Another container of the same account, or a sibling prefix, holds what a forged URL
    names: the store refuses it unopened. `az://` and `abfs://` name the same store."""
    backend = _azure_backend(azure_account)
    store, other = backend.store, _azure_backend(azure_account).store
    assert store.root.startswith("abfs://")  # adlfs's spelling, whichever the settings use
    same = ResourceStore(store.root.replace("abfs://", "az://", 1), azure_account.options)
    assert same.root == store.root
    resource = store.put_product("a", "j", 1, stored(b"mine"))
    assert same.get(resource, same.artifact_root("a")) == stored(b"mine")
    theirs = other.put_product("a", "j", 1, stored(b"another container"))
    sibling = f"{store.root}-sibling/artifacts/a/jobs/j~1~product"
    backend.raw_write(sibling, stored(b"sibling"))
    for url, data in ((theirs.url, b"another container"), (sibling, b"sibling")):
        with pytest.raises(ResourceRefused, match="not a key under"):
            store.get(forged(url, stored(data)))


def test_azure_credentials_come_from_the_environment_and_are_never_shown(
    azure_account: AzureAccount, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    container = _azure_backend(azure_account).store.root.split("/")[2]
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure_account.connection_string)
    from_env = ResourceStore(f"az://{container}/root")
    assert from_env.get(from_env.put_product("a", "j", 1, stored(b"env"))) == stored(b"env")
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    wrong_key = base64.b64encode(os.urandom(64)).decode()
    wrong = AzureAccount(azure_account.name, wrong_key, azure_account.endpoint)
    store = ResourceStore(f"az://{container}/other", wrong.options)
    with pytest.raises(Exception) as failed:
        store.put(store.product_url("a", "j", 1), stored(b"x"))
    assert wrong_key not in str(failed.value) and wrong_key not in caplog.text
    assert "AuthorizationFailure" in str(failed.value) or "403" in str(failed.value)
