"""``edgeloop``: run the server, an agent, or a whole local fleet.

Every option also has an environment variable (``EDGELOOP_*`` for the server,
``EDGELOOP_AGENT_*`` for the agent); a flag given on the command line wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="EdgeLoop: keep edge models accurate, cheap to update and within budget.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False)
server_app = typer.Typer(help="The server (REST for operators, gRPC for agents).", no_args_is_help=True)
agent_app = typer.Typer(help="The edge agent daemon.", no_args_is_help=True)
fleet_app = typer.Typer(help="A local fleet: one server and N agents as processes on loopback.", no_args_is_help=True)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.add_typer(agent_app, name="agent")
app.add_typer(fleet_app, name="fleet")
app.add_typer(data_app, name="data")


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _server_settings(**flags: Any):
    from pydantic import ValidationError

    from server.settings import ServerSettings

    try:
        return ServerSettings(**_given(**flags))
    except ValidationError as exc:
        _fail(exc)


@server_app.command("run")
def server_run(
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    rest_host: Annotated[str | None, typer.Option(help="EDGELOOP_REST_HOST")] = None,
    rest_port: Annotated[int | None, typer.Option(help="EDGELOOP_REST_PORT")] = None,
    grpc_host: Annotated[str | None, typer.Option(help="EDGELOOP_GRPC_HOST")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="EDGELOOP_GRPC_PORT")] = None,
    model_kind: Annotated[str | None, typer.Option(help="EDGELOOP_MODEL_KIND: mlp or cnn")] = None,
    input_shape: Annotated[str | None, typer.Option(help="EDGELOOP_INPUT_SHAPE, e.g. 1,28,28")] = None,
    num_classes: Annotated[int | None, typer.Option(help="EDGELOOP_NUM_CLASSES")] = None,
    ready_file: Annotated[Path | None, typer.Option(help="Write the bound ports here as JSON once serving.")] = None,
    log_level: Annotated[str | None, typer.Option(help="EDGELOOP_LOG_LEVEL")] = None,
) -> None:
    """Start the server: migrate the database, then serve REST + gRPC and run rounds (unless
    EDGELOOP_EMBEDDED_WORKER=false leaves them to `server worker` processes)."""
    from edgeloop.logs import setup_logging

    settings = _server_settings(data_dir=data_dir, database_url=database_url, rest_host=rest_host,
                                rest_port=rest_port, grpc_host=grpc_host, grpc_port=grpc_port,
                                model_kind=model_kind, input_shape=input_shape, num_classes=num_classes,
                                log_level=log_level)
    setup_logging(settings.log_level, "server ")
    from server.app import EdgeLoopServer

    server = EdgeLoopServer(settings)
    server.start()
    if ready_file is not None:
        server.write_ready_file(ready_file)
    server.serve_forever()


@server_app.command("worker")
def server_worker(
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR (the server's: blobs are shared)")] = None,
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL (the server's)")] = None,
    model_kind: Annotated[str | None, typer.Option(help="EDGELOOP_MODEL_KIND: mlp or cnn")] = None,
    input_shape: Annotated[str | None, typer.Option(help="EDGELOOP_INPUT_SHAPE, e.g. 1,28,28")] = None,
    num_classes: Annotated[int | None, typer.Option(help="EDGELOOP_NUM_CLASSES")] = None,
    log_level: Annotated[str | None, typer.Option(help="EDGELOOP_LOG_LEVEL")] = None,
) -> None:
    """Run update rounds only (no REST, no gRPC) beside `server run`, on its database and data
    directory. Several may run at once: rounds of different cohorts run side by side."""
    from edgeloop.logs import setup_logging

    settings = _server_settings(data_dir=data_dir, database_url=database_url, model_kind=model_kind,
                                input_shape=input_shape, num_classes=num_classes, log_level=log_level)
    setup_logging(settings.log_level, "worker ")
    from server.app import WorkerProcess

    worker = WorkerProcess(settings)
    worker.start()
    worker.serve_forever()


@server_app.command("migrate")
def server_migrate(
    database_url: Annotated[str | None, typer.Option(help="EDGELOOP_DATABASE_URL")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_DATA_DIR")] = None,
) -> None:
    """Apply database migrations (the server also does this at start-up)."""
    from server.db import migrate
    from server.db.engine import make_engine

    settings = _server_settings(database_url=database_url, data_dir=data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(make_engine(settings.resolved_database_url))
    typer.echo(f"database at head: {settings.resolved_database_url.split('@')[-1]}")


@agent_app.command("run")
def agent_run(
    server: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_SERVER host:port")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_DATA_DIR")] = None,
    name: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_NAME")] = None,
    tags: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_TAGS, comma separated")] = None,
    source: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_SOURCE: dataset or folder")] = None,
    dataset: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_DATASET: name, .npz or folder")] = None,
    watch_dir: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_WATCH_DIR")] = None,
    shard_index: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_SHARD_INDEX")] = None,
    num_shards: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_NUM_SHARDS")] = None,
    max_samples: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_MAX_SAMPLES")] = None,
    rate_per_s: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_RATE_PER_S")] = None,
    upload_mode: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_UPLOAD_MODE")] = None,
    status_port: Annotated[int | None, typer.Option(help="EDGELOOP_AGENT_STATUS_PORT (-1 off)")] = None,
    enrollment_token: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_ENROLLMENT_TOKEN")] = None,
    budget_latency_ms: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_LATENCY_MS")] = None,
    budget_memory_mb: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_MEMORY_MB")] = None,
    budget_energy_mj: Annotated[float | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_ENERGY_MJ")] = None,
    budget_file: Annotated[Path | None, typer.Option(help="EDGELOOP_AGENT_BUDGET_FILE (JSON, watched)")] = None,
    log_level: Annotated[str | None, typer.Option(help="EDGELOOP_AGENT_LOG_LEVEL")] = None,
) -> None:
    """Run the agent daemon until SIGINT/SIGTERM."""
    from pydantic import ValidationError

    from edge_agent.settings import AgentSettings
    from edgeloop.logs import setup_logging

    try:
        settings = AgentSettings(**_given(
            server=server, data_dir=data_dir, name=name, tags=tags, source=source, dataset=dataset,
            watch_dir=watch_dir, shard_index=shard_index, num_shards=num_shards, max_samples=max_samples,
            rate_per_s=rate_per_s, upload_mode=upload_mode, status_port=status_port,
            enrollment_token=enrollment_token, log_level=log_level, budget_latency_ms=budget_latency_ms,
            budget_memory_mb=budget_memory_mb, budget_energy_mj=budget_energy_mj, budget_file=budget_file))
    except ValidationError as exc:
        _fail(exc)
    setup_logging(settings.log_level, f"agent[{settings.name or settings.shard_index}] ")
    from edge_agent.daemon import run_agent

    run_agent(settings)


@fleet_app.command("run")
def fleet_run(
    agents: Annotated[int, typer.Option(min=1, max=64, help="Number of agent processes.")] = 3,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Update rounds to run.")] = 3,
    dataset: Annotated[str, typer.Option(help="Dataset name, .npz file or class folder.")] = "fashion-mnist",
    samples_per_agent: Annotated[int, typer.Option(min=10, help="Samples each agent streams in total.")] = 1000,
    method: Annotated[str, typer.Option(help="Round method: dpu (sparse diffs) or full.")] = "dpu",
    model_kind: Annotated[str, typer.Option(help="mlp or cnn.")] = "mlp",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs per round (per DPU step).")] = 10,
    params: Annotated[str | None, typer.Option(help="Extra round params as JSON.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Keep server/agent data here (default: a temp dir, removed).")] = None,
    database_url: Annotated[str | None, typer.Option(help="Default: SQLite in the work dir.")] = None,
    rate_per_s: Annotated[float, typer.Option(help="Samples per second per agent.")] = 400.0,
    round_timeout_s: Annotated[float, typer.Option(help="Give up on a round after this long.")] = 900.0,
    json_out: Annotated[Path | None, typer.Option(help="Save the per-round figures here.")] = None,
    dress_sparsities: Annotated[str, typer.Option(help="DRESS subnet sparsities ('' for a plain model).")] = "0.5,0.8,0.9,0.95",
    budgets: Annotated[str | None, typer.Option(help='Per-agent static budgets, a JSON list cycled over the agents, e.g. \'[{}, {"energy_mj": 0.03}]\'.')] = None,
) -> None:
    """Start a server and N agents locally, run update rounds through REST, print a table."""
    import json as _json

    from edgeloop.fleet import FleetConfig, run_fleet
    from edgeloop.logs import setup_logging

    setup_logging("INFO", "fleet ")
    try:
        extra = _json.loads(params) if params else {}
        cfg = FleetConfig(agents=agents, rounds=rounds, dataset=dataset, samples_per_agent=samples_per_agent,
                          method=method, model_kind=model_kind, epochs=epochs, extra_params=extra,
                          work_dir=work_dir, database_url=database_url, rate_per_s=rate_per_s,
                          round_timeout_s=round_timeout_s, json_out=json_out, dress_sparsities=dress_sparsities,
                          **({"budgets": _json.loads(budgets)} if budgets else {}))
    except (ValueError, TypeError) as exc:
        _fail(exc)
    result = run_fleet(cfg)
    raise typer.Exit(0 if result.ok else 1)


@data_app.command("info")
def data_info(dataset: str) -> None:
    """Load a dataset (name, .npz or folder) and print its shape and class balance."""
    from shared.data import DatasetUnavailableError, label_histogram, load_dataset

    try:
        ds = load_dataset(dataset)
    except (DatasetUnavailableError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"{ds.name}: train {ds.x_train.shape} {ds.x_train.dtype}, test {ds.x_test.shape}, "
               f"{ds.num_classes} classes")
    typer.echo(f"train labels per class: {label_histogram(ds.y_train, ds.num_classes).tolist()}")
