"""Token estimates: the heuristic against tiktoken's counts, request shapes, tiktoken's absence.

The reference counts were measured once with tiktoken 0.14 and OpenAI's own o200k_base
and cl100k_base files (sha256-checked), loaded offline; the tests below never load an
encoding, so they need no network and no tiktoken.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from ratekit import _tokens
from ratekit._estimate import TokenEstimate
from ratekit._profiles import load_profile
from ratekit._tokens import (
    AUDIO_TOKENS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    FILE_TOKENS,
    IMAGE_LOW_DETAIL_TOKENS,
    IMAGE_TOKENS,
    PER_MESSAGE_OVERHEAD,
    REPLY_PRIMING_TOKENS,
    BackgroundEstimator,
    HeuristicEstimator,
    RequestShapeError,
    TiktokenEstimator,
    TokenEstimator,
    TokenizerUnavailableError,
    UnknownRequestKindError,
    default_estimator,
    estimate_prompt_tokens,
    estimate_request_tokens,
    tokens_to_reserve,
)

MINIMAX_HINT = TokenEstimate(script="chinese", characters=1_600, tokens=1_000)


# --- the samples: written for these tests, counted once with tiktoken ------------------

SAMPLES: dict[str, str] = {
    "english_prose": (
        "The scheduler keeps a small queue for every priority. When a request arrives, "
        "it estimates how many tokens the call will use, reserves them in each window, "
        "and waits if the provider's limits would be exceeded. After the response comes "
        "back, the real usage replaces the estimate, and any difference is returned to "
        "the pool so that later requests are not delayed for nothing. Rate limits are "
        "published per minute and per day, but providers may tighten them at any moment "
        "when their clusters are busy."
    ),
    "chinese_prose": (
        "调度器为每个优先级维护一个小队列。请求到达时，它先估算这次调用会用掉多少个词元，"
        "在每个时间窗口中预留这些额度；如果超出服务商的限制，就排队等待。响应返回之后，用"
        "实际用量替换估算值，多出来的部分退回额度池，后面的请求就不会白白等待。服务商按分"
        "钟和按天公布限额，但在集群繁忙时随时可能临时收紧。"
    ),
    "python_code": (
        "def retry_after(headers: dict[str, str], now: float) -> float | None:\n"
        '    """Seconds to wait before the next call, from a 429 answer."""\n'
        '    value = headers.get("retry-after")\n'
        "    if value is None:\n"
        "        return None\n"
        "    try:\n"
        "        return max(0.0, float(value))\n"
        "    except ValueError:\n"
        "        when = parsedate_to_datetime(value).timestamp()\n"
        "        return max(0.0, when - now)\n"
    ),
    "mixed_en_zh": (
        '请把下面的 error message 翻译成中文："Rate limit '
        "reached for requests per minute (RPM): "
        'limit 500, used 500." 另外，解释一下 TPM 和 RPM '
        "的区别，以及为什么 MiniMax-M2 的 input 和 output "
        "tokens 都会计入 TPM。"
    ),
    "json_numbers": (
        '{"id": "chatcmpl-9x2Kf7", "created": 1730419200, "model": "step-3", "usage": '
        '{"prompt_tokens": 1842, "completion_tokens": 356, "total_tokens": 2198}, '
        '"limits": [{"tier": "V1", "rpm": 60, "tpm": 500000}, {"tier": "V2", "rpm": '
        '120.5, "tpm": 1000000}], "price_cny": 0.0125}'
    ),
    "chinese_code_comments": (
        "# 计算每分钟剩余的词元额度\n"
        "remaining = limit_tpm - used_tokens  # "
        "单位：词元\n"
        "if remaining < estimate:\n"
        "    wait_s = (estimate - remaining) / "
        "limit_tpm * 60  # 需要等待的秒数\n"
    ),
    "japanese": (
        "このライブラリは、APIの利用制限を超えないように、リクエストを送る前に必要なト"
        "ークン数を見積もり、上限に達しそうなときは少し待ってから送信します。"
    ),
    "korean": (
        "이 라이브러리는 요청을 보내기 전에 필요한 토큰 수를 추정하고, 한도에 "
        "가까워지면 잠시 기다렸다가 다시 보냅니다."
    ),
    "chinese_classical_rare": ("龘靐齉爩麤鬱鱻驫籲饕餮魑魅魍魎"),
    "short_english": ("Hi!"),
    "url_and_path": (
        "See https://platform.example.com/docs/rate-limits#tier-3 or "
        "/var/lib/ratekit/state.json for details."
    ),
    "whitespace_heavy": (
        "    \n\n\t  indented   text   with    many     spaces\n\n\n    and   blank   lines    \n"
    ),
    "russian": (
        "Библиотека оценивает количество токенов до отправки запроса и ждёт, если лимит "
        "провайдера будет превышен."
    ),
    "french": (
        "La bibliothèque estime le nombre de jetons avant l'envoi de la requête et "
        "attend si la limite du fournisseur serait dépassée."
    ),
    "greek": (
        "Η βιβλιοθήκη εκτιμά τον αριθμό των διακριτικών πριν από την αποστολή του αιτήματος."
    ),
    "emoji": ("Done ✅ 🚀🚀 great work 👍🏽 — see you tomorrow 😀"),
    "arabic": ("تقدّر المكتبة عدد الرموز قبل إرسال الطلب وتنتظر إذا تم تجاوز الحد."),
    "hindi": ("लाइब्रेरी अनुरोध भेजने से पहले टोकन की संख्या का अनुमान लगाती है।"),
}

# name: (o200k_base tokens, cl100k_base tokens)
REFERENCE: dict[str, tuple[int, int]] = {
    "english_prose": (97, 97),
    "chinese_prose": (111, 156),
    "python_code": (96, 95),
    "mixed_en_zh": (57, 73),
    "json_numbers": (117, 117),
    "chinese_code_comments": (58, 67),
    "japanese": (58, 68),
    "korean": (36, 60),
    "chinese_classical_rare": (30, 40),
    "short_english": (2, 2),
    "url_and_path": (27, 27),
    "whitespace_heavy": (20, 20),
    "russian": (30, 42),
    "french": (27, 34),
    "greek": (26, 72),
    "emoji": (16, 21),
    "arabic": (19, 49),
    "hindi": (22, 64),
}

# Texts in English, code, JSON and the CJK scripts: the bounds that matter most.
CLOSE = (
    "english_prose",
    "chinese_prose",
    "python_code",
    "mixed_en_zh",
    "json_numbers",
    "chinese_code_comments",
    "japanese",
    "korean",
    "short_english",
    "url_and_path",
    "whitespace_heavy",
    "french",
)
# Other alphabets (and emoji): the heuristic over-reserves on purpose.
OTHER_SCRIPTS = ("russian", "greek", "arabic", "hindi", "emoji")

MAX_UNDER = -0.10  # never more than 10 % below the reference
MAX_OVER_CLOSE = 0.40
MAX_OVER_OTHER = 1.00


def relative_error(estimate: int, reference: int) -> float:
    return (estimate - reference) / reference


def test_every_sample_has_a_reference() -> None:
    """The table is complete: each sample has its counted tokens, and each group names samples."""
    assert set(SAMPLES) == set(REFERENCE)
    assert set(CLOSE) | set(OTHER_SCRIPTS) <= set(SAMPLES)


@pytest.mark.parametrize("name", CLOSE)
def test_heuristic_is_close_to_o200k(name: str) -> None:
    """English, code, JSON and CJK text: within -10 % / +40 % of o200k_base."""
    error = relative_error(HeuristicEstimator().count(SAMPLES[name]), REFERENCE[name][0])
    assert MAX_UNDER <= error <= MAX_OVER_CLOSE, f"{name}: {error:+.1%}"


@pytest.mark.parametrize("name", OTHER_SCRIPTS)
def test_heuristic_over_reserves_other_scripts(name: str) -> None:
    """Cyrillic, Greek, Arabic, Devanagari and emoji: never 10 % under, at most double."""
    error = relative_error(HeuristicEstimator().count(SAMPLES[name]), REFERENCE[name][0])
    assert MAX_UNDER <= error <= MAX_OVER_OTHER, f"{name}: {error:+.1%}"


def test_heuristic_total_is_conservative() -> None:
    """Over all samples together the estimate is above o200k_base, by less than a third."""
    names = CLOSE + OTHER_SCRIPTS
    estimate = sum(HeuristicEstimator().count(SAMPLES[name]) for name in names)
    reference = sum(REFERENCE[name][0] for name in names)
    assert 0.0 <= relative_error(estimate, reference) <= 0.33


def test_rare_ideographs_are_the_known_weak_spot() -> None:
    """Rare main-block ideographs count 1 token each; tiktoken splits them in 2 (documented)."""
    text = SAMPLES["chinese_classical_rare"]
    assert HeuristicEstimator().count(text) == len(text)
    assert REFERENCE["chinese_classical_rare"][0] == 2 * len(text)


def test_minimax_hint_matches_its_published_ratio() -> None:
    """With MiniMax's hint, 1,600 ideographs are exactly 1,000 tokens."""
    estimator = HeuristicEstimator(MINIMAX_HINT)
    assert estimator.cjk_tokens_per_character == 0.625
    assert estimator.count("字" * 1_600) == 1_000
    assert estimator.count("字" * 3) == 2  # 1.875, rounded up


