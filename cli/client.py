"""A small HTTP client for the api and inference services, as any other client would use them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        super().__init__(f"HTTP {status}: {message or body}")
        self.status = status
        self.body = body


class ConchClient:
    def __init__(self, api_url: str, inference_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api = httpx.Client(base_url=api_url.rstrip("/"), headers=headers, timeout=timeout)
        self.inference = httpx.Client(base_url=inference_url.rstrip("/"), headers=headers, timeout=timeout)

    @classmethod
    def from_env(cls, api_url: str | None = None, inference_url: str | None = None) -> ConchClient:
        from core.settings import get_settings

        settings = get_settings()
        return cls(
            api_url or settings.api_url, inference_url or settings.inference_url, os.environ.get("CONCH_API_KEY")
        )

    @staticmethod
    def _json(response: httpx.Response) -> Any:
        try:
            body = response.json()
        except json.JSONDecodeError:
            body = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    # -- files
    def upload_file(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with path.open("rb") as handle:
            return self._json(
                self.api.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": purpose})
            )

    # -- jobs
    def create_job(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json(self.api.post("/v1/fine_tuning/jobs", json=body))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.api.get(f"/v1/fine_tuning/jobs/{job_id}"))

    def list_jobs(self, limit: int = 20) -> dict[str, Any]:
        return self._json(self.api.get("/v1/fine_tuning/jobs", params={"limit": limit}))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json(self.api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"))

    def events(self, job_id: str, limit: int = 100) -> list[dict[str, Any]]:
        body = self._json(self.api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit}))
        return list(body["data"])

    def stream_events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Job events as the api's SSE stream sends them, oldest first, until the job ends."""
        with self.api.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", timeout=None) as response:
            if response.status_code >= 400:
                raise ApiError(response.status_code, response.read().decode(errors="replace"))
            for line in response.iter_lines():
                if line.startswith("data:"):
                    payload = line[5:].strip()
                    if payload and payload != "[DONE]":
                        yield json.loads(payload)

    # -- models
    def list_models(self) -> list[dict[str, Any]]:
        return list(self._json(self.api.get("/v1/models"))["data"])

    def deploy(self, model_id: str) -> dict[str, Any]:
        return self._json(self.api.post(f"/v1/models/{model_id}/deploy"))

    def rollback(self, model_id: str) -> dict[str, Any]:
        return self._json(self.api.post(f"/v1/models/{model_id}/rollback"))

    def deployments(self) -> list[dict[str, Any]]:
        return list(self._json(self.api.get("/v1/deployments"))["data"])

    # -- inference
    def generate(self, prompt: str, max_new_tokens: int | None = None, model: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"prompt": prompt}
        if max_new_tokens:
            params["max_new_tokens"] = max_new_tokens
        if model:
            params["model"] = model
        return self._json(self.inference.get("/generate", params=params))

    def inference_models(self) -> list[dict[str, Any]]:
        return list(self._json(self.inference.get("/v1/models"))["data"])
