"""The cluster profile without running servers: names, ports, start and stop order, rendered configs, discovery files."""

import json
import stat
from pathlib import Path

import pytest

from stack import cluster
from stack.cassandra import Cassandra, initial_token
from stack.config import StackConfig
from stack.errors import StackError
from stack.kafka import Kafka
from stack.redis import Redis
from stack.registry import select, stages


@pytest.fixture
def config(tmp_path: Path) -> StackConfig:
    return StackConfig.from_env(
        {"INFERGRID_STATE_DIR": str(tmp_path / "state"), "INFERGRID_CACHE_DIR": str(tmp_path / "cache")},
        profile="cluster",
    )


def test_components_have_the_stable_names_in_start_order(config: StackConfig) -> None:
    names = list(cluster.components(config))
    assert names == [
        *(f"cassandra-{n}" for n in (1, 2, 3)),
        *(f"kafka-{n}" for n in (1, 2, 3)),
        "redis",
        "redis-replica",
        "jaeger",
        "prometheus",
        *(f"{s}-{i}" for s in ("inference", "features", "logging", "gateway", "edge") for i in (1, 2)),
        "controlplane",
        "supervisor",
        "envoy",
    ]
    assert [c.name for c in stages(config)[0]] == [
        *(f"cassandra-{n}" for n in (1, 2, 3)),
        "kafka-1",
        "kafka-2",
        "kafka-3",
    ]


def test_nodes_share_ports_on_their_own_loopback_addresses(config: StackConfig) -> None:
    parts = cluster.components(config)
    assert [parts[f"cassandra-{n}"].host for n in (1, 2, 3)] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert {parts[f"kafka-{n}"].port for n in (1, 2, 3)} == {config.port("kafka")}
    assert parts["redis-replica"].host == "127.0.0.2"
    assert cluster.kafka_bootstrap_servers(config) == ",".join(f"127.0.0.{n}:9092" for n in (1, 2, 3))


def test_replicas_are_ten_ports_apart(config: StackConfig) -> None:
    assert cluster.replica_ports(config, "gateway", 2) == {
        "gateway": 50061,
        "gateway_metrics": 9111,
        "gateway_health": 50066,
    }
    assert cluster.replica(config, "inference", 3).ports == {
        "inference": 8021,
        "inference_metrics": 8022,
        "inference_http": 8020,
    }
    ports = [
        p for c in cluster.components(config).values() for p in c.ports.values() if c.host == config.host
    ]
    assert len(ports) == len(set(ports)), "two components of 127.0.0.1 share a port"


def test_names_select_a_kind_or_one_instance(config: StackConfig) -> None:
    assert [c.name for c in select(config, ["cassandra"])] == ["cassandra-1", "cassandra-2", "cassandra-3"]
    assert [c.name for c in select(config, ["redis", "gateway-2"])] == ["redis", "gateway-2"]
    with pytest.raises(StackError, match="unknown component"):
        select(config, ["cassandra-4"])


def test_down_stops_the_supervisor_first_and_every_replica_at_once(config: StackConfig) -> None:
    order = cluster.stop_order(stages(config))
    assert [[c.name for c in group] for group in order[:3]] == [["supervisor"], ["envoy"], ["controlplane"]]
    assert len(order[3]) == 10
    assert [c.name for c in order[-1]][:3] == ["cassandra-1", "cassandra-2", "cassandra-3"]


def test_cassandra_nodes_render_their_token_seed_and_address(config: StackConfig) -> None:
    node = Cassandra(config, node=2, nodes=3)
    node.prepare()
    text = (node.data_dir / "conf" / "cassandra.yaml").read_text()
    assert "listen_address: 127.0.0.2" in text
    assert f'seeds: "127.0.0.1:{config.port("cassandra_storage")}"' in text
    assert f"initial_token: {initial_token(2, 3)}" in text
    assert "auto_bootstrap: false" in text
    assert "authenticator: PasswordAuthenticator" in text
    assert "authorizer: CassandraAuthorizer" in text
    for service in ("features", "logging"):  # each logs in as its own role, its password a 0600 file
        env = cluster.components(config)[f"{service}-2"].environment()
        assert env[f"INFERGRID_{service.upper()}_CASSANDRA_USERNAME"] == service
        password = Path(env[f"INFERGRID_{service.upper()}_CASSANDRA_PASSWORD_FILE"])
        assert password == config.secrets_dir / f"cassandra-{service}"
        assert stat.S_IMODE(password.stat().st_mode) == 0o600
    assert [initial_token(n, 3) for n in (1, 2, 3)] == sorted({initial_token(n, 3) for n in (1, 2, 3)})
    assert initial_token(1, 1) == 0  # the single node keeps its token