def test_minimax_hint_on_prose_is_near_the_ratio() -> None:
    """Chinese prose with MiniMax's hint: within 0 / +15 % of 1,000 tokens per 1,600
    characters applied to every character (the provider's own rule; approximate)."""
    text = SAMPLES["chinese_prose"]
    reference = math.ceil(len(text) * 1_000 / 1_600)
    error = relative_error(HeuristicEstimator(MINIMAX_HINT).count(text), reference)
    assert 0.0 <= error <= 0.15, f"{error:+.1%}"


def test_profile_hint_reaches_the_heuristic() -> None:
    """The bundled MiniMax profile carries the 1,600 : 1,000 hint."""
    profile = load_profile("minimax")
    assert profile.token_estimate == MINIMAX_HINT


def test_default_cjk_rate_without_hint() -> None:
    """Without a hint an ideograph, a kana and a hangul syllable cost 1 token each."""
    estimator = HeuristicEstimator()
    assert estimator.cjk_tokens_per_character == 1.0
    assert estimator.count("字かカ한") == 4


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", 0),
        ("a", 2),  # 1 x 1.1, rounded up
        ("hello world", 3),  # 2 words x 1.1 = 2.2
        ("1730419200", 5),  # 4 groups of 3 digits + 0.5, x 1.1 = 4.95
        ("\n", 2),  # 1.25 x 1.1
        ("字", 1),  # CJK is not scaled
    ],
)
def test_heuristic_small_cases(text: str, tokens: int) -> None:
    """Hand-checked costs of single runs."""
    assert HeuristicEstimator().count(text) == tokens


