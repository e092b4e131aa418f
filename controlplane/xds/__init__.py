"""Envoy-facing side: pure resource builders, versioned snapshots, the ADS server."""
