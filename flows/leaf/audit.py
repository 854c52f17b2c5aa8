"""The audit trail: every payload that left the site or arrived, one hash-chained entry per line.

`work_dir/audit/trail.jsonl` is append-only. Each line is one entry in canonical JSON (sorted
keys, no spaces): `seq` (1, 2, ...), `at` (UTC), `kind` (`upload`, `metrics`, `statistics`,
`download`, `registration`: a global model sent to the site's MLflow registry, or
`acknowledgement`), `step` (`sending`, `confirmed`, `refused`, `received`, `sealed`), `key` (the
payload's idempotency key or aggregation id), `facts`, `prev` and `hash`. Invariants:

- `hash` is the SHA-256 of the entry's canonical JSON without `hash`; `prev` is the previous
  entry's `hash` (64 zeros for the first). An edited value, a removed or reordered line and a cut
  last line each break one of these, and `verify_trail` names the first entry that does.
- An outgoing payload's `sending` entry is on disk (fsynced) before its first byte leaves, its
  `confirmed` entry after the platform accepted it (`refused` when it said no). Entries are keyed, and a key's step is
  written once: a process killed between the two leaves the `sending` entry alone, and the
  rerun adds only the confirmation. An accepted payload is therefore never missing.
- Every line is its entry's canonical JSON with fields of the right types; anything else (a
  duplicated key, reformatted JSON, a field of the wrong type) is a break.
- A broken trail is never appended to, and neither is one that no longer holds the entry the
  leaf's state last recorded (`audit_head`: the trail was deleted, replaced or cut): the step fails
  with `AuditTrailBrokenError` until an operator reviews it and runs `bk audit acknowledge`, which
  appends an `acknowledgement` entry whose `prev` is the SHA-256 of every byte before it. It
  accepts the trail as it is up to there (the break verify reports is the one it finds, not the
  one the seal names); any later change to those bytes breaks the trail again.
- No secret enters the trail: destinations are URLs without user info or query, and facts are
  names, shapes, dtypes, digests, sizes and numbers.

The chain proves the trail was not edited after the fact only together with a head hash kept
elsewhere: anyone who can write the file can rewrite it consistently, or append a seal of their
own. Each round's history row and the run's summary artifact in Prefect carry the head, and
`bk audit verify --head HASH` checks the trail still holds that entry with an intact chain up to
it (entries cut from the end, and a break sealed after that entry, are found that way).
"""

from __future__ import annotations

import hashlib
import json
import math
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
from prefect_branchkey.bk_blocks.errors import BranchKeyError, DiskFullError
from prefect_branchkey.bk_blocks.files import disk_full_cause, exclusively, free_bytes, sha256_file
from prefect_branchkey.tasks.session import LeafSession

AUDIT_DIR = "audit"
TRAIL = "trail.jsonl"
LOCK = ".lock"
GENESIS = "0" * 64
KINDS = ("upload", "metrics", "statistics", "download", "registration", "acknowledgement")
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


@dataclass(frozen=True)
class Acknowledged:
    """A break an acknowledgement sealed: the break as verify finds it, as the seal names it (the
    two differ only if the seal was written for another break, or its cut line was ended), and why."""

    found: Break
    sealed_as: str
    reason: str

    def __str__(self) -> str:
        named = "" if self.sealed_as == str(self.found) else f"; sealed as: {self.sealed_as}"
        return f"{self.found}{named} (reason: {self.reason})"


