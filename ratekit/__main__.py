"""``python -m ratekit``: the offline simulation (no network, no Redis, no API key)."""

from __future__ import annotations

import argparse
import sys

import anyio

from ._args import amount, int_in, positive
from ._errors import RatekitError
from ._profiles import load_profile
from .testing.simulation import simulate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ratekit",
        description=(
            "Drive a batch of calls through ratekit into a strict in-process provider that "
            "enforces a tier exactly, with time compressed, and report 429s and utilisation."
        ),
    )
    parser.add_argument("--provider", default="moonshot", help="bundled provider (moonshot)")
    parser.add_argument("--tier", default="tier1", help="tier name (tier1)")
    parser.add_argument("--model", default=None, help="model, for per-model limits")
    parser.add_argument(
        "--calls", type=int_in(1, 10_000_000), default=600, help="calls to make (600)"
    )
    parser.add_argument(
        "--workers", type=int_in(1, 100_000), default=100, help="concurrent tasks (100)"
    )
    parser.add_argument(
        "--speed", type=positive, default=60.0, help="time compression: 60 runs a minute per second"
    )
    parser.add_argument(
        "--margin-ms",
        type=amount,
        default=None,
        help="safety margin per admission, real ms (the library's default, 50)",
    )
    args = parser.parse_args(argv)
    try:
        tier = load_profile(args.provider).tier(args.tier)
        overrides = {} if args.margin_ms is None else {"margin_s": args.margin_ms / 1000}
        limits = tier.limits(model=args.model, **overrides).compressed(args.speed)
    except RatekitError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    model = f" {args.model}" if args.model else ""
    print(
        f"{args.provider} {tier.name}{model}: concurrency {limits.concurrency}, "
        f"rpm {limits.rpm}, tpm {limits.tpm}, tpd {limits.tpd}; time x{args.speed:g}"
    )

    async def run() -> list[str]:
        report = await simulate(limits, calls=args.calls, workers=args.workers)
        return report.lines()

    print("\n".join(anyio.run(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
