"""What changes the running system.

The inputs to the desired state each propose their own part of it: `reload.py`
the config (and keeps the scoring engine in step with it), `drains.py`,
`scoring.py` the weights, `budgets.py` the pools answered 429, `dns.py` the
addresses. `spend.py` is the one writer of the spend ledger.
"""
