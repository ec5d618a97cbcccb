"""``ratekit plan``: time per limit, the binding limit, cost, the cheapest tier, JSONL.

Every expected number is worked out by hand in the comments next to it, from the
bundled profiles (see /work/shared/seeds/README.md for the tier tables).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from ratekit._errors import UnknownModelError
from ratekit._limits import Rate
from ratekit._pricing import ExtraTokens
from ratekit._profiles import load_profile
from ratekit._tokens import HeuristicEstimator, estimate_request_tokens
from ratekit.cli import main
from ratekit.cli._plan import (
    LimitTime,
    LineProblem,
    PlanError,
    Pricing,
    RequestTokens,
    TierTime,
    Workload,
    all_tier_times,
    cheapest_tier,
    estimate_cost,
    make_plan,
    parse_deadline,
    rate_time,
    read_jsonl,
    relay_cost,
    tier_time,
)
from ratekit.cli._plan_cmd import format_duration


def _by_name(time: TierTime) -> dict[str, LimitTime]:
    return {limit.name: limit for limit in time.limits}


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["plan", *args])
    return result.exit_code, result.output


# --- time per limit --------------------------------------------------------------------


def test_moonshot_tier0_1000_requests_need_333_minutes() -> None:
    """Moonshot Tier0 (RPM 3): 1,000 requests need ceil(1000/3 - 1) = 333 minutes of waiting."""
    moonshot = load_profile("moonshot")
    workload = Workload.uniform(1_000, prompt_tokens=1_000, output_tokens=500)
    time = tier_time(moonshot.tier("Tier0"), workload, call_s=10)
    limits = _by_name(time)
    rpm = limits["rpm"]
    # 3 at once and 3 more each minute: 334 windows, the last opens 333 minutes in.
    assert rpm.batches == 334
    assert rpm.last_admission_s == 333 * 60
    assert rpm.finish_s == 333 * 60 + 10  # + the last call
    # concurrency 1, calls of 10 s: 1000 waves = 10,000 s.
    assert limits["concurrency"].finish_s == 10_000
    # TPM 500,000 with 1,500 tokens a request: floor(500000/1500) = 333 a window,
    # ceil(1000/333) = 4 windows -> 3 minutes + 10 s.
    assert limits["tpm"].batches == 4
    assert limits["tpm"].finish_s == 3 * 60 + 10
    # TPD 1,500,000 = exactly the batch's 1,500,000 tokens: one window, no wait.
    assert limits["tpd"].last_admission_s == 0
    assert time.binding is rpm
    assert time.finish_s == 19_990


def test_stepfun_v0_time_and_cost() -> None:
    """StepFun V0 with step-3.5-flash: RPM binds; the cost splits cached and uncached input."""
    stepfun = load_profile("stepfun")
    workload = Workload.uniform(600, prompt_tokens=2_000, output_tokens=500)
    plan = make_plan(
        stepfun,
        stepfun.tier("V0"),
        workload,
        model="step-3.5-flash",
        call_s=20,
        pricing=Pricing(cache_hit_share=0.25),
    )
    limits = _by_name(plan.time)
    # concurrency 5: ceil(600/5) = 120 waves x 20 s = 2,400 s.
    assert limits["concurrency"].finish_s == 2_400
    # RPM 10: 60 windows, (60 - 1) x 60 s = 3,540 s, + 20 s.
    assert limits["rpm"].finish_s == 3_560
    # TPM 5,000,000 >= 600 x 2,500 = 1,500,000 tokens: one window, 20 s.
    assert limits["tpm"].finish_s == 20
    assert plan.time.binding is not None
    assert plan.time.binding.name == "rpm"
    # Prompt 1,200,000 tokens: 25 % cached = 300,000 at $0.02/1M = $0.006,
    # 900,000 at $0.10/1M = $0.09; output 300,000 at $0.30/1M = $0.09. Total $0.186.
    assert plan.cost is not None
    assert plan.cost.currency == "USD"
    lines = {line.item: line.cost for line in plan.cost.lines}
    assert lines == pytest.approx({"input": 0.09, "cached input": 0.006, "output": 0.09})
    assert plan.cost.total == pytest.approx(0.186)


def test_minimax_limits_are_per_model() -> None:
    """MiniMax-M2-Stable has higher limits when paid; the free tier is far slower."""
    minimax = load_profile("minimax")
    workload = Workload.uniform(10_000, prompt_tokens=2_000, output_tokens=1_000)
    paid = tier_time(minimax.tier("paid"), workload, model="MiniMax-M2-Stable", call_s=10)
    # paid: RPM 500 -> 20 windows, 19 min + 10 s = 1,150 s. TPM 20,000,000 with 3,000
    # a request: 6,666 a window, 2 windows -> 60 s + 10 s.
    assert _by_name(paid)["rpm"].finish_s == 19 * 60 + 10
    assert _by_name(paid)["tpm"].finish_s == 70
    free = tier_time(minimax.tier("free"), workload, model="MiniMax-M2-Stable", call_s=10)
    # free: RPM 20 -> 500 windows, 499 min + 10 s. TPM 1,000,000: 333 a window,
    # ceil(10000/333) = 31 windows -> 30 min + 10 s.
    assert _by_name(free)["rpm"].finish_s == 499 * 60 + 10
    assert _by_name(free)["tpm"].finish_s == 30 * 60 + 10
    # MiniMax-M2 keeps RPM 20 even when paid: the same 499 minutes.
    m2 = tier_time(minimax.tier("paid"), workload, model="MiniMax-M2", call_s=10)
    assert m2.finish_s == 499 * 60 + 10
    # Cost (CNY): prompt 20,000,000, half cached: 10M x 2.1/1M = 21 + 10M x 0.21/1M = 2.1;
    # output 10M x 8.4/1M = 84. Total 107.1 CNY.
    cost = estimate_cost(minimax, workload, "MiniMax-M2-Stable", Pricing(cache_hit_share=0.5))
    assert cost.currency == "CNY"
    assert cost.total == pytest.approx(107.1)


def test_minimax_needs_a_model() -> None:
    """A profile whose limits are all per model refuses to plan without a model."""
    minimax = load_profile("minimax")
    with pytest.raises(PlanError, match="sets limits per model: name a model"):
        make_plan(minimax, minimax.tier("paid"), Workload.uniform(1, 1, 1))
    with pytest.raises(UnknownModelError, match="unknown model 'M3'"):
        make_plan(minimax, minimax.tier("paid"), Workload.uniform(1, 1, 1), model="M3")


def test_infly_tier1_concurrency_binds_and_costs_cny() -> None:
    """infly Tier1: with 30 s calls, 4 in flight is slower than RPM 20 or TPM 128,000."""
    infly = load_profile("infly")
    workload = Workload.uniform(200, prompt_tokens=3_000, output_tokens=1_000)
    plan = make_plan(infly, infly.tier("Tier1"), workload, model="inf-chat-v1", call_s=30)
    limits = _by_name(plan.time)
    # concurrency 4: 50 waves x 30 s = 1,500 s.
    assert limits["concurrency"].finish_s == 1_500
    # RPM 20: 10 windows -> 9 min + 30 s = 570 s.
    assert limits["rpm"].finish_s == 570
    # TPM 128,000 / 4,000 a request = 32 a window; ceil(200/32) = 7 -> 6 min + 30 s.
    assert limits["tpm"].finish_s == 390
    assert "tpd" not in limits  # the page publishes no TPD
    assert plan.time.binding is limits["concurrency"]
    # 600,000 input + 200,000 output at 10 CNY/1M each = 6 + 2 = 8 CNY.
    assert plan.cost is not None
    assert plan.cost.total == pytest.approx(8.0)


def test_relay_cost_with_discounts_multiples_and_priority() -> None:
    """Relay: rate multiples adjust tokens, then discounts and the priority field multiply."""
    relay = load_profile("relay")
    assert relay.relay is not None
    workload = Workload.uniform(1_000, prompt_tokens=1_000, output_tokens=500)
    cost = relay_cost(
        workload,
        relay.relay,
        input_price=0.002,  # USD per 1,000 tokens
        output_price=0.008,
        cache_hit_share=0.3,
        cache_multiple=0.5,
        extras_per_request=(ExtraTokens("reasoning", 200, 2),),
        channel_discount=0.8,
        user_discount=0.9,
        fields=("priority",),
    )
    # input: 1,000,000 + 300,000 cached x (0.5 - 1) = 850,000 -> 850 x 0.002 = 1.70
    # output: 500,000 + 200,000 reasoning x (2 - 1) = 700,000 -> 700 x 0.008 = 5.60
    # 7.30 x 0.8 x 0.9 x 1.8 (= 1.296) = 9.4608 USD; x 7.3 = 69.06384 CNY.
    assert cost.factor == pytest.approx(1.296)
    assert cost.total == pytest.approx(9.4608)
    assert cost.converted is not None
    assert cost.converted[0] == "CNY"
    assert cost.converted[1] == pytest.approx(69.06384)
    assert sum(line.cost for line in cost.lines) == pytest.approx(cost.total)
    lines = {line.item: line for line in cost.lines}
    assert lines["cached input"].billed_tokens == pytest.approx(150_000)  # 300,000 x 0.5
    assert lines["reasoning x2"].billed_tokens == pytest.approx(200_000)  # 200,000 x (2-1)


def test_relay_time_needs_overrides() -> None:
    """The relay's one tier has no limits: one call's time, unless limits are given."""
    relay = load_profile("relay")
    workload = Workload.uniform(1_000, prompt_tokens=1_000, output_tokens=500)
    free = tier_time(relay.tier("default"), workload, call_s=10)
    assert free.binding is None
    assert free.finish_s == 10
    # --rpm 60: 1000/60 -> 17 windows, 16 minutes + 10 s.
    capped = tier_time(relay.tier("default"), workload, call_s=10, overrides={"rpm": 60})
    assert capped.finish_s == 16 * 60 + 10


def test_relay_without_prices_and_discount_outside_relay() -> None:
    """A relay plan without prices says what to pass; discounts are relay-only."""
    relay = load_profile("relay")
    plan = make_plan(relay, relay.tier("default"), Workload.uniform(1, 1, 1))
    assert plan.cost is None
    assert "give the input and output prices (USD per 1,000 tokens)" in plan.cost_note
    stepfun = load_profile("stepfun")
    with pytest.raises(PlanError, match="is not a relay"):
        estimate_cost(
            stepfun, Workload.uniform(1, 1, 1), "step-3.5-flash", Pricing(user_discount=0.9)
        )


def test_prices_for_a_model_the_profile_lacks() -> None:
    """--input-price/--output-price price a model the profile does not list (per 1M tokens)."""
    moonshot = load_profile("moonshot")
    workload = Workload.uniform(1_000, prompt_tokens=1_000, output_tokens=500)
    # 1,000,000 x $0.60/1M + 500,000 x $2.50/1M = 0.60 + 1.25 = $1.85.
    pricing = Pricing(input_price=0.60, output_price=2.50)
    assert estimate_cost(moonshot, workload, "kimi-k2", pricing).total == pytest.approx(1.85)
    # Without prices, a model missing from a profile with models is an unknown model.
    stepfun = load_profile("stepfun")
    with pytest.raises(UnknownModelError, match="unknown model 'step-9'"):
        estimate_cost(stepfun, workload, "step-9", Pricing())


# --- whole requests, impossible requests, calendar days ---------------------------------


def test_tokens_pack_whole_requests_in_order() -> None:
    """Requests are indivisible: 60, 50, 40, 30 tokens under 100/min fill 3 windows, not 2."""
    workload = Workload.of_requests(
        RequestTokens(size, 0) for size in (60, 50, 40, 30)
    )  # [60] [50 40] [30]
    time = rate_time(workload, Rate(100, 60, "tokens", name="tpm"), call_s=5)
    assert time.batches == 3
    assert time.finish_s == 2 * 60 + 5


def test_a_request_larger_than_the_limit_never_finishes() -> None:
    """A request above a rate's whole limit can never be admitted: infinite time."""
    infly = load_profile("infly")
    workload = Workload.uniform(3, prompt_tokens=30_000, output_tokens=4_000)  # 34,000 > 32,000
    time = tier_time(infly.tier("Free"), workload)
    assert time.binding is not None
    assert time.binding.name == "tpm"
    assert not time.binding.possible
    assert math.isinf(time.finish_s)
    assert time.as_dict()["finish_s"] is None


