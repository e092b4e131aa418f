"""DNS refresh: backend host names -> addresses, proposed on `controlplane.resolve_interval`."""

from __future__ import annotations

import asyncio
import logging

from .. import resolver
from ..reconciler import Reconciler

log = logging.getLogger("controlplane.resolver")


async def refresh_dns(reconciler: Reconciler) -> None:
    while True:
        await asyncio.sleep(reconciler.state.config.controlplane.resolve_interval.total_seconds())
        try:
            resolved = await resolver.resolve(resolver.backend_hosts(reconciler.state.config),
                                              reconciler.state.addresses)
            # Merged, not replaced: a reload may have resolved new hosts while this one awaited.
            reconciler.propose(addresses={**reconciler.state.addresses, **resolved})
        except Exception:
            log.exception("DNS refresh failed")
