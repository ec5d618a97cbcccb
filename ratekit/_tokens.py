"""Token estimates before a call: how many tokens to reserve for a request.

A limiter admits a call on its *estimated* tokens (prompt + the most output it may
produce) and the real usage from the response replaces the estimate at settle time.
The estimate should rather be too large than too small: a reservation that is too
small lets a burst through that the provider then answers with 429s.

Three ways to get the number, from most to least exact:

- pass ``tokens=`` yourself (the count from your own tokenizer): `tokens_to_reserve`
  uses it as is;
- pass any object with ``count(text) -> int`` (the `TokenEstimator` protocol), for
  instance `TiktokenEstimator` (exact for OpenAI models, needs ``tiktoken``);
- `HeuristicEstimator`: no dependency, O(n), CJK-aware, slightly conservative.

`default_estimator` picks tiktoken when it is installed *and* its encoding loads,
else the heuristic with the profile's hint; it may block while the encoding loads.
`BackgroundEstimator` never blocks: it counts with the heuristic until tiktoken has
loaded in a thread of its own (what the integrations use). `estimate_prompt_tokens` and
`estimate_request_tokens` turn OpenAI request parameters (chat messages, embeddings
input, responses input) into (prompt tokens, maximum output tokens).

Every estimator here may be shared across tasks, threads and event loops. All are
immutable after construction, except that a `BackgroundEstimator`'s counts switch from
the heuristic's to tiktoken's once the encoding has loaded.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from ._errors import RatekitError, UnknownNameError
from ._estimate import TokenEstimate

if TYPE_CHECKING:
    from ._profiles import Profile

__all__ = [
    "AUDIO_TOKENS",
    "DEFAULT_CJK_TOKENS_PER_CHARACTER",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "FILE_TOKENS",
    "IMAGE_LOW_DETAIL_TOKENS",
    "IMAGE_TOKENS",
    "PER_MESSAGE_OVERHEAD",
    "REPLY_PRIMING_TOKENS",
    "REQUEST_KINDS",
    "BackgroundEstimator",
    "HeuristicEstimator",
    "RequestShapeError",
    "TiktokenEstimator",
    "TokenEstimator",
    "TokenizerUnavailableError",
    "UnknownRequestKindError",
    "default_estimator",
    "estimate_prompt_tokens",
    "estimate_request_tokens",
    "tokens_to_reserve",
]

# --- errors ----------------------------------------------------------------------------

TOKENIZER_INSTALL_HINT: Final = "pip install 'ratekit[tokenizer]'"


class TokenizerUnavailableError(RatekitError, RuntimeError):
    """A tokenizer cannot be used: its package is not installed or its encoding won't load.

    `encoding` names the encoding asked for; `reason` says what failed.
    """

    def __init__(self, encoding: str, reason: str) -> None:
        self.encoding = encoding
        self.reason = reason
        super().__init__(f"tokenizer encoding {encoding!r} is unavailable: {reason}")


class UnknownRequestKindError(UnknownNameError):
    """`estimate_request_tokens` was given a request kind it does not know."""

    kind = "request kind"


class RequestShapeError(RatekitError, ValueError):
    """Request parameters whose shape no OpenAI endpoint accepts; names the field and value."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


# --- the protocol ----------------------------------------------------------------------


@runtime_checkable
class TokenEstimator(Protocol):
    """Anything that tells how many tokens a text is: ``count(text) -> int`` (tokens, >= 0).

    Implement it to plug in your provider's own tokenizer.
    """

    def count(self, text: str) -> int:
        """Tokens in `text` (a whole number >= 0)."""
        ...


# --- the heuristic ---------------------------------------------------------------------

DEFAULT_CJK_TOKENS_PER_CHARACTER: Final = 1.0
"""Tokens per CJK ideograph, kana or hangul syllable when no profile hint is given.

Measured on our samples: o200k_base (GPT-4o family) spends 0.77-0.87 tokens per such
character, cl100k_base (GPT-4, GPT-3.5) 1.0-1.3, tokenizers of Chinese vendors about
0.6 (MiniMax: 1,000 tokens per 1,600 characters). 1.0 over-reserves for the first and
the last and is within about 15 % of the second.
"""

