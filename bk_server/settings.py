"""What a bk_server instance is configured with, and where it keeps its files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect_branchkey.bk_blocks.archive import DEFAULT_MAX_DECOMPRESSED_BYTES


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one server; every limit is here so tests and operators can tune it.

    `extensions` adds what the official platform does not send (the open round and latest
    aggregation in run details, the round in upload replies and notices, error codes) and
    honours what it ignores (an upload's `x-bk-round`, metrics' Idempotency-Key); without
    them the server answers exactly as the protocol's official platform does.
    """

    data_dir: Path
    amqp_url: str | None = None
    rabbitmq_admin_url: str | None = None
    max_upload_bytes: int = 4 * 1024**3
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
    download_url_ttl_s: float = 300.0
    ws_ticket_ttl_s: float = 30.0
    deadline_check_interval_s: float = 1.0
    public_url: str | None = field(default=None)
    extensions: bool = True

    @property
    def database(self) -> Path:
        return self.data_dir / "bk_server.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "files" / "uploads"

    @property
    def aggregates_dir(self) -> Path:
        return self.data_dir / "files" / "aggregates"

    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def admin_file(self) -> Path:
        return self.data_dir / "admin.json"

    @property
    def signing_key_file(self) -> Path:
        return self.data_dir / "signing.key"

    def make_dirs(self) -> None:
        """Create the data dir tree (owner-only: it holds tokens and updates)."""
        for path in (self.data_dir, self.uploads_dir, self.aggregates_dir, self.incoming_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
