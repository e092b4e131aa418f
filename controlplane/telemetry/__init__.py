"""What flows back from the data plane: Envoy's access log, and the deep health probes."""
