"""Fixtures shared by the real-Ray pipeline tests (test_pipeline.py, test_resume.py)."""

import pytest
from pipeline_runs import reference_run


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray for one test module, as the driver would start it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted default run per test session, shared by every test that compares."""
    return reference_run(tmp_path_factory.getbasetemp())
