#!/usr/bin/env python3
"""An appservice receiver built on mautrix-python's AppService, unchanged.

    .venv/bin/python mautrix_receiver.py PORT OUTPUT [--hs-token T] [--as-token T]
                                         [--id ID] [--bot-localpart L] [--domain D]

Each option falls back to an environment variable (AS_HS_TOKEN, AS_AS_TOKEN, AS_ID,
AS_BOT_LOCALPART, AS_DOMAIN); only the hs_token is required. PORT 0 picks a free port.
It listens on 127.0.0.1 and, for every event that mautrix hands to its event handlers,
appends one JSON line to OUTPUT and flushes it before the transaction is answered:

    {"txn_id": "...", "event_id": "$...", "type": "m.room.message"}

Ephemeral events (when the body carries `ephemeral` or `de.sorunome.msc2409.ephemeral`)
are written too, with "event_id": null and "ephemeral": true. "ready <port>" goes to stdout
once the socket listens. SIGTERM or SIGINT stops the server and exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys

from mautrix.appservice import AppService
from mautrix.appservice.state_store import ASStateStore
from mautrix.client.state_store import MemoryStateStore


class MemStateStore(MemoryStateStore, ASStateStore):
    """In-memory state; without it AppService writes mx-state.json in the working directory."""

    def __init__(self) -> None:
        MemoryStateStore.__init__(self)
        ASStateStore.__init__(self)


class TxnAwareAppService(AppService):
    """AppService that remembers which transaction the events being handled came from.

    mautrix passes only the event to matrix_event_handler. handle_transaction receives the
    txn id and, with synchronous_handlers, awaits every handler before returning, so the id
    it saw is the right one for all events handled inside it.
    """

    current_txn_id: str | None = None

    async def handle_transaction(self, txn_id: str, **kwargs):  # type: ignore[override]
        self.current_txn_id = txn_id
        try:
            return await super().handle_transaction(txn_id, **kwargs)
        finally:
            self.current_txn_id = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("port", type=int, help="TCP port on 127.0.0.1 (0 = any free port)")
    p.add_argument("output", help="file to append one JSON line per received event to")
    p.add_argument("--hs-token", default=env("AS_HS_TOKEN"), help="token the homeserver sends (env AS_HS_TOKEN)")
    p.add_argument("--as-token", default=env("AS_AS_TOKEN", "unused-as-token"), help="env AS_AS_TOKEN")
    p.add_argument("--id", default=env("AS_ID", "mautrix-receiver"), help="appservice id (env AS_ID)")
    p.add_argument("--bot-localpart", default=env("AS_BOT_LOCALPART", "receiverbot"), help="env AS_BOT_LOCALPART")
    p.add_argument("--domain", default=env("AS_DOMAIN", "example.org"), help="server name (env AS_DOMAIN)")
    args = p.parse_args(argv)
    if not args.hs_token:
        p.error("an hs_token is required: --hs-token or AS_HS_TOKEN")
    return args


async def run(args: argparse.Namespace) -> None:
    out = open(args.output, "a", encoding="utf-8")
    az = TxnAwareAppService(
        server="http://127.0.0.1:1",  # never contacted: the receiver makes no client requests
        domain=args.domain,
        as_token=args.as_token,
        hs_token=args.hs_token,
        bot_localpart=args.bot_localpart,
        id=args.id,
        state_store=MemStateStore(),
        ephemeral_events=True,
    )
    az.synchronous_handlers = True  # handlers finish before the 200

    @az.matrix_event_handler
    async def record(evt) -> None:
        line = {"txn_id": az.current_txn_id, "event_id": getattr(evt, "event_id", None), "type": str(evt.type)}
        if line["event_id"] is None:
            line["ephemeral"] = True
        out.write(json.dumps(line) + "\n")
        out.flush()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await az.start(host="127.0.0.1", port=args.port)
    port = args.port
    for addr in az.runner.addresses:
        if isinstance(addr, tuple):
            port = addr[1]
            break
    print(f"ready {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await az.stop()
        out.close()


def main() -> None:
    args = parse_args(sys.argv[1:])
    logging.basicConfig(level=os.environ.get("RECEIVER_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
