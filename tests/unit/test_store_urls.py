"""The one check of every URL a store opens, `under`, as properties: nothing it accepts
leads fsspec outside the root, and every key a store writes under the root is accepted.

Acceptance is judged apart from `under` itself: fsspec resolves each accepted URL, and the
path it would open must be the root's path, a slash, and a normalised rest.
"""

from __future__ import annotations

import posixpath

import fsspec
from hypothesis import given, settings
from hypothesis import strategies as st

from flotta_mqtt.transport.store import under

ROOTS = {
    "file:///tmp/flotta-root/store": "/tmp/flotta-root/store",
    "s3://bucket/root": "bucket/root",
    "s3://bucket": "bucket",
    "s3://bucket/root/artifacts/a1": "bucket/root/artifacts/a1",  # an artifact's folder
}
# Characters that change what a URL means to fsspec or a file system, and plain ones.
TRICKY = "/.~-_aZ09%?#:*[]\\ @!$&'()+,;=\x00\né"
KEY_SEGMENT = st.from_regex(r"[A-Za-z0-9._~-]{1,12}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)


def resolves_under(url: str, root_path: str) -> bool:
    """Whether fsspec would open a normalised path below `root_path` for `url`."""
    _, path = fsspec.url_to_fs(url)
    return path.startswith(root_path + "/") and posixpath.normpath(path) == path


near_roots = st.sampled_from(
    [
        *ROOTS,
        "file:///tmp/flotta-root/store-sibling",
        "file:///tmp/flotta-root",
        "file:///tmp/flotta-root/stor",
        "s3://bucket-other",
        "s3://bucket/root/artifacts/a10",
        "s3://bucket/roo",
        "file://",
        "",
    ]
)
# Pieces that mean something in a path or a URL, so that their combinations come up often;
# and paths of segments that are or look like `.` and `..`.
PIECES = ["/", "/", ".", "..", "a", "b.c", "~", "%2F", "%2e", "?", "#", ":", "::", "*", "\\", " "]
SEGMENTS = ["a", "b.c", "~x", ".", "..", "", "...", ".a", "..a"]
rests = st.one_of(
    st.text(TRICKY, max_size=40),
    st.lists(st.sampled_from(PIECES), max_size=12).map("".join),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6).map(lambda s: "/" + "/".join(s)),
)
urls = st.one_of(st.builds(lambda root, rest: root + rest, near_roots, rests), st.text())


@settings(deadline=None, max_examples=500)  # fsspec imports s3fs for its first s3:// URL
@given(root=st.sampled_from(sorted(ROOTS)), near=near_roots, rest=rests, other=st.text())
def test_no_url_outside_the_root_is_accepted(root: str, near: str, rest: str, other: str) -> None:
    for url in (root + rest, near + rest, other):
        if under(url, [root]):
            assert url.startswith(root + "/")
            assert resolves_under(url, ROOTS[root]), url


@settings(deadline=None)
@given(root=st.sampled_from(sorted(ROOTS)), key=st.lists(KEY_SEGMENT, min_size=1, max_size=6))
def test_every_key_under_the_root_is_accepted(root: str, key: list[str]) -> None:
    url = f"{root}/{'/'.join(key)}"
    assert under(url, [root])
    assert resolves_under(url, ROOTS[root])


@given(url=urls)
def test_a_url_is_accepted_under_several_roots_when_under_one(url: str) -> None:
    roots = sorted(ROOTS)
    assert under(url, roots) == any(under(url, [root]) for root in roots)
    assert not under(url, [])
