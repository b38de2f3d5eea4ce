"""Demo feature views and data for the demo `fraud` model (`python -m stack.demo_features`).

Applies three views through the FeatureService API of a running features
server and writes deterministic values for their entities:

    user      (user_id STRING,     u00000..u09999)  12 FLOAT features
    merchant  (merchant_id STRING, m0000..m0999)     8 FLOAT features
    device    (device_id STRING,   d00000..d04999)   4 FLOAT features

The names are the model's input names (`stack/demo_model.py` lists them
as `view:feature`); the other 8 of its 32 inputs come with the request. Values
follow the same distributions the model was trained on, from a fixed seed, so
every run writes the same values for an id, whatever the entity counts (with the
time of the run as event time).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration

from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc
from infergrid.types.v1 import value_pb2

VT = value_pb2.ValueType
Generator = Callable[[np.random.Generator, int], np.ndarray]
WRITE_BATCH = 1000


@dataclass(frozen=True)
class DemoView:
    name: str
    key: str
    id_format: str
    count: int
    features: tuple[tuple[str, str, Generator], ...]


def _f(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _draw(distribution: str, *params: float) -> Generator:
    """float32 draws from numpy's `distribution` with `params`."""
    return lambda r, n: _f(getattr(r, distribution)(*params, n))


USER = DemoView(
    "user",
    "user_id",
    "u{:05d}",
    10_000,
    (
        ("txn_count_1h", "user's transactions in the last hour", _draw("poisson", 0.3)),
        ("txn_count_24h", "user's transactions in the last 24 hours", _draw("poisson", 3.3)),
        (
            "amount_sum_24h",
            "sum of the user's amounts in the last 24 hours",
            lambda r, n: _f(r.poisson(3.3, n) * r.spawn(1)[0].lognormal(3.5, 0.6, n)),
        ),
        ("avg_amount_30d", "user's mean amount over 30 days", _draw("lognormal", 3.5, 0.6)),
        (
            "std_amount_30d",
            "standard deviation of the user's amounts over 30 days",
            lambda r, n: _f(r.lognormal(3.5, 0.6, n) * r.spawn(1)[0].uniform(0.2, 1.0, n)),
        ),
        ("account_age_days", "days since the account was opened", _draw("exponential", 700.0)),
        ("chargebacks_90d", "chargebacks on the user's cards in 90 days", _draw("poisson", 0.05)),
        ("distinct_merchants_7d", "distinct merchants the user paid in 7 days", _draw("poisson", 5.0)),
        (
            "distinct_countries_30d",
            "distinct merchant countries in 30 days",
            lambda r, n: _f(1.0 + r.poisson(0.2, n)),
        ),
        ("failed_logins_24h", "failed logins in the last 24 hours", _draw("poisson", 0.1)),
        ("days_since_last_txn", "days since the user's previous transaction", _draw("exponential", 2.0)),
        (
            "home_country_match_rate_30d",
            "share of 30-day transactions in the home country",
            _draw("beta", 20.0, 1.0),
        ),
    ),
)
MERCHANT = DemoView(
    "merchant",
    "merchant_id",
    "m{:04d}",
    1_000,
    (
        ("fraud_rate_30d", "share of the merchant's transactions that were fraud", _draw("beta", 1.0, 200.0)),
        ("txn_count_24h", "merchant's transactions in the last 24 hours", _draw("lognormal", 5.0, 1.0)),
        ("avg_amount_30d", "merchant's mean amount over 30 days", _draw("lognormal", 3.7, 0.7)),
        ("chargeback_rate_90d", "merchant's chargeback share over 90 days", _draw("beta", 1.0, 300.0)),
        ("age_days", "days since the merchant was onboarded", _draw("exponential", 1500.0)),
        ("category_risk", "risk score of the merchant category, 0-1", _draw("uniform", 0.0, 1.0)),
        ("refund_rate_30d", "merchant's refund share over 30 days", _draw("beta", 2.0, 50.0)),
        ("distinct_users_24h", "distinct paying users in the last 24 hours", _draw("lognormal", 4.0, 1.0)),
    ),
)
DEVICE = DemoView(
    "device",
    "device_id",
    "d{:05d}",
    5_000,
    (
        ("risk_score", "device reputation risk, 0-1", _draw("beta", 1.0, 10.0)),
        ("users_7d", "distinct users seen on the device in 7 days", lambda r, n: _f(1.0 + r.poisson(0.2, n))),
        ("fraud_rate_30d", "share of the device's transactions that were fraud", _draw("beta", 1.0, 300.0)),
        ("age_days", "days since the device was first seen", _draw("exponential", 300.0)),
    ),
)
VIEWS = (USER, MERCHANT, DEVICE)
TTL_S = 30 * 86_400


