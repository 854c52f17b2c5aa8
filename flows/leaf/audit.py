"""The audit trail: every payload that left the site or arrived, one hash-chained entry per line.

`work_dir/audit/trail.jsonl` is append-only. Each line is one entry in canonical JSON (sorted
keys, no spaces): `seq` (1, 2, ...), `at` (UTC), `kind` (`upload`, `metrics`, `statistics`,
`download`, `acknowledgement`), `step` (`sending`, `confirmed`, `refused`, `received`, `sealed`), `key` (the
payload's idempotency key or aggregation id), `facts`, `prev` and `hash`. Invariants:

- `hash` is the SHA-256 of the entry's canonical JSON without `hash`; `prev` is the previous
  entry's `hash` (64 zeros for the first). An edited value, a removed or reordered line and a cut
  last line each break one of these, and `verify_trail` names the first entry that does.
- An outgoing payload's `sending` entry is on disk (fsynced) before its first byte leaves, its
  `confirmed` entry after the platform accepted it (`refused` when it said no). Entries are keyed, and a key's step is
  written once: a process killed between the two leaves the `sending` entry alone, and the
  rerun adds only the confirmation. An accepted payload is therefore never missing.
- A broken trail is never appended to: the step fails with `AuditTrailBrokenError` until an
  operator reviews it and runs `bk audit acknowledge`, which appends an `acknowledgement` entry
  whose `prev` is the SHA-256 of every byte before it. It accepts exactly the break that is
  there; any later change to those bytes breaks the trail again.
- No secret enters the trail: destinations are URLs without user info or query, and facts are
  names, shapes, dtypes, digests, sizes and numbers.

The chain proves the trail was not edited after the fact only together with a head hash kept
elsewhere: each round's history row and the run's summary artifact in Prefect carry the head,
and `bk audit verify --head HASH` checks the trail still holds that entry with an intact chain
up to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect_branchkey.bk_blocks.analytics import inspect_analytics
from prefect_branchkey.bk_blocks.archive import inspect_update
from prefect_branchkey.bk_blocks.errors import BranchKeyError
from prefect_branchkey.bk_blocks.files import exclusively, sha256_file
from prefect_branchkey.tasks.session import LeafSession

AUDIT_DIR = "audit"
TRAIL = "trail.jsonl"
LOCK = ".lock"
GENESIS = "0" * 64
KINDS = ("upload", "metrics", "statistics", "download", "acknowledgement")
STEPS = ("sending", "confirmed", "refused", "received", "sealed")
FIELDS = ("seq", "at", "kind", "step", "key", "facts", "prev", "hash")


class AuditTrailError(BranchKeyError, ValueError):
    """The audit trail cannot be read or written as asked (e.g. acknowledging an intact trail)."""


class AuditTrailBrokenError(AuditTrailError):
    """The trail's chain is broken; nothing is appended to it until an operator acknowledges it."""


@dataclass(frozen=True)
class Break:
    """Where the chain breaks: the line (1-based), the entry's `seq` when it could be read, and why."""

    line: int
    seq: int | None
    problem: str

    def __str__(self) -> str:
        entry = f"entry {self.seq} (line {self.line})" if self.seq is not None else f"line {self.line}"
        return f"{entry}: {self.problem}"


@dataclass
class Verification:
    """What reading the whole trail found: its length and head, the payloads sent but never
    confirmed, the breaks an operator acknowledged, and the first break nobody did (if any)."""

    entries: int = 0
    head: str | None = None
    next_seq: int = 1
    unconfirmed: list[str] = field(default_factory=list)
    acknowledged: list[tuple[str, str]] = field(default_factory=list)  # (the break as sealed, the reason)
    problem: Break | None = None
    bytes: int = 0
    hashes: set[str] = field(default_factory=set)
    steps: set[tuple[str, str, str]] = field(default_factory=set)

    @property
    def intact(self) -> bool:
        return self.problem is None


