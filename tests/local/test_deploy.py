"""The files in deploy/: every nats-server config passes the real binary's check, a hub of three and
a leaf run with TLS on client, route and leaf connections (certificates made here), unit files
pass systemd-analyze, manifests parse with the expected kinds, the dashboard names real metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from certs import write_certs
from nats.js.api import StreamConfig

from cim_place.cluster.agent.config import load_agent_config
from cim_place.cluster.agent.metrics import AgentMetrics
from cim_place.cluster.controller.metrics import ControllerMetrics
from cim_place.cluster.nats.connection import jetstream
from cim_place.cluster.nats.users import plan_domain, render_files
from cim_place.local.server_spec import ServerSpec, find_nats_server, free_port
from cim_place.local.servers import NatsServer
from cim_place.local.topologies import Hub

pytestmark = pytest.mark.nats

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TLS_DIR = "/etc/cim-place/tls/"
# -- certificates ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_certs(tmp_path_factory.mktemp("tls"))


def _generated(nodes: list[str], **urls: Any) -> dict[str, str]:
    plan = plan_domain(nodes, readers={"alice": nodes[0], "bob": None})
    return render_files(
        plan,
        hub_client_urls=urls.get("hub_client_urls", ["tls://hub-1:4222"]),
        hub_leaf_urls=urls.get("hub_leaf_urls", ["tls://hub-1:7422"]),
        leaf_client_url="tls://127.0.0.1:4222",
    )


def _check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def _stage(text: str, certs: Path) -> str:
    return text.replace(TLS_DIR, f"{certs}/")


# -- nats-server configs ---------------------------------------------------------------------------


def test_every_nats_config_passes_the_servers_own_check(tmp_path: Path, certs: Path) -> None:
    files = _generated(["leaf-a"])
    hub_dir = tmp_path / "hub"
    leaf_dir = tmp_path / "leaf"
    for directory, generated in ((hub_dir, ["accounts.conf"]), (leaf_dir, [])):
        directory.mkdir()
        for config in sorted((DEPLOY / "nats").glob("*.conf")):
            (directory / config.name).write_text(_stage(config.read_text(), certs))
        for name in generated:
            (directory / name).write_text(files[f"hub/{name}"])
    (leaf_dir / "accounts.conf").write_text(files["leaf-a/accounts.conf"])
    (leaf_dir / "hub-link.conf").write_text(files["leaf-a/hub-link.conf"])

    checked = []
    for config in sorted((DEPLOY / "nats").glob("*.conf")):
        where = leaf_dir if config.name.startswith("leaf") else hub_dir
        env = {"CIM_PLACE_NODE": "leaf-a"} if where is leaf_dir else {}
        result = _check(where / config.name, env)
        assert result.returncode == 0, f"{config.name}: {result.stdout}{result.stderr}"
        checked.append(config.name)
    assert set(checked) >= {"hub.conf", "hub-1.conf", "hub-2.conf", "hub-3.conf", "leaf.conf"}


def test_the_leaf_template_needs_its_node_id(tmp_path: Path, certs: Path) -> None:
    files = _generated(["leaf-a"])
    (tmp_path / "leaf.conf").write_text(_stage((DEPLOY / "nats/leaf.conf").read_text(), certs))
    (tmp_path / "accounts.conf").write_text(files["leaf-a/accounts.conf"])
    (tmp_path / "hub-link.conf").write_text(files["leaf-a/hub-link.conf"])
    result = _check(tmp_path / "leaf.conf", {})
    assert result.returncode != 0
    assert "CIM_PLACE_NODE" in result.stdout + result.stderr


def _config_maps() -> Iterator[tuple[str, str]]:
    for manifest in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(manifest.read_text()):
            if doc and doc["kind"] == "ConfigMap":
                for key, text in doc["data"].items():
                    if key.endswith(".conf"):
                        yield f"{manifest.name}:{key}", text


def test_kubernetes_nats_configs_pass_the_servers_own_check(tmp_path: Path, certs: Path) -> None:
    files = _generated(["leaf-a"])
    found = []
    for name, text in _config_maps():
        directory = tmp_path / name.replace(":", "_")
        (directory / "auth").mkdir(parents=True)
        (directory / "node").mkdir()
        (directory / "auth/accounts.conf").write_text(files["hub/accounts.conf"])
        (directory / "node/accounts.conf").write_text(files["leaf-a/accounts.conf"])
        (directory / "node/hub-link.conf").write_text(files["leaf-a/hub-link.conf"])
        config = directory / "server.conf"
        config.write_text(_stage(text, certs))
        result = _check(config, {"CIM_PLACE_NODE": "leaf-a", "POD_NAME": "hub-0"})
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
        found.append(name)
    assert found == ["agent.yaml:leaf.conf", "hub.yaml:hub.conf"]


# -- a TLS hub and leaf from the deploy files ------------------------------------------------------


@dataclass(kw_only=True)
class _Prepared(ServerSpec):
    """A ServerSpec whose config text is given (the deploy file with test ports and paths)."""

    text: str = ""

    def render(self) -> str:
        return self.text


def _tls_context(certs: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    return context


async def test_hub_of_three_and_a_leaf_run_with_tls_everywhere(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = [free_port() for _ in range(3)]
    route = [free_port() for _ in range(3)]
    leafnode = [free_port() for _ in range(3)]
    files = _generated(
        ["leaf-a"],
        hub_client_urls=[f"tls://127.0.0.1:{p}" for p in client],
        hub_leaf_urls=[f"tls://127.0.0.1:{p}" for p in leafnode],
    )
    common = _stage((DEPLOY / "nats/hub.conf").read_text(), certs)
    for index in range(3):
        common = common.replace(
            # A DNS name the certificate carries: the cluster checks a peer's certificate
            # against the route URLs (verify_cert_and_check_known_urls).
            f"nats-route://hub-{index + 1}:6222",
            f"nats-route://localhost:{route[index]}",
        )
    servers: list[NatsServer] = []
    for index in range(3):
        name = f"hub-{index + 1}"
        directory = tmp_path / name
        directory.mkdir()
        http = free_port()
        text = (
            common.replace('"0.0.0.0:4222"', f'"127.0.0.1:{client[index]}"')
            .replace('"127.0.0.1:8222"', f'"127.0.0.1:{http}"')
            .replace('"0.0.0.0:6222"', f'"127.0.0.1:{route[index]}"')
            .replace('"0.0.0.0:7422"', f'"127.0.0.1:{leafnode[index]}"')
            .replace('"/var/lib/nats/jetstream"', json.dumps(str(directory / "js")))
        )
        (directory / "hub.conf").write_text(text)
        (directory / "accounts.conf").write_text(files["hub/accounts.conf"])
        member = (DEPLOY / f"nats/{name}.conf").read_text()
        spec = _Prepared(
            server_name=name,
            store_dir=directory / "js",
            port=client[index],
            http_port=http,
            text=member,
        )
        servers.append(NatsServer(spec, directory))
    hub = Hub(servers=servers, domain="hub", cluster_name="cim-hub")
    leaf: NatsServer | None = None
    try:
        for server in servers:
            server.start()
        hub.wait_ready()

        leaf_dir = tmp_path / "leaf-a"
        leaf_dir.mkdir()
        leaf_port, leaf_http = free_port(), free_port()
        leaf_text = (
            _stage((DEPLOY / "nats/leaf.conf").read_text(), certs)
            .replace('"127.0.0.1:4222"', f'"127.0.0.1:{leaf_port}"')
            .replace('"127.0.0.1:8222"', f'"127.0.0.1:{leaf_http}"')
            .replace('"/var/lib/nats/jetstream"', json.dumps(str(leaf_dir / "js")))
            .replace('reconnect: "2s"', 'reconnect: "250ms"')
        )
        (leaf_dir / "accounts.conf").write_text(files["leaf-a/accounts.conf"])
        (leaf_dir / "hub-link.conf").write_text(files["leaf-a/hub-link.conf"])
        monkeypatch.setenv("CIM_PLACE_NODE", "leaf-a")  # inherited by the leaf's process
        leaf = NatsServer(
            _Prepared(
                server_name="leaf-a",
                store_dir=leaf_dir / "js",
                port=leaf_port,
                http_port=leaf_http,
                text=leaf_text,
            ),
            leaf_dir,
        )
        leaf.start().wait_ready()
        leaf.wait_leaf_connected()
        hub.wait_leaf("leaf-a")

        # Every listener is TLS only.
        for server in servers:
            varz = server.monitor("varz")
            assert varz["tls_required"] is True
            assert varz["cluster"]["tls_required"] is True
            assert varz["leaf"]["tls_required"] is True
        assert leaf.monitor("varz")["tls_required"] is True
        with pytest.raises(Exception):  # noqa: B017 - any refusal: a plain client is not spoken to
            await nats.connect(
                f"nats://127.0.0.1:{client[0]}", connect_timeout=1, allow_reconnect=False
            )

        password = _password(files, "controller")
        controller = await nats.connect(
            [f"tls://controller:{password}@127.0.0.1:{p}" for p in client],
            tls=_tls_context(certs),
            allow_reconnect=False,
            inbox_prefix="_CIM_INBOX.controller",
        )
        agent = await nats.connect(
            f"tls://agent-leaf-a:{_password(files, 'agent-leaf-a')}@127.0.0.1:{leaf_port}",
            tls=_tls_context(certs),
            allow_reconnect=False,
            inbox_prefix="_CIM_INBOX.agent-leaf-a",
        )
        try:
            # A 3-replica stream needs the routes (TLS) to carry the cluster's consensus.
            js = jetstream(controller, "hub")
            info = await js.add_stream(
                StreamConfig(name="CIM_PLACE_TASKS", subjects=["cim.place.task.*"], num_replicas=3)
            )
            assert info.config.num_replicas == 3
            # The agent on the leaf reaches the hub's JetStream over the TLS leaf link.
            hub_js = jetstream(agent, "hub")
            await hub_js.add_consumer(
                "CIM_PLACE_TASKS",
                durable_name="tasks-leaf-a",
                filter_subject="cim.place.task.leaf-a",
            )
            consumer = await hub_js.consumer_info("CIM_PLACE_TASKS", "tasks-leaf-a")
            assert consumer.name == "tasks-leaf-a"
        finally:
            await agent.close()
            await controller.close()
    finally:
        if leaf is not None:
            leaf.stop()
        hub.stop()


def _password(files: dict[str, str], user: str) -> str:
    line = files[f"credentials/{user}.env"].splitlines()[-1]
    match = re.search(rf"//{re.escape(user)}:([^@]+)@", line)
    assert match, line
    return match.group(1)


# -- systemd ---------------------------------------------------------------------------------------


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here, so the unit files cannot be verified")
    cim_place = shutil.which("cim-place") or str(Path(find_nats_server()).parent / "cim-place")
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text()
        # verify checks that ExecStart exists: point it at this machine's binaries.
        text = text.replace("/usr/local/bin/cim-place", cim_place).replace(
            "/usr/local/bin/nats-server", str(find_nats_server())
        )
        name = unit.name.replace("@.service", "@hub-1.service")
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    assert len(units) == 3
    result = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if str(tmp_path) in line]
    if result.returncode != 0 and "Failed to" in result.stderr and not ours:
        pytest.skip(f"systemd-analyze cannot run here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not ours, "\n".join(ours)


def test_units_are_hardened() -> None:
    for name in ("cim-place-agent.service", "cim-place-controller.service"):
        text = (DEPLOY / "systemd" / name).read_text()
        for setting in (
            "User=cim-place",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "ProtectHome=yes",
            "EnvironmentFile=/etc/cim-place/",
            "ExecStart=/usr/local/bin/cim-place",
        ):
            assert setting in text, f"{name} lacks {setting}"
    agent = (DEPLOY / "systemd/cim-place-agent.service").read_text()
    assert "ReadWritePaths=-/srv/cim-place" in agent
    assert "--config /etc/cim-place/agent.yaml" in agent


# -- manifests -------------------------------------------------------------------------------------


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_parse_with_the_expected_kinds() -> None:
    kinds = {
        path.name: [doc["kind"] for doc in _docs(path)]
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    }
    assert kinds["agent.yaml"].count("DaemonSet") == 1
    assert "Deployment" in kinds["controller.yaml"]
    assert "ServiceMonitor" in kinds["servicemonitor.yaml"]
    assert "StatefulSet" in kinds["hub.yaml"]

    daemonset = next(d for d in _docs(DEPLOY / "kubernetes/agent.yaml") if d["kind"] == "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    host_paths = [v for v in pod["volumes"] if "hostPath" in v]
    assert any(v["hostPath"]["path"].startswith("/srv/cim-place") for v in host_paths)
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    script = "\n".join(agent["command"])
    assert '--label "zone=$CIM_PLACE_ZONE"' in script
    assert "--http-listen 0.0.0.0:8080" in script
    assert "topology.kubernetes.io/zone" in "\n".join(pod["initContainers"][0]["command"]).replace(
        "\\.", "."
    )
    deployment = _docs(DEPLOY / "kubernetes/controller.yaml")[0]
    assert deployment["spec"]["replicas"] == 2
    hub = next(d for d in _docs(DEPLOY / "kubernetes/hub.yaml") if d["kind"] == "StatefulSet")
    assert hub["spec"]["replicas"] == 3


def test_compose_file_runs_a_hub_three_leaves_and_a_controller() -> None:
    compose = yaml.safe_load((DEPLOY / "docker/docker-compose.yml").read_text())
    services = compose["services"]
    assert {"hub-1", "hub-2", "hub-3", "controller"} <= set(services)
    leaves = [name for name in services if name.startswith("leaf-")]
    agents = [name for name in services if name.startswith("agent-")]
    assert len(leaves) == 3 and len(agents) == 3
    for agent in agents:
        assert services[agent]["network_mode"].startswith("service:leaf-")
        assert "--http-listen 0.0.0.0:8080" in services[agent]["command"][0]
    # Every mounted deploy file exists.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("../"):
                assert (DEPLOY / "docker" / source).resolve().exists(), source


def test_example_agent_config_loads() -> None:
    config = load_agent_config(DEPLOY / "agent.yaml")
    assert config.node == "leaf-1"
    assert config.servers[0].startswith("tls://agent-leaf-1:")
    assert {"region", "zone", "host"} <= set(config.labels)
    assert config.http is not None and config.http.listen == "127.0.0.1:8080"


# -- Grafana ---------------------------------------------------------------------------------------


def _exported_metric_names() -> set[str]:
    names: set[str] = set()
    families = [*AgentMetrics("n").registry.collect(), *ControllerMetrics().registry.collect()]
    for family in families:
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names


def test_dashboard_queries_name_metrics_that_exist() -> None:
    dashboard = json.loads((DEPLOY / "grafana/cim-place.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\bcim_place_[a-z_]+", expr)}
    exported = _exported_metric_names()
    unknown = used - exported
    assert not unknown, f"dashboard queries unknown metrics: {sorted(unknown)}"
    # Every agent and controller metric is charted somewhere.
    families = {name.removesuffix("_bucket") for name in used}
    for name in exported:
        if name.endswith(("_sum", "_count")):
            continue
        assert name.removesuffix("_bucket") in families, f"{name} is not on the dashboard"