def test_kafka_nodes_render_a_three_voter_quorum_at_rf_three(config: StackConfig) -> None:
    broker = Kafka(config, node=3, nodes=3)
    properties = broker.write_properties()
    text = properties.read_text()
    assert "node.id=3" in text
    # Clients and brokers authenticate on every listener; the file holds admin's password: owner only.
    assert "listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT" in text
    assert "allow.everyone.if.no.acl.found=false" in text
    assert properties.stat().st_mode & 0o777 == 0o600
    assert "controller.quorum.voters=1@127.0.0.1:9093,2@127.0.0.2:9093,3@127.0.0.3:9093" in text
    assert broker.cluster_id_file == config.state_dir / "kafka-cluster-id"


def test_redis_primary_keeps_an_append_only_file_and_the_replica_follows_it(config: StackConfig) -> None:
    parts = cluster.components(config)
    primary, standby = parts["redis"], parts["redis-replica"]
    assert isinstance(primary, Redis) and isinstance(standby, Redis)
    assert "--appendfsync" in primary.command() and "everysec" in primary.command()
    command = standby.command()
    assert command[command.index("--replicaof") + 1 :][:2] == ["127.0.0.1", str(config.port("redis"))]
    assert command[command.index("--appendonly") + 1] == "no"


def test_services_get_the_cluster_backends_and_discovery_targets(config: StackConfig) -> None:
    parts = cluster.components(config)
    gateway = parts["gateway-2"].environment()
    assert (
        gateway["INFERGRID_GATEWAY_INFERENCE_TARGET"] == f"file:{cluster.discovery_path(config, 'inference')}"
    )
    assert gateway["INFERGRID_GATEWAY_INFERENCE_LOG_SPOOL_DIR"] == str(
        config.state_dir / "gateway-2" / "spool"
    )
    logging = parts["logging-1"].environment()
    assert logging["INFERGRID_LOGGING_TOPIC_REPLICATION"] == "3"
    assert logging["INFERGRID_LOGGING_TOPIC_MIN_INSYNC_REPLICAS"] == "2"
    assert logging["INFERGRID_LOGGING_CASSANDRA_REPLICATION"] == cluster.KEYSPACE_REPLICATION
    assert (
        logging["INFERGRID_LOGGING_LAKE_DIR"]
        == parts["logging-2"].environment()["INFERGRID_LOGGING_LAKE_DIR"]
    )
    plane = parts["controlplane"].environment()
    assert plane["INFERGRID_CONTROLPLANE_EDGE_ADDRESS"] == f"file:{cluster.discovery_path(config, 'edge')}"


def test_discovery_files_are_written_atomically_only_when_they_change(config: StackConfig) -> None:
    assert cluster.read_discovery(config, "gateway") == []
    assert cluster.write_discovery(config, "gateway", ["127.0.0.1:50061", "127.0.0.1:50051"])
    path = cluster.discovery_path(config, "gateway")
    assert json.loads(path.read_text()) == {"endpoints": ["127.0.0.1:50051", "127.0.0.1:50061"]}
    assert not cluster.write_discovery(config, "gateway", ["127.0.0.1:50051", "127.0.0.1:50061"])
    assert [p.name for p in path.parent.iterdir()] == ["gateway.json"]  # no temp file left


def test_the_platform_file_names_the_gateway_discovery_file_and_edge_admission(config: StackConfig) -> None:
    path = cluster.render_platform(config)
    text = path.read_text()
    assert f'endpoints: ["file:{cluster.discovery_path(config, "gateway")}"]' in text
    assert "admission: {placement: edge}" in text
    path.write_text(text + "\n# a live edit\n")
    cluster.render_platform(config)
    assert path.read_text().endswith("# a live edit\n")


def test_parse_replica() -> None:
    assert cluster.parse_replica("gateway-12") == ("gateway", 12)
    assert cluster.parse_replica("cassandra-1") is None
    assert cluster.parse_replica("controlplane") is None
