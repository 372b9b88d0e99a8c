"""Fault tolerance: kill a training worker process mid-run; Ray Train restarts the group from the last checkpoint."""

import os
import signal
import threading
import time

import pytest
import ray
from ray.util.state import list_actors

from tests.train.helpers import events, logged, train_tiny

STEPS, EVERY = 60, 10


def kill_a_worker_after_checkpoint(run_dir, stop: threading.Event) -> int | None:
    """Wait until checkpoint 10 exists and rank 0 has moved on, then SIGKILL one RayTrainWorker; returns its pid."""
    while not stop.is_set():
        steps = logged(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
        if (run_dir / f"checkpoint_{EVERY:06d}").exists() and max(steps, default=0) >= EVERY + 3:
            # This session's Ray by address: another Ray on the machine must not make the state API ambiguous.
            workers = list_actors(address=ray.get_runtime_context().gcs_address,
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            pid = workers[-1]["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    return None


def test_killed_worker_resumes_from_checkpoint_and_matches_uninterrupted_run(ray_local, tiny_model_dir, tmp_path):
    common = dict(train={"max_steps": STEPS, "checkpoint_every": EVERY, "lr": 1e-3}, scaling={"num_workers": 2, "max_failures": 1})
    run_dir = tmp_path / "killed"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=lambda: killed.append(kill_a_worker_after_checkpoint(run_dir, stop)))
    killer.start()
    try:
        result = train_tiny(tiny_model_dir, tmp_path, "killed", **common)
    finally:
        stop.set()
        killer.join()
    assert killed and killed[0] is not None, "the run finished before a worker could be killed"
    resumes = [e for e in events(result.run_dir) if e["event"] == "resumed"]
    assert resumes and resumes[0]["step"] >= EVERY  # restarted from a checkpoint, not from scratch
    baseline = train_tiny(tiny_model_dir, tmp_path, "uninterrupted", **common)
    a, b = logged(result.run_dir), logged(baseline.run_dir)
    assert max(a) == max(b) == STEPS
    assert a[STEPS] == pytest.approx(b[STEPS], rel=0.01)
