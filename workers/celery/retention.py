"""Audit retention: the beat's ``broker.prune_audit`` (CREDBROKER_AUDIT_RETENTION_DAYS)."""

from __future__ import annotations

import logging

from broker.audit import SqlAuditLog, prune_expired

from workers.common.runtime import runtime
from .app import TASK_PRUNE_AUDIT, app

__all__ = ["prune_audit"]

log = logging.getLogger(__name__)


@app.task(name=TASK_PRUNE_AUDIT)
def prune_audit() -> dict[str, int]:
    """Delete audit events past the retention, in bounded batches (0 days: keep all)."""
    rt = runtime()
    days = rt.settings.audit_retention_days
    deleted = prune_expired(SqlAuditLog(rt.store.engine), rt.clock.now(), days)
    if deleted:
        log.info("prune_audit: %d events older than %d days deleted", deleted, days)
    return {"deleted": deleted, "retention_days": days}
