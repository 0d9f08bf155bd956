from collections.abc import Iterator

import pytest

from tests.partitions import lone_tenant_allotments

__all__ = ["lone_tenant_allotments"]

# the engine's own tests, and the degraded store's, look at the split itself
OWN_PARTITIONS = ("engine", "test_degraded.py", "test_allotments.py", "test_tasks.py")


@pytest.fixture(autouse=True)
def _steady_allotments(request: pytest.FixtureRequest) -> Iterator[None]:
    path = request.node.path.relative_to(request.config.rootpath / "tests" / "quotas")
    # tests of the split itself (tests/quotas/test_usage.py) ask for `three_partitions`
    if path.parts[0] not in OWN_PARTITIONS and "three_partitions" not in request.fixturenames:
        request.getfixturevalue("lone_tenant_allotments")
    yield
