"""HTTP routers, one per resource. Routes parse and answer; the work happens in ``api.services``."""
