"""`python -m flotta_mqtt.broker {start,identities,tls,bridge}`: run and equip a broker.

`python -m flotta_mqtt.broker [PORT] [DIR]` is `start`: a broker until Ctrl-C that requires
passwords (`--identities`) unless `--anonymous` asks for a development broker; `--tls` adds
certificates, and both identities and TLS are needed to listen beyond loopback.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from flotta_mqtt.broker.bridge import SITE_TOPICS, BridgeTopic, render_bridge, site_topics
from flotta_mqtt.broker.identities import (
    ACL_FILE,
    PASSWORD_FILE,
    IdentitySpec,
    generate_identities,
    load_credentials,
    write_private,
)
from flotta_mqtt.broker.local import LocalBroker
from flotta_mqtt.broker.tls import generate_tls
from flotta_mqtt.transport.settings import load_registry

COMMANDS = ("start", "identities", "tls", "bridge")


def start(args: argparse.Namespace) -> None:
    exposed = [bind for bind in (args.bind, args.websockets_bind) if not _loopback(bind)]
    if args.identities is None and not args.anonymous:
        raise ValueError(
            "a broker without --identities DIR (passwords) lets any local process act as "
            "any node: give --identities DIR, or --anonymous for a development broker"
        )
    if exposed and (args.identities is None or args.tls is None):
        raise ValueError(
            f"listening on {', '.join(exposed)} (not loopback) needs --identities DIR "
            "(passwords) and --tls DIR (certificates): see broker/README.md"
        )
    settings: dict[str, object] = {"bind_address": args.bind}
    if args.websockets is not None:
        settings["websockets_port"] = args.websockets
        settings["websockets_bind_address"] = args.websockets_bind
    if args.identities is not None:
        settings["password_file"] = args.identities / PASSWORD_FILE
        settings["acl_file"] = args.identities / ACL_FILE
    if args.tls is not None:
        settings["cafile"] = args.tls / "ca.crt"
        settings["certfile"] = args.tls / "server.crt"
        settings["keyfile"] = args.tls / "server.key"
    settings["bridges"] = [path.read_text() for path in args.bridge]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    data = args.dir.resolve()
    broker = LocalBroker(port=args.port, data_dir=data, **settings).start()
    listening = broker.url + (f" and {broker.ws_url}" if broker.ws_url else "")
    print(f"mosquitto on {listening}, data in {data}, log in {broker.log_path}; Ctrl-C to stop")
    stop.wait()
    broker.stop()


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as exposed


def identities(args: argparse.Namespace) -> None:
    bridges: dict[str, list[str]] = {}
    for entry in args.bridge:
        name, _, nodes = entry.partition("=")
        bridges[name] = [node for node in nodes.split(",") if node]
    if args.registry is not None:
        flags = args.worker or args.workbench or args.dashboard or args.bridge
        if flags or args.scheduler != "scheduler":
            raise ValueError("--registry names every node: leave out the node flags")
        spec = IdentitySpec.of(load_registry(args.registry))
    else:
        spec = IdentitySpec(
            scheduler=args.scheduler,
            workers=args.worker,
            workbenches=args.workbench,
            dashboards=args.dashboard,
            bridges=bridges,
        )
    made = generate_identities(spec, args.out, rotate=args.rotate)
    print(f"{len(made.credentials)} identities: {', '.join(made.credentials)}")
    print(f"broker: password_file {made.password_file}, acl_file {made.acl_file}")
    print(f"nodes: usernames and passwords in {made.credentials_file} (mode 0600)")


def tls(args: argparse.Namespace) -> None:
    made = generate_tls(args.out, names=args.name, clients=args.client)
    print(f"CA {made.ca_file} (key {made.ca_key}: keep it off the broker)")
    print(f"broker: certfile {made.cert_file}, keyfile {made.key_file}")
    for client, (cert, key) in made.clients.items():
        print(f"{client}: cert_file {cert}, key_file {key}")


def bridge(args: argparse.Namespace) -> None:
    host, _, port = args.remote.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--remote must be HOST:PORT, not {args.remote!r}")
    username = password = None
    topics: Sequence[BridgeTopic] = SITE_TOPICS
    if args.credentials is not None:
        credential = load_credentials(args.credentials).get(args.name)
        if credential is None:
            raise SystemExit(f"{args.credentials} has no identity {args.name!r}: add --bridge")
        username, password = credential.username, credential.password
        topics = site_topics(credential.carries) if credential.carries else SITE_TOPICS
    text = render_bridge(
        args.name,
        host,
        int(port),
        username=username,
        password=password,
        ca_file=args.ca_file,
        topics=topics,
    )
    if args.out is None:
        sys.stdout.write(text)
    else:
        write_private(args.out, text)  # it may hold the bridge's password
        print(f"bridge {args.name} → {args.remote} written to {args.out}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m flotta_mqtt.broker", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)

    run = commands.add_parser("start", help="run a broker with the project's settings")
    run.add_argument("port", nargs="?", type=int, default=1883)
    run.add_argument("dir", nargs="?", type=Path, default=Path("broker-data"))
    run.add_argument("--bind", default="127.0.0.1", help="address to listen on")
    run.add_argument("--websockets", type=int, metavar="PORT", help="also MQTT over WebSockets")
    run.add_argument("--websockets-bind", default="127.0.0.1", help="its address")
    run.add_argument("--identities", type=Path, help="directory made by `identities`")
    run.add_argument(
        "--anonymous", action="store_true", help="no passwords: development, loopback only"
    )
    run.add_argument("--tls", type=Path, help="directory made by `tls`: a TLS listener")
    run.add_argument("--bridge", type=Path, action="append", default=[], help="bridge file")
    run.set_defaults(handler=start)

    ids = commands.add_parser("identities", help="password file, ACL and credentials")
    ids.add_argument("--registry", type=Path, help="the operator's node registry (YAML)")
    ids.add_argument("--scheduler", default="scheduler")
    ids.add_argument("--worker", action="append", default=[])
    ids.add_argument("--workbench", action="append", default=[])
    ids.add_argument("--dashboard", action="append", default=[])
    ids.add_argument(
        "--bridge", action="append", default=[], metavar="SITE=NODE,NODE", help="site bridge"
    )
    ids.add_argument("--out", type=Path, required=True)
    ids.add_argument(
        "--rotate", action="append", default=[], metavar="NODE", help="draw NODE a new password"
    )
    ids.set_defaults(handler=identities)

    certs = commands.add_parser("tls", help="a CA, the broker's certificate, client ones")
    certs.add_argument("--out", type=Path, required=True)
    certs.add_argument("--name", action="append", default=[], help="broker host name or IP")
    certs.add_argument("--client", action="append", default=[], help="client certificate")
    certs.set_defaults(handler=tls)

    link = commands.add_parser("bridge", help="a site broker's bridge to the central one")
    link.add_argument("--name", required=True, help="the site (its bridge identity)")
    link.add_argument("--remote", required=True, help="central broker HOST:PORT")
    link.add_argument("--credentials", type=Path, help="credentials file from `identities`")
    link.add_argument("--ca-file", type=Path, help="CA of central's certificate: TLS")
    link.add_argument("--out", type=Path, help="file to write (default: stdout)")
    link.set_defaults(handler=bridge)
    return main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] not in COMMANDS and not argv[0].startswith("-")):
        argv = ["start", *argv]  # the historical `[PORT] [DIR]` form
    args = parser().parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
