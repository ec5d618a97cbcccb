"""Server time of ratekit's Lua scripts, per call: one version of the scripts beside another.

```sh
python -m bench.scripts                      # the working tree beside HEAD
python -m bench.scripts --old v0.3 --new HEAD --calls 5000 --rounds 7
```

One admission of each of bench.redis's two shapes is recorded from a real
RedisBackend (a 1-dimension reserve; a 4-dimension reserve and its settle), then
replayed as FCALLs, with no Python layer, against each version's function library,
both loaded on one redis-server this tool starts. Each version runs on keys of its
own, laid out as that version lays out an account's keys (its `_account_keys`; the
arguments are the same); the versions take turns within a round, in an order that
alternates, so that they share the machine's noise. A call's time is the server's own: INFO
commandstats' time in FCALL over each run of calls.

Printed per version and call: the fewest, median and most µs per call over the
rounds.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import statistics
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from bench._common import positive_int
from bench.redis import RESERVE_LEASE_ARG, SETTLE_LEASE_ARG, _record_ratekit, require_redis_server

# The calls timed.
CALLS = ("1-dim reserve", "4-dim reserve+settle")
# Settle's ARGV position (0-based, after the keys) of the slice index per window.
SETTLE_SLICES_ARG = 8


def _library(read: Callable[[str], str], scripts_source: str) -> tuple[str, str]:
    """The function library (its FUNCTION LOAD text) and its name, as `scripts_source`
    (a version of ratekit/backends/_scripts.py) builds it from the files `read` gives."""
    module = types.ModuleType("bench_scripts_version")
    sys.modules[module.__name__] = module  # where its dataclasses look themselves up
    try:
        exec(compile(scripts_source, "_scripts.py", "exec"), module.__dict__)
        module._read = read  # type: ignore[attr-defined]
        library, _ = module._build()
    finally:
        del sys.modules[module.__name__]
    return library.text, library.name


# An account's keys under its prefix, as one version lays them out.
AccountKeys = Callable[[str], Sequence[str]]


def _account_keys(redis_source: str) -> AccountKeys:
    """`_account_keys` of `redis_source` (a version of ratekit/backends/redis.py), taken
    alone: a pure function of the account's prefix."""
    tree = ast.parse(redis_source)
    (function,) = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "_account_keys"
    ]
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module([function], []), "redis.py", "exec"), namespace)
    keys: AccountKeys = namespace["_account_keys"]
    return keys


def _version(revision: str) -> tuple[str, str, AccountKeys]:
    """The library of git `revision`, or of the working tree for ".", its name and how
    it lays out an account's keys."""
    if revision == ".":

        def show(path: str) -> str:
            with open(path, encoding="utf-8") as file:
                return file.read()

    else:

        def show(path: str) -> str:
            return subprocess.run(
                ["git", "show", f"{revision}:{path}"], check=True, capture_output=True, text=True
            ).stdout

    text, prefix = _library(
        lambda name: show(f"ratekit/backends/lua/{name}"), show("ratekit/backends/_scripts.py")
    )
    return text, prefix, _account_keys(show("ratekit/backends/redis.py"))


def _retarget(
    call: tuple[Any, ...], prefix: str, namespace: str, account_keys: AccountKeys
) -> list[Any]:
    """A recorded call (function, numkeys, *keys, *args) made to run `prefix`'s function
    on the account keys (`account_keys`) and channel of `namespace`."""
    function = prefix + str(call[0])[str(call[0]).rindex("_") :]
    count = int(call[1])
    old = str(call[2]).split("}")[0] + "}"
    new = f"ratekit:{{{namespace}}}"
    # The account's prefix: its first key (its state) up to the last ":".
    account = str(call[2]).rsplit(":", 1)[0].replace(old, new)
    keys = list(account_keys(account))
    args = [str(part).replace(old, new) for part in call[2 + count :]]
    return [function, str(len(keys)), *keys, *args]


