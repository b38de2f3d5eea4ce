"""Features: our FeatureService.GetOnlineFeatures vs Feast's Python feature server, same data, same Redis
and Cassandra.

Data: one view `bench_user` (entity user_id INT64, 32 FLOAT features f00..f31, 10,000 users, values from a
fixed seed) — written through our WriteFeatures API into Cassandra, and as a Parquet file materialized by
Feast into the same Redis server (its own keys) and into the same Cassandra (its own keyspace `feast_bench`).
Requests: 1 entity x 32 features, and 100 entities x 32 features. h2load sends one fixed request per size
(user 4242; 100 fixed random users), since ghz's per-request cost (~10 ms of Go CPU to decode a 100-entity
answer) made it the bottleneck; wrk's Lua script draws random ids for Feast. Our responses were checked against the written values before measuring.
  ours-hit   cache on, every entity already in Redis (a pass over all ids before measuring)
  ours-miss  a second server with CACHE_ENABLED=false: every read goes to Cassandra (the miss path's store read)
  feast      `feast serve` (gunicorn + 1 uvicorn worker) on Redis, --max-requests 0 (feast-envoy.md: the
             default recycles the only worker every ~1,000 requests), HTTP/JSON /get-online-features
  feast-cassandra  the same Feast server on its Cassandra online store (keyspace created here; the peer of
             ours-miss), after ours, with Cassandra on the server CPU too
Server side (our server or Feast, Redis, Cassandra) on CPU 0, load generator on CPU 1 — except that during
the ours-hit rows, which never read Cassandra (nor does Feast on Redis), Cassandra waits on CPU 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration

from bench.core import Run, Suite
from bench.loadgen import WRK_DONE, H2load, Wrk, grpc_frame
from bench.procs import Server, free_port, loadgen_cpus, server_cpus, set_affinity, wait_port
from bench.suites.common import flame_graph, service_env, wait_grpc_serving
from bench.tools import ensure_debian, ensure_venv, say
from infergrid.features.v1 import features_pb2 as pb
from infergrid.features.v1 import features_pb2_grpc as pb_grpc
from infergrid.types.v1 import value_pb2
from stack.cassandra import ADMIN_ROLE, admin_auth, admin_env
from stack.redis import ADMIN_USER as REDIS_ADMIN

CALL = "infergrid.features.v1.FeatureService.GetOnlineFeatures"
VIEW = "bench_user"
N_USERS = 10_000
N_FEATURES = 32
FEATURES = [f"f{i:02d}" for i in range(N_FEATURES)]


def values() -> np.ndarray:
    return np.random.default_rng(12345).random((N_USERS, N_FEATURES), dtype=np.float32)


def view() -> pb.FeatureView:
    vt = value_pb2.ValueType
    return pb.FeatureView(
        name=VIEW,
        entity=pb.Entity(
            name="user", key_columns=[pb.EntityKeyColumn(name="user_id", type=vt.VALUE_TYPE_INT64)]
        ),
        features=[pb.FeatureSpec(name=f, type=vt.VALUE_TYPE_FLOAT) for f in FEATURES],
        ttl=Duration(seconds=30 * 86_400),
        description="benchmark view: 32 float features per user",
        owner="bench",
    )


def read_request(ids: list[int]) -> pb.GetOnlineFeaturesRequest:
    req = pb.GetOnlineFeaturesRequest(features=[f"{VIEW}:{f}" for f in FEATURES])
    column = req.entities["user_id"]
    for i in ids:
        column.values.add(int64_value=int(i))
    return req


def load_data(port: int, data: np.ndarray, event: datetime) -> None:
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        stub = pb_grpc.FeatureServiceStub(ch)
        stub.ApplyFeatureView(pb.ApplyFeatureViewRequest(feature_view=view()), timeout=60)
        for start in range(0, N_USERS, 1000):
            req = pb.WriteFeaturesRequest(feature_view=VIEW)
            for uid in range(start, min(start + 1000, N_USERS)):
                row = req.rows.add()
                row.entity_key["user_id"].int64_value = uid
                for j, f in enumerate(FEATURES):
                    row.values[f].float_value = float(data[uid, j])
                row.event_timestamp.FromDatetime(event)
            stub.WriteFeatures(req, timeout=120)


def read_all(port: int, data: np.ndarray, *, check: bool) -> None:
    """Reads every user once (fills the cache); with `check`, compares values with what was written."""
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as ch:
        stub = pb_grpc.FeatureServiceStub(ch)
        for start in range(0, N_USERS, 1000):
            ids = list(range(start, min(start + 1000, N_USERS)))
            reply = stub.GetOnlineFeatures(read_request(ids), timeout=60)
            if check:
                got = np.array(
                    [[v.float_value for v in vec.values] for vec in reply.results], dtype=np.float32
                ).T
                if not np.array_equal(got, data[ids]):
                    raise RuntimeError(f"features read back differ from those written (users {start}..)")
                if any(s != pb.FEATURE_STATUS_PRESENT for vec in reply.results for s in vec.statuses):
                    raise RuntimeError("a written feature is not PRESENT")


def start_ours(run: Run, name: str, *, cache: bool, redis_url: str, cassandra_port: int, workers: int = 1,
               cpus: str | None = "pin") -> tuple[Server, int]:  # fmt: skip
    port = free_port()
    env = ours_env(
        run, port, cache=cache, redis_url=redis_url, cassandra_port=cassandra_port, workers=workers
    )
    server = run.procs.start(name, [sys.executable, "-m", "services.features"], env=env,
                             cpus=server_cpus() if cpus == "pin" else cpus)  # fmt: skip
    wait_grpc_serving(server, port, timeout=120)
    return server, port


def ours_env(run: Run, port: int, *, cache: bool, redis_url: str, cassandra_port: int, workers: int = 1
             ) -> dict[str, str]:  # fmt: skip
    """The variables of our features service on `port` (the bench keyspace, Redis as its cache or not)."""
    return service_env("INFERGRID_FEATURES_", port, {
        "INFERGRID_FEATURES_CASSANDRA_PORT": str(cassandra_port),
        "INFERGRID_FEATURES_CASSANDRA_KEYSPACE": "bench",
        **admin_env(run.backends.config, "INFERGRID_FEATURES_CASSANDRA"),  # a keyspace of its own
        "INFERGRID_FEATURES_CASSANDRA_WRITE_CONSISTENCY": "ONE",
        "INFERGRID_FEATURES_REDIS_URL": redis_url,
        "INFERGRID_FEATURES_CACHE_ENABLED": "true" if cache else "false",
        "INFERGRID_FEATURES_CACHE_TTL_S": "3600",
        "INFERGRID_FEATURES_WORKERS": str(workers),
    })  # fmt: skip


FEAST_KEYSPACE = "feast_bench"
# Feast's online store blocks, by store; `port` is the store's loopback port. Both stores require a login
# (Redis ACLs, Cassandra roles): Feast logs in as the administrator of each.
FEAST_STORES = {
    "redis": f'  type: redis\n  connection_string: "127.0.0.1:{{port}},username={REDIS_ADMIN},password={{password}}"',
    "cassandra": f'  type: cassandra\n  hosts: ["127.0.0.1"]\n  port: {{port}}\n  keyspace: {FEAST_KEYSPACE}\n'
    f"  username: {ADMIN_ROLE}\n  password: {{password}}",
}
FEAST_STORE_NAMES = {"redis": "Redis", "cassandra": "Cassandra"}
FEAST_YAML = """project: bench
registry: data/registry.db
provider: local
online_store:
{online_store}
offline_store:
  type: file
