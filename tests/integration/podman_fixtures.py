"""A private podman for the docker and kube executor tests: a local image and an API socket.

Nothing is installed or pulled at test time (no registry is reachable here): podman, runc
and busybox-static come from `bash broker/install.sh test`. The fixture

- keeps all of podman's state (images, containers, volumes) in a temporary folder of its
  own (`--root`, `--runroot`, `--tmpdir`), removed afterwards, so nothing touches the
  machine's podman store;
- writes a `containers.conf` (given to the podman processes it starts, through
  `CONTAINERS_CONF`, never to the test process) with the settings that make containers
  run on this kernel: `default_ulimits` and `runtime = "runc"` (crun fails on its hybrid
  cgroup setup);
- builds an image from a rootfs holding `/bin/busybox` (static) and its applets, imported
  with `podman import --change 'ENV PATH=/bin'`;
- serves the Docker Engine API on a unix socket (`podman system service --time=0`) and
  gives its URL for the executor (never through `DOCKER_HOST`: other tests see nothing).

A machine where podman cannot run a container fails these tests with podman's own words.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

IMAGE = "localhost/flotta-bb:test"
BUSYBOX = Path("/bin/busybox")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""
INSTALL = "install it with `bash broker/install.sh test` (Debian: podman runc busybox-static)"


@dataclass
class Podman:
    """A podman with its own store; `docker_host` is its Docker API for the executor."""

    base: Path
    image: str = IMAGE

    @property
    def socket(self) -> Path:
        return self.base / "api.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--root",
            str(self.base / "root"),
            "--runroot",
            str(self.base / "run"),
            "--tmpdir",
            str(self.base / "tmp"),
            *args,
        ]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.base / "containers.conf")}

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(*args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(
                f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
            )
        return done


def _rootfs_tar(base: Path) -> Path:
    """A tar of a rootfs holding only static busybox and a symlink per applet in /bin."""
    rootfs = base / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "tmp").mkdir(mode=0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (rootfs / "bin" / applet).symlink_to("busybox")
    archive = base / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    return archive


def _start_service(podman: Podman) -> subprocess.Popen[bytes]:
    log = (podman.base / "service.log").open("wb")
    service = subprocess.Popen(
        podman.argv("system", "service", "--time=0", podman.docker_host),
        env=podman.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    deadline = time.monotonic() + 30
    while True:
        if service.poll() is not None:
            text = (podman.base / "service.log").read_text(errors="replace")
            pytest.fail(f"podman system service exited ({service.returncode}):\n{text}")
        try:
            client = docker.DockerClient(base_url=podman.docker_host, timeout=5)
            try:
                if client.ping():
                    return service
            finally:
                client.close()
        except Exception as exc:
            if time.monotonic() > deadline:
                service.kill()
                pytest.fail(f"podman's API never answered on {podman.socket}: {exc}")
        time.sleep(0.1)


def _stop(service: subprocess.Popen[bytes]) -> None:
    service.terminate()
    try:
        service.wait(10)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait(10)


@pytest.fixture(scope="module")
def podman() -> Iterator[Podman]:
    """A podman with the busybox image imported and its Docker API served (per module)."""
    if shutil.which("podman") is None or shutil.which("runc") is None:
        pytest.fail(f"podman and runc are needed: {INSTALL}")
    if not BUSYBOX.is_file():
        pytest.fail(f"{BUSYBOX} (static) is needed: {INSTALL}")
    # Short: conmon's attach socket lives under the runroot and socket paths are limited.
    base = Path(tempfile.mkdtemp(prefix="fp-", dir="/tmp"))
    podman = Podman(base)
    (base / "tmp").mkdir()
    (base / "containers.conf").write_text(CONTAINERS_CONF)
    service = None
    try:
        podman.run("import", "--quiet", "--change", "ENV PATH=/bin", str(_rootfs_tar(base)), IMAGE)
        # Proof that a container runs here at all, with podman's own error if not.
        smoke = podman.run("run", "--rm", "--network", "none", IMAGE, "echo", "ok", check=False)
        if smoke.returncode != 0 or smoke.stdout.strip() != "ok":
            pytest.fail(
                f"podman cannot run a container on this machine ({smoke.returncode}):\n"
                f"{smoke.stdout}{smoke.stderr}"
            )
        service = _start_service(podman)
        yield podman
    finally:
        if service is not None:
            _stop(service)
        for args in (
            ("pod", "rm", "--all", "--force"),
            ("rm", "--all", "--force"),
            ("volume", "rm", "--all", "--force"),
            ("rmi", "--all", "--force"),
        ):
            podman.run(*args, check=False)
        shutil.rmtree(base, ignore_errors=True)
