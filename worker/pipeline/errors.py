"""Errors the pipeline reports on the job, in OpenAI's shape, and the signal that training was stopped."""

from __future__ import annotations

from typing import Any, Literal

StopReason = Literal["cancel", "shutdown", "lease_lost"]


class PipelineError(Exception):
    """A failure the user can act on; becomes the job's ``error`` as ``{code, message, param}``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def to_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param}


class TrainingStopped(Exception):
    """Training stopped before its last step: cancelled, asked to shut down, or the lease was lost.

    ``checkpoint_step`` is the step of the checkpoint written on the way out (graceful shutdown only).
    """

    def __init__(self, reason: StopReason, checkpoint_step: int | None = None) -> None:
        super().__init__(reason)
        self.reason: StopReason = reason
        self.checkpoint_step = checkpoint_step
