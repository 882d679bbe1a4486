"""A live progress bar for a fine-tuning job, drawn from the api's event stream."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cli.client import ApiError, ConchClient

TERMINAL = {"succeeded", "failed", "cancelled"}


def _describe(data: dict[str, Any]) -> str:
    parts = []
    if "loss" in data:
        parts.append(f"loss {data['loss']:.3f}")
    if "epoch" in data:
        parts.append(f"epoch {data['epoch']:.2f}")
    if data.get("tokens_per_second"):
        parts.append(f"{data['tokens_per_second']:.0f} tok/s")
    if data.get("eta_seconds") is not None:
        parts.append(f"ETA {data['eta_seconds']:.0f}s")
    return "  ".join(parts)


def follow_job(client: ConchClient, job_id: str, console: Console, poll_seconds: float = 1.0) -> dict[str, Any]:
    """Draw progress until the job ends; returns the final job object."""
    with Progress(
        TextColumn("[bold]{task.fields[stage]:<11}"),
        BarColumn(),
        TextColumn("{task.completed:>4.0f}/{task.total:<4.0f}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("job", total=1, stage="queued", detail="")

        def on_event(event: dict[str, Any]) -> None:
            data = event.get("data") or {}
            if event.get("type") == "metrics" and "step" in data:
                progress.update(
                    task,
                    total=max(data.get("total_steps") or 1, 1),
                    completed=data["step"],
                    stage="training",
                    detail=_describe(data),
                )
            else:
                progress.console.print(f"[dim]{event.get('message', '')}[/dim]")
                if data.get("stage"):
                    progress.update(task, stage=data["stage"])

        try:
            for event in client.stream_events(job_id):
                on_event(event)
        except (ApiError, OSError) as exc:  # no stream (or it dropped): fall back to polling
            progress.console.print(f"[yellow]event stream unavailable ({exc}); polling[/yellow]")
        while True:
            job = client.get_job(job_id)
            prog = job.get("progress") or {}
            if prog.get("total_steps"):
                progress.update(
                    task,
                    total=prog["total_steps"],
                    completed=prog.get("step", 0),
                    stage=job.get("stage") or job["status"],
                    detail=_describe(prog),
                )
            if job["status"] in TERMINAL:
                if job["status"] == "succeeded":
                    progress.update(task, completed=progress.tasks[0].total, stage="done")
                return job
            time.sleep(poll_seconds)