def test_heuristic_is_deterministic_and_additive_enough() -> None:
    """The same text always gives the same count; doubling a text about doubles it."""
    estimator = HeuristicEstimator()
    text = SAMPLES["mixed_en_zh"]
    assert estimator.count(text) == estimator.count(text)
    once, twice = estimator.count(text), estimator.count(text + " " + text)
    assert 2 * once - 2 <= twice <= 2 * once + 2


def test_heuristic_scales_linearly() -> None:
    """A 100x longer text costs about 100x the tokens (one pass, no quadratic blow-up)."""
    estimator = HeuristicEstimator()
    text = "".join(SAMPLES.values())
    small, big = estimator.count(text), estimator.count(text * 100)
    assert 99 * small <= big <= 101 * small


def test_heuristic_rejects_non_text() -> None:
    """count() of bytes names the type; a hint of the wrong type is refused at construction."""
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
        HeuristicEstimator().count(b"abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hint must be a TokenEstimate or None"):
        HeuristicEstimator(0.625)  # type: ignore[arg-type]


def test_estimators_satisfy_the_protocol() -> None:
    """HeuristicEstimator and any object with count() are TokenEstimators."""

    class Words:
        def count(self, text: str) -> int:
            return len(text.split())

    assert isinstance(HeuristicEstimator(), TokenEstimator)
    assert isinstance(Words(), TokenEstimator)


