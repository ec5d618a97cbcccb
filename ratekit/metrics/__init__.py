"""A scheduler's metrics where operators look, each behind an optional extra.

- `ratekit.metrics.prometheus`: `RatekitCollector`, for the `prometheus-client`
  package (``pip install 'ratekit[prometheus]'``).
- `ratekit.metrics.otel`: `RatekitMetrics`, for the OpenTelemetry API
  (``pip install 'ratekit[otel]'``).

Both are scheduler hooks that count events, with gauges read from a snapshot of the
scheduler's statistics that ``async with`` keeps fresh. Importing this package
imports neither library; importing a module whose library is missing raises
`ratekit.MissingExtraError` naming the extra.
"""
