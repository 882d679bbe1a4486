"""The request counter lives in ``core.http.ratelimit`` (both services throttle failed authentications); this name
stays for the api's imports."""

from core.http.ratelimit import WINDOW_SECONDS, AuthThrottle, RateLimiter, client_address

__all__ = ["WINDOW_SECONDS", "AuthThrottle", "RateLimiter", "client_address"]
