import pytest
import ray


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs for this module, or the one another test directory already started."""
    if ray.is_initialized():
        yield
        return
    ray.init(address="local", num_cpus=2)
    yield
    ray.shutdown()
