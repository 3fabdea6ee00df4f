"""Signals other apps subscribe to without experiments importing them (dependencies point in)."""

from django.dispatch import Signal

# Sent inside the transaction of every lifecycle change (start, pause, resume, advance,
# complete, rollback), after its audit entry is written, so a receiver's writes (an alert
# in an outbox) commit or roll back with the change. Keyword arguments: experiment_id, key,
# name, action, actor, reason, before (status), after (status), audit_id.
experiment_transitioned = Signal()
