"""The agent's configuration: a YAML file, or flags, validated with every problem reported at once.

Example (``deploy/agent.yaml`` holds a commented one)::

    node: leaf-1
    nats:
      servers: [nats://127.0.0.1:4222]   # the leaf's own server
      creds: /etc/cim-place/agent.creds
      hub_domain: hub
    labels: {region: eu, zone: eu-1, host: web1}
    tags: [ssd]
    volumes:
      - {name: disk0, path: /var/lib/cim-place/disk0, capacity: 500GiB}
    metrics: 127.0.0.1:9464
    blocks: {stream_listen: 0.0.0.0:4250, stream_advertise: web1.example.net:4250}
    http: {listen: 127.0.0.1:8080}     # the IPFS gateway; off by default (config_http.py)
    tasks: {concurrency: 4, max_attempts: 5, bandwidth: 200MiB}
    heartbeat: 5s
    inventory: 5m
    scrub: {rate: 50MiB, interval: 7d}   # background re-verification of every pinned block
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cim_place.cluster.agent.config_http import check_http, check_s3
from cim_place.cluster.exchange.stream import DEFAULT_LISTEN
from cim_place.cluster.nats.connection import DEFAULT_SERVER
from cim_place.cluster.nats.subjects import DEFAULT_PREFIX, HUB_DOMAIN, Subjects, check_node_id
from cim_place.errors import CimPlaceError
from cim_place.http.settings import HttpSettings
from cim_place.policies.loader import Path as YamlPath
from cim_place.policies.loader import YamlFile, read_file, read_text
from cim_place.policies.problems import Problem
from cim_place.runtime.config import ConfigChecker, ConfigFileError

AgentConfigError = ConfigFileError
"""The name the agent's callers know the shared configuration error by."""

FAILURE_DOMAIN_LABELS = ("region", "zone", "host")


@dataclass(frozen=True, slots=True)
class VolumeConfig:
    name: str
    path: Path
    capacity: int | None = None
    """Bytes this volume may hold; None = what the filesystem has."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    volumes: tuple[VolumeConfig, ...]
    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    creds: str | None = None
    hub_domain: str = HUB_DOMAIN
    prefix: str = DEFAULT_PREFIX
    labels: Mapping[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    metrics: str | None = None
    """host:port for the Prometheus endpoint; None = no endpoint."""
    task_concurrency: int = 4
    task_max_attempts: int = 5
    bandwidth: int | None = None
    """Bytes/s for fetches; None = unlimited."""
    heartbeat: float = 5.0
    inventory: float = 300.0
    public_uploaders: tuple[str, ...] = ()
    """Users whose uploads without an owner stay public (no owner), as in an open domain: the
    CLI of a local domain (``cim-place up``), whose README content is read through gateways."""
    stream_listen: str | None = DEFAULT_LISTEN
    """host:port of the bulk block stream (port 0: a free one); None = no stream (NATS only)."""
    stream_advertise: str | None = None
    """host or host:port peers connect to; None = the listen address."""
    stream_tls_cert: str | None = None
    """PEM certificate (chain) of this node's block stream; with the key, the stream uses TLS."""
    stream_tls_key: str | None = None
    stream_tls_ca: str | None = None
    """PEM CA file to verify peers' TLS streams with; None = the system's (``SSL_CERT_FILE``)."""
    http: HttpSettings | None = None
    s3: tuple[str, str] | None = None
    """``(listen, region)`` of the S3-compatible API's listener; None: no S3 (the default)."""
    """The node's HTTP gateway listener; None = no HTTP."""
    scrub_rate: int = 50 * 1024 * 1024
    """Bytes/s a background scrub reads from each volume."""
    scrub_interval: float = 7 * 24 * 3600.0
    """Seconds between the starts of two full scrub passes of a volume."""

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    def volume(self, name: str | None) -> VolumeConfig:
        """The named volume, or the first one."""
        if name is None:
            return self.volumes[0]
        for volume in self.volumes:
            if volume.name == name:
                return volume
        known = ", ".join(v.name for v in self.volumes)
        raise CimPlaceError(f"node {self.node} has no volume {name!r} (it has: {known})")


