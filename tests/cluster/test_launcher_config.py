"""cluster/: the `ray up` config validates with the installed Ray's launcher, and pins Ray and token auth.

Also the runtime env used by `ray job submit` and the local start/stop scripts (syntax only here; they
run for real in test_job_submit.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.fixture(scope="module")
def launcher() -> dict:
    """gpu-cluster.yaml merged with the provider's defaults and validated, as `ray up` does before any cloud call."""
    config = prepare_config(yaml.safe_load((CLUSTER / "gpu-cluster.yaml").read_text()))
    validate_config(config)
    return config


def test_image_is_pinned_to_the_installed_ray(launcher):
    assert launcher["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_gpu_workers_autoscale_from_zero_and_the_head_takes_no_work(launcher):
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= launcher["max_workers"]


def test_every_ray_start_uses_token_auth_with_the_mounted_token(launcher):
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # Ray's default token path, every node


def test_setup_installs_this_checkout(launcher):
    assert launcher["file_mounts"]["~/ftray"] == "."
    assert "pip install -q -e ~/ftray" in launcher["setup_commands"]
    assert {".venv", "runs", ".git"} <= set(launcher["rsync_exclude"])


def test_runtime_env_is_valid_and_keeps_the_upload_small():
    raw = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**raw)  # unknown fields raise
    assert "working_dir" not in raw and "pip" not in raw  # --working-dir on the command line; deps from the cluster
    assert {".venv/", "runs/", ".git/", "wandb/"} <= set(raw["excludes"])


@pytest.mark.parametrize("script", ["local-start.sh", "local-stop.sh"])
def test_scripts_are_valid_bash(script):
    path = CLUSTER / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
