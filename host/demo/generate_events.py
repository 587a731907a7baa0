#!/usr/bin/env python3
"""Writes events.jsonl: a deterministic stream of client-format Matrix room events.

    python3 host/demo/generate_events.py            # rewrites host/demo/events.jsonl
    python3 host/demo/generate_events.py --check    # also prints per-appservice interest

The output depends only on SEED and this file: running it again rewrites events.jsonl
byte for byte. Generation uses the standard library only; --check also needs PyYAML to
read registrations/*.yaml.

Interest rule used by --check (a simplification of Synapse's): an appservice gets an
event when its users namespace matches the sender, or the state_key of an m.room.member
event, or when its rooms namespace matches the room_id. Namespaces are matched against
the whole id, and the appservice's own sender_localpart user counts as in the users
namespace. No event in the stream is sent by, or is about, an appservice bot user.
"""

from __future__ import annotations

import base64
import json
import random
import re
import sys
from pathlib import Path

SEED = 20251124
N_EVENTS = 600
START_TS = 1764000000000
SERVER = "example.org"
HERE = Path(__file__).resolve().parent
OUT = HERE / "events.jsonl"

# --------------------------------------------------------------------------- people

LOCAL = {
    "@alice:example.org": "Alice Chen",
    "@bob:example.org": "Bob Müller",
    "@carol:example.org": "Carol Okafor",
    "@dave:example.org": "Dave Ramirez",
    "@erin:example.org": "Erin Walsh",
    "@frank:example.org": "Frank Li",
    "@rssbot:example.org": "RSS Bot",
}
TELEGRAM = {
    "@telegram_123456789:example.org": "Dmitri Ivanov (Telegram)",
    "@telegram_284719305:example.org": "Olga K (Telegram)",
    "@telegram_51872466:example.org": "Yusuf Demir (Telegram)",
    "@telegram_930117742:example.org": "Mia Schmidt (Telegram)",
}
SLACK = {
    "@slack_U02ABCDE12:example.org": "Priya Raman (Slack)",
    "@slack_U03XYZ7890:example.org": "Tom Becker (Slack)",
    "@slack_U01QWERTY5:example.org": "Jess Nakamura (Slack)",
    "@slack_U04HJK2LMN:example.org": "Marco Rossi (Slack)",
}
IRC = {
    "@irc_zer0cool:example.org": "zer0cool (IRC)",
    "@irc_tux_lover:example.org": "tux_lover (IRC)",
    "@irc_marisa:example.org": "marisa (IRC)",
    "@irc_kbd:example.org": "kbd (IRC)",
    "@irc_ChanServ:example.org": "ChanServ (IRC)",
}
NAMES = {**LOCAL, **TELEGRAM, **SLACK, **IRC}
NOTICE_ONLY = {"@rssbot:example.org", "@irc_ChanServ:example.org"}

# --------------------------------------------------------------------------- rooms
# Room ids are fixed because registrations/slack.yaml and irc.yaml name some of them.

