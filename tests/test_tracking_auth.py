"""A real MLflow server with its basic-auth app (mlflow[auth]): the launch's store check takes the
credentials from the environment, refuses wrong ones, and refuses an experiment this user may read
but not write before anything trains (an audit: the check only read, so the whole study trained
and every record was refused, HTTP 403, then kept as 'pending' for a resume that would fail too)."""

from __future__ import annotations

import os

import pytest
import requests

from search import local_server, mlflow_store
from search.errors import SpecError
from search.spec import load_spec
from tests.mlflow_server import start_server, stop_server
from tests.test_tracking import write_spec

ADMIN = ("admin", "Admin-Pass-123456")


@pytest.mark.slow  # a real server starts in 10-40 s on a 2-core box
def test_basic_auth_credentials_and_write_permission(tmp_path, monkeypatch):
    ini = tmp_path / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    port = local_server.free_port()
    server = start_server(port, tmp_path / "srv", "--app-name", "basic-auth", env=env, timeout=120)
    uri = f"http://127.0.0.1:{port}"
    try:
        for user in ("alice", "bob"):
            made = requests.post(
                f"{uri}/api/2.0/mlflow/users/create",
                json={"username": user, "password": f"{user}-Pass-123456"},
                auth=ADMIN,
                timeout=30,
            )
            assert made.status_code == 200, made.text
        owned = requests.post(
            f"{uri}/api/2.0/mlflow/experiments/create",
            json={"name": "alices"},
            auth=("alice", "alice-Pass-123456"),
            timeout=30,
        )
        assert owned.status_code == 200, owned.text

        def check(user: str | None, password: str | None, experiment: str) -> SpecError | None:
            for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
                if value is None:
                    monkeypatch.delenv(key, raising=False)
                else:
                    monkeypatch.setenv(key, value)
            spec = load_spec(
                write_spec(tmp_path / experiment, name="s", tracking={"uri": uri, "experiment": experiment})
            )
            try:
                mlflow_store.check_tracking(spec, timeout=15.0)
            except SpecError as err:
                return err
            return None

        assert check("alice", "alice-Pass-123456", "alices") is None  # hers: read and written
        assert check("bob", "bob-Pass-123456", "bobs") is None  # a new one: his to create
        err = check("bob", "bob-Pass-123456", "alices")  # READ only: was passed, then all refused
        assert err is not None and err.key == "tracking.experiment" and "not write it" in err.line()
        assert "or set tracking.experiment to one of your own." in err.line()
        with pytest.raises(SpecError, match=r"Fix: ask its owner for edit permission, then resume\.$"):
            mlflow_store.check_server(uri, "alices", 15.0, again="resume")  # a resume cannot change it
        err = check("bob", "wrong", "bobs")
        assert err is not None and "refused the credentials (HTTP 401)" in err.line()
        assert "Fix: check MLFLOW_TRACKING_USERNAME" in err.line() and "wrong" not in err.line()
        err = check(None, None, "bobs")
        assert err is not None and "Fix: set MLFLOW_TRACKING_USERNAME" in err.line()
        # a user in the URI (allowed: no secret) and the password from the environment: MLflow
        # sends no user then; the fix named neither the cause nor the user
        with_user = uri.replace("http://", "http://alice@")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-Pass-123456")
        with pytest.raises(
            SpecError, match=r"not from the URI\. Fix: set MLFLOW_TRACKING_USERNAME=alice \(and"
        ):
            mlflow_store.check_server(with_user, "alices", 15.0)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        mlflow_store.check_server(with_user, "alices", 15.0)  # read and written as alice
    finally:
        stop_server(server)
