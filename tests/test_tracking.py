"""MLflow tracking against a real `mlflow server` (SQLite store) on 127.0.0.1, read back through its REST API,
and the run page in the MLflow UI opened by headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from foundry.pretrain.engine import free_port
from tests.conftest import Output, data_args, read_metrics, torchrun
from tests.test_launch import TINY, _Launcher, _logged_steps

TRACKED = [a for a in TINY if a != "tracking.mlflow=false"]


class MlflowServer:
    """`mlflow server` with a SQLite store in `root`; stop() and start() again keep port and data."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
               f"sqlite:///{self.root / 'mlflow.db'}", "--default-artifact-root", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True,
                                     env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        Output(self.proc.stdout).wait_for(f"running on {self.url}", 180)  # uvicorn's line once it listens

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)

    def api(self, path: str, body: dict | None = None, **query) -> dict:
        url = f"{self.url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def run_named(self, name: str) -> dict:
        experiment = self.api("experiments/get-by-name", experiment_name="foundry")["experiment"]
        runs = self.api("runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                        "filter": f"attributes.run_name = '{name}'"}).get("runs", [])
        assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}"
        return runs[0]

    def history(self, run_id: str, key: str) -> list[dict]:
        return self.api("metrics/get-history", run_id=run_id, metric_key=key, max_results=10000).get("metrics", [])


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()


