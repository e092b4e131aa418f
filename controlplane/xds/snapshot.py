"""What to serve: an immutable set of resources per type, each type with its own version.

A version is a hash of the type's content, so identical inputs push nothing
and a change that only touches weights changes only the EDS version. The hash
is stable across restarts: a reconnecting Envoy that already holds the
current config is not sent it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2
from google.protobuf.message import Message

from . import typeurls


def content_version(resources: Mapping[str, Message]) -> str:
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].SerializeToString(deterministic=True))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str] = field(default_factory=dict)
    # Each resource packed into an Any once, not once per stream: with 100 Envoys that was most of a push.
    _packed: dict[str, dict[str, any_pb2.Any]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, resources: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        frozen = {t: MappingProxyType(dict(resources.get(t, {}))) for t in typeurls.PUSH_ORDER}
        return cls(
            resources=MappingProxyType(frozen),
            versions=MappingProxyType({t: content_version(r) for t, r in frozen.items()}),
        )

    def update(self, changed: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        """A new snapshot with some types rebuilt; the others keep their resources and version unhashed."""
        resources = dict(self.resources)
        versions = dict(self.versions)
        for type_url, built in changed.items():
            resources[type_url] = MappingProxyType(dict(built))
            versions[type_url] = content_version(resources[type_url])
        packed = {t: p for t, p in self._packed.items() if t not in changed}
        return Snapshot(resources=MappingProxyType(resources), versions=MappingProxyType(versions), _packed=packed)

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    def packed(self, type_url: str, names: Iterable[str] = ()) -> list[any_pb2.Any]:
        """The resources for a response: all of a wildcard type, else those asked for by name."""
        available = self.resources.get(type_url, {})
        cache = self._packed.setdefault(type_url, {})
        wanted = sorted(available) if type_url in typeurls.WILDCARD or not names else sorted(set(names))
        out = []
        for name in wanted:
            if name in available:
                packed = cache.get(name)
                if packed is None:
                    packed = cache[name] = any_pb2.Any()
                    packed.Pack(available[name])
                out.append(packed)
        return out

    def problems(self) -> list[str]:
        """References that would leave Envoy waiting: a cluster without endpoints, a listener without routes."""
        found = []
        endpoints = self.resources.get(typeurls.ENDPOINT, {})
        routes = self.resources.get(typeurls.ROUTE, {})
        clusters = self.resources.get(typeurls.CLUSTER, {})
        for name, cluster in clusters.items():
            assert isinstance(cluster, cluster_pb2.Cluster)
            if cluster.type == cluster_pb2.Cluster.EDS:
                service = cluster.eds_cluster_config.service_name or name
                if service not in endpoints:
                    found.append(f"cluster {name!r} has no endpoints resource {service!r}")
        for name, listener in self.resources.get(typeurls.LISTENER, {}).items():
            assert isinstance(listener, listener_pb2.Listener)
            for chain in listener.filter_chains:
                for filt in chain.filters:
                    manager = hcm_pb2.HttpConnectionManager()
                    if filt.typed_config.Unpack(manager) and manager.HasField("rds"):
                        if manager.rds.route_config_name not in routes:
                            found.append(
                                f"listener {name!r} refers to missing route {manager.rds.route_config_name!r}"
                            )
        for name, route in routes.items():
            for vhost in route.virtual_hosts:
                for r in vhost.routes:
                    if r.route.cluster and r.route.cluster not in clusters:
                        found.append(f"route {name!r} refers to missing cluster {r.route.cluster!r}")
        return found
