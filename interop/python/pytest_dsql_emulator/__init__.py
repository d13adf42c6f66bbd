"""Drive ``dsql-emulator`` (a local Amazon Aurora DSQL endpoint) from Python tests.

``Emulator.start()`` runs the binary (``$DSQL_EMULATOR``, else ``dsql-emulator`` on ``PATH``)
on a free port with its control port, stopped with the test run however that ends
(``--exit-with-parent``). ``Emulator.endpoint()`` makes an endpoint of the test's own (its own
database, counters, faults and limits) and ``Endpoint.close()`` drops it. Connection
parameters work with psycopg / libpq as they are; ``Endpoint.token()`` is an IAM auth token
for them, signed by the binary with the credentials the emulator accepts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

__all__ = ["Emulator", "Endpoint", "EmulatorError"]

# Credentials the emulator accepts: any pair works; fixed so tests need no AWS setup.
ACCESS_KEY_ID = "AKIAPYTESTEMULATOR00"
SECRET_ACCESS_KEY = "pytest/dsql+emulator"


class EmulatorError(RuntimeError):
    """The emulator did not start, or refused a control request (the message says why)."""


def _binary() -> str:
    found = os.environ.get("DSQL_EMULATOR") or shutil.which("dsql-emulator")
    if not found:
        raise EmulatorError(
            "dsql-emulator not found: set DSQL_EMULATOR or put it on PATH "
            "(cargo install --locked tokio-postgres-dsql --features emulator)"
        )
    return found


class Emulator:
    """A running ``dsql-emulator`` and its control port."""

    def __init__(self, process: subprocess.Popen, env: dict, env_file: str):
        self.process = process
        self.env = env
        self._env_file = env_file

    @classmethod
    def start(cls, timeout: float = 120.0) -> "Emulator":
        work = tempfile.mkdtemp(prefix="dsql-emulator-pytest-")
        env_file = os.path.join(work, "dsql.env")
        environment = dict(os.environ)
        # The emulator would require tokens to carry a session token found here.
        environment.pop("AWS_SESSION_TOKEN", None)
        environment.update(
            AWS_ACCESS_KEY_ID=ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY
        )
        # Stopped with the test run however it ends: by the kernel on Linux, elsewhere when
        # the pipe to its standard input closes (with this process).
        linux = sys.platform.startswith("linux")
        process = subprocess.Popen(
            [_binary(), "--port", "0", "--control-port", "0",
             "--exit-with-parent" if linux else "--exit-on-stdin-close", "--env-file", env_file],
            env=environment,
            stdin=subprocess.DEVNULL if linux else subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            env = _read_env(env_file)
            # A file of this process: not one an earlier, killed emulator left.
            if env.get("DSQL_EMULATOR_PID") == str(process.pid):
                return cls(process, env, env_file)
            if process.poll() is not None:
                raise EmulatorError(f"dsql-emulator exited with status {process.returncode}")
            if time.monotonic() > deadline:
                process.kill()
                raise EmulatorError(f"dsql-emulator was not ready within {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops it (SIGTERM), its PostgreSQL with it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def control(self, method: str, path: str, **params) -> dict:
        """One control-port request (``GET /``, ``POST /faults/cut_next_commit``, ...)."""
        query = urllib.parse.urlencode({k: _param(v) for k, v in params.items() if v is not None})
        url = self.env["DSQL_EMULATOR_CONTROL"] + path + (f"?{query}" if query else "")
        request = urllib.request.Request(
            url,
            method=method,
            headers={"Authorization": "Bearer " + self.env["DSQL_EMULATOR_CONTROL_TOKEN"]},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise EmulatorError(f"{method} {path}: {error.code} {error.read().decode()}") from None

    def endpoint(self) -> "Endpoint":
        """An endpoint of its own: own database, counters, faults and limits."""
        return Endpoint(self, self.control("POST", "/endpoints"))


class Endpoint:
    """One endpoint: connection parameters, a token, and its faults."""

    def __init__(self, emulator: Emulator, described: dict):
        self.emulator = emulator
        self.name = described["endpoint"]
        self.port = int(described["port"])
        self.ca_cert_path = described["ca_cert_path"]
        self.region = described["region"]

    def conninfo(self, user: str = "admin") -> dict:
        """libpq / psycopg keyword parameters (add ``password=self.token(user)``)."""
        return dict(
            host=self.name,
            hostaddr="127.0.0.1",
            port=self.port,
            user=user,
            dbname="postgres",
            sslmode="verify-full",
            sslrootcert=self.ca_cert_path,
        )

    def token(self, user: str = "admin") -> str:
        """An IAM auth token for ``user`` (admin: ``DbConnectAdmin``), valid 15 minutes."""
        environment = dict(os.environ)
        environment.pop("AWS_SESSION_TOKEN", None)
        environment.update(
            CLUSTER_ENDPOINT=self.name,
            AWS_REGION=self.region,
            AWS_ACCESS_KEY_ID=ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY,
        )
        done = subprocess.run(
            [_binary(), "token", "--user", user], env=environment, capture_output=True,
            text=True, check=True,
        )
        return done.stdout.strip()

    def _control(self, method: str, path: str, **params) -> dict:
        return self.emulator.control(method, f"/endpoints/{self.port}{path}", **params)

    def inject_conflicts(self, tables=(), every: int = 1, count: int | None = None) -> None:
        """The COMMIT of a transaction that wrote one of ``tables`` (none: any) fails with
        40001 (OC000) and rolls back, every ``every``-th, ``count`` times (None: until
        ``stop_injecting_conflicts``)."""
        self._control("POST", "/conflicts", tables=",".join(tables) or None, every=every,
                      count=count)

    def stop_injecting_conflicts(self) -> None:
        self._control("DELETE", "/conflicts")

    def fault(self, name: str, **params) -> None:
        """A fault by its name (``cut_next_commit``, ``fail_next_commit``,
        ``drop_all_connections``, ``black_hole``, ...; see the control port's table)."""
        self._control("POST", f"/faults/{name}", **params)

    def stats(self) -> dict:
        return self._control("GET", "/")

    def close(self) -> None:
        """Drops the endpoint and its database."""
        self.emulator.control("DELETE", f"/endpoints/{self.port}")


def _param(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _read_env(path: str) -> dict:
    try:
        with open(path) as file:
            text = file.read()
    except OSError:
        return {}
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line[len("export "):].split("=", 1)
            env[name] = value.strip("'")
    return env