def test_calendar_day_counts_one_window_fewer() -> None:
    """A calendar-day TPD may start just before midnight: 3 days' tokens need 1 day, not 2."""
    workload = Workload.uniform(3, prompt_tokens=100, output_tokens=0)
    rolling = rate_time(workload, Rate(100, 86_400, "tokens", name="tpd"), call_s=1)
    calendar = rate_time(
        workload, Rate(100, 86_400, "tokens", name="tpd", calendar_tz="Asia/Shanghai"), call_s=1
    )
    assert rolling.last_admission_s == 2 * 86_400
    assert calendar.last_admission_s == 86_400


# --- the cheapest tier -----------------------------------------------------------------


def test_cheapest_tier_for_a_deadline() -> None:
    """infly, 200 calls of 30 s: Tier3 (10,000 CNY) is the first to finish within 10 min."""
    infly = load_profile("infly")
    workload = Workload.uniform(200, prompt_tokens=3_000, output_tokens=1_000)
    times = all_tier_times(infly, workload, model="inf-chat-v1", call_s=30)
    finish = {time.tier: time.finish_s for time in times}
    # Free: concurrency 1 -> 200 x 30 = 6,000 s. Tier1: 50 waves = 1,500 s.
    # Tier2: concurrency 8 -> 25 waves = 750 s. Tier3: 24 -> 9 waves = 270 s
    # (RPM 240: 1 window, 30 s; TPM 384,000: 96 a window, 3 windows, 150 s).
    assert finish["Free"] == 6_000
    assert finish["Tier1"] == 1_500
    assert finish["Tier2"] == 750
    assert finish["Tier3"] == 270
    best = cheapest_tier(times, 600)
    assert best is not None
    assert best.tier == "Tier3"
    assert best.top_up == 10_000
    # Within 1 minute: Tier5 still needs ceil(200/48) = 5 waves = 150 s. None does.
    assert finish["Tier5"] == 150
    assert cheapest_tier(times, 60) is None


