"""HTTP plumbing of the control plane, apart from its domain services (``api.services``): the streamed multipart
parser, ``Idempotency-Key`` replay and the per-key rate limit. What both web services share (error envelope,
metrics and access log, bearer parsing) is ``core.http``."""