# Costs of the heuristic, in tokens, fitted to tiktoken's o200k_base on ratekit's own
# sources, docs and provider pages (English prose, code, TOML, JSON, some Chinese), then
# rounded; `_SAFETY_FACTOR` puts the estimate above the fit. See tests/test_tokens.py.
_WORD_TOKENS: Final = 1.0  # a Latin word (the space before it rides along) ...
_WORD_FREE_LETTERS: Final = 6  # ... whose first 6 letters fit in that token ...
_WORD_LETTERS_PER_TOKEN: Final = 7  # ... and each further 7 letters add one
_DIGITS_PER_TOKEN: Final = 3  # BPE vocabularies split numbers into groups of 3 digits
_NUMBER_TOKENS: Final = 0.5  # a number's own share (the separator next to it)
_SPACE_TOKENS: Final = 1.0  # a lone space not followed by a word (before a digit)
_BLANK_TOKENS: Final = 0.5  # a run of 2+ blanks (indentation), per 16 of them
_BLANKS_PER_STEP: Final = 16
_NEWLINE_TOKENS: Final = 1.25  # a run of line breaks
_PUNCT_RUN_TOKENS: Final = 0.5  # a run of ASCII punctuation (often merged with a word) ...
_PUNCT_CHAR_TOKENS: Final = 0.15  # ... plus this per character of the run
_OTHER_LETTER_TOKENS: Final = 0.5  # a non-Latin, non-CJK letter (Cyrillic, Greek, Arabic)
_RARE_CJK_TOKENS: Final = 2.0  # an ideograph from an extension block: split into bytes
_ASTRAL_TOKENS: Final = 2.0  # an emoji or other character beyond the BMP: 4 UTF-8 bytes
_OTHER_TOKENS: Final = 1.0  # any other character: CJK punctuation, symbols, marks
_SAFETY_FACTOR: Final = 1.1  # the reservation must not be too small

# One alternative per kind of run; the text is scanned once, left to right.
_LATIN: Final = "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f"
_ASCII_PUNCT: Final = "!-/:-@\\[-`{-~"
_CJK_RANGES: Final = (
    "\u3040-\u30ff"  # hiragana, katakana
    "\u31f0-\u31ff"  # katakana phonetic extensions
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uac00-\ud7af"  # hangul syllables
    "\u1100-\u11ff\u3130-\u318f"  # hangul jamo
)
_RARE_CJK_RANGES: Final = "\u3400-\u4dbf\U00020000-\U0003ffff"  # CJK extensions A, B...
_RUNS: Final = re.compile(
    rf"(?P<cjk>[{_CJK_RANGES}]+)"
    rf"|(?P<rare>[{_RARE_CJK_RANGES}]+)"
    rf"|(?P<word>[{_LATIN}]+)"
    r"|(?P<digits>[0-9]+)"
    # A single space before a word or punctuation joins its token (not before digits).
    rf"|(?P<space> (?=[^\W\d_]|[{_ASCII_PUNCT}]))"
    r"|(?P<blank>[ \t]+)"
    r"|(?P<newline>[\r\n]+)"
    rf"|(?P<punct>[{_ASCII_PUNCT}]+)"
    r"|(?P<letters>[^\W\d_]+)"
    r"|(?P<astral>[\U00010000-\U0010ffff])"
    r"|(?P<other>.)",
    re.DOTALL,
)