def _replace(call: list[Any], position: int, value: str) -> list[Any]:
    """`call` (function, numkeys, *keys, *args) with args[position] replaced by `value`."""
    at = 2 + int(call[1]) + position
    return [*call[:at], value, *call[at + 1 :]]


def _fcall_usec(client: Any) -> int:
    """The server's time (µs) in FCALL so far, from INFO commandstats."""
    return int(client.info("commandstats").get("cmdstat_fcall", {}).get("usec", 0))


def _run(
    client: Any, one: list[Any], reserve: list[Any], settle: list[Any], calls: int, tag: str
) -> dict[str, float]:
    """µs per call: of `calls` 1-dimension reserves (pipelined), then of `calls`
    4-dimension admissions (a reserve, then its settle with the lease and slice indexes
    the reserve gave)."""
    start = _fcall_usec(client)
    pipe = client.pipeline(transaction=False)
    for _ in range(calls):
        pipe.execute_command("FCALL", *one)
    for reply in pipe.execute():
        if int(reply[0]) != 1:
            raise SystemExit(f"bench.scripts: the 1-dim reserve was refused: {reply!r}")
    middle = _fcall_usec(client)
    for i in range(calls):
        lease = f"{tag}:{i}"
        reply = client.execute_command("FCALL", *_replace(reserve, RESERVE_LEASE_ARG, lease))
        if int(reply[0]) != 1:
            raise SystemExit(f"bench.scripts: the 4-dim reserve was refused: {reply!r}")
        slices = " ".join(index.decode() for index in reply[2:])
        ended = _replace(_replace(settle, SETTLE_LEASE_ARG, lease), SETTLE_SLICES_ARG, slices)
        client.execute_command("FCALL", *ended)
    end = _fcall_usec(client)
    return {CALLS[0]: (middle - start) / calls, CALLS[1]: (end - middle) / calls}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scripts", description=__doc__)
    parser.add_argument("--old", default="HEAD", help="git revision to compare with (HEAD)")
    parser.add_argument("--new", default=".", help="git revision, or . for the working tree (.)")
    parser.add_argument("--calls", type=positive_int, default=2000, help="per call and round")
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args(argv)
    import redis

    from ratekit.testing import RedisServer

    labels = (args.old, args.new)
    libraries = [_version(label) for label in labels]
    # Per version, per call: the µs per call of each round.
    rounds: list[dict[str, list[float]]] = [{name: [] for name in CALLS} for _ in labels]
    with RedisServer(require_redis_server("bench.scripts")) as server:
        reserve_one, _ = asyncio.run(_record_ratekit(server.url, "rate"))
        reserve_four, settle_four = asyncio.run(_record_ratekit(server.url, "four"))
        assert settle_four is not None
        client: Any = redis.Redis.from_url(server.url)
        replays = []
        for number, (text, prefix, account_keys) in enumerate(libraries):
            client.execute_command("FUNCTION", "LOAD", "REPLACE", text)
            replays.append(
                (
                    _retarget(reserve_one, prefix, f"v{number}-one", account_keys),
                    _retarget(reserve_four, prefix, f"v{number}-four", account_keys),
                    _retarget(settle_four, prefix, f"v{number}-four", account_keys),
                )
            )
        order = [0, 1]
        for round_number in range(args.rounds):
            for number in order:
                spent = _run(client, *replays[number], args.calls, f"r{round_number}")
                for name, usec in spent.items():
                    rounds[number][name].append(usec)
            order.reverse()
        client.close()
    print(f"server µs per call (INFO commandstats), {args.rounds} rounds of {args.calls} calls")
    print(f"{'version':<12} {'call':<20} {'min':>7} {'median':>7} {'max':>7}")
    for label, per_call in zip(labels, rounds, strict=True):
        for name, figures in per_call.items():
            print(
                f"{label:<12} {name:<20} {min(figures):>7.1f} "
                f"{statistics.median(figures):>7.1f} {max(figures):>7.1f}"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
