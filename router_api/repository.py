"""Triton's model repository extension, HTTP and gRPC alike: index, load, unload.

The scheduler does the work (``scheduler_plugins.loading``); the front end asks it and
then lists the models again itself, so that the answer to a load means "this front end
serves it now", and the answer to an unload "this front end answers 404 for it now",
whatever the order Dask's event stream and the reply arrive in.
"""

from __future__ import annotations

import json
import logging

from router_api.json_handler import JSONHandler

logger = logging.getLogger("router_api.repository")


class RepositoryFailed(Exception):
    """A repository call refused; ``status`` as HTTP would say it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


STATUS = {"forbidden": 403, "not-found": 404, "invalid": 400}  # the scheduler's kinds of refusal


async def ask(call) -> dict:
    """The scheduler's answer to a repository call; its refusal raised as RepositoryFailed."""
    try:
        reply = await call
    except Exception as e:  # the scheduler unreachable, or an older plugin
        raise RepositoryFailed(503, f"cannot reach the scheduler's repository: {type(e).__name__}: {e}") from None
    if reply.get("status") != "OK":
        raise RepositoryFailed(STATUS.get(reply.get("kind"), 500), reply.get("message", "repository call failed"))
    return reply


def check_parameters(parameters: dict | None) -> None:
    """Triton lets a load carry a config or model files; here the repository's files are
    the only source (decision: no bytes from callers become a worker's model)."""
    unknown = sorted(k for k in parameters or {} if k != "unload_dependents")
    if unknown:
        raise RepositoryFailed(400, f"load/unload parameters {unknown} are not supported: the repository's files are used as they are")


async def index(router, ready: bool = False) -> list[dict]:
    return (await ask(router.link.client.scheduler.batch_router_repository_index(ready=ready)))["models"]


async def load(router, name: str, parameters: dict | None = None) -> dict:
    check_parameters(parameters)
    result = await ask(router.link.client.scheduler.batch_router_repository_load(name=name))
    await router.link.sync()
    logger.info("model %s: %s on %s", name, result.get("result"), result.get("workers"))
    return result


async def unload(router, name: str, parameters: dict | None = None) -> dict:
    check_parameters(parameters)
    result = await ask(router.link.client.scheduler.batch_router_repository_unload(name=name))
    await router.link.sync()
    return result


class RepositoryHandler(JSONHandler):
    def body_json(self) -> dict:
        if not self.request.body:
            return {}
        try:
            body = json.loads(self.request.body)
        except ValueError as e:
            raise RepositoryFailed(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RepositoryFailed(400, "the body must be a JSON object")
        return body


class RepositoryIndex(RepositoryHandler):
    async def post(self) -> None:
        try:
            ready = self.body_json().get("ready", False)
            if not isinstance(ready, bool):
                raise RepositoryFailed(400, "'ready' must be true or false")
            self.write_json(await index(self.router, ready))
        except RepositoryFailed as e:
            self.fail(e.status, e.message)


class RepositoryModel(RepositoryHandler):
    """POST /v2/repository/models/<name>/load and .../unload."""

    async def post(self, name: str, action: str) -> None:
        try:
            await (load if action == "load" else unload)(self.router, name, self.body_json().get("parameters"))
        except RepositoryFailed as e:
            return self.fail(e.status, e.message)
        self.finish()
