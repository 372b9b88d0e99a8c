import pytest
import ray


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session (2 CPUs: two 1-CPU workers, as on CI)."""
    ray.init(address="local", num_cpus=2, include_dashboard=True)
    yield
    ray.shutdown()