ROOMS = [
    {
        "id": "!bKzXmTqRwLpYnVcJdA:example.org", "version": "10", "creator": "@alice:example.org",
        "name": "General", "topic": "Company-wide chat. Be nice, keep it mostly on topic 🙂",
        "members": ["@alice:example.org", "@bob:example.org", "@carol:example.org", "@dave:example.org",
                    "@erin:example.org", "@rssbot:example.org", "@telegram_123456789:example.org",
                    "@telegram_930117742:example.org", "@telegram_284719305:example.org",
                    "@slack_U02ABCDE12:example.org", "@slack_U03XYZ7890:example.org"],
        "weight": 16, "mood": "general",
    },
    {
        "id": "!FaMiLyChAtRoOmXyZq:example.org", "version": "10", "creator": "@alice:example.org",
        "name": "Family 🏡", "topic": None,
        "members": ["@alice:example.org", "@bob:example.org", "@telegram_123456789:example.org",
                    "@telegram_284719305:example.org", "@telegram_51872466:example.org",
                    "@telegram_930117742:example.org"],
        "weight": 32, "mood": "family",
    },
    {
        "id": "!QpWnVbXzKfLrTmJsHd:example.org", "version": "10", "creator": "@carol:example.org",
        "name": "#engineering", "topic": "Slack #engineering (acme.slack.com) · deploys Tue/Thu · on-call: see pinned",
        "members": ["@carol:example.org", "@dave:example.org", "@frank:example.org",
                    "@slack_U02ABCDE12:example.org", "@slack_U03XYZ7890:example.org",
                    "@slack_U01QWERTY5:example.org", "@slack_U04HJK2LMN:example.org"],
        "weight": 15, "mood": "eng",
    },
    {
        "id": "!GhYtReWqAsDfZxCvBn:example.org", "version": "10", "creator": "@erin:example.org",
        "name": "#random", "topic": "Slack #random — memes, lunch, cats",
        "members": ["@erin:example.org", "@bob:example.org", "@slack_U02ABCDE12:example.org",
                    "@slack_U01QWERTY5:example.org", "@slack_U04HJK2LMN:example.org"],
        "weight": 8, "mood": "random",
    },
    {
        "id": "!LmKjNhBgVfCdXsZaQw:example.org", "version": "10", "creator": "@dave:example.org",
        "name": "#rust", "topic": "Libera.Chat #rust | Be kind | https://www.rust-lang.org/ | Ask, don't ask to ask",
        "members": ["@dave:example.org", "@frank:example.org", "@irc_zer0cool:example.org",
                    "@irc_tux_lover:example.org", "@irc_marisa:example.org", "@irc_kbd:example.org",
                    "@irc_ChanServ:example.org"],
        "weight": 14, "mood": "rust",
    },
    {
        "id": "!MaTrIxDeVrOoMpQrSt:example.org", "version": "11", "creator": "@frank:example.org",
        "name": "#matrix-dev", "topic": "Libera.Chat #matrix-dev | appservices, bridges and the spec",
        "members": ["@frank:example.org", "@carol:example.org", "@irc_marisa:example.org",
                    "@irc_kbd:example.org", "@irc_tux_lover:example.org"],
        "weight": 9, "mood": "matrix",
    },
    {
        "id": "!BoOkClUbLoCaLoNlYz:example.org", "version": "11", "creator": "@bob:example.org",
        "name": "Book club 📚", "topic": "This month: The Dispossessed (Le Guin)",
        "members": ["@bob:example.org", "@carol:example.org", "@erin:example.org", "@rssbot:example.org"],
        "weight": 6, "mood": "books",
    },
    {
        "id": "!TrEwQaSdFgHjKlPoIu:example.org", "version": "10", "creator": "@dave:example.org",
        "name": "Ops war room", "topic": "Incidents only. Relayed to IRC #example-ops, Telegram and Slack.",
        "members": ["@dave:example.org", "@alice:example.org", "@frank:example.org",
                    "@telegram_51872466:example.org", "@slack_U03XYZ7890:example.org",
                    "@irc_zer0cool:example.org", "@irc_kbd:example.org"],
        "weight": 12, "mood": "ops",
    },
]

# --------------------------------------------------------------------------- text

