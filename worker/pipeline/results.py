"""A finished job's result files, the OpenAI way: ``step_metrics.csv`` (one row per logged step) and
``loss_curve.png`` (training and validation loss by step), stored beside uploaded files and listed in the job's
``result_files``.

Both are made from the job's metrics events, so they say exactly what the events said while the job ran (a
resumed run's re-logged steps count once, with their last values). The files are written before the publishing
transaction and their rows are added inside it: a job that succeeded always has them, and a publish that rolls
back removes them again (``discard``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import ids
from core.contracts import FileStatus
from core.orm import FileObject, JobEvent
from core.settings import Settings
from core.storage import files_dir

PURPOSE = "fine-tune-results"
METRICS_FILENAME = "step_metrics.csv"
CURVE_FILENAME = "loss_curve.png"
# OpenAI's step_metrics.csv columns; a cell is empty where the step logged no such figure.
COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")
# The picture: 8 x 4.5 inches at 100 dpi, 800 x 450 pixels.
CURVE_SIZE_INCHES = (8.0, 4.5)
CURVE_DPI = 100

# Which event figure fills which column.
_FIGURES = {
    "loss": "train_loss",
    "token_accuracy": "train_accuracy",
    "eval_loss": "valid_loss",
    "eval_token_accuracy": "valid_mean_token_accuracy",
}


@dataclass(frozen=True)
class ResultFile:
    """A result file written to storage whose row is not committed yet."""

    id: uuid.UUID
    filename: str
    format: str
    path: Path
    size: int
    sha256: str
    rows: int

    @property
    def public_id(self) -> str:
        return ids.public_id(ids.Prefix.FILE, self.id)

    def row(self, tenant_id: str, job_public_id: str) -> FileObject:
        return FileObject(
            id=self.id,
            tenant_id=tenant_id,
            filename=self.filename,
            purpose=PURPOSE,
            bytes=self.size,
            format=self.format,
            sha256=self.sha256,
            num_examples=self.rows,
            storage_path=str(self.path),
            status=FileStatus.PROCESSED,
            report={"fine_tuning_job_id": job_public_id},
        )


def step_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, float | int | None]]:
    """One row per step that logged a training or validation figure, in step order (later events win)."""
    by_step: dict[int, dict[str, float | int | None]] = {}
    for data in events:
        step = data.get("step")
        figures = {column: data[key] for key, column in _FIGURES.items() if isinstance(data.get(key), int | float)}
        if not isinstance(step, int) or not figures:
            continue
        row = by_step.setdefault(step, dict.fromkeys(COLUMNS))
        row["step"] = step
        row.update(figures)
    return [by_step[step] for step in sorted(by_step)]


def metrics_csv(rows: list[dict[str, float | int | None]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else _cell(row[c]) for c in COLUMNS])
    return out.getvalue().encode()


def _cell(value: float | int | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def loss_curve_png(rows: list[dict[str, float | int | None]], title: str) -> bytes:
    """Training and validation loss by step, drawn off-screen (the Agg backend needs no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure of its own (not pyplot's global state), so concurrent publishes in one process cannot mix.
    figure = Figure(figsize=CURVE_SIZE_INCHES, dpi=CURVE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for column, label, style in (("train_loss", "train loss", "-"), ("valid_loss", "validation loss", "o--")):
        steps = [float(row["step"] or 0) for row in rows if row[column] is not None]
        values = [float(row[column] or 0.0) for row in rows if row[column] is not None]
        if steps:
            axes.plot(steps, values, style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    out = io.BytesIO()
    # No bbox_inches="tight": the picture keeps its stated size whatever the labels measure.
    figure.savefig(out, format="png", dpi=CURVE_DPI)
    return out.getvalue()


def read_metrics_events(session: Session, job_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = session.scalars(
        select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.seq)
    ).all()
    return [data for data in rows if isinstance(data, dict)]


def _store(folder: Path, filename: str, fmt: str, content: bytes, rows: int) -> ResultFile:
    file_id = uuid.uuid4()
    path = folder / f"{file_id.hex}.{fmt}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    tmp.chmod(0o644)
    tmp.replace(path)
    return ResultFile(file_id, filename, fmt, path, len(content), hashlib.sha256(content).hexdigest(), rows)


def write_result_files(events: list[dict[str, Any]], title: str, settings: Settings) -> list[ResultFile]:
    """Write the metrics CSV and the loss curve for these metrics events; returns them in that order."""
    rows = step_rows(events)
    folder = files_dir(settings)
    folder.mkdir(parents=True, exist_ok=True)
    written = [_store(folder, METRICS_FILENAME, "csv", metrics_csv(rows), len(rows))]
    try:
        written.append(_store(folder, CURVE_FILENAME, "png", loss_curve_png(rows, title), 0))
    except BaseException:
        discard(written)
        raise
    return written


def discard(files: Iterable[ResultFile]) -> None:
    """Remove written files whose rows were never committed."""
    for file in files:
        file.path.unlink(missing_ok=True)