entity_key_serialization_version: 3
"""

FEAST_DEFS = """from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64)
source = FileSource(path="data/bench_user.parquet", timestamp_field="event_timestamp")
bench_user = FeatureView(
    name="bench_user",
    entities=[user],
    ttl=timedelta(days=30),
    schema=[Field(name=f"f{i:02d}", dtype=Float32) for i in range(32)],
    source=source,
    online=True,
)
"""

WRK_FEAST = """
math.randomseed(7)
local n = tonumber(wrk_n or 1)
local refs = {}
for i = 0, 31 do refs[#refs + 1] = string.format('"bench_user:f%02d"', i) end
local head = '{"features":[' .. table.concat(refs, ",") .. '],"entities":{"user_id":['
function init(args) n = tonumber(args[1] or "1") end
function request()
  local ids = {}
  for i = 1, n do ids[i] = tostring(math.random(0, 9999)) end
  return wrk.format("POST", "/get-online-features", {["Content-Type"] = "application/json"},
                    head .. table.concat(ids, ",") .. "]}}")
end
"""


def create_feast_keyspace(run: Run, port: int) -> None:
    """Feast's Cassandra store needs its keyspace to exist already (it creates only the tables)."""
    from cassandra.cluster import Cluster

    cluster = Cluster(
        ["127.0.0.1"], port=port, auth_provider=admin_auth(run.backends.config), connect_timeout=10
    )
    try:
        cluster.connect().execute(
            f"CREATE KEYSPACE IF NOT EXISTS {FEAST_KEYSPACE} "
            "WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}",
            timeout=60,
        )
    finally:
        cluster.shutdown()


def setup_feast(
    run: Run, suite: Suite, data: np.ndarray, event: datetime, *, store: str, store_port: int
) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    venv = ensure_venv("feast")
    repo = run.work_dir / f"feast_repo_{store}"
    (repo / "data").mkdir(parents=True, exist_ok=True)
    if store == "cassandra":
        create_feast_keyspace(run, store_port)
    if store == "cassandra":
        password = admin_auth(run.backends.config).password
    else:
        password = run.backends.redis(server_cpus()).admin_password
    online_store = FEAST_STORES[store].format(port=store_port, password=password)
    (repo / "feature_store.yaml").touch(mode=0o600)  # Feast logs in to its store as the administrator
    (repo / "feature_store.yaml").write_text(FEAST_YAML.format(online_store=online_store))
    (repo / "features.py").write_text(FEAST_DEFS)
    table = {"user_id": pa.array(np.arange(N_USERS, dtype=np.int64)),
             "event_timestamp": pa.array([event] * N_USERS, type=pa.timestamp("us", tz="UTC"))}  # fmt: skip
    for j, f in enumerate(FEATURES):
        table[f] = pa.array(data[:, j])
    pq.write_table(pa.table(table), repo / "data" / "bench_user.parquet")
    feast = str(venv / "bin" / "feast")
    env = {"HOME": str(run.work_dir), "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "FEAST_USAGE": "False"}
    t0 = time.monotonic()
    for args in (
        ["apply"],
        ["materialize-incremental", (datetime.now(UTC) + timedelta(minutes=1)).isoformat()],
    ):
        out = subprocess.run(
            [feast, *args], check=False, cwd=repo, env=env, capture_output=True, text=True, timeout=600
        )
        if out.returncode != 0:
            raise RuntimeError(f"feast {args[0]} failed: {out.stdout[-1500:]} {out.stderr[-1500:]}")
    suite.extra["feast_setup_s" if store == "redis" else f"feast_{store}_setup_s"] = round(
        time.monotonic() - t0, 1
    )
    return repo, Path(feast)


def check_feast(port: int, data: np.ndarray) -> None:
    ids = [0, 4242, 9999]
    body = json.dumps({"features": [f"{VIEW}:{f}" for f in FEATURES], "entities": {"user_id": ids}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", body,
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        reply = json.loads(resp.read())
    names = reply["metadata"]["feature_names"]
    for j, f in enumerate(FEATURES):
        col = names.index(f)
        got = np.array(reply["results"][col]["values"], dtype=np.float32)
        if not np.allclose(got, data[ids, j], rtol=0, atol=1e-6):
            raise RuntimeError(f"Feast returned {got} for {f}, expected {data[ids, j]}")
        if any(s != "PRESENT" for s in reply["results"][col]["statuses"]):
            raise RuntimeError("Feast: a feature is not PRESENT")


def body(run: Run, suite: Suite) -> None:
    s = run.settings
    wrk = Wrk(ensure_debian("wrk", "wrk"))
    data = values()
    event = datetime.now(UTC) - timedelta(hours=1)
    rng = np.random.default_rng(99)
    fixed = {1: [4242], 100: [int(i) for i in rng.choice(N_USERS, 100, replace=False)]}
    bodies = {}
    for n, ids in fixed.items():
        bodies[n] = run.work_dir / f"features-{n}.grpc"
        bodies[n].write_bytes(grpc_frame(read_request(ids).SerializeToString()))
    h2 = H2load(ensure_debian("h2load", "nghttp2-client"))
    suite.extra["data"] = {"view": VIEW, "users": N_USERS, "features": N_FEATURES, "type": "FLOAT"}
    redis = run.backends.redis(server_cpus())

    def grpc_sweep(server: Server, port: int, key: str, system: str) -> None:
        url = f"http://127.0.0.1:{port}/infergrid.features.v1.FeatureService/GetOnlineFeatures"
        frames = {n: h2.response_bytes(url=url, body_file=bodies[n]) for n in bodies}
        for n, concs in ((1, s.features_concurrency), (100, s.features_concurrency_100)):
            for c in concs:
                if not server.alive():
                    raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")

                def rep(duration: float, i: int, c: int = c, n: int = n) -> dict[str, Any]:
                    return h2.run(url=url, body_file=bodies[n], concurrency=c, duration_s=duration,
                                  response_frame_bytes=frames[n], log_file=run.work_dir / "h2load.log",
                                  server_cpu=server.cpu_seconds)  # fmt: skip

                run.measure(suite, system=system, key=key, protocol="gRPC", tool="h2load",
                            params={"entities": n, "concurrency": c}, rep=rep)  # fmt: skip

    def feast_sweep(store: str, store_port: int, key: str, error_key: str) -> None:
        """`feast serve` on `store`: setup, correctness check, then the wrk points; a failure is recorded."""
        server: Server | None = None
        try:
            repo, feast = setup_feast(run, suite, data, event, store=store, store_port=store_port)
            port = free_port()
            env = {"HOME": str(run.work_dir), "PATH": f"{feast.parent}:/usr/bin:/bin", "FEAST_USAGE": "False"}
            server = run.procs.start(key, [str(feast), "serve", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
                                           "--no-access-log", "--max-requests", "0"],
                                     env=env, cwd=repo, cpus=server_cpus())  # fmt: skip
            server.extra_pids = run.backends.pids(store)
            wait_port(port, 120, server.proc)
            check_feast(port, data)
            script = run.work_dir / "feast.lua"
            script.write_text(WRK_FEAST + WRK_DONE)
            system = f"Feast 0.67 feature server ({FEAST_STORE_NAMES[store]}, 1 worker, max-requests 0)"
            for n, concs in ((1, s.features_concurrency), (100, s.features_concurrency_100)):
                for c in concs:
                    if not server.alive():
                        raise RuntimeError(f"{server.name} died:\n{server.log_tail()}")

                    def rep_http(duration: float, i: int, c: int = c, n: int = n) -> dict[str, Any]:
                        return wrk.run(url=f"http://127.0.0.1:{port}", script=script, concurrency=c,
                                       duration_s=duration, server_cpu=server.cpu_seconds, script_args=[str(n)])  # fmt: skip

                    run.measure(suite, system=system, key=key, protocol="HTTP/JSON", tool="wrk",
                                params={"entities": n, "concurrency": c}, rep=rep_http)  # fmt: skip
        except Exception as exc:
            suite.extra[error_key] = f"{type(exc).__name__}: {exc}"[:2000]
            say(f"Feast ({store}) failed: {suite.extra[error_key][:500]}")
        finally:  # never left on the server CPU for what follows
            if server is not None:
                run.procs.stop(server)

    # 1. Feast on Redis first, while Cassandra is not running yet (nothing else on the server CPU but Redis).
    feast_sweep("redis", redis.port, "feast", "feast_error")

    # 2. Ours: cache hit, then cache off (every read from Cassandra).
    cassandra = run.backends.cassandra(server_cpus())
    server, port = start_ours(
        run, "features-hit", cache=True, redis_url=redis.url, cassandra_port=cassandra.port
    )
    load_data(port, data, event)
    read_all(port, data, check=True)  # also fills the cache
    read_all(port, data, check=True)  # now from the cache
    # A cache hit never reads Cassandra, and Feast on Redis has none: while the hits are measured,
    # Cassandra (still settling after its start and the load: flushes, compactions, JIT) waits on the
    # load generator's core, not on the server's. It comes back for the miss path, which reads it.
    (cassandra_pid,) = run.backends.pids("cassandra")
    set_affinity(cassandra_pid, loadgen_cpus())
    server.extra_pids = run.backends.pids("redis")
    grpc_sweep(server, port, "ours-hit", "InferGrid features (Redis cache hit)")
    if not s.quick:  # where the CPU goes on a cache hit (a separate, unmeasured run)
        url = f"http://127.0.0.1:{port}/infergrid.features.v1.FeatureService/GetOnlineFeatures"
        load = [h2.binary, "-t1", "-c8", "-m4", "-D", "8", "-d", str(bodies[1]), "-H", "content-type: application/grpc",
                "-H", "te: trailers", url]  # fmt: skip
        svg = flame_graph(server, run.out_dir / "flame-features.svg", load)
        if svg:
            suite.extra["flame_graph"] = svg.name
    run.procs.stop(server)
    set_affinity(cassandra_pid, server_cpus())
    server, port = start_ours(
        run, "features-miss", cache=False, redis_url=redis.url, cassandra_port=cassandra.port
    )
    server.extra_pids = run.backends.pids("redis", "cassandra")
    read_all(port, data, check=True)
    grpc_sweep(server, port, "ours-miss", "InferGrid features (cache off: Cassandra read)")
    run.procs.stop(server)

    # 3. Feast on the same Cassandra (its own keyspace): the peer of our miss path.
    feast_sweep("cassandra", cassandra.port, "feast-cassandra", "feast_cassandra_error")
