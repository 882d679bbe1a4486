"""What the routes do, written against a Session and a tenant so it can be tested and reused (the CLI)."""