def trail_path(work_dir: Path) -> Path:
    """The leaf's audit trail file."""
    return Path(work_dir) / AUDIT_DIR / TRAIL


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The SHA-256 of an entry's canonical JSON, `hash` left out."""
    body = {name: value for name, value in entry.items() if name != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def public_url(url: str) -> str:
    """A destination as the trail records it: scheme, host, port and path, never user info or a query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc, query="", fragment="").geturl()


def verify_trail(work_dir: Path) -> Verification:
    """Read the whole trail and check its chain; an absent trail is intact and empty."""
    path = trail_path(work_dir)
    data = path.read_bytes() if path.exists() else b""
    return _walk(data)


def _split_lines(data: bytes) -> list[bytes]:
    """The trail's lines, each with its end of line (the last one may lack it: cut short)."""
    lines = data.split(b"\n")
    return [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def _parse(line: bytes) -> dict[str, Any] | None:
    """An entry from its line, or None when the line is not a complete entry."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or set(entry) != set(FIELDS) or not isinstance(entry["seq"], int):
        return None
    return entry


def _walk(data: bytes) -> Verification:
    """Check every line in order (see the module docstring for what each check catches)."""
    result = Verification(bytes=len(data))
    lines = _split_lines(data)
    entries = [_parse(line) for line in lines]
    later_seqs = _seqs_after(entries)
    prefix = hashlib.sha256()
    prev = GENESIS
    for index, (line, entry) in enumerate(zip(lines, entries, strict=True)):
        before = prefix.hexdigest()
        prefix.update(line)
        if result.problem is not None:
            if entry is not None and _seals(entry, before, line):
                result.acknowledged.append((str(entry["facts"].get("break", result.problem)),
                                            str(entry["facts"].get("reason", ""))))
                result.problem = None
                prev = _accept(result, entry)
            continue
        problem = _check(index + 1, line, entry, result.next_seq, prev, before, later_seqs[index])
        if problem is not None:
            result.problem = problem
            continue
        assert entry is not None
        prev = _accept(result, entry)
    return result


def _seqs_after(entries: list[dict[str, Any] | None]) -> list[set[int]]:
    """For each line, the `seq` values of the readable entries after it (to tell a reordered entry
    from a removed one)."""
    after: list[set[int]] = []
    seen: set[int] = set()
    for entry in reversed(entries):
        after.append(set(seen))
        if entry is not None:
            seen.add(entry["seq"])
    return after[::-1]


def _check(number: int, line: bytes, entry: dict[str, Any] | None, expected: int, prev: str, before: str,
           later: set[int]) -> Break | None:
    """The break at this line, if any."""
    if not line.endswith(b"\n"):
        return Break(number, entry["seq"] if entry else None, "the last line is cut short (truncated): no end of line")
    if entry is None:
        return Break(number, None, "not a complete audit entry (corrupted or edited)")
    seq = entry["seq"]
    if entry_hash(entry) != entry["hash"]:
        return Break(number, seq, "edited: its content does not match its hash")
    if entry["kind"] == "acknowledgement":
        return None if seq >= expected and _seals(entry, before, line) else Break(
            number, seq, "an acknowledgement that does not seal the bytes before it (moved or edited)")
    if seq != expected:
        if expected in later:
            return Break(number, seq, f"reordered: entry {expected} should come here, and comes later")
        if seq > expected:
            missing = f"entry {expected}" if seq == expected + 1 else f"entries {expected} to {seq - 1}"
            return Break(number, seq, f"{missing} removed before it")
        return Break(number, seq, f"reordered or repeated: entry {seq} already came before entry {expected - 1}")
    if entry["prev"] != prev:
        return Break(number - 1, seq - 1, f"edited and its hash recomputed: entry {seq} names another hash before it")
    return None


def _seals(entry: dict[str, Any], before: str, line: bytes) -> bool:
    """Whether `entry` is an intact acknowledgement of exactly the bytes before it."""
    return (entry["kind"] == "acknowledgement" and entry["prev"] == before and line.endswith(b"\n")
            and entry_hash(entry) == entry["hash"])


def _accept(result: Verification, entry: dict[str, Any]) -> str:
    """Count a good entry in `result`; return its hash, the next entry's `prev`."""
    result.entries += 1
    result.head = entry["hash"]
    result.next_seq = entry["seq"] + 1
    result.hashes.add(entry["hash"])
    step = (entry["kind"], entry["step"], entry["key"] or "")
    result.steps.add(step)
    if entry["step"] == "sending":
        result.unconfirmed.append(entry["key"])
    elif entry["step"] in ("confirmed", "refused") and entry["key"] in result.unconfirmed:
        result.unconfirmed.remove(entry["key"])
    return str(entry["hash"])


class AuditTrail:
    """A leaf's trail for appending: `sending` before a payload leaves, `confirmed` after the platform
    took it, `received` for what arrived. Each appends (fsynced) at most once per (kind, step, key);
    the whole trail is verified when this process first appends, and again whenever another
    process changed the file since this one last wrote it."""

    _known: dict[Path, tuple[tuple[int, int, int], Verification]] = {}  # noqa: RUF012 -- one per process, on purpose

    def __init__(self, work_dir: Path) -> None:
        self.path = trail_path(work_dir)

    @property
    def head(self) -> str | None:
        """The hash of the trail's last entry (None for an empty trail); raises when it is broken."""
        with self._locked() as state:
            return state.head

    def sending(self, kind: str, key: str, facts: Mapping[str, Any]) -> str:
        """Record a payload about to leave (before its first byte does); return the trail's head."""
        return self._append(kind, "sending", key, facts)

    def confirmed(self, kind: str, key: str, facts: Mapping[str, Any] | None = None) -> str:
        """Record that the platform accepted the payload sent under `key`; return the trail's head."""
        return self._append(kind, "confirmed", key, facts or {})

    def refused(self, kind: str, key: str, error: BaseException) -> str:
        """Record that the platform refused the payload sent under `key`, and why."""
        return self._append(kind, "refused", key, {"error": f"{type(error).__name__}: {error}"})

    def received(self, kind: str, key: str, facts: Mapping[str, Any]) -> str:
        """Record a payload that arrived from the platform; return the trail's head."""
        return self._append(kind, "received", key, facts)

    def _append(self, kind: str, step: str, key: str, facts: Mapping[str, Any]) -> str:
        """Append the entry unless this key's step is already there; return the trail's head."""
        if kind not in KINDS or step not in STEPS:
            raise AuditTrailError(f"no audit entry of kind {kind!r} and step {step!r}")
        with self._locked() as state:
            if (kind, step, key) not in state.steps:
                entry = _entry(state.next_seq, kind, step, key, dict(facts), state.head or GENESIS)
                _append_line(self.path, _canonical(entry) + b"\n")
                _accept(state, entry)
                self._known[self.path] = (_identity(self.path), state)
            return str(state.head)

    @contextmanager
    def _locked(self) -> Iterator[Verification]:
        """The trail's verified state, with the trail's lock held; a broken trail raises."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusively(self.path.parent / LOCK):
            known = self._known.get(self.path)
            identity = _identity(self.path)
            state = known[1] if known and known[0] == identity else verify_trail(self.path.parent.parent)
            self._known[self.path] = (identity, state)
            if state.problem is not None:
                raise AuditTrailBrokenError(
                    f"the audit trail {self.path} is broken at {state.problem}; nothing more is sent until an "
                    f"operator has reviewed it and run `bk audit acknowledge {self.path.parent.parent} --reason TEXT`")
            yield state


def _identity(path: Path) -> tuple[int, int, int]:
    """What changes when anything rewrites the file: inode, size, modification time."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (0, 0, 0)
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _entry(seq: int, kind: str, step: str, key: str | None, facts: dict[str, Any], prev: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"seq": seq, "at": datetime.now(UTC).isoformat(timespec="microseconds"), "kind": kind,
                             "step": step, "key": key, "facts": facts, "prev": prev}
    entry["hash"] = entry_hash(entry)
    return entry


def _append_line(path: Path, line: bytes) -> None:
    """Append one line in one write and make it durable (the file, and the directory when new)."""
    created = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(descriptor, line)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    if created:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def acknowledge_break(work_dir: Path, reason: str) -> dict[str, Any]:
    """Seal a broken trail after review: append an `acknowledgement` entry naming the break and the
    reason, chained to the SHA-256 of every byte before it, so appending may go on. A cut last line
    is ended first (its bytes stay, sealed with the rest). Refused for an intact trail."""
    if not reason.strip():
        raise AuditTrailError("an acknowledgement needs a reason (who reviewed the break, and what they found)")
    path = trail_path(work_dir)
    if not path.exists():
        raise AuditTrailError(f"no audit trail at {path}")
    with exclusively(path.parent / LOCK):
        state = verify_trail(work_dir)
        if state.problem is None:
            raise AuditTrailError(f"the audit trail {path} is intact: there is nothing to acknowledge")
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            _append_line(path, b"\n")
            data += b"\n"
        seqs = [entry["seq"] for entry in map(_parse, _split_lines(data)) if entry is not None]
        facts = {"break": str(state.problem), "line": state.problem.line, "reason": reason.strip()}
        entry = _entry(max(seqs, default=0) + 1, "acknowledgement", "sealed", None, facts,
                       hashlib.sha256(data).hexdigest())
        _append_line(path, _canonical(entry) + b"\n")
    return entry


def read_entries(work_dir: Path) -> Iterator[dict[str, Any]]:
    """Every readable entry of the trail in file order (for an export; `verify_trail` judges them)."""
    path = trail_path(work_dir)
    if not path.exists():
        return
    for line in _split_lines(path.read_bytes()):
        entry = _parse(line)
        if entry is not None:
            yield entry


def head_covers(state: Verification, head: str) -> bool:
    """Whether an intact (or acknowledged) chain holds the entry whose hash is `head`."""
    return head in state.hashes


def leaf_facts(session: LeafSession, run_number: int, round_number: int) -> dict[str, Any]:
    """Where a payload goes (or came from) and for which leaf, run and round: the facts every entry
    of a round starts with."""
    leaf = session.credentials
    return {"destination": public_url(leaf.host), "tree_id": leaf.tree_id, "branch_id": leaf.branch_id,
            "branch_name": session.branch_name, "leaf_id": leaf.leaf_id, "leaf_name": leaf.leaf_name,
            "run_number": run_number, "round": round_number}


def archive_facts(archive: Path, sha256: str) -> dict[str, Any]:
    """An update archive as it leaves: its size, digest, and each layer's name, shape and dtype."""
    info = inspect_update(archive, check_values=False)
    return {"bytes": archive.stat().st_size, "sha256": sha256, "weighting": info.weighting,
            "layers": [{"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype.str}
                       for spec in info.layers]}


def statistics_facts(archive: Path, sha256: str) -> dict[str, Any]:
    """An analytics archive as it leaves: its size, digest, and each field's name, shape and dtype."""
    fields = inspect_analytics(archive).fields.values()
    return {"bytes": archive.stat().st_size, "sha256": sha256,
            "fields": [{"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype} for spec in fields]}


def received_facts(path: Path) -> dict[str, Any]:
    """A file as it arrived: its size and digest."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path).hex()}
