"""A pool's client (`Pool.client`): one SDK client whose calls go to the account that
admits them.

Each member's client is wrapped as `wrap` wraps it (its own scheduler, estimator,
prices, retries off). A call of the pool's client is planned for every account that
serves its model (tokens by that account's tokenizer, money at its prices), admitted
by the pool on one of them, and sent by that account's wrapped create with the
admission already made: its request hook then only says when the request left.
"""

from __future__ import annotations

from typing import Any

import anyio

from .._errors import InvalidArgumentError, PoolExhaustedError
from .._limits import show
from .._pool import Member, Pool
from ._calling import SdkRetries, _Api, _api_of, _Plan, stream_params
from ._wrap import _COPIES, _Create, _is_sync, _Proxy, wrap


def pool_client(pool: Pool, *, priority: int = 0, timeout: float | None = None) -> Any:
    """See `Pool.client`."""
    apis: dict[str, _Api] = {}
    proxies: dict[str, _Proxy] = {}
    for name, member in pool.members.items():
        client = member.client
        if client is None:
            raise InvalidArgumentError(
                f"Pool.client: member {name!r} has no client; give each Member a client "
                "(Member(scheduler, client=AsyncOpenAI(...)))"
            )
        if _is_sync(client):
            raise InvalidArgumentError(
                f"Pool.client: member {name!r} has a sync client ({type(client).__name__}); "
                "a pool's client is async: give each member an async client"
            )
        apis[name] = _api_of(client)
        wrapped = wrap(client, member.scheduler, priority=priority, timeout=timeout)
        proxies[name] = wrapped  # a _Proxy, typed as the client
    kinds = {api.name for api in apis.values()}
    if len(kinds) > 1:
        named = ", ".join(f"{name}: {api.name}" for name, api in apis.items())
        raise InvalidArgumentError(
            f"Pool.client: every member's client must speak one API, got {named}"
        )
    api = next(iter(apis.values()))
    first = next(iter(proxies.values()))
    return _PoolProxy(pool, proxies, (), api, first._retries)


class _PoolProxy:
    """The members' wrapped clients side by side: along the paths to an admitted create
    the pool chooses; every other attribute is the first member's client's."""

    __slots__ = ("_api", "_path", "_pool", "_proxies", "_retries")

    def __init__(
        self,
        pool: Pool,
        proxies: dict[str, Any],
        path: tuple[str, ...],
        api: _Api,
        retries: int,
    ) -> None:
        self._pool = pool
        self._proxies = proxies
        self._path = path
        self._api = api
        self._retries = retries

    def __getattr__(self, name: str) -> Any:
        path = (*self._path, name)
        api = self._api
        if path in api.prefixes:
            inner = {account: getattr(proxy, name) for account, proxy in self._proxies.items()}
            return _PoolProxy(self._pool, inner, path, api, self._retries)
        if path in api.admitted:
            creates = {account: getattr(proxy, name) for account, proxy in self._proxies.items()}
            return _PoolCreate(self._pool, creates, self._retries)
        if path in api.helpers:
            raise InvalidArgumentError(
                f"Pool.client: {'.'.join(path)}(...) is not served through a pool; use "
                "messages.create(stream=True), which is"
            )
        if not self._path and name in _COPIES:
            return self._copied(name)
        return getattr(next(iter(self._proxies.values())), name)

    def _copied(self, name: str) -> Any:
        """``with_options(...)``/``copy(...)``: the same options on every member's client,
        still behind the pool (never the first member's client alone)."""

        def copy(*args: Any, **options: Any) -> _PoolProxy:
            copies = {
                account: getattr(proxy, name)(*args, **options)
                for account, proxy in self._proxies.items()
            }
            return _PoolProxy(self._pool, copies, (), self._api, self._retries)

        return copy

    async def close(self) -> None:
        """Close every member's client."""
        for proxy in self._proxies.values():
            await proxy.close()

    async def __aenter__(self) -> _PoolProxy:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"ratekit.Pool.client({', '.join(self._proxies)})"


class _PoolCreate:
    """One admitted create of a pool's client."""

    __slots__ = ("_creates", "_pool", "_retries")

    def __init__(self, pool: Pool, creates: dict[str, _Create], retries: int) -> None:
        self._pool = pool
        self._creates = creates
        self._retries = retries

    async def __call__(self, **params: Any) -> Any:
        pool = self._pool
        model = params.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidArgumentError(f"Pool.client: model must be a str, got {show(model)}")
        streamed = bool(params.get("stream"))
        # The call as each account would take it: its model name, tokenizer and prices.
        planned: dict[str, tuple[dict[str, Any], _Plan, bool]] = {}
        for member in pool._candidates(model):
            planned[member.name] = await self._planned(member, model, params, streamed)
        _, first, _ = next(iter(planned.values()))

        def ask(member: Member, own: str | None) -> tuple[float, float]:
            _, plan, _ = planned[member.name]
            return plan.tokens, plan.cost

        clock = pool._clock
        deadline_s = None if first.timeout is None else clock.now() + first.timeout
        retries = SdkRetries(self._retries)
        last: Exception | None = None
        tries = 0
        while True:
            left = None if deadline_s is None else max(deadline_s - clock.now(), 0.0)
            try:
                served = await pool.admit_each(
                    ask, model=model, priority=first.priority, timeout=left, tenant=first.tenant
                )
            except PoolExhaustedError as error:
                raise error from last
            sent, plan, hide_usage = planned[served.account]
            create = self._creates[served.account]
            tries += 1
            try:
                if streamed:
                    # Opened: the account answered (its stream settles the admission).
                    answer = await create._open(sent, plan, None, hide_usage, served.admission)
                else:
                    answer = await create._call(sent, plan, None, served.admission)
            except BaseException as error:
                if not isinstance(error, Exception):
                    pool._probe_ended(served)  # cancelled: a probe there is given up
                    raise
                # The account's scheduler has ended the admission and answered a 429.
                await pool.answered(served, error)
                last = error
                if pool._retryable(error):
                    if tries < pool.max_attempts:
                        continue
                    raise
                wait_s = retries.wait_after(error)
                if wait_s is None:
                    raise
                await clock.wait(anyio.Event(), wait_s)  # the SDK's backoff, on the pool's clock
                continue
            await pool.answered(served, None)
            return answer

    async def _planned(
        self, member: Member, model: str | None, params: dict[str, Any], streamed: bool
    ) -> tuple[dict[str, Any], _Plan, bool]:
        """(the params as sent to `member`, its plan, whether its stream's usage chunk is
        ratekit's to hide)."""
        own = dict(params)
        if model is not None:
            own["model"] = member.model_for(model)
        create = self._creates[member.name]
        plan = await create._plan(own)
        if not streamed:
            return own, plan, False
        sent, hide_usage = stream_params(create._kind, own)
        return sent, plan, hide_usage
