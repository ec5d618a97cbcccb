"""One process of the one-admission tests (tests/test_one_admission.py).

``python -m tests.one_admission_worker '<json config>'`` runs one of two modes:

- ``"mode": "callers"``: builds a `Scheduler` on StepFun V5 (10,000 in flight,
  the cap that binds) over ``RedisBackend(url, namespace=...)``, prints ``ready``,
  waits for a line on stdin (so that every process starts at once), gathers
  ``callers`` submits of a short call, and prints one JSON line:
  ``{"ok": n, "errors": {type: count}, "sample": [repr, ...], "elapsed_s": s}``.
- ``"mode": "tokenizer"``: with a `tiktoken` on the path whose load is slow (the
  test writes one), wraps an openai client against the mock provider while a
  ticker measures how late the event loop runs, makes one call, and prints
  ``{"max_lag_s": s, "loads": n}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import anyio


async def _callers(config: dict[str, Any]) -> dict[str, Any]:
    import ratekit

    backend = ratekit.RedisBackend(config["url"], namespace=config["namespace"])
    scheduler = ratekit.Scheduler(ratekit.Account("stepfun", tier="V5"), backend=backend)

    async def call() -> int:
        await asyncio.sleep(config.get("call_s", 0.01))
        return 1

    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.readline)
    start = time.monotonic()
    try:
        with anyio.fail_after(config["timeout_s"]):
            results = await asyncio.gather(
                *(scheduler.submit(call) for _ in range(config["callers"])),
                return_exceptions=True,
            )
    finally:
        elapsed_s = time.monotonic() - start
        with anyio.move_on_after(5, shield=True):
            await backend.aclose()
    errors = [result for result in results if isinstance(result, BaseException)]
    return {
        "ok": sum(1 for result in results if result == 1),
        "errors": dict(Counter(type(error).__name__ for error in errors)),
        "sample": [repr(error) for error in errors[:3]],
        "elapsed_s": elapsed_s,
    }


async def _tokenizer(config: dict[str, Any]) -> dict[str, Any]:
    import openai
    import tiktoken  # the slow stand-in the test put on the path

    import ratekit
    from ratekit.testing.mock_provider import MockProvider

    loop = asyncio.get_running_loop()
    lags: list[float] = []
    running = True

    async def ticker() -> None:
        while running:
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    async with MockProvider(ratekit.Limits(rpm=1000), completion_tokens=3) as server:
        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        scheduler = ratekit.Scheduler(ratekit.Account("moonshot", tier="tier1"))
        client = openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        try:
            wrapped = ratekit.wrap(client, scheduler)
            with anyio.fail_after(config["timeout_s"]):
                await wrapped.chat.completions.create(
                    model="kimi-k2",
                    messages=[{"role": "user", "content": "hello world!"}],
                    max_tokens=5,
                )
            await asyncio.sleep(0.05)
        finally:
            running = False
            await ticking
            await client.close()
    return {"max_lag_s": max(lags), "loads": tiktoken.LOADS}


def main() -> None:
    config = json.loads(sys.argv[1])
    run = _callers if config["mode"] == "callers" else _tokenizer
    print(json.dumps(asyncio.run(run(config))), flush=True)


if __name__ == "__main__":
    main()
