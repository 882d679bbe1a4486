"""What the routes do (the domain), written against a Session and a tenant so it can be tested without HTTP.
The HTTP plumbing (multipart, Idempotency-Key, rate limit) is ``api.http``; API keys, which the CLI and the
inference service use too, are ``core.api_keys``."""
