"""``wabridge-sim [--listen HOST:PORT] [--state FILE] [--qr-rotate S] [--qr-max N]
[--heartbeat S]``.

Defaults come from the ``[sim]`` section of the wabridge configuration. Runs until SIGTERM or
SIGINT; tells systemd ``READY=1`` once listening when ``$NOTIFY_SOCKET`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from sim.server import HEARTBEAT, SimServer
from wabridge import config as wconfig
from wabridge import logs
from wabridge.errors import ConfigError, ExitCode

log = logs.get("wabridge.sim")


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number < 0.5:
        raise argparse.ArgumentTypeError(f"{value!r} is below 0.5")
    return number


def _count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def parse_args(argv: list[str] | None, cfg: wconfig.Config) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wabridge-sim", description="A local stand-in for WhatsApp's network."
    )
    parser.add_argument("--listen", type=_listen, default=_listen(cfg.sim.listen),
                        help=f"HOST:PORT to serve on (default {cfg.sim.listen})")
    parser.add_argument("--state", type=Path, default=None,
                        help="JSON file keeping linked devices and messages across restarts")
    parser.add_argument("--qr-rotate", type=_positive, default=cfg.sim.qr_rotate,
                        help=f"seconds between QR rotations (default {cfg.sim.qr_rotate})")
    parser.add_argument("--qr-max", type=_count, default=6,
                        help="QR codes shown before qr_expired (default 6)")
    parser.add_argument("--heartbeat", type=_positive, default=HEARTBEAT,
                        help="seconds between pings on a device connection; one whose pong "
                             f"is half that late is dropped (default {HEARTBEAT:g})")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    host, port = args.listen
    server = SimServer(
        host=host, port=port, qr_rotate=args.qr_rotate, qr_max=args.qr_max,
        state_file=args.state, heartbeat=args.heartbeat,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify  # noqa: PLC0415 - only under systemd

            sdnotify.SystemdNotifier().notify(f"READY=1\nSTATUS=listening on {server.base_url}")
        await stop.wait()
        log.info("sim.stopping")
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = wconfig.load()
    except ConfigError as exc:
        sys.stderr.write(f"wabridge-sim: {exc}\n")
        return int(ExitCode.CONFIG)
    logs.setup("wabridge-sim", cfg.log.level, cfg.log.format)
    args = parse_args(argv, cfg)
    try:
        asyncio.run(serve(args))
    except OSError as exc:
        log.error("sim.failed", error=str(exc))
        return int(ExitCode.FAILURE)
    except ValueError as exc:  # an unreadable state file
        log.error("sim.failed", error=str(exc))
        return int(ExitCode.CONFIG)
    return int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
