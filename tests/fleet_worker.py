"""One process of a fleet sharing an account through Redis; run by tests/test_redis_fleet.py.

``python -m tests.fleet_worker '<json config>'`` with ``config["mode"]``:

- ``"fill"``: from the wall-clock instant ``start_at`` to ``start_at + run_s``,
  ``tasks`` tasks acquire as fast as the limits allow and hold each permit for
  ``hold_s``. Prints one JSON line: ``{"admissions": [[granted_at, released_at,
  rpm_slice_index], ...], "errors": [...]}``. ``granted_at`` is ``time.time()``
  read right after the grant came back, ``released_at`` right before the release
  is sent, so each recorded hold lies inside the server's own.
- ``"hold"``: acquires ``slots`` permits and keeps them (the leases renewed) for
  ever; prints ``held <time.time()>`` once they are all granted. The test kills it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import ratekit
from ratekit.backends.redis import RedisBackend


def _limits(config: dict[str, Any]) -> ratekit.Limits:
    return ratekit.Limits(concurrency=config.get("concurrency"), rpm=config["rpm"]).compressed(
        config.get("speed", 60)
    )


def _backend(config: dict[str, Any]) -> RedisBackend:
    return RedisBackend(
        config["url"],
        namespace=config["namespace"],
        lease_ttl_s=config["lease_ttl_s"],
        cluster=config.get("cluster", False),
    )


async def _fill(config: dict[str, Any]) -> dict[str, Any]:
    backend = _backend(config)
    limiter = ratekit.Limiter(_limits(config), backend=backend)
    await limiter.statistics()  # connected and the scripts' keys known before the start
    start_at, hold_s = config["start_at"], config["hold_s"]
    end_at = start_at + config["run_s"]
    admissions: list[tuple[float, float, float]] = []
    errors: list[str] = []

    async def one_task() -> None:
        while (left_s := end_at - time.time()) > 0:
            try:
                async with limiter.acquire(timeout=left_s) as permit:
                    granted_at = time.time()
                    # The rpm window's slice index on the server's clock (see the test).
                    index = float(permit._grant.indexes[0])  # type: ignore[attr-defined]
                    await asyncio.sleep(hold_s)
                    admissions.append((granted_at, time.time(), index))
            except ratekit.AcquireTimeout:
                return

    await asyncio.sleep(max(start_at - time.time(), 0.0))
    try:
        async with asyncio.timeout(config["run_s"] + 10):
            results = await asyncio.gather(
                *(one_task() for _ in range(config["tasks"])), return_exceptions=True
            )
        errors += [repr(result) for result in results if isinstance(result, BaseException)]
    finally:
        await backend.aclose()
    return {"admissions": admissions, "errors": errors}


async def _hold(config: dict[str, Any]) -> None:
    backend = _backend(config)
    limiter = ratekit.Limiter(_limits(config), backend=backend)
    permits = [await limiter.acquire(timeout=5) for _ in range(config["slots"])]
    print(f"held {time.time()!r}", flush=True)
    await asyncio.sleep(3600)
    del permits  # never reached: the test kills this process


def main() -> None:
    config = json.loads(sys.argv[1])
    if config["mode"] == "fill":
        print(json.dumps(asyncio.run(_fill(config))), flush=True)
    elif config["mode"] == "hold":
        asyncio.run(_hold(config))
    else:
        raise SystemExit(f"unknown mode {config['mode']!r}")


if __name__ == "__main__":
    main()