TEXT = {
    "general": [
        "Morning all! ☀️", "Is the office wifi down for anyone else?", "Reminder: all-hands at 15:00 in the big room and on the call",
        "Thanks for organising the offsite, it was great", "Who took the last oat milk 😤",
        "Heads up, the parking garage is closed tomorrow for cleaning", "Has anyone seen my blue umbrella? Left it near the kitchen",
        "Welcome to the team, Erin! 🎉", "Payroll is out a day early this month because of the holiday",
        "I'll be out Friday, back Monday. Ping Bob for anything urgent.", "Lunch order going in at 12:15, add yours to the sheet",
        "Can someone with admin rights add me to the design calendar?", "The coffee machine is fixed!! ☕",
        "Friendly reminder to submit your expense reports before the 30th. Finance will chase the late ones, and nobody wants that.",
        "For those asking: the all-hands recording will be posted in the wiki by tonight, together with the slides and the Q&A doc.",
        "Does anyone have a spare HDMI-to-USB-C adapter I could borrow for the afternoon?",
    ],
    "family": [
        "Did everyone get home safe?", "Photos from Sunday are in the shared album 📸", "Mum says dinner at 7, not 6!",
        "Can someone pick up bread on the way?", "Happy birthday Olga!!! 🎂🎈", "The cat knocked the plant over again 🙄",
        "I'm stuck in traffic, start without me", "Grandpa learned how to send voice messages. Brace yourselves.",
        "Who's bringing dessert on Saturday?", "Flights booked for the 20th, landing around 14:30",
        "Does anyone remember the wifi password at the cabin?", "Love you all ❤️", "Yusuf's team won the match 4–2 ⚽",
        "Just a reminder that the car needs to go in for its inspection next week, I can drive it Tuesday morning if nobody else can.",
        "Mia, can you send me the recipe for that lentil soup? The one with lemon and cumin. Dmitri keeps asking about it.",
        "Ok so the plan for Saturday: we meet at the station at 10, walk up to the lake, picnic, and then back down before it gets dark.",
    ],
    "eng": [
        "Deploy of api v2.14.0 is rolling out now", "CI is red on main, looking", "Who owns the billing-worker alerts?",
        "PR is up for the rate limiter change, reviews welcome", "Postgres failover test scheduled for Thursday 10:00 UTC",
        "Found it: a flaky test that depends on wall-clock time. Fix incoming.",
        "Can we bump the base image? The current one has the openssl CVE",
        "Reminder: code freeze starts Friday EOD for the release branch",
        "Latency on /search doubled after the last deploy, p99 went from 180ms to 410ms. Rolling back while we investigate.",
        "I think the retry logic in the webhook sender needs jitter, otherwise every client hammers us at the same second after an outage.",
        "The migration took 14 minutes on staging; on prod it should be similar since the table sizes are comparable.",
        "Does anyone know why we pin tokio to 1.38 in the gateway crate?", "LGTM, ship it 🚢",
        "Postmortem doc for Tuesday's outage is in the drive, please add your timeline notes before the review.",
    ],
    "random": [
        "Look at this cat 🐈", "Anyone up for ramen today?", "Mondays, am I right", "The new pizza place is actually good",
        "TIL octopuses have three hearts", "Who's doing the secret santa this year?", "It's snowing!! ❄️",
        "Board games night Thursday? I'll bring Wingspan", "My sourdough starter finally survived a week",
        "Recommend me a podcast for a long drive please, anything but true crime",
        "Someone left a whole cake in the kitchen with a note saying 'please eat me'. I am complying.",
    ],
    "rust": [
        "how do I return an iterator from a trait method without boxing?", "have you tried `impl Trait` in the return position?",
        "borrowck says my closure outlives the function, but it doesn't?", "use `move` and clone the Arc before the closure",
        "cargo build takes forever on my laptop, any tips?", "try `mold` as the linker, and `cargo check` while iterating",
        "is there a crate for parsing YAML that isn't deprecated?", "serde-saphyr is pure Rust and maintained",
        "why does `Vec<&str>` not implement `From<Vec<String>>`?", "what's the difference between `Rc<RefCell<T>>` and `Arc<Mutex<T>>`?",
        "rustc 1.95 is out, the release notes look nice", "async closures finally being stable is huge",
        "the error says `expected type parameter T, found &str`; you need a concrete type there or a generic bound on the caller",
        "tokio::select! drops the losing futures, so if one of them holds a partially read frame you lose it. Use a cancel-safe read.",
        "`cargo tree -d` shows duplicate versions, usually that's the first thing to look at when the build is slow",
    ],
    "matrix": [
        "does anyone know if synapse retries appservice transactions with the same txn id?",
        "yes, it stores the txn and resends the oldest one with exponential backoff",
        "the spec says the AS must dedupe on txnId, but some SDKs only remember the last one",
        "matrix-appservice-node only keeps lastProcessedTxnId, mautrix keeps a set",
        "ephemeral events are not persisted by synapse so they aren't retried", "MSC2409 is merged into the spec as `ephemeral`",
        "bridges should answer 200 fast and process async, otherwise the HS backs off",
        "room version 11 moves `redacts` into the content, remember to read both",
        "is there a test suite for appservices like complement but for the AS side?",
        "I wrote a small fake homeserver that replays a jsonl of events into an AS, works surprisingly well",
        "Reminder that 401 vs 403 for a bad hs_token differs between SDKs, don't rely on it",
    ],
    "books": [
        "Halfway through, Shevek is such an interesting character", "I love how the chapters alternate between the two worlds",
        "Next month's pick: vote in the poll!", "Can we meet on the 12th instead of the 10th?",
        "The part about the wall at the spaceport is such a good opening image",
        "I'm not convinced Anarres is the utopia it's made out to be, which I think is the point of the subtitle",
        "Bringing snacks. Someone else bring tea please 🫖",
    ],
    "ops": [
        "🚨 Pager: api-gateway 5xx rate above 5% for 5m", "ack, looking", "Looks like the db connection pool is exhausted",
        "Scaling the pool from 50 to 80 as a stopgap", "Errors dropping, 5xx back under 1%",
        "Root cause: a batch job opened a connection per row instead of reusing the pool",
        "I'll write the incident summary, ETA 30 min", "Status page updated: investigating → monitoring",
        "Disk on db-replica-2 at 91%, rotating old WAL archives", "False alarm, the synthetic check itself was broken",
        "Incident closed. Thanks everyone for jumping on this so quickly on a Sunday night, much appreciated 🙏",
        "Timeline so far: 21:04 first alert, 21:06 ack, 21:15 pool exhaustion identified, 21:22 mitigation applied, 21:30 recovered.",
    ],
}
EMOTES = ["waves 👋", "is grabbing a coffee ☕", "facepalms", "nods", "is back", "goes to lunch", "high-fives everyone",
          "sighs at the build", "is on a train, connection may be spotty", "cheers 🎉"]