_TOP_KEYS = {
    "node",
    "nats",
    "labels",
    "tags",
    "volumes",
    "metrics",
    "tasks",
    "heartbeat",
    "inventory",
    "public_uploaders",
    "subject_prefix",
    "blocks",
    "http",
    "s3",
    "scrub",
}
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def _check(document: object, checker: ConfigChecker) -> AgentConfig | None:
    root: YamlPath = (0,)
    doc = checker.section(document, root, _TOP_KEYS)
    node = None
    if "node" not in doc:
        checker.problem(root, "missing `node`", "give the node id, e.g. node: leaf-1")
    else:
        node = checker.text(doc["node"], (*root, "node"), "node")
        if node is not None:
            try:
                check_node_id(node)
            except CimPlaceError as exc:
                checker.problem((*root, "node"), str(exc))
                node = None

    servers: tuple[str, ...] = (DEFAULT_SERVER,)
    creds = None
    hub_domain = HUB_DOMAIN
    nats = checker.section(doc.get("nats", {}), (*root, "nats"), {"servers", "creds", "hub_domain"})
    if "servers" in nats:
        raw = nats["servers"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items:
            checker.problem((*root, "nats", "servers"), "servers must be a URL or a list of URLs")
        else:
            found = [
                checker.text(u, (*root, "nats", "servers", i), "a server URL")
                for i, u in enumerate(items)
            ]
            servers = tuple(u for u in found if u)
    if "creds" in nats:
        creds = checker.text(nats["creds"], (*root, "nats", "creds"), "creds")
    if "hub_domain" in nats:
        hub_domain = (
            checker.text(nats["hub_domain"], (*root, "nats", "hub_domain"), "hub_domain")
            or HUB_DOMAIN
        )

    labels: dict[str, str] = {}
    raw_labels = doc.get("labels", {})
    if not isinstance(raw_labels, dict):
        checker.problem((*root, "labels"), "labels must be a mapping", "e.g. labels: {zone: eu-1}")
    else:
        for key, value in raw_labels.items():
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                labels[str(key)] = str(value)
            else:
                checker.problem((*root, "labels", key), f"label {key!r} must be a non-empty string")

    tags: list[str] = []
    raw_tags = doc.get("tags", [])
    if not isinstance(raw_tags, list):
        checker.problem((*root, "tags"), "tags must be a list", "e.g. tags: [ssd]")
    else:
        tags = [
            t for i, v in enumerate(raw_tags) if (t := checker.text(v, (*root, "tags", i), "a tag"))
        ]

    volumes: list[VolumeConfig] = []
    raw_volumes = doc.get("volumes")
    if raw_volumes is None:
        checker.problem(root, "missing `volumes`", "list at least one: volumes: [{path: /data}]")
    elif not isinstance(raw_volumes, list) or not raw_volumes:
        checker.problem((*root, "volumes"), "volumes must be a non-empty list")
    else:
        for index, raw in enumerate(raw_volumes):
            at: YamlPath = (*root, "volumes", index)
            entry = checker.section(raw, at, {"name", "path", "capacity"})
            name = checker.text(entry.get("name", f"v{index}"), (*at, "name"), "volume name")
            path = checker.text(entry.get("path"), (*at, "path"), "volume path")
            capacity = None
            if "capacity" in entry:
                capacity = checker.size(entry["capacity"], (*at, "capacity"), "capacity")
            if name and any(v.name == name for v in volumes):
                checker.problem((*at, "name"), f"volume name {name!r} is used twice")
            elif name and path:
                volumes.append(VolumeConfig(name, Path(path), capacity))

    metrics = None
    if "metrics" in doc and doc["metrics"] is not None:
        metrics = checker.text(doc["metrics"], (*root, "metrics"), "metrics (host:port)")
        if metrics and not _is_host_port(metrics):
            checker.problem(
                (*root, "metrics"), f"{metrics!r} is not host:port", "e.g. 127.0.0.1:9464"
            )

    tasks = checker.section(
        doc.get("tasks", {}), (*root, "tasks"), {"concurrency", "max_attempts", "bandwidth"}
    )
    concurrency = checker.positive(
        tasks.get("concurrency", 4), (*root, "tasks", "concurrency"), "concurrency"
    )
    attempts = checker.positive(
        tasks.get("max_attempts", 5), (*root, "tasks", "max_attempts"), "max_attempts"
    )
    bandwidth = None
    if "bandwidth" in tasks:
        bandwidth = checker.size(
            tasks["bandwidth"], (*root, "tasks", "bandwidth"), "bandwidth", per_second=True
        )

    heartbeat = checker.positive_duration(
        doc.get("heartbeat", 5), (*root, "heartbeat"), "heartbeat"
    )
    inventory = checker.positive_duration(
        doc.get("inventory", 300), (*root, "inventory"), "inventory"
    )
    scrub = checker.section(doc.get("scrub", {}), (*root, "scrub"), {"rate", "interval"})
    scrub_rate = 50 * 1024 * 1024
    if "rate" in scrub:
        scrub_rate = (
            checker.size(scrub["rate"], (*root, "scrub", "rate"), "scrub.rate", per_second=True)
            or scrub_rate
        )
    scrub_interval = checker.positive_duration(
        scrub.get("interval", "7d"), (*root, "scrub", "interval"), "scrub.interval"
    )
    public = doc.get("public_uploaders", [])
    if not isinstance(public, list) or not all(isinstance(u, str) and u for u in public):
        checker.problem((*root, "public_uploaders"), "public_uploaders must be a list of users")
        public = []
    prefix = DEFAULT_PREFIX
    if "subject_prefix" in doc:
        prefix = (
            checker.text(doc["subject_prefix"], (*root, "subject_prefix"), "subject_prefix")
            or prefix
        )
        try:
            Subjects(prefix)
        except CimPlaceError as exc:
            checker.problem((*root, "subject_prefix"), str(exc))

    stream_listen, stream_advertise, tls = _check_blocks(doc.get("blocks", {}), checker, root)
    http = check_http(doc.get("http"), checker, root)
    s3 = check_s3(doc.get("s3"), checker, root)

    if checker.f.problems or node is None or concurrency is None or attempts is None:
        return None
    return AgentConfig(
        node=node,
        volumes=tuple(volumes),
        servers=servers,
        creds=creds,
        hub_domain=hub_domain,
        prefix=prefix,
        labels=labels,
        tags=tuple(tags),
        metrics=metrics,
        task_concurrency=concurrency,
        task_max_attempts=attempts,
        bandwidth=bandwidth,
        heartbeat=heartbeat or 5.0,
        inventory=inventory or 300.0,
        public_uploaders=tuple(public),
        stream_listen=stream_listen,
        stream_advertise=stream_advertise,
        stream_tls_cert=tls.get("cert"),
        stream_tls_key=tls.get("key"),
        stream_tls_ca=tls.get("ca"),
        http=http,
        s3=s3,
        scrub_rate=scrub_rate,
        scrub_interval=scrub_interval or 7 * 24 * 3600.0,
    )


def _check_blocks(
    value: object, checker: ConfigChecker, root: YamlPath
) -> tuple[str | None, str | None, dict[str, str]]:
    """(stream_listen, stream_advertise, tls files) of the ``blocks`` section."""
    at: YamlPath = (*root, "blocks")
    blocks = checker.section(value, at, {"stream_listen", "stream_advertise", "tls"})
    tls: dict[str, str] = {}
    if "tls" in blocks:
        raw_tls = checker.section(blocks["tls"], (*at, "tls"), {"cert", "key", "ca"})
        for key, what in (("cert", "certificate file"), ("key", "key file"), ("ca", "CA file")):
            if key in raw_tls:
                text = checker.text(raw_tls[key], (*at, "tls", key), f"tls {what}")
                if text:
                    tls[key] = text
        if ("cert" in tls) != ("key" in tls):
            checker.problem(
                (*at, "tls"),
                "tls needs both `cert` and `key` to serve the stream over TLS",
                "e.g. tls: {cert: /etc/cim-place/tls/agent.pem, key: .../agent-key.pem}",
            )
    listen: str | None
    raw = blocks.get("stream_listen", DEFAULT_LISTEN)
    # YAML 1.1 reads a bare `off` as false.
    if raw is False or raw is None or raw == "off":
        listen = None
    else:
        listen = checker.text(raw, (*at, "stream_listen"), "stream_listen (host:port or off)")
    advertise = None
    if "stream_advertise" in blocks:
        advertise = checker.text(
            blocks["stream_advertise"], (*at, "stream_advertise"), "stream_advertise"
        )
    for key, message, hint in stream_address_problems(listen, advertise):
        checker.problem((*at, key), message, hint)
    return listen, advertise, tls


def stream_address_problems(
    listen: str | None, advertise: str | None
) -> list[tuple[str, str, str]]:
    """(key, what is wrong, hint) for each problem of a block stream's listen/advertise pair.

    One rule for the configuration file and the command-line flags.
    """
    problems = []
    if listen and not _is_host_port(listen, allow_zero=True):
        problems.append(
            (
                "stream_listen",
                f"{listen!r} is not host:port",
                "e.g. 127.0.0.1:0 (a free port), 0.0.0.0:4250, or off",
            )
        )
    if advertise and ":" in advertise and not _is_host_port(advertise):
        problems.append(
            (
                "stream_advertise",
                f"{advertise!r} is not host or host:port",
                "e.g. web1.example.net:4250",
            )
        )
    if listen and advertise is None and listen.rpartition(":")[0] in _WILDCARD_HOSTS:
        problems.append(
            (
                "stream_listen",
                f"stream_listen {listen!r} listens on every interface, so peers need to be "
                "told where to connect",
                "add stream_advertise: <this host's name or address>:<port>",
            )
        )
    return problems


def _is_host_port(text: str, *, allow_zero: bool = False) -> bool:
    host, sep, port = text.rpartition(":")
    lowest = 0 if allow_zero else 1
    return bool(sep and host and port.isdigit() and lowest <= int(port) < 65536)


def parse_agent_config(text: str, source: str = "<agent config>") -> AgentConfig:
    """Validate YAML text; raises AgentConfigError listing every problem with file:line:column."""
    return _from_loaded(read_text(text, source))


def load_agent_config(path: Path) -> AgentConfig:
    if not path.is_file():
        raise CimPlaceError(f"agent configuration {path} does not exist (pass --config FILE)")
    return _from_loaded(read_file(str(path)))


def _from_loaded(loaded: YamlFile) -> AgentConfig:
    if loaded.problems:
        raise AgentConfigError(loaded.problems)
    if len(loaded.documents) != 1:
        raise AgentConfigError(
            [Problem(loaded.source, 1, 1, "expected exactly one YAML document", "remove the ---")]
        )
    config = _check(loaded.documents[0], ConfigChecker(loaded))
    if config is None:
        raise AgentConfigError(loaded.problems)
    return config
