"""The deployment files (docker-compose.yml, deploy/*) checked against the code they run.

No Docker engine and no network: compose is parsed with PyYAML, Dockerfiles and the systemd
unit as text. Everything they name is checked against the code itself: commands against
the typer app, environment variables against the settings models' fields (derived from
``model_fields`` and ``env_prefix``), values by instantiating the settings, health-check
paths against the live FastAPI app and the agent's status server, and the entrypoint
scripts by running them.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
UNIT = DEPLOY / "edgeloop-agent.service"
DOCKERFILES = {"server": DEPLOY / "Dockerfile.server", "agent": DEPLOY / "Dockerfile.agent"}
ENV_EXAMPLES = {"server": DEPLOY / "server.env.example", "agent": DEPLOY / "agent.env.example"}
ENTRYPOINTS = {"server": DEPLOY / "server-entrypoint.sh", "agent": DEPLOY / "agent-entrypoint.sh"}
COMPOSE_INIT = DEPLOY / "compose-init.sh"  # compose's one-shot init step (server image)
DOCS = ROOT / "docs" / "deploy.md"
PRODUCT_PACKAGES = ("edgeloop", "shared", "server", "edge_agent")
SERVER_ONLY_DISTS = ("fastapi", "sqlalchemy", "alembic", "uvicorn", "psycopg", "starlette")
VENV_BIN = Path(sys.executable).parent


# --- settings: the valid variable names come from the models ------------------------------

def _settings_classes() -> dict[str, type]:
    from edge_agent.settings import AgentSettings
    from server.settings import ServerSettings

    return {"server": ServerSettings, "agent": AgentSettings}


def env_names(cls: type) -> set[str]:
    prefix = cls.model_config["env_prefix"]
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


def code_env_names() -> set[str]:
    """EDGELOOP_* variables the product code reads directly (not through a settings model),
    such as the Fashion-MNIST folder of shared/data."""
    pattern = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["'](EDGELOOP_[A-Z0-9_]+)["']""")
    found: set[str] = set()
    for pkg in PRODUCT_PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            found.update(pattern.findall(path.read_text()))
    return found


def valid_names(role: str) -> set[str]:
    return env_names(_settings_classes()[role]) | code_env_names()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """os.environ without any EDGELOOP_* variable; returns a setter for a whole env dict."""
    for key in list(os.environ):
        if key.upper().startswith("EDGELOOP_"):
            monkeypatch.delenv(key)

    def apply(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)

    return apply


def settings_from_env(role: str, env: dict[str, str], apply) -> Any:
    """The settings object the process would build from exactly ``env``."""
    apply({k: v for k, v in env.items() if k.startswith("EDGELOOP_")})
    return _settings_classes()[role]()


# --- compose --------------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``, ``$$``."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None:
            if op.endswith("?"):
                raise ValueError(f"compose needs {name}: {arg}")
            return arg
        return value or ""

    return _VAR.sub(sub, text)


