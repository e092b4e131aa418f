"""The demo: mock OpenAI-compatible backends and the runner that starts them. Not part of the control plane's core."""