REACTION_KEYS = ["👍", "❤️", "😂", "🎉", "👀", "🙏", "✅", "😮", "🔥", "+1"]
TYPOS = [
    ("teh deploy is done", "the deploy is done"), ("see you tomorow", "see you tomorrow"),
    ("can you reveiw my PR?", "can you review my PR?"), ("I'll be there at 6", "I'll be there at 7"),
    ("recieved, thanks", "received, thanks"), ("the meeting is on Tuseday", "the meeting is on Tuesday"),
    ("its fixed now", "it's fixed now"), ("who has the keys to the storage rom?", "who has the keys to the storage room?"),
]
REPLIES = ["+1", "agreed", "good point", "thanks!", "on it", "haha yes", "not sure about that",
           "can you say more?", "👍 will do", "same here", "I'll check and get back to you",
           "that's what I thought too, but the numbers say otherwise",
           "yes, and we should write it down somewhere so we don't have to rediscover it next time"]
REDACT_REASONS = ["Spam", "wrong room", "posted by mistake", "contained a password", "Duplicate"]
FEEDS = [
    ("This Week in Matrix 2025-11-21", "https://matrix.org/blog/2025/11/21/this-week-in-matrix-2025-11-21/"),
    ("Rust 1.95.0 released", "https://blog.rust-lang.org/2025/11/20/Rust-1.95.0/"),
    ("Synapse 1.142 released", "https://matrix.org/blog/2025/11/18/synapse-1-142-released/"),
    ("Postgres 18.1 minor release", "https://www.postgresql.org/about/news/postgresql-181-released/"),
    ("Why we moved our queue to SQLite", "https://example.com/blog/sqlite-queue"),
]
CHANSERV = [
    "[#rust] Welcome to #rust! Please read the channel guidelines at https://www.rust-lang.org/policies/code-of-conduct",
    "[#rust] This channel is logged. Use the playground for long code samples: https://play.rust-lang.org/",
]


def esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def markdownish(body: str) -> str | None:
    """HTML for bodies that a client would render: `code`, links. None when plain."""
    html = esc(body)
    changed = False
    if "`" in html:
        parts = html.split("`")
        if len(parts) % 2 == 1:
            html = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
            changed = True
    urls = re.findall(r"https?://[^\s|]+", html)
    for url in dict.fromkeys(urls):
        html = html.replace(url, f'<a href="{url}">{url}</a>')
        changed = True
    return html if changed else None


