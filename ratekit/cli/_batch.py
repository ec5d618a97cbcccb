"""A resumable batch of chat completions through a scheduler: the logic behind ``ratekit run``.

The input is JSONL, one chat request body a line (``{"model", "messages", "max_tokens",
...}``), each with an optional ``custom_id`` (the line number otherwise) and an optional
``tenant`` (the tenant whose share of the account the request takes; neither is sent).
Every request goes through ``ratekit.wrap(openai.AsyncOpenAI(...), scheduler)`` from
`workers` concurrent tasks, so the account's tier is kept and 429s are retried by the
scheduler. Tenants' limits and weights may come from a TOML file (`load_tenants`).

The output is JSONL too, one record a request, appended and flushed as each call ends,
so a crash loses nothing already written::

    {"custom_id": ..., "line": 3, "status": "ok", "response": {...}, "usage": {...}}
    {"custom_id": ..., "line": 4, "status": "failed", "error": {"type": ..., "message": ...}}

A run first reads the output it finds: ids recorded ``ok`` are skipped, ``failed`` ones
are tried again. At the end the output is compacted (written to a temporary file, then
renamed over it) to one record per id, the last one written winning, in input order.

`BatchRunner.stop` stops admitting new requests and lets those in flight end within a
grace period (then cancels them; they are not recorded, so the next run does them).

Async (anyio on asyncio: the Redis backend and the openai client's transport need it);
no command line here, see ``ratekit/cli/_run_cmd.py``.
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio

from .._account import Account
from .._errors import LimitsError, MissingPriceError, RatekitError, UnknownModelError
from .._events import Event, RateLimited
from .._limits import DEFAULT_MARGIN_S, Limits, show
from .._pool import Pool
from .._pool_file import PoolAccount, PoolFile
from .._scheduler import Scheduler
from .._tenants import Tenant, Tenants, check_tenant_name
from .._tokens import chat_message_problem
from ..backends._base import Backend

# Seconds: how long a connection attempt may take before the request fails.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Seconds: how long one request may take in all (a long completion included).
DEFAULT_REQUEST_TIMEOUT_S = 600.0
# Seconds that calls in flight get to end after `stop`, before they are cancelled.
DEFAULT_GRACE_S = 5.0
# Real milliseconds every admission counts beyond its window (network jitter): the
# library's own default, one number for both.
DEFAULT_MARGIN_MS = DEFAULT_MARGIN_S * 1000
# Workers when neither the caller nor the tier says how many.
DEFAULT_WORKERS = 64
# An error message longer than this is cut in the output and the summary.
_MESSAGE_CHARS = 300

RequestId = str | int


class BatchInputError(Exception):
    """A line of the input that cannot be a request; `line` is 1-based."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}")


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One request of the batch: its id, its 1-based line in the input, its body, and the
    tenant whose share it takes (None: none)."""

    custom_id: RequestId
    line: int
    body: dict[str, Any]
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of the input that is not a request: its 1-based number, id and why."""

    custom_id: RequestId
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class BatchInput:
    """An input file read: its requests, its bad lines, and lines that repeat an id."""

    requests: tuple[BatchRequest, ...]
    bad_lines: tuple[BadLine, ...]
    # Lines whose custom_id an earlier line already has: reported, never run.
    duplicates: tuple[BadLine, ...] = ()

    @property
    def total(self) -> int:
        """Requests and bad lines: every line that will have a record in the output."""
        return len(self.requests) + len(self.bad_lines)


def record_key(custom_id: object) -> str:
    """The key records are matched by across runs: the id's JSON (1 and "1" differ)."""
    return json.dumps(custom_id, sort_keys=True)