def _losses(server: MlflowServer, run_id: str) -> dict[int, float]:
    points = server.history(run_id, "loss")
    steps = [p["step"] for p in points]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(s for s in steps if steps.count(s) > 1)}"
    return {int(p["step"]): p["value"] for p in points}


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory, stdlib_shards) -> tuple[Path, str, str]:
    """A 40-step run against the server, stopped by SIGTERM part-way and resumed: (run_dir, run id after the
    first attempt, output of the second)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tracked"
    args = [*TRACKED, *data_args(stdlib_shards), "train.max_steps=40", f"tracking.uri={mlflow_server.url}",
            f"train.run_dir={run_dir}"]
    first = _Launcher(args)
    try:
        first.wait_for_step(8, 180)
        first.proc.send_signal(signal.SIGTERM)  # stops with a checkpoint; the next launch resumes it
        out = first.wait(timeout=120)
    finally:
        first.proc.kill()
    stopped = json.loads((run_dir / "status.json").read_text())["step"]
    assert stopped < 40, out[-2000:]
    run = mlflow_server.run_named("tracked")
    assert run["info"]["status"] == "KILLED"
    second = _Launcher(args)
    out = second.wait(timeout=240)
    assert second.proc.returncode == 0, out[-3000:]
    return run_dir, run["info"]["run_id"], out


def test_a_run_logs_params_tags_and_every_step_and_a_resume_continues_the_same_run(mlflow_server, tracked):
    run_dir, first_run_id, out = tracked
    assert f"MLflow run {first_run_id} continues" in out
    run = mlflow_server.run_named("tracked")  # still one run
    info, data = run["info"], run["data"]
    assert info["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in data["params"]}
    assert params["train.lr"] == "0.003" and params["model.hidden_size"] == "64" and params["data.seq_len"] == "128"
    assert len(params) >= 60  # the whole resolved config, one parameter per key
    tags = {t["key"]: t["value"] for t in data["tags"]}
    assert tags["layout"] == "tp 1 x pp 1 x dp 2" and tags["world_size"] == "2" and tags["precision"] == "fp32"
    assert tags["kernel.attention"] == "sdpa" and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", tags["git.commit"])
    assert tags["slurm.job_id"] == "none"
    # The loss curve: one point per logged step across both attempts, equal to metrics.jsonl.
    losses = _losses(mlflow_server, info["run_id"])
    assert sorted(losses) == list(range(1, 41))
    assert all(abs(losses[m["step"]] - m["loss"]) < 1e-6 for m in read_metrics(run_dir))
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "tokens"):
        assert len(mlflow_server.history(info["run_id"], key)) == 40, key
    artifacts = mlflow_server.api("artifacts/list", run_id=info["run_id"]).get("files", [])
    assert "config.yaml" in [f["path"] for f in artifacts]


def test_a_server_outage_loses_no_point_and_does_not_stop_training(mlflow_server, tmp_path, stdlib_shards):
    run_dir = tmp_path / "outage"
    launcher = _Launcher([*TRACKED, *data_args(stdlib_shards), "train.max_steps=150",
                          f"tracking.uri={mlflow_server.url}", "tracking.flush_seconds=300", f"train.run_dir={run_dir}"])
    try:
        launcher.output.wait_for("MLflow run", 180)
        launcher.wait_for_step(5, 180)
        mlflow_server.stop()
        down_at = _logged_steps(run_dir)
        launcher.wait_for_step(down_at + 10, 120)  # 10 steps trained while MLflow is down
        mlflow_server.start()
        out = launcher.wait(timeout=600)
    finally:
        launcher.proc.kill()
    assert launcher.proc.returncode == 0, out[-3000:]
    assert out.count("cannot be reached") == 1 and "answers again" in out
    run = mlflow_server.run_named("outage")
    assert run["info"]["status"] == "FINISHED"
    assert sorted(_losses(mlflow_server, run["info"]["run_id"])) == list(range(1, 151))


def test_without_a_uri_the_run_has_its_own_sqlite_store(tmp_path, stdlib_shards):
    run_dir = tmp_path / "local"
    torchrun(1, [*TRACKED, *data_args(stdlib_shards), "tracking.mlflow=true", "train.max_steps=6",
                 "train.warmup_steps=1", f"train.run_dir={run_dir}"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("foundry")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "local" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))
    assert (run_dir / "mlartifacts").is_dir()  # artifacts stay in the run directory too


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--run-all-compositor-stages-before-draw",
                  "--virtual-time-budget=30000"]


def test_the_mlflow_ui_shows_the_runs_loss_chart(mlflow_server, tracked, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: run `bash setup.sh --with-services`"
    run = mlflow_server.run_named("tracked")
    page = (f"{mlflow_server.url}/#/experiments/{run['info']['experiment_id']}/runs/{run['info']['run_id']}"
            f"/model-metrics")
    profile = tmp_path / "profile"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page],
                         capture_output=True, text=True, timeout=180).stdout
    assert "tracked" in dom, "the run's name is not on its page"
    assert re.search(r">\s*loss\s*<", dom), "no chart titled loss on the run's metrics page"
    shot = tmp_path / "run-page.png"
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", page],
                   capture_output=True, timeout=180)
    assert shot.is_file() and shot.stat().st_size > 20_000, "the screenshot is missing or blank"


def test_an_unreachable_store_never_raises_and_says_what_was_not_sent(tmp_path, caplog):
    from foundry.pretrain.config import TrackingConfig
    from foundry.pretrain.tracking import Tracker

    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", flush_seconds=3)
    tracker = Tracker(cfg, tmp_path, run_id=None, params={"a": "1"}, tags={}, config_yaml="a: 1\n")
    for step in range(1, 6):
        tracker.log({"step": step, "loss": 1.0 / step, "mfu": None})
    with caplog.at_level("WARNING", logger="foundry"):
        tracker.close("FINISHED")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot be reached" in m for m in messages) == 1
    assert any("5 logged steps were not sent" in m for m in messages), messages


def test_a_password_in_the_uri_and_a_tracking_token_are_written_nowhere(mlflow_server, tmp_path, stdlib_shards,
                                                                        monkeypatch):
    """Through `foundry launch`, whose job reads the config back from the run directory: the password reaches
    the workers through the environment, not through any file."""
    password, token = "s3cr3t-pw-8841", "tok-XYZ-5512"
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    run_dir = tmp_path / "secret"
    uri = mlflow_server.url.replace("http://", f"http://alice:{password}@")
    launcher = _Launcher([*TRACKED, *data_args(stdlib_shards), "train.max_steps=6", f"tracking.uri={uri}",
                          f"train.run_dir={run_dir}"])
    out = launcher.wait(timeout=240)
    assert launcher.proc.returncode == 0, out[-3000:]
    run = mlflow_server.run_named("secret")
    assert sorted(_losses(mlflow_server, run["info"]["run_id"])) == [1, 2, 3, 4, 5, 6]  # it did reach the server
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["tracking.uri"] == mlflow_server.url.replace("http://", "http://alice:***@")
    for secret in (password, token):
        assert secret not in out
        assert not [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not [p for p in mlflow_server.root.rglob("*")
                    if p.is_file() and p.name != "server.log" and secret.encode() in p.read_bytes()]
