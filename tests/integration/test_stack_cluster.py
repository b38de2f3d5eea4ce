"""The cluster profile against its real servers: the Cassandra ring, the Kafka quorum, Redis with a replica,
the supervisor's restarts and discovery files, a prediction through Envoy, and the CLI's --profile.

One cluster per session (`stack_cluster`, tests/cluster_fixtures.py); each test leaves it as it found it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as redis_async
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, Session
from cassandra.policies import WhiteListRoundRobinPolicy
from cassandra.query import SimpleStatement
from confluent_kafka.admin import AdminClient, ConfigResource

from services.features.redis_client import RespClient
from stack import cluster
from stack.demo import demo_json_body
from stack.process import ProcessRecord, find_marked_processes
from tests.cluster_fixtures import RunningCluster, free_cluster_ports

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOG_TOPIC = "infergrid.inference-log.v1"


def _wait(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


@pytest.fixture
def session(stack_cluster: RunningCluster) -> Iterator[Session]:
    config = stack_cluster.config
    driver = Cluster(
        cluster.cassandra_contact_points(config),
        port=config.port("cassandra"),
        auth_provider=stack_cluster.cassandra_auth,
    )
    try:
        yield driver.connect()
    finally:
        driver.shutdown()


# Cassandra.


def test_every_cassandra_node_sees_the_two_others(stack_cluster: RunningCluster) -> None:
    config = stack_cluster.config
    for address in cluster.cassandra_contact_points(config):
        only = ExecutionProfile(load_balancing_policy=WhiteListRoundRobinPolicy([address]))
        node = Cluster(
            [address],
            port=config.port("cassandra"),
            auth_provider=stack_cluster.cassandra_auth,
            execution_profiles={EXEC_PROFILE_DEFAULT: only},
        )
        try:
            local = node.connect()
            peers = sorted(row.peer for row in local.execute("SELECT peer FROM system.peers"))
            data_center = local.execute("SELECT data_center FROM system.local").one().data_center
        finally:
            node.shutdown()
        assert peers == sorted(a for a in cluster.cassandra_contact_points(config) if a != address)
        assert data_center == cluster.DATA_CENTER


def test_the_services_keyspace_has_three_replicas(session: Session) -> None:
    row = session.execute(
        "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = 'infergrid'"
    ).one()
    assert row is not None, "the services did not create their keyspace"
    assert row.replication["class"].endswith("NetworkTopologyStrategy")
    assert row.replication[cluster.DATA_CENTER] == "3"


def test_services_read_and_write_at_local_quorum(stack_cluster: RunningCluster) -> None:
    for name in ("features-1", "logging-2"):
        env = stack_cluster.components[name].environment()
        prefix = f"INFERGRID_{name.split('-')[0].upper()}_"
        assert env[f"{prefix}CASSANDRA_READ_CONSISTENCY"] == "LOCAL_QUORUM"
        assert env[f"{prefix}CASSANDRA_WRITE_CONSISTENCY"] == "LOCAL_QUORUM"
        assert env[f"{prefix}CASSANDRA_CONTACT_POINTS"].split(",") == cluster.cassandra_contact_points(
            stack_cluster.config
        )


# Kafka.


def test_three_brokers_and_the_log_topic_at_three_replicas_min_isr_two(stack_cluster: RunningCluster) -> None:
    admin = AdminClient(cluster.kafka_client_conf(stack_cluster.config))
    metadata = admin.list_topics(timeout=10)
    assert sorted(metadata.brokers) == [1, 2, 3]
    assert LOG_TOPIC in metadata.topics, "the logging service did not create its topic"
    for partition in metadata.topics[LOG_TOPIC].partitions.values():
        assert sorted(partition.replicas) == [1, 2, 3]
    topic_config = admin.describe_configs([ConfigResource("topic", LOG_TOPIC)])
    (described,) = topic_config.values()
    assert described.result(timeout=10)["min.insync.replicas"].value == "2"
    broker_config = admin.describe_configs([ConfigResource("broker", "1")])
    (broker,) = broker_config.values()
    values = {k: v.value for k, v in broker.result(timeout=10).items()}
    assert values["default.replication.factor"] == "3"
    assert values["min.insync.replicas"] == "2"
    assert values["offsets.topic.replication.factor"] == "3"
    assert values["transaction.state.log.min.isr"] == "2"


# Redis.


def test_redis_replica_follows_the_primary_which_keeps_an_append_only_file(
    stack_cluster: RunningCluster,
) -> None:
    primary, standby = stack_cluster.components["redis"], stack_cluster.components["redis-replica"]
    writer = redis.Redis.from_url(primary.url)  # type: ignore[attr-defined]
    reader = redis.Redis.from_url(standby.url)  # type: ignore[attr-defined]
    try:
        assert writer.config_get("appendonly")["appendonly"] == "yes"
        assert writer.config_get("appendfsync")["appendfsync"] == "everysec"
        assert reader.info("replication")["master_link_status"] == "up"
        key = f"test:{uuid.uuid4().hex}"
        writer.set(key, "replicated")
        _wait(lambda: reader.get(key) == b"replicated", 10, "the replica to receive the key")
    finally:
        writer.close()
        reader.close()


async def test_clients_reconnect_and_keys_survive_a_redis_restart(stack_cluster: RunningCluster) -> None:
    primary = stack_cluster.components["redis"]
    url = primary.url  # type: ignore[attr-defined]  # the administrator's (the services log in as their own users)
    limiter_client = redis_async.Redis.from_url(url)  # as libs/ratelimit.py's clients
    cache_client = RespClient(url)  # as services/features/cache.py's
    key = f"test:bucket:{uuid.uuid4().hex}"
    try:
        await limiter_client.hset(key, mapping={"tokens": "7", "ts": "1"})
        assert await cache_client.execute(("PING",)) == [b"PONG"]
        primary.stop()
        primary.start()
        # A bucket written just before the restart is still there (the append-only file).
        for attempt in range(3):  # a pooled connection may fail once after the restart, then reconnects
            try:
                assert await limiter_client.hget(key, "tokens") == b"7"
                break
            except redis.ConnectionError:
                if attempt == 2:
                    raise
        for attempt in range(3):
            try:
                assert await cache_client.execute(("GET", key + "-none")) == [None]
                break
            except ConnectionError:
                if attempt == 2:
                    raise
        standby = stack_cluster.components["redis-replica"]
        _wait(standby.ready, 20, "the replica to resync with the restarted primary")
    finally:
        await limiter_client.delete(key)
        await limiter_client.aclose()
        await cache_client.close()


# The supervisor and the discovery files.


def _endpoint(component: object) -> str:
    return f"{component.host}:{component.port}"  # type: ignore[attr-defined]


def test_discovery_files_list_every_ready_replica(stack_cluster: RunningCluster) -> None:
    config = stack_cluster.config
    for service in cluster.SERVICES:
        expected = sorted(_endpoint(stack_cluster.components[f"{service}-{i}"]) for i in (1, 2))
        _wait(
            lambda s=service, e=expected: cluster.read_discovery(config, s) == e, 10, f"{service}'s endpoints"
        )
    platform = config.platform_file.read_text()
    assert f"file:{cluster.discovery_path(config, 'gateway')}" in platform
    assert "placement: edge" in platform


def test_supervisor_restarts_a_sigkilled_replica_which_leaves_then_rejoins_discovery(
    stack_cluster: RunningCluster,
) -> None:
    config = stack_cluster.config
    victim = stack_cluster.components["edge-2"]
    endpoint = _endpoint(victim)
    record = victim.record()
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    _wait(
        lambda: endpoint not in cluster.read_discovery(config, "edge"), 10, "edge-2 to leave discovery", 0.02
    )
    _wait(
        lambda: (r := victim.record()) is not None and r.pid != record.pid and victim.ready(),
        60,
        "the supervisor to restart edge-2",
    )
    _wait(lambda: endpoint in cluster.read_discovery(config, "edge"), 10, "edge-2 to rejoin discovery")


def test_a_replica_stopped_through_the_stack_stays_stopped_until_started(
    stack_cluster: RunningCluster,
) -> None:
    config = stack_cluster.config
    replica = stack_cluster.components["gateway-2"]
    endpoint = _endpoint(replica)
    replica.stop()
    _wait(
        lambda: endpoint not in cluster.read_discovery(config, "gateway"), 10, "gateway-2 to leave discovery"
    )
    time.sleep(2)  # four supervisor rounds
    assert replica.record() is None
    assert not [p for p in find_marked_processes(str(config.state_dir)) if p.component == "gateway-2"]
    replica.start()
    _wait(lambda: endpoint in cluster.read_discovery(config, "gateway"), 10, "gateway-2 to rejoin discovery")


def test_add_replica_starts_a_supervised_third_replica(stack_cluster: RunningCluster) -> None:
    config = stack_cluster.config
    added = cluster.add_replica(config, "inference")
    try:
        assert added.name == "inference-3"
        assert added.ports["inference"] == config.port("inference") + 2 * cluster.PORT_STRIDE
        _wait(
            lambda: _endpoint(added) in cluster.read_discovery(config, "inference"), 10, "inference-3 listed"
        )
        assert "inference-3" in cluster.components(config)
        assert [c.name for c in cluster.replicas(config, "inference")] == [
            "inference-1",
            "inference-2",
            "inference-3",
        ]
    finally:
        added.stop()
    _wait(lambda: _endpoint(added) not in cluster.read_discovery(config, "inference"), 10, "inference-3 gone")


# The whole request path.


def test_a_prediction_through_envoy_reaches_every_replica_type(stack_cluster: RunningCluster) -> None:
    config = stack_cluster.config
    request = urllib.request.Request(
        f"http://{config.host}:{config.port('envoy')}/v1/models/fraud:predict",
        data=json.dumps(demo_json_body()).encode(),
        headers={"content-type": "application/json", "x-api-key": stack_cluster.demo_key},
        method="POST",
    )
    answer: dict[str, object] = {}

    def _predicted() -> bool:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                answer.update(json.loads(response.read()))
                return True
        except OSError:
            return False

    _wait(_predicted, 60, "a prediction through Envoy", 1.0)
    assert answer["model"] == "fraud"
    assert answer["degraded"] is False
    denied = urllib.request.Request(request.full_url, data=request.data, headers={"x-api-key": "wrong"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(denied, timeout=5)
    assert refused.value.code == 401  # admission in the edge (platform: placement edge)


# Cassandra with a node down (last: it restarts a node).


def test_a_local_quorum_write_succeeds_with_one_node_stopped(
    stack_cluster: RunningCluster, session: Session
) -> None:
    keyspace = f"quorum_{uuid.uuid4().hex[:8]}"
    session.execute(f"CREATE KEYSPACE {keyspace} WITH replication = {cluster.KEYSPACE_REPLICATION}")
    session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v text)")
    node = stack_cluster.components["cassandra-3"]
    node.stop()
    try:
        insert = SimpleStatement(
            f"INSERT INTO {keyspace}.kv (k, v) VALUES (%s, %s)",
            consistency_level=ConsistencyLevel.LOCAL_QUORUM,
        )
        select = SimpleStatement(
            f"SELECT v FROM {keyspace}.kv WHERE k = %s", consistency_level=ConsistencyLevel.LOCAL_QUORUM
        )
        for i in range(20):  # every token range: some have node 3 as a replica
            session.execute(insert, (f"k{i}", f"v{i}"))
        assert [session.execute(select, (f"k{i}",)).one().v for i in range(20)] == [
            f"v{i}" for i in range(20)
        ]
    finally:
        node.start()
        session.execute(f"DROP KEYSPACE {keyspace}")


# The CLI's profile switch (a separate, tiny cluster state: Redis and its replica only).


def test_cli_profile_cluster_up_status_down(tmp_path_factory: pytest.TempPathFactory) -> None:
    ports = free_cluster_ports()
    state = tmp_path_factory.mktemp("cli-cluster")
    env = {
        **os.environ,
        "INFERGRID_STATE_DIR": str(state),
        "INFERGRID_REDIS_PORT": str(ports["redis"]),
        "INFERGRID_STACK_PROFILE": "cluster",
    }

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "stack", *args],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    try:
        out = cli("up", "redis")  # the prefix rule: `redis` is the primary only
        assert "redis: ready" in out
        cli("up", "redis-replica")
        table = cli("status", "redis", "redis-replica")
        assert [line.split()[3] for line in table.splitlines()[1:]] == ["healthy", "healthy"]
        assert "kafka-1" in cli("status")  # every cluster component has a row
        cli("down")
        assert ProcessRecord.read(state / "run" / "redis.json") is None
        assert not list(find_marked_processes(str(state)))
    finally:
        subprocess.run(
            [sys.executable, "-m", "stack", "down"], check=False, env=env, capture_output=True, timeout=120
        )
