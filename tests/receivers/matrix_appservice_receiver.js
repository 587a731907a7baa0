#!/usr/bin/env node
// An appservice receiver built on npm matrix-appservice's AppService, unchanged.
//
//   node matrix_appservice_receiver.js PORT OUTPUT [--hs-token T] [--as-token T]
//                                      [--id ID] [--bot-localpart L] [--domain D]
//
// Same contract as mautrix_receiver.py. Each option falls back to an environment variable
// (AS_HS_TOKEN, AS_AS_TOKEN, AS_ID, AS_BOT_LOCALPART, AS_DOMAIN); only the hs_token is
// required, and matrix-appservice itself uses nothing else. PORT 0 picks a free port.
// It listens on 127.0.0.1 and, for every event AppService emits, appends one JSON line to
// OUTPUT with a synchronous write, so the line is on disk before the 200 is sent:
//
//   {"txn_id": "...", "event_id": "$...", "type": "m.room.message"}
//
// Ephemeral events (only the unstable key `de.sorunome.msc2409.ephemeral` is read by
// matrix-appservice) are written with "event_id": null and "ephemeral": true.
// "ready <port>" goes to stdout once the socket listens. SIGTERM or SIGINT closes the
// server and exits with status 0.
"use strict";

const fs = require("fs");
const { AppService } = require("matrix-appservice");

function parseArgs(argv) {
    const env = process.env;
    const opts = {
        hsToken: env.AS_HS_TOKEN,
        asToken: env.AS_AS_TOKEN || "unused-as-token",
        id: env.AS_ID || "matrix-appservice-receiver",
        botLocalpart: env.AS_BOT_LOCALPART || "receiverbot",
        domain: env.AS_DOMAIN || "example.org",
    };
    const names = {
        "--hs-token": "hsToken", "--as-token": "asToken", "--id": "id",
        "--bot-localpart": "botLocalpart", "--domain": "domain",
    };
    const positional = [];
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        const eq = arg.indexOf("=");
        const flag = eq > 0 ? arg.slice(0, eq) : arg;
        if (names[flag]) {
            const value = eq > 0 ? arg.slice(eq + 1) : argv[++i];
            if (value === undefined) usage(`${flag} needs a value`);
            opts[names[flag]] = value;
        } else if (arg.startsWith("--")) {
            usage(`unknown option ${arg}`);
        } else {
            positional.push(arg);
        }
    }
    if (positional.length !== 2) usage("expected PORT and OUTPUT");
    const port = Number(positional[0]);
    if (!Number.isInteger(port) || port < 0 || port > 65535) usage(`bad port ${positional[0]}`);
    if (!opts.hsToken) usage("an hs_token is required: --hs-token or AS_HS_TOKEN");
    return { port, output: positional[1], ...opts };
}

function usage(msg) {
    process.stderr.write(
        `error: ${msg}\nusage: node matrix_appservice_receiver.js PORT OUTPUT [--hs-token T] ` +
        "[--as-token T] [--id ID] [--bot-localpart L] [--domain D]\n");
    process.exit(2);
}

// matrix-appservice hands only the event to "event" listeners. onTransaction is bound in the
// constructor through `this.onTransaction`, so a subclass override is what the route calls;
// the events of a transaction are emitted synchronously inside it, so the id recorded here
// is the right one for each of them. Behaviour (auth, dedupe, status codes) is unchanged.
class TxnAwareAppService extends AppService {
    currentTxnId = null;

    onTransaction(req, res) {
        this.currentTxnId = req.params.txnId;
        try {
            return super.onTransaction(req, res);
        } finally {
            this.currentTxnId = null;
        }
    }
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const fd = fs.openSync(args.output, "a");
    const as = new TxnAwareAppService({ homeserverToken: args.hsToken });

    const record = (ev, ephemeral) => {
        const line = {
            txn_id: as.currentTxnId,
            event_id: ephemeral ? null : (ev && ev.event_id) ?? null,
            type: ev && ev.type !== undefined ? ev.type : null,
        };
        if (ephemeral) line.ephemeral = true;
        fs.writeSync(fd, JSON.stringify(line) + "\n");
    };
    as.on("event", (ev) => record(ev, false));
    as.on("ephemeral", (ev) => record(ev, true));
    as.on("http-log", (line) => process.stderr.write(line + "\n"));

    let stopping = false;
    const stop = async () => {
        if (stopping) return;
        stopping = true;
        try {
            if (as.server && as.server.closeAllConnections) as.server.closeAllConnections();
            await as.close();
        } catch (e) {
            process.stderr.write(`close: ${e}\n`);
        }
        fs.closeSync(fd);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);

    await as.listen(args.port, "127.0.0.1", 511);
    process.stdout.write(`ready ${as.server.address().port}\n`);
}

main().catch((e) => {
    process.stderr.write(`${e && e.stack ? e.stack : e}\n`);
    process.exit(1);
});