def parse_request_line(text: str, line: int, *, default_model: str | None = None) -> BatchRequest:
    """One input line as a request; `BatchInputError` says what is wrong with it.

    `default_model` fills a body without ``model``. The ``custom_id`` (a string or an
    integer) is taken out of the body; without one, the line number is the id. So is the
    ``tenant`` (a non-empty string of at most 256 characters), when the line has one.
    """
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BatchInputError(line, f"not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise BatchInputError(line, "JSON nested too deeply to read") from None
    if not isinstance(body, dict):
        raise BatchInputError(line, f"a request must be a JSON object, got {type(body).__name__}")
    custom_id = body.pop("custom_id", line)
    if isinstance(custom_id, bool) or not isinstance(custom_id, str | int):
        raise BatchInputError(line, f"custom_id must be a string or an integer, got {custom_id!r}")
    tenant = body.pop("tenant", None)
    if tenant is not None:
        try:
            check_tenant_name(tenant, "tenant")
        except RatekitError as exc:
            raise BatchInputError(line, str(exc)) from None
    if body.get("model") is None:
        if default_model is None:
            raise BatchInputError(line, "no model: give one in the line or with --model")
        body["model"] = default_model
    if not isinstance(body["model"], str) or not body["model"]:
        raise BatchInputError(line, f"model must be a non-empty string, got {body['model']!r}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BatchInputError(line, "messages must be a non-empty list")
    for index, message in enumerate(messages):
        problem = chat_message_problem(message)
        if problem is not None:
            raise BatchInputError(line, f"messages[{index}]: {problem}")
    if body.get("stream"):
        raise BatchInputError(line, "stream is not supported in a batch")
    return BatchRequest(custom_id, line, body, tenant)


def _custom_id_of(text: str, line: int) -> RequestId:
    # The id a bad line is recorded under: its own when it can be read, else its line.
    try:
        custom_id = json.loads(text).get("custom_id", line)
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return line
    return (
        custom_id if isinstance(custom_id, str | int) and not isinstance(custom_id, bool) else line
    )


def read_requests(path: str | Path, *, default_model: str | None = None) -> BatchInput:
    """Read a JSONL file of requests; bad lines are collected, not raised.

    An empty line counts as a bad line ("empty line"), except at the end of the file.
    A line whose id an earlier line has is a duplicate: reported, never run.
    """
    raw_lines = Path(path).read_bytes().split(b"\n")
    while raw_lines and not raw_lines[-1].strip():
        raw_lines.pop()
    requests: list[BatchRequest] = []
    bad: list[BadLine] = []
    duplicates: list[BadLine] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            # Only this line is lost: it is recorded failed under its line number.
            bad.append(BadLine(number, number, f"not UTF-8 (byte {exc.start + 1} of the line)"))
            first_line[record_key(number)] = number
            continue
        if not text.strip():
            bad.append(BadLine(number, number, "empty line"))
            first_line[record_key(number)] = number
            continue
        request: BatchRequest | None = None
        try:
            request = parse_request_line(text, number, default_model=default_model)
            custom_id, reason = request.custom_id, ""
        except BatchInputError as exc:
            custom_id, reason = _custom_id_of(text, number), exc.reason
        key = record_key(custom_id)
        if key in first_line:
            reason = f"custom_id {custom_id!r} repeats line {first_line[key]}"
            duplicates.append(BadLine(custom_id, number, reason))
            continue
        first_line[key] = number
        if request is None:
            bad.append(BadLine(custom_id, number, reason))
        else:
            requests.append(request)
    return BatchInput(tuple(requests), tuple(bad), tuple(duplicates))


def read_results(path: str | Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The records of an output file by id, the last one of each id winning, in the order
    ids first appear; and how many lines could not be read (a line cut by a crash)."""
    records: dict[str, dict[str, Any]] = {}
    unreadable = 0
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return records, 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if not isinstance(record, dict) or "custom_id" not in record or "status" not in record:
            unreadable += 1
            continue
        records[record_key(record["custom_id"])] = record
    return records, unreadable


class BatchOutputError(RatekitError, ValueError):
    """The output file cannot be used: it is the input, or a file ratekit did not write."""


def check_output(requests_path: str | Path, output_path: str | Path) -> None:
    """Refuse an output that would destroy data: the requests file itself, or an existing
    file that is not a results file of ratekit's (a line that is not a result record,
    other than a last line cut short by a crash). `BatchOutputError` says which."""
    output = Path(output_path)
    if output.exists() and Path(requests_path).exists() and output.samefile(requests_path):
        raise BatchOutputError(
            f"the output {output} is the requests file itself: its requests would be "
            "overwritten by the results; give another --output"
        )
    if output.is_dir():
        raise BatchOutputError(f"the output {output} is a directory; give a file")
    if not output.exists():
        if not output.parent.is_dir():
            raise BatchOutputError(f"the output's directory {output.parent} does not exist")
        return
    try:
        lines = [line for line in output.read_bytes().split(b"\n") if line.strip()]
    except OSError as exc:
        raise BatchOutputError(f"the output {output} cannot be read: {exc}") from None
    for number, raw in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):
            record = None
        if not (isinstance(record, dict) and "custom_id" in record and "status" in record):
            raise BatchOutputError(
                f"the output {output} exists and is not a ratekit results file (line "
                f"{number} is not a result record): give another --output, or move it away"
            )


def write_results(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Replace the output file with `records`, atomically (a temporary file renamed over it)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, target)


def compact_results(path: str | Path, order: Iterable[RequestId] = ()) -> int:
    """Rewrite the output to one record per id (the last written wins): ids in `order`
    first, in that order, then any other ids in the order they first appeared.
    Returns the number of records kept."""
    records, _ = read_results(path)
    ordered: list[dict[str, Any]] = []
    for custom_id in order:
        record = records.pop(record_key(custom_id), None)
        if record is not None:
            ordered.append(record)
    ordered.extend(records.values())
    write_results(path, ordered)
    return len(ordered)


def default_output_path(requests_path: str | Path) -> Path:
    """``REQUESTS.out.jsonl`` beside ``REQUESTS.jsonl``."""
    path = Path(requests_path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.out.jsonl")


def _causes(error: BaseException) -> list[BaseException]:
    # The chain of causes below `error`, nearest first (a cycle ends it).
    chain: list[BaseException] = []
    cause = error.__cause__ or error.__context__
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


def describe_error(error: BaseException, base_url: str | None = None) -> dict[str, str]:
    """``{"type", "message"}`` for a failed request; a connection error names the URL and
    the cause the client hides behind "Connection error." (say, connection refused)."""
    kind = type(error).__name__
    message = str(error) or kind
    if kind in {"APIConnectionError", "APITimeoutError"}:
        where = f" to {base_url}" if base_url else ""
        causes = _causes(error)
        system = [c for c in causes if isinstance(c, OSError) and c.errno is not None]
        if system:
            detail = f": {os.strerror(system[-1].errno or 0).lower()} ({system[-1]})"
        elif causes and str(causes[0]):
            detail = f": {causes[0]}"
        else:
            detail = ""
        verb = "timed out" if kind == "APITimeoutError" else "cannot connect"
        message = f"{verb}{where}{detail}"
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 1] + "…"
    return {"type": kind, "message": message}


def _as_json(value: Any) -> Any:
    # A pydantic model of the openai package, or anything JSON already.
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump(mode="json", exclude_unset=True)
    return value


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Where a run stands.

    `total` counts every request of the input (bad lines included); `done` those with a
    record (ok from an earlier run, ok now, or failed now); `elapsed_s` is real time
    since the run started; `rate_per_s` counts only calls ended in this run.
    `spend` is in `currency` when every model called has a price, else None (`tokens`
    then say what was used).
    """

    total: int
    done: int
    ok: int
    failed: int
    skipped: int
    in_flight: int
    rate_limited: int
    prompt_tokens: int
    completion_tokens: int
    spend: float | None
    currency: str
    elapsed_s: float
    finished_now: int

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens of the calls ended in this run."""
        return self.prompt_tokens + self.completion_tokens

    @property
    def rate_per_s(self) -> float:
        """Calls ended per second in this run."""
        return self.finished_now / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the current rate; None before the first call ends."""
        rate = self.rate_per_s
        return (self.total - self.done) / rate if rate > 0 else None


@dataclass(frozen=True, slots=True)
class BatchSummary:
    """How a run ended.

    `ok` counts every request recorded ok (earlier runs included: `skipped`);
    `failed` those that failed now, by reason in `failures` ("Type: message").
    `retried` is how many failed in an earlier run and were tried again.
    `interrupted` is true when `stop` ended the run before every request was tried;
    `not_run` counts the requests it left. `provider_unreachable` is true when every
    call of this run failed to connect.
    """

    total: int
    ok: int
    failed: int
    skipped: int
    retried: int
    not_run: int
    failures: dict[str, int]
    rate_limited: int
    elapsed_s: float
    prompt_tokens: int
    completion_tokens: int
    spend: float | None
    currency: str
    interrupted: bool
    provider_unreachable: bool
    bad_lines: tuple[BadLine, ...] = ()
    duplicates: tuple[BadLine, ...] = ()
    output: str = ""
    # With a pool: the calls each account was given in this run.
    accounts: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every request of the input is recorded ok."""
        return self.ok == self.total and not self.duplicates

    def _spend_text(self) -> str:
        if self.prompt_tokens + self.completion_tokens == 0:
            return "nothing (no tokens used)"
        if self.spend is None:
            return "unknown: a model without prices (see tokens)"
        return f"{self.spend:.4f} {self.currency} (estimate from the profile's prices)"

    def lines(self) -> list[str]:
        """The summary as lines of text, for a terminal."""
        out = [
            f"done {self.ok}/{self.total} ok ({self.skipped} from earlier runs), "
            f"{self.failed} failed, {self.not_run} not run",
            f"elapsed {self.elapsed_s:.1f} s, 429s {self.rate_limited}, "
            f"tokens {self.prompt_tokens + self.completion_tokens:,} "
            f"({self.prompt_tokens:,} prompt, {self.completion_tokens:,} completion)",
            "spend " + self._spend_text(),
        ]
        if self.accounts:
            served = ", ".join(f"{name} {count}" for name, count in self.accounts.items())
            out.append(f"accounts: {served}")
        if self.retried:
            out.append(f"retried {self.retried} that failed in an earlier run")
        for reason, count in sorted(self.failures.items(), key=lambda item: -item[1]):
            out.append(f"  failed x{count}: {reason}")
        for item in self.duplicates:
            out.append(f"  line {item.line} not run: {item.reason}")
        if self.provider_unreachable:
            out.append("the provider could not be reached: is the base URL right and serving?")
        if self.interrupted:
            out.append("interrupted: run the same command again to resume")
        if self.output:
            out.append(f"output: {self.output}")
        return out


@dataclass(frozen=True, slots=True)
class BatchConfig:
    """What a batch runs against.

    `provider` and `tier` name a bundled profile (or a profile file) and its tier.
    `speed` compresses the account's periods (60: a minute per second, to match a
    `MockProvider` with the same speed); `margin_ms` is real milliseconds each admission
    counts beyond its window. `redis_url` and `namespace` share the account with other
    runners through Redis. `workers` defaults to the tier's concurrency (at most 256).
    `pacing` spreads requests one every period / limit (across runners sharing Redis
    too), so that no burst reaches the provider later than it was counted.
    `tenants_file` gives the tenants' limits and weights (see `load_tenants`).
    `pool` runs the batch through a pool of accounts (see `ratekit._pool_file`), each
    on ``<namespace>:<its namespace>`` with Redis.
    """

    provider: str
    tier: str
    base_url: str
    api_key: str
    output: Path | None = None
    workers: int | None = None
    redis_url: str | None = None
    namespace: str | None = None
    speed: float = 1.0
    margin_ms: float = DEFAULT_MARGIN_MS
    pacing: bool = True
    model: str | None = None
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    grace_s: float = DEFAULT_GRACE_S
    tenants_file: Path | None = None
    # A pool of accounts instead of one (`provider`, `tier` and `base_url` are then its
    # first account's); its keys are read from each account's `api_key_env`.
    pool: PoolFile | None = None


def make_account(config: BatchConfig) -> Account:
    """The account of `config`: its tier, periods compressed by `speed`, its margin.

    Raises `UnknownProviderError` / `UnknownTierError` (listing those that exist) and
    `LimitsError` for a speed or margin that cannot be.
    """
    if not config.speed > 0 or math.isinf(config.speed):
        raise LimitsError(f"speed must be positive and finite, got {config.speed!r}")
    return Account(
        config.provider,
        tier=config.tier,
        period_scale=1 / config.speed,
        margin_s=config.margin_ms / 1000,  # real seconds: a margin is not compressed
        pacing=config.pacing,
    )


class TenantsFileError(RatekitError, ValueError):
    """The tenants file cannot be used; names the file, the table and the value."""


# The fields of a tenant's table in a tenants file: its limits, then its weight.
_TENANT_LIMITS = ("rpm", "tpm", "tpd", "concurrency")
_TENANT_FIELDS = (*_TENANT_LIMITS, "weight")


def load_tenants(path: str | Path, account: Account, *, speed: float = 1.0) -> Tenants:
    """The tenants of a TOML file: a table per tenant name, each with any of ``rpm``,
    ``tpm``, ``tpd`` (per minute and per day, as the tiers) and ``concurrency`` (the
    tenant's own limits) and ``weight`` (its share while tenants wait, 1 by default); the
    table ``default`` is every tenant the file does not name::

        [default]
        rpm = 20

        [gold]
        rpm = 100
        weight = 3

    Periods run `speed` times faster (as the account's, see `make_account`), and tokens
    are counted as the account counts them. `TenantsFileError` names the file, the table
    and the value that cannot be.
    """
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise TenantsFileError(f"{path} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TenantsFileError(f"{path} is not TOML: {exc}") from None
    counting = account.limits().token_counting
    read: dict[str, Tenant] = {}
    for name, fields in table.items():
        try:
            check_tenant_name(name, "a table's name")
        except RatekitError as exc:
            raise TenantsFileError(f"{path}: {exc}") from None
        if not isinstance(fields, dict):
            raise TenantsFileError(
                f"{path}: {name!r} must be a table of a tenant's limits and weight "
                f"([{name}] with {', '.join(_TENANT_FIELDS)}), got {show(fields)}"
            )
        unknown = sorted(set(fields) - set(_TENANT_FIELDS))
        if unknown:
            raise TenantsFileError(
                f"{path}: [{name}] unknown field {unknown[0]!r}; known: {', '.join(_TENANT_FIELDS)}"
            )
        try:
            limits = Limits(
                **{key: fields[key] for key in _TENANT_LIMITS if key in fields},
                period_scale=1 / speed,
                token_counting=counting,
            )
            read[name] = Tenant(limits, fields["weight"]) if "weight" in fields else Tenant(limits)
        except RatekitError as exc:
            raise TenantsFileError(f"{path}: [{name}] {exc}") from None
    default = read.pop("default", None)
    return Tenants(default=default, named=read)


def make_tenants(config: BatchConfig, account: Account) -> Tenants | None:
    """The tenants of `config.tenants_file` (None without one), for `account`; raises
    `TenantsFileError` for a file that cannot be used (see `load_tenants`)."""
    if config.tenants_file is None:
        return None
    return load_tenants(config.tenants_file, account, speed=config.speed)


def is_loopback(url: str) -> bool:
    """True for a base URL on this machine (a local mock provider needs no real key)."""
    host = urlsplit(url).hostname or ""
    return host in {"localhost", "::1"} or host.startswith("127.")


# Calls in a row that cannot reach the provider before a run stops (the rest is left
# for the next run, instead of failing every line at the tier's pace).
_UNREACHABLE_STOP = 8


class BatchRunner:
    """Runs the requests of one input file through `client` (a client wrapped with
    ``ratekit.wrap`` around `scheduler`), recording results in `output`.

    Use `run` once. `stop` (from the same event loop, say a signal handler's task)
    stops feeding requests and gives calls in flight `grace_s` to end; `abort` cancels
    them at once. `progress` is a snapshot at any time. Not shared across loops.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        client: Any,
        requests_path: str | Path,
        output_path: str | Path | None = None,
        *,
        workers: int = DEFAULT_WORKERS,
        default_model: str | None = None,
        grace_s: float = DEFAULT_GRACE_S,
        base_url: str | None = None,
        notice: Callable[[str], None] | None = None,
        pool: Pool | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}")
        self._scheduler = scheduler
        self._client = client
        self._requests_path = Path(requests_path)
        self._output_path = (
            Path(output_path) if output_path is not None else default_output_path(requests_path)
        )
        self._workers = workers
        self._default_model = default_model
        self._grace_s = grace_s
        self._base_url = base_url
        self._notice = notice or (lambda text: None)
        self._currency = scheduler.account.profile.currency
        # Per model: is it priced (None: not asked yet).
        self._priced: dict[str, bool] = {}
        # A pool's accounts price calls each in its own way: tokens are counted, not spend.
        self._pool = pool
        self._unpriced_seen = pool is not None
        self._started_s: float | None = None
        self._ended_s: float | None = None
        self._total = 0
        self._skipped = 0
        self._ok = 0
        self._failed = 0
        self._in_flight = 0
        self._rate_limited = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._spend = 0.0
        self._connection_failures = 0
        # Calls that could not reach the provider since the last one that did.
        self._unreachable_in_a_row = 0
        self._failures: Counter[str] = Counter()
        self._stopping = False
        # Cancels the feeder (on stop) and the workers (after the grace, or on abort).
        self._feed_scope = anyio.CancelScope()
        self._work_scope = anyio.CancelScope()
        self._stop_requested = anyio.Event()
        self._out: Any = None
        # Calls handed to a worker and not ended yet.
        self._calls: set[_Call] = set()

    @property
    def output_path(self) -> Path:
        """Where records are written."""
        return self._output_path

    def on_event(self, event: Event) -> None:
        """A scheduler hook (see `open_batch`): counts the provider's 429s."""
        if isinstance(event, RateLimited):
            self._rate_limited += 1

    # -- control --------------------------------------------------------------------

    def stop(self) -> None:
        """Stop admitting new requests; calls in flight get the grace period to end."""
        self._stopping = True
        self._feed_scope.cancel()
        self._stop_requested.set()
        # A call still waiting for its admission (or admitted, not yet sent) is not
        # started: drop it now, the next run does it.
        for call in self._calls:
            if not call.sent:
                call.scope.cancel()

    def abort(self) -> None:
        """Stop now: calls in flight are cancelled (and done again by the next run)."""
        self.stop()
        self._work_scope.cancel()

    @property
    def stopping(self) -> bool:
        """True once `stop` or `abort` was called."""
        return self._stopping

    # -- observing -------------------------------------------------------------------

    def progress(self) -> BatchProgress:
        """A snapshot of the run so far."""
        now = self._ended_s if self._ended_s is not None else time.monotonic()
        elapsed = 0.0 if self._started_s is None else now - self._started_s
        return BatchProgress(
            total=self._total,
            done=self._skipped + self._ok + self._failed,
            ok=self._skipped + self._ok,
            failed=self._failed,
            skipped=self._skipped,
            in_flight=self._in_flight,
            rate_limited=self._rate_limited,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            spend=None if self._unpriced_seen else self._spend,
            currency=self._currency,
            elapsed_s=elapsed,
            finished_now=self._ok + self._failed,
        )

    # -- running ---------------------------------------------------------------------

    async def run(self) -> BatchSummary:
        """Run every request not yet recorded ok; returns the summary once the output is
        compacted. Bad lines are recorded failed (and reported) before any call."""
        self._started_s = time.monotonic()
        check_output(self._requests_path, self._output_path)
        batch = read_requests(self._requests_path, default_model=self._default_model)
        for item in (*batch.bad_lines, *batch.duplicates):
            self._notice(f"{self._requests_path}: line {item.line}: {item.reason}")
        previous, unreadable = read_results(self._output_path)
        if unreadable:
            self._notice(
                f"{self._output_path}: its last line was cut short (a run that crashed): "
                "dropped, that request is run again"
            )
        pending: list[BatchRequest] = []
        retried = 0
        for request in batch.requests:
            record = previous.get(record_key(request.custom_id))
            if record is not None and record.get("status") == "ok":
                self._skipped += 1
                continue
            if record is not None:
                retried += 1
            pending.append(request)
        self._total = batch.total
        if self._skipped or retried:
            self._notice(
                f"resuming {self._output_path}: {self._skipped} done already skipped, "
                f"{retried} that failed before will be retried"
            )
        # Rewrite what is there first: a line cut by a crash must not swallow the next.
        compact_results(self._output_path)
        with self._output_path.open("a", encoding="utf-8") as out:
            self._out = out
            for item in batch.bad_lines:
                self._fail(item.custom_id, item.line, "InputLineError", item.reason)
            await self._run_pending(pending)
            self._out = None
        self._ended_s = time.monotonic()
        order = [r.custom_id for r in batch.requests] + [b.custom_id for b in batch.bad_lines]
        order.sort(key=_line_of(batch))
        compact_results(self._output_path, order)
        tried_now = self._ok + self._failed - len(batch.bad_lines)
        return BatchSummary(
            total=self._total,
            ok=self._skipped + self._ok,
            failed=self._failed,
            skipped=self._skipped,
            retried=retried,
            not_run=self._total - (self._skipped + self._ok + self._failed),
            failures=dict(self._failures),
            rate_limited=self._rate_limited,
            elapsed_s=self._ended_s - self._started_s,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            spend=None if self._unpriced_seen else self._spend,
            currency=self._currency,
            interrupted=self._stopping,
            provider_unreachable=tried_now > 0
            and self._ok == 0
            and self._connection_failures == tried_now,
            bad_lines=batch.bad_lines,
            duplicates=batch.duplicates,
            output=str(self._output_path),
            accounts={}
            if self._pool is None
            else {
                name: account.admitted for name, account in self._pool.statistics().accounts.items()
            },
        )

    async def _run_pending(self, pending: list[BatchRequest]) -> None:
        if not pending:
            return
        # The first call goes alone: a cold client (lazy imports, the first connection)
        # takes tens of ms more, and a burst admitted meanwhile would reach the provider
        # late enough to spill into its next window.
        with self._work_scope:
            await self._call(pending[0])
        pending = pending[1:]
        send, receive = anyio.create_memory_object_stream[BatchRequest](0)
        async with anyio.create_task_group() as outer:
            outer.start_soon(self._cancel_after_grace)
            with self._work_scope:
                async with anyio.create_task_group() as workers:
                    for _ in range(min(self._workers, max(len(pending), 1))):
                        workers.start_soon(self._work, receive.clone())
                    receive.close()
                    await self._feed(send, pending)
            outer.cancel_scope.cancel()

    async def _feed(self, send: Any, pending: list[BatchRequest]) -> None:
        async with send:
            with self._feed_scope:
                for request in pending:
                    if self._stopping:
                        break
                    await send.send(request)

    async def _cancel_after_grace(self) -> None:
        await self._stop_requested.wait()
        await anyio.sleep(self._grace_s)
        self._work_scope.cancel()

    async def _work(self, receive: Any) -> None:
        async with receive:
            async for request in receive:
                await self._call(request)

    async def _call(self, request: BatchRequest) -> None:
        if self._stopping:
            return
        call = _Call()
        self._calls.add(call)
        self._in_flight += 1
        token = _CURRENT_CALL.set(call)
        try:
            with call.scope:
                try:
                    response = await self._client.chat.completions.create(**_with_tenant(request))
                except Exception as exc:
                    error = describe_error(exc, self._base_url)
                    if error["type"] in {"APIConnectionError", "APITimeoutError"}:
                        self._connection_failures += 1
                        self._unreachable_in_a_row += 1
                    self._fail(request.custom_id, request.line, error["type"], error["message"])
                    if self._unreachable_in_a_row == _UNREACHABLE_STOP and not self._stopping:
                        self._notice(
                            f"the provider could not be reached {_UNREACHABLE_STOP} times in "
                            f"a row ({error['message']}): stopping; run the same command "
                            "again to resume"
                        )
                        self.stop()
                else:
                    self._unreachable_in_a_row = 0
                    self._succeed(request, response)
        finally:
            _CURRENT_CALL.reset(token)
            self._in_flight -= 1
            self._calls.discard(call)

    # -- records -----------------------------------------------------------------------

    def _write(self, record: dict[str, Any]) -> None:
        assert self._out is not None
        self._out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._out.flush()

    def _fail(self, custom_id: RequestId, line: int, kind: str, message: str) -> None:
        self._failed += 1
        self._failures[f"{kind}: {message}"] += 1
        self._write(
            {
                "custom_id": custom_id,
                "line": line,
                "status": "failed",
                "error": {"type": kind, "message": message},
                "usage": None,
            }
        )

    def _succeed(self, request: BatchRequest, response: Any) -> None:
        self._ok += 1
        body = _as_json(response)
        usage = body.get("usage") if isinstance(body, dict) else None
        self._count_usage(request.body["model"], usage)
        self._write(
            {
                "custom_id": request.custom_id,
                "line": request.line,
                "status": "ok",
                "response": body,
                "usage": usage,
            }
        )

    def _count_usage(self, model: str, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        self._prompt_tokens += prompt
        self._completion_tokens += completion
        if self._pool is not None or self._priced.get(model) is False:
            self._unpriced_seen = True
            return
        try:
            cost = self._scheduler.estimate_cost(
                model, input_tokens=prompt, output_tokens=completion
            )
        except (UnknownModelError, MissingPriceError):
            self._priced[model] = False
            self._unpriced_seen = True
            return
        self._priced[model] = True
        self._spend += cost


def _with_tenant(request: BatchRequest) -> dict[str, Any]:
    """The arguments of a request's call: its body, and its tenant for the admission."""
    if request.tenant is None:
        return request.body
    return {**request.body, "ratekit_tenant": request.tenant}


class _Call:
    """One call in a worker: its cancel scope, and whether its HTTP request went out."""

    __slots__ = ("scope", "sent")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.sent = False


# The call the current task is making, for the HTTP client's request hook.
_CURRENT_CALL: ContextVar[_Call | None] = ContextVar("ratekit_batch_call", default=None)


async def _mark_sent(request: Any) -> None:
    # An httpx request hook: runs in the calling task, as the request goes out.
    call = _CURRENT_CALL.get()
    if call is not None:
        call.sent = True


def _line_of(batch: BatchInput) -> Callable[[RequestId], int]:
    lines = {record_key(r.custom_id): r.line for r in batch.requests}
    lines.update({record_key(b.custom_id): b.line for b in batch.bad_lines})
    return lambda custom_id: lines[record_key(custom_id)]


@asynccontextmanager
async def open_batch(
    config: BatchConfig,
    requests_path: str | Path,
    *,
    notice: Callable[[str], None] | None = None,
    hooks: Iterable[Callable[[Event], None]] = (),
) -> AsyncIterator[BatchRunner]:
    """A `BatchRunner` for `config`: the account, the scheduler (on Redis when
    `redis_url` is given), the wrapped openai client; all closed on exit.

    Raises `UnknownProviderError` / `UnknownTierError` (and `TenantsFileError`) before
    anything is opened.
    """

    from ..integrations._wrap import wrap

    if config.pool is not None:
        async with _open_pool_batch(config, requests_path, notice=notice, hooks=hooks) as runner:
            yield runner
        return
    account = make_account(config)
    tenants = make_tenants(config, account)
    backend: Backend | None = None
    if config.redis_url is not None:
        from ..backends.redis import RedisBackend

        namespace = config.namespace or f"{config.provider}-{account.tier.name}".casefold()
        backend = RedisBackend(config.redis_url, namespace=namespace)
    listeners = list(hooks)

    def forward(event: Event) -> None:
        for listener in listeners:
            listener(event)

    scheduler = Scheduler(account, backend=backend, hooks=[forward], tenants=tenants)
    workers = config.workers or min(
        account.limits(config.model).concurrency or DEFAULT_WORKERS, 256
    )
    # As many connections as workers: a call admitted must not then queue for a connection.
    client = _openai_client(config, config.base_url, config.api_key, workers)
    runner = BatchRunner(
        scheduler,
        wrap(client, scheduler),
        requests_path,
        config.output,
        workers=workers,
        default_model=config.model,
        grace_s=config.grace_s,
        base_url=config.base_url,
        notice=notice,
    )
    listeners.append(runner.on_event)
    try:
        yield runner
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()
            if backend is not None:
                await backend.aclose()


def _openai_client(config: BatchConfig, base_url: str, api_key: str, workers: int) -> Any:
    """An openai client without retries of its own, as many connections as `workers`, and
    the request hook that marks a call sent."""
    import openai

    # openai's own httpx types (httpx or httpx2, depending on its version).
    timeout = openai.Timeout(config.request_timeout_s, connect=config.connect_timeout_s)
    limits_type = type(openai.DEFAULT_CONNECTION_LIMITS)
    connections = limits_type(max_connections=workers, max_keepalive_connections=workers)
    http_client = openai.DefaultAsyncHttpxClient(
        limits=connections, timeout=timeout, event_hooks={"request": [_mark_sent]}
    )
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
        http_client=http_client,
    )


def pool_api_key(account: PoolAccount) -> str:
    """The key of a pool's account, from its `api_key_env`; a local provider needs none.
    `BatchInputError`-free: a missing key is a `LimitsError` naming the account."""
    url = account.url()
    variable = account.api_key_env
    key = os.environ.get(variable) if variable else None
    if key:
        return key
    if is_loopback(url):
        return "ratekit-local"
    raise LimitsError(
        f"pool account {account.name!r}: "
        + (
            f"the environment variable {variable} holding its API key is not set"
            if variable
            else "name the environment variable holding its API key (api_key_env)"
        )
    )


@asynccontextmanager
async def _open_pool_batch(
    config: BatchConfig,
    requests_path: str | Path,
    *,
    notice: Callable[[str], None] | None,
    hooks: Iterable[Callable[[Event], None]],
) -> AsyncIterator[BatchRunner]:
    """`open_batch` through a pool: each account with its scheduler, backend and client."""
    from .._pool import Member

    assert config.pool is not None
    listeners = list(hooks)

    def forward(event: Event) -> None:
        for listener in listeners:
            listener(event)

    keys = {account.name: pool_api_key(account) for account in config.pool.accounts}
    backends: list[Backend] = []
    clients: list[Any] = []
    members: dict[str, Member] = {}
    concurrency = 0
    try:
        for spec in config.pool.accounts:
            account = Account(
                spec.provider,
                tier=spec.account.tier.name,
                period_scale=1 / config.speed,
                margin_s=config.margin_ms / 1000,
                pacing=config.pacing,
                **spec.overrides,
            )
            backend: Backend | None = None
            if config.redis_url is not None:
                from ..backends.redis import RedisBackend

                namespace = f"{config.namespace or 'pool'}:{spec.namespace}"
                backend = RedisBackend(config.redis_url, namespace=namespace)
                backends.append(backend)
            scheduler = Scheduler(
                account,
                backend=backend,
                hooks=[forward],
                tenants=make_tenants(config, account),
            )
            cap = account.limits(config.model).concurrency or DEFAULT_WORKERS
            concurrency += cap
            client = _openai_client(config, spec.url(), keys[spec.name], min(cap, 256))
            clients.append(client)
            members[spec.name] = Member(scheduler, client, spec.models, spec.discount)
        pool = Pool(members, prefer=config.pool.prefer, out_s=config.pool.out_s)
        first = next(iter(members.values())).scheduler
        runner = BatchRunner(
            first,
            pool.client(),
            requests_path,
            config.output,
            workers=config.workers or min(concurrency, 256),
            default_model=config.model,
            grace_s=config.grace_s,
            notice=notice,
            pool=pool,
        )
        listeners.append(runner.on_event)
        yield runner
    finally:
        with anyio.CancelScope(shield=True):
            for client in clients:
                await client.close()
            for backend in backends:
                await backend.aclose()


async def run_batch(
    config: BatchConfig,
    requests_path: str | Path,
    *,
    notice: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Run a batch to its end (see `open_batch` and `BatchRunner.run`)."""
    async with open_batch(config, requests_path, notice=notice) as runner:
        return await runner.run()
