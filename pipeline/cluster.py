"""The production topology on one machine: Airflow on PostgreSQL with the CeleryExecutor and
Redis, each component a separate process.

:func:`cluster_env` is the configuration every component of a deployment shares, as
environment variables (the README's "Production mode by hand" exports the same ones).
:class:`Cluster` prepares the metadata database (``airflow db migrate``, the ingest pool)
and runs api-server, scheduler, dag-processor, triggerer and a Celery worker as child
processes, the way an operator would start them by hand; :class:`AirflowApi` reads run and
task states through Airflow's REST API. Batches are picked up by the intake DAG's inbox
watcher (``pipeline.watch``), so nothing here triggers a run.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

from pipeline import atomic
from pipeline.embedded import (
    AIRFLOW,
    INGEST_POOL,
    SIMPLE_AUTH_MANAGER,
    Components,
    EmbeddedAirflowError,
    Stopped,
    jwt_secret,
)
from pipeline.home import DataHome, dags_dir

API_USER = "admin"


def cluster_env(
    home: DataHome,
    *,
    database_url: str,
    broker_url: str,
    result_backend: str,
    api_port: int = 8080,
    ledger_url: str | None = None,
) -> dict[str, str]:
    """Airflow and trialpipe configuration for a Celery deployment, as environment variables.

    ``database_url`` is Airflow's metadata DB (``postgresql+psycopg2://...``),
    ``broker_url`` the Celery broker (``redis://...``), ``result_backend`` where Celery
    keeps task results (``db+postgresql://...``), ``ledger_url`` the audit ledger's
    database (default: SQLite in the data home, which every worker must then share).
    """
    api = f"http://127.0.0.1:{api_port}"
    env = {
        "TRIALPIPE_HOME": str(home.root),
        "AIRFLOW_HOME": str(home.airflow),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir()),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret(home),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api,
        # Task processes on the workers report through the api-server's Execution API.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{API_USER}:admin",
    }
    if ledger_url:
        env["TRIALPIPE_LEDGER_URL"] = ledger_url
    return env


# The command of each component (after `airflow`), in start order.
COMPONENTS: dict[str, list[str]] = {
    "api-server": ["api-server", "--workers", "1"],
    "scheduler": ["scheduler"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer"],
    "celery-worker": ["celery", "worker"],
}


class Cluster:
    """A Celery deployment of trialpipe's Airflow as child processes of this one.

    :param env: :func:`cluster_env`, plus any tuning (worker concurrency, queue, ports).
    """

    def __init__(self, home: DataHome, env: dict[str, str]) -> None:
        self.home = home
        # The deployment is configured by `env` alone, not by Airflow settings this process
        # inherited (a shell's, or the embedded mode's, which writes them into os.environ).
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        self.env = {**inherited, **env}
        self.api_url = env["AIRFLOW__API__BASE_URL"]
        self.components: Components | None = None
        self.password = self._api_password()

    def _api_password(self) -> str:
        """The API user's password, in the file the simple auth manager reads (owner-only)."""
        path = self.home.restricted / "secrets" / "airflow-passwords.json"
        self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(path)
        made = json.dumps({API_USER: secrets.token_urlsafe(24)})
        return str(json.loads(atomic.create_secret(path, made))[API_USER])

    def airflow(self, *args: str, timeout: float = 300) -> str:
        """Run one ``airflow`` CLI command with the cluster's configuration; its output."""
        result = subprocess.run(
            [AIRFLOW, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise EmbeddedAirflowError(
                f"airflow {' '.join(args)} failed (exit {result.returncode}): "
                f"{result.stderr[-2000:]}"
            )
        return result.stdout

    def prepare(self, ingest_slots: int, timeout: float = 600) -> None:
        """Migrate the metadata DB and size the ingest pool, as an operator does once, and
        give the components the same ``TRIALPIPE_INGEST_SLOTS`` (the ingest DAG's active
        runs); ``timeout`` bounds both commands together."""
        self.env["TRIALPIPE_INGEST_SLOTS"] = str(ingest_slots)
        deadline = time.monotonic() + timeout
        self.airflow("db", "migrate", timeout=timeout)
        self.airflow(
            "pools",
            "set",
            INGEST_POOL,
            str(ingest_slots),
            "Batches processed at once",
            timeout=max(1.0, deadline - time.monotonic()),
        )

    def start(self, worker_args: tuple[str, ...] = ()) -> None:
        """Start every component; ``worker_args`` go to ``airflow celery worker``."""
        self.components = Components(self.home, self.env)
        for name, args in COMPONENTS.items():
            worker = name == "celery-worker"
            extra = list(worker_args) if worker else []
            # The worker forks its pool, and each pool process its task processes: with the
            # tasks' modules loaded first, no task imports them again.
            self.components.start(name, [*args, *extra], preload=worker)

    def check_alive(self) -> None:
        """Raise if a component has exited."""
        if self.components is not None:
            self.components.check_alive()

    def stop(self, timeout: float = 60.0) -> Stopped:
        """SIGTERM the components in a safe order, wait; their exit codes and what had to
        be killed (nothing, when every component exits cleanly with its processes)."""
        if self.components is None:
            return Stopped({}, {})
        stopped = self.components.stop(timeout)
        self.components = None
        return stopped

    @property
    def pids(self) -> dict[str, int]:
        """Each running component's process ID."""
        return {n: p.pid for n, p in (self.components.procs if self.components else {}).items()}

    def api(self) -> AirflowApi:
        """A REST API client logged in as the cluster's API user."""
        return AirflowApi(self.api_url, API_USER, self.password)

    def wait_until_serving(self, timeout: float = 180) -> None:
        """Wait until the api-server answers its health check."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=10).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise EmbeddedAirflowError("timed out waiting for the api-server") from None
                time.sleep(1)


class AirflowApi:
    """Airflow's REST API (``/api/v2``), with a JWT token from the auth manager."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._credentials = {"username": username, "password": password}
        self._token: str | None = None

    def _request(self, method: str, url: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str) -> Any:
        """GET ``/api/v2<path>``; None when it does not exist (404)."""
        if self._token is None:
            login = self._request("POST", f"{self.base_url}/auth/token", self._credentials)
            self._token = login["access_token"]
        try:
            return self._request("GET", f"{self.base_url}/api/v2{path}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise
