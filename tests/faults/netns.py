"""A network namespace for one node, joined to the host by a veth pair, with faults on tap.

    host                                  namespace NAME
    veth HOST_DEV  10.99.A.B+1/30  <-->   veth NS_DEV  10.99.A.B+2/30

A process started with `Netns.command(...)` (`ip netns exec NAME ...`) reaches the host
only through the pair, at `host_address`; a service on the host that should be reachable
from the namespace must listen on that address (the broker gets a second listener there).

Faults (root only; this kernel has no netem):
- `link_down()` / `link_up()`: `ip link set HOST_DEV down|up`. The host end goes down, so
  the namespace end loses its carrier but keeps its address and route: packets from the
  node vanish, as on an unplugged WAN link, rather than failing fast with ENETUNREACH.
- `loss(percent)` / `clear_loss()`: an nftables table inside the namespace dropping
  `numgen random mod 100 < P` of the packets in and out of NS_DEV.

Names are unique per process (pid) and per instance, and the /30 is chosen among those no
host interface uses, so parallel runs do not collide. `close()` removes the namespace, the
veth pair and the nft table whatever state they are in; it is safe to call twice.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import subprocess
from collections.abc import Sequence

NET = ipaddress.IPv4Network("10.99.0.0/16")
_BLOCKS = NET.num_addresses // 4  # /30 blocks in 10.99.0.0/16
_counter = itertools.count(1)
NFT_TABLE = "flotta_fault"


class NetnsError(RuntimeError):
    """A namespace command failed; carries the command and its stderr."""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def _used_addresses() -> set[ipaddress.IPv4Address]:
    out = run("ip", "-4", "-o", "addr", "show").stdout
    used = set()
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.add(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).ip)
    return used


class Netns:
    """One namespace with a veth pair to the host; see the module docstring."""

    def __init__(self, tag: str = "w") -> None:
        k = next(_counter)
        pid = os.getpid()
        # Interface names are at most 15 characters: "fh" + pid (≤ 7) + tag + k.
        self.name = f"flotta-{tag}{pid}-{k}"
        self.host_dev = f"fh{pid}{tag[:1]}{k}"[:15]
        self.ns_dev = f"fn{pid}{tag[:1]}{k}"[:15]
        self.host_address, self.ns_address = self._pick_block(pid, k)
        self._created = False
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pick_block(pid: int, k: int) -> tuple[str, str]:
        used = _used_addresses()
        start = (pid * 7919 + k * 104729) % _BLOCKS
        for i in range(_BLOCKS):
            block = (start + i) % _BLOCKS
            if block == 0:
                continue  # 10.99.0.0/30: keep the network's first block free
            base = NET.network_address + block * 4
            if not {base + n for n in range(4)} & used:
                return str(base + 1), str(base + 2)
        raise NetnsError("no free /30 left in 10.99.0.0/16")

    def _create(self) -> None:
        run("ip", "netns", "add", self.name)
        self._created = True
        run("ip", "link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        run("ip", "link", "set", self.ns_dev, "netns", self.name)
        run("ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_dev)
        run("ip", "link", "set", self.host_dev, "up")
        self.exec("ip", "addr", "add", f"{self.ns_address}/30", "dev", self.ns_dev)
        self.exec("ip", "link", "set", self.ns_dev, "up")
        self.exec("ip", "link", "set", "lo", "up")

    # --- running things inside ------------------------------------------------------------

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` prefixed to run inside the namespace (ip execs it: the pid is the process's)."""
        return ["ip", "netns", "exec", self.name, *args]

    def url(self, port: int) -> str:
        """The MQTT URL a node in the namespace uses for a service on `port` of the host end."""
        return f"mqtt://{self.host_address}:{port}"

    def exec(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.command(args), check=check)

    # --- faults -----------------------------------------------------------------------------

    def link_down(self) -> None:
        run("ip", "link", "set", self.host_dev, "down")

    def link_up(self) -> None:
        run("ip", "link", "set", self.host_dev, "up")

    def loss(self, percent: int) -> None:
        """Drop `percent`% of the packets entering and leaving the namespace's veth end."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss is a percentage, not {percent}")
        self.clear_loss()
        ruleset = f"""
table inet {NFT_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{self.ns_dev}" numgen random mod 100 < {percent} counter drop
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
        oifname "{self.ns_dev}" numgen random mod 100 < {percent} counter drop
    }}
}}
"""
        result = subprocess.run(
            self.command(["nft", "-f", "-"]), input=ruleset, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise NetnsError(f"nft ruleset in {self.name} refused: {result.stderr.strip()}")

    def clear_loss(self) -> None:
        self.exec("nft", "delete", "table", "inet", NFT_TABLE, check=False)

    def dropped(self) -> int:
        """Packets the loss rules dropped so far (0 when there are none)."""
        out = self.exec("nft", "list", "table", "inet", NFT_TABLE, check=False).stdout
        total = 0
        for line in out.splitlines():
            fields = line.split()
            if "counter" in fields and "packets" in fields:
                total += int(fields[fields.index("packets") + 1])
        return total

    # --- cleanup ----------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything this namespace made; errors are ignored (it may be half-made)."""
        if self._created:
            self.clear_loss()
        # Deleting the namespace destroys its veth end, and with it the host end, but the
        # kernel does it asynchronously: delete the host end explicitly too.
        run("ip", "link", "del", self.host_dev, check=False)
        run("ip", "netns", "del", self.name, check=False)
        self._created = False

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