@dataclass
class Verification:
    """What reading the whole trail found: its length and head, the payloads sent but never
    confirmed, the breaks an operator acknowledged, and the first break nobody did (if any)."""

    entries: int = 0
    head: str | None = None
    next_seq: int = 1
    unconfirmed: list[str] = field(default_factory=list)
    acknowledged: list[Acknowledged] = field(default_factory=list)
    problem: Break | None = None
    hashes: set[str] = field(default_factory=set)
    steps: set[tuple[str, str, str]] = field(default_factory=set)
    sealed_heads: set[str] = field(default_factory=set)  # heads an acknowledgement said were missing
    sealed_hashes: set[str] = field(default_factory=set)  # entries inside a break an acknowledgement sealed

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
    host = f"[{host}]" if ":" in host else host
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
    if not isinstance(entry, dict) or set(entry) != set(FIELDS):
        return None
    typed = (isinstance(entry["seq"], int) and not isinstance(entry["seq"], bool) and isinstance(entry["at"], str)
             and entry["kind"] in KINDS and entry["step"] in STEPS and isinstance(entry["key"], str | None)
             and isinstance(entry["facts"], dict) and _is_digest(entry["prev"]) and _is_digest(entry["hash"]))
    return entry if typed else None


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _walk(data: bytes) -> Verification:
    """Check every line in order (see the module docstring for what each check catches)."""
    result = Verification()
    lines = _split_lines(data)
    entries = [_parse(line) for line in lines]
    last_line_of = {entry["seq"]: index for index, entry in enumerate(entries) if entry is not None}
    prefix = hashlib.sha256()
    prev = GENESIS
    in_break: list[str] = []
    for index, (line, entry) in enumerate(zip(lines, entries, strict=True)):
        before = prefix.hexdigest()
        prefix.update(line)
        if result.problem is not None:
            if entry is not None and _seals(entry, before, line):
                result.acknowledged.append(Acknowledged(result.problem, str(entry["facts"].get("break", "")),
                                                        str(entry["facts"].get("reason", ""))))
                result.sealed_hashes.update(in_break)
                result.problem, in_break = None, []
                prev = _accept(result, entry)
            elif entry is not None:
                in_break.append(str(entry["hash"]))
                _remember_steps(result, entry)
            continue
        later = last_line_of.get(result.next_seq, -1) > index
        problem = _check(index + 1, line, entry, result.next_seq, prev, before, later)
        if problem is not None:
            result.problem = problem
            continue
        assert entry is not None
        prev = _accept(result, entry)
    return result


def _check(number: int, line: bytes, entry: dict[str, Any] | None, expected: int, prev: str, before: str,
           expected_later: bool) -> Break | None:
    """The break at this line, if any (`expected_later`: the entry due here comes after it)."""
    if not line.endswith(b"\n"):
        return Break(number, entry["seq"] if entry else None, "the last line is cut short (truncated): no end of line")
    if entry is None:
        return Break(number, None, "not a complete audit entry (corrupted or edited)")
    seq = entry["seq"]
    if entry_hash(entry) != entry["hash"]:
        return Break(number, seq, "edited: its content does not match its hash")
    if line != _canonical(entry) + b"\n":
        return Break(number, seq, "edited: the line is not its entry's canonical JSON (a repeated or reformatted "
                                  "field)")
    if entry["kind"] == "acknowledgement":
        return None if seq >= expected and _seals(entry, before, line) else Break(
            number, seq, "an acknowledgement that does not seal the bytes before it (moved or edited)")
    if seq != expected:
        if expected_later:
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
    if entry["kind"] == "acknowledgement" and entry["facts"].get("missing_head"):
        result.sealed_heads.add(str(entry["facts"]["missing_head"]))
    _remember_steps(result, entry)
    return str(entry["hash"])


def _remember_steps(result: Verification, entry: dict[str, Any]) -> None:
    """Note which payload step `entry` records (also for an entry inside a sealed break: a rerun
    must not record that step again), and which sendings still await their answer."""
    step = (entry["kind"], entry["step"], entry["key"] or "")
    result.steps.add(step)
    if entry["step"] == "sending":
        result.unconfirmed.append(entry["key"])
    elif entry["step"] in ("confirmed", "refused") and entry["key"] in result.unconfirmed:
        result.unconfirmed.remove(entry["key"])