def _run_tokens(kind: str | None, size: int) -> float:
    """Tokens of one run of `size` characters of `kind` (CJK is counted by the caller)."""
    if kind == "word":
        extra = max(0, size - _WORD_FREE_LETTERS)
        return _WORD_TOKENS + extra / _WORD_LETTERS_PER_TOKEN
    if kind == "digits":
        return -(-size // _DIGITS_PER_TOKEN) + _NUMBER_TOKENS
    if kind == "space":
        return 0.0
    if kind == "blank":
        return _SPACE_TOKENS if size == 1 else _BLANK_TOKENS * -(-size // _BLANKS_PER_STEP)
    if kind == "newline":
        return _NEWLINE_TOKENS
    if kind == "punct":
        return _PUNCT_RUN_TOKENS + _PUNCT_CHAR_TOKENS * size
    if kind == "letters":
        return size * _OTHER_LETTER_TOKENS
    if kind == "rare":
        return size * _RARE_CJK_TOKENS
    if kind == "astral":
        return _ASTRAL_TOKENS
    return size * _OTHER_TOKENS


class HeuristicEstimator:
    """Estimates tokens from character classes: fast (one regex pass), no dependencies.

    The text is cut into runs (Latin words, numbers, blanks, line breaks, punctuation,
    CJK, other scripts) and each run costs a fixed number of tokens, fitted to OpenAI's
    o200k_base: a Latin word 1 token plus 1 per 7 letters beyond its sixth (the space
    before it is free), a number 1 per 3 digits plus 0.5, a line break 1.25, a run of
    ASCII punctuation 0.5 plus 0.15 per character, another script's letter 0.5, a rare
    ideograph or an emoji 2, anything else 1. That sum is multiplied by 1.1 so that it
    errs on the high side. CJK ideographs, kana and hangul then add
    `cjk_tokens_per_character` each, unscaled: the `hint`'s ratio when given (MiniMax:
    1,000 tokens per 1,600 characters = 0.625), else `DEFAULT_CJK_TOKENS_PER_CHARACTER`
    (1.0). The total is rounded up.

    Measured against o200k_base (tests/test_tokens.py): English, code, JSON, Chinese,
    Japanese, Korean and mixed text within -5 % / +36 %; Cyrillic, Greek, Arabic and
    Hindi over by 50-90 %. Known weak spot: rare ideographs in the main CJK block
    (such as 龘) that tiktoken splits into 2 tokens count as 1, about 50 % under.
    Deterministic, O(n); immutable and shareable across tasks and threads.
    """

    __slots__ = ("_cjk_rate", "_hint")

    def __init__(self, hint: TokenEstimate | None = None) -> None:
        if hint is not None and not isinstance(hint, TokenEstimate):
            raise TypeError(f"hint must be a TokenEstimate or None, got {hint!r}")
        self._hint = hint  # the provider's published ratio, or None
        # tokens per CJK character: the hint's ratio, else the default
        self._cjk_rate = (
            hint.tokens / hint.characters if hint is not None else DEFAULT_CJK_TOKENS_PER_CHARACTER
        )

    @property
    def hint(self) -> TokenEstimate | None:
        """The provider hint this estimator was built with (`None`: the default rate)."""
        return self._hint

    @property
    def cjk_tokens_per_character(self) -> float:
        """Tokens counted for each CJK ideograph, kana or hangul character."""
        return self._cjk_rate

    def count(self, text: str) -> int:
        """Estimated tokens in `text`, rounded up (0 for the empty string)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        tokens = 0.0
        cjk_characters = 0
        for match in _RUNS.finditer(text):
            kind = match.lastgroup
            if kind == "cjk":
                cjk_characters += match.end() - match.start()
            else:
                tokens += _run_tokens(kind, match.end() - match.start())
        tokens = tokens * _SAFETY_FACTOR + cjk_characters * self._cjk_rate
        return math.ceil(tokens - 1e-9)

    def __repr__(self) -> str:
        return f"HeuristicEstimator(hint={self._hint!r})"


# --- tiktoken --------------------------------------------------------------------------


class _Encoding(Protocol):
    """The part of `tiktoken.Encoding` used here."""

    @property
    def name(self) -> str: ...

    def encode_ordinary(self, text: str) -> list[int]: ...


DEFAULT_LOAD_TIMEOUT_S: Final = 10.0

_loaded: dict[str, _Encoding] = {}  # encodings loaded once per process, by name
_loaded_lock = threading.Lock()


def _load_in_thread(load: Callable[[], _Encoding], name: str, timeout_s: float) -> _Encoding:
    """Run `load` in a daemon thread; give up after `timeout_s` seconds.

    tiktoken downloads an encoding file on first use, without a timeout; where the
    network is closed that call may hang, so it runs apart and is abandoned if late.
    """
    box: list[_Encoding] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            box.append(load())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"ratekit-tiktoken-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if box:
        return box[0]
    if failure:
        exc = failure[0]
        raise TokenizerUnavailableError(
            name,
            f"tiktoken could not load it ({type(exc).__name__}: {exc}); tiktoken downloads "
            "encoding files on first use: put the file in the directory named by "
            "TIKTOKEN_CACHE_DIR, or pass a loaded tiktoken.Encoding",
        ) from exc
    raise TokenizerUnavailableError(
        name,
        f"tiktoken did not load it within {timeout_s:g} s (it downloads encoding files on "
        "first use; is the network closed?): put the file in the directory named by "
        "TIKTOKEN_CACHE_DIR, or pass a loaded tiktoken.Encoding",
    )


def _import_tiktoken() -> Any:
    try:
        import tiktoken
    except ImportError:
        raise TokenizerUnavailableError(
            "tiktoken", f"the tiktoken package is not installed: {TOKENIZER_INSTALL_HINT}"
        ) from None
    return tiktoken


def _load_encoding(name: str, timeout_s: float) -> _Encoding:
    with _loaded_lock:
        if name in _loaded:
            return _loaded[name]
    tiktoken = _import_tiktoken()
    encoding = _load_in_thread(lambda: tiktoken.get_encoding(name), name, timeout_s)
    with _loaded_lock:
        return _loaded.setdefault(name, encoding)


class TiktokenEstimator:
    """Exact token counts with OpenAI's tokenizer (`tiktoken`, the ``tokenizer`` extra).

    `encoding` is an encoding name (``"o200k_base"``: GPT-4o, GPT-4.1, o-series;
    ``"cl100k_base"``: GPT-4, GPT-3.5) or an already loaded ``tiktoken.Encoding``.
    The encoding is loaded at construction, at most `load_timeout_s` seconds, and kept
    for the process. Raises `TokenizerUnavailableError` when tiktoken is not installed
    (the message names ``pip install 'ratekit[tokenizer]'``) or when the encoding can't
    be loaded: tiktoken downloads it on first use, so on a machine without network
    point ``TIKTOKEN_CACHE_DIR`` at a directory holding the file.

    Special-token text (``<|endoftext|>``) is counted as ordinary text. Other
    providers' tokenizers differ: for them this is an estimate too.
    """

    __slots__ = ("_encoding",)

    def __init__(
        self,
        encoding: str | _Encoding = "o200k_base",
        *,
        load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
    ) -> None:
        if isinstance(encoding, str):
            if not (isinstance(load_timeout_s, int | float) and load_timeout_s > 0):
                raise ValueError(f"load_timeout_s must be > 0 seconds, got {load_timeout_s!r}")
            self._encoding = _load_encoding(encoding, float(load_timeout_s))
        elif callable(getattr(encoding, "encode_ordinary", None)):
            self._encoding = encoding
        else:
            raise TypeError(
                f"encoding must be an encoding name or a tiktoken.Encoding, got {encoding!r}"
            )

    @property
    def encoding_name(self) -> str:
        """The name of the encoding in use (``"o200k_base"``)."""
        return str(getattr(self._encoding, "name", "?"))

    def count(self, text: str) -> int:
        """Tokens in `text` under the encoding (exact)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return len(self._encoding.encode_ordinary(text))

    def __repr__(self) -> str:
        return f"TiktokenEstimator({self.encoding_name!r})"


@functools.cache
def _tiktoken_or_none(encoding: str, timeout_s: float) -> TiktokenEstimator | None:
    """The tiktoken estimator, or None if unusable; the answer is kept for the process,
    so a closed network costs one load attempt, not one per call."""
    try:
        return TiktokenEstimator(encoding, load_timeout_s=timeout_s)
    except TokenizerUnavailableError:
        return None


class BackgroundEstimator:
    """tiktoken once it has loaded, the heuristic until then: a count never blocks.

    Construction starts loading `encoding` in a daemon thread (one load per encoding
    and process, shared by every `BackgroundEstimator`; once done, `default_estimator`
    finds it loaded too) and returns at once. Until the load is done, and for good when it fails
    (tiktoken not installed, no encoding file and no network), `count` is the
    `HeuristicEstimator` with the profile's ``token_estimate`` hint. A load that hangs
    (a download on a closed network) is never waited for. This is what `ratekit.wrap`
    and `RateLimitedTransport` use by default, so that no call on an event loop waits
    for a tokenizer to load. Shareable across tasks, threads and event loops.
    """

    __slots__ = ("_fallback", "_load")

    def __init__(self, profile: Profile | None = None, *, encoding: str = "o200k_base") -> None:
        hint = profile.token_estimate if profile is not None else None
        self._fallback = HeuristicEstimator(hint)  # counts until the load is done
        self._load = _background_load(encoding)  # the shared load of `encoding`

    @property
    def exact(self) -> TiktokenEstimator | None:
        """The tiktoken estimator once loaded, else None (loading, or it failed)."""
        load = self._load
        if not load.done() or load.exception() is not None:
            return None
        return load.result()

    def count(self, text: str) -> int:
        """Tokens in `text`: tiktoken's count once loaded, else the heuristic's."""
        exact = self.exact
        return (exact if exact is not None else self._fallback).count(text)

    def wait_loaded(self, timeout_s: float | None = None) -> bool:
        """Block this thread until the load is over (at most `timeout_s` seconds; None:
        no bound); True when tiktoken is in use. Never call it on an event loop."""
        try:
            self._load.result(timeout_s)
        except Exception:  # not loaded in time, or failed: the heuristic is in use
            return False
        return True

    def __repr__(self) -> str:
        state = "loaded" if self.exact is not None else "heuristic"
        return f"BackgroundEstimator({state}, fallback={self._fallback!r})"


# Loads started in the background, by encoding name; each runs once per process.
_background: dict[str, concurrent.futures.Future[TiktokenEstimator]] = {}
_background_lock = threading.Lock()


def _load_tiktoken(encoding: str) -> TiktokenEstimator:
    """Load `encoding` where blocking is harmless (a worker thread of its own): with no
    time bound, since nobody waits for it; kept for the process like any other load."""
    with _loaded_lock:
        loaded = _loaded.get(encoding)
    if loaded is None:
        tiktoken = _import_tiktoken()
        try:
            found: _Encoding = tiktoken.get_encoding(encoding)
        except Exception as exc:
            raise TokenizerUnavailableError(
                encoding, f"tiktoken could not load it ({type(exc).__name__}: {exc})"
            ) from exc
        with _loaded_lock:
            loaded = _loaded.setdefault(encoding, found)
    return TiktokenEstimator(loaded)


def _background_load(encoding: str) -> concurrent.futures.Future[TiktokenEstimator]:
    with _background_lock:
        load = _background.get(encoding)
        if load is not None:
            return load
        load = _background[encoding] = concurrent.futures.Future()

    def run() -> None:
        try:
            load.set_result(_load_tiktoken(encoding))
        except BaseException as exc:  # kept on the future: the heuristic stays in use
            load.set_exception(exc)

    thread = threading.Thread(target=run, name=f"ratekit-tiktoken-{encoding}", daemon=True)
    thread.start()
    return load


def default_estimator(
    profile: Profile | None = None,
    *,
    encoding: str = "o200k_base",
    load_timeout_s: float = DEFAULT_LOAD_TIMEOUT_S,
) -> TokenEstimator:
    """The best estimator at hand: `TiktokenEstimator` if tiktoken is installed and
    `encoding` loads (tried once per process), else `HeuristicEstimator` with the
    profile's ``token_estimate`` hint (or the default rate when `profile` is `None`).

    For providers other than OpenAI, tiktoken's count is an estimate too (o200k_base
    spends about 0.8 tokens per Chinese character where MiniMax states 0.625: it
    over-reserves, the safe side).

    The first call may block its thread for up to `load_timeout_s` seconds while
    tiktoken loads (or downloads) the encoding: on an event loop use
    `BackgroundEstimator`, which never waits.
    """
    exact = _tiktoken_or_none(encoding, float(load_timeout_s))
    if exact is not None:
        return exact
    hint = profile.token_estimate if profile is not None else None
    return HeuristicEstimator(hint)


# --- requests --------------------------------------------------------------------------

PER_MESSAGE_OVERHEAD: Final = 4
"""Tokens a chat message costs beyond its text (role and separators); OpenAI's chat
format spends 3 plus the role's 1."""

REPLY_PRIMING_TOKENS: Final = 3
"""Tokens every chat request costs once (the assistant turn the reply starts with)."""

IMAGE_TOKENS: Final = 1_445
"""Allowance for one image part: the largest GPT-4o high-detail image (85 + 8 tiles x
170). Image token counts vary by model and size; pass `image_tokens` to change it."""

IMAGE_LOW_DETAIL_TOKENS: Final = 85
"""Allowance for one image part with ``detail: "low"`` (GPT-4o's fixed 85)."""

AUDIO_TOKENS: Final = 1_000
"""Allowance for one audio part (about a minute and a half at GPT-4o's ~10 tokens per
second); pass `audio_tokens` to change it."""

FILE_TOKENS: Final = 4_000
"""Allowance for one file part (a document the provider reads; a few pages)."""

DEFAULT_MAX_OUTPUT_TOKENS: Final = 4_096
"""Output tokens reserved when a request sets no cap (no ``max_tokens``,
``max_completion_tokens`` or ``max_output_tokens``). A model may write more; settle
corrects the reservation with the real usage."""

_TEXT_PART_TYPES: Final = frozenset({"text", "input_text", "output_text"})
_IMAGE_PART_TYPES: Final = frozenset({"image_url", "input_image", "image"})
_AUDIO_PART_TYPES: Final = frozenset({"input_audio", "audio"})
_FILE_PART_TYPES: Final = frozenset({"file", "input_file", "document"})
_MESSAGE_TEXT_KEYS: Final = ("role", "name", "tool_call_id", "refusal")


class _Allowances:
    """Fixed token allowances for non-text parts (images, audio, files)."""

    __slots__ = ("audio", "file", "image")

    def __init__(self, image: int, audio: int, file: int) -> None:
        self.image = _count_arg("image_tokens", image)  # one image part, high detail
        self.audio = _count_arg("audio_tokens", audio)  # one audio part
        self.file = _count_arg("file_tokens", file)  # one file part


def _count_arg(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _count(estimator: TokenEstimator, text: str) -> int:
    tokens = estimator.count(text)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise TypeError(f"{estimator!r}.count() must return an int >= 0, got {tokens!r}")
    return tokens


def _plain(value: object) -> object:
    """`value` as JSON-like data: an SDK's own object (a pydantic model, such as the
    content blocks of an answer sent back in the next request) as its dict."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, Mapping | str):
        try:
            return dump(exclude_none=True)
        except Exception:
            return value
    return value


def _part_tokens(part: object, field: str, estimator: TokenEstimator, allow: _Allowances) -> int:
    """Tokens of one content part (OpenAI chat or responses shapes, or an SDK's object)."""
    part = _plain(part)
    if isinstance(part, str):
        return _count(estimator, part)
    if not isinstance(part, Mapping):
        raise RequestShapeError(field, f"expected a content part (a dict), got {part!r}")
    kind = part.get("type")
    if kind in _TEXT_PART_TYPES:
        return _count(estimator, _text(part.get("text", ""), f"{field}.text"))
    if kind == "refusal":
        return _count(estimator, _text(part.get("refusal", ""), f"{field}.refusal"))
    if kind in _IMAGE_PART_TYPES:
        detail = part.get("detail")
        image = part.get("image_url")
        if isinstance(image, Mapping):
            detail = image.get("detail", detail)
        return IMAGE_LOW_DETAIL_TOKENS if detail == "low" else allow.image
    if kind in _AUDIO_PART_TYPES:
        return allow.audio
    if kind in _FILE_PART_TYPES:
        return allow.file
    # An unknown part: count its text leaves, so that nothing readable is free.
    return _count(estimator, _leaf_text(part))


def _text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise RequestShapeError(field, f"expected a str, got {value!r}")
    return value


def _leaf_text(value: object) -> str:
    """Every string in a JSON-like value, joined by spaces (keys of dicts included)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return " ".join(f"{key} {_leaf_text(item)}" for key, item in value.items())
    if isinstance(value, Sequence):
        return " ".join(_leaf_text(item) for item in value)
    return "" if value is None else str(value)


def _content_tokens(
    content: object, field: str, estimator: TokenEstimator, allow: _Allowances
) -> int:
    content = _plain(content)
    if content is None:
        return 0
    if isinstance(content, str):
        return _count(estimator, content)
    if isinstance(content, Sequence):
        return sum(
            _part_tokens(part, f"{field}[{i}]", estimator, allow) for i, part in enumerate(content)
        )
    raise RequestShapeError(field, f"expected a str or a list of parts, got {content!r}")


def _call_tokens(call: object, field: str, estimator: TokenEstimator) -> int:
    """A tool call or legacy function call: its function's name and JSON arguments."""
    if not isinstance(call, Mapping):
        raise RequestShapeError(field, f"expected a dict, got {call!r}")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise RequestShapeError(f"{field}.function", f"expected a dict, got {function!r}")
    text = " ".join(
        _leaf_text(function.get(key)) for key in ("name", "arguments") if key in function
    )
    return _count(estimator, text)


def _message_tokens(
    message: object, field: str, estimator: TokenEstimator, allow: _Allowances
) -> int:
    message = _plain(message)
    if not isinstance(message, Mapping):
        raise RequestShapeError(field, f"expected a message (a dict), got {message!r}")
    tokens = _content_tokens(message.get("content"), f"{field}.content", estimator, allow)
    for key in _MESSAGE_TEXT_KEYS:
        value = message.get(key)
        if isinstance(value, str):
            tokens += _count(estimator, value)
    calls = message.get("tool_calls") or []
    if not isinstance(calls, Sequence) or isinstance(calls, str):
        raise RequestShapeError(f"{field}.tool_calls", f"expected a list, got {calls!r}")
    for i, call in enumerate(calls):
        tokens += _call_tokens(call, f"{field}.tool_calls[{i}]", estimator)
    if message.get("function_call") is not None:
        tokens += _call_tokens(message["function_call"], f"{field}.function_call", estimator)
    return tokens


def estimate_prompt_tokens(
    messages: Sequence[Mapping[str, Any]] | str,
    estimator: TokenEstimator,
    *,
    per_message_overhead: int = PER_MESSAGE_OVERHEAD,
    image_tokens: int = IMAGE_TOKENS,
    audio_tokens: int = AUDIO_TOKENS,
    file_tokens: int = FILE_TOKENS,
) -> int:
    """Prompt tokens of a chat request's `messages` (OpenAI shapes), or of a plain str.

    A str is counted as it is, with no overhead. A list of messages costs, for each
    message, `per_message_overhead` tokens plus its text: ``content`` (a str, or a list
    of parts whose ``{"type": "text", "text": ...}`` are counted), ``name``, ``role``,
    ``tool_call_id``, ``refusal`` and the name and arguments of every tool call; plus
    `REPLY_PRIMING_TOKENS` once. Image parts cost `image_tokens` each (85 with
    ``detail: "low"``), audio parts `audio_tokens`, file parts `file_tokens`: fixed
    allowances, since their true cost depends on pixels and seconds. Raises
    `RequestShapeError` naming the field for a shape no endpoint accepts.
    """
    overhead = _count_arg("per_message_overhead", per_message_overhead)
    allow = _Allowances(image_tokens, audio_tokens, file_tokens)
    if isinstance(messages, str):
        return _count(estimator, messages)
    if not isinstance(messages, Sequence):
        raise RequestShapeError("messages", f"expected a list of messages, got {messages!r}")
    tokens = REPLY_PRIMING_TOKENS
    for i, message in enumerate(messages):
        tokens += overhead + _message_tokens(message, f"messages[{i}]", estimator, allow)
    return tokens


def _tools_tokens(params: Mapping[str, Any], estimator: TokenEstimator) -> int:
    """Tool definitions and a structured-output schema are sent as text in the prompt."""
    tokens = 0
    for key in ("tools", "functions", "response_format"):
        value = params.get(key)
        if value:
            tokens += _count(estimator, json.dumps(value, ensure_ascii=False, default=str))
    text = params.get("text")  # responses.create: {"format": {... json schema ...}}
    if isinstance(text, Mapping) and text.get("format"):
        tokens += _count(estimator, json.dumps(text["format"], ensure_ascii=False, default=str))
    return tokens


def _cap(params: Mapping[str, Any], keys: Sequence[str], default: int) -> int:
    """The first output cap `params` sets among `keys`, else `default`."""
    for key in keys:
        value = params.get(key)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RequestShapeError(key, f"expected an int >= 0, got {value!r}")
            return value
    return default


def _choices(params: Mapping[str, Any]) -> int:
    n = params.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestShapeError("n", f"expected an int >= 1, got {n!r}")
    return n


def _chat(params: Mapping[str, Any], estimator: TokenEstimator, default: int) -> tuple[int, int]:
    if "messages" not in params:
        raise RequestShapeError("messages", "chat.completions.create needs messages")
    prompt = estimate_prompt_tokens(params["messages"], estimator)
    prompt += _tools_tokens(params, estimator)
    output = _cap(params, ("max_completion_tokens", "max_tokens"), default)
    return prompt, output * _choices(params)


def _token_arrays(value: Sequence[Any]) -> int | None:
    """Tokens of a token array (a list of ints), or None if `value` is not one."""
    if value and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return len(value)
    return None


def _inputs_tokens(value: object, field: str, estimator: TokenEstimator) -> int:
    """A str, a list of str, a token array or a list of token arrays."""
    if isinstance(value, str):
        return _count(estimator, value)
    if not isinstance(value, Sequence):
        raise RequestShapeError(
            field, f"expected a str, a list of str or token arrays, got {value!r}"
        )
    exact = _token_arrays(value)
    if exact is not None:
        return exact
    tokens = 0
    for i, item in enumerate(value):
        if isinstance(item, str):
            tokens += _count(estimator, item)
        elif isinstance(item, Sequence) and (n := _token_arrays(item)) is not None:
            tokens += n
        elif isinstance(item, Sequence) and not item:
            pass
        else:
            raise RequestShapeError(
                f"{field}[{i}]", f"expected a str or a token array, got {item!r}"
            )
    return tokens


def _embeddings(
    params: Mapping[str, Any], estimator: TokenEstimator, default: int
) -> tuple[int, int]:
    if "input" not in params:
        raise RequestShapeError("input", "embeddings.create needs input")
    return _inputs_tokens(params["input"], "input", estimator), 0


def _completions(
    params: Mapping[str, Any], estimator: TokenEstimator, default: int
) -> tuple[int, int]:
    prompt_value = params.get("prompt", "")
    prompt = _inputs_tokens(prompt_value, "prompt", estimator)
    prompts = 1
    several = isinstance(prompt_value, Sequence) and not isinstance(prompt_value, str)
    if several and _token_arrays(prompt_value) is None:
        prompts = max(1, len(prompt_value))
    # The legacy endpoint's own default cap is 16 tokens.
    output = _cap(params, ("max_tokens",), 16)
    best_of = params.get("best_of")
    choices = max(_choices(params), best_of if isinstance(best_of, int) else 1)
    return prompt, output * choices * prompts


def _response_item_tokens(
    item: object, field: str, estimator: TokenEstimator, allow: _Allowances
) -> int:
    if not isinstance(item, Mapping):
        raise RequestShapeError(field, f"expected an input item (a dict), got {item!r}")
    kind = item.get("type", "message")
    if kind == "message" or "role" in item:
        return PER_MESSAGE_OVERHEAD + _message_tokens(item, field, estimator, allow)
    if kind in ("function_call", "custom_tool_call"):
        return _call_tokens(item, field, estimator)
    if kind in ("function_call_output", "custom_tool_call_output"):
        return _content_tokens(item.get("output"), f"{field}.output", estimator, allow)
    if kind in ("item_reference", "reasoning"):
        # A reference to stored output, or reasoning that is not re-billed as text.
        return _count(estimator, _leaf_text(item.get("summary", "")))
    return _count(estimator, _leaf_text(item))


def _responses(
    params: Mapping[str, Any], estimator: TokenEstimator, default: int
) -> tuple[int, int]:
    allow = _Allowances(IMAGE_TOKENS, AUDIO_TOKENS, FILE_TOKENS)
    value = params.get("input", "")
    if isinstance(value, str):
        prompt = _count(estimator, value)
    elif isinstance(value, Sequence):
        prompt = REPLY_PRIMING_TOKENS + sum(
            _response_item_tokens(item, f"input[{i}]", estimator, allow)
            for i, item in enumerate(value)
        )
    else:
        raise RequestShapeError("input", f"expected a str or a list of items, got {value!r}")
    instructions = params.get("instructions")
    if isinstance(instructions, str):
        prompt += PER_MESSAGE_OVERHEAD + _count(estimator, instructions)
    prompt += _tools_tokens(params, estimator)
    return prompt, _cap(params, ("max_output_tokens",), default)


def _messages(
    params: Mapping[str, Any], estimator: TokenEstimator, default: int
) -> tuple[int, int]:
    """The Anthropic Messages API: ``system`` (a str or text blocks), ``messages`` (str or
    block content: text, image, document, tool_use, tool_result, thinking) and ``tools``;
    output is ``max_tokens``, which the API requires."""
    if "messages" not in params:
        raise RequestShapeError("messages", "messages.create needs messages")
    allow = _Allowances(IMAGE_TOKENS, AUDIO_TOKENS, FILE_TOKENS)
    prompt = estimate_prompt_tokens(params["messages"], estimator)
    system = params.get("system")
    if system is not None:
        prompt += PER_MESSAGE_OVERHEAD + _content_tokens(system, "system", estimator, allow)
    prompt += _tools_tokens(params, estimator)
    return prompt, _cap(params, ("max_tokens",), default)


# The roles of a chat message, and those whose message may go without content.
_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def chat_message_problem(message: object) -> str | None:
    """What is wrong with one chat message of a request line, or None: what a provider
    would refuse anyway, found before the line costs an admission."""
    if not isinstance(message, dict):
        return f"a message must be a JSON object, got {type(message).__name__}"
    role = message.get("role")
    if not isinstance(role, str) or role not in _CHAT_ROLES:
        return f"role must be one of {', '.join(sorted(_CHAT_ROLES))}, got {role!r}"
    content = message.get("content")
    if content is None:
        if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
            return None
        return f"a {role} message needs content"
    if not isinstance(content, str | list):
        return f"content must be a string or a list of parts, got {type(content).__name__}"
    return None


_Kind = Callable[[Mapping[str, Any], TokenEstimator, int], tuple[int, int]]
_KINDS: Final[dict[str, _Kind]] = {
    "chat.completions.create": _chat,
    "embeddings.create": _embeddings,
    "responses.create": _responses,
    "completions.create": _completions,
    "messages.create": _messages,
}
REQUEST_KINDS: Final = tuple(_KINDS)


def estimate_request_tokens(
    kind: str,
    params: Mapping[str, Any],
    estimator: TokenEstimator,
    *,
    default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> tuple[int, int]:
    """(prompt tokens, maximum output tokens) of one OpenAI-style or Anthropic request.

    `kind` is the client method, `params` its keyword arguments:

    - ``"chat.completions.create"``: `estimate_prompt_tokens` of ``messages`` plus the
      JSON of ``tools``/``functions``/``response_format``; output is
      ``max_completion_tokens`` or ``max_tokens`` (else `default_max_output`) times ``n``.
    - ``"embeddings.create"``: ``input`` as a str, a list of str, a token array or a
      list of token arrays (arrays count exactly); output 0.
    - ``"responses.create"``: ``input`` as a str or a list of items (messages, function
      calls and their outputs), ``instructions`` and tools; output is
      ``max_output_tokens`` else `default_max_output`.
    - ``"completions.create"`` (legacy): ``prompt``; output ``max_tokens`` (the API's
      default: 16) times ``max(n, best_of)`` times the number of prompts.
    - ``"messages.create"`` (the Anthropic Messages API): ``messages`` as for chat, plus
      ``system`` (a str or text blocks) and ``tools``; output is ``max_tokens``.

    Reasoning models spend hidden reasoning tokens inside the output cap, so the cap is
    what to reserve. Raises `UnknownRequestKindError` or `RequestShapeError`.
    """
    handler = _KINDS.get(kind)
    if handler is None:
        raise UnknownRequestKindError(kind, REQUEST_KINDS)
    if not isinstance(params, Mapping):
        raise RequestShapeError("params", f"expected a dict of keyword arguments, got {params!r}")
    return handler(params, estimator, _count_arg("default_max_output", default_max_output))


def tokens_to_reserve(
    kind: str,
    params: Mapping[str, Any],
    *,
    tokens: int | None = None,
    estimator: TokenEstimator | None = None,
    profile: Profile | None = None,
    default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> int:
    """Tokens a limiter should reserve for one request: prompt + maximum output.

    `tokens`, when given, is used as is (your exact count). Otherwise the request is
    estimated with `estimator`, or `default_estimator(profile)` when that is `None`.
    """
    if tokens is not None:
        return _count_arg("tokens", tokens)
    chosen = estimator if estimator is not None else default_estimator(profile)
    prompt, output = estimate_request_tokens(
        kind, params, chosen, default_max_output=default_max_output
    )
    return prompt + output