def test_cheapest_tier_in_the_plan_for_moonshot() -> None:
    """Moonshot, 1,000 requests within 2 h: Tier1 (10 USD; RPM 200 -> 4 min + 10 s)."""
    moonshot = load_profile("moonshot")
    workload = Workload.uniform(1_000, prompt_tokens=1_000, output_tokens=500)
    plan = make_plan(moonshot, moonshot.tier("Tier0"), workload, deadline_s=parse_deadline("2h"))
    assert plan.cheapest is not None
    assert plan.cheapest.tier == "Tier1"
    assert plan.cheapest.finish_s == 4 * 60 + 10
    assert [t.tier for t in plan.tiers] == list(moonshot.tier_names)


def test_parse_duration() -> None:
    """Durations read as seconds; junk and zero are refused with the text quoted."""
    assert parse_deadline("2h") == 7_200
    assert parse_deadline("1h30m") == 5_400
    assert parse_deadline("1.5d") == 129_600
    assert parse_deadline("90") == 90
    with pytest.raises(PlanError, match="invalid duration '2 weeks'"):
        parse_deadline("2 weeks")
    with pytest.raises(PlanError, match="must be positive"):
        parse_deadline("0s")


# --- JSONL -----------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Summarise this report, please."}]}
JSONL_LINES = [
    json.dumps({"prompt_tokens": 100, "max_tokens": 50}),
    "{not json",
    json.dumps({**CHAT, "max_tokens": 20}),
    "[1, 2]",
    "",
    json.dumps({"prompt_tokens": -1}),
    json.dumps({"custom_id": "a", "body": {**CHAT, "max_tokens": 30}}),
]


