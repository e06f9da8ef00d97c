"""The media cache: local media uploaded once per content hash."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiosqlite

from daemon.store.base import MediaId, Row, StoreBase, _plain


class MediaRows(StoreBase):
    """Uploaded media and the media an input referred to at validation."""

    async def get_media(self, sha256: str) -> Row | None:
        return await self.fetchone("SELECT * FROM media WHERE sha256 = ?", (sha256,))

    async def put_media(self, **fields: Any) -> None:
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        async with self.tx() as conn:
            await conn.execute(
                f"INSERT OR REPLACE INTO media ({cols}) VALUES ({marks})",
                tuple(_plain(v) for v in fields.values()),
            )

    async def add_input_media(
        self, conn: aiosqlite.Connection, input_id: str, ids: Mapping[str, MediaId]
    ) -> None:
        """Record (in the caller's transaction) the file each media name was at validation."""
        await conn.executemany(
            "INSERT OR REPLACE INTO input_media (input_id, name, dev, ino, size, mtime_ns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(input_id, name, *ident) for name, ident in ids.items()],
        )

    async def input_media(self, input_id: str) -> dict[str, MediaId]:
        """Media name → (device, inode, size, mtime_ns) recorded at the input's validation."""
        rows = await self.fetchall(
            "SELECT name, dev, ino, size, mtime_ns FROM input_media WHERE input_id = ?",
            (input_id,),
        )
        return {r["name"]: (r["dev"], r["ino"], r["size"], r["mtime_ns"]) for r in rows}
