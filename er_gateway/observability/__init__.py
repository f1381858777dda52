"""Observability, one module per concern: logs (gateway and access log), metrics (Prometheus),
recent (the status page's last minute), context (what one request did) and recorder (which
turns a finished request into all three)."""

from .context import RequestInfo, new_request_id
from .logs import Logs, log_field
from .metrics import Metrics
from .recent import Recent
from .recorder import Recorder

__all__ = ["Logs", "Metrics", "Recent", "Recorder", "RequestInfo", "log_field", "new_request_id"]