def test_read_jsonl_reports_malformed_lines_and_reads_the_rest() -> None:
    """Bad lines are reported by number (blank lines skipped); the others are estimated."""
    estimator = HeuristicEstimator()
    read = read_jsonl(JSONL_LINES, estimator)
    chat_prompt, _ = estimate_request_tokens("chat.completions.create", CHAT, estimator)
    assert read.requests == (
        RequestTokens(100, 50),
        RequestTokens(chat_prompt, 20),
        RequestTokens(chat_prompt, 30),
    )
    assert [problem.line for problem in read.problems] == [2, 4, 6]
    assert read.problems[0].message.startswith("invalid JSON")
    assert read.problems[1] == LineProblem(4, "expected a JSON object, got list")
    assert "prompt_tokens must be an int >= 0, got -1" in read.problems[2].message
    workload = Workload.of_requests(read.requests)
    assert workload.requests == 3
    assert workload.total_tokens == 150 + chat_prompt * 2 + 50


def test_cli_jsonl_with_a_malformed_line(tmp_path: Path) -> None:
    """The command names the malformed line and plans the other requests."""
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(JSONL_LINES) + "\n", encoding="utf-8")
    args = ["--provider", "moonshot", "--tier", "Tier0", "--jsonl", str(path)]
    code, output = _run(*args)
    assert code == 0, output
    assert "line 2: skipped: invalid JSON" in output
    assert "3 malformed line(s) skipped" in output
    code, output = _run(*args, "--json")
    document = json.loads(output)
    assert document["workload"]["requests"] == 3
    assert [p["line"] for p in document["malformed_lines"]] == [2, 4, 6]
    # RPM 3, 3 requests: one window (10 s); concurrency 1: 3 waves x 10 s = 30 s binds.
    assert document["time"]["binding"] == "concurrency"
    assert document["time"]["finish_s"] == 30