class AuditTrail:
    """A leaf's trail for appending: `sending` before a payload leaves, `confirmed` after the platform
    took it, `received` for what arrived. Each appends (fsynced) at most once per (kind, step, key);
    the whole trail is verified when this process first appends, and again whenever another
    process changed the file since this one last wrote it."""

    _known: dict[Path, tuple[tuple[int, ...], Verification]] = {}  # noqa: RUF012 -- one per process, on purpose

    def __init__(self, work_dir: Path, expected_head: str | None = None) -> None:
        """`expected_head`: the entry the leaf's state last recorded, which the trail must hold."""
        self.path = trail_path(work_dir)
        self.expected_head = expected_head

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
            work_dir = self.path.parent.parent
            if state.problem is not None:
                raise AuditTrailBrokenError(
                    f"the audit trail {self.path} is broken at {state.problem}; nothing more is sent until an "
                    f"operator has reviewed it and run `bk audit acknowledge {work_dir} --reason TEXT`")
            if self.expected_head and not holds(state, self.expected_head):
                raise AuditTrailBrokenError(
                    f"the audit trail {self.path} does not hold entry {self.expected_head}, the last one this leaf "
                    "recorded: it was deleted, replaced or cut short; nothing more is sent until an operator has "
                    f"reviewed it and run `bk audit acknowledge {work_dir} --reason TEXT`")
            yield state


def _identity(path: Path) -> tuple[int, ...]:
    """What changes when anything rewrites the file: inode, size, modification and change times
    (the change time cannot be set back by the writer)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return (0, 0, 0, 0)
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _entry(seq: int, kind: str, step: str, key: str | None, facts: dict[str, Any], prev: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"seq": seq, "at": datetime.now(UTC).isoformat(timespec="microseconds"), "kind": kind,
                             "step": step, "key": key, "facts": _plain(facts), "prev": prev}
    entry["hash"] = entry_hash(entry)
    return entry


def _plain(value: Any) -> Any:
    """`value` as strict JSON takes it: NumPy scalars as Python numbers, a NaN or infinite metric as
    its name ("nan", "inf"), tuples as lists; a payload's facts never fail its round."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _append_line(path: Path, line: bytes) -> None:
    """Append one line and make it durable (the file, and the directory when new). A write that
    fails midway (a full disk) is cut back off, so the trail never keeps half a line."""
    created = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        size = os.fstat(descriptor).st_size
        try:
            remaining = memoryview(line)
            while remaining:
                remaining = remaining[os.write(descriptor, remaining):]
            os.fsync(descriptor)
        except OSError as exc:
            os.ftruncate(descriptor, size)
            if disk_full_cause(exc) is not None:
                raise DiskFullError(path, len(line), free_bytes(path.parent)) from exc
            raise
    finally:
        os.close(descriptor)
    if created:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def acknowledge_break(work_dir: Path, reason: str, expected_head: str | None = None) -> dict[str, Any]:
    """Seal a broken trail after review, so appending may go on: append an `acknowledgement` entry
    naming the break and the reason, chained to the SHA-256 of every byte before it. A cut last
    line is ended first (its bytes stay, sealed with the rest). `expected_head` (the leaf state's
    `audit_head`) missing from the trail is a break too: the seal names it, and the leaf accepts the
    trail without it. Refused for a trail that is intact and holds `expected_head`."""
    if not reason.strip():
        raise AuditTrailError("an acknowledgement needs a reason (who reviewed the break, and what they found)")
    path = trail_path(work_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusively(path.parent / LOCK):
        state = verify_trail(work_dir)
        missing = expected_head if expected_head and not holds(state, expected_head) else None
        if state.problem is None and missing is None:
            raise AuditTrailError(f"the audit trail {path} is intact: there is nothing to acknowledge")
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):
            _append_line(path, b"\n")
            data += b"\n"
        seqs = [entry["seq"] for entry in map(_parse, _split_lines(data)) if entry is not None]
        found = (str(state.problem) if state.problem else
                 f"the trail does not hold entry {missing}, the last one the leaf recorded")
        facts = {"break": found, "line": state.problem.line if state.problem else None, "reason": reason.strip(),
                 "missing_head": missing}
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
    """Whether the chain holds the entry whose hash is `head` where it verifies (not inside a break,
    acknowledged or not): what an anchored head must prove."""
    return head in state.hashes


def holds(state: Verification, head: str) -> bool:
    """Whether the trail still has the entry `head` the leaf last recorded, verified or inside an
    acknowledged break, or an acknowledgement accepted its absence: what appending requires."""
    return head in state.hashes | state.sealed_hashes | state.sealed_heads


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