# --- chat messages ------------------------------------------------------------------------


class CharCounter:
    """One token per character: makes the request arithmetic easy to check by hand."""

    def count(self, text: str) -> int:
        return len(text)


CHARS = CharCounter()


def test_prompt_of_a_plain_string_has_no_overhead() -> None:
    """A str prompt is counted as it is."""
    assert estimate_prompt_tokens("hello", CHARS) == 5


def test_prompt_of_messages_adds_overheads() -> None:
    """Each message: overhead + role + content; plus the reply priming once."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi", "name": "ann"},
    ]
    expected = REPLY_PRIMING_TOKENS + 2 * PER_MESSAGE_OVERHEAD + (6 + 8) + (4 + 2 + 3)
    assert estimate_prompt_tokens(messages, CHARS) == expected
    assert estimate_prompt_tokens(messages, CHARS, per_message_overhead=0) == expected - 8


def test_prompt_counts_text_parts_and_allowances() -> None:
    """Text parts count their text; images, audio and files cost fixed allowances."""
    content = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ]
    tokens = estimate_prompt_tokens([{"role": "user", "content": content}], CHARS)
    allowances = IMAGE_TOKENS + IMAGE_LOW_DETAIL_TOKENS + AUDIO_TOKENS + FILE_TOKENS
    assert tokens == REPLY_PRIMING_TOKENS + PER_MESSAGE_OVERHEAD + 4 + 12 + allowances
    smaller = estimate_prompt_tokens(
        [{"role": "user", "content": content}],
        CHARS,
        image_tokens=1,
        audio_tokens=2,
        file_tokens=3,
    )
    assert smaller == tokens - allowances + 1 + IMAGE_LOW_DETAIL_TOKENS + 2 + 3


def test_prompt_counts_tool_calls_and_tool_results() -> None:
    """An assistant's tool calls count their names and arguments; a tool message its id."""
    messages: list[dict[str, Any]] = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get", "arguments": '{"a":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    expected = REPLY_PRIMING_TOKENS + 2 * PER_MESSAGE_OVERHEAD
    expected += 9 + len('get {"a":1}')  # "assistant" + name and arguments
    expected += 4 + 6 + 2  # "tool" + the call id + content
    assert estimate_prompt_tokens(messages, CHARS) == expected


def test_prompt_counts_unknown_parts_by_their_text() -> None:
    """A part of an unknown type is not free: its keys and strings are counted."""
    part = {"type": "x", "note": "abc"}
    tokens = estimate_prompt_tokens([{"role": "user", "content": [part]}], CHARS)
    assert tokens > REPLY_PRIMING_TOKENS + PER_MESSAGE_OVERHEAD + 4 + 3


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ({"role": "user"}, "messages: expected a list of messages"),
        (["hi"], r"messages\[0\]: expected a message \(a dict\), got 'hi'"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content: expected a str or a list"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"content\[0\].text"),
    ],
)
def test_prompt_shape_errors_name_the_field(messages: object, message: str) -> None:
    """A shape no endpoint accepts raises RequestShapeError naming the field."""
    with pytest.raises(RequestShapeError, match=message):
        estimate_prompt_tokens(messages, CHARS)  # type: ignore[arg-type]


def test_an_estimator_returning_garbage_is_refused() -> None:
    """count() must return an int >= 0."""

    class Bad:
        def count(self, text: str) -> int:
            return -1

    with pytest.raises(TypeError, match=r"count\(\) must return an int >= 0, got -1"):
        estimate_prompt_tokens("x", Bad())


# --- requests ------------------------------------------------------------------------------

USER_HI = [{"role": "user", "content": "hi"}]
USER_HI_TOKENS = REPLY_PRIMING_TOKENS + PER_MESSAGE_OVERHEAD + 4 + 2