def test_cli_jsonl_without_one_readable_request_is_an_error(tmp_path: Path) -> None:
    """Every line malformed (or none at all): exit 2 naming the lines, not a plan of 0."""
    path = tmp_path / "bad.jsonl"
    path.write_text('not json\n{"a": 1}\n[1, 2]\n', encoding="utf-8")
    code, output = _run("--provider", "moonshot", "--tier", "Tier1", "--jsonl", str(path))
    assert code == 2, output
    assert "no request could be read: line 1: invalid JSON" in output
    assert "line 3: expected a JSON object, got list" in output
    path.write_text("\n", encoding="utf-8")
    code, output = _run("--provider", "moonshot", "--tier", "Tier1", "--jsonl", str(path))
    assert code == 2, output
    assert "it holds no request line" in output


def test_cli_a_batch_that_can_never_finish_says_why() -> None:
    args = ["--provider", "moonshot", "--tier", "Tier1", "--requests", "10"]
    code, output = _run(*args, "--prompt-tokens", "3000000", "--output-tokens", "10")
    assert code == 0, output
    assert "the batch can never finish: a request is larger than the whole tpm limit" in output
    assert "at least never" not in output
    code, output = _run(
        *args, "--prompt-tokens", "10000000", "--output-tokens", "10", "--deadline", "1h"
    )
    assert code == 0, output
    assert (
        "No tier finishes within 1h: a request is larger than a whole limit of every tier" in output
    )
    assert "needs never" not in output


# --- the command -----------------------------------------------------------------------


def test_cli_table_for_moonshot_tier0() -> None:
    """The table names the binding limit and the 5 h 33 m wait (333 min + a 10 s call)."""
    code, output = _run(
        "--provider", "moonshot", "--tier", "Tier0", "--requests", "1000",
        "--prompt-tokens", "1000", "--output-tokens", "500", "--deadline", "2h",
    )  # fmt: skip
    assert code == 0, output
    assert "rpm *" in output
    assert "At Tier0, the batch takes at least 5h 33m 10s (rpm binds)." in output
    assert "Cheapest tier within 2h: Tier1 (cumulative top-up 10 USD)" in output
    assert "cost: not priced" in output


def test_cli_json_for_relay_with_discounts() -> None:
    """--json carries the relay's USD total and its CNY conversion."""
    code, output = _run(
        "--provider", "relay", "--tier", "default", "--requests", "1000",
        "--prompt-tokens", "1000", "--output-tokens", "500", "--input-price", "0.002",
        "--output-price", "0.008", "--cache-hit-share", "0.3", "--cache-multiple", "0.5",
        "--extra", "reasoning:200:2", "--channel-discount", "0.8", "--user-discount", "0.9",
        "--field", "priority", "--rpm", "60", "--json",
    )  # fmt: skip
    assert code == 0, output
    document = json.loads(output)
    assert document["cost"]["total"] == pytest.approx(9.4608)
    assert document["cost"]["converted"]["total"] == pytest.approx(69.06384)
    assert document["time"]["binding"] == "rpm"
    assert document["time"]["finish_s"] == 16 * 60 + 10