class Generator:
    def __init__(self) -> None:
        self.rng = random.Random(SEED)
        self.ts = START_TS
        self.events: list[dict] = []
        self.state: dict[tuple[str, str, str], dict] = {}  # (room, type, state_key) -> event
        self.joined: dict[str, list[str]] = {r["id"]: [] for r in ROOMS}
        self.recent: dict[str, list[dict]] = {r["id"]: [] for r in ROOMS}  # messages and reactions
        self.pending_edits: list[tuple[int, dict, str]] = []  # (due index, original, corrected)
        self.redacted: set[str] = set()
        self.room_by_id = {r["id"]: r for r in ROOMS}

    # ---- primitives

    def event_id(self) -> str:
        return "$" + base64.urlsafe_b64encode(self.rng.randbytes(32)).decode().rstrip("=")

    def mxc(self) -> str:
        letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        return f"mxc://{SERVER}/" + "".join(self.rng.choice(letters) for _ in range(24))

    def tick(self, lo: int = 300, hi: int = 45000) -> int:
        self.ts += self.rng.randint(lo, hi)
        return self.ts

    def emit(self, room: str, sender: str, etype: str, content: dict, state_key: str | None = None,
             extra: dict | None = None, gap: tuple[int, int] = (300, 45000)) -> dict:
        ev: dict = {"type": etype, "event_id": self.event_id(), "room_id": room, "sender": sender,
                    "origin_server_ts": self.tick(*gap), "content": content}
        if extra:
            ev.update(extra)
        unsigned: dict = {"age": self.rng.randint(12, 900)}
        if state_key is not None:
            ev["state_key"] = state_key
            prev = self.state.get((room, etype, state_key))
            if prev is not None:
                unsigned["replaces_state"] = prev["event_id"]
                unsigned["prev_content"] = prev["content"]
                unsigned["prev_sender"] = prev["sender"]
            self.state[(room, etype, state_key)] = ev
        ev["unsigned"] = unsigned
        self.events.append(ev)
        return ev

    def member(self, room: str, sender: str, target: str, membership: str, reason: str | None = None) -> dict:
        content: dict = {"membership": membership}
        if membership in ("join", "invite"):
            content["displayname"] = NAMES[target]
            if membership == "join" or self.rng.random() < 0.5:
                content["avatar_url"] = self.mxc()
        if reason:
            content["reason"] = reason
        ev = self.emit(room, sender, "m.room.member", content, state_key=target, gap=(200, 8000))
        if membership == "join" and target not in self.joined[room]:
            self.joined[room].append(target)
        if membership in ("leave", "ban") and target in self.joined[room]:
            self.joined[room].remove(target)
        return ev

    # ---- room setup

    def create_room(self, r: dict) -> None:
        room, creator = r["id"], r["creator"]
        content: dict = {"room_version": r["version"]}
        if r["version"] == "10":
            content = {"creator": creator, "room_version": "10"}
        if r["mood"] in ("general", "books"):
            content["m.federate"] = False
        self.emit(room, creator, "m.room.create", content, state_key="", gap=(1000, 60000))
        self.member(room, creator, creator, "join")
        users = {creator: 100}
        for m in r["members"]:
            if m != creator and m in LOCAL and m != "@rssbot:example.org" and self.rng.random() < 0.4:
                users[m] = 50
        self.emit(room, creator, "m.room.power_levels", {
            "users": users, "users_default": 0,
            "events": {"m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                       "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                       "m.room.server_acl": 100, "m.room.encryption": 100},
            "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
            "historical": 100, "notifications": {"room": 50},
        }, state_key="", gap=(50, 400))
        join_rule = "invite" if r["mood"] in ("family", "books", "ops") else "public"
        self.emit(room, creator, "m.room.join_rules", {"join_rule": join_rule}, state_key="", gap=(50, 400))
        self.emit(room, creator, "m.room.name", {"name": r["name"]}, state_key="", gap=(50, 400))
        if r["topic"]:
            self.emit(room, creator, "m.room.topic", {"topic": r["topic"]}, state_key="", gap=(50, 400))
        for m in r["members"]:
            if m == creator:
                continue
            if join_rule == "invite" or self.rng.random() < 0.3:
                self.member(room, creator, m, "invite")
            self.member(room, m, m, "join")

    # ---- activity

    def pick_room(self) -> dict:
        return self.rng.choices(ROOMS, weights=[r["weight"] for r in ROOMS])[0]

    def pick_sender(self, room: str, talkers_only: bool = True) -> str | None:
        people = [m for m in self.joined[room] if not (talkers_only and m in NOTICE_ONLY)]
        if not people:
            return None
        weights = [4 if (m in TELEGRAM or m in SLACK or m in IRC) else 2 for m in people]
        return self.rng.choices(people, weights=weights)[0]

    def text(self, room: str, sender: str, body: str, msgtype: str = "m.text") -> dict:
        content: dict = {"msgtype": msgtype, "body": body}
        html = markdownish(body)
        if html is not None:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = html
        if msgtype != "m.notice":
            content["m.mentions"] = {}
        ev = self.emit(room, sender, "m.room.message", content)
        self.recent[room].append(ev)
        return ev

    def reply(self, room: str, sender: str) -> dict | None:
        targets = [e for e in self.recent[room][-12:] if e["type"] == "m.room.message"
                   and e["sender"] != sender and e["event_id"] not in self.redacted
                   and "m.new_content" not in e["content"]]
        if not targets:
            return None
        orig = self.rng.choice(targets)
        answer = self.rng.choice(REPLIES)
        quoted = orig["content"]["body"].split("\n")[0]
        if orig["content"]["msgtype"] == "m.image":
            quoted = "sent an image."
        body = f"> <{orig['sender']}> {quoted}\n\n{answer}"
        link = f"https://matrix.to/#/{room}/{orig['event_id']}?via={SERVER}"
        html = (f'<mx-reply><blockquote><a href="{link}">In reply to</a> '
                f'<a href="https://matrix.to/#/{orig["sender"]}">{orig["sender"]}</a><br>{esc(quoted)}'
                f'</blockquote></mx-reply>{esc(answer)}')
        content = {"msgtype": "m.text", "body": body, "format": "org.matrix.custom.html", "formatted_body": html,
                   "m.relates_to": {"m.in_reply_to": {"event_id": orig["event_id"]}},
                   "m.mentions": {"user_ids": [orig["sender"]]}}
        ev = self.emit(room, sender, "m.room.message", content)
        self.recent[room].append(ev)
        return ev

    def edit(self, orig: dict, corrected: str) -> dict:
        room = orig["room_id"]
        content = {"msgtype": "m.text", "body": f"* {corrected}",
                   "m.new_content": {"msgtype": "m.text", "body": corrected, "m.mentions": {}},
                   "m.mentions": {},
                   "m.relates_to": {"rel_type": "m.replace", "event_id": orig["event_id"]}}
        return self.emit(room, orig["sender"], "m.room.message", content, gap=(2000, 40000))

    def reaction(self, room: str, sender: str) -> dict | None:
        targets = [e for e in self.recent[room][-10:] if e["type"] == "m.room.message"
                   and e["event_id"] not in self.redacted and "m.new_content" not in e["content"]]
        if not targets:
            return None
        orig = self.rng.choice(targets)
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": orig["event_id"],
                                    "key": self.rng.choice(REACTION_KEYS)}}
        ev = self.emit(room, sender, "m.reaction", content, gap=(300, 20000))
        self.recent[room].append(ev)
        return ev

    def redaction(self, room: str) -> dict | None:
        targets = [e for e in self.recent[room][-15:] if e["event_id"] not in self.redacted
                   and e["sender"] in self.joined[room]]
        if not targets:
            return None
        orig = self.rng.choice(targets)
        creator = self.room_by_id[room]["creator"]
        sender = orig["sender"] if self.rng.random() < 0.7 or creator not in self.joined[room] else creator
        content: dict = {}
        if sender != orig["sender"] or self.rng.random() < 0.4:
            content["reason"] = self.rng.choice(REDACT_REASONS)
        if self.room_by_id[room]["version"] == "11":
            content["redacts"] = orig["event_id"]
        self.redacted.add(orig["event_id"])
        return self.emit(room, sender, "m.room.redaction", content, extra={"redacts": orig["event_id"]})

    def image(self, room: str, sender: str) -> dict:
        w, h = self.rng.choice([(1280, 960), (960, 1280), (1600, 1200), (800, 600)])
        name = f"IMG_{self.rng.randint(1000, 9999)}.jpg"
        content = {"msgtype": "m.image", "body": name, "url": self.mxc(),
                   "info": {"mimetype": "image/jpeg", "size": self.rng.randint(80_000, 2_400_000), "w": w, "h": h,
                            "thumbnail_url": self.mxc(),
                            "thumbnail_info": {"mimetype": "image/jpeg", "size": self.rng.randint(9_000, 60_000),
                                               "w": w // 4, "h": h // 4}},
                   "m.mentions": {}}
        ev = self.emit(room, sender, "m.room.message", content)
        self.recent[room].append(ev)
        return ev

    def notice(self, room: str) -> dict | None:
        mood = self.room_by_id[room]["mood"]
        if mood in ("general", "books") and "@rssbot:example.org" in self.joined[room]:
            title, url = self.rng.choice(FEEDS)
            content = {"msgtype": "m.notice", "body": f"📰 {title}\n{url}", "format": "org.matrix.custom.html",
                       "formatted_body": f'📰 <b>{esc(title)}</b><br><a href="{url}">{url}</a>'}
            ev = self.emit(room, "@rssbot:example.org", "m.room.message", content)
        elif mood == "rust" and "@irc_ChanServ:example.org" in self.joined[room]:
            ev = self.text(room, "@irc_ChanServ:example.org", self.rng.choice(CHANSERV), "m.notice")
            return ev
        else:
            sender = self.pick_sender(room)
            if sender is None:
                return None
            body = self.rng.choice(["(automated) build #%d passed ✅" % self.rng.randint(4000, 9000),
                                    "(automated) reminder: stand-up in 5 minutes",
                                    "(automated) out of office until Monday"])
            ev = self.emit(room, sender, "m.room.message", {"msgtype": "m.notice", "body": body})
        self.recent[room].append(ev)
        return ev

    def churn(self, room: str) -> dict | None:
        r = self.room_by_id[room]
        outside = [m for m in NAMES if m not in self.joined[room] and m not in NOTICE_ONLY]
        leavers = [m for m in self.joined[room] if m != r["creator"] and m not in NOTICE_ONLY]
        if leavers and (self.rng.random() < 0.5 or not outside):
            who = self.rng.choice(leavers)
            if self.rng.random() < 0.2 and r["creator"] in self.joined[room]:
                return self.member(room, r["creator"], who, "leave", reason="inactive")  # a kick
            return self.member(room, who, who, "leave")
        if outside:
            who = self.rng.choice(outside)
            inviter = self.pick_sender(room) or r["creator"]
            self.member(room, inviter, who, "invite")
            return self.member(room, who, who, "join")
        return None

    def retopic(self, room: str) -> dict | None:
        sender = self.pick_sender(room)
        if sender is None:
            return None
        r = self.room_by_id[room]
        if self.rng.random() < 0.7:
            base = r["topic"] or "Family stuff"
            topic = base + self.rng.choice([" · updated", " | next meetup: Saturday", " | no spoilers please",
                                            " · status: all good ✅"])
            return self.emit(room, sender, "m.room.topic", {"topic": topic}, state_key="")
        name = r["name"] + self.rng.choice([" (archive soon)", " 🎄", " ✨"])
        return self.emit(room, sender, "m.room.name", {"name": name}, state_key="")

    def step(self) -> None:
        # due edits first
        for i, (due, orig, corrected) in enumerate(self.pending_edits):
            if orig["event_id"] in self.redacted:
                self.pending_edits.pop(i)
                break
            if due <= len(self.events) and orig["sender"] in self.joined[orig["room_id"]]:
                self.pending_edits.pop(i)
                self.edit(orig, corrected)
                return
        r = self.pick_room()
        room = r["id"]
        roll = self.rng.random()
        sender = self.pick_sender(room)
        if sender is None:
            return
        if roll < 0.50:
            if self.rng.random() < 0.07:
                typo, corrected = self.rng.choice(TYPOS)
                ev = self.text(room, sender, typo)
                self.pending_edits.append((len(self.events) + self.rng.randint(1, 4), ev, corrected))
            else:
                self.text(room, sender, self.rng.choice(TEXT[r["mood"]]))
        elif roll < 0.62:
            self.reply(room, sender)
        elif roll < 0.78:
            self.reaction(room, sender)
        elif roll < 0.82:
            self.emit_emote(room, sender)
        elif roll < 0.86:
            self.notice(room)
        elif roll < 0.89:
            self.redaction(room)
        elif roll < 0.92:
            self.image(room, sender)
        elif roll < 0.975:
            self.churn(room)
        else:
            self.retopic(room)

    def emit_emote(self, room: str, sender: str) -> None:
        ev = self.emit(room, sender, "m.room.message", {"msgtype": "m.emote", "body": self.rng.choice(EMOTES)})
        self.recent[room].append(ev)

    def run(self) -> list[dict]:
        for r in ROOMS:
            self.create_room(r)
        while len(self.events) < N_EVENTS:
            self.step()
        return self.events[:N_EVENTS]


def dump(ev: dict) -> str:
    return json.dumps(ev, ensure_ascii=False, separators=(",", ":"))


def check_shapes(events: list[dict]) -> None:
    """Fails loudly if an event breaks the rules the demo promises."""
    id_re = re.compile(r"^\$[A-Za-z0-9_-]{43}$")
    seen = set()
    last_ts = 0
    for ev in events:
        size = len(dump(ev).encode())
        assert 200 <= size <= 1500, (size, ev)
        assert id_re.match(ev["event_id"]), ev
        assert ev["event_id"] not in seen
        seen.add(ev["event_id"])
        assert ev["origin_server_ts"] > last_ts
        last_ts = ev["origin_server_ts"]
        is_state = ev["type"] in ("m.room.create", "m.room.member", "m.room.name", "m.room.topic",
                                  "m.room.power_levels", "m.room.join_rules")
        assert ("state_key" in ev) == is_state, ev


def interest(events: list[dict]) -> None:
    import yaml  # only for --check

    regs = []
    for path in sorted((HERE / "registrations").glob("*.yaml")):
        reg = yaml.safe_load(path.read_text())
        users = [re.compile(ns["regex"]) for ns in reg["namespaces"].get("users") or []]
        rooms = [re.compile(ns["regex"]) for ns in reg["namespaces"].get("rooms") or []]
        regs.append((reg["id"], f"@{reg['sender_localpart']}:{SERVER}", users, rooms))

    def wants(users, rooms, own, ev, match) -> bool:
        def user_ok(u: str) -> bool:
            return u == own or any(match(rx, u) for rx in users)
        if user_ok(ev["sender"]):
            return True
        if ev["type"] == "m.room.member" and user_ok(ev["state_key"]):
            return True
        return any(match(rx, ev["room_id"]) for rx in rooms)

    full = lambda rx, s: rx.fullmatch(s) is not None  # noqa: E731  (what the host does)
    prefix = lambda rx, s: rx.match(s) is not None  # noqa: E731  (what Synapse does)
    counts = {rid: 0 for rid, *_ in regs}
    by_n = {}
    for ev in events:
        got = [rid for rid, own, u, r in regs if wants(u, r, own, ev, full)]
        assert got == [rid for rid, own, u, r in regs if wants(u, r, own, ev, prefix)]
        for rid, own, *_ in regs:
            assert own not in (ev["sender"], ev.get("state_key")), ev  # no bot traffic
        for rid in got:
            counts[rid] += 1
        by_n[len(got)] = by_n.get(len(got), 0) + 1
    sizes = [len(dump(e).encode()) for e in events]
    types: dict[str, int] = {}
    for e in events:
        key = e["type"] + (f"/{e['content'].get('msgtype')}" if e["type"] == "m.room.message" else "")
        types[key] = types.get(key, 0) + 1
    print(f"{len(events)} events in {len({e['room_id'] for e in events})} rooms, "
          f"{sum(sizes)} bytes, sizes {min(sizes)}..{max(sizes)}")
    print("per appservice:", ", ".join(f"{k}={v}" for k, v in counts.items()))
    print("events by number of interested appservices:", dict(sorted(by_n.items())))
    print("types:", dict(sorted(types.items())))
    for rid, n in counts.items():
        assert n >= 150, (rid, n)
    assert by_n.get(2, 0) + by_n.get(3, 0) > 0


def main() -> None:
    events = Generator().run()
    check_shapes(events)
    OUT.write_text("".join(dump(e) + "\n" for e in events), encoding="utf-8")
    if "--check" in sys.argv[1:]:
        interest(events)


if __name__ == "__main__":
    main()
