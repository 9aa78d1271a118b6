"""Stored responses of the Responses API, in SQLite, so that `previous_response_id`
survives a restart and works across servers that share a state directory.

One row per response stored with `store: true`: the response object as the API returns
it, the input items of its request (with their ids), and the response it continued.
That is all the API says is stored; nothing of the HTTP request. The database is in
WAL mode with a busy timeout, so several servers may write to it at once. Every call
runs on one thread of the store's own, never on the event loop. Past `max_responses`
the oldest are forgotten.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import platformdirs

from gptserve.config import ServerConfig

T = TypeVar("T")
DB_NAME = "responses.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    previous_response_id TEXT,
    response TEXT NOT NULL,     -- the response object, as JSON
    input_items TEXT NOT NULL   -- its request's input items, as a JSON list
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
"""


class ConversationBrokenError(LookupError):
    """A response earlier in a conversation is gone (deleted, or past the retention limit)."""

    def __init__(self, response_id: str):
        super().__init__(response_id)
        self.response_id = response_id


@dataclass
class StoredResponse:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_response_id: str | None


class ResponseStore:
    def __init__(self, state_dir: Path, max_responses: int):
        self.path = Path(state_dir) / DB_NAME
        self.max_responses = max_responses
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="response-store")
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA)
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(self._connect()))

    async def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Stores (or replaces) a response; then forgets the oldest past the limit."""
        row = (response["id"], response["created_at"], response.get("previous_response_id"),
               json.dumps(response), json.dumps(input_items))

        def put(db: sqlite3.Connection) -> None:
            with db:
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)", row)
                db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses "
                           "ORDER BY created_at DESC LIMIT -1 OFFSET ?)", (self.max_responses,))

        await self._run(put)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._run(lambda db: _get(db, response_id))

    async def delete(self, response_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

        return await self._run(delete)

    async def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation that ends with `response_id`, oldest first: each
        response's input items, then its output. None if `response_id` is not stored;
        ConversationBrokenError if one before it is gone."""

        def walk(db: sqlite3.Connection) -> list[dict[str, Any]] | None:
            turns: list[list[dict[str, Any]]] = []
            next_id: str | None = response_id
            while next_id is not None:
                stored = _get(db, next_id)
                if stored is None:
                    if next_id == response_id:
                        return None
                    raise ConversationBrokenError(next_id)
                turns.append(stored.input_items + stored.response["output"])
                next_id = stored.previous_response_id
            return [item for turn in reversed(turns) for item in turn]

        return await self._run(walk)

    def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        self._executor.submit(close).result()
        self._executor.shutdown()


def _get(db: sqlite3.Connection, response_id: str) -> StoredResponse | None:
    row = db.execute("SELECT response, input_items, previous_response_id FROM responses WHERE id = ?",
                     (response_id,)).fetchone()
    if row is None:
        return None
    return StoredResponse(json.loads(row[0]), json.loads(row[1]), row[2])


def open_store(config: ServerConfig) -> ResponseStore | None:
    """The server's store, under --state-dir (or the user's state directory); None with --no-store."""
    if not config.store_responses:
        return None
    state_dir = Path(config.state_dir) if config.state_dir else platformdirs.user_state_path("gptserve")
    return ResponseStore(state_dir, config.max_stored_responses)
