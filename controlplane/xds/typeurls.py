"""xDS v3 type URLs, and the order in which a change is sent (make before break)."""

from __future__ import annotations

_PREFIX = "type.googleapis.com/envoy."

CLUSTER = _PREFIX + "config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "config.endpoint.v3.ClusterLoadAssignment"
LISTENER = _PREFIX + "config.listener.v3.Listener"
ROUTE = _PREFIX + "config.route.v3.RouteConfiguration"

# CDS, then EDS, then LDS, then RDS: a route never points at a missing cluster.
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

# Wildcard types: every response carries the full set; what is absent is deleted.
WILDCARD = frozenset({CLUSTER, LISTENER})

SHORT = {CLUSTER: "CDS", ENDPOINT: "EDS", LISTENER: "LDS", ROUTE: "RDS"}