def _interpolate_tree(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return _interpolate_tree(yaml.safe_load(COMPOSE.read_text()), env or {})


def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, int | None, int]]:
    """(host address, host port, container port) for each ``ports`` entry."""
    out = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            out.append((entry.get("host_ip"), int(entry["published"]) if entry.get("published") else None,
                        int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2) if not spec.startswith("[") else re.match(r"\[(.*)\]:(.*):(.*)", spec).groups()
        if len(parts) == 1:
            out.append((None, None, int(parts[0])))
        elif len(parts) == 2:
            out.append((None, int(parts[0]), int(parts[1])))
        else:
            out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> source, for the short volume syntax."""
    out = {}
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            out[entry["target"]] = entry.get("source", "")
        else:
            source, target = str(entry).split(":")[:2]
            out[target] = source
    return out


# --- Dockerfiles ----------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        word, _, args = full.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    instrs = dockerfile_instructions(path)
    starts = [i for i, (word, _) in enumerate(instrs) if word == "FROM"]
    return instrs[starts[-1]:]


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in final_stage(path):
        if word == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def one(path: Path, word: str) -> str:
    found = [args for w, args in final_stage(path) if w == word]
    assert len(found) == 1, f"{path.name}: expected one {word}, found {found}"
    return found[0]


def copied_files(path: Path) -> dict[str, str]:
    """destination -> repository source of each COPY from the build context (final stage)."""
    out = {}
    for word, args in final_stage(path):
        if word != "COPY" or "--from=" in args:
            continue
        tokens = [t for t in shlex.split(args) if not t.startswith("--")]
        *sources, dest = tokens
        for src in sources:
            out[dest] = src
    return out


# --- commands -------------------------------------------------------------------------------

def console_script_name() -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    names = [name for name, target in scripts.items() if target == "edgeloop.cli:app"]
    assert names, f"no console script points at edgeloop.cli:app: {scripts}"
    return names[0]


def _shell_commands(text: str) -> Iterator[list[str]]:
    """``edgeloop ...`` invocations in shell text, up to the first shell operator."""
    script = console_script_name()
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0]
        for m in re.finditer(rf"(?:^|[\s;&|(`\"'/]){re.escape(script)}((?:\s+[^\s;&|)`\"'>]+)+)", line):
            tokens = shlex.split(m.group(1))
            if tokens and re.fullmatch(r"[a-z][a-z-]*", tokens[0]):
                yield [script, *tokens]


def _doc_code() -> str:
    """Code blocks and inline code spans of docs/deploy.md (not prose: "the edgeloop user")."""
    text = DOCS.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(blocks + spans)


def all_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every ``edgeloop`` command the deployment files and docs use."""
    script = console_script_name()
    found: list[tuple[str, list[str]]] = []
    for path in DOCKERFILES.values():
        found.append((f"{path.name} CMD", exec_form(one(path, "CMD"))))
    for name, svc in raw_compose()["services"].items():
        cmd = svc.get("command")
        if cmd:
            argv = cmd if isinstance(cmd, list) else shlex.split(cmd)
            if argv[0] == script:
                found.append((f"compose {name}", argv))
            else:
                found.extend((f"compose {name}", c) for c in _shell_commands(" ".join(argv)))
    for path in (*ENTRYPOINTS.values(), COMPOSE_INIT):
        found.extend((path.name, argv) for argv in _shell_commands(path.read_text()))
    exec_start = unit_parser()["Service"]["ExecStart"]
    found.append((UNIT.name, [Path(shlex.split(exec_start)[0]).name, *shlex.split(exec_start)[1:]]))
    if DOCS.exists():
        found.extend((DOCS.name, argv) for argv in _shell_commands(_doc_code()))
    return found


def unit_parser() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case sensitive
    parser.read_string(UNIT.read_text())
    return parser


def unit_environment() -> dict[str, str]:
    """Environment= lines of the unit (configparser keeps only the last duplicate key)."""
    env = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            for token in shlex.split(line.split("=", 1)[1]):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(set variables, every EDGELOOP_* name, commented-out examples included)."""
    values, names = {}, set()
    for line in path.read_text().splitlines():
        m = re.match(r"^\s*(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$", line)
        if not m:
            continue
        names.add(m.group(2))
        if not m.group(1):
            values[m.group(2)] = m.group(3).split("  #", 1)[0].strip()
    return values, {n for n in names if n.startswith("EDGELOOP_")}


# --- the console script and every command used ---------------------------------------------

def test_console_script_is_the_binary_the_files_run() -> None:
    script = console_script_name()
    exec_start = shlex.split(unit_parser()["Service"]["ExecStart"])
    assert Path(exec_start[0]).name == script
    for path in DOCKERFILES.values():
        assert exec_form(one(path, "CMD"))[0] == script


def test_every_edgeloop_command_used_exists() -> None:
    from typer.testing import CliRunner

    from edgeloop.cli import app

    commands = all_commands()
    subcommands = {tuple(argv[1:3]) for _, argv in commands}
    # The three entry points a deployment needs must all be among them.
    assert {("server", "migrate"), ("server", "run"), ("agent", "run")} <= subcommands, subcommands
    runner = CliRunner()
    for where, argv in commands:
        # --help after the full argument list: click parses (and rejects unknown options)
        # before acting on --help, so this checks the subcommand path and every option.
        result = runner.invoke(app, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{where}: `{shlex.join(argv)}` is not a valid command:\n{result.output}"
        assert "Usage:" in result.output


# --- environment variables name real settings fields ---------------------------------------

def _env_sources() -> list[tuple[str, str, set[str]]]:
    """(where, role, EDGELOOP_* names set there)."""
    sources = []
    for name, svc in raw_compose()["services"].items():
        role = {"init": "server", "server": "server", "workers": "server", "agent": "agent"}.get(name)
        names = {k for k in service_env(svc) if k.startswith("EDGELOOP_")}
        if role is None:
            assert not names, f"compose service {name} sets EdgeLoop variables: {names}"
            continue
        sources.append((f"compose {name}", role, names))
    for role, path in DOCKERFILES.items():
        sources.append((path.name, role, {k for k in image_env(path) if k.startswith("EDGELOOP_")}))
    for role, path in ENV_EXAMPLES.items():
        sources.append((path.name, role, env_file(path)[1]))
    for role, path in [*ENTRYPOINTS.items(), ("server", COMPOSE_INIT)]:
        sources.append((path.name, role, set(re.findall(r"\bEDGELOOP_[A-Z0-9_]+", path.read_text()))))
    sources.append((UNIT.name, "agent", {k for k in unit_environment() if k.startswith("EDGELOOP_")}))
    return sources


def test_every_variable_names_a_settings_field() -> None:
    sources = _env_sources()
    assert sum(len(names) for _, _, names in sources) > 20, "found suspiciously few variables"
    for where, role, names in sources:
        unknown = names - valid_names(role)
        # An agent variable in the server's env (or the reverse) would be silently ignored.
        assert not unknown, f"{where}: {sorted(unknown)} are not {role} settings fields"


def test_valid_names_are_derived_not_listed() -> None:
    # Guards the derivation itself: a few known fields must come out of it, and the two
    # prefixes must not bleed into each other.
    server, agent = valid_names("server"), valid_names("agent")
    assert {"EDGELOOP_DATABASE_URL", "EDGELOOP_REST_PORT", "EDGELOOP_GRPC_PORT"} <= server
    assert {"EDGELOOP_AGENT_SERVER", "EDGELOOP_AGENT_SHARD_INDEX", "EDGELOOP_AGENT_STATUS_PORT"} <= agent
    assert "EDGELOOP_AGENT_SERVER" not in server and "EDGELOOP_DATABASE_URL" not in agent


# --- docker-compose.yml ----------------------------------------------------------------------

CUSTOM = {"AGENT_SHARDS": "7", "EDGELOOP_TLS_HOSTNAMES": "server,localhost,127.0.0.1,edge.example.lan",
          "REST_PUBLISH_ADDRESS": "10.0.0.5"}
SECRET_WORDS = re.compile(r"PASSWORD|TOKEN|SECRET|PRIVATE|_KEY\b|CREDENTIAL", re.I)


@pytest.mark.parametrize("host_env", [{}, CUSTOM], ids=["defaults", "custom"])
def test_compose_server_settings_and_ports(host_env: dict[str, str], clean_env) -> None:
    from sqlalchemy.engine import make_url

    compose = load_compose(host_env)
    services = compose["services"]
    assert set(services) >= {"db", "server", "agent"}
    server = services["server"]
    env = {**image_env(DOCKERFILES["server"]), **service_env(server)}
    settings = settings_from_env("server", env, clean_env)

    # Binds every interface inside the container, TLS on both ports.
    assert settings.rest_host == "0.0.0.0" and settings.grpc_host == "0.0.0.0"
    assert not settings.insecure and settings.tls_cert_file is None  # the local CA in the data volume
    # Published container ports are exactly the ports the server binds; REST on the host's
    # loopback unless asked otherwise, gRPC for devices.
    ports = {target: host for host, _, target in published_ports(server)}
    assert set(ports) == {settings.rest_port, settings.grpc_port}
    assert settings.rest_port == 8000 and settings.grpc_port == 50051  # the documented ports
    assert ports[settings.rest_port] == host_env.get("REST_PUBLISH_ADDRESS", "127.0.0.1")
    # The certificate names the service agents dial and the loopback the health check probes.
    from server.tls import configured_hostnames

    names = configured_hostnames(settings.tls_hostnames, (settings.rest_host, settings.grpc_host))
    assert {"server", "127.0.0.1"} <= set(names)
    if host_env:
        assert "edge.example.lan" in names
    # The database: PostgreSQL with the psycopg driver, on the db service; the password only
    # in the file secret both read.
    url = make_url(settings.database_url)
    db = services["db"]
    db_env = service_env(db)
    assert url.drivername == "postgresql+psycopg"
    assert url.host in services and url.host == "db"
    assert (url.port or 5432) == 5432
    assert url.username == db_env["POSTGRES_USER"] and url.database == db_env["POSTGRES_DB"]
    assert url.password is None
    secret = Path(db_env["POSTGRES_PASSWORD_FILE"])
    assert settings.database_password_file == secret and secret.parent == Path("/run/secrets")
    for svc in (db, server, services["init"], services["workers"]):
        assert secret.name in svc["secrets"]
    assert secret.name in compose["secrets"]
    # Data dir on a named volume declared at the top level.
    data_mount = mounts(server).get(str(settings.data_dir))
    assert data_mount and data_mount in (compose.get("volumes") or {}), f"{settings.data_dir} is not on a named volume"
    assert (server.get("depends_on") or {}).get("init", {}).get("condition") == "service_completed_successfully"
    assert server["build"]["dockerfile"] == "deploy/Dockerfile.server"
    assert (ROOT / server["build"]["context"] / server["build"]["dockerfile"]).is_file()


def test_database_password_file_is_put_into_the_url(tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    from server.settings import ServerSettings

    secret = tmp_path / "postgres_password"
    secret.write_text("p@ss/w:rd\n")  # characters a URL must escape; the trailing newline is dropped
    settings = ServerSettings(database_url="postgresql+psycopg://edgeloop@db:5432/edgeloop",
                              database_password_file=str(secret))
    url = make_url(settings.resolved_database_url)
    assert url.password == "p@ss/w:rd" and url.username == "edgeloop" and url.host == "db"
    assert "p@ss" not in settings.describe()


def test_no_secret_in_compose_or_the_unit() -> None:
    """Secrets come from files (Docker secrets, volumes an init step writes, the unit's
    EnvironmentFile), never from values in these files or defaults they interpolate."""
    raw = raw_compose()
    for name, svc in raw["services"].items():
        for key, value in service_env(svc).items():
            if SECRET_WORDS.search(key):
                assert key.endswith("_FILE") and value.startswith("/"), f"compose {name}: {key}={value}"
    for secret in raw["secrets"].values():
        source = secret["file"]
        assert source.startswith("./secrets/"), source
        assert dockerignored(source.removeprefix("./")), f"{source} would be copied into an image"
        ignored = subprocess.run(["git", "check-ignore", "-q", source.removeprefix("./")], cwd=ROOT)
        assert ignored.returncode == 0, f"{source} is not git-ignored"
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|TOKEN|SECRET)[A-Z_]*", COMPOSE.read_text()), "a secret from the environment"
    for key in unit_environment():
        assert not SECRET_WORDS.search(key), f"{UNIT.name} sets {key}: keep it in the EnvironmentFile"


def test_compose_init_prepares_the_server_and_the_simulated_fleet(clean_env) -> None:
    compose = load_compose()
    services = compose["services"]
    init, server, agent = services["init"], services["server"], services["agent"]
    assert init["image"] == server["image"]
    assert service_env(init) == {k: v for k, v in service_env(server).items() if k != "EDGELOOP_EMBEDDED_WORKER"}
    assert init["restart"] == "no" and (init.get("depends_on") or {})["db"]["condition"] == "service_healthy"
    entry = init["entrypoint"]
    assert copied_files(DOCKERFILES["server"]).get(f"/usr/local/bin/{entry[0]}") == f"deploy/{COMPOSE_INIT.name}"
    # init writes the server's TLS files into the server's data volume...
    server_settings = settings_from_env("server", {**image_env(DOCKERFILES["server"]), **service_env(init)},
                                        clean_env)
    data_dir = str(server_settings.data_dir)
    assert mounts(init)[data_dir] == mounts(server)[data_dir]
    # ...and the CA and the enrollment token into the volume the agents mount read-only.
    agent_env = {**image_env(DOCKERFILES["agent"]), **service_env(agent)}
    agent_settings = settings_from_env("agent", {**agent_env, "EDGELOOP_AGENT_SHARD_INDEX": "0"}, clean_env)
    boot = "/var/lib/edgeloop/bootstrap"
    assert agent_settings.ca_file == Path(boot, "ca.crt")
    assert agent_settings.enrollment_token_file == Path(boot, "enrollment-token")
    assert mounts(init)[boot] == mounts(agent)[boot] in compose["volumes"]
    assert any(str(v).endswith(f":{boot}:ro") for v in agent["volumes"]), "agents must not write the bootstrap volume"
    assert not agent_settings.insecure


@pytest.mark.slow  # a dozen CLI processes, each importing torch: ~1-2 min
@pytest.mark.skipif(not (VENV_BIN / "edgeloop").exists(), reason="needs the installed edgeloop console script")
def test_compose_init_script_runs_and_is_idempotent(tmp_path: Path) -> None:
    """deploy/compose-init.sh for real (SQLite instead of PostgreSQL): CA, certificate, token;
    a second run keeps them; a revoked token is replaced."""
    boot = tmp_path / "bootstrap"
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "EDGELOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'server.db'}", "EDGELOOP_DATA_DIR": str(tmp_path / "data"),
           "EDGELOOP_TLS_HOSTNAMES": "server,127.0.0.1", "BOOTSTRAP_DIR": str(boot)}

    def run() -> subprocess.CompletedProcess:
        done = subprocess.run(["sh", str(COMPOSE_INIT)], env=env, capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done

    first = run()
    ca = (boot / "ca.crt").read_bytes()
    assert ca == (tmp_path / "data" / "tls" / "ca.crt").read_bytes()
    token = (boot / "enrollment-token").read_text().strip()
    assert len(token) >= 16 and token not in first.stdout + first.stderr  # never printed
    assert (boot / "enrollment-token").stat().st_mode & 0o077 == 0
    token_id = (boot / "enrollment-token.id").read_text().strip()
    second = run()
    assert "keeping" in second.stderr and (boot / "enrollment-token").read_text().strip() == token
    assert (boot / "ca.crt").read_bytes() == ca
    subprocess.run(["edgeloop", "server", "enrollment", "revoke", token_id], env=env, check=True,
                   capture_output=True, timeout=120, cwd=tmp_path)
    third = run()
    assert "revoked: creating a new one" in third.stderr
    assert (boot / "enrollment-token").read_text().strip() != token
    assert (boot / "ca.crt").read_bytes() == ca


def test_compose_workers_share_the_server_database_and_blobs(clean_env) -> None:
    """Worker processes run rounds on the server's database and blob directory, with its model;
    the API server runs no worker of its own, and both sides are on the PostgreSQL event bus."""
    from server.events.router import bus_kind

    compose = load_compose()
    services = compose["services"]
    workers, server = services["workers"], services["server"]
    assert workers["command"] == [console_script_name(), "server", "worker"]
    assert workers["image"] == server["image"]  # the server image, built by the server service
    server_env = {**image_env(DOCKERFILES["server"]), **service_env(server)}
    worker_env = {**image_env(DOCKERFILES["server"]), **service_env(workers)}
    # The same settings but for the one that only `server run` reads.
    assert {k: v for k, v in server_env.items() if k != "EDGELOOP_EMBEDDED_WORKER"} == worker_env
    settings = settings_from_env("server", worker_env, clean_env)
    server_settings = settings_from_env("server", server_env, clean_env)
    assert not server_settings.embedded_worker, "the API service must leave training to the workers service"
    for s in (settings, server_settings):
        assert s.event_bus == "postgres" and bus_kind(s.event_bus, s.database_url) == "postgres"
    assert mounts(workers).get(str(settings.data_dir)) == mounts(server).get(str(settings.data_dir))
    assert not workers.get("ports"), "a worker serves no API"
    assert (workers.get("depends_on") or {}).get("server", {}).get("condition") == "service_healthy"
    # At least one worker runs by default (no replicas: 0 / scale: 0), or no round would ever train.
    assert (workers.get("deploy") or {}).get("replicas", 1) >= 1 and workers.get("scale", 1) >= 1


def test_compose_db_service() -> None:
    compose = load_compose()
    db = compose["services"]["db"]
    assert db["image"] == "postgres:16"
    assert db["healthcheck"]["test"], "db needs a healthcheck for depends_on: service_healthy"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    data = mounts(db).get("/var/lib/postgresql/data")
    assert data in (compose.get("volumes") or {}), "PostgreSQL data must be on a named volume"
    assert not db.get("ports"), "the database must not be published on the host"


@pytest.mark.parametrize("host_env", [{}, CUSTOM], ids=["defaults", "custom"])
def test_compose_agent_settings(host_env: dict[str, str], clean_env) -> None:
    compose = load_compose(host_env)
    services = compose["services"]
    agent = services["agent"]
    env = {**image_env(DOCKERFILES["agent"]), **service_env(agent)}
    # What the entrypoint adds for the first replica.
    env.update(EDGELOOP_AGENT_SHARD_INDEX="0", EDGELOOP_AGENT_NAME="replica-shard0")
    settings = settings_from_env("agent", env, clean_env)
    server_env = {**image_env(DOCKERFILES["server"]), **service_env(services["server"])}
    server_settings = _settings_classes()["server"](
        **{k[len("EDGELOOP_"):].lower(): v for k, v in server_env.items() if k.startswith("EDGELOOP_")})

    host, port = settings.server.rsplit(":", 1)
    assert host == "server" and host in services
    assert int(port) == server_settings.grpc_port
    assert settings.num_shards >= 2, "replicas need several shards to take distinct ones"
    if host_env:
        assert settings.num_shards == int(host_env["AGENT_SHARDS"])
    assert agent["build"]["dockerfile"] == "deploy/Dockerfile.agent"
    assert (services["agent"].get("depends_on") or {}).get("server", {}).get("condition") == "service_healthy"


def test_compose_agent_can_scale() -> None:
    compose = load_compose()
    agent = compose["services"]["agent"]
    for key in ("container_name", "hostname", "ports", "mac_address"):
        assert key not in agent, f"agent sets {key}: replicas would clash"
    env = {**image_env(DOCKERFILES["agent"]), **service_env(agent)}
    for fixed in ("EDGELOOP_AGENT_SHARD_INDEX", "EDGELOOP_AGENT_HARDWARE_ID", "EDGELOOP_AGENT_NAME"):
        assert fixed not in env, f"{fixed} is shared by all replicas; it must be per replica"
    # The data directory (identity, hardware id) must be per replica, never a shared volume.
    data_dir = env["EDGELOOP_AGENT_DATA_DIR"]
    for target in mounts(agent):
        assert not (data_dir + "/").startswith(target.rstrip("/") + "/"), f"{target} would share {data_dir}"
    # The shard claims live on one volume all replicas mount, where the entrypoint looks.
    claims = image_env(DOCKERFILES["agent"])["SHARD_CLAIMS_DIR"]
    assert mounts(agent).get(claims) in (compose.get("volumes") or {})


def test_compose_healthchecks_use_the_image_probe() -> None:
    compose = load_compose()
    for role in ("server", "agent"):
        test = compose["services"][role]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:] == exec_form(one(DOCKERFILES[role], "HEALTHCHECK").split("CMD", 1)[1])


# --- the health check probe and the paths it asks for --------------------------------------

def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("edgeloop_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_defaults_equal_settings_defaults() -> None:
    hc = _healthcheck_module()
    classes = _settings_classes()
    for role, (host_var, host_default, port_var, port_default, _path) in hc.TARGETS.items():
        cls = classes[role]
        prefix = cls.model_config["env_prefix"]
        host_field = host_var[len(prefix):].lower()
        port_field = port_var[len(prefix):].lower()
        assert cls.model_fields[host_field].default == host_default
        assert cls.model_fields[port_field].default == port_default
    server = classes["server"]
    assert str(server.model_fields["data_dir"].default) == hc.SERVER_DATA_DIR_DEFAULT
    assert server.model_fields["insecure"].default is False and hc.server_tls({})


def test_healthcheck_url_follows_the_compose_env() -> None:
    hc = _healthcheck_module()
    compose = load_compose()
    server_env = {**image_env(DOCKERFILES["server"]), **service_env(compose["services"]["server"])}
    assert hc.probe_url("server", server_env) == "https://127.0.0.1:8000/healthz"
    assert hc.probe_url("server", {**server_env, "EDGELOOP_REST_PORT": "9100"}) == "https://127.0.0.1:9100/healthz"
    assert hc.probe_url("server", {"EDGELOOP_REST_HOST": "::"}) == "https://[::1]:8000/healthz"
    assert hc.probe_url("server", {"EDGELOOP_INSECURE": "true"}) == "http://127.0.0.1:8000/healthz"
    assert hc.server_ca_file(server_env) == Path(server_env["EDGELOOP_DATA_DIR"]) / "tls" / "ca.crt"
    assert hc.server_ca_file({"EDGELOOP_TLS_CERT_FILE": "/etc/x.pem"}) == Path("/etc/x.pem")
    assert hc.probe_url("agent", {"EDGELOOP_AGENT_STATUS_PORT": "-1"}) is None
    with pytest.raises(ValueError, match="EDGELOOP_AGENT_STATUS_PORT"):
        hc.probe_url("agent", {"EDGELOOP_AGENT_STATUS_PORT": "0"})
    with pytest.raises(ValueError, match="unknown role"):
        hc.probe_url("db", {})


def test_server_health_path_is_served_without_the_operator_token(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from server.api.main import create_app
    from server.context import ServerContext
    from server.settings import ServerSettings

    path = _healthcheck_module().TARGETS["server"][4]
    settings = ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'e.db'}",
                              operator_token="operator-secret")
    ctx = ServerContext.open(settings)
    try:
        app = create_app(ctx)
        # The OpenAPI document lists the routes whatever way they were included.
        assert path in app.openapi()["paths"]
        with TestClient(app) as client:
            # Probes carry no token: the path must answer 200 without one.
            resp = client.get(path)
            assert resp.status_code == 200, resp.text
            assert client.get("/api/v1/devices").status_code == 401  # the token is enforced
    finally:
        ctx.close()


def test_server_probe_against_a_real_tls_server(tmp_path: Path) -> None:
    """healthcheck.py over https against EdgeLoopServer on a real port: healthy with the
    server's CA, unhealthy with another (the chain is verified, not only the host name)."""
    from server.app import EdgeLoopServer
    from server.settings import ServerSettings
    from server.tls import ensure_server_tls

    settings = ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'e.db'}",
                              rest_port=0, grpc_port=0, embedded_worker=False, tls_hostnames="edge.example.lan")
    server = EdgeLoopServer(settings)
    server.start()
    try:
        base = {**os.environ, "EDGELOOP_REST_PORT": str(server.rest_port), "EDGELOOP_DATA_DIR": str(settings.data_dir)}
        base.pop("EDGELOOP_INSECURE", None)
        ok = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "server"], env=base,
                            capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        other = ensure_server_tls(tmp_path / "other", hostnames=["127.0.0.1"], cert_days=30)
        bad = subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), "server"], capture_output=True,
                             env={**base, "EDGELOOP_TLS_CERT_FILE": str(other.ca_file)}, timeout=30)
        assert bad.returncode == 1 and b"CERTIFICATE_VERIFY_FAILED" in bad.stderr
    finally:
        server.stop()


