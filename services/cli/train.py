"""``maas train``: submit, status, watch, cancel, list training jobs."""

from __future__ import annotations

import json

import typer
from maas import AsyncJob
from maas.scheduler.v1 import scheduler_pb2 as pb
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from services.cli.common import client, console, out, run_async
from shared.errors import InvalidArgument

train_app = typer.Typer(no_args_is_help=True)


def _floats(values: list[str], option: str) -> dict[str, float]:
    result = {}
    for value in values:
        key, sep, number = value.partition("=")
        try:
            result[key] = float(number)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidArgument(f"{option} takes KEY=NUMBER, got {value!r}")
    return result


@train_app.command()
@run_async
async def submit(
    target_model: str = typer.Argument(..., help="Registry model that receives the trained version."),
    architecture: str = typer.Option("cnn", help="Zoo architecture."),
    arg: list[str] = typer.Option([], help="Architecture argument KEY=JSON_VALUE."),
    dataset: str = typer.Option("digits", help="digits, synthetic-classification, synthetic-sequences, text, file."),
    dataset_option: list[str] = typer.Option([], help="Dataset option KEY=VALUE (e.g. path=data.npz)."),
    optimizer: str = typer.Option("sgd", help="sgd, adam or adamw."),
    lr: float = typer.Option(0.05, help="Learning rate."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    batch_size: int = typer.Option(32),
    epochs: int = typer.Option(40),
    workers: int = typer.Option(2),
    shards: int = typer.Option(2),
    consistency: str = typer.Option("bsp", help="bsp, asp or ssp."),
    staleness: int = typer.Option(0, help="SSP staleness bound."),
    codec: str = typer.Option("none", help="none, fp16, bf16, int8, topk."),
    codec_option: list[str] = typer.Option([], help="Codec option KEY=NUMBER (e.g. ratio=0.01)."),
    checkpoint_interval: int = typer.Option(50),
    priority: int = typer.Option(0, help="Priority (higher runs first); setting it directly needs an admin key."),
    priority_class: str = typer.Option(
        "",
        help="Priority class (e.g. low, normal, high), whose value becomes the job's priority (empty: the default "
        "class); classes above the default one need a grant (maas tenants quota --priority-class).",
    ),
    tenant: str = typer.Option("default"),
    watch_job: bool = typer.Option(True, "--watch/--no-watch", help="Follow the job until it ends."),
) -> None:
    """Submit a training job (validated now: bad input is refused before anything runs)."""
    hyperparameters = {"lr": lr}
    if optimizer == "sgd":
        hyperparameters["momentum"] = momentum
    spec = pb.TrainingJobSpec(
        architecture=architecture,
        arguments_json=json.dumps({k: json.loads(v) for k, v in (a.split("=", 1) for a in arg)}),
        dataset=pb.DatasetSpec(name=dataset, options=dict(o.split("=", 1) for o in dataset_option)),
        optimizer={"name": optimizer, "hyperparameters": hyperparameters},
        batch_size=batch_size,
        epochs=epochs,
        workers=workers,
        shards=shards,
        consistency=consistency,
        staleness=staleness,
        codec=codec,
        codec_options=_floats(codec_option, "--codec-option"),
        checkpoint_interval=checkpoint_interval,
        priority=priority,
        priority_class=priority_class,
        tenant=tenant,
        target_model=target_model,
    )
    async with client() as sdk:
        job = await sdk.jobs.submit(spec)
        out.print(f"{job.id} {job.state} ({job.info.total_steps} steps)")
        if watch_job:
            await watch_until_done(job)


async def watch_until_done(job: AsyncJob) -> pb.Job:
    """Follow ``job`` with a live progress bar until it ends; print it and return it."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task(job.id, total=None, info="")
        async for event in job.watch():
            if event.metrics is None:
                progress.update(
                    task,
                    total=event.job.total_steps or None,
                    completed=event.job.step,
                    description=f"{job.id} {event.state}",
                )
            else:
                m = event.metrics
                progress.update(
                    task,
                    completed=max(m.step + 1, progress.tasks[0].completed),
                    info=f"loss {m.loss:.4f}  {m.samples_per_s:,.0f} samples/s  {m.bytes_sent:,} B/step",
                )
    _print_job(job.info)
    return job.info


def _print_job(job: pb.Job) -> None:
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(job.metrics.items()))
    line = f"{job.id} {pb.JobState.Name(job.state)}"
    if job.queue_position:
        line += f" (position {job.queue_position} in the queue)"
    line += f" step {job.step}/{job.total_steps} {metrics}"
    if job.model_version:
        line += f" -> {job.spec.target_model}@{job.model_version}"
    if job.message:
        line += f" ({job.message})"
    out.print(line, highlight=False)


@train_app.command()
@run_async
async def status(job_id: str) -> None:
    """Show a job."""
    async with client() as sdk:
        job = await sdk.jobs.get(job_id)
    _print_job(job.info)


@train_app.command()
@run_async
async def watch(job_id: str) -> None:
    """Follow a job with a live progress bar (loss, samples/s, bytes per step)."""
    async with client() as sdk:
        await watch_until_done(await sdk.jobs.get(job_id))


@train_app.command()
@run_async
async def cancel(job_id: str) -> None:
    """Cancel a job."""
    async with client() as sdk:
        _print_job(await sdk.jobs.cancel(job_id))


@train_app.command("list")
@run_async
async def list_jobs(
    state: list[str] = typer.Option([], help="Only these states (e.g. RUNNING)."),
    tenant: str = typer.Option("", help="Only this tenant's jobs (admin keys; a tenant's key sees its own)."),
) -> None:
    """List jobs; a QUEUED job shows its place in the queue (1: next) and why it waits."""
    async with client() as sdk:
        jobs = await sdk.jobs.list(states=state, tenant=tenant)
    table = Table("id", "tenant", "state", "queue", "priority", "step", "model", "message (why a job waits)")
    for job in jobs:
        model = f"{job.spec.target_model}@{job.model_version}" if job.model_version else job.spec.target_model
        position = str(job.queue_position) if job.queue_position else ""
        priority = str(job.spec.priority)
        if job.spec.priority_class:
            priority = f"{job.spec.priority_class} ({priority})"
        table.add_row(
            job.id,
            job.spec.tenant,
            pb.JobState.Name(job.state),
            position,
            priority,
            f"{job.step}/{job.total_steps}",
            model,
            job.message,
        )
    out.print(table)