@pytest.mark.parametrize(
    ("params", "output"),
    [
        ({"messages": USER_HI}, DEFAULT_MAX_OUTPUT_TOKENS),
        ({"messages": USER_HI, "max_tokens": 100}, 100),
        ({"messages": USER_HI, "max_completion_tokens": 50, "max_tokens": 100}, 50),
        ({"messages": USER_HI, "max_tokens": 100, "n": 3}, 300),
    ],
)
def test_chat_request(params: dict[str, object], output: int) -> None:
    """Chat: messages in, the output cap (else the default) times n out."""
    tokens = estimate_request_tokens("chat.completions.create", params, CHARS)
    assert tokens == (USER_HI_TOKENS, output)


def test_chat_default_max_output_is_a_parameter() -> None:
    """Without a cap in the request, default_max_output is reserved."""
    params = {"messages": USER_HI}
    tokens = estimate_request_tokens(
        "chat.completions.create", params, CHARS, default_max_output=10
    )
    assert tokens == (USER_HI_TOKENS, 10)


def test_chat_tools_are_part_of_the_prompt() -> None:
    """Tool definitions are sent as text: they add to the prompt."""
    tools = [{"type": "function", "function": {"name": "get", "parameters": {}}}]
    bare = estimate_request_tokens("chat.completions.create", {"messages": USER_HI}, CHARS)
    tooled = estimate_request_tokens(
        "chat.completions.create", {"messages": USER_HI, "tools": tools}, CHARS
    )
    assert tooled[0] > bare[0]


@pytest.mark.parametrize(
    ("value", "prompt"),
    [
        ("hello", 5),
        (["hello", "hi"], 7),
        ([1, 2, 3], 3),
        ([[1, 2], [3, 4, 5]], 5),
    ],
)
def test_embeddings_request(value: object, prompt: int) -> None:
    """Embeddings: str, list of str, token array or arrays (counted exactly); no output."""
    assert estimate_request_tokens("embeddings.create", {"input": value}, CHARS) == (prompt, 0)


def test_embeddings_bad_input_names_the_item() -> None:
    """A list mixing strings and numbers is refused with its index."""
    with pytest.raises(RequestShapeError, match=r"input\[1\]: expected a str or a token array"):
        estimate_request_tokens("embeddings.create", {"input": ["a", 1.5]}, CHARS)


def test_responses_request_with_a_string() -> None:
    """Responses: a str input plus instructions; max_output_tokens out."""
    params = {"input": "hello", "instructions": "be brief", "max_output_tokens": 64}
    tokens = estimate_request_tokens("responses.create", params, CHARS)
    assert tokens == (5 + PER_MESSAGE_OVERHEAD + 8, 64)


def test_responses_request_with_items() -> None:
    """Responses: message items, a function call and its output; the default cap."""
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ]
    prompt, output = estimate_request_tokens("responses.create", {"input": items}, CHARS)
    assert prompt == REPLY_PRIMING_TOKENS + (PER_MESSAGE_OVERHEAD + 4 + 2) + 6 + 2
    assert output == DEFAULT_MAX_OUTPUT_TOKENS


def test_legacy_completions_default_cap_is_16() -> None:
    """Legacy completions: the API's own default of 16 output tokens, per prompt and choice."""
    params = {"prompt": ["ab", "cd"], "n": 2}
    assert estimate_request_tokens("completions.create", params, CHARS) == (4, 16 * 2 * 2)


def test_unknown_kind_lists_the_known_ones() -> None:
    """An unknown request kind names itself and the kinds there are."""
    with pytest.raises(UnknownRequestKindError, match=r"unknown request kind 'chat\.create'"):
        estimate_request_tokens("chat.create", {}, CHARS)


def test_missing_messages_is_named() -> None:
    """A chat request without messages names the field."""
    with pytest.raises(RequestShapeError, match=r"messages: chat\.completions\.create needs"):
        estimate_request_tokens("chat.completions.create", {}, CHARS)


def test_bad_n_is_named() -> None:
    """n must be an int >= 1."""
    with pytest.raises(RequestShapeError, match="n: expected an int >= 1, got 0"):
        estimate_request_tokens("chat.completions.create", {"messages": [], "n": 0}, CHARS)