def test_agent_probe_against_a_real_status_server() -> None:
    from edge_agent import status_http

    hc_path = DEPLOY / "healthcheck.py"
    path = _healthcheck_module().TARGETS["agent"][4]
    assert status_http._ROUTES.get(path) == "GET"
    server = status_http.StatusServer("127.0.0.1", 0, dict)
    server.start()
    env = {**os.environ, "EDGELOOP_AGENT_STATUS_PORT": str(server.port)}
    try:
        ok = subprocess.run([sys.executable, str(hc_path), "agent"], env=env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()
    down = subprocess.run([sys.executable, str(hc_path), "agent"], env=env, capture_output=True, timeout=30)
    assert down.returncode == 1 and b"healthcheck" in down.stderr


# --- Dockerfiles -----------------------------------------------------------------------------

def _torch_pin_of_install_script() -> str:
    pins = set(re.findall(r"torch==([0-9][0-9.]*[0-9])", (ROOT / "scripts" / "install.sh").read_text()))
    assert len(pins) == 1, pins
    return pins.pop()


@pytest.mark.parametrize("role", ["server", "agent"])
def test_dockerfile(role: str) -> None:
    path = DOCKERFILES[role]
    instrs = dockerfile_instructions(path)
    froms = [args for word, args in instrs if word == "FROM"]
    assert all(f.split()[0] == "python:3.11-slim-bookworm" for f in froms), froms
    runs = [args for word, args in instrs if word == "RUN"]
    torch_at = [i for i, r in enumerate(runs) if "torch==" in r]
    extra_at = [i for i, r in enumerate(runs) if re.search(r"pip install \"?\.\[", r)]
    assert len(torch_at) == 1 and len(extra_at) == 1
    assert torch_at[0] < extra_at[0], "torch must be installed before edgeloop"
    torch_run = runs[torch_at[0]]
    assert f"torch=={_torch_pin_of_install_script()}" in torch_run, "image and install.sh pin different torch"
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run
    extras = re.search(r"\.\[([a-z,]+)\]", runs[extra_at[0]]).group(1).split(",")
    assert extras == [role], f"{path.name} installs extras {extras}"
    if role == "agent":  # nor sneaks a server dependency in by another RUN line
        leaked = [d for d in SERVER_ONLY_DISTS for r in runs if re.search(rf"\b{d}\b", r, flags=re.I)]
        assert not leaked, f"{path.name} installs {leaked}"
    user = one(path, "USER").split(":")[0]
    assert user not in ("root", "0"), "the image must run as a non-root user"
    stage = final_stage(path)
    words = [w for w, _ in stage]
    assert words.index("USER") < words.index("CMD")


@pytest.mark.parametrize("role", ["server", "agent"])
def test_dockerfile_runtime_wiring(role: str, clean_env) -> None:
    """ENTRYPOINT, HEALTHCHECK and their files; EXPOSE equals the ports reachable from outside."""
    path = DOCKERFILES[role]
    copied = copied_files(path)
    for src in copied.values():
        assert (ROOT / src).is_file(), f"{path.name} copies missing {src}"
        assert not dockerignored(src), f"{src} is excluded by .dockerignore"
    entrypoint = exec_form(one(path, "ENTRYPOINT"))
    assert copied.get(f"/usr/local/bin/{entrypoint[0]}") == f"deploy/{role}-entrypoint.sh"
    healthcheck = one(path, "HEALTHCHECK")
    probe = exec_form(healthcheck.split("CMD", 1)[1])
    assert copied.get(f"/usr/local/bin/{probe[0]}") == "deploy/healthcheck.py" and probe[1:] == [role]
    settings = settings_from_env(role, image_env(path), clean_env)
    if role == "server":
        reachable = {settings.rest_port, settings.grpc_port}
    else:  # the status endpoint is reachable from outside only when bound beyond loopback
        loopback = settings.status_host in ("127.0.0.1", "localhost", "::1")
        reachable = set() if loopback or settings.status_port < 0 else {settings.status_port}
    exposed = {int(p.split("/")[0]) for w, a in final_stage(path) if w == "EXPOSE" for p in a.split()}
    assert exposed == reachable


def test_agent_image_gets_fashion_mnist_where_the_loader_looks() -> None:
    from shared.data import loaders

    runs = " ".join(args for word, args in final_stage(DOCKERFILES["agent"]) if word == "RUN")
    assert re.search(r"apt-get install\b.*\bdataset-fashion-mnist\b", runs)
    assert image_env(DOCKERFILES["agent"])["EDGELOOP_AGENT_DATASET"] == "fashion-mnist"
    assert str(loaders.FASHION_MNIST_DIR) == "/usr/share/datasets/fashion-mnist"  # the package's path


def test_agent_extra_pulls_no_server_dependency() -> None:
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    agent_reqs = " ".join(optional["agent"]).lower()
    assert not any(dist in agent_reqs for dist in SERVER_ONLY_DISTS), optional["agent"]
    # ...and the agent's code path imports none of them (they are absent from the image).
    blocker = (
        "import sys, importlib.abc\n"
        f"BLOCKED = {set(SERVER_ONLY_DISTS) | {'server'}!r}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not installed in the agent image')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import edge_agent.daemon, edge_agent.settings\n"
        "from typer.testing import CliRunner\n"
        "from edgeloop.cli import app\n"
        "r = CliRunner().invoke(app, ['agent', 'run', '--help'])\n"
        "assert r.exit_code == 0, r.output\n"
    )
    done = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- .dockerignore ---------------------------------------------------------------------------

def dockerignored(rel: str) -> bool:
    """Whether ``rel`` (or a parent folder) is excluded; last matching pattern wins."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        regexes = [pat[3:]] if pat.startswith("**/") else []
        hit = any(fnmatch.fnmatchcase(c, pat) for c in candidates)
        hit = hit or any(fnmatch.fnmatchcase(c.split("/")[-1], r) for c in candidates for r in regexes)
        if hit:
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_build_inputs_and_drops_local_state() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", pyproject["project"].get("readme", "README.md"),
              "edgeloop/cli.py", "server/migrations/env.py", "protos/edgeloop/v1/fleet_pb2.py",
              "edge_agent/daemon.py", "shared/models/__init__.py"]
    for rel in needed:
        assert not dockerignored(rel), f".dockerignore drops {rel}, which the image build needs"
    for rel in (".git/HEAD", ".venv/bin/python", ".env", "deploy/agent.env", "server/__pycache__/x.pyc",
                ".edgeloop/server/edgeloop.db", "bench/results/x.json"):
        assert dockerignored(rel), f".dockerignore keeps {rel}"


# --- entrypoint scripts, run for real --------------------------------------------------------

_WAITER = (
    "import json, os, sys, time\n"
    "print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('EDGELOOP_')}), flush=True)\n"
    "deadline = time.time() + 60\n"
    "while not os.path.exists(sys.argv[1]) and time.time() < deadline:\n"
    "    time.sleep(0.05)\n"
)


def _start_replica(tmp_path: Path, k: int, base_env: dict[str, str], release: Path) -> subprocess.Popen:
    env = {**base_env, "EDGELOOP_AGENT_DATA_DIR": str(tmp_path / f"replica{k}")}
    return subprocess.Popen(["sh", str(ENTRYPOINTS["agent"]), sys.executable, "-c", _WAITER, str(release)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1) from util-linux")
def test_agent_replicas_claim_distinct_shards(tmp_path: Path, clean_env) -> None:
    compose = load_compose({"AGENT_SHARDS": "3"})
    agent_env = {**image_env(DOCKERFILES["agent"]), **service_env(compose["services"]["agent"])}
    agent_env = {k: v for k, v in agent_env.items() if k.startswith("EDGELOOP_")}  # not the image's PATH
    base = {"PATH": os.environ["PATH"], **agent_env, "SHARD_CLAIMS_DIR": str(tmp_path / "claims")}
    release = tmp_path / "release"
    replicas = [_start_replica(tmp_path, k, base, release) for k in range(3)]
    try:
        envs = [json.loads(p.stdout.readline()) for p in replicas]
        assert sorted(int(e["EDGELOOP_AGENT_SHARD_INDEX"]) for e in envs) == [0, 1, 2]
        assert len({e["EDGELOOP_AGENT_NAME"] for e in envs}) == 3
        for e in envs:  # what each replica's agent would be configured with is valid
            settings = settings_from_env("agent", {**agent_env, **e}, clean_env)
            assert settings.num_shards == 3 and 0 <= settings.shard_index < 3
        # A fourth replica finds every shard held and stops with a clear message.
        extra = _start_replica(tmp_path, 3, base, release)
        out, err = extra.communicate(timeout=30)
        assert extra.returncode == 1 and "all 3 shards are held" in err and out == ""
    finally:
        release.touch()
        for p in replicas:
            p.communicate(timeout=30)
    # Restarted (the old process gone), replica 2 takes its previous slot back although
    # lower slots are free now.
    slot_of_2 = int(envs[2]["EDGELOOP_AGENT_SHARD_INDEX"])
    release.unlink()
    again = _start_replica(tmp_path, 2, base, release)
    try:
        assert int(json.loads(again.stdout.readline())["EDGELOOP_AGENT_SHARD_INDEX"]) == slot_of_2
    finally:
        release.touch()
        again.communicate(timeout=30)


def test_agent_entrypoint_keeps_an_explicit_shard(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "EDGELOOP_AGENT_SHARD_INDEX": "4", "EDGELOOP_AGENT_NUM_SHARDS": "5",
           "SHARD_CLAIMS_DIR": str(tmp_path / "not-created")}
    (tmp_path / "go").touch()
    done = subprocess.run(["sh", str(ENTRYPOINTS["agent"]), sys.executable, "-c", _WAITER, str(tmp_path / "go")],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["EDGELOOP_AGENT_SHARD_INDEX"] == "4"
    assert not (tmp_path / "not-created").exists()
    bad = subprocess.run(["sh", str(ENTRYPOINTS["agent"]), "true"], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "EDGELOOP_AGENT_NUM_SHARDS": "x"})
    assert bad.returncode == 2 and "EDGELOOP_AGENT_NUM_SHARDS" in bad.stderr


@pytest.mark.skipif(not (VENV_BIN / "edgeloop").exists(), reason="needs the installed edgeloop console script")
def test_server_entrypoint_migrates_before_serving(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect

    db = tmp_path / "server.db"
    env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "EDGELOOP_DATABASE_URL": f"sqlite:///{db}", "EDGELOOP_DATA_DIR": str(tmp_path / "data")}
    # Another command runs as is, without touching the database.
    other = subprocess.run(["sh", str(ENTRYPOINTS["server"]), "edgeloop", "data", "info", "--help"], env=env,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    assert not db.exists()
    # `edgeloop server run` is preceded by the migration (--help stops before serving).
    started = time.monotonic()
    done = subprocess.run(["sh", str(ENTRYPOINTS["server"]), "edgeloop", "server", "run", "--help"], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "edgeloop server migrate" in done.stderr and "Usage:" in done.stdout
    assert time.monotonic() - started < 120
    engine = create_engine(f"sqlite:///{db}")
    try:
        assert "alembic_version" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


# --- systemd unit ----------------------------------------------------------------------------

def test_systemd_unit(clean_env) -> None:
    unit = unit_parser()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    svc = unit["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert Path(argv[0]).is_absolute() and argv[0].endswith("/.venv/bin/" + console_script_name())
    assert argv[1:] == ["agent", "run"]
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/edgeloop/agent.env"
    assert svc["Restart"] == "always" and float(svc["RestartSec"].rstrip("s")) > 0
    assert svc.get("User") not in (None, "", "root", "0")
    assert svc["KillSignal"] == "SIGTERM" and float(svc["TimeoutStopSec"].rstrip("s")) >= 10
    assert svc["NoNewPrivileges"] == "yes" and svc["PrivateTmp"] == "yes" and svc["ProtectSystem"] == "strict"
    # The data directory lies in the state directory, which is writable under ProtectSystem.
    settings = settings_from_env("agent", unit_environment(), clean_env)
    state = Path("/var/lib") / svc["StateDirectory"].split()[0]
    assert settings.data_dir.is_relative_to(state), (settings.data_dir, state)
    writable = [Path(p.lstrip("-")) for p in svc["ReadWritePaths"].split()]
    assert any(settings.data_dir.is_relative_to(w) for w in writable)
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def _systemd_verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    edgeloop_bin = VENV_BIN / console_script_name()
    if not edgeloop_bin.exists():
        pytest.skip("needs the installed edgeloop console script")
    # Calibrate: where verify cannot work at all (no systemd tree), skip rather than fail.
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    if _systemd_verify(probe).returncode != 0:
        pytest.skip("systemd-analyze verify does not work in this environment")
    # verify insists that ExecStart exists: point it at this checkout's console script.
    exec_start = shlex.split(unit_parser()["Service"]["ExecStart"])[0]
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(exec_start, str(edgeloop_bin)))
    done = _systemd_verify(unit)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and not problems, "\n".join(problems)


# --- env examples ----------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["server", "agent"])
def test_env_example_values_are_valid(role: str, clean_env) -> None:
    values, _ = env_file(ENV_EXAMPLES[role])
    assert values, f"{ENV_EXAMPLES[role].name} sets nothing"
    settings = settings_from_env(role, values, clean_env)
    for key, value in values.items():
        if not key.startswith("EDGELOOP_") or key in code_env_names():
            continue
        field = key[len(settings.model_config["env_prefix"]):].lower()
        got = getattr(settings, field)
        assert str(got) == value or str(got).lower() == value.lower() or got == type(got)(value), (key, got, value)
