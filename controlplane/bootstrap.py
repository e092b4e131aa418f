"""Envoy's bootstrap: only the way to the control plane; everything else comes over ADS."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from .config import Config
from .config.model import XdsTls
from .statefile import atomic_write

XDS_CLUSTER = "xds_cluster"
AUTH_HEADER = "authorization"  # gRPC metadata Envoy sends on each stream to the control plane: "Bearer <token>"
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
    token: str = "",
) -> dict[str, Any]:
    """The bootstrap as a plain dict (JSON is valid YAML for Envoy).

    `xds_host` overrides where Envoy finds the control plane, e.g. a compose
    service name; a name rather than an IP is resolved by Envoy (STRICT_DNS).
    `token` is what Envoy presents on its ADS stream; a bootstrap that holds
    one must be readable by its owner only (write_bootstrap does that).
    """
    xds = config.controlplane.xds
    host = xds_host or xds.address
    admin = config.envoy.admin
    ads_service: dict[str, Any] = {
        "envoy_grpc": {
            "cluster_name": XDS_CLUSTER,
            # Reconnect quickly after the control plane restarts.
            "retry_policy": {"retry_back_off": {"base_interval": "0.25s", "max_interval": "2s"}},
        }
    }
    if token:
        ads_service["initial_metadata"] = [{"key": AUTH_HEADER, "value": f"Bearer {token}"}]
    xds_cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": xds.port}}}}]}
            ],
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTIONS}",
                "explicit_http_config": {
                    "http2_protocol_options": {"connection_keepalive": {"interval": "10s", "timeout": "5s"}}
                },
            }
        },
    }
    if xds.tls is not None:
        xds_cluster["transport_socket"] = _client_tls(xds.tls, xds.tls.server_name or host)
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
                "grpc_services": [ads_service],
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
            "clusters": [xds_cluster]
        },
    }


def _client_tls(tls: XdsTls, server_name: str) -> dict[str, Any]:
    """Envoy's side of mTLS: present its certificate, accept only the control plane's."""
    context = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"type.googleapis.com/{context}",
            "sni": server_name,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificates": [
                    {"certificate_chain": {"filename": tls.envoy_cert_file},
                     "private_key": {"filename": tls.envoy_key_file}}
                ],
                "validation_context": {
                    "trusted_ca": {"filename": tls.ca_file},
                    "match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS" if _is_ip(server_name) else "DNS",
                         "matcher": {"exact": server_name}}
                    ],
                },
            },
        },
    }


def write_bootstrap(path: Path, content: dict[str, Any]) -> Path:
    """Owner-only: the bootstrap carries the token that opens the control plane's gRPC port."""
    return atomic_write(path, json.dumps(content, indent=2) + "\n", private=True)