def test_tokens_to_reserve_takes_an_exact_count() -> None:
    """tokens= is used as is, whatever the request."""
    assert tokens_to_reserve("chat.completions.create", {}, tokens=1234) == 1234


def test_tokens_to_reserve_uses_a_given_estimator() -> None:
    """With an estimator: prompt + maximum output."""
    params = {"messages": USER_HI, "max_tokens": 10}
    assert tokens_to_reserve("chat.completions.create", params, estimator=CHARS) == (
        USER_HI_TOKENS + 10
    )


def test_tokens_to_reserve_refuses_negative_tokens() -> None:
    """A negative exact count is refused."""
    with pytest.raises(ValueError, match="tokens must be a non-negative int, got -1"):
        tokens_to_reserve("chat.completions.create", {}, tokens=-1)


# --- tiktoken, without the network ---------------------------------------------------------


class FakeEncoding:
    """Stands for a tiktoken.Encoding: one token per whitespace-separated word."""

    name = "fake_base"

    def encode_ordinary(self, text: str) -> list[int]:
        return [0] * len(text.split())


@pytest.fixture
def fresh_tiktoken_state() -> Iterator[None]:
    """No encoding loaded or loading, and no default chosen, before or after the test."""
    _tokens._loaded.clear()
    _tokens._background.clear()
    _tokens._tiktoken_or_none.cache_clear()
    yield
    _tokens._loaded.clear()
    _tokens._background.clear()
    _tokens._tiktoken_or_none.cache_clear()


def _fake_tiktoken(monkeypatch: pytest.MonkeyPatch, get_encoding: object) -> None:
    module = types.ModuleType("tiktoken")
    module.get_encoding = get_encoding  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", module)


def _no_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import raises ImportError


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_missing_tiktoken_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without tiktoken the error says how to install it."""
    _no_tiktoken(monkeypatch)
    with pytest.raises(TokenizerUnavailableError) as caught:
        TiktokenEstimator()
    assert "pip install 'ratekit[tokenizer]'" in str(caught.value)
    assert str(caught.value).startswith("tokenizer encoding 'tiktoken' is unavailable")


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_unloadable_encoding_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoding whose download fails raises at construction, naming it and the cause."""

    def get_encoding(name: str) -> FakeEncoding:
        raise ConnectionError("no route to host")

    _fake_tiktoken(monkeypatch, get_encoding)
    with pytest.raises(TokenizerUnavailableError) as caught:
        TiktokenEstimator("o200k_base")
    message = str(caught.value)
    assert "'o200k_base' is unavailable" in message
    assert "ConnectionError: no route to host" in message
    assert "TIKTOKEN_CACHE_DIR" in message


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_hanging_download_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A download that never answers is abandoned after load_timeout_s."""
    release = threading.Event()

    def get_encoding(name: str) -> FakeEncoding:
        release.wait(10)
        return FakeEncoding()

    _fake_tiktoken(monkeypatch, get_encoding)
    started = time.monotonic()
    try:
        with pytest.raises(TokenizerUnavailableError, match=r"did not load it within 0.2 s"):
            TiktokenEstimator("o200k_base", load_timeout_s=0.2)
    finally:
        release.set()
    assert time.monotonic() - started < 5


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_loaded_encoding_counts_and_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loadable encoding is loaded once per process and counts exactly."""
    loads: list[str] = []

    def get_encoding(name: str) -> FakeEncoding:
        loads.append(name)
        return FakeEncoding()

    _fake_tiktoken(monkeypatch, get_encoding)
    first = TiktokenEstimator("o200k_base")
    second = TiktokenEstimator("o200k_base")
    assert first.count("one two three") == 3
    assert second.count("") == 0
    assert loads == ["o200k_base"]
    assert first.encoding_name == "fake_base"


