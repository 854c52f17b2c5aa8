"""The FastAPI application: wiring of store, platform, notifications and routes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefect_branchkey.bk_blocks.files import atomic_write
from prefect_branchkey.bk_server import admin_api, api
from prefect_branchkey.bk_server.amqp import AmqpPublisher, RabbitProvisioner, admin_url_from_amqp, publisher_user
from prefect_branchkey.bk_server.errors import PlatformError
from prefect_branchkey.bk_server.notifications import Notifier, WebSocketHub
from prefect_branchkey.bk_server.platform import Platform, new_secret
from prefect_branchkey.bk_server.settings import ServerSettings
from prefect_branchkey.bk_server.store import Store

log = logging.getLogger(__name__)


def write_admin_file(path: Path, url: str, token: str) -> None:
    """Record how to reach this server's admin API, readable only by its owner."""
    with atomic_write(path, "w") as handle:
        json.dump({"url": url, "admin_token": token}, handle)


def create_app(settings: ServerSettings, admin_token: str | None = None) -> FastAPI:
    """Build the server; state is opened on start-up and closed on shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.make_dirs()
        store = Store(settings.database)
        publisher = AmqpPublisher(settings.amqp_url, store) if settings.amqp_url else None
        provisioner = None
        if settings.amqp_url:
            admin_url = settings.rabbitmq_admin_url or admin_url_from_amqp(settings.amqp_url)
            provisioner = RabbitProvisioner(admin_url, publisher_user(settings.amqp_url))
        hub = WebSocketHub()
        hub.bind_loop(asyncio.get_running_loop())
        platform = Platform(settings, store, Notifier(hub, publisher), provisioner)
        app.state.platform = platform
        app.state.publisher = publisher
        if publisher:
            publisher.start()
        platform.resume_after_restart()
        deadline_task = asyncio.create_task(_close_overdue_rounds(platform, settings.deadline_check_interval_s))
        try:
            yield
        finally:
            deadline_task.cancel()
            platform.close()
            if publisher:
                publisher.stop()
            store.close()

    app = FastAPI(title="bk_server: a local BranchKey platform", lifespan=lifespan)
    app.state.admin_token = admin_token or new_secret()
    app.include_router(api.router)
    app.include_router(admin_api.router)

    @app.exception_handler(PlatformError)
    async def platform_error(_: Request, exc: PlatformError) -> JSONResponse:
        body = {"error": exc.message} | ({"code": exc.code} if exc.code and settings.extensions else {})
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    return app


async def _close_overdue_rounds(platform: Platform, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(platform.close_overdue_rounds)
        except (OSError, sqlite3.Error, PlatformError):
            log.exception("deadline check failed")
