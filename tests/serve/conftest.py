"""One real application on a private local Ray cluster for the whole session (see support.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serve.support import (
    APP_NAME,
    Service,
    create_local_key,
    free_port,
    service_env,
    test_app_config,
)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    os.environ["RAY_AUTH_MODE"] = "disabled"  # explicit: Ray 2.60 turns token auth on otherwise
    import ray
    from ray import serve

    from serve.app import build_from_config

    storage = tmp_path_factory.mktemp("storage")
    env = service_env(storage)
    api_key = create_local_key(env)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=512 * 1024 * 1024, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_from_config(test_app_config(storage)), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while httpx.get(base + "/ready", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "service never became ready"
            time.sleep(1)
        yield Service(base_url=base, storage=storage, app_name=APP_NAME, api_key=api_key)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def openai_client(service: Service):  # noqa: ANN201
    return service.openai()