def test_an_encoding_object_is_used_as_is() -> None:
    """A loaded encoding (for instance built from a local file) needs no download."""
    estimator = TiktokenEstimator(FakeEncoding())
    assert estimator.count("a b") == 2
    with pytest.raises(TypeError, match="encoding must be an encoding name or a tiktoken"):
        TiktokenEstimator(42)  # type: ignore[arg-type]


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_default_is_the_heuristic_with_the_hint_without_tiktoken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No tiktoken: the heuristic, with the profile's hint."""
    _no_tiktoken(monkeypatch)
    estimator = default_estimator(load_profile("minimax"))
    assert isinstance(estimator, HeuristicEstimator)
    assert estimator.hint == MINIMAX_HINT
    plain = default_estimator()
    assert isinstance(plain, HeuristicEstimator)
    assert plain.hint is None


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_default_is_the_heuristic_when_the_encoding_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """tiktoken installed but its encoding won't load: the heuristic, tried once."""
    calls: list[str] = []

    def get_encoding(name: str) -> FakeEncoding:
        calls.append(name)
        raise OSError("offline")

    _fake_tiktoken(monkeypatch, get_encoding)
    assert isinstance(default_estimator(), HeuristicEstimator)
    assert isinstance(default_estimator(), HeuristicEstimator)
    assert calls == ["o200k_base"]


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_default_is_tiktoken_when_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiktoken installed and loadable: the exact count."""
    _fake_tiktoken(monkeypatch, lambda name: FakeEncoding())
    assert isinstance(default_estimator(load_profile("minimax")), TiktokenEstimator)


# --- the background estimator: never blocks ---------------------------------------------


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_background_estimator_counts_with_the_heuristic_while_tiktoken_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Construction returns at once; the heuristic (with the profile's hint) counts until
    the encoding has loaded, tiktoken's count after; one load for every instance."""
    release = threading.Event()
    loads: list[str] = []

    def get_encoding(name: str) -> FakeEncoding:
        loads.append(name)
        release.wait(10)
        return FakeEncoding()

    _fake_tiktoken(monkeypatch, get_encoding)
    started = time.monotonic()
    estimator = BackgroundEstimator(load_profile("minimax"))
    other = BackgroundEstimator()
    assert time.monotonic() - started < 1
    text = "调度器为每个优先级 one two three"
    heuristic = HeuristicEstimator(MINIMAX_HINT).count(text)
    assert estimator.count(text) == heuristic
    assert estimator.exact is None
    assert not estimator.wait_loaded(0.01)
    release.set()
    assert estimator.wait_loaded(5)
    assert estimator.count(text) == 4  # FakeEncoding: one token per word
    assert other.wait_loaded(5)
    assert loads == ["o200k_base"]
    assert "loaded" in repr(estimator)
    # Once loaded, the blocking default finds it at once.
    assert isinstance(default_estimator(), TiktokenEstimator)


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_background_estimator_keeps_the_heuristic_when_tiktoken_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No tiktoken (or an encoding that fails to load): the heuristic for good."""
    _no_tiktoken(monkeypatch)
    estimator = BackgroundEstimator()
    assert not estimator.wait_loaded(5)
    assert estimator.exact is None
    assert estimator.count("one two three") == HeuristicEstimator().count("one two three")
    assert isinstance(estimator, TokenEstimator)


@pytest.mark.usefixtures("fresh_tiktoken_state")
def test_background_estimator_never_waits_for_a_hanging_download(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A download that never answers costs no caller anything: counts go on at once."""
    release = threading.Event()

    def get_encoding(name: str) -> FakeEncoding:
        release.wait(30)
        return FakeEncoding()

    _fake_tiktoken(monkeypatch, get_encoding)
    try:
        started = time.monotonic()
        estimator = BackgroundEstimator()
        for _ in range(100):
            estimator.count("some words here")
        assert time.monotonic() - started < 1
    finally:
        release.set()


def test_real_tiktoken_matches_the_reference_counts() -> None:
    """Where tiktoken and a local copy of o200k_base are at hand, the table is right.

    Runs only when TIKTOKEN_CACHE_DIR is set (the files were put there by hand): it never
    downloads anything.
    """
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("TIKTOKEN_CACHE_DIR is not set: no local encoding files")
    pytest.importorskip("tiktoken")
    estimator = TiktokenEstimator("o200k_base", load_timeout_s=5)
    for name, text in SAMPLES.items():
        assert estimator.count(text) == REFERENCE[name][0], name