def test_cli_top_up_picks_the_tier() -> None:
    """--top-up 15 reaches Moonshot Tier1; 0.5 reaches no tier (at least 1 USD)."""
    base = ("--provider", "moonshot", "--requests", "10", "--prompt-tokens", "1")
    code, output = _run(*base, "--output-tokens", "1", "--top-up", "15", "--json")
    assert code == 0, output
    assert json.loads(output)["time"]["tier"] == "Tier1"
    code, output = _run(*base, "--output-tokens", "1", "--top-up", "0.5")
    assert code == 2
    assert "a cumulative top-up of 0.5 USD reaches no tier of 'moonshot'; Tier0 needs 1" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--provider", "nope", "--tier", "T"),
            "Error: unknown provider 'nope'; known: infly, minimax, moonshot, relay, stepfun",
        ),
        (
            ("--provider", "moonshot", "--tier", "Tier9"),
            "Error: unknown tier 'Tier9' in profile 'moonshot'; known: Tier0, Tier1, Tier2, "
            "Tier3, Tier4, Tier5",
        ),
        (
            ("--provider", "minimax", "--tier", "paid", "--model", "M3"),
            "Error: unknown model 'M3' in profile 'minimax'; known: MiniMax-M2",
        ),
        (
            ("--provider", "minimax", "--tier", "paid"),
            "Error: profile 'minimax' sets limits per model: name a model "
            "(MiniMax-M2, MiniMax-M2-Stable)",
        ),
        (
            ("--provider", "relay", "--tier", "default", "--field", "turbo"),
            "Error: unknown billing item 'turbo' in relay field multipliers; known: priority",
        ),
        (
            ("--provider", "moonshot", "--tier", "Tier0", "--deadline", "soon"),
            "Error: invalid duration 'soon'",
        ),
    ],
)
def test_cli_errors_exit_2_with_the_typed_message(args: tuple[str, ...], message: str) -> None:
    """Unknown names and bad values exit with code 2 and ratekit's own message."""
    workload = ("--requests", "1", "--prompt-tokens", "1", "--output-tokens", "1")
    extra = ("--input-price", "1", "--output-price", "1") if "relay" in args else ()
    code, output = _run(*args, *workload, *extra)
    assert code == 2
    assert message in output


def test_cli_needs_a_workload() -> None:
    """Without --requests... or --jsonl, the command says what to give."""
    code, output = _run("--provider", "moonshot", "--tier", "Tier0")
    assert code == 2
    assert "give --requests, --prompt-tokens and --output-tokens" in output


def test_format_duration() -> None:
    """Durations print as days, hours, minutes and seconds; infinity as never."""
    assert format_duration(19_990) == "5h 33m 10s"
    assert format_duration(90_061) == "1d 1h 1m 1s"
    assert format_duration(0) == "0s"
    assert format_duration(math.inf) == "never"


def test_a_bad_jsonl_line_costs_that_line_only() -> None:
    """An output cap that is negative, a string or NaN, JSON nested beyond reading, and
    a message `run` would refuse: each is its line's problem; the good line is planned."""
    good = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'
    lines = [
        good,
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "abc"}',
        '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}',
        "[" * 100_000 + "]" * 100_000,
        '{"messages": [{"role": "user"}]}',
    ]
    read = read_jsonl(lines, HeuristicEstimator())
    assert len(read.requests) == 1
    messages = {problem.line: problem.message for problem in read.problems}
    assert sorted(messages) == [2, 3, 4, 5, 6]
    assert "max_tokens: expected an int >= 0, got -5" in messages[2]
    assert "max_tokens: expected an int >= 0, got 'abc'" in messages[3]
    assert "max_tokens: expected an int >= 0, got nan" in messages[4]
    assert messages[5] == "JSON nested too deeply to read"
    assert messages[6] == "messages[0]: a user message needs content"