def feature_view(demo: DemoView) -> pb.FeatureView:
    """The FeatureView of a demo view."""
    return pb.FeatureView(
        name=demo.name,
        entity=pb.Entity(
            name=demo.name, key_columns=[pb.EntityKeyColumn(name=demo.key, type=VT.VALUE_TYPE_STRING)]
        ),
        features=[
            pb.FeatureSpec(name=n, type=VT.VALUE_TYPE_FLOAT, description=d) for n, d, _ in demo.features
        ],
        ttl=Duration(seconds=TTL_S),
        description=f"demo {demo.name} features of the fraud model",
        owner="infergrid-demo",
    )


def generate(demo: DemoView, count: int, seed: int = 7) -> tuple[list[str], dict[str, np.ndarray]]:
    """Deterministic ids and float32 values (one array per feature) for `count` entities.

    Each feature draws from its own seeded stream, so an entity's values do not
    depend on how many entities are generated.
    """
    ids = [demo.id_format.format(i) for i in range(count)]
    view_seed = sum(demo.name.encode())
    return ids, {
        name: gen(np.random.default_rng([seed, view_seed, index]), count)
        for index, (name, _, gen) in enumerate(demo.features)
    }


def write_requests(demo: DemoView, count: int, event_s: float) -> list[pb.WriteFeaturesRequest]:
    """WriteFeaturesRequests of up to WRITE_BATCH rows with the demo values."""
    ids, columns = generate(demo, count)
    names = list(columns)
    requests = []
    for start in range(0, count, WRITE_BATCH):
        request = pb.WriteFeaturesRequest(feature_view=demo.name)
        for i in range(start, min(start + WRITE_BATCH, count)):
            row = request.rows.add()
            row.entity_key[demo.key].string_value = ids[i]
            for name in names:
                row.values[name].float_value = float(columns[name][i])
            row.event_timestamp.FromNanoseconds(int(event_s * 1e9))
        requests.append(request)
    return requests


async def load(target: str, counts: dict[str, int] | None = None, timeout_s: float = 120.0) -> dict[str, int]:
    """Applies the demo views on the server at `target` and writes their values; returns rows per view."""
    counts = counts or {}
    written: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout_s)
        stub = features_pb2_grpc.FeatureServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        slots = asyncio.Semaphore(2)  # a couple of 1,000-row writes at a time

        async def _write(request: pb.WriteFeaturesRequest) -> pb.WriteFeaturesResponse:
            async with slots:
                return await stub.WriteFeatures(request, timeout=120)

        for demo in VIEWS:
            while True:  # the server may still be connecting to Cassandra
                try:
                    await stub.ApplyFeatureView(
                        pb.ApplyFeatureViewRequest(feature_view=feature_view(demo)), timeout=30
                    )
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(1.0)
            count = counts.get(demo.name, demo.count)
            replies = await asyncio.gather(*(_write(r) for r in write_requests(demo, count, time.time())))
            written[demo.name] = sum(r.rows_written for r in replies)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack.demo_features", description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50052", help="features server (default: %(default)s)")
    for demo in VIEWS:
        parser.add_argument(
            f"--{demo.name}s",
            type=int,
            default=demo.count,
            help=f"{demo.name} entities (default: %(default)s)",
        )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server")
    args = parser.parse_args(argv)
    counts = {demo.name: getattr(args, f"{demo.name}s") for demo in VIEWS}
    try:
        written = asyncio.run(load(args.target, counts, args.timeout))
    except (grpc.aio.AioRpcError, TimeoutError) as exc:
        print(f"error: could not load the demo features into {args.target}: {exc}", file=sys.stderr)
        return 1
    for name, rows in written.items():
        print(f"demo feature view {name}: {rows} entities")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
