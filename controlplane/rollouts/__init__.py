"""Canary, A/B and shadow rollouts: gates, state machine, controller."""
