"""A pool file: the accounts of a pool, for the command line (``--pool pool.toml``).

Pure: reading and checking the file does no I/O beyond reading it, opens no
connection and reads no key. An account names its API key by the environment
variable that holds it (``api_key_env``), never the key itself::

    prefer = "cheapest"      # order (the default), cheapest or headroom
    out_s = 300              # how long an account whose quota is spent stays out

    [accounts.kimi-a]        # accounts in order of preference
    provider = "moonshot"    # a bundled provider or a profile file
    tier = "tier2"           # or top_up = 50; the first tier without either
    api_key_env = "KIMI_KEY_A"
    # base_url = "..."       # default: the profile's for the OpenAI API
    # models = ["kimi-k2"]   # or {"kimi-k2" = "moonshotai/kimi-k2"}; default: any
    # discount = 0.8         # times the listed prices, for prefer = "cheapest"
    # rpm = 100              # limits of your contract (concurrency, rpm, tpm, tpd)
    # namespace = "kimi-a"   # its Redis namespace (default: the account's name)
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._account import Account
from ._errors import ProfileError, RatekitError
from ._pool import _DEFAULT_OUT_S, PREFERENCES
from ._profiles import LIMIT_KEYS

_TOP_KEYS = ("prefer", "out_s", "accounts")
_ACCOUNT_KEYS = (
    "provider",
    "tier",
    "top_up",
    "api_key_env",
    "base_url",
    "models",
    "discount",
    "namespace",
    *LIMIT_KEYS,
)


@dataclass(frozen=True)
class PoolAccount:
    """One account of a pool file: its `Account`, and how to reach and name it."""

    name: str
    provider: str  # as the file names it: a bundled provider or a profile file
    overrides: Mapping[str, Any]  # the file's limits of the account (rpm, ...)
    account: Account
    api_key_env: str | None
    base_url: str | None
    models: Mapping[str, str] | list[str] | None
    discount: float
    namespace: str

    def url(self, api: str = "openai") -> str:
        """Where calls are sent: `base_url`, else the profile's for `api`."""
        return self.base_url or self.account.profile.base_url(api)


@dataclass(frozen=True)
class PoolFile:
    """A pool file read and checked: its accounts in order of preference."""

    source: str
    accounts: list[PoolAccount] = field(default_factory=list)
    prefer: str = "order"
    out_s: float = _DEFAULT_OUT_S


def _check(source: str, where: str, ok: bool, message: str) -> None:
    if not ok:
        raise ProfileError(source, where, message)


def _text(source: str, where: str, value: object) -> str:
    _check(source, where, isinstance(value, str) and bool(value), f"must be a text, got {value!r}")
    assert isinstance(value, str)
    return value


def _number(source: str, where: str, value: object) -> float:
    _check(
        source,
        where,
        isinstance(value, int | float) and not isinstance(value, bool),
        f"must be a number, got {value!r}",
    )
    assert isinstance(value, int | float)
    return float(value)


def _account(source: str, name: str, table: object) -> PoolAccount:
    where = f"accounts.{name}"
    _check(source, where, isinstance(table, Mapping), f"must be a table, got {table!r}")
    assert isinstance(table, Mapping)
    unknown = sorted(set(table) - set(_ACCOUNT_KEYS))
    _check(
        source,
        f"{where}.{unknown[0] if unknown else ''}",
        not unknown,
        f"unknown key; an account takes {', '.join(_ACCOUNT_KEYS)}",
    )
    _check(source, f"{where}.provider", "provider" in table, "is required")
    provider = _text(source, f"{where}.provider", table["provider"])
    options: dict[str, Any] = {key: table[key] for key in LIMIT_KEYS if key in table}
    if "tier" in table:
        options["tier"] = _text(source, f"{where}.tier", table["tier"])
    if "top_up" in table:
        options["top_up"] = _number(source, f"{where}.top_up", table["top_up"])
    try:
        account = Account(provider, **options)
    except RatekitError as error:
        raise ProfileError(source, where, str(error)) from None
    api_key_env = None
    if "api_key_env" in table:
        api_key_env = _text(source, f"{where}.api_key_env", table["api_key_env"])
    base_url = None
    if "base_url" in table:
        base_url = _text(source, f"{where}.base_url", table["base_url"])
        _check(
            source,
            f"{where}.base_url",
            base_url.startswith(("https://", "http://")),
            f"must be an http(s) URL, got {base_url!r}",
        )
    else:
        _check(
            source,
            f"{where}.base_url",
            "openai" in account.profile.apis,
            f"is required: the {provider} profile names no OpenAI-compatible URL",
        )
    models = table.get("models")
    if models is not None:
        names = models.items() if isinstance(models, Mapping) else []
        fine = bool(models) and (
            (isinstance(models, list) and all(isinstance(m, str) and m for m in models))
            or all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in names)
        )
        fine = fine and isinstance(models, list | Mapping)
        _check(
            source,
            f"{where}.models",
            fine,
            f"must be a non-empty list of model names or a table of names, got {models!r}",
        )
    discount = 1.0
    if "discount" in table:
        discount = _number(source, f"{where}.discount", table["discount"])
        _check(
            source, f"{where}.discount", 0 < discount <= 1e6, f"must be in (0, 1e6], got {discount}"
        )
    namespace = name
    if "namespace" in table:
        namespace = _text(source, f"{where}.namespace", table["namespace"])
    limits = {key: table[key] for key in LIMIT_KEYS if key in table}
    return PoolAccount(
        name,
        provider,
        limits,
        account,
        api_key_env,
        base_url,
        dict(models) if isinstance(models, Mapping) else models,
        discount,
        namespace,
    )


def parse_pool(data: Mapping[str, Any], source: str = "<pool>") -> PoolFile:
    """A pool file's parsed TOML, checked: `ProfileError` names the file and the field."""
    unknown = sorted(set(data) - set(_TOP_KEYS))
    _check(
        source,
        unknown[0] if unknown else "",
        not unknown,
        f"unknown key; a pool file takes {', '.join(_TOP_KEYS)}",
    )
    prefer = data.get("prefer", "order")
    _check(
        source,
        "prefer",
        prefer in PREFERENCES,
        f"must be one of {', '.join(PREFERENCES)}, got {prefer!r}",
    )
    out_s = _number(source, "out_s", data.get("out_s", _DEFAULT_OUT_S))
    _check(source, "out_s", 0 <= out_s <= 86_400, f"must be in [0, 86400] seconds, got {out_s}")
    accounts = data.get("accounts")
    _check(
        source,
        "accounts",
        isinstance(accounts, Mapping) and bool(accounts),
        "needs at least one [accounts.<name>] table",
    )
    assert isinstance(accounts, Mapping)
    read = [_account(source, name, table) for name, table in accounts.items()]
    if prefer == "cheapest":
        currencies = sorted({a.account.profile.currency for a in read})
        _check(
            source,
            "prefer",
            len(currencies) == 1,
            "cheapest compares prices in one currency; the accounts price in "
            + ", ".join(currencies),
        )
    return PoolFile(source, read, prefer, out_s)


def load_pool(path: str | Path) -> PoolFile:
    """Read and check the pool file at `path` (see the module's docstring)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ProfileError(source, "", f"cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ProfileError(source, "", f"is not UTF-8 text ({error.reason})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ProfileError(source, "", f"is not valid TOML ({error})") from None
    return parse_pool(data, source)
