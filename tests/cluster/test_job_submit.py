"""The cluster path end to end: `ray job submit --working-dir .` to a local multi-process Ray cluster.

cluster/local-start.sh starts a head (0 CPUs) and two 1-CPU worker nodes on free ports, with token
authentication on and a token of its own; the jobs run the same `ftray` commands as on a cloud
cluster, and cluster/local-stop.sh stops exactly that cluster afterwards. Nothing here sets RAY_* in
this process's environment: other tests start their own local Ray in it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import typer
import yaml

import ftray.cli

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv the cluster runs on: its `ray` and `ftray`
CLIENT_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sourced(env_file: Path, env: dict[str, str]) -> dict[str, str]:
    """`env` after `source env_file` in bash: what a user of the printed instructions gets."""
    out = subprocess.run(["bash", "-c", f'source "{env_file}" && env -0'], env=env, capture_output=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def tail(result: subprocess.CompletedProcess, n: int = 60) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-n:])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """The environment of a client of a fresh local cluster (RAY_AUTH_MODE, token, addresses)."""
    state = Path(tempfile.mkdtemp(prefix="ftc-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "FTRAY_RAY_PORT": str(free_port()), "FTRAY_DASHBOARD_PORT": str(free_port()), "FTRAY_CLIENT_PORT": str(free_port()),
        "FTRAY_HEAD_CPUS": "0", "FTRAY_WORKERS": "2", "FTRAY_WORKER_CPUS": "1", "FTRAY_CLUSTER_DIR": str(state),
        "RAY_AUTH_TOKEN_PATH": str(tmp_path_factory.mktemp("auth") / "token"),  # created by the script
    }
    try:
        start = subprocess.run(["bash", "cluster/local-start.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert start.returncode == 0, tail(start)
        assert Path(env["RAY_AUTH_TOKEN_PATH"]).stat().st_mode & 0o077 == 0, "the token file is private"
        yield sourced(state / "env.sh", env)
    finally:
        subprocess.run(["bash", "cluster/local-stop.sh"], cwd=REPO, env=env, timeout=180)
        left = [p.name for p in Path("/proc").glob("[0-9]*") if _marked(p, state)]
        shutil.rmtree(state, ignore_errors=True)
        assert not left, f"processes of the test cluster still alive after local-stop.sh: {left}"


def _marked(proc: Path, state: Path) -> bool:
    try:
        return f"FTRAY_LOCAL_CLUSTER={state}".encode() in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def ray(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def submit(ftray_args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ftray ...`, blocking until it ends.

    A job still running after `timeout` is stopped, and the test fails with the tail of its logs.
    """
    job = f"ftray-test-{uuid.uuid4().hex[:8]}"
    try:
        return ray("job", "submit", "--submission-id", job, "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml",
                   "--", "ftray", *ftray_args, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        logs = ray("job", "logs", job, env=env)
        ray("job", "stop", job, env=env)
        pytest.fail(f"job {job} still running after {timeout}s; its last logs:\n{tail(logs, 30)}")


def test_the_cluster_refuses_clients_without_the_token(cluster):
    assert cluster["RAY_AUTH_MODE"] == "token"
    assert ray("job", "list", env=cluster).returncode == 0
    wrong = ray("job", "list", env=cluster | {"RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode != 0 and "Invalid authentication token" in wrong.stdout + wrong.stderr
    no_mode = ray("job", "list", env={k: v for k, v in cluster.items() if k != "RAY_AUTH_MODE"})
    assert no_mode.returncode != 0 and "Missing authentication token" in no_mode.stdout + no_mode.stderr


TINY = ["--set", "train.max_steps=4", "--set", "scaling.num_workers=1", "--set", "data.max_samples=64", "--set", "data.eval_max_samples=16"]


def test_ftray_train_job_writes_its_checkpoint(cluster, tiny_model_dir, tmp_path):
    out = tmp_path / "runs"
    result = submit(["train", "quickstart", "--no-eval", "--set", f"model.name={tiny_model_dir}", *TINY,
                     "--set", f"output.dir={out}", "--set", "output.name=job"], cluster)
    assert result.returncode == 0, tail(result)
    final = out / "job" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert json.loads((out / "job" / "summary.json").read_text())["final"] == str(final)
    assert [p.name for p in (out / "job").glob("checkpoint_*") if p.is_dir()] == ["checkpoint_000004"]


def test_ftray_tune_job_writes_trials_reports_and_soup(cluster, tiny_model_dir, tmp_path):
    if "tune" not in typer.main.get_command(ftray.cli.app).commands:
        pytest.skip("`ftray tune` is not in the CLI yet (ftray/cli.py)")
    # tune_spaces/lora.yaml with ASHA's grace period cut to fit 4 steps (Ray refuses grace_period > max_t).
    space = yaml.safe_load((REPO / "tune_spaces" / "lora.yaml").read_text())
    space["scheduler"]["grace_period"] = 2
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(space))  # the file stem names the method
    out = tmp_path / "sweeps"
    result = submit(["tune", "quickstart", "--space", str(tmp_path / "lora.yaml"), "--num-samples", "2", "--soup", "greedy",
                     "--set", f"model.name={tiny_model_dir}", *TINY, "--set", f"output.dir={out}", "--set", "output.name=sweep"],
                    cluster)
    assert result.returncode == 0, tail(result)
    sweep = out / "sweep"
    with open(sweep / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (sweep / "results.md").is_file() and (sweep / "best_config.yaml").is_file()
    soup = json.loads((sweep / "soup.json").read_text())
    assert any(Path(soup["path"]).glob("*.safetensors"))
