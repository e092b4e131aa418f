"""Envoy's bootstrap: only the way to the control plane; everything else comes over ADS."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from .config import Config
from .statefile import atomic_write

XDS_CLUSTER = "xds_cluster"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def bootstrap(
    config: Config,
    node_id: str,
    node_cluster: str = "llm-lb",
    xds_host: str | None = None,
    admin_address: str | None = None,
) -> dict[str, Any]:
    """The bootstrap as a plain dict (JSON is valid YAML for Envoy).

    `xds_host` overrides where Envoy finds the control plane, e.g. a compose
    service name; a name rather than an IP is resolved by Envoy (STRICT_DNS).
    """
    xds = config.controlplane.xds
    host = xds_host or xds.address
    admin = config.envoy.admin
    return {
        "node": {"id": node_id, "cluster": node_cluster},
        "admin": {
            "address": {"socket_address": {"address": admin_address or admin.address, "port_value": admin.port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            # Reconnect quickly after the control plane restarts.
                            "retry_policy": {
                                "retry_back_off": {"base_interval": "0.25s", "max_interval": "2s"}
                            },
                        }
                    }
                ],
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        # Caps connections across all listeners (Envoy warns at start-up without it).
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": config.envoy.listener.max_connections,
                    },
                }
            ]
        },
        "static_resources": {
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"socket_address": {"address": host, "port_value": xds.port}}}}
                                ]
                            }
                        ],
                    },
                    "typed_extension_protocol_options": {
                        _HTTP_OPTIONS: {
                            "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": "10s", "timeout": "5s"}
                                }
                            },
                        }
                    },
                }
            ]
        },
    }


def write_bootstrap(path: Path, content: dict[str, Any]) -> Path:
    return atomic_write(path, json.dumps(content, indent=2) + "\n")
