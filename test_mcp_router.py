#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "mcp>=2.3,<3",
#     "pyyaml>=6",
#     "pytest>=8",
#     "pytest-xdist>=3",
#     "uvloop>=0.19; sys_platform != 'win32'",
#     "httptools>=0.6",
# ]
# ///
"""The whole test suite of mcp_router.py.

Run it with `uv run test_mcp_router.py` (or `pytest test_mcp_router.py`).
Backends are real `mcp.server.Server` objects, in process or as subprocesses
(`python test_mcp_router.py --fake-backend ...` runs one over stdio or HTTP).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final, cast

import anyio
import httpx2
import mcp_types as types
import pytest
import yaml
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.server import Server
from mcp.server.caching import CacheHint
from mcp.server.mcpserver import Elicit, ListRoots, MCPServer, Resolve, Sample
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourceUpdated, ToolsListChanged
from mcp.shared.exceptions import MCPError
from mcp.shared.memory import create_client_server_memory_streams
from mcp.shared.message import SessionMessage
from pydantic import BaseModel

import mcp_router as mr

HERE = Path(__file__).resolve().parent
ROUTER = HERE / "mcp_router.py"
pytestmark = pytest.mark.anyio
# The suite has uvloop installed (asyncio stays the default): the end-to-end tests run on each loop.
EVENT_LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------- fakes


class FakeClock:
    """Fake time for the router: it moves when the test advances it, never backwards, and wakes the sleepers due.

    With `autojump`, every sleep moves time forward by its length at once (restart backoff and retries run in
    no real time); tests that use it turn health checks and list refresh off, which would otherwise spin.
    """

    def __init__(self, start: float = 1000.0, *, autojump: bool = False) -> None:
        self.now = start
        self.autojump = autojump
        self.delays: list[float] = []
        self._sleepers: list[tuple[float, anyio.Event]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go backwards"
        self.now += seconds
        for due, woken in [s for s in self._sleepers if s[0] <= self.now]:
            self._sleepers.remove((due, woken))
            woken.set()

    async def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self.autojump:
            self.advance(seconds)
            await anyio.lowlevel.checkpoint()
            return
        woken = anyio.Event()
        self._sleepers.append((self.now + seconds, woken))
        await woken.wait()

    def clock(self) -> mr.Clock:
        return mr.Clock(now=self, wall=lambda: 1.7e9 + self.now, sleep=self.sleep, random=lambda: 0.5)


QUIET: Final[dict[str, Any]] = {"health_check": {"enabled": False}}
"""Backend keys for tests on an autojumping clock: no health loop."""


def no_refresh(**routing: Any) -> dict[str, Any]:
    """Router settings for tests on an autojumping clock: no periodic re-listing, plus the given `routing` keys."""
    return {"routing": {"capability_cache_ttl_seconds": 0, **routing}}


@dataclass
class FakeBackend:
    """A real MCP Server with chosen tools, resources and prompts, and failure modes.

    Tools: `echo` (returns its text), `fail` (an MCP error), `broken` (isError),
    `hang` (never answers until `release` is set), `count` (counts calls), plus
    `fillers` numbered tools; listings are paginated by `page_size`.
    """

    name: str
    fillers: int = 0
    page_size: int = 0
    extra_tools: list[types.Tool] = field(default_factory=list)
    resources: list[types.Resource] = field(default_factory=list)
    templates: list[types.ResourceTemplate] = field(default_factory=list)
    prompts: list[types.Prompt] = field(default_factory=list)
    instructions: str | None = None
    result_for: dict[str, types.CallToolResult] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    subscribed: list[str] = field(default_factory=list)
    roots_changes: int = 0
    roots_changed: anyio.Event = field(default_factory=anyio.Event)
    forget_session: bool = False
    tool_lists: int = 0
    crashes: int = 0
    """Calls that crash the backend (its connection drops mid-call), the next ones first."""
    crash: Callable[[], None] | None = None
    serves_templates: bool = True
    answers_ping: bool = True
    pings: int = 0
    """Pings refused (when it does not answer ping)."""
    log_levels: list[str] = field(default_factory=list)
    refused_levels: int = 0
    """logging/setLevel requests to refuse, the next ones first."""
    log_session: Any = None
    """The session of the last `log` call: it logs outside any request when the test calls it."""
    release: anyio.Event = field(default_factory=anyio.Event)
    hang_started: anyio.Event = field(default_factory=anyio.Event)
    cancelled: anyio.Event = field(default_factory=anyio.Event)

    def tools(self) -> list[types.Tool]:
        schema = {"type": "object", "properties": {"text": {"type": "string"}}}
        names = ["echo", "fail", "broken", "hang", "count", "progress", "sample", "elicit", "roots", "add_tool", "log", "touch", "was_cancelled", "expired"]  # fmt: skip
        base = [types.Tool(name=n, description=f"{n} on {self.name}", input_schema=schema) for n in names]
        base[4] = types.Tool(name="count", input_schema=schema, annotations=types.ToolAnnotations(idempotent_hint=True))
        base.append(
            types.Tool(name="peek", input_schema=schema, annotations=types.ToolAnnotations(read_only_hint=True))
        )
        fill = [types.Tool(name=f"tool_{i}", input_schema={"type": "object"}) for i in range(self.fillers)]
        return base + self.extra_tools + fill

    def _page(self, items: list[Any], params: types.PaginatedRequestParams | None) -> tuple[list[Any], str | None]:
        if not self.page_size:
            return items, None
        start = int(params.cursor) if params and params.cursor else 0
        end = start + self.page_size
        return items[start:end], (str(end) if end < len(items) else None)

    def server(self) -> Server[Any]:
        async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
            self.tool_lists += 1
            items, cursor = self._page(self.tools(), params)
            return types.ListToolsResult(tools=items, next_cursor=cursor)

        async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
            self.calls.append(params.name)
            args = params.arguments or {}
            if self.crashes and self.crash is not None:
                self.crashes -= 1
                self.crash()
                await anyio.sleep_forever()
            if self.forget_session:  # what a restarted HTTP server answers for an old session id
                self.forget_session = False
                raise MCPError(types.INVALID_REQUEST, "Session not found")
            if params.name in self.result_for:
                return self.result_for[params.name]
            if params.name == "nap":  # listed only by the fake as a program: says it has started, then sleeps
                await ctx.session.report_progress(0, None, "napping")
                await anyio.sleep(float(args.get("text", "1")))
            if params.name == "stall":  # listed only where a test adds it: says it has started, then waits for release
                await ctx.session.report_progress(0, None, "stalling")
                await self.release.wait()
            if params.name == "quote":  # listed only where a test adds it: an error quoting the client's headers
                headers = ctx.request.headers
                tenant = headers.get("x-tenant", "").split(", ")[-1]  # the last of the values, alone
                refusal = f"refused request {headers.get('x-request-id')} of {headers.get('x-user')} for {tenant}"
                raise MCPError(int(args.get("code", -32042)), refusal)
            if params.name == "fail":
                raise MCPError(int(args.get("code", -32042)), "the fake refuses", {"why": "asked to"})
            if params.name == "broken":
                return types.CallToolResult(content=[types.TextContent(text="tool-level failure")], is_error=True)
            if params.name == "expired":
                raise MCPError(types.INVALID_REQUEST, "payment provider session expired")
            if params.name in ("hang", "peek"):
                self.hang_started.set()
                try:
                    await self.release.wait()
                except anyio.get_cancelled_exc_class():
                    self.cancelled.set()
                    raise
            if params.name == "progress":
                for i in range(3):
                    await ctx.session.report_progress(i + 1, 3, f"step {i + 1}")
            if params.name == "sample":
                message = types.SamplingMessage(role="user", content=types.TextContent(text=args.get("text", "")))
                try:
                    sampled = await ctx.session.create_message(
                        [message], max_tokens=10, related_request_id=ctx.request_id
                    )
                except anyio.get_cancelled_exc_class():
                    self.cancelled.set()
                    raise
                assert isinstance(sampled.content, types.TextContent)
                return types.CallToolResult(content=[types.TextContent(text=f"sampled:{sampled.content.text}")])
            if params.name == "elicit":
                schema = {"type": "object", "properties": {"name": {"type": "string"}}}
                answer = await ctx.session.elicit_form("Who?", schema, related_request_id=ctx.request_id)
                return types.CallToolResult(
                    content=[types.TextContent(text=f"elicited:{answer.action}:{answer.content}")]
                )
            if params.name == "roots":
                roots = await ctx.session.send_request(types.ListRootsRequest(), types.ListRootsResult)
                return types.CallToolResult(
                    content=[types.TextContent(text="roots:" + ",".join(str(r.uri) for r in roots.roots))]
                )
            if params.name == "interview":  # two questions in one call: a name, then a sampled greeting for it
                schema = {"type": "object", "properties": {"name": {"type": "string"}}}
                answer = await ctx.session.elicit_form("Who?", schema, related_request_id=ctx.request_id)
                who = (answer.content or {}).get("name", "")
                message = types.SamplingMessage(role="user", content=types.TextContent(text=f"greet {who}"))
                sampled = await ctx.session.create_message([message], max_tokens=10, related_request_id=ctx.request_id)
                assert isinstance(sampled.content, types.TextContent)
                return types.CallToolResult(content=[types.TextContent(text=f"interview:{who}:{sampled.content.text}")])
            if params.name == "add_tool":
                self.extra_tools.append(types.Tool(name=args.get("text", "added"), input_schema={"type": "object"}))
                await ctx.session.send_tool_list_changed()
            if params.name == "log":
                self.log_session = ctx.session
                for level in ("debug", "info", "warning"):
                    await ctx.session.send_log_message(level, f"{level} from {self.name}", logger="fake")
            if params.name == "was_cancelled":
                if args.get("text") == "wait":  # until a call of hang has been cancelled
                    await self.cancelled.wait()
                return types.CallToolResult(content=[types.TextContent(text=f"cancelled:{self.cancelled.is_set()}")])
            if params.name == "touch":
                await ctx.session.send_resource_updated(args.get("text", "file:///a.txt"))
            text = f"{self.name}:{params.name}:{args.get('text', '')}"
            return types.CallToolResult(content=[types.TextContent(text=text)])

        async def list_resources(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
            return types.ListResourcesResult(resources=self.resources)

        async def list_templates(
            ctx: Any, params: types.PaginatedRequestParams | None
        ) -> types.ListResourceTemplatesResult:
            return types.ListResourceTemplatesResult(resource_templates=self.templates)

        async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
            uri = str(params.uri)
            return types.ReadResourceResult(
                contents=[types.TextResourceContents(uri=uri, text=f"{self.name} reads {uri}", mime_type="text/plain")]
            )

        async def list_prompts(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
            return types.ListPromptsResult(prompts=self.prompts)

        async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
            text = f"{self.name} prompt {params.name} {params.arguments or {}}"
            return types.GetPromptResult(
                description="d", messages=[types.PromptMessage(role="user", content=types.TextContent(text=text))]
            )

        async def complete(ctx: Any, params: types.CompleteRequestParams) -> types.CompleteResult:
            return types.CompleteResult(completion=types.Completion(values=[f"{self.name}-{params.argument.value}"]))

        async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
            self.subscribed.append(str(params.uri))
            return types.EmptyResult()

        async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
            self.subscribed.remove(str(params.uri))
            return types.EmptyResult()

        async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
            if self.refused_levels:
                self.refused_levels -= 1
                raise MCPError(types.INTERNAL_ERROR, "the fake cannot set its level now")
            self.log_levels.append(params.level)
            return types.EmptyResult()

        server = Server(
            self.name,
            instructions=self.instructions,
            on_subscribe_resource=subscribe,
            on_unsubscribe_resource=unsubscribe,
            on_list_tools=list_tools,
            on_call_tool=call_tool,
            on_list_resources=list_resources,
            on_list_resource_templates=list_templates if self.serves_templates else None,
            on_read_resource=read_resource,
            on_list_prompts=list_prompts,
            on_get_prompt=get_prompt,
            on_completion=complete,
        )

        async def roots_changed(ctx: Any, params: Any) -> None:
            self.roots_changes += 1
            self.roots_changed.set()

        async def no_ping(ctx: Any, params: Any) -> types.EmptyResult:
            self.pings += 1
            raise MCPError(types.METHOD_NOT_FOUND, "Method not found")

        server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
        server.add_notification_handler("notifications/roots/list_changed", types.NotificationParams, roots_changed)
        if not self.answers_ping:
            server.add_request_handler("ping", types.RequestParams, no_ping)
        return server


class BreakableWrites:
    """A connection's write stream whose writes can be made to fail, as a broken pipe's do, while reads go on."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False

    def break_(self) -> None:
        self.broken = True

    async def send(self, item: Any) -> None:
        if self.broken:
            raise anyio.BrokenResourceError
        await self.stream.send(item)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> BreakableWrites:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class InProcess:
    """A connector to an in-process backend whose connection the test can cut."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend
        self.server = backend.server()
        self.connects = 0
        self.stalled = anyio.Event()
        """Set when an attempt starts waiting on `stall`."""
        self.refuse = False
        self.stall: anyio.Event | None = None
        """When set, each connection attempt waits for it, then fails: a backend that is slow to fail."""
        self._cut: Callable[[], Any] | None = None
        self.break_writes: Callable[[], None] = lambda: None
        """Makes writing to the backend fail while its connection still looks up (set while connected)."""

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        self.connects += 1
        if self.stall is not None:
            self.stalled.set()
            await self.stall.wait()
        if self.refuse or self.stall is not None:
            raise ConnectionRefusedError("fake backend refuses connections")
        async with (
            create_client_server_memory_streams() as (client_streams, server_streams),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(
                self.server.run, server_streams[0], server_streams[1], self.server.create_initialization_options()
            )
            self._cut = self.backend.crash = tg.cancel_scope.cancel
            writes = BreakableWrites(client_streams[1])
            self.break_writes = writes.break_
            try:
                yield client_streams[0], writes
            finally:
                tg.cancel_scope.cancel()

    def cut(self) -> None:
        """Drop the connection, as a crashed backend would."""
        assert self._cut is not None
        self._cut()


async def until(router: mr.Router, holds: Callable[[], bool], seconds: float = 10) -> None:
    """Wait, woken by the router's own change events (a backend's lifecycle moving), until `holds()` is true."""
    with anyio.fail_after(seconds):
        while not holds():
            await router.changed.wait()


class HintingInProcess(InProcess):
    """An in-process backend whose list answers carry 2026-style cache hints, added on the wire as it answers."""

    def __init__(
        self, backend: FakeBackend, ttl_ms: int, scope: str, lists: tuple[str, ...] = ("tools", "prompts")
    ) -> None:
        super().__init__(backend)
        self.hint = {"ttlMs": ttl_ms, "cacheScope": scope}
        self.lists = set(lists)

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        async with super().__call__() as (read, write), anyio.create_task_group() as tg:
            send, hinted = anyio.create_memory_object_stream[Any](16)

            async def pump() -> None:
                async for item in read:
                    message = getattr(item, "message", None)
                    if isinstance(message, types.JSONRPCResponse) and self.lists & message.result.keys():
                        message.result.update(self.hint)
                    await send.send(item)

            async with send, hinted:
                tg.start_soon(pump)
                yield hinted, write
                tg.cancel_scope.cancel()


class HandshakeOnly(InProcess):
    """An in-process backend that answers server/discover as a 1.x server does (method not found), on the wire."""

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        async with super().__call__() as (read, write), anyio.create_task_group() as tg:
            to_server, from_router = anyio.create_memory_object_stream[Any](16)
            to_router, answers = anyio.create_memory_object_stream[Any](16)

            async def outbound() -> None:
                async for item in from_router:
                    request = getattr(item, "message", None)
                    if isinstance(request, types.JSONRPCRequest) and request.method == "server/discover":
                        error = types.ErrorData(code=types.METHOD_NOT_FOUND, message="Method not found")
                        answer = types.JSONRPCError(jsonrpc="2.0", id=request.id, error=error)
                        await to_router.send(SessionMessage(answer))
                    else:
                        await write.send(item)

            async def inbound() -> None:
                async for item in read:
                    await to_router.send(item)

            async with to_server, from_router, to_router, answers:
                tg.start_soon(outbound)
                tg.start_soon(inbound)
                yield answers, to_server
                tg.cancel_scope.cancel()


def config_for(*names: str, settings: dict[str, Any] | None = None, **backend_keys: Any) -> mr.Config:
    target = {} if "url" in backend_keys else {"command": "unused"}
    raw: dict[str, Any] = {"backends": [{"name": n, **target, **backend_keys} for n in names]}
    raw |= settings or {}
    return mr.parse_config(raw, {})


@asynccontextmanager
async def routed(
    *fakes: FakeBackend,
    settings: dict[str, Any] | None = None,
    mode: str = "legacy",
    clock: FakeClock | None = None,
    backend_eras: str | None = None,
    **backend_keys: Any,
) -> AsyncIterator[tuple[Client, mr.Router, dict[str, InProcess]]]:
    """A router over in-process fakes, and a client connected to it; the backends' era is the config's (by default
    auto: the fakes, 2.x servers, are spoken to in 2026-07-28) unless `backend_eras` or an `era` key says otherwise."""
    config = config_for(*(f.name for f in fakes), settings=settings, **backend_keys)
    connectors = {f.name: InProcess(f) for f in fakes}
    extra: dict[str, Any] = {"backend_eras": backend_eras} if backend_eras else {}
    extra |= {"clock": clock.clock()} if clock is not None else {}
    router = mr.Router(config, connectors=connectors, **extra)
    with anyio.fail_after(20):
        async with router.running():
            await router.wait_ready()
            async with Client(mr.build_server(router), mode=mode, cache=None) as client:
                yield client, router, connectors


async def call(client: Client, name: str, arguments: dict[str, Any] | None = None) -> types.CallToolResult:
    return await client.session.send_request(
        types.CallToolRequest(params=types.CallToolRequestParams(name=name, arguments=arguments or {})),
        types.CallToolResult,
    )


def text_of(result: types.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


def sse_app(server: Server[Any]) -> Any:
    """A legacy SSE backend: the SDK's SseServerTransport serving `server` in a Starlette app (GET /sse, POST /messages/)."""
    from mcp.server.sse import SseServerTransport
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Mount, Route

    transport = SseServerTransport("/messages/")

    async def handle_sse(request: Any) -> Response:
        async with transport.connect_sse(request.scope, request.receive, request._send) as (read, write):
            await server.run(read, write, server.create_initialization_options())
        return Response()

    return Starlette(
        routes=[
            Route("/sse", endpoint=handle_sse, methods=["GET"]),
            Mount("/messages/", app=transport.handle_post_message),
        ]
    )


@asynccontextmanager
async def serving_sse(server: Server[Any]) -> AsyncIterator[int]:
    """`server` as a legacy SSE backend on a free port of 127.0.0.1, for the duration; yields the port."""
    import uvicorn

    listening = mr.bind("127.0.0.1", 0)  # bound and listening: connections wait in its backlog until uvicorn serves
    web = uvicorn.Server(uvicorn.Config(sse_app(server), log_level="warning", lifespan="off"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: web.serve(sockets=[listening]))
        try:
            yield listening.getsockname()[1]
        finally:
            web.should_exit = True


@asynccontextmanager
async def failing_posts(upstream: int) -> AsyncIterator[int]:
    """A TCP proxy to 127.0.0.1:`upstream` that fails the first HTTP POST whose body holds a marker: `fail-500` gets a
    bare HTTP 500, `reset-me` a reset connection (RST), `forget-me` the 404 of a server that lost the session; the
    rest passes through. Yields the proxy's port."""
    used: set[bytes] = set()

    def marked(body: bytes, marker: bytes) -> bool:
        if marker in body and marker not in used:
            used.add(marker)
            return True
        return False

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)

        async def answers() -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await up_reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()

        async with anyio.create_task_group() as tg:
            tg.start_soon(answers)
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: *(\d+)", head)
                    body = await reader.readexactly(int(length[1])) if length else b""
                    if marked(body, b"reset-me"):
                        linger = struct.pack("ii", 1, 0)  # on, 0 s: closing sends RST
                        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        writer.transport.abort()
                        break
                    if marked(body, b"fail-500"):
                        writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\noops")
                        await writer.drain()
                        continue
                    if marked(body, b"forget-me"):
                        writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 22\r\n\r\nCould not find session")
                        await writer.drain()
                        continue
                    up_writer.write(head + body)
                    await up_writer.drain()
            tg.cancel_scope.cancel()
        up_writer.close()
        writer.close()

    async with await asyncio.start_server(serve, "127.0.0.1", 0) as proxy:
        yield proxy.sockets[0].getsockname()[1]


# ---------------------------------------------------------------------------- config


def problems_of(raw: Any, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(mr.ConfigError) as info:
        mr.parse_config(raw, env or {}, source="backends.yaml")
    return info.value.problems


def test_config_baseline_schema_loads_with_every_key() -> None:
    raw = yaml.safe_load(
        """
        backends:
          - name: database
            url: http://localhost:8001/mcp
            namespace: db
            priority: 5
            routes:
              - {pattern: "*_user", strategy: path}
              - {pattern: "analyze_*", strategy: fallback, fallback_to: api}
            health_check: {enabled: true, interval_seconds: 15, timeout_seconds: 2, endpoint: /health}
            circuit_breaker: {failure_threshold: 3, timeout_seconds: 20, half_open_attempts: 2}
          - name: api
            url: http://localhost:8002/mcp
        routing:
          default_strategy: path
          enable_namespace_prefixing: false
          capability_cache_ttl_seconds: 60
          request_timeout_seconds: 12
          retry: {max_attempts: 4, backoff_multiplier: 3, max_backoff_seconds: 7}
        """
    )
    config = mr.parse_config(raw, {})
    db, api = config.backends
    assert (db.namespace, db.priority, db.transport) == ("db", 5, "http")
    assert db.routes[1] == mr.RouteConfig(pattern="analyze_*", strategy="fallback", fallback_to="api")
    assert db.health_check == mr.HealthCheckConfig(
        enabled=True, interval_seconds=15, timeout_seconds=2, endpoint="/health"
    )
    assert db.circuit_breaker == mr.CircuitBreakerConfig(failure_threshold=3, timeout_seconds=20, half_open_attempts=2)
    assert (api.namespace, api.priority) == ("api", 10)
    s = config.settings
    assert (s.default_strategy, s.enable_namespaces, s.cache_ttl, s.request_timeout) == ("path", False, 60, 12)
    assert (s.max_retries, s.retry_backoff, s.max_backoff) == (4, 3, 7)


def test_config_stdio_backend_with_env_cwd_and_filters() -> None:
    raw = {
        "backends": [
            {
                "name": "t",
                "command": "uvx",
                "args": ["mcp-server-time"],
                "env": {"TZ": "UTC"},
                "cwd": "/tmp",
                "include": ["get_*"],
                "exclude": ["*_secret"],
                "timeout": 3,
                "enabled": False,
            }
        ]
    }
    (b,) = mr.parse_config(raw, {}).backends
    assert (b.transport, b.command, b.args, dict(b.env), b.cwd) == (
        "stdio",
        "uvx",
        ("mcp-server-time",),
        {"TZ": "UTC"},
        "/tmp",
    )
    assert (b.include, b.exclude, b.timeout, b.enabled) == (("get_*",), ("*_secret",), 3.0, False)


def test_config_reports_every_problem_with_path_and_expectation() -> None:
    problems = problems_of(
        {
            "backends": [
                {"name": "ok", "url": "http://localhost:1/mcp"},
                {"name": "ok", "url": "http://localhost:2/mcp"},
                {"name": "bad", "url": "localhost:8000"},
                {"name": "typo", "command": "x", "priortiy": 3},
                {
                    "name": "types",
                    "command": "x",
                    "priority": "high",
                    "args": "not-a-list",
                    "circuit_breaker": {"failure_threshold": -1},
                },
                {"name": "neither"},
            ],
            "routing": {"request_timeout_seconds": "soon", "retry": {"max_attempts": 0}},
            "extra": 1,
        }
    )
    text = "\n".join(problems)
    assert "backends.yaml: backends[2].url: expected an http(s) URL, got 'localhost:8000'" in problems
    assert "backends[3].priortiy: unknown key (did you mean 'priority'?)" in text
    assert "backends[4].priority: expected a whole number >= 0, got 'high'" in text
    assert "backends[4].args: expected a list of strings" in text
    assert "backends[4].circuit_breaker.failure_threshold: expected a whole number >= 0" in text
    assert "backends[5]: expected url (an http(s) URL) or command" in text
    assert "duplicate backend name" in text and "'ok'" in text
    assert "routing.request_timeout_seconds: expected a number >= 0, got 'soon'" in text
    assert "routing.retry.max_attempts: expected at least 1 attempt" in text
    assert "backends.yaml: extra: unknown key" in text
    assert all(p.startswith("backends.yaml: ") for p in problems)


def test_config_empty_backends_list_or_file_means_zero_config(tmp_path: Path) -> None:
    empty = tmp_path / "backends.yaml"
    empty.write_text("")
    assert mr.load_config(empty, {}).backends == () == mr.parse_config({"backends": []}, {}).backends
    assert mr.parse_config({"mcpServers": {}}, {}).backends == ()
    assert problems_of({"backends": {"a": 1}}) == ["backends.yaml: backends: expected a list of backends, got {'a': 1}"]


def test_config_expands_environment_variables_and_reports_missing_ones() -> None:
    raw = {
        "backends": [
            {
                "name": "gh",
                "url": "https://${HOST}/mcp",
                "headers": {"Authorization": "Bearer ${TOKEN}"},
                "env": {"MODE": "${MODE:-fast}"},
            }
        ]
    }
    (b,) = mr.parse_config(raw, {"HOST": "api.example.com", "TOKEN": "s3cret"}).backends
    assert b.url == "https://api.example.com/mcp"
    assert b.headers["Authorization"] == "Bearer s3cret"
    assert b.env["MODE"] == "fast"
    problems = problems_of(raw, {"HOST": "h"})
    assert problems == [
        "backends.yaml: backends[0].headers.Authorization: environment variable TOKEN is not set and has no default (write ${TOKEN:-default})"
    ]


def test_config_accepts_the_mcp_servers_format_of_claude_and_cursor(tmp_path: Path) -> None:
    path = tmp_path / ".mcp.json"
    path.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "time": {"command": "uvx", "args": ["mcp-server-time"], "env": {"TZ": "UTC"}},
                    "my files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "."]},
                    "remote": {"type": "http", "url": "https://example.com/mcp", "headers": {"X-Key": "k"}},
                    "legacy": {"type": "sse", "url": "https://example.com/sse", "disabled": True, "autoApprove": []},
                }
            }
        )
    )
    config = mr.load_config(path, {})
    by_name = {b.name: b for b in config.backends}
    assert by_name["time"].transport == "stdio"
    assert by_name["my files"].namespace == "my_files"
    assert by_name["remote"].transport == "http" and by_name["remote"].headers == {"X-Key": "k"}
    assert by_name["legacy"].transport == "sse" and by_name["legacy"].enabled is False


def test_config_of_claude_desktop_ignores_its_other_keys_once_and_skips_the_router_itself(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "claude_desktop_config.json"
    servers = {
        "time": {"command": "uvx", "args": ["mcp-server-time"]},
        "router": {"command": "uv", "args": ["run", "/home/me/mcp-router/mcp_router.py", "--config", "b.yaml"]},
        "router-installed": {"command": "/home/me/.local/bin/mcp-router"},
    }
    path.write_text(
        json.dumps({"globalShortcut": "Ctrl+Space", "preferences": {"menuBarEnabled": False}, "mcpServers": servers})
    )
    with caplog.at_level("INFO", logger="mcp_router"):
        config = mr.load_config(path, {})
    assert [b.name for b in config.backends] == ["time"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{path}: ignoring top-level keys that are not about MCP servers: globalShortcut, preferences"]
    notes = [r.getMessage() for r in caplog.records if "must not proxy itself" in r.getMessage()]
    assert [n.split(": ")[1] for n in notes] == ["mcpServers.router", "mcpServers.router-installed"]


def test_config_of_vs_code_reads_servers_and_reports_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "inputs": [{"type": "promptString", "id": "gh-token", "password": True}],
                "servers": {
                    "github": {
                        "type": "http",
                        "url": "https://api.example.com/mcp",
                        "headers": {"Authorization": "Bearer ${input:gh-token}"},
                    },
                    "files": {
                        "type": "stdio",
                        "command": "npx",
                        "args": ["-y", "server-filesystem", "${env:HOME}/src"],
                    },
                },
            }
        )
    )
    with caplog.at_level("WARNING", logger="mcp_router"):
        config = mr.load_config(path, {"HOME": "/home/me"})
    by_name = {b.name: b for b in config.backends}
    assert by_name["github"].transport == "http" and not by_name["github"].fallback_to_sse
    assert by_name["files"].args == ("-y", "server-filesystem", "/home/me/src")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "inputs (gh-token) are VS Code prompts, which the router cannot show" in text
    assert "servers.github: ${input:gh-token} is a VS Code input" in text


def test_config_of_windsurf_and_cursor_take_untyped_urls_as_http_with_sse_fallback(tmp_path: Path) -> None:
    path = tmp_path / "mcp_config.json"
    servers = {"remote": {"serverUrl": "https://example.com/sse"}, "cursor": {"url": "https://example.com/mcp"}}
    path.write_text(json.dumps({"mcpServers": servers}))
    by_name = {b.name: b for b in mr.load_config(path, {}).backends}
    assert by_name["remote"].url == "https://example.com/sse"
    assert all(b.transport == "http" and b.fallback_to_sse for b in by_name.values())


def test_config_of_codex_is_read_from_its_toml(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        'model = "o3"\n'
        "[mcp_servers.time]\n"
        'command = "uvx"\nargs = ["mcp-server-time"]\nenv = { TZ = "UTC" }\nenabled_tools = ["get_*"]\ntool_timeout_sec = 20\n'
        "[mcp_servers.docs]\n"
        'url = "https://docs.example.com/mcp"\nbearer_token_env_var = "DOCS_TOKEN"\nhttp_headers = { X-Team = "core" }\n'
    )
    with caplog.at_level("WARNING", logger="mcp_router"):
        config = mr.load_config(path, {"DOCS_TOKEN": "tok-123456"})
    time_backend, docs = config.backends
    assert (time_backend.command, time_backend.env, time_backend.include, time_backend.timeout) == (
        "uvx",
        {"TZ": "UTC"},
        ("get_*",),
        20,
    )
    assert docs.headers == {"Authorization": "Bearer tok-123456", "X-Team": "core"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: ignoring top-level keys that are not about MCP servers: model"
    ]
    path.write_text("[mcp_servers.x\n")
    with pytest.raises(mr.ConfigError) as info:
        mr.load_config(path, {})
    assert info.value.problems[0].startswith(f"{path}: invalid TOML: ")


async def test_an_untyped_url_of_a_legacy_sse_server_connects_over_sse(caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(20), caplog.at_level("INFO", logger="mcp_router"):
        async with serving_sse(FakeBackend("legacy").server()) as port:
            legacy = {"name": "legacy", "url": f"http://127.0.0.1:{port}/sse", "forward_headers": ["X-Request-Id"]}
            router = mr.Router(mr.parse_config({"backends": [legacy]}, {}))
            async with router.running():
                await router.wait_ready()
                async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                    assert text_of(await call(client, "legacy__echo", {"text": "old"})) == "legacy:echo:old"
    assert "backend legacy: the URL is a legacy SSE endpoint; using the SSE transport" in caplog.text
    assert "the SSE transport cannot carry a call's own headers; forward_headers is ignored for it" in caplog.text


def test_config_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "backends.yaml"
    bad.write_text("backends:\n  - name: a\n    url: [unclosed\n")
    with pytest.raises(mr.ConfigError) as info:
        mr.load_config(bad, {})
    assert info.value.problems[0].startswith(f"{bad}: invalid YAML: line ")
    with pytest.raises(mr.ConfigError) as info:
        mr.load_config(tmp_path / "missing.yaml", {})
    assert "cannot read" in info.value.problems[0]


ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
"""Nine lines that a plain YAML load expands to 9**9 strings."""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (ALIAS_BOMB, "line 5, column 8: aliases expand to more than 10,000 values"),
        ("backends:\n  - name: a\n    priority: " + "9" * 5000 + "\n", "line 3, column 15: cannot read this value"),
        ("x: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 100 levels deep"),
        ("x: &x [*x]\n", "alias *x is inside its own anchor"),
        ("server:\n  since: 2026-13-45\n", "line 2, column 10: cannot read this value: month must be in 1..12"),
    ],
    ids=["alias-bomb", "5000-digits", "1000-deep", "self-alias", "bad-date"],
)
def test_config_bombs_and_unbuildable_values_are_config_errors_naming_file_and_line(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(text)
    with pytest.raises(mr.ConfigError) as info:
        mr.load_config(path, {})
    assert info.value.problems[0].startswith(f"{path}: invalid YAML: ")
    assert reason in info.value.problems[0]


def test_config_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(
        "backends:\n  - &base {name: a, url: 'http://a/mcp', timeout: 5}\n  - {<<: *base, name: b, url: 'http://b/mcp'}\n"
    )
    a, b = mr.load_config(path, {}).backends
    assert (b.name, b.url, b.timeout) == ("b", "http://b/mcp", 5.0) and a.timeout == 5.0


def test_config_larger_than_10_mb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("backends: []\n" + "#" * mr.MAX_CONFIG_BYTES)
    with pytest.raises(mr.ConfigError) as info:
        mr.load_config(path, {})
    assert info.value.problems == [f"{path}: larger than 10 MB; a config file must be smaller"]


def test_config_duplicate_keys_are_errors_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text("backends:\n  - name: a\n    url: http://a/mcp\n    url: http://b/mcp\n    name: c\n")
    with pytest.raises(mr.ConfigError) as info:
        mr.load_config(path, {})
    assert info.value.problems == [
        f"{path}: line 4: duplicate key 'url' (first at line 3)",
        f"{path}: line 5: duplicate key 'name' (first at line 2)",
    ]


def test_config_names_that_clean_to_one_namespace_are_an_error_unless_both_declare_it() -> None:
    clash = {"backends": [{"name": "a.b", "url": "http://x/mcp"}, {"name": "a_b", "url": "http://y/mcp"}]}
    assert problems_of(clash) == [
        "backends.yaml: backends[1].name: backend 'a_b' has the namespace 'a_b' of 'a.b' (backends[0]); "
        "rename one, or give both `namespace: a_b` to make them replicas"
    ]
    half = {
        "backends": [{"name": "one", "url": "http://x/mcp", "namespace": "two"}, {"name": "two", "url": "http://y/mcp"}]
    }
    assert "backends[1].name: backend 'two' has the namespace 'two' of 'one'" in problems_of(half)[0]
    replicas = {"backends": [{"name": n, "url": f"http://{n}/mcp", "namespace": "a_b"} for n in ("a.b", "a_b")]}
    assert [b.namespace for b in mr.parse_config(replicas, {}).backends] == ["a_b", "a_b"]


def test_config_precedence_is_cli_then_env_then_yaml_then_default() -> None:
    raw = {
        "routing": {"request_timeout_seconds": 5, "retry": {"max_attempts": 2}},
        "server": {"port": 9000, "name": "yaml-name"},
    }
    env = {"MCP_REQUEST_TIMEOUT": "7", "MCP_PORT": "9001", "MCP_ENABLE_NAMESPACES": "false"}
    s = mr.parse_config(raw, env, overrides={"request_timeout": 9.0}).settings
    assert s.request_timeout == 9.0  # CLI
    assert s.port == 9001 and s.enable_namespaces is False  # env
    assert s.max_retries == 2 and s.server_name == "yaml-name"  # YAML
    assert s.max_backoff == 10.0 and s.health_check_interval == 30.0  # defaults


def test_config_bad_environment_value_names_the_variable() -> None:
    assert problems_of({}, {"MCP_PORT": "eighty"}) == ["MCP_PORT: expected a whole number >= 0, got 'eighty'"]
    with pytest.raises(mr.ConfigError) as info:
        mr.parse_config({}, {}, overrides={"port": 70000})
    assert info.value.problems == ["--port: expected a TCP port 1-65535, got 70000"]


def test_config_numbers_and_flags_may_come_from_environment_defaults() -> None:
    raw = {
        "server": {"port": "${PORT:-8001}"},
        "backends": [{"name": "a", "command": "x", "disabled": "${OFF:-true}", "priority": "${P:-3}"}],
    }
    config = mr.parse_config(raw, {})
    assert config.settings.port == 8001
    assert (config.backends[0].enabled, config.backends[0].priority) == (False, 3)


def test_config_rejects_a_health_interval_of_zero_and_never_echoes_url_credentials() -> None:
    problems = problems_of(
        {
            "backends": [
                {"name": "a", "url": "htps://user:topsecretpw@example.com/mcp", "health_check": {"interval_seconds": 0}}
            ]
        }
    )
    text = "\n".join(problems)
    assert "backends[0].health_check: expected interval_seconds and timeout_seconds > 0" in text
    assert "backends[0].url: expected an http(s) URL" in text and "topsecretpw" not in text


SECRET = "s3cr3t-VALUE-4217"
"""A value given by environment variable: whatever it lands in, it must never be shown."""


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"server": {"port": "${PORT}"}}, "server.port"),
        ({"server": {"log_level": "${S}"}}, "server.log_level"),
        ({"server": "${S}"}, "server"),
        ({"backends": ["${S}"]}, "backends[0]"),
        ({"backends": [{"name": "a", "url": "${URL}"}]}, "backends[0].url"),
        ({"backends": [{"name": "a", "url": "htps://u:${S}@x/mcp"}]}, "backends[0].url"),
        ({"backends": [{"name": "a", "url": "http://x/", "transport": "${S}"}]}, "backends[0].transport"),
        ({"backends": [{"name": "a", "url": "http://x/", "enabled": "${S}"}]}, "backends[0].enabled"),
        ({"backends": [{"name": "a", "url": "http://x/", "timeout": "${S}"}]}, "backends[0].timeout"),
        ({"backends": [{"name": "a", "command": "x", "args": "${S}"}]}, "backends[0].args"),
        (
            {"backends": [{"name": "a", "url": "http://x/", "circuit_breaker": {"failure_threshold": "${S}"}}]},
            "failure_threshold",
        ),
        (
            {"backends": [{"name": "a", "url": "http://x/", "routes": [{"pattern": "*", "strategy": "${S}"}]}]},
            "strategy",
        ),
        (
            {"backends": [{"name": "a", "url": "http://x/", "routes": [{"pattern": "*", "fallback_to": "${S}"}]}]},
            "routes",
        ),
    ],
)
def test_config_errors_never_echo_values_from_environment_variables(raw: dict[str, Any], path: str) -> None:
    env = {"S": SECRET, "PORT": "99999", "URL": f"localhost/{SECRET}"}
    problems = problems_of(raw, env)
    assert len(problems) == 1 and path in problems[0] and "***" in problems[0]
    assert SECRET not in problems[0] and "99999" not in problems[0]


@pytest.mark.parametrize("key", ["name", "namespace"])
def test_a_backend_name_or_namespace_from_an_environment_variable_is_refused(key: str) -> None:
    """Every client sees them (they prefix the backend's tools); a value from ${VAR} is a secret, never shown."""
    assert problems_of({"backends": [{"name": "a", "url": "http://x/", key: "${S}"}]}, {"S": SECRET}) == [
        f"backends.yaml: backends[0].{key}: cannot come from ${{VAR}}: it prefixes the backend's tools for every client"
    ]


@pytest.mark.parametrize(
    "endpoint", ["//other.example:8000/health", "http://other.example/health", "https://api.example.com/h"]
)
def test_a_health_endpoint_on_another_server_is_refused_so_the_headers_stay_home(endpoint: str) -> None:
    raw = {"backends": [{"name": "a", "url": "http://api.example.com/mcp", "health_check": {"endpoint": endpoint}}]}
    assert problems_of(raw) == [
        "backends.yaml: backends[0].health_check.endpoint: expected a path on the backend's own server, "
        f"which gets its headers, got {endpoint!r}"
    ]
    same = mr.parse_config({"backends": [{**raw["backends"][0], "health_check": {"endpoint": "/healthz"}}]}, {})
    assert same.backends[0].health_check.endpoint == "/healthz"


def test_forward_headers_refuse_credentials_hops_and_session_headers_and_backends_without_http() -> None:
    url = "https://api.example.com/mcp"
    names = ["X-Request-Id", "Authorization", "cookie", "Proxy-Authorization", "Mcp-Session-Id", "Connection",
             "Transfer-Encoding", "X-Key", "bad header", "X-Trace\n"]  # fmt: skip
    raw = {
        "backends": [
            {"name": "web", "url": url, "headers": {"X-Key": "k"}, "forward_headers": names},
            {"name": "cli", "command": "npx", "forward_headers": ["X-Request-Id"]},
            {"name": "old", "url": url, "transport": "sse", "forward_headers": ["X-Request-Id"]},
        ]
    }
    credential = "is the client's credential, which never reaches a backend (give the backend its own in headers)"
    assert problems_of(raw) == [
        f"backends.yaml: backends[0].forward_headers[1]: Authorization {credential}: remove it",
        f"backends.yaml: backends[0].forward_headers[2]: cookie {credential}: remove it",
        f"backends.yaml: backends[0].forward_headers[3]: Proxy-Authorization {credential}: remove it",
        "backends.yaml: backends[0].forward_headers[4]: Mcp-Session-Id belongs to the router's own MCP session with "
        "the backend: remove it",
        "backends.yaml: backends[0].forward_headers[5]: Connection belongs to one HTTP hop, which the router makes "
        "itself: remove it",
        "backends.yaml: backends[0].forward_headers[6]: Transfer-Encoding belongs to one HTTP hop, which the router "
        "makes itself: remove it",
        "backends.yaml: backends[0].forward_headers[7]: X-Key is also set in headers: keep the backend's own value "
        "or the client's",
        "backends.yaml: backends[0].forward_headers[8]: expected an HTTP header name, got 'bad header'",
        "backends.yaml: backends[0].forward_headers[9]: expected an HTTP header name, got 'X-Trace\\n'",
        "backends.yaml: backends[1].forward_headers: only streamable HTTP backends (url) take client headers; stdio "
        "has no place for them: remove forward_headers",
        "backends.yaml: backends[2].forward_headers: only streamable HTTP backends (url) take client headers; sse "
        "has no place for them: remove forward_headers",
    ]
    fine = mr.parse_config({"backends": [{"name": "web", "url": url, "forward_headers": ["X-Request-Id"]}]}, {})
    assert fine.backends[0].forward_headers == ("x-request-id",)
    assert mr.parse_config({"backends": [{"name": "web", "url": url}]}, {}).backends[0].forward_headers == ()


def test_values_from_environment_variables_in_args_and_url_paths_are_secrets() -> None:
    raw = {
        "backends": [
            {"name": "web", "url": "http://h:1/mcp/${KEY}/sse"},
            {
                "name": "cli",
                "command": "/usr/bin/uvx",
                "args": ["--token", "${T}", "git+https://x:${T}@github.com/o/r", "pkg"],
            },
            {"name": "lit", "command": "npx", "args": ["git+https://x:literal-pw-99@github.com/o/r"]},
        ]
    }
    web, cli, lit = mr.parse_config(raw, {"KEY": "key-0123456789", "T": SECRET}).backends
    assert (web.public_target(), web.secrets()) == ("http://h:1/mcp/***/sse", ["key-0123456789"])
    assert (cli.public_target(), cli.secrets()) == ("uvx pkg", [SECRET])
    assert "literal-pw-99" in lit.secrets() and "literal-pw-99" not in lit.public_target()


def test_the_log_filter_takes_secrets_out_of_every_line_and_traceback() -> None:
    redaction = mr.RedactSecrets()
    redaction.secrets = [SECRET]
    try:
        raise ValueError(f"bad token {SECRET}")
    except ValueError:
        record = logging.LogRecord(
            "httpx", logging.WARNING, __file__, 1, "GET %s failed", (f"/mcp/{SECRET}",), sys.exc_info()
        )
    assert redaction.filter(record)
    line = logging.Formatter().format(record)
    assert "GET /mcp/*** failed" in line and "ValueError: bad token ***" in line and SECRET not in line


def test_config_health_defaults_come_from_the_router_settings() -> None:
    config = mr.parse_config(
        {"backends": [{"name": "a", "command": "x"}]},
        {"MCP_HEALTH_CHECK_INTERVAL": "12", "MCP_HEALTH_CHECK_TIMEOUT": "2"},
    )
    assert config.backends[0].health_check.interval_seconds == 12
    assert config.backends[0].health_check.timeout_seconds == 2


def test_zero_config_starts_with_no_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert mr.load_config(None, {}).backends == ()


def test_dependency_lists_agree_between_script_headers_and_pyproject() -> None:
    def header_deps(path: Path) -> list[str]:
        block = re.search(r"# /// script\n(.*?)# ///", path.read_text(), re.S)
        assert block, path
        return tomllib.loads("\n".join(line[2:] for line in block.group(1).splitlines()))["dependencies"]

    project = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]
    assert header_deps(ROUTER) == project["dependencies"]
    assert header_deps(HERE / "test_mcp_router.py") == [
        *project["dependencies"],
        *project["optional-dependencies"]["test"],
    ]


def test_readme_documents_every_setting_and_key() -> None:
    readme = (HERE / "README.md").read_text()
    for s in mr.SETTINGS:
        row = next((line for line in readme.splitlines() if f"`{s.env}`" in line), None)
        assert row is not None, f"README lacks {s.env}"
        assert f"`{s.yaml_path}`" in row, f"README row for {s.env} lacks {s.yaml_path}"
        default = getattr(mr.Settings(), s.field)
        assert f"`{str(default).lower() if isinstance(default, bool) else default}`" in row, (
            f"README default for {s.env}"
        )
    for key in mr._BACKEND_KEYS:
        assert f"`{key}`" in readme, f"README lacks backend key {key}"


async def test_a_backends_own_era_overrides_the_routers_and_bad_eras_are_named_with_the_fix() -> None:
    raw = {
        "backends": [{"name": "pinned", "command": "unused", "era": "handshake"}, {"name": "free", "command": "unused"}]
    }
    connectors = {name: InProcess(FakeBackend(name)) for name in ("pinned", "free")}
    router = mr.Router(mr.parse_config(raw, {}), connectors=connectors)
    async with router.running():
        await router.wait_ready()
        assert {n: b.status()["era"] for n, b in router.backends.items()} == {"pinned": "handshake", "free": "2026"}
    everyone = mr.parse_config({**raw, "routing": {"backend_eras": "handshake"}}, {})
    assert [b.era for b in everyone.backends] == ["handshake", None]  # None: the router's setting
    assert mr.parse_config({}, {"MCP_BACKEND_ERAS": "handshake"}).settings.backend_eras == "handshake"
    assert problems_of(
        {"backends": [{"name": "a", "command": "x", "era": "2026"}], "routing": {"backend_eras": "new"}}
    ) == [
        "backends.yaml: routing.backend_eras: expected one of auto, handshake, got 'new'",
        "backends.yaml: backends[0].era: expected one of auto, handshake, got '2026'",
    ]


def test_example_config_is_valid() -> None:
    config = mr.load_config(HERE / "backends.example.yaml", {})
    assert config.backends


# ---------------------------------------------------------------------------- naming and catalogue


def test_exposed_names_are_namespaced_and_legal() -> None:
    assert mr.expose_name("github", "search") == "github__search"
    dotted = mr.expose_name("fs", "read.file")
    assert re.fullmatch(r"fs__read_file_[0-9a-f]{8}", dotted)
    long = mr.expose_name("a_very_long_namespace_name", "and_an_even_longer_tool_name_that_goes_on_and_on")
    assert len(long) == 64 and mr.NAME_PATTERN.match(long)
    assert long == mr.expose_name("a_very_long_namespace_name", "and_an_even_longer_tool_name_that_goes_on_and_on")
    assert mr.expose_name("ns", "x", {"ns__x"}) != "ns__x"


def test_catalogue_keeps_a_table_and_never_reparses_names() -> None:
    tools = ({"name": "read.file", "inputSchema": {}}, {"name": "read_file", "inputSchema": {}})
    cat = mr.build_catalogue([mr.Member("fs", "fs", 10, mr.Listing(tools=tools))])
    originals = {e.original for e in cat.tools.values()}
    assert originals == {"read.file", "read_file"}
    assert all(mr.NAME_PATTERN.match(n) for n in cat.tools)


def test_catalogue_with_namespaces_off_reports_collisions_and_prefers_priority() -> None:
    a = mr.Member("a", "a", 20, mr.Listing(tools=({"name": "search", "inputSchema": {}},)))
    b = mr.Member("b", "b", 5, mr.Listing(tools=({"name": "search", "inputSchema": {}},)))
    cat = mr.build_catalogue([a, b], namespaced=False)
    assert cat.tools["search"].pool == ("b",)  # a's search, whose schema is never listed, is never reached
    assert cat.conflicts == ("tool 'search' of a is hidden by b's (higher priority)",)


def test_include_and_exclude_filter_a_backends_tools() -> None:
    tools = [{"name": n} for n in ("get_time", "get_secret", "convert")]
    kept = mr.filter_tools(tools, ["get_*"], ["*secret"])
    assert [t["name"] for t in kept] == ["get_time"]


def test_page_rejects_a_bad_cursor() -> None:
    items = [{"name": str(i)} for i in range(5)]
    assert mr.page(items, None, "tools", size=2)["nextCursor"] == "2"
    assert "nextCursor" not in mr.page(items, "4", "tools", size=2)
    for bad in ("nope", "9" * 5000, "6", "\u00b2"):  # int() refuses the second and the last: no internal errors
        with pytest.raises(mr.InvalidCursor):
            mr.page(items, bad, "tools")


def test_a_cached_page_is_written_as_the_sdk_would_write_it() -> None:
    tool = {
        "name": "b__ä",
        "description": 'quote " and \u2028 and 😀',
        "inputSchema": {"maximum": float("inf"), "x": float("nan")},
    }
    result = mr.page([tool, {"name": "b__plain", "inputSchema": {"type": "object"}}], None, "tools", size=1)
    expected = types.JSONRPCResponse(jsonrpc="2.0", id="req-1", result=result).model_dump_json(
        by_alias=True, exclude_unset=True
    )
    result["tools"] = mr.EncodedItems(result["tools"])
    for _ in range(2):  # encoded once, then reused
        line = mr.encode_line(types.JSONRPCResponse(jsonrpc="2.0", id="req-1", result=result))
        assert line == expected.encode() + b"\n"
        assert json.loads(line)["result"]["tools"][0]["inputSchema"] == {"maximum": None, "x": None}  # strict JSON


async def test_aggregates_three_backends_with_colliding_tool_names() -> None:
    fakes = [FakeBackend(n) for n in ("alpha", "beta", "gamma")]
    async with routed(*fakes) as (client, _, _):
        names = {t.name for t in (await client.list_tools()).tools}
        for n in ("alpha", "beta", "gamma"):
            assert {f"{n}__echo", f"{n}__fail", f"{n}__count"} <= names
        assert {"list_backends", "get_backend_health"} <= names
        assert text_of(await call(client, "beta__echo", {"text": "hi"})) == "beta:echo:hi"
        assert text_of(await call(client, "gamma__echo", {"text": "yo"})) == "gamma:echo:yo"


async def test_pagination_is_followed_to_the_end_and_offered_to_the_client() -> None:
    big = FakeBackend("big", fillers=1500, page_size=100)
    async with routed(big) as (client, _, _):
        first = await client.session.list_tools()
        assert len(first.tools) == mr.PAGE_SIZE and first.next_cursor
        second = await client.session.list_tools(params=types.PaginatedRequestParams(cursor=first.next_cursor))
        assert second.next_cursor is None
        names = [t.name for t in first.tools + second.tools]
        assert len(names) == len(set(names)) == 1500 + len(FakeBackend("x").tools()) + len(mr.MANAGEMENT_TOOLS)
        assert "big__tool_1499" in names


async def test_with_namespaces_off_names_pass_through_and_collisions_route_by_priority() -> None:
    a, b = FakeBackend("a"), FakeBackend("b")
    async with routed(a, b, settings={"routing": {"enable_namespace_prefixing": False}}) as (client, _, _):
        names = [t.name for t in (await client.list_tools()).tools]
        assert names.count("echo") == 1
        assert text_of(await call(client, "echo", {"text": "x"})) == "a:echo:x"
        listed = await call(client, "list_backends")
        assert (
            listed.structured_content
            and "tool 'echo' of b is hidden by a's (higher priority)" in listed.structured_content["conflicts"]
        )


# ---------------------------------------------------------------------------- passthrough fidelity

RICH_TOOL = types.Tool(
    name="rich",
    title="Rich tool",
    description="exercises every field",
    input_schema={"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]},
    output_schema={"type": "object", "properties": {"total": {"type": "integer"}}},
    annotations=types.ToolAnnotations(title="Rich", read_only_hint=True, open_world_hint=False),
    icons=[types.Icon(src="https://example.com/icon.png", mime_type="image/png")],
    _meta={"vendor/flag": True, "io.modelcontextprotocol/secret": "reserved"},
)
RICH_RESULT = types.CallToolResult(
    content=[
        types.TextContent(text="text", annotations=types.Annotations(audience=["user"], priority=0.5)),
        types.ImageContent(data="aGVsbG8=", mime_type="image/png"),
        types.AudioContent(data="aGVsbG8=", mime_type="audio/wav"),
        types.EmbeddedResource(
            resource=types.TextResourceContents(uri="file:///a.txt", text="embedded", mime_type="text/plain")
        ),
        types.ResourceLink(uri="file:///b.bin", name="b", mime_type="application/octet-stream"),
    ],
    structured_content={"total": 3},
    _meta={"vendor/trace": "abc"},
)


def rich_backend(name: str = "rich") -> FakeBackend:
    return FakeBackend(
        name,
        extra_tools=[RICH_TOOL],
        result_for={"rich": RICH_RESULT},
        resources=[types.Resource(uri="file:///a.txt", name="a", title="A", mime_type="text/plain", size=8)],
        templates=[types.ResourceTemplate(uri_template="notes://{id}", name="note")],
        prompts=[
            types.Prompt(name="greet", title="Greet", arguments=[types.PromptArgument(name="who", required=True)])
        ],
        instructions="Use rich tools wisely.",
    )


@pytest.mark.parametrize("backend_eras", ["handshake", "auto"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_parity_router_changes_nothing_but_names(mode: str, backend_eras: str) -> None:
    """Direct and routed look alike for a client of either era, with the backend spoken to in either era."""
    fake = rich_backend()
    async with (
        Client(fake.server(), mode=mode, cache=None) as direct,
        routed(fake, mode=mode, backend_eras=backend_eras) as (client, router, _),
    ):
        assert router.backends["rich"].status()["protocol_version"] == (
            "2026-07-28" if backend_eras == "auto" else "2025-11-25"
        )
        d_tool = next(t for t in (await direct.list_tools()).tools if t.name == "rich")
        r_tool = next(t for t in (await client.list_tools()).tools if t.name == "rich__rich")
        d_dump, r_dump = d_tool.model_dump(exclude={"name"}), r_tool.model_dump(exclude={"name"})
        assert d_dump.pop("meta") == {"vendor/flag": True, "io.modelcontextprotocol/secret": "reserved"}
        assert r_dump.pop("meta") == {"vendor/flag": True}  # reserved protocol keys belong to each hop
        assert r_dump == d_dump

        d_result = await call(direct, "rich", {"n": 1})
        r_result = await call(client, "rich__rich", {"n": 1})
        assert r_result.model_dump(exclude={"meta"}) == d_result.model_dump(exclude={"meta"})
        assert (r_result.meta or {}).get("vendor/trace") == "abc"

        assert (await client.list_resources()).resources == (await direct.list_resources()).resources
        assert (await client.list_resource_templates()).resource_templates == (
            await direct.list_resource_templates()
        ).resource_templates
        for uri in ("file:///a.txt", "notes://42"):
            assert (await client.read_resource(uri)).contents == (await direct.read_resource(uri)).contents

        r_prompt = (await client.list_prompts()).prompts[0]
        assert r_prompt.name == "rich__greet" and r_prompt.model_dump(exclude={"name"}) == (
            await direct.list_prompts()
        ).prompts[0].model_dump(exclude={"name"})
        got = await client.get_prompt("rich__greet", {"who": "Ada"})
        assert got.messages == (await direct.get_prompt("greet", {"who": "Ada"})).messages

        done = await client.complete(types.PromptReference(name="rich__greet"), {"name": "who", "value": "A"})
        assert done.completion.values == ["rich-A"]
        done = await client.complete(types.ResourceTemplateReference(uri="notes://{id}"), {"name": "id", "value": "4"})
        assert done.completion.values == ["rich-4"]


async def test_backend_results_pass_through_byte_for_byte_when_large() -> None:
    blob = "x" * (5 * 1024 * 1024)
    image = base64.b64encode(os.urandom(3 * 1024 * 1024)).decode()
    big = types.CallToolResult(
        content=[
            types.TextContent(text=blob),
            types.ImageContent(data=image, mime_type="image/png"),
            types.EmbeddedResource(resource=types.BlobResourceContents(uri="file:///big.bin", blob=image)),
        ]
    )
    fake = FakeBackend("big", result_for={"echo": big})
    async with routed(fake) as (client, _, _):
        result = await call(client, "big__echo")
        assert result.meta == {mr.ROUTER_META_KEY: "big"}  # which backend answered, under the router's own key
        assert result.model_dump(exclude={"meta"}) == big.model_dump(exclude={"meta"})


async def test_instructions_of_backends_are_combined_under_their_namespace() -> None:
    fake = rich_backend()
    async with routed(fake) as (_, router, _):
        assert router.catalogue.instructions == "## rich\nUse rich tools wisely."


async def test_list_cache_hints_are_the_shortest_of_the_backends_and_the_routers_refresh() -> None:
    fakes = [FakeBackend("a"), FakeBackend("b"), FakeBackend("c", prompts=[types.Prompt(name="p")])]
    # handshake era: hints only where the wire adds them (a 2026-era SDK server hints ttlMs 0 on every list)
    routing = {"capability_cache_ttl_seconds": 60, "backend_eras": "handshake"}
    config = config_for("a", "b", "c", settings={"routing": routing})
    connectors = {
        "a": InProcess(fakes[0]),
        "b": HintingInProcess(fakes[1], 5000, "public", lists=("tools",)),
        "c": HintingInProcess(fakes[2], 90000, "private"),
    }
    router = mr.Router(config, connectors=connectors)
    async with router.running(), Client(mr.build_server(router), cache=None) as client:
        await router.wait_ready()
        tools = await client.list_tools()
        assert (tools.ttl_ms, tools.cache_scope) == (5000, "private")  # b's 5 s; c's lists are private
        prompts = await client.list_prompts()
        assert (prompts.ttl_ms, prompts.cache_scope) == (60000, "private")  # c's 90 s is longer than the router's 60 s
        resources = await client.list_resources()  # no backend sent hints for resources
        assert (resources.ttl_ms, resources.cache_scope) == (60000, "public")
    assert mr.refresh_interval(router.backends["b"].listing, 60) == 5.0  # b is re-listed as often as it asks
    assert mr.refresh_interval(router.backends["a"].listing, 60) == 60
    assert mr.refresh_interval(router.backends["a"].listing, 0) is None  # only on list_changed


async def test_the_router_re_lists_a_2026_backend_as_often_as_its_cache_hints_ask() -> None:
    listed = [anyio.Event()]  # one per listing the router asks for

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        listed[-1].set()
        return types.ListToolsResult(tools=[types.Tool(name="t", input_schema={"type": "object"})])

    connector = InProcess(FakeBackend("hinting"))
    hints: dict[Any, CacheHint] = {"tools/list": CacheHint(ttl_ms=5000, scope="public")}
    connector.server = Server("hinting", on_list_tools=list_tools, cache_hints=hints)
    clock = FakeClock()
    config = config_for("hinting", settings={"routing": {"capability_cache_ttl_seconds": 60}}, **QUIET)
    router = mr.Router(config, connectors={"hinting": connector}, clock=clock.clock())
    with anyio.fail_after(10):
        async with router.running():
            await listed[0].wait()
            await router.wait_ready()
            await anyio.wait_all_tasks_blocked()
            listed.append(anyio.Event())
            clock.advance(4.9)
            await anyio.wait_all_tasks_blocked()
            assert not listed[1].is_set()  # not before the backend's 5 s are up
            clock.advance(0.1)
            await listed[1].wait()  # the backend's 5 s, not the router's 60 s


class Gated(InProcess):
    """An in-process backend that connects only once its gate opens."""

    def __init__(self, backend: FakeBackend) -> None:
        super().__init__(backend)
        self.gate = anyio.Event()

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[Any]:
        await self.gate.wait()
        async with super().__call__() as streams:
            yield streams


async def test_tool_order_and_cursors_are_the_same_whichever_backend_connects_first() -> None:
    """Two replicas with one config list the same tools in the same order with the same cursors."""

    async def pages(first: str, then: str) -> list[tuple[list[str], str | None]]:
        connectors = {n: Gated(FakeBackend(n, fillers=700)) for n in ("a", "b")}
        router = mr.Router(config_for("a", "b"), connectors=connectors)
        async with router.running(), Client(mr.build_server(router), cache=None) as client:
            with anyio.fail_after(10):
                for name in (first, then):
                    connectors[name].gate.set()
                    await router.backends[name].first_attempt_done.wait()
            got, cursor = [], None
            while True:
                result = await client.list_tools(cursor=cursor)
                got.append(([t.name for t in result.tools], result.next_cursor))
                if (cursor := result.next_cursor) is None:
                    return got

    assert await pages("a", "b") == await pages("b", "a")


# ---------------------------------------------------------------------------- protocol fidelity


async def test_progress_reaches_the_client_in_order(mode: str = "legacy") -> None:
    """In process only the handshake era carries progress tokens; the end-to-end tests cover 2026-07-28."""
    fake = FakeBackend("svc")
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with routed(fake, mode=mode) as (client, _, _):
        result = await client.session.send_request(
            types.CallToolRequest(params=types.CallToolRequestParams(name="svc__progress", arguments={})),
            types.CallToolResult,
            progress_callback=on_progress,
        )
    assert text_of(result) == "svc:progress:"
    assert seen == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_client_cancel_cancels_the_backend_call(mode: str) -> None:
    fake = FakeBackend("svc")
    async with routed(fake, mode=mode) as (client, _, _):
        with anyio.move_on_after(0.2):  # the client gives up: the SDK cancels the request
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, client, "svc__hang")
                await fake.hang_started.wait()
                tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await fake.cancelled.wait()
        assert text_of(await call(client, "svc__echo", {"text": "after"})) == "svc:echo:after"


async def test_a_backends_new_tool_reaches_a_connected_client() -> None:
    fake = FakeBackend("svc")
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with (
        routed(fake, era="handshake") as (_, router, _),
        Client(mr.build_server(router), mode="legacy", cache=None, message_handler=on_message) as client,
    ):
        assert client.server_capabilities.tools and client.server_capabilities.tools.list_changed
        await client.list_tools()
        await call(client, "svc__add_tool", {"text": "brand_new"})
        with anyio.fail_after(1):
            await changed.wait()
        assert "svc__brand_new" in {t.name for t in (await client.list_tools()).tools}


async def test_resource_updates_reach_only_subscribed_clients() -> None:
    fake = rich_backend("res")
    updates: dict[str, list[str]] = {"a": [], "b": []}
    a_updated = anyio.Event()

    def handler(who: str) -> Any:
        async def on_message(message: Any) -> None:
            if isinstance(message, types.ResourceUpdatedNotification):
                updates[who].append(str(message.params.uri))
                if who == "a":
                    a_updated.set()

        return on_message

    async with routed(fake, era="handshake") as (_, router, _):
        server = mr.build_server(router)
        async with (
            Client(server, mode="legacy", cache=None, message_handler=handler("a")) as a,
            Client(server, mode="legacy", cache=None, message_handler=handler("b")) as b,
        ):
            await a.list_tools()
            await b.list_tools()
            await a.subscribe_resource("file:///a.txt")
            assert fake.subscribed == ["file:///a.txt"]
            await call(b, "res__touch", {"text": "file:///a.txt"})
            with anyio.fail_after(1):
                await a_updated.wait()
            await a.unsubscribe_resource("file:///a.txt")
            assert fake.subscribed == []
    assert updates == {"a": ["file:///a.txt"], "b": []}


async def _sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    block = params.messages[0].content
    assert isinstance(block, types.TextContent)
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(text=block.text.upper()), model="fake-llm"
    )


async def _elicitation(context: Any, params: Any) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"name": "Ada"})


async def _roots(context: Any) -> types.ListRootsResult:
    return types.ListRootsResult(roots=[types.Root.model_validate({"uri": "file:///work"})])


ASKING_CLIENT: dict[str, Any] = {
    "sampling_callback": _sampling,
    "elicitation_callback": _elicitation,
    "list_roots_callback": _roots,
}
INTERVIEW = types.Tool(name="interview", input_schema={"type": "object"})


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_sampling_elicitation_and_roots_round_trip_to_the_calling_client_in_either_era(mode: str) -> None:
    """A 2026-07-28 client (mode auto) gets input_required rounds for what a handshake-era backend asks, and the
    same answers as a 2025-11-25 client, which gets the backend's requests as requests."""
    fake = FakeBackend("svc", extra_tools=[INTERVIEW])
    async with (
        routed(fake, era="handshake") as (_, router, _),
        Client(mr.build_server(router), mode=mode, cache=None, **ASKING_CLIENT) as client,
    ):
        assert (client.protocol_version in mr.MODERN_PROTOCOL_VERSIONS) == (mode == "auto")
        assert text_of(await client.call_tool("svc__sample", {"text": "hi"})) == "sampled:HI"
        assert text_of(await client.call_tool("svc__elicit")) == "elicited:accept:{'name': 'Ada'}"
        assert text_of(await client.call_tool("svc__roots")) == "roots:file:///work"
        assert text_of(await client.call_tool("svc__interview")) == "interview:Ada:GREET ADA"  # two rounds in one call
        assert text_of(await client.call_tool("svc__echo", {"text": "plain"})) == "svc:echo:plain"


async def test_a_2026_client_sees_each_input_round_and_a_used_or_forged_request_state_is_refused() -> None:
    fake = FakeBackend("svc", extra_tools=[INTERVIEW])
    async with (
        routed(fake, era="handshake") as (_, router, _),
        Client(mr.build_server(router), cache=None, **ASKING_CLIENT) as client,
    ):
        first = await client.session.call_tool("svc__interview", {}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult) and first.request_state
        assert [r.method for r in (first.input_requests or {}).values()] == ["elicitation/create"]
        key = next(iter(first.input_requests or {}))
        answer: types.InputResponses = {key: types.ElicitResult(action="accept", content={"name": "Bo"})}
        second = await client.session.call_tool(
            "svc__interview", {}, input_responses=answer, request_state=first.request_state, allow_input_required=True
        )
        assert isinstance(second, types.InputRequiredResult)
        assert [r.method for r in (second.input_requests or {}).values()] == ["sampling/createMessage"]
        for stale in (first.request_state, first.request_state[:-4] + "AAAA", "v1.forged"):
            with pytest.raises(MCPError) as info:  # an answered round, a tampered and a made-up state
                await client.session.call_tool(
                    "svc__interview", {}, input_responses=answer, request_state=stale, allow_input_required=True
                )
            assert (info.value.code, info.value.message) == (types.INVALID_PARAMS, "Invalid or expired requestState")
        key = next(iter(second.input_requests or {}))
        sampled: types.InputResponses = {
            key: types.CreateMessageResult(role="assistant", content=types.TextContent(text="hello Bo"), model="m")
        }
        done = await client.session.call_tool(
            "svc__interview", {}, input_responses=sampled, request_state=second.request_state, allow_input_required=True
        )
        assert isinstance(done, types.CallToolResult) and text_of(done) == "interview:Bo:hello Bo"


async def test_a_parked_call_never_resumed_is_cancelled_at_the_backend_and_its_state_refused() -> None:
    fake = FakeBackend("svc")
    async with routed(fake, era="handshake", clock=FakeClock(autojump=True), settings=no_refresh(), **QUIET) as (
        _,
        router,
        _,
    ):
        server = mr.build_server(router)
        async with Client(server, cache=None, **ASKING_CLIENT) as client:
            first = await client.session.call_tool("svc__sample", {"text": "hi"}, allow_input_required=True)
            assert isinstance(first, types.InputRequiredResult)
            with anyio.fail_after(5):  # the clock jumps: the request timeout passes at once
                await fake.cancelled.wait()
            assert server.bridge is not None and server.bridge.parked == {}  # released
            key = next(iter(first.input_requests or {}))
            answer: types.InputResponses = {
                key: types.CreateMessageResult(role="assistant", content=types.TextContent(text="late"), model="m")
            }
            with pytest.raises(MCPError) as info:
                await client.session.call_tool(
                    "svc__sample", {"text": "hi"}, input_responses=answer, request_state=first.request_state
                )
            assert info.value.message == "Invalid or expired requestState"
            assert text_of(await client.call_tool("svc__echo", {"text": "still"})) == "svc:echo:still"


async def test_a_client_without_the_capability_gets_a_clear_error_in_either_era() -> None:
    fake = FakeBackend("svc")
    async with (
        routed(fake, era="handshake") as (bare, router, _),
        Client(mr.build_server(router), cache=None) as modern,
    ):
        for client in (bare, modern):
            with pytest.raises(MCPError) as info:  # a clear error, not a hang
                await client.call_tool("svc__sample", {"text": "hi"})
            assert "does not support sampling" in info.value.message


async def test_a_2026_era_backend_asking_through_its_session_gets_the_fix_named_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An SDK 2.x server whose tool samples through `ctx.session` cannot in the 2026 era; the log says what to do."""
    async with (
        routed(FakeBackend("svc")) as (_, router, _),
        Client(mr.build_server(router), mode="legacy", cache=None, **ASKING_CLIENT) as client,
    ):
        with caplog.at_level("WARNING", logger="mcp_router"):
            for _ in range(2):
                with pytest.raises(MCPError) as info:
                    await call(client, "svc__sample", {"text": "hi"})
                assert "back-channel" in info.value.message
    told = [r.getMessage() for r in caplog.records if "era: handshake" in r.getMessage()]
    assert told == [
        "backend svc: sample asked the client through its session, which the 2026 era cannot carry; "
        "give the backend `era: handshake` in the config"
    ]  # once


def test_only_what_the_client_declared_is_asked_of_it() -> None:
    form_only = types.ClientCapabilities(elicitation=types.ElicitationCapability(), sampling=types.SamplingCapability())
    url = types.ElicitRequest(
        params=types.ElicitRequestURLParams(message="Pay", url="https://example.com/pay", elicitation_id="e1")
    )
    form = types.ElicitRequest(
        params=types.ElicitRequestFormParams(message="Who?", requested_schema={"type": "object"})
    )
    message = types.SamplingMessage(role="user", content=types.TextContent(text="hi"))
    with_tools = types.CreateMessageRequest(
        params=types.CreateMessageRequestParams(
            messages=[message], max_tokens=5, tools=[types.Tool(name="t", input_schema={"type": "object"})]
        )
    )
    assert mr.missing_capability(form_only, "elicitation", form) is None
    assert mr.missing_capability(form_only, "elicitation", url) == "URL-mode elicitation"
    assert mr.missing_capability(form_only, "sampling", with_tools) == "sampling with tools"
    assert mr.missing_capability(form_only, "roots", types.ListRootsRequest()) == "roots"
    assert mr.missing_capability(None, "sampling", with_tools) == "sampling"


async def test_roots_changes_of_a_client_reach_the_backends() -> None:
    fake = FakeBackend("svc")
    async with (
        routed(fake, era="handshake") as (_, router, _),
        Client(mr.build_server(router), mode="legacy", cache=None, **ASKING_CLIENT) as client,
    ):
        await client.send_roots_list_changed()
        with anyio.fail_after(1):
            await fake.roots_changed.wait()


def native_asking_server(name: str) -> Server[Any]:
    """A 2026-native backend: its `ask` tool answers input_required (an elicitation) and completes on the retry."""
    tools = [types.Tool(name="ask", input_schema={"type": "object"})]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        ctx: Any, params: types.CallToolRequestParams
    ) -> types.CallToolResult | types.InputRequiredResult:
        answer = (params.input_responses or {}).get("who")
        if params.request_state != "asked-once" or not isinstance(answer, types.ElicitResult):
            schema = {"type": "object", "properties": {"name": {"type": "string"}}}
            who = types.ElicitRequest(params=types.ElicitRequestFormParams(message="Who?", requested_schema=schema))
            return types.InputRequiredResult(input_requests={"who": who}, request_state="asked-once")
        return types.CallToolResult(content=[types.TextContent(text=f"asked:{(answer.content or {}).get('name')}")])

    return Server(name, on_list_tools=list_tools, on_call_tool=call_tool)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_2026_backends_input_rounds_reach_a_client_of_either_era(mode: str) -> None:
    """A 2025-11-25 client gets a 2026-era backend's input requests as ordinary server requests; a 2026-07-28
    client gets its rounds as they are, with the backend's own requestState carried back to it."""
    connector = InProcess(FakeBackend("native"))
    connector.server = native_asking_server("native")
    router = mr.Router(config_for("native"), connectors={"native": connector}, backend_eras="auto")
    async with router.running(), Client(mr.build_server(router), mode=mode, cache=None, **ASKING_CLIENT) as client:
        await router.wait_ready()
        assert router.backends["native"].status()["protocol_version"] == "2026-07-28"
        assert text_of(await client.call_tool("native__ask")) == "asked:Ada"


class Person(BaseModel):
    name: str


def ask_name() -> Elicit[Person]:
    return Elicit("Who?", Person)


def ask_greeting(person: Annotated[Person, Resolve(ask_name)]) -> Sample:
    return Sample(
        [types.SamplingMessage(role="user", content=types.TextContent(text=f"greet {person.name}"))], max_tokens=9
    )


def ask_roots() -> ListRoots:
    return ListRoots()


def interviewing_server() -> Server[Any]:
    """A 2026-native backend written with the SDK's multi-round-trip API: its `interview` tool elicits a name and asks
    for roots (one round), then samples a greeting for that name (a second round)."""
    server = MCPServer("mrtr")

    @server.tool()
    def interview(
        person: Annotated[Person, Resolve(ask_name)],
        greeting: Annotated[types.CreateMessageResult, Resolve(ask_greeting)],
        roots: Annotated[types.ListRootsResult, Resolve(ask_roots)],
    ) -> str:
        assert isinstance(greeting.content, types.TextContent)
        return f"{person.name}:{greeting.content.text}:{','.join(str(r.uri) for r in roots.roots)}"

    return server._lowlevel_server


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_2026_backend_using_the_sdks_input_rounds_serves_a_client_of_either_era(mode: str) -> None:
    """Its two rounds reach a 2025-11-25 client as ordinary server requests (and the call is retried with the
    answers), a 2026-07-28 client as input_required rounds; both get the answer a direct client gets."""
    connector = InProcess(FakeBackend("mrtr"))
    connector.server = interviewing_server()
    router = mr.Router(config_for("mrtr"), connectors={"mrtr": connector})  # the default era: auto
    async with (
        router.running(),
        Client(interviewing_server(), mode=mode, cache=None, **ASKING_CLIENT) as direct,
        Client(mr.build_server(router), mode=mode, cache=None, **ASKING_CLIENT) as client,
    ):
        await router.wait_ready()
        assert router.backends["mrtr"].status()["era"] == "2026"
        assert text_of(await client.call_tool("mrtr__interview")) == "Ada:GREET ADA:file:///work"
        assert text_of(await direct.call_tool("interview")) == "Ada:GREET ADA:file:///work"


async def test_each_input_round_of_a_2026_client_goes_back_to_the_replica_that_asked() -> None:
    """Replicas keep their rounds' requestState to themselves (each SDK server seals it with its own key): a 2026-07-28
    client's retry is routed to the replica whose round it answers, not wherever the strategy's turn points."""
    connectors = {name: InProcess(FakeBackend(name)) for name in ("one", "two")}
    for connector in connectors.values():
        connector.server = interviewing_server()
    router = mr.Router(config_for("one", "two", namespace="mrtr"), connectors=connectors)
    async with router.running(), Client(mr.build_server(router), cache=None, **ASKING_CLIENT) as client:
        await router.wait_ready()
        for _ in range(3):  # the turns go round: one, two, one
            assert text_of(await client.call_tool("mrtr__interview")) == "Ada:GREET ADA:file:///work"


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_2026_backend_hears_only_the_capabilities_the_calling_client_declared(mode: str) -> None:
    """The request `_meta` carries the client's capabilities (those the router relays), not the router's own: a
    backend asking for what the client lacks gets the spec's missing-capability error, which the client sees."""
    seen: list[dict[str, Any]] = []

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        seen.append(_capabilities(ctx))
        return types.ListToolsResult(tools=[types.Tool(name="caps", input_schema={"type": "object"})])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        return types.CallToolResult(content=[types.TextContent(text=json.dumps(_capabilities(ctx), sort_keys=True))])

    connector = InProcess(FakeBackend("native"))
    connector.server = Server("native", on_list_tools=list_tools, on_call_tool=call_tool)
    mrtr = InProcess(FakeBackend("mrtr"))
    mrtr.server = interviewing_server()
    router = mr.Router(config_for("native", "mrtr"), connectors={"native": connector, "mrtr": mrtr})
    elicits_only: dict[str, Any] = {"elicitation_callback": _elicitation, "list_roots_callback": _roots}
    async with (
        router.running(),
        Client(mr.build_server(router), mode=mode, cache=None, **elicits_only) as client,
    ):
        await router.wait_ready()
        declared = json.loads(text_of(await client.call_tool("native__caps")))
        assert declared == {"elicitation": {"form": {}, "url": {}}, "roots": {"listChanged": True}}  # no sampling
        with pytest.raises(MCPError) as info:
            await client.call_tool("mrtr__interview")
        assert info.value.code == types.MISSING_REQUIRED_CLIENT_CAPABILITY
    assert seen and all(caps == {} for caps in seen)  # the router's own listing: no client, no capabilities


def _capabilities(ctx: Any) -> dict[str, Any]:
    declared = ctx.session.client_capabilities
    return declared.model_dump(by_alias=True, mode="json", exclude_none=True) if declared is not None else {}


async def test_a_2026_backends_list_changes_reach_a_client_through_its_listen_stream() -> None:
    bus = InMemorySubscriptionBus()
    tools = [types.Tool(name="grow", input_schema={"type": "object"})]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        tools.append(types.Tool(name="grown", input_schema={"type": "object"}))
        await bus.publish(ToolsListChanged())
        return types.CallToolResult(content=[types.TextContent(text="grew")])

    connector = InProcess(FakeBackend("native"))
    connector.server = Server(
        "native", on_list_tools=list_tools, on_call_tool=call_tool, on_subscriptions_listen=ListenHandler(bus)
    )
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    router = mr.Router(config_for("native"), connectors={"native": connector}, backend_eras="auto")
    async with (
        router.running(),
        Client(mr.build_server(router), mode="legacy", cache=None, message_handler=on_message) as client,
    ):
        await router.wait_ready()
        await client.list_tools()
        assert text_of(await client.call_tool("native__grow")) == "grew"
        with anyio.fail_after(5):
            await changed.wait()
        assert "native__grown" in {t.name for t in (await client.list_tools()).tools}


async def test_a_2026_backends_change_stream_that_ends_while_connected_is_opened_again() -> None:
    """A listen stream may end while the connection lasts (the backend closes it gracefully, a proxy cuts it): the
    router opens another and re-lists, so later changes, and one made in between, are still heard."""
    bus = InMemorySubscriptionBus()
    listens = ListenHandler(bus)
    tools = [types.Tool(name="grow", input_schema={"type": "object"})]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        listens.close()  # every open stream ends, gracefully; the connection stays
        tools.append(types.Tool(name=f"grown{len(tools)}", input_schema={"type": "object"}))
        await bus.publish(ToolsListChanged())
        return types.CallToolResult(content=[types.TextContent(text="grew")])

    connector = InProcess(FakeBackend("native"))
    connector.server = Server(
        "native", on_list_tools=list_tools, on_call_tool=call_tool, on_subscriptions_listen=listens
    )
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    config = config_for("native", settings=no_refresh(), **QUIET)
    router = mr.Router(config, connectors={"native": connector}, clock=FakeClock(autojump=True).clock())
    async with (
        router.running(),
        Client(mr.build_server(router), mode="legacy", cache=None, message_handler=on_message) as client,
    ):
        await router.wait_ready()
        for grown in ("native__grown1", "native__grown2"):  # the second change comes on the stream opened again
            changed = anyio.Event()
            assert text_of(await client.call_tool("native__grow")) == "grew"
            with anyio.fail_after(5):
                await changed.wait()
            assert grown in {t.name for t in (await client.list_tools()).tools}
    assert connector.connects == 1


async def test_updates_of_a_2026_backends_resources_reach_the_clients_following_them_in_either_era() -> None:
    """A 2026-era backend has no resources/subscribe: what clients follow (a handshake-era client's subscribe, a
    2026 client's listen with resource URIs) goes on the router's listen stream to it, and its updates come back."""
    bus = InMemorySubscriptionBus()
    files = [types.Resource(uri=f"file:///{n}.txt", name=n) for n in ("a", "b")]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name="touch", input_schema={"type": "object"})])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        await bus.publish(ResourceUpdated(uri=(params.arguments or {})["uri"]))
        return types.CallToolResult(content=[types.TextContent(text="touched")])

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=files)

    connector = InProcess(FakeBackend("native"))
    connector.server = Server(
        "native",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_subscriptions_listen=ListenHandler(bus),
    )
    heard: list[str] = []
    updated = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            heard.append(str(message.params.uri))
            updated.set()

    router = mr.Router(config_for("native"), connectors={"native": connector})
    async with router.running():
        await router.wait_ready()
        server = mr.build_server(router)
        async with (
            Client(server, mode="legacy", cache=None, message_handler=on_message) as old,
            Client(server, cache=None) as new,
        ):
            async with new.listen(resource_subscriptions=["file:///a.txt"]) as events:
                assert list(router.backends["native"].changes.uris) == ["file:///a.txt"]  # asked of the backend
                await old.subscribe_resource("file:///a.txt")
                await old.call_tool("native__touch", {"uri": "file:///b.txt"})  # followed by nobody
                await old.call_tool("native__touch", {"uri": "file:///a.txt"})
                with anyio.fail_after(5):
                    assert await anext(events) == ResourceUpdated(uri="file:///a.txt")
                    await updated.wait()
            assert heard == ["file:///a.txt"]
            assert list(router.backends["native"].changes.uris) == ["file:///a.txt"]
            connector.cut()  # the backend restarts: the new connection's stream asks for what is still followed
            await until(router, lambda: connector.connects == 2 and router.backends["native"].state == "ready")
            updated = anyio.Event()
            await old.call_tool("native__touch", {"uri": "file:///a.txt"})
            with anyio.fail_after(5):
                await updated.wait()
            await old.unsubscribe_resource("file:///a.txt")
            assert list(router.backends["native"].changes.uris) == []  # the stream no longer asks for it


def resource_server(name: str, bus: InMemorySubscriptionBus, listen: Callable[..., Any]) -> Server[Any]:
    """A 2026-era backend with one resource, a tool that adds a tool (announced on `bus`), and `listen` streams."""
    tools = [types.Tool(name="grow", input_schema={"type": "object"})]

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        tools.append(types.Tool(name=f"grown{len(tools)}", input_schema={"type": "object"}))
        await bus.publish(ToolsListChanged())
        return types.CallToolResult(content=[types.TextContent(text="grew")])

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[types.Resource(uri="file:///a.txt", name="a")])

    return Server(
        name,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_subscriptions_listen=listen,
    )


async def test_a_2026_backend_refusing_to_re_open_its_stream_keeps_the_old_one_and_the_subscriber_hears_why() -> None:
    """Following a resource re-opens a 2026-era backend's change stream; one that allows a single stream refuses the
    new one: the old one goes on (its list changes still arrive) and the subscribe fails with the backend's reason."""
    bus = InMemorySubscriptionBus()
    connector = InProcess(FakeBackend("native"))
    connector.server = resource_server("native", bus, ListenHandler(bus, max_subscriptions=1))
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    router = mr.Router(config_for("native", **QUIET), connectors={"native": connector})
    async with (
        router.running(),
        Client(mr.build_server(router), mode="legacy", cache=None, message_handler=on_message) as client,
    ):
        await router.wait_ready()
        await client.list_tools()
        with pytest.raises(MCPError, match=re.escape("could not follow 'file:///a.txt': Subscription limit reached")):
            await client.subscribe_resource("file:///a.txt")
        assert list(router.backends["native"].changes.uris) == []
        assert text_of(await client.call_tool("native__grow")) == "grew"
        with anyio.fail_after(5):
            await changed.wait()  # heard on the old stream
        assert "native__grown1" in {t.name for t in (await client.list_tools()).tools}


async def test_a_2026_clients_listen_is_acknowledged_before_the_backend_follows_its_resources() -> None:
    """The router acknowledges a listen naming resources at once; the backend's stream takes them meanwhile (here it
    withholds its acknowledgement until the test lets it), and a subscribe of the same resource waits for it."""
    bus = InMemorySubscriptionBus()
    inner, gate = ListenHandler(bus), anyio.Event()

    async def withheld(ctx: Any, params: types.SubscriptionsListenRequestParams) -> Any:
        if params.notifications.resource_subscriptions:
            await gate.wait()
        return await inner(ctx, params)

    connector = InProcess(FakeBackend("native"))
    connector.server = resource_server("native", bus, withheld)
    router = mr.Router(config_for("native", timeout=120, **QUIET), connectors={"native": connector})
    async with router.running():
        await router.wait_ready()
        server = mr.build_server(router)
        async with Client(server, cache=None) as new, Client(server, mode="legacy", cache=None) as old:
            with anyio.fail_after(10):
                async with new.listen(resource_subscriptions=["file:///a.txt"]) as events:
                    gate.set()
                    await old.subscribe_resource("file:///a.txt")  # answered once the backend's stream carries it
                    await bus.publish(ResourceUpdated(uri="file:///a.txt"))
                    assert await anext(events) == ResourceUpdated(uri="file:///a.txt")


async def test_following_a_2026_backends_resource_is_no_trial_of_its_half_open_breaker() -> None:
    clock = FakeClock()
    async with routed(rich_backend("res"), clock=clock, circuit_breaker={"failure_threshold": 1}, **QUIET) as (
        client,
        router,
        _,
    ):
        breaker = router.backends["res"].breaker
        breaker.record_failure("the connection broke")
        clock.advance(breaker.reset_timeout)
        assert breaker.state == "half_open"
        await client.subscribe_resource("file:///a.txt")
        assert text_of(await call(client, "res__echo", {"text": "trial"})) == "res:echo:trial"  # the trial, admitted
        assert breaker.state == "closed"


@pytest.mark.parametrize("era", ["handshake", "auto"])
async def test_an_unsubscribe_goes_to_the_replica_that_took_the_subscribe(era: str) -> None:
    first, second = rich_backend("first"), rich_backend("second")
    async with routed(first, second, namespace="svc", era=era, **QUIET) as (client, router, _):
        await client.subscribe_resource("file:///a.txt")
        await client.unsubscribe_resource("file:///a.txt")
        await client.subscribe_resource("file:///a.txt")
        await client.unsubscribe_resource("file:///a.txt")
        assert (first.subscribed, second.subscribed) == ([], [])
        assert all(not b.changes.uris for b in router.backends.values())


async def test_a_backends_roots_request_before_any_client_with_roots_gets_an_empty_list() -> None:
    async def roots(context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root.model_validate({"uri": "file:///work"})])

    async with routed(FakeBackend("svc")) as (_client_without_roots, router, _):
        backend = router.backends["svc"]
        asked = await router.ask_client(backend, "roots", types.ListRootsRequest(), types.ListRootsResult)
        assert asked == types.ListRootsResult(roots=[])
        async with Client(mr.build_server(router), mode="legacy", cache=None, list_roots_callback=roots) as client:
            await client.list_tools()  # the handshake is over: the router knows the client
            asked = await router.ask_client(backend, "roots", types.ListRootsRequest(), types.ListRootsResult)
            assert [str(r.uri) for r in asked.roots] == ["file:///work"]


async def test_debug_log_has_one_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    async with routed(FakeBackend("svc")) as (client, _, _):
        with caplog.at_level("DEBUG", logger="mcp_router"):
            await call(client, "svc__echo", {"text": "x"})
            await call(client, "svc__broken")
            with pytest.raises(MCPError):
                await call(client, "svc__fail")
    lines = [
        re.sub(r"in [\d.]+ ms", "in N ms", r.getMessage())
        for r in caplog.records
        if r.getMessage().startswith("tools/call")
    ]
    assert lines == [
        "tools/call echo -> svc: ok in N ms",  # Router._account: the backend's own name of the tool
        "tools/call broken -> svc: tool error in N ms",
        "tools/call fail -> svc: the fake refuses in N ms",
    ]


async def test_a_backend_still_starting_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    router = mr.Router(
        config_for("slow", "quick"),
        connectors={"slow": InProcess(FakeBackend("slow")), "quick": InProcess(FakeBackend("quick"))},
    )
    router.backends["slow"].connector.stall = anyio.Event()  # type: ignore[attr-defined]
    with anyio.fail_after(10), caplog.at_level("INFO", logger="mcp_router"):
        async with router.running():
            await router.backends["quick"].first_attempt_done.wait()
            await mr.note_slow_starts(router, after=0)
            router.backends["slow"].connector.stall.set()  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")] == [
        "waiting for backend slow, 0 s"
    ]


class LogRecorder:
    """A client's logging_callback: keeps (level, logger, data), and says when a message with `data` has come."""

    def __init__(self) -> None:
        self.logs: list[tuple[str, str | None, Any]] = []
        self._came: dict[Any, anyio.Event] = {}

    async def __call__(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append((params.level, params.logger, params.data))
        self._came.setdefault(params.data, anyio.Event()).set()

    async def wait_for(self, data: Any) -> None:
        with anyio.fail_after(5):
            await self._came.setdefault(data, anyio.Event()).wait()


SVC_LOGS: Final = [("debug", "svc/fake", "debug from svc"), ("info", "svc/fake", "info from svc")]
SVC_LOGS.append(("warning", "svc/fake", "warning from svc"))


async def test_log_level_reaches_backends_and_their_logs_reach_the_client_tagged() -> None:
    fake = FakeBackend("svc")
    recorder = LogRecorder()
    async with (
        routed(fake, era="handshake") as (_, router, _),
        Client(mr.build_server(router), mode="legacy", cache=None, logging_callback=recorder) as client,
    ):
        await client.set_logging_level("info")
        assert fake.log_levels == ["info"]
        await call(client, "svc__log")
        await recorder.wait_for("warning from svc")
    assert recorder.logs == SVC_LOGS[1:]


async def test_a_log_level_the_backend_failed_to_set_is_asked_again() -> None:
    fake = FakeBackend("svc", refused_levels=1)
    async with routed(fake, era="handshake") as (client, _, _):
        await client.set_logging_level("info")
        assert fake.log_levels == []
        await client.set_logging_level("info")
        assert fake.log_levels == ["info"]


@pytest.mark.parametrize("backend_eras", ["handshake", "auto"])
async def test_a_2026_client_gets_its_calls_logs_at_the_level_its_request_asked_for_and_none_unasked(
    backend_eras: str,
) -> None:
    """The level travels in each request's `_meta`; a handshake-era backend is set once to the most verbose level
    asked for, and each request still gets only what it asked for. The result comes after its log messages."""
    fake = FakeBackend("svc")
    levels: tuple[types.LoggingLevel | None, ...] = ("warning", "debug", "info", None)
    asked = {level: LogRecorder() for level in levels}
    async with routed(fake, backend_eras=backend_eras) as (_, router, _):
        for level, recorder in asked.items():
            async with Client(mr.build_server(router), cache=None, log_level=level, logging_callback=recorder) as c:
                assert c.protocol_version in mr.MODERN_PROTOCOL_VERSIONS
                assert text_of(await call(c, "svc__log")) == "svc:log:"
    assert asked["warning"].logs == SVC_LOGS[2:]
    assert asked["debug"].logs == SVC_LOGS
    assert asked["info"].logs == SVC_LOGS[1:]  # the backend logs debug now, and this request did not ask for it
    assert asked[None].logs == []
    assert fake.log_levels == ([] if backend_eras == "auto" else ["warning", "debug"])  # 2026: no logging/setLevel


async def test_backend_logs_of_no_request_reach_only_handshake_era_clients_that_set_a_level() -> None:
    """And a 2026-era request's log messages reach that request only."""
    fake = FakeBackend("svc")
    loud, quiet, modern = LogRecorder(), LogRecorder(), LogRecorder()
    async with (
        routed(fake, era="handshake") as (_, router, _),
        Client(mr.build_server(router), mode="legacy", cache=None, logging_callback=loud) as loud_client,
        Client(mr.build_server(router), mode="legacy", cache=None, logging_callback=quiet),
        Client(mr.build_server(router), cache=None, log_level="info", logging_callback=modern) as modern_client,
    ):
        await loud_client.set_logging_level("info")
        await call(modern_client, "svc__log")
        assert modern.logs == SVC_LOGS[1:]
        await fake.log_session.send_log_message("warning", "of no request", logger="fake")
        await loud.wait_for("of no request")
        assert text_of(await call(modern_client, "svc__echo", {"text": "after"})) == "svc:echo:after"
    assert loud.logs == [("warning", "svc/fake", "of no request")]  # queued in order: the call's would come first
    assert quiet.logs == []  # set no level
    assert modern.logs == SVC_LOGS[1:]  # nothing outside its own call


class StalledClient:
    """The router's view of a client connection that takes nothing until `reading` is set: a slow reader."""

    def __init__(self) -> None:
        self.exit_stack = contextlib.ExitStack()
        self.session_id = None  # not an HTTP session
        self.reading = anyio.Event()
        self.received: list[tuple[str, Any]] = []

    async def notify(self, method: str, params: Any) -> None:
        await self.reading.wait()
        self.received.append((method, params["data"]))

    async def send_tool_list_changed(self) -> None:
        await self.reading.wait()
        self.received.append(("tools/list_changed", None))


async def test_a_stdio_backends_log_lines_asked_for_by_a_2026_request_are_not_shed() -> None:
    """The router drops a stdio backend's log lines nobody asked for before it parses them (see the next test)."""
    config = mr.parse_config({"backends": [{"name": "svc", **fake_backend_command()}]}, {})
    router = mr.Router(config)
    recorder = LogRecorder()
    with anyio.fail_after(20):
        async with (
            router.running(),
            Client(mr.build_server(router), cache=None, log_level="info", logging_callback=recorder) as client,
        ):
            assert text_of(await call(client, "svc__log")) == "fake:log:"
    assert recorder.logs == [("info", "svc/fake", "info from fake"), ("warning", "svc/fake", "warning from fake")]


async def test_a_backend_flooding_logs_gets_a_budget_and_the_rest_is_dropped_before_it_costs_anything(
    tmp_path: Path,
) -> None:
    config = mr.parse_config(
        {"backends": [{"name": "flood", "command": sys.executable, "args": ["-c", FLOOD_BACKEND]}]}, {}
    )
    clock = FakeClock()  # time stands still: the budget's burst is all that passes
    router = mr.Router(config, clock=clock.clock())
    received: list[Any] = []
    all_in = anyio.Event()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        received.append(params.data)
        if len(received) == mr.LOG_MESSAGES_PER_SECOND:
            all_in.set()

    with anyio.fail_after(20):
        async with (
            router.running(),
            Client(mr.build_server(router), mode="legacy", cache=None, logging_callback=on_log) as client,
        ):
            await client.set_logging_level("info")
            assert (
                text_of(await call(client, "flood__flood", {"count": 5000, "fifo": str(tmp_path / "done")}))
                == "flooded"
            )
            assert (
                router.clients.dropped == 5000 - mr.LOG_MESSAGES_PER_SECOND
            )  # shed as they were read, before the result
            await all_in.wait()
            assert [line.split()[1] for line in received] == [
                str(i) for i in range(mr.LOG_MESSAGES_PER_SECOND)
            ]  # the first, in order
            assert (await call(client, "list_backends")).structured_content["clients"]["dropped_log_messages"] == 4800


class PauseWatch:
    """A read pipe's transport, with the number of lines dropped at each pause_reading."""

    def __init__(self, transport: asyncio.ReadTransport, dropped: list[int]) -> None:
        self.transport, self.dropped, self.paused_at = transport, dropped, list[int]()

    def pause_reading(self) -> None:
        self.paused_at.append(len(self.dropped))
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_closing(self) -> bool:
        return self.transport.is_closing()


async def test_a_flood_of_dropped_lines_waits_in_the_backends_pipe_and_the_next_message_still_arrives() -> None:
    """Past DROPPED_LINES_PER_SECOND the router stops reading the pipe for a while, so a backend flooding lines it
    drops unparsed is held back at its own pipe (not in the router's memory, not on its loop)."""
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader(limit=1 << 30)
    loop = asyncio.get_running_loop()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_read_pipe(lambda: protocol, os.fdopen(read_fd, "rb", buffering=0))
    dropped: list[int] = []
    watch = PauseWatch(cast(asyncio.ReadTransport, transport), dropped)
    lines = mr.LineReader(reader, transport=cast(Any, watch))

    def drops(line: bytes) -> bool:
        if line == b"drop\n":
            dropped.append(1)
            return True
        return False

    lines.skip = drops
    flood = mr.DROPPED_LINES_PER_SECOND + 4 * mr.DROPPED_BATCH

    def write() -> None:
        with os.fdopen(write_fd, "wb", buffering=0) as pipe:
            pipe.write(b"drop\n" * flood + b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')

    try:
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, write)
                message = await lines.receive()
        assert isinstance(message, SessionMessage) and isinstance(message.message, types.JSONRPCNotification)
        assert message.message.method == "notifications/initialized"
        assert len(dropped) == flood
        assert watch.paused_at and watch.paused_at[0] >= mr.DROPPED_LINES_PER_SECOND - mr.DROPPED_BATCH
    finally:
        transport.close()


async def test_a_slow_client_gets_bounded_logs_and_coalesced_changes_and_the_drops_are_counted() -> None:
    hub = mr.ClientHub(InMemorySubscriptionBus(), bound=3)
    slow, deaf, quiet = StalledClient(), StalledClient(), StalledClient()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for client in (slow, deaf, quiet):
                hub.add(client, tg)
            hub.set_log_level(slow, "info")
            hub.set_log_level(deaf, "info")
            await anyio.wait_all_tasks_blocked()
            for i in range(10):
                hub.log({"level": "info", "logger": "svc", "data": f"line {i}"})
                await anyio.wait_all_tasks_blocked()  # each sender has taken what it can
            hub.log({"level": "debug", "logger": "svc", "data": "below the level"})
            for _ in range(5):
                await hub.list_changed([("send_tool_list_changed", mr.ToolsListChanged)])
            assert hub.dropped == 2 * 6  # per client: one being sent, three queued, six dropped
            assert hub.status() == {"connected": 3, "dropped_log_messages": 12, "queue_bound": 3}

            deaf.exit_stack.close()  # the deaf client closes: forgotten at once, its sender stopped
            assert len(hub) == 2
            slow.reading.set()
            quiet.reading.set()
            await anyio.wait_all_tasks_blocked()
            tg.cancel_scope.cancel()
    assert slow.received == [
        ("notifications/message", "line 0"),
        ("tools/list_changed", None),  # five changes, one notification
        *(("notifications/message", f"line {i}") for i in (1, 2, 3)),
    ]
    assert quiet.received == [("tools/list_changed", None)] * 2  # one in flight, four coalesced; no level: no logs
    assert deaf.received == []


async def test_the_level_a_client_set_goes_with_its_own_requests_to_a_2026_era_backend() -> None:
    fake = FakeBackend("svc")
    recorder = LogRecorder()
    async with (
        routed(fake, backend_eras="auto") as (quiet, router, _),
        Client(mr.build_server(router), mode="legacy", cache=None, logging_callback=recorder) as client,
    ):
        assert router.backends["svc"].status()["protocol_version"] == "2026-07-28"
        await call(client, "svc__log")  # no level set yet: the backend sends none
        await client.set_logging_level("info")
        assert fake.log_levels == []  # no logging/setLevel in the 2026 era
        await call(quiet, "svc__log")  # a client that set no level: its request asks for none
        await call(client, "svc__log")
        await recorder.wait_for("warning from svc")
    assert recorder.logs == SVC_LOGS[1:]  # once: the quiet client's call sent none to anybody


async def test_both_protocol_eras_use_one_router_at_once() -> None:
    fake = FakeBackend("svc", instructions="Be kind to svc.")
    async with routed(fake) as (legacy, router, _), Client(mr.build_server(router), cache=None) as modern:
        assert modern.protocol_version in mr.MODERN_PROTOCOL_VERSIONS
        assert text_of(await call(modern, "svc__echo", {"text": "new"})) == "svc:echo:new"
        assert text_of(await call(legacy, "svc__echo", {"text": "old"})) == "svc:echo:old"
        assert modern.instructions == legacy.instructions == "## svc\nBe kind to svc."


# ---------------------------------------------------------------------------- errors


async def test_errors_are_clear_mcp_errors_and_the_router_keeps_serving() -> None:
    fake = FakeBackend("svc")
    async with routed(fake) as (client, _, _):
        with pytest.raises(MCPError) as info:
            await call(client, "svc__nope")
        assert info.value.code == types.INVALID_PARAMS and "Unknown tool: 'svc__nope'" in info.value.message
        with pytest.raises(MCPError) as info:
            await call(client, "svc__fail")
        assert (info.value.code, info.value.message, info.value.data) == (
            -32042,
            "the fake refuses",
            {"why": "asked to"},
        )
        broken = await call(client, "svc__broken")
        assert broken.is_error and text_of(broken) == "tool-level failure"
        with pytest.raises(MCPError) as info:
            await client.get_prompt("svc__missing")
        assert "Unknown prompt" in info.value.message
        with pytest.raises(MCPError):
            await client.read_resource("nowhere://x")
        assert text_of(await call(client, "svc__echo", {"text": "still here"})) == "svc:echo:still here"


async def test_a_request_that_cannot_be_written_goes_to_the_next_replica_whatever_the_tool() -> None:
    first, second = FakeBackend("first"), FakeBackend("second")
    settings = {"routing": {"default_strategy": "fallback"}}
    async with routed(first, second, namespace="svc", settings=settings) as (client, router, connectors):
        connectors["first"].break_writes()  # the router has not seen anything wrong: first is still "ready"
        assert router.backends["first"].state == "ready"
        assert text_of(await call(client, "svc__echo", {"text": "x"})) == "second:echo:x"  # echo is not idempotent
        assert "echo" not in first.calls


async def test_a_lone_backend_whose_writes_fail_is_reconnected_and_the_call_served_within_its_deadline() -> None:
    fake = FakeBackend("svc")
    async with routed(fake, settings={"routing": {"request_timeout_seconds": 5}}) as (client, router, connectors):
        connectors["svc"].break_writes()  # nothing else notices: the router must, from the failed write
        assert text_of(await call(client, "svc__echo", {"text": "x"})) == "svc:echo:x"
        assert connectors["svc"].connects == 2 and router.backends["svc"].restarts == 1


async def test_a_replica_that_hangs_is_blamed_for_its_timeout_and_the_other_is_not() -> None:
    first, second = FakeBackend("first"), FakeBackend("second")
    second.release.set()  # second answers peek at once; first never does
    settings = {"routing": {"request_timeout_seconds": 0.3, "default_strategy": "fallback"}}
    async with routed(first, second, namespace="svc", settings=settings) as (client, router, _):
        with pytest.raises(MCPError) as info:
            await call(client, "svc__peek")
        assert info.value.code == types.REQUEST_TIMEOUT and "'first'" in info.value.message
        assert router.backends["second"].breaker.failures == 0 and "peek" not in second.calls  # no 1 ms attempt there


async def test_each_pool_takes_its_own_turns() -> None:
    fakes = [FakeBackend(n) for n in ("a", "b", "c", "d")]
    config = mr.parse_config(
        {
            "backends": [
                {"name": f.name, "command": "x", "namespace": "one" if f.name in "ab" else "two"} for f in fakes
            ]
        },
        {},
    )
    router = mr.Router(config, connectors={f.name: InProcess(f) for f in fakes})
    with anyio.fail_after(20):
        async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
            served = [text_of(await call(client, f"{pool}__echo"))[0] for _ in range(2) for pool in ("one", "two")]
            assert sorted(served) == ["a", "b", "c", "d"]  # interleaved calls to two pools still reach every replica


async def test_a_down_backend_is_a_clear_error_naming_it() -> None:
    up, down = FakeBackend("up"), FakeBackend("down")
    config = config_for("up", "down", settings={"routing": {"request_timeout_seconds": 0.5}})
    connectors = {"up": InProcess(up), "down": InProcess(down)}
    router = mr.Router(config, connectors=connectors)
    with anyio.fail_after(10):
        async with router.running():
            await router.wait_ready()
            async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                connectors["down"].refuse = True
                connectors["down"].cut()
                await until(router, lambda: router.backends["down"].state != "ready")
                with pytest.raises(MCPError) as info:
                    await call(client, "down__echo")
                assert info.value.code == mr.BACKEND_UNAVAILABLE and "'down'" in info.value.message
                assert text_of(await call(client, "up__echo", {"text": "ok"})) == "up:echo:ok"


async def test_an_unknown_name_error_names_the_backends_never_listed() -> None:
    never, up = FakeBackend("never"), FakeBackend("up")
    connectors = {"never": InProcess(never), "up": InProcess(up)}
    connectors["never"].refuse = True
    router = mr.Router(config_for("never", "up"), connectors=connectors)
    with anyio.fail_after(10):
        async with router.running():
            await router.wait_ready()
            async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                with pytest.raises(MCPError) as info:
                    await call(client, "never__echo")
                assert info.value.code == types.INVALID_PARAMS
                assert info.value.message.startswith(
                    "Unknown tool: 'never__echo'; not listed yet: backend 'never' is failing to connect ("
                )
                assert "refuses connections" in info.value.message and "'up'" not in info.value.message


async def test_no_python_exception_text_reaches_the_client() -> None:
    fake = FakeBackend("svc")
    async with routed(fake) as (client, router, _):
        router.catalogue = None  # type: ignore[assignment]  # sabotage the router itself
        with pytest.raises(MCPError) as info:
            await call(client, "svc__echo")
        assert info.value.message == "internal router error; see the router's log"
        assert "NoneType" not in str(info.value.data or "")


# ---------------------------------------------------------------------------- management tools


async def test_management_tools_report_backends_without_secrets() -> None:
    fake = FakeBackend("gh")
    secret_env = {"TOKEN": "tok-123456", "PASS": "pw-987654", "QUERY": "query-secret-42"}
    raw = {
        "backends": [
            {
                "name": "gh",
                "url": "https://user:${PASS}@api.example.com/mcp?key=${QUERY}",
                "headers": {"Authorization": "Bearer ${TOKEN}"},
            }
        ]
    }
    config = mr.parse_config(raw, secret_env)
    router = mr.Router(config, connectors={"gh": InProcess(fake)})
    with anyio.fail_after(10):
        async with router.running():
            await router.wait_ready()
            async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                listed = await call(client, "list_backends")
                health = await call(client, "get_backend_health", {"name": "gh"})
                unknown = await call(client, "get_backend_health", {"name": "nope"})
                unnamed = await call(client, "get_backend_health", {})
    assert listed.structured_content is not None and health.structured_content is not None
    row = listed.structured_content["backends"][0]
    assert (row["name"], row["transport"], row["state"], row["tools"]) == ("gh", "http", "ready", len(fake.tools()))
    assert row["target"] == "https://api.example.com/mcp"
    assert health.structured_content["circuit_state"] == "closed"
    assert "health_checks" in health.structured_content and "restarts" in health.structured_content
    assert unknown.is_error and text_of(unknown) == "unknown backend 'nope'; known backends: gh"
    assert unnamed.is_error and text_of(unnamed) == "the 'name' argument is missing; known backends: gh"
    everything = json.dumps([listed.model_dump(), health.model_dump()])
    for secret in ("tok-123456", "pw-987654", "user:", "query-secret-42"):
        assert secret not in everything
    stdio = mr.parse_config(
        {"backends": [{"name": "s", "command": "/usr/bin/srv", "args": ["--api-key=sk-live-ARGSECRET", "pkg"]}]}, {}
    )
    assert stdio.backends[0].public_target() == "srv pkg"


# ---------------------------------------------------------------------------- pure core: breaker and backoff


def test_breaker_opens_at_threshold_and_half_opens_after_reset_timeout() -> None:
    clock = FakeClock()
    breaker = mr.CircuitBreaker("db", failure_threshold=3, reset_timeout=60, half_open_attempts=1, clock=clock)
    assert [breaker.record_failure("boom") for _ in range(3)] == [None, None, "open"]
    assert breaker.state == "open" and not breaker.allow()
    assert "backend 'db'" in breaker.open_error() and "3 consecutive failures" in breaker.open_error()
    assert "boom" in breaker.open_error() and "retrying in 60.0s" in breaker.open_error()
    clock.advance(59.9)
    assert breaker.state == "open"
    clock.advance(0.1)
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    assert breaker.record_success() == "closed" and breaker.state == "closed"


def test_breaker_reopens_when_a_trial_fails() -> None:
    clock = FakeClock()
    breaker = mr.CircuitBreaker("db", failure_threshold=1, reset_timeout=10, clock=clock)
    assert breaker.record_failure("x") == "open"
    clock.advance(10)
    assert breaker.allow()
    assert breaker.record_failure("still broken") == "open"
    assert breaker.state == "open" and breaker.retry_at == clock() + 10


def test_breaker_needs_every_half_open_attempt_to_succeed() -> None:
    clock = FakeClock()
    breaker = mr.CircuitBreaker("db", failure_threshold=1, reset_timeout=1, half_open_attempts=3, clock=clock)
    breaker.record_failure("x")
    clock.advance(1)
    for expected in (None, None, "closed"):
        assert breaker.allow()
        assert breaker.record_success() == expected


def test_backoff_grows_by_the_multiplier_up_to_the_cap_with_bounded_jitter() -> None:
    delays = [mr.backoff_delay(n, initial=0.5, multiplier=2, cap=3, rng=lambda: 0.0) for n in range(1, 6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = mr.backoff_delay(2, initial=0.5, multiplier=2, cap=3, rng=lambda: 1.0)
    assert jittered == pytest.approx(1.0 * (1 - mr.JITTER))


# ---------------------------------------------------------------------------- pure core: routing and lifecycle


def candidate(name: str, **overrides: Any) -> mr.Candidate:
    values: dict[str, Any] = {
        "priority": 10,
        "state": "ready",
        "breaker": "closed",
        "admits": True,
        "in_flight": 0,
        "offers": True,
    }
    return mr.Candidate(name=name, **(values | overrides))


def test_strategies_live_in_one_registry_that_config_validation_reads() -> None:
    assert set(mr.STRATEGIES) == {"path", "capability", "fallback"}
    problems = problems_of(
        {"backends": [{"name": "a", "command": "x", "routes": [{"pattern": "*", "strategy": "fastest"}]}]}
    )
    assert problems == [
        "backends.yaml: backends[0].routes[0].strategy: expected one of path, capability, fallback, priority, got 'fastest'"
    ]
    config = config_for(
        "a", routes=[{"pattern": "*", "strategy": "priority"}], settings={"routing": {"default_strategy": "path"}}
    )
    assert config.backends[0].routes[0].strategy == "priority" and config.settings.default_strategy == "path"
    assert (
        mr.plan_route("x", ["a"], mr.routes_of(config.backends), {"a": 10}, "capability").strategy == "fallback"
    )  # an alias


def test_the_most_specific_matching_pattern_wins_and_config_order_breaks_ties() -> None:
    routes = [mr.Route("any", "*", "path", order=0), mr.Route("gh", "github_*", "path", order=1),
              mr.Route("search", "github_search", "path", order=2), mr.Route("late", "github_*", "path", order=3),
              mr.Route("q", "github_?ssue", "path", order=4)]  # fmt: skip

    def owner(name: str) -> str | None:
        route = mr.best_route(name, routes)
        return route.backend if route else None

    assert owner("github_search") == "search"  # no wildcard at all
    assert owner("github_pr") == "gh"  # one wildcard, and first of two equals in config
    assert owner("github_issue") == "q"  # one wildcard, longer literal part than github_*
    assert owner("slack_post") == "any"
    assert mr.best_route("slack_post", routes[1:]) is None  # no pattern matches: the default strategy routes it


def test_capability_prefers_a_closed_breaker_then_fewest_calls_in_flight_then_priority_then_takes_turns() -> None:
    route = mr.STRATEGIES["capability"]
    assert route([candidate("half", breaker="half_open"), candidate("closed", in_flight=3)], 0).order == (
        "closed",
        "half",
    )
    assert route([candidate("busy", in_flight=2), candidate("idle")], 0).order == ("idle", "busy")
    assert route([candidate("low", priority=20), candidate("high", priority=1)], 0).order[0] == "high"
    assert [route([candidate("a"), candidate("b"), candidate("c")], turn).order[0] for turn in range(4)] == [
        "a",
        "b",
        "c",
        "a",
    ]
    decision = route([candidate("a", in_flight=1), candidate("b", offers=False), candidate("c")], 0)
    assert decision.order == ("c", "a") and dict(decision.skipped) == {
        "a": "busier (1 in flight)",
        "b": "does not offer it",
    }


def test_a_chain_takes_the_first_candidate_that_can_serve_and_says_why_it_passed_the_others() -> None:
    route = mr.STRATEGIES["fallback"]
    chain = [candidate("primary", state="failing", reason="backend 'primary' is failing to connect (refused)"),
             candidate("open", breaker="open", admits=False, reason="backend 'open' is unavailable: circuit open"),
             candidate("secondary", priority=20), candidate("last", priority=30)]  # fmt: skip
    decision = route(chain, 0)
    assert decision.action == "send" and decision.order == ("secondary", "last")
    assert (
        dict(decision.skipped)["primary"].startswith("backend 'primary' is failing")
        and dict(decision.skipped)["last"] == "later in the chain"
    )
    waiting = route(
        [candidate("a", state="reconnecting", reason="backend 'a' is reconnecting"), candidate("b", state="stopped")], 0
    )
    assert waiting.action == "wait"  # a is on its way back: calls wait for it, within their deadline
    refused = route(
        [
            candidate("a", state="failing", reason="backend 'a' is failing to connect (boom)"),
            candidate("b", offers=False),
        ],
        0,
    )
    assert (
        refused.action == "refuse"
        and refused.reason == "backend 'a' is failing to connect (boom); backend 'b': does not offer it"
    )


def test_plans_follow_priority_and_fallback_links_and_a_path_route_pins_its_backend() -> None:
    routes = {"primary": (mr.Route("primary", "*", "fallback", "backup"),), "backup": (mr.Route("backup", "*", "fallback", "last"),),
              "gh": (mr.Route("gh", "github_*", "path"),)}  # fmt: skip
    priority = {"primary": 1, "replica": 5, "backup": 50, "last": 90, "gh": 10, "other": 10}
    assert mr.plan_route("search", ["replica", "primary"], routes, priority, "capability").candidates == (
        "primary",
        "backup",
        "last",
        "replica",
    )
    assert mr.plan_route("echo", ["replica"], routes, priority, "fallback") == mr.Plan("fallback", None, ("replica",))
    pinned = mr.plan_route("github_pr", ["other", "gh"], routes, priority, "capability")
    assert pinned.strategy == "path" and pinned.candidates == ("gh",)
    assert mr.plan_route("echo", ["other", "gh"], routes, priority, "capability") == mr.Plan(
        "capability", None, ("other", "gh")
    )


def test_a_cycle_of_fallback_links_is_a_config_error_naming_the_cycle() -> None:
    raw = {"backends": [{"name": n, "command": "x", "routes": [{"pattern": "*", "strategy": "fallback", "fallback_to": to}]}
                        for n, to in (("a", "b"), ("b", "c"), ("c", "a"))]}  # fmt: skip
    assert problems_of(raw) == [
        "backends.yaml: routes: fallback_to links form a cycle: a -> b -> c -> a (a request would go round forever)"
    ]


def test_route_errors_name_the_route_and_the_fix() -> None:
    raw = {"backends": [{"name": "api", "command": "x"},
                        {"name": "db", "command": "x", "routes": [{"pattern": "*", "fallback_to": "apo"}, {"pattern": "[" * 300}]}]}  # fmt: skip
    assert problems_of(raw) == [
        "backends.yaml: backends[1].routes[0].fallback_to: names unknown backend 'apo' (did you mean 'api'?)",
        "backends.yaml: backends[1].routes[1].pattern: expected a glob of at most 256 characters",
    ]


def test_a_resource_listed_by_unrelated_backends_has_one_owner_and_replicas_share_it() -> None:
    memo = mr.Listing(resources=({"uri": "memo://settings", "name": "settings"},))
    alpha, beta, gamma = (
        mr.Member("alpha", "a", 1, memo),
        mr.Member("beta", "b", 5, memo),
        mr.Member("gamma", "a", 9, memo),
    )
    cat = mr.build_catalogue([beta, gamma, alpha])
    assert cat.resources["memo://settings"] == ("alpha", "gamma")  # gamma is alpha's replica; beta is another server
    assert "resource 'memo://settings' of beta is hidden by alpha's (higher priority)" in cat.conflicts


def test_a_fallback_backend_that_lacks_routed_tools_is_reported_once_and_only_once_listed() -> None:
    tools = tuple({"name": f"t{i}", "inputSchema": {}} for i in range(5))
    route = mr.Route("main", "*", "fallback", "spare")
    main = mr.Member("main", "main", 1, mr.Listing(tools=tools), (route,))
    unlisted = mr.Member("spare", "spare", 9, mr.Listing())
    assert mr.build_catalogue([main, unlisted]).conflicts == ()  # not listed yet: no verdict
    spare = mr.Member("spare", "spare", 9, mr.Listing(tools=({"name": "t0", "inputSchema": {}},)))
    assert mr.build_catalogue([main, spare]).conflicts == (
        "fallback backend spare does not offer 4 tool(s) routed to it: 't1', 't2', 't3' and 1 more",
    )


def test_with_namespaces_off_a_path_route_claims_a_name_from_the_priority_owner() -> None:
    search = mr.Listing(tools=({"name": "github_search", "inputSchema": {}}, {"name": "echo", "inputSchema": {}}))
    a = mr.Member("a", "a", 1, search)
    gh = mr.Member("gh", "gh", 10, search, (mr.Route("gh", "github_*", "path"),))
    cat = mr.build_catalogue([a, gh], namespaced=False)
    assert cat.tools["github_search"].pool == ("gh",) and cat.tools["echo"].pool == ("a",)
    assert "tool 'github_search' of a is hidden by gh's (its path route)" in cat.conflicts
    assert [t["name"] for t in cat.tool_items] == ["github_search", "echo"]


def test_the_lifecycle_moves_only_by_its_table_and_says_which_states_make_calls_wait() -> None:
    assert mr.next_state("starting", "connected") == "ready"
    assert mr.next_state("ready", "lost") == "reconnecting" and "reconnecting" in mr.CALLS_WAIT
    assert mr.next_state("reconnecting", "failed") == "failing" and "failing" not in mr.CALLS_WAIT
    assert mr.next_state("failing", "restart") == "reconnecting"
    with pytest.raises(mr.IllegalTransition, match="no transition on 'connected' from 'stopped'"):
        mr.next_state("stopped", "connected")


def test_backoff_stays_at_its_cap_for_any_number_of_attempts() -> None:
    for attempt in (1_025, 2_000, 10**9):
        assert mr.backoff_delay(attempt, initial=0.5, multiplier=2, cap=10, rng=lambda: 0.0) == 10
    assert mr.backoff_delay(10**6, initial=0.5, multiplier=1.0, cap=10, rng=lambda: 0.0) == 0.5


def test_only_a_request_that_never_reached_a_backend_or_is_harmless_to_repeat_goes_elsewhere() -> None:
    assert mr.may_send_elsewhere(reached_backend=False, retry_safe=False)
    assert mr.may_send_elsewhere(reached_backend=True, retry_safe=True)
    assert not mr.may_send_elsewhere(reached_backend=True, retry_safe=False)


def test_a_reconnect_half_opens_an_open_breaker() -> None:
    clock = FakeClock()
    breaker = mr.CircuitBreaker("db", failure_threshold=1, reset_timeout=60, clock=clock)
    assert breaker.reconnected() is None  # closed: nothing to do
    breaker.record_failure("crash")
    assert breaker.reconnected() == "half_open" and breaker.state == "half_open"
    assert breaker.allow() and not breaker.admits()  # the next call is the one trial
    assert breaker.record_success() == "closed"


# ---------------------------------------------------------------------------- resilience through the router


async def test_a_hung_backend_times_out_while_others_answer() -> None:
    slow, fast = FakeBackend("slow"), FakeBackend("fast")
    async with routed(slow, fast, settings={"routing": {"request_timeout_seconds": 0.5}}) as (client, _, _):
        async with anyio.create_task_group() as tg:
            errors: list[MCPError] = []

            async def hang() -> None:
                try:
                    await call(client, "slow__hang")
                except MCPError as err:
                    errors.append(err)

            tg.start_soon(hang)
            await slow.hang_started.wait()
            for i in range(5):
                assert text_of(await call(client, "fast__echo", {"text": str(i)})) == f"fast:echo:{i}"
        assert errors and errors[0].code == types.REQUEST_TIMEOUT and "'slow'" in errors[0].message
        with anyio.fail_after(5):
            await slow.cancelled.wait()  # the timeout cancelled the call at the backend too


async def test_a_timed_out_call_is_retried_only_when_the_tool_is_idempotent() -> None:
    fake = FakeBackend("svc")
    settings = {"routing": {"request_timeout_seconds": 10, "retry": {"max_attempts": 2}}}
    async with routed(fake, settings=settings, timeout=0.3) as (client, _, _):
        with pytest.raises(MCPError) as info:
            await call(client, "svc__hang")
        assert info.value.code == types.REQUEST_TIMEOUT
        with pytest.raises(MCPError):
            await call(client, "svc__peek")  # read-only: safe to ask again
    assert fake.calls.count("hang") == 1
    assert fake.calls.count("peek") == 2


async def test_breaker_opens_after_failures_and_rejects_without_touching_the_backend() -> None:
    clock = FakeClock()
    fake = FakeBackend("svc")
    settings = {"routing": {"request_timeout_seconds": 0.2, "retry": {"max_attempts": 1}}}
    async with routed(
        fake, settings=settings, clock=clock, circuit_breaker={"failure_threshold": 2, "timeout_seconds": 30}
    ) as (
        client,
        router,
        _,
    ):
        for _ in range(2):
            with pytest.raises(MCPError):
                await call(client, "svc__hang")
        assert router.backends["svc"].breaker.state == "open"
        calls_before = len(fake.calls)
        with pytest.raises(MCPError) as info:
            await call(client, "svc__echo")
        assert (
            info.value.code == mr.BACKEND_UNAVAILABLE
            and "circuit open after 2 consecutive failures" in info.value.message
        )
        assert len(fake.calls) == calls_before
        clock.advance(30)
        assert text_of(await call(client, "svc__echo", {"text": "back"})) == "svc:echo:back"
        assert router.backends["svc"].breaker.state == "closed"


async def test_retries_follow_the_configured_count_and_backoff() -> None:
    clock = FakeClock(autojump=True)
    fake = FakeBackend("svc", crashes=4)
    settings = no_refresh(retry={"max_attempts": 4, "backoff_multiplier": 3, "max_backoff_seconds": 0.5})
    async with routed(fake, settings=settings, clock=clock, **QUIET) as (client, _, _):
        with pytest.raises(MCPError) as info:
            await call(client, "svc__count")
        assert "'svc' failed: Connection closed" in info.value.message
    assert fake.calls.count("count") == 4  # four attempts in all, each one cut by a crash
    retries = sorted(
        d for d in clock.delays if d < 0.4
    )  # the restarts after each crash wait 0.45 s (the cap, jittered)
    assert retries == pytest.approx([0.1 * 0.9, 0.3 * 0.9])  # then the third wait is the cap too: 0.1, 0.3, 0.5
    assert len([d for d in clock.delays if d == pytest.approx(0.45)]) >= 4


async def test_idempotent_tools_are_retried_after_a_transport_failure() -> None:
    fake = FakeBackend("svc", crashes=1)
    async with routed(fake, clock=FakeClock(autojump=True), settings=no_refresh(), **QUIET) as (client, _, _):
        assert text_of(await call(client, "svc__count", {"text": "n"})) == "svc:count:n"
        fake.crashes = 1
        with pytest.raises(MCPError):
            await call(client, "svc__echo")  # not annotated: may have run, so never re-sent
    assert fake.calls.count("count") == 2 and fake.calls.count("echo") == 1


async def test_a_lost_connection_is_reestablished_and_listed_again() -> None:
    fake = FakeBackend("svc")
    async with routed(fake, settings={"routing": {"retry": {"max_backoff_seconds": 0.05}}}) as (
        client,
        router,
        connectors,
    ):
        connectors["svc"].cut()
        await until(router, lambda: connectors["svc"].connects == 2 and router.backends["svc"].state == "ready")
        assert text_of(await call(client, "svc__echo", {"text": "again"})) == "svc:echo:again"
        assert router.backends["svc"].restarts == 1


async def test_an_http_backend_that_forgot_our_session_is_reconnected_and_the_call_retried() -> None:
    fake = FakeBackend("web")
    async with routed(fake, url="http://127.0.0.1:1/mcp") as (client, _, connectors):
        fake.forget_session = True
        assert text_of(await call(client, "web__echo", {"text": "again"})) == "web:echo:again"
        assert connectors["web"].connects == 2
        assert fake.calls == ["echo", "echo"]  # the first was refused for its session, so re-sending it is safe
        with pytest.raises(MCPError) as info:  # a tool's own words about some other session are just an error
            await call(client, "web__expired")
        assert info.value.message == "payment provider session expired"
        assert fake.calls.count("expired") == 1 and connectors["web"].connects == 2


async def test_an_http_backends_streamed_answers_leave_its_connection_open_for_the_next_call() -> None:

    fake = FakeBackend("web")
    app = fake.server().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")  # answers with SSE streams
    connections: set[int] = set()

    async def seen(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            connections.add(scope["client"][1])  # one client port per TCP connection
        await app(scope, receive, send)

    async with uvicorn_serving(seen) as base:
        router = mr.Router(config_for("web", url=f"{base}/mcp"))
        with anyio.fail_after(20):
            async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
                for i in range(10):
                    assert text_of(await call(client, "web__echo", {"text": str(i)})) == f"web:echo:{i}"
    assert fake.calls.count("echo") == 10 and len(connections) < 4


ODD_ANSWERS: Final = {
    "boom": (500, "text/plain", b"oops"),
    "gone": (404, "text/plain", b"no"),
    "refused": (
        400,
        "application/json",
        b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32602, "message": "bad"}}',
    ),
    "stranger": (200, "application/json", b'{"jsonrpc": "2.0", "id": 999999, "result": {}}'),
    "garbage": (200, "application/json", b"{not json"),
    "streamed": (
        200,
        "text/event-stream",
        b"id: 1\r\ndata:\r\n\r\n"  # a resumption point's empty event
        b"event: ping\r\ndata: {}\r\n\r\n"  # an event of another kind
        b'event: message\r\ndata: {"jsonrpc": "2.0", "method": "notifications/message", "params": {}}\r\n\r\n'
        b'event: message\r\ndata: {"jsonrpc": "2.0", "id": "%(id)s",\r\ndata: "result": {"content": []}}\r\n\r\n',
    ),
}


async def test_a_2026_http_backends_answers_are_read_as_the_sdk_reads_them_and_a_timeout_cancels_the_call() -> None:
    """Each way a streamable HTTP backend may answer a call in the 2026 era: a real SDK server, whose answers to
    `echo` with an ODD_ANSWERS text are replaced by that answer."""

    fake = FakeBackend("web")
    app = fake.server().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")

    async def odd(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await app(scope, receive, send)
        body = b""
        while (message := await receive())["type"] == "http.request":
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        text = (request.get("params", {}).get("arguments") or {}).get("text")
        if request.get("method") == "tools/call" and text in ODD_ANSWERS:
            status, content_type, answer = ODD_ANSWERS[text]
            answer = answer % {b"id": str(request["id"]).encode()} if b"%(id)s" in answer else answer
            headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(answer))]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            return await send({"type": "http.response.body", "body": answer})
        await app(scope, mr._replaying(body, receive), send)

    async with uvicorn_serving(odd) as base:
        router = mr.Router(config_for("web", url=f"{base}/mcp", transport="http", timeout=0.5))
        with anyio.fail_after(20):
            async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
                await router.wait_ready()
                assert router.backends["web"].status()["era"] == "2026"
                assert text_of(await call(client, "web__echo", {"text": "plain"})) == "web:echo:plain"
                assert (await call(client, "web__echo", {"text": "streamed"})).content == []
                failures = {}
                for text in ("boom", "gone", "refused", "stranger", "garbage"):
                    with pytest.raises(MCPError) as info:
                        await call(client, "web__echo", {"text": text})
                    failures[text] = (info.value.code, info.value.message)
                with pytest.raises(MCPError) as info:
                    await call(client, "web__hang")
                await fake.cancelled.wait()  # the router gave up on it: its stream closed
                assert text_of(await call(client, "web__echo", {"text": "after"})) == "web:echo:after"
    assert info.value.code == types.REQUEST_TIMEOUT
    invalid = "backend 'web' sent an invalid answer"
    assert failures == {
        "boom": (types.INTERNAL_ERROR, "the backend answered HTTP 500 Internal Server Error"),
        "gone": (types.METHOD_NOT_FOUND, "Not Found"),
        "refused": (types.INVALID_PARAMS, "bad"),
        "stranger": (types.INTERNAL_ERROR, f"{invalid}: an answer to another request"),
        "garbage": (types.INTERNAL_ERROR, f"{invalid}: not a JSON object"),
    }


async def test_restarting_a_2026_http_backend_fails_its_calls_in_flight_without_feeding_its_breaker() -> None:
    """The restart cut them, not the backend: as over the SDK's transport, the lost connection is no failure of
    each call's, so a healthy backend's breaker does not open when one restart cuts several calls."""
    fake = FakeBackend("svc")
    async with http_backend(fake) as (url, _):
        router = mr.Router(config_for("svc", url=url, transport="http", health_check={"enabled": False}))
        with anyio.fail_after(20):
            async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
                await router.wait_ready()
                failures = []
                async with anyio.create_task_group() as tg:

                    async def hang() -> None:
                        with pytest.raises(MCPError) as info:
                            await client.call_tool("svc__hang", {})
                        failures.append(info.value.message)

                    for _ in range(6):  # one at a time, each running at the backend before the next
                        fake.hang_started = anyio.Event()
                        tg.start_soon(hang)
                        await fake.hang_started.wait()
                    router.restart_backend("svc")
                assert text_of(await call(client, "svc__echo", {"text": "after"})) == "svc:echo:after"
                breaker = router.backends["svc"].breaker
    assert len(failures) == 6 and all("Connection closed" in f for f in failures), failures
    assert (breaker.state, breaker.failures) == ("closed", 0)


async def test_an_answered_sse_stream_that_breaks_while_drained_is_just_closed() -> None:
    class Broken(httpx2.AsyncByteStream):
        closed = False

        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {}}\n\n'
            raise httpx2.ReadError("peer closed connection without sending complete message body")

        async def aclose(self) -> None:
            self.closed = True

    inner = Broken()
    stream = mr._DrainedOnClose(inner)
    async for _ in stream:
        break  # the answer is in: the SDK stops reading and closes
    await stream.aclose()
    assert inner.closed


async def test_http_backends_are_reached_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    requests: list[bytes] = []
    reached = anyio.Event()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readline())
        reached.set()
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    async with await asyncio.start_server(proxy, "127.0.0.1", 0) as server:
        proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy_url)
        monkeypatch.setenv("http_proxy", proxy_url)
        router = mr.Router(config_for("remote", url="http://mcp.example.invalid/mcp", transport="http"))
        async with router.running():
            with anyio.fail_after(10):
                await reached.wait()
    assert requests[0].startswith(b"POST http://mcp.example.invalid/mcp HTTP/1.1")


async def test_http_answers_are_plain_json_unless_the_call_streams() -> None:
    async with served(FakeBackend("svc")) as (http, _, _):
        session = await open_session(http)
        echo = {"name": "svc__echo", "arguments": {"text": "hi"}}
        plain = await http.post("/mcp", json=rpc(2, "tools/call", echo), headers=session)
        assert plain.headers["content-type"] == "application/json"
        assert plain.json()["id"] == 2 and plain.json()["result"]["content"][0]["text"] == "svc:echo:hi"
        unknown = await http.post("/mcp", json=rpc(3, "tools/call", {"name": "nope", "arguments": {}}), headers=session)
        assert unknown.headers["content-type"] == "application/json" and unknown.json()["id"] == 3

        progress = {"name": "svc__progress", "arguments": {}, "_meta": {"progressToken": "t"}}
        streamed = await http.post("/mcp", json=rpc(4, "tools/call", progress), headers=session)
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: ") :]) for line in streamed.text.splitlines() if line.startswith("data: ")]
        assert [e.get("method") for e in events] == ["notifications/progress"] * 3 + [None] and events[-1]["id"] == 4


async def test_http_requests_whose_id_is_no_id_are_refused_not_taken_for_notifications() -> None:
    async with served(FakeBackend("svc")) as (http, _, _):
        session = await open_session(http)
        refusals = []
        for bad_id in (None, 1.5, True, {"a": 1}):
            response = await http.post("/mcp", json={"jsonrpc": "2.0", "id": bad_id, "method": "ping"}, headers=session)
            refusals.append((response.status_code, response.json()))
        assert (await http.post("/mcp", json=rpc(2, "ping"), headers=session)).status_code == 200
    error = {"code": types.INVALID_REQUEST, "message": "Invalid request: the id must be a string or an integer"}
    assert refusals == [(400, {"jsonrpc": "2.0", "id": None, "error": error})] * 4


async def test_http_refusals_of_bad_bodies_say_what_stdio_says_without_pydantic_text() -> None:
    async with served(FakeBackend("svc")) as (http, _, _):
        session = await open_session(http)
        answers = []
        for body, headers in (
            (b"not json", {}),
            (b'{"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": [1]}', {}),
            (nested_request(6, 975), {}),
            (nested_request(7, 300), session),  # a call on an open session too
        ):
            response = await http.post("/mcp", content=body, headers=headers)
            assert response.status_code == 400 and "pydantic" not in response.text
            assert int(response.headers["content-length"]) == len(response.content)
            answers.append(
                (response.json()["id"], response.json()["error"]["code"], response.json()["error"]["message"])
            )
    assert answers == [
        (None, types.PARSE_ERROR, "Parse error: not JSON"),
        (5, types.INVALID_REQUEST, "Invalid request: not a valid JSON-RPC message"),
        (6, types.INVALID_REQUEST, "Invalid request: nested more than 201 levels deep"),
        (7, types.INVALID_REQUEST, "Invalid request: nested more than 201 levels deep"),
    ]


async def test_an_http_backends_error_status_is_named_in_the_error() -> None:
    """A streamable HTTP backend that answers tools/call with a bare HTTP 500 (a crashed handler behind a proxy)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = re.search(r"(?i)content-length: (\d+)", head)
                message = json.loads(await reader.readexactly(int(length[1]))) if length else {}
                if not head.startswith("POST") or "id" not in message:
                    writer.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                elif message["method"] == "tools/call":
                    writer.write(
                        b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\noops"
                    )
                else:
                    result: dict[str, Any] = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
                    if message["method"] == "initialize":
                        result = {
                            "protocolVersion": "2025-06-18",
                            "capabilities": {"tools": {}},
                            "serverInfo": {"name": "raw", "version": "1"},
                        }
                    out = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(out), out)
                    )
                await writer.drain()

    listening = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    config = config_for("web", url=f"http://127.0.0.1:{port}/mcp", transport="http")  # declared: no SSE-fallback probe
    router = mr.Router(config)
    async with listening, router.running():
        with anyio.fail_after(20):
            await router.wait_ready()
            async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                with pytest.raises(MCPError) as info:
                    await call(client, "web__echo")
    assert info.value.message == "the backend answered HTTP 500 Internal Server Error"


@pytest.mark.parametrize(
    ("marker", "code", "message", "reconnects"),
    [
        ("fail-500", types.INTERNAL_ERROR, "the backend answered HTTP 500 Internal Server Error", 0),
        (
            "reset-me",
            mr.BACKEND_UNAVAILABLE,
            "backend 'legacy' failed: connection reset while sending to the backend",
            1,
        ),
    ],
    ids=["http-500", "connection-reset"],
)
async def test_an_sse_backends_failed_post_fails_its_call_at_once_and_the_next_calls_succeed(
    marker: str, code: int, message: str, reconnects: int, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeBackend("legacy")
    async with serving_sse(fake.server()) as port, failing_posts(port) as proxy:
        # a timeout far beyond the test's bound: the call must fail because its POST did, not because time ran out
        config = config_for("legacy", url=f"http://127.0.0.1:{proxy}/sse", transport="sse", timeout=600)
        router = mr.Router(config)
        async with router.running():
            with anyio.fail_after(20):
                await router.wait_ready()
                async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                    with pytest.raises(MCPError) as info:
                        await call(client, "legacy__echo", {"text": marker})
                    assert (info.value.code, info.value.message) == (code, message)
                    # a reset connection is replaced meanwhile; calls wait for it
                    assert text_of(await call(client, "legacy__echo", {"text": "after"})) == "legacy:echo:after"
            assert router.backends["legacy"].restarts == reconnects
    assert fake.calls == ["echo"]
    assert not [r for r in caplog.records if r.name.startswith("mcp.client")]  # no SDK traceback in the log


async def test_an_sse_backend_that_lost_the_session_is_reconnected_and_the_call_sent_again() -> None:
    fake = FakeBackend("legacy")
    async with serving_sse(fake.server()) as port, failing_posts(port) as proxy:
        config = config_for("legacy", url=f"http://127.0.0.1:{proxy}/sse", transport="sse", timeout=600)
        router = mr.Router(config)
        async with router.running():
            with anyio.fail_after(20):
                await router.wait_ready()
                async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                    # the 404 says the message was not taken: nothing ran, so it goes again on the new connection
                    assert text_of(await call(client, "legacy__echo", {"text": "forget-me"})) == "legacy:echo:forget-me"
            assert router.backends["legacy"].restarts == 1
    assert fake.calls == ["echo"]


async def test_2026_requests_whose_mirrored_headers_disagree_with_the_body_are_refused() -> None:
    envelope = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "svc__echo", "arguments": {"text": "hi"}, "_meta": envelope},
    }
    base = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
    }
    encoded = "=?base64?" + base64.b64encode(b"svc__echo").decode() + "?="
    with anyio.fail_after(20):
        async with served(FakeBackend("svc")) as (http, _, _):
            for name in ("svc__echo", encoded):  # a base64-encoded name is decoded before it is compared
                ok = await http.post("/mcp", json=body, headers={**base, "mcp-name": name})
                assert ok.status_code == 200, ok.text
                assert "svc:echo:hi" in ok.text
            for wrong in ({"mcp-name": "svc__fail"}, {"mcp-name": "svc__echo", "mcp-method": "tools/list"}):
                refused = await http.post("/mcp", json=body, headers={**base, **wrong})
                assert refused.status_code == 400
                assert refused.json()["error"]["code"] == types.HEADER_MISMATCH


async def test_a_2026_call_over_http_is_checked_against_its_tool_without_listing_every_tool() -> None:
    """The SDK checks a 2026 tools/call's `Mcp-Param-*` headers against the tool's input schema, by running the
    server's whole tools/list unless it is told the schema: the router tells it, so a call costs no listing."""
    envelope = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "svc__echo", "arguments": {"text": "hi"}, "_meta": envelope},
    }
    headers = {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "svc__echo"}
    with anyio.fail_after(20):
        async with served(FakeBackend("svc")) as (http, _, _):
            for _ in range(2):
                answered = await http.post("/mcp", json=body, headers=headers)
                assert answered.status_code == 200 and "svc:echo:hi" in answered.text, answered.text
            samples = parse_metrics((await http.get("/metrics")).text)
    assert samples['mcp_router_requests_total{mcp_method_name="tools/call",backend="svc",outcome="ok"}'] == 2
    assert not [sample for sample in samples if "tools/list" in sample]


async def test_each_backend_is_spoken_to_in_its_newest_era_in_one_router() -> None:
    """By default a backend serving 2026-07-28 over HTTP gets that era's envelope and mirrored headers, with its own
    un-prefixed tool name; a 1.x-style backend (no server/discover) keeps the handshake; list_backends shows both."""

    seen: list[dict[str, str]] = []
    modern = FakeBackend("new").server()
    app = modern.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await app(scope, receive, send)

    old = HandshakeOnly(FakeBackend("old"))
    async with uvicorn_serving(recording) as base:
        raw = {"backends": [{"name": "new", "url": f"{base}/mcp"}, {"name": "old", "command": "unused"}]}
        router = mr.Router(mr.parse_config(raw, {}), connectors={"old": old})
        with anyio.fail_after(20):
            async with router.running():
                await router.wait_ready()
                async with Client(mr.build_server(router), mode="legacy", cache=None) as client:
                    assert text_of(await client.call_tool("new__echo", {"text": "a"})) == "new:echo:a"
                    assert text_of(await client.call_tool("old__echo", {"text": "b"})) == "old:echo:b"
                    rows = (await client.call_tool("list_backends")).structured_content or {}
    eras = {row["name"]: (row["era"], row["protocol_version"]) for row in rows["backends"]}
    assert eras == {"new": ("2026", "2026-07-28"), "old": ("handshake", "2025-11-25")}
    call = next(h for h in seen if h.get("mcp-method") == "tools/call")
    assert (call["mcp-protocol-version"], call["mcp-name"]) == ("2026-07-28", "echo")
    assert [h["mcp-method"] for h in seen if "mcp-method" in h][:1] == ["server/discover"]  # classified first
    assert not any("mcp-session-id" in h for h in seen)  # no handshake, no session


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_2026_http_backends_tool_with_a_header_parameter_gets_its_header_from_the_router(mode: str) -> None:
    """A tool whose argument is mirrored into an `Mcp-Param-*` header (x-mcp-header) is callable through the router:
    the 2026-era backend refuses a call without that header (-32020). A tool whose annotation is invalid is not
    offered, as the spec tells clients."""
    schema = {"type": "object", "properties": {"region": {"type": "string", "x-mcp-header": "Region"}}}
    invalid = {"type": "object", "properties": {"where": {"type": "string", "x-mcp-header": "Bad Name"}}}
    tools = [types.Tool(name="regional", input_schema=schema), types.Tool(name="misnamed", input_schema=invalid)]
    fake = FakeBackend("svc", extra_tools=tools)
    async with http_backend(fake) as (url, received):
        router = mr.Router(config_for("svc", url=url, health_check={"enabled": False}))
        with anyio.fail_after(20):
            async with router.running():
                await router.wait_ready()
                async with Client(mr.build_server(router), mode=mode, cache=None) as client:
                    listed = {t.name: t for t in (await client.list_tools()).tools}
                    assert listed["svc__regional"].input_schema == schema  # re-exposed with its annotation
                    assert "svc__misnamed" not in listed and "svc__echo" in listed
                    result = await client.call_tool("svc__regional", {"region": "eu-west"})
                    assert not result.is_error and text_of(result) == "svc:regional:"
                assert await router.backends["svc"].check_health()  # server/discover, over HTTP too
    call = next(r for r in received if r.method() == "tools/call")
    assert call.headers["mcp-param-region"] == "eu-west"


@pytest.mark.parametrize("status", [503, 401])
async def test_an_http_backend_failing_its_era_probe_is_asked_again_not_taken_for_the_handshake_era(
    status: int,
) -> None:
    """A 5xx or an auth failure to `server/discover` says nothing of the backend's era: that connection attempt
    fails, and the next one probes again, so a 2026-era backend that was briefly down is still spoken to in 2026."""

    app = FakeBackend("new").server().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    refused: list[int] = []

    async def first_probe_fails(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        if b'"server/discover"' in body and not refused:
            refused.append(status)
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"try later"})
            return
        replayed = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Any:
            return replayed.pop() if replayed else await receive()

        await app(scope, replay, send)

    async with uvicorn_serving(first_probe_fails) as base:
        raw = {"backends": [{"name": "new", "url": f"{base}/mcp", "transport": "http", **QUIET}]}
        router = mr.Router(mr.parse_config({**raw, **no_refresh()}, {}), clock=FakeClock(autojump=True).clock())
        with anyio.fail_after(20):
            async with router.running():
                backend = router.backends["new"]
                while backend.state != "ready":
                    await router.changed.wait()
                status_now = backend.status()
    assert refused == [status]
    assert (status_now["era"], status_now["protocol_version"]) == ("2026", "2026-07-28")


ANSWER_EVENT = b'event: message\r\ndata: {"jsonrpc":"2.0","id":"a\\"b","result":{}}\r\n\r\n'


@pytest.mark.parametrize(
    ("first_event", "plain"),
    [
        (ANSWER_EVENT, True),
        (
            b'id: 1\r\nevent: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\r\n\r\n',
            False,
        ),  # resumable: stays a stream
        (b": ping - 2026-11-24 08:00:00\r\n\r\n", False),  # a silent call past the keep-alive ping
        (b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\r\n\r\n', False),
        (
            b'event: message\r\ndata: {"jsonrpc":"2.0","id":7,"method":"sampling/createMessage","params":{}}\r\n\r\n',
            False,
        ),
    ],
)
async def test_an_sse_answer_becomes_plain_json_only_when_its_first_event_is_the_answer(
    first_event: bytes, plain: bool
) -> None:
    async def sdk_app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"), (b"mcp-session-id", b"s1")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        await send({"type": "http.response.body", "body": first_event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await mr.PlainAnswers(sdk_app)({"type": "http", "method": "POST"}, None, send)
    headers, body = dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])
    assert headers[b"mcp-session-id"] == b"s1"
    if plain:
        assert headers[b"content-type"] == b"application/json" and b"cache-control" not in headers
        assert json.loads(body) == {"jsonrpc": "2.0", "id": 'a"b', "result": {}}
    else:
        assert headers[b"content-type"] == b"text/event-stream" and body == first_event


async def test_a_call_made_while_its_backend_restarts_waits_for_it() -> None:
    fake = FakeBackend("svc")
    async with routed(fake) as (client, router, connectors):
        router.restart_backend("svc")
        assert text_of(await call(client, "svc__echo", {"text": "patient"})) == "svc:echo:patient"
        assert connectors["svc"].connects == 2


async def test_calls_to_a_backend_that_fails_to_reconnect_fail_at_once_with_the_reason() -> None:
    fake, steady = FakeBackend("flaky"), FakeBackend("steady")
    async with routed(fake, steady, settings={"routing": {"request_timeout_seconds": 60}}) as (
        client,
        router,
        connectors,
    ):
        connectors["flaky"].refuse = True
        connectors["flaky"].cut()
        await until(router, lambda: router.backends["flaky"].state == "reconnecting")
        for _ in range(3):  # the first waits for the reconnection attempt; none waits out the 60 s timeout
            with pytest.raises(MCPError) as info:
                await call(client, "flaky__echo")
            assert info.value.code == mr.BACKEND_UNAVAILABLE
            assert "'flaky' is failing to connect" in info.value.message and "refuses connections" in info.value.message
        assert text_of(await call(client, "steady__echo", {"text": "ok"})) == "steady:echo:ok"
        connectors["flaky"].refuse = False
        router.restart_backend("flaky")
        assert text_of(await call(client, "flaky__echo", {"text": "back"})) == "flaky:echo:back"


async def test_a_backend_whose_attempts_fail_slowly_fails_calls_at_once_after_the_first_failure() -> None:
    async with routed(FakeBackend("slow"), settings={"routing": {"request_timeout_seconds": 60}}) as (
        client,
        router,
        connectors,
    ):
        backend, first_attempt = router.backends["slow"], anyio.Event()
        connectors["slow"].stall = first_attempt
        connectors["slow"].cut()
        await connectors["slow"].stalled.wait()  # the reconnection attempt stalls
        connectors["slow"].stall = anyio.Event()
        first_attempt.set()  # it fails; the next attempt stalls
        await until(router, lambda: backend.state == "failing")
        with anyio.fail_after(5), pytest.raises(MCPError) as info:  # not the 60 s timeout: the last attempt failed
            await call(client, "slow__echo")
        assert (
            "'slow' is failing to connect (ConnectionRefusedError: fake backend refuses connections)"
            in info.value.message
        )


async def test_calls_waiting_for_a_backend_fail_when_it_is_removed() -> None:
    async with routed(FakeBackend("gone"), settings={"routing": {"request_timeout_seconds": 60}}) as (
        client,
        router,
        connectors,
    ):
        connectors["gone"].stall = anyio.Event()  # the reconnection never ends
        connectors["gone"].cut()
        await until(router, lambda: router.backends["gone"].state != "ready")
        errors: list[str] = []

        async def waiting_call() -> None:
            with pytest.raises(MCPError) as info:
                await call(client, "gone__echo")
            errors.append(info.value.message)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting_call)
                await anyio.wait_all_tasks_blocked()
                router.remove_backend("gone")
        assert errors and "'gone' is stopped" in errors[0]


async def test_a_backend_serving_only_part_of_a_capability_still_comes_up() -> None:
    fake = FakeBackend("partial", serves_templates=False, resources=[types.Resource(uri="file:///x", name="x")])
    async with routed(fake) as (client, router, _):
        assert router.backends["partial"].state == "ready"
        assert (await client.list_resource_templates()).resource_templates == []
        assert text_of(await call(client, "partial__echo", {"text": "up"})) == "partial:echo:up"


async def test_replicas_sharing_a_namespace_cover_for_each_other() -> None:
    first, second = FakeBackend("first"), FakeBackend("second")
    async with routed(first, second, namespace="svc", settings={"routing": {"request_timeout_seconds": 2}}) as (
        client,
        router,
        connectors,
    ):
        names = [t.name for t in (await client.list_tools()).tools]
        assert names.count("svc__echo") == 1
        assert text_of(await call(client, "svc__echo", {"text": "a"})) == "first:echo:a"  # same priority: config order
        connectors["first"].refuse = True
        connectors["first"].cut()
        await until(router, lambda: router.backends["first"].state != "ready")
        assert text_of(await call(client, "svc__echo", {"text": "b"})) == "second:echo:b"


async def test_health_checks_record_success_and_feed_the_breaker() -> None:
    fake = FakeBackend("svc")
    async with routed(fake, circuit_breaker={"failure_threshold": 1}) as (_, router, connectors):
        backend = router.backends["svc"]
        assert await backend.check_health()
        assert backend.health.checks == 1 and backend.health.last_latency_ms is not None
        connectors["svc"].refuse = True
        connectors["svc"].cut()
        await until(router, lambda: backend.state != "ready")
        assert not await backend.check_health()
        assert backend.health.consecutive_failures == 1 and backend.breaker.state == "open"
        health = backend.status(detail=True)["health_checks"]
        assert (health["total"], health["failed"]) == (2, 1) and "health check failed" in health["last_error"]


async def test_a_backend_that_does_not_answer_ping_is_checked_with_a_list_and_asked_no_more_pings() -> None:
    fake = FakeBackend("old", answers_ping=False)
    async with routed(fake, era="handshake") as (_, router, _):
        listed = fake.tool_lists
        assert await router.backends["old"].check_health() and await router.backends["old"].check_health()
        assert (fake.pings, fake.tool_lists - listed) == (1, 2)


async def test_a_2026_backend_is_health_checked_with_server_discover_and_no_list() -> None:
    """The 2026 era has no ping: a check is one server/discover, not a refused ping and a whole tools/list."""
    fake = FakeBackend("svc")
    async with routed(fake) as (_, router, _):
        listed, backend = fake.tool_lists, router.backends["svc"]
        assert await backend.check_health() and await backend.check_health()
        assert fake.tool_lists == listed and backend.health.checks == 2


async def test_backends_are_added_restarted_and_removed_while_serving() -> None:
    first, second = FakeBackend("first"), FakeBackend("second")
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async with (
        routed(first) as (_, router, connectors),
        Client(mr.build_server(router), mode="legacy", cache=None, message_handler=on_message) as client,
    ):
        await client.list_tools()
        connector = InProcess(second)
        router.add_backend(
            mr.parse_config({"backends": [{"name": "second", "command": "x"}]}, {}).backends[0], connector
        )
        with anyio.fail_after(2):
            await changed.wait()
        assert text_of(await call(client, "second__echo", {"text": "hi"})) == "second:echo:hi"

        router.restart_backend("first")
        await until(router, lambda: connectors["first"].connects == 2 and router.backends["first"].state == "ready")
        assert router.backends["first"].restarts == 1

        router.remove_backend("second")
        assert "second__echo" not in {t.name for t in (await client.list_tools()).tools}
        with pytest.raises(MCPError):
            await call(client, "second__echo")


# ---------------------------------------------------------------------------- routing through the router


async def explain(client: Client, name: str) -> dict[str, Any]:
    result = await call(client, "explain_route", {"name": name})
    assert result.structured_content is not None and not result.is_error
    return result.structured_content


async def test_path_routes_send_a_family_of_tools_to_its_backend_and_the_rest_by_capability() -> None:
    github_tool = types.Tool(name="github_search", input_schema={"type": "object"})
    gh, other = FakeBackend("gh", extra_tools=[github_tool]), FakeBackend("other", extra_tools=[github_tool])
    config = mr.parse_config(
        {"backends": [{"name": "gh", "command": "x", "namespace": "tools", "routes": [{"pattern": "github_*", "strategy": "path"}]},
                      {"name": "other", "command": "x", "namespace": "tools"}]}, {})  # fmt: skip
    router = mr.Router(config, connectors={"gh": InProcess(gh), "other": InProcess(other)})
    with anyio.fail_after(20):
        async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
            served = {(await call(client, "tools__github_search")).meta[mr.ROUTER_META_KEY] for _ in range(4)}  # type: ignore[index]
            assert served == {"gh"}
            echoed = [text_of(await call(client, "tools__echo", {"text": "x"})) for _ in range(4)]
            assert sorted(echoed) == ["gh:echo:x"] * 2 + ["other:echo:x"] * 2  # no route: capability takes turns
            why = await explain(client, "tools__github_search")
            assert (why["strategy"], why["backend"], why["route"]["pattern"]) == ("path", "gh", "github_*")
            assert next(c for c in why["candidates"] if c["backend"] == "other")["verdict"].startswith(
                "no pattern match"
            )
            assert (await explain(client, "tools__echo"))["strategy"] == "capability"


async def test_a_priority_chain_falls_back_on_transport_failure_but_never_resends_a_call_that_may_have_run() -> None:
    primary, secondary = FakeBackend("primary"), FakeBackend("secondary")
    config = mr.parse_config(
        {"backends": [{"name": "primary", "command": "x", "priority": 1,
                       "routes": [{"pattern": "*", "strategy": "fallback", "fallback_to": "secondary"}]},
                      {"name": "secondary", "command": "x", "priority": 50}]} | no_refresh(), {})  # fmt: skip
    connectors = {"primary": InProcess(primary), "secondary": InProcess(secondary)}
    router = mr.Router(config, connectors=connectors, clock=FakeClock(autojump=True).clock())
    with anyio.fail_after(20):
        async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
            assert text_of(await call(client, "primary__echo", {"text": "1"})) == "primary:echo:1"
            primary.crashes = 1
            with pytest.raises(MCPError) as info:  # it may have run on primary: not sent again anywhere
                await call(client, "primary__echo", {"text": "2"})
            assert (
                info.value.code == mr.BACKEND_UNAVAILABLE
                and "'primary' failed: Connection closed" in info.value.message
            )
            assert "echo" not in secondary.calls
            await until(router, lambda: router.backends["primary"].state == "ready")
            primary.crashes = 1
            counted = await call(
                client, "primary__count", {"text": "3"}
            )  # idempotent: safe to send to the next in the chain
            assert text_of(counted) == "secondary:count:3" and counted.meta == {mr.ROUTER_META_KEY: "secondary"}
            await until(router, lambda: router.backends["primary"].state == "ready")
            connectors["primary"].refuse = True
            connectors["primary"].cut()
            await until(router, lambda: router.backends["primary"].state == "failing")
            assert (
                text_of(await call(client, "primary__echo", {"text": "4"})) == "secondary:echo:4"
            )  # primary down: never sent
            why = await explain(client, "primary__echo")
            assert (why["strategy"], why["decision"], why["backend"]) == ("fallback", "send", "secondary")
            assert "failing to connect" in next(c for c in why["candidates"] if c["backend"] == "primary")["verdict"]
            rows = {r["name"]: r for r in ((await call(client, "list_backends")).structured_content or {})["backends"]}
            assert (
                rows["secondary"]["fallbacks"] == 2
                and rows["primary"]["errors"] >= 1
                and rows["primary"]["requests"] >= 2
            )


async def test_with_namespaces_off_a_down_owner_gives_a_clear_error_and_never_the_other_backends_tool() -> None:
    owner, other = FakeBackend("owner"), FakeBackend("other")
    connectors = {"owner": InProcess(owner), "other": InProcess(other)}
    config = mr.parse_config({"backends": [{"name": "owner", "command": "x", "priority": 1}, {"name": "other", "command": "x"}],
                              "routing": {"enable_namespace_prefixing": False}}, {})  # fmt: skip
    router = mr.Router(config, connectors=connectors)
    with anyio.fail_after(20):
        async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
            connectors["owner"].refuse = True
            connectors["owner"].cut()
            await until(router, lambda: router.backends["owner"].state == "failing")
            with pytest.raises(MCPError) as info:
                await call(client, "echo", {"text": "x"})
            assert info.value.code == mr.BACKEND_UNAVAILABLE and "'owner' is failing to connect" in info.value.message
            assert "echo" not in other.calls
            why = await explain(client, "echo")
            assert why["decision"] == "refuse" and [c["backend"] for c in why["candidates"]] == ["owner"]
            assert (await explain(client, "no_such_tool"))["decision"] == "unknown"


async def test_a_backend_down_for_thousands_of_restarts_never_stops_the_router_and_tells_the_truth() -> None:
    dead, alive_ = FakeBackend("dead"), FakeBackend("alive")
    async with routed(dead, alive_, clock=FakeClock(autojump=True), settings=no_refresh(), **QUIET) as (
        client,
        router,
        connectors,
    ):
        connectors["dead"].refuse = True
        connectors["dead"].cut()
        await until(router, lambda: connectors["dead"].connects >= 2_000, seconds=60)
        assert text_of(await call(client, "alive__echo", {"text": "still"})) == "alive:echo:still"
        health = (await call(client, "get_backend_health", {"name": "dead"})).structured_content
        assert health is not None and health["state"] == "failing" and health["circuit_state"] != "closed"
        assert (
            health["failed_attempts"] >= 1_999
            and health["restarts"] >= 1_999
            and health["next_retry_in_seconds"] is not None
        )
        assert health["consecutive_failures"] >= 1_999 and "refuses connections" in health["last_error"]


async def test_lists_inside_the_cache_ttl_never_touch_the_backends() -> None:
    a, b = FakeBackend("a"), FakeBackend("b")
    async with routed(a, b) as (client, _, _):
        before = (a.tool_lists, b.tool_lists)
        for _ in range(100):
            await client.list_tools()
        assert (a.tool_lists, b.tool_lists) == before == (1, 1)


async def test_a_healed_backend_takes_calls_at_once_and_calls_cut_by_its_crash_count_once() -> None:
    fake = FakeBackend("svc")
    settings = {"routing": {"request_timeout_seconds": 30}}
    async with routed(fake, settings=settings, circuit_breaker={"failure_threshold": 2, "timeout_seconds": 600}) as (
        client,
        router,
        connectors,
    ):
        backend = router.backends["svc"]
        errors: list[MCPError] = []

        async def hang() -> None:
            try:
                await call(client, "svc__hang")
            except MCPError as err:
                errors.append(err)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(hang)
            await anyio.wait_all_tasks_blocked()
            assert len(backend.inflight) == 5
            connectors["svc"].cut()
        assert len(errors) == 5
        assert backend.breaker.failures == 1 and backend.breaker.state == "closed"  # one crash, not five failures
        await until(router, lambda: backend.state == "ready")
        connectors["svc"].cut()  # a second crash opens the breaker (threshold 2)...
        await until(router, lambda: backend.state == "reconnecting")
        assert backend.breaker.state == "open"
        await until(router, lambda: backend.state == "ready")  # ...and the completed reconnect half-opens it
        assert backend.breaker.state == "half_open"
        assert text_of(await call(client, "svc__echo", {"text": "healed"})) == "svc:echo:healed"
        assert backend.breaker.state == "closed"


# ---------------------------------------------------------------------------- hot reload


async def test_reload_adds_removes_and_replaces_backends_while_a_client_stays_connected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "backends.yaml"

    def write(backends: dict[str, dict[str, str]], **extra: Any) -> None:
        path.write_text(
            yaml.safe_dump(
                {"backends": [{"name": n, "command": "unused", "env": e} for n, e in backends.items()], **extra}
            )
        )

    write({"keep": {}, "drop": {}, "change": {"V": "1"}})
    config = mr.load_config(path, {})
    fakes = {name: InProcess(FakeBackend(name)) for name in ("keep", "drop", "change", "new")}
    router = mr.Router(config, connectors=fakes)
    reloader = mr.ConfigReloader(router, config, str(path), {}, connectors=fakes)
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        nonlocal changed
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    async def exposed_backends() -> set[str]:
        return {t.name.split("__")[0] for t in (await client.list_tools()).tools if "__" in t.name}

    with anyio.fail_after(20), caplog.at_level("INFO", logger="mcp_router"):
        async with router.running():
            await router.wait_ready()
            async with Client(mr.build_server(router), mode="legacy", cache=None, message_handler=on_message) as client:
                assert await exposed_backends() == {"keep", "drop", "change"}
                write({"keep": {}, "change": {"V": "2"}, "new": {}}, server={"port": 9001})
                assert reloader.check_file()
                while True:
                    changed = anyio.Event()  # before listing: a change announced meanwhile is not missed
                    if await exposed_backends() == {"keep", "change", "new"}:
                        break
                    await changed.wait()
                assert (fakes["keep"].connects, fakes["change"].connects, fakes["new"].connects) == (1, 2, 1)
                assert text_of(await call(client, "new__echo", {"text": "hi"})) == "new:echo:hi"

                path.write_text("backends: [\n")  # broken: rejected, the running backends keep serving
                assert reloader.check_file()
                assert not reloader.check_file()  # unchanged since
                assert text_of(await call(client, "keep__echo", {"text": "still"})) == "keep:echo:still"
                assert set(router.backends) == {"keep", "change", "new"}
    messages = [r.getMessage() for r in caplog.records]
    assert "server.port (MCP_PORT) changed; it takes effect when the router restarts" in messages
    assert "backend drop: removed by reload" in messages and "backend new: added by reload" in messages
    assert "backend change: changed; restarting it with its new settings" in messages
    assert any(
        m.startswith(f"config reload rejected, still running the previous one:\n  {path}: invalid YAML")
        for m in messages
    )


# ---------------------------------------------------------------------------- end to end: real processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fake_backend_command(*args: str) -> dict[str, Any]:
    return {"command": sys.executable, "args": [str(Path(__file__).resolve()), "--fake-backend", *args]}


def write_config(tmp_path: Path, backends: list[dict[str, Any]], **extra: Any) -> Path:
    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump({"backends": backends, **extra}))
    return path


def http_router_argv(config: Path, port: int, *extra: str) -> list[str]:
    """The command line of a router serving streamable HTTP on 127.0.0.1:`port`."""
    return [sys.executable, str(ROUTER), "--config", str(config), "--transport", "http", "--port", str(port),
            "--log-level", "WARNING", *extra]  # fmt: skip


def router_params(config: Path, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=[str(ROUTER), "--config", str(config), "--log-level", "WARNING", *extra]
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def pids_from(client_result: types.CallToolResult) -> int:
    return int(text_of(client_result).rsplit(":", 1)[1])


@EVENT_LOOPS
async def test_end_to_end_over_stdio_with_real_stdio_backends(tmp_path: Path, event_loop: str) -> None:
    config = write_config(
        tmp_path,
        [{"name": "one", **fake_backend_command()}, {"name": "two", **fake_backend_command("--fillers", "1200")}],
    )
    params = router_params(config, "--log-level", "INFO")
    params.env = {"MCP_EVENT_LOOP": event_loop}
    with anyio.fail_after(30), (tmp_path / "router.log").open("w+") as errlog:
        async with Client(stdio_client(params, errlog=errlog), mode="legacy", cache=None) as client:
            listings = []
            for _ in range(2):  # the second listing comes from the router's cache of encoded pages
                first = await client.session.list_tools()
                assert first.next_cursor is not None
                rest = await client.session.list_tools(params=types.PaginatedRequestParams(cursor=first.next_cursor))
                assert rest.next_cursor is None
                listings.append([t.model_dump() for t in first.tools + rest.tools])
            assert listings[0] == listings[1]
            names = [t["name"] for t in listings[0]]
            assert len(names) == len(set(names))
            assert {"one__echo", "two__echo", "one__pid", "two__tool_1199", "list_backends"} <= set(names)
            assert client.instructions == "## one\nAsk the fake nicely.\n\n## two\nAsk the fake nicely."
            assert text_of(await call(client, "two__echo", {"text": "hello"})) == "fake:echo:hello"
            death = os.pidfd_open(pids_from(await call(client, "one__pid")))
        await process_exit(death)  # stdin EOF shut the router down; its children went with it
        os.close(death)
        errlog.seek(0)
        assert f"serving MCP over stdio ({event_loop})" in errlog.read()


async def test_stdio_backends_get_their_own_env_and_the_routers_basics_but_not_its_secrets(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "one", "env": {"OWN_SETTING": "x"}, **fake_backend_command()}])
    params = router_params(config)
    params.env = {"ROUTER_SECRET_TOKEN": "s3cret", "HTTPS_PROXY": "http://proxy.invalid:3128", "LC_ALL": "C.UTF-8"}
    with anyio.fail_after(30):
        async with Client(params, mode="legacy", cache=None) as client:
            names = set(text_of(await call(client, "one__environ")).split())
    assert {"PATH", "HTTPS_PROXY", "LC_ALL", "OWN_SETTING"} <= names
    assert "ROUTER_SECRET_TOKEN" not in names


SERVING: Final = "serving streamable HTTP"
"""What an HTTP router's log says once it serves."""


@asynccontextmanager
async def watched_server(
    argv: Sequence[str], env: Mapping[str, str] | None = None, *markers: str, ready: str = SERVING
) -> AsyncIterator[tuple[Process, LogWatch]]:
    """The server run by `argv` (`env` added to this process's environment), once its log has a line with `ready`
    (by default an HTTP router's serving line); yields it and its log, which counts `markers`. On the way out a
    server still running gets SIGTERM (SIGKILL if it has not ended within 20 s), so its log is read to its end."""
    environment = {**os.environ, **(env or {})}
    async with (
        await anyio.open_process(argv, env=environment, stderr=subprocess.PIPE) as proc,
        anyio.create_task_group() as tg,
    ):
        log = LogWatch(proc.stderr, ready, *markers)
        tg.start_soon(log.read)
        try:
            with anyio.fail_after(30):
                await log.until(ready)
            yield proc, log
        finally:
            if proc.returncode is None:
                proc.terminate()
                with anyio.move_on_after(20, shield=True) as waited:
                    await proc.wait()
                if waited.cancelled_caught:
                    proc.kill()


@EVENT_LOOPS
async def test_end_to_end_over_http(tmp_path: Path, event_loop: str) -> None:
    port = free_port()
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    argv = http_router_argv(config, port, "--log-level", "INFO")
    with anyio.fail_after(30):
        async with watched_server(argv, {**os.environ, "MCP_EVENT_LOOP": event_loop}) as (proc, log):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client:
                assert "one__echo" in {t.name for t in (await client.list_tools()).tools}
                assert text_of(await call(client, "one__echo", {"text": "web"})) == "fake:echo:web"
                death = os.pidfd_open(pids_from(await call(client, "one__pid")))
                proc.send_signal(signal.SIGTERM)  # while the client holds its GET stream open
                assert await proc.wait() == 0
            await process_exit(death)
            os.close(death)
    assert any(line.endswith(f"/mcp ({event_loop})") for line in log.lines)


@asynccontextmanager
async def router_process(tmp_path: Path, transport: str, mode: str, **client_args: Any) -> AsyncIterator[Client]:
    """The router as a real subprocess over stdio or HTTP, one real stdio backend behind it, and a client."""
    # its tools ask the client and announce new tools through their session: the handshake era has the channel
    config = write_config(tmp_path, [{"name": "svc", "era": "handshake", **fake_backend_command()}])
    if transport == "stdio":
        async with Client(router_params(config), mode=mode, cache=None, **client_args) as client:
            yield client
        return
    port = free_port()
    async with watched_server(http_router_argv(config, port, "--log-level", "INFO"), os.environ) as (proc, _):
        async with Client(f"http://127.0.0.1:{port}/mcp", mode=mode, cache=None, **client_args) as client:
            yield client
        proc.terminate()
        await proc.wait()


@pytest.mark.parametrize("transport", ["stdio", "http"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_progress_cancel_server_requests_and_list_changed_end_to_end(
    tmp_path: Path, transport: str, mode: str
) -> None:
    announced = [anyio.Event()]  # replaced by the test when it expects the next list_changed

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            announced[0].set()

    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    with anyio.fail_after(40):
        async with router_process(tmp_path, transport, mode, message_handler=on_message, **ASKING_CLIENT) as client:
            await client.session.send_request(
                types.CallToolRequest(params=types.CallToolRequestParams(name="svc__progress", arguments={})),
                types.CallToolResult,
                progress_callback=on_progress,
            )
            assert seen == [1, 2, 3]

            # A backend's requests reach the client in either era (in 2026-07-28 as input_required rounds).
            assert text_of(await client.call_tool("svc__sample", {"text": "hi"})) == "sampled:HI"
            assert text_of(await client.call_tool("svc__elicit")) == "elicited:accept:{'name': 'Ada'}"
            assert text_of(await client.call_tool("svc__roots")) == "roots:file:///work"

            with anyio.move_on_after(0.5):
                await call(client, "svc__hang")
            assert text_of(await call(client, "svc__was_cancelled", {"text": "wait"})) == "cancelled:True"

            if mode == "legacy":
                await client.list_tools()
                changed = announced[0] = anyio.Event()  # the router may have announced its first listing too
                await call(client, "svc__add_tool", {"text": "late_tool"})
                await changed.wait()
            else:
                async with client.listen(tools_list_changed=True) as events:
                    await call(client, "svc__add_tool", {"text": "late_tool"})
                    async for event in events:
                        assert isinstance(event, mr.ToolsListChanged)
                        break
            assert "svc__late_tool" in {t.name for t in (await client.list_tools()).tools}


async def test_backends_and_their_children_die_with_a_sigkilled_router(tmp_path: Path) -> None:
    port = free_port()
    nested = {"command": "sh", "args": ["-c", f"{sys.executable} {Path(__file__).resolve()} --fake-backend; exit 0"]}
    config = write_config(tmp_path, [{"name": "direct", **fake_backend_command()}, {"name": "nested", **nested}])
    pidfds: list[int] = []
    try:
        async with watched_server(http_router_argv(config, port, "--log-level", "INFO"), os.environ) as (proc, _):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client:
                pids = [pids_from(await call(client, "direct__pid")), pids_from(await call(client, "nested__pid"))]
            pidfds = [os.pidfd_open(pid) for pid in pids]  # each alive now, or this raises
            proc.kill()
            with anyio.fail_after(10):
                await proc.wait()
                for pidfd in pidfds:
                    await process_exit(pidfd)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


async def process_exit(pidfd: int) -> None:
    """Returns when the process of `pidfd` has ended (a pidfd becomes readable then), whoever its parent is."""
    await anyio.wait_readable(pidfd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="escaped descendants are found through /proc")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_escaped_grandchildren_and_stubborn_backends_are_stopped_with_the_router(
    tmp_path: Path, stop: int
) -> None:
    port = free_port()
    escaper, stubborn = fake_backend_command("--escape"), fake_backend_command("--stubborn")
    config = write_config(tmp_path, [{"name": "escaper", **escaper}, {"name": "stubborn", **stubborn}])
    pidfds: list[int] = []
    try:
        async with watched_server(http_router_argv(config, port, "--log-level", "INFO"), os.environ) as (proc, _):
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client:
                names = ("escaper__pid", "escaper__escapee", "escaper__orphan", "stubborn__pid")
                pids = [pids_from(await call(client, name)) for name in names]
            pidfds = [os.pidfd_open(pid) for pid in pids]  # before the stop, so no reused pid is waited for
            assert os.getsid(pids[1]) == pids[1] != os.getpgid(pids[0])  # it did leave its backend's group
            assert os.getsid(pids[2]) == pids[2] and parent_of(pids[2]) != pids[0]  # and this one its backend's tree
            proc.send_signal(signal.Signals(stop))
            with anyio.fail_after(20):
                await proc.wait()
                for pidfd in pidfds:
                    await process_exit(pidfd)
            assert proc.returncode == (0 if stop == signal.SIGTERM else -signal.SIGKILL)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="escaped descendants are found through /proc")
@pytest.mark.parametrize("stop", ["stdin-eof", "sigterm", "sigint", "sigkill"])
async def test_a_stdio_router_stops_escaped_and_orphaned_grandchildren_however_it_stops(
    tmp_path: Path, stop: str
) -> None:
    """The escaper leaves a child in a session of its own, and an orphan of a double fork (no parent to trace it by);
    the stubborn backend ignores stdin EOF and SIGTERM. All of them end with the router, whichever way it ends."""
    escaper, stubborn = fake_backend_command("--escape"), fake_backend_command("--stubborn")
    config = write_config(tmp_path, [{"name": "escaper", **escaper}, {"name": "stubborn", **stubborn}])
    args = [sys.executable, str(ROUTER), "--config", str(config), "--log-level", "WARNING"]
    pidfds: list[int] = []
    async with await anyio.open_process(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        lines = TextReceiveStream(proc.stdout)
        buffer = ""

        async def ask(request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
            nonlocal buffer
            message = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            await proc.stdin.send(json.dumps(message).encode() + b"\n")  # type: ignore[union-attr]
            while True:
                while "\n" not in buffer:
                    buffer += await lines.receive()
                line, buffer = buffer.split("\n", 1)
                if (answer := json.loads(line)).get("id") == request_id:
                    return answer["result"]

        try:
            with anyio.fail_after(30):
                info = {"name": "t", "version": "1"}
                await ask(0, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": info})
                await proc.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
                pids = []
                for i, name in enumerate(("escaper__pid", "escaper__escapee", "escaper__orphan", "stubborn__pid"), 1):
                    result = await ask(i, "tools/call", {"name": name, "arguments": {}})
                    pids.append(int(result["content"][0]["text"].rsplit(":", 1)[1]))
            pidfds = [os.pidfd_open(pid) for pid in pids]  # before the stop, so no reused pid is waited for
            assert os.getsid(pids[2]) == pids[2] and parent_of(pids[2]) != pids[0]  # it left its backend's tree
            if stop == "stdin-eof":
                await proc.stdin.aclose()
            else:
                proc.send_signal({"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}[stop])
            with anyio.fail_after(20):
                await proc.wait()
                for pidfd in pidfds:
                    await process_exit(pidfd)
            assert proc.returncode == (-signal.SIGKILL if stop == "sigkill" else 0)
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
            if proc.returncode is None:
                proc.kill()


STUBBORN_WITH_ESCAPEE = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited: its escapee ignores SIGTERM too
code = "import os, time; os.setsid(); print(os.getpid(), flush=True); time.sleep(120)"
escapee = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
print(escapee.stdout.readline().decode().strip(), flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="escaped descendants are found through /proc")
async def test_a_stubborn_backend_and_its_stubborn_escapee_are_stopped_within_one_stop_grace() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", STUBBORN_WITH_ESCAPEE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stdin is not None
    escapee = int(process.stdout.readline())
    pidfd = os.pidfd_open(escapee)
    try:
        escaped = mr.escaped_descendants({process.pid}, None)
        assert set(escaped) == {escapee}
        process.stdin.close()
        # both ignore stdin EOF and SIGTERM: SIGKILL reaches them one stop grace in, not one for each
        with anyio.fail_after(mr.STOP_GRACE * 1.5):
            await mr._stop(process, escaped)
            await process_exit(pidfd)
    finally:
        os.close(pidfd)
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


async def test_a_sigkilled_stdio_backend_comes_back_while_the_others_keep_answering(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        [{"name": "victim", **fake_backend_command()}, {"name": "steady", **fake_backend_command()}],
        routing={"retry": {"max_backoff_seconds": 0.5}},
    )
    with anyio.fail_after(30):
        async with Client(router_params(config), mode="legacy", cache=None) as client:
            old_pid = pids_from(await call(client, "victim__pid"))
            answers: list[str] = []

            async def keep_calling() -> None:
                for i in range(50):
                    answers.append(text_of(await call(client, "steady__echo", {"text": str(i)})))

            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_calling)
                os.kill(old_pid, signal.SIGKILL)
            assert answers == [f"fake:echo:{i}" for i in range(50)]
            while True:  # back within max_backoff plus start-up: the test's fail_after bounds it
                try:
                    new_pid = pids_from(await call(client, "victim__pid"))
                    break
                except MCPError:
                    await anyio.sleep(0.05)
            assert new_pid != old_pid
            assert "victim__echo" in {t.name for t in (await client.list_tools()).tools}
            health = await call(client, "get_backend_health", {"name": "victim"})
            assert health.structured_content and health.structured_content["restarts"] >= 1


async def test_broken_backends_are_reported_and_the_others_served(tmp_path: Path) -> None:
    broken: list[dict[str, Any]] = [
        {"name": "garbage", "command": "sh", "args": ["-c", "echo this is not json-rpc; sleep 30"], "timeout": 1},
        {"name": "early-exit", "command": "sh", "args": ["-c", "exit 3"]},
        {"name": "silent", "command": "sh", "args": ["-c", "sleep 30"], "timeout": 1},
        {"name": "missing", "command": "/nonexistent/mcp-server"},
    ]
    config = write_config(tmp_path, [{"name": "good", **fake_backend_command()}, *broken])
    with anyio.fail_after(30):
        async with Client(router_params(config), mode="legacy", cache=None) as client:
            assert text_of(await call(client, "good__echo", {"text": "fine"})) == "fake:echo:fine"
            listed = await call(client, "list_backends")
    assert listed.structured_content
    rows = {r["name"]: r for r in listed.structured_content["backends"]}
    assert rows["good"]["state"] == "ready"
    assert "no answer to connecting and initialize within 1s" in rows["garbage"]["last_error"]
    assert "no answer to connecting and initialize within 1s" in rows["silent"]["last_error"]
    assert all(rows[b["name"]]["state"] == "failing" and rows[b["name"]]["consecutive_failures"] >= 1 for b in broken)
    assert all(rows[b["name"]]["next_retry_in_seconds"] is not None for b in broken)
    assert "handshake" in rows["early-exit"]["last_error"]
    assert rows["missing"]["last_error"] == "cannot run '/nonexistent/mcp-server': No such file or directory"
    assert all(rows[b["name"]]["state"] != "ready" for b in broken)


@asynccontextmanager
async def not_found_server() -> AsyncIterator[int]:
    """An HTTP server on 127.0.0.1 that answers every request 404 with the request line (which echoes the URL)."""

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                request_line = (await stream.receive()).split(b"\r\n", 1)[0]
                await stream.send(
                    b"HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(request_line), request_line)
                )

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        yield listener.extra(anyio.abc.SocketAttribute.local_port)
        tg.cancel_scope.cancel()


async def test_secrets_in_args_and_url_paths_never_reach_status_errors_or_logs(tmp_path: Path) -> None:
    errors = tmp_path / "stderr.log"
    async with not_found_server() as port:
        keyed = {"name": "keyed", "url": f"http://127.0.0.1:{port}/mcp/${{KEY}}/sse", "transport": "sse", "timeout": 5}
        flagged = {"name": "flagged", **fake_backend_command()}
        flagged["args"] += ["--token", "${KEY}"]
        config = write_config(tmp_path, [keyed, flagged])
        params = router_params(config, "--log-level", "DEBUG")
        params.env = {**os.environ, "KEY": SECRET}
        with anyio.fail_after(30), errors.open("w") as errlog:
            async with Client(stdio_client(params, errlog), mode="legacy", cache=None) as client:
                listed = await call(client, "list_backends")
                health = await call(client, "get_backend_health", {"name": "keyed"})
                with pytest.raises(MCPError) as unknown:
                    await client.call_tool("keyed__anything", {})
    assert listed.structured_content is not None and health.structured_content is not None
    rows = {r["name"]: r for r in listed.structured_content["backends"]}
    assert rows["keyed"]["target"] == f"http://127.0.0.1:{port}/mcp/***/sse"
    assert rows["flagged"]["target"].endswith("test_mcp_router.py") and rows["flagged"]["state"] == "ready"
    assert "404" in health.structured_content["last_error"] and "***" in health.structured_content["last_error"]
    assert "not listed yet: backend 'keyed'" in unknown.value.error.message
    everything = (
        json.dumps([listed.model_dump(), health.model_dump()]) + unknown.value.error.message + errors.read_text()
    )
    assert "mcp/***/sse" in errors.read_text()  # the log says what failed, with the key shown as ***
    assert SECRET not in everything


async def test_zero_config_serves_the_management_tools(tmp_path: Path) -> None:
    params = StdioServerParameters(command=sys.executable, args=[str(ROUTER)], cwd=str(tmp_path))
    with anyio.fail_after(20):
        async with Client(params, mode="legacy", cache=None) as client:
            assert {t.name for t in (await client.list_tools()).tools} == set(mr.MANAGEMENT_TOOLS)
            assert "no backends configured" in text_of(await call(client, "list_backends"))


RAW_BACKEND = """
import json, os, sys, time
mode = sys.argv[1]
def send(message):
    sys.stdout.write(json.dumps(message) + "\\n"); sys.stdout.flush()
for line in sys.stdin:
    message = json.loads(line)
    if message.get("method") == "initialize":
        send({"jsonrpc": "2.0", "id": message["id"], "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
              "serverInfo": {"name": "raw", "version": "1"}}})
    elif message.get("method") == "tools/list":
        send({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}})
    elif message.get("method") == "server/discover":  # a 1.x server's answer: the router shakes hands instead
        send({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "Method not found"}})
    elif message.get("method") == "tools/call":
        if mode == "deaf":
            time.sleep(60)  # stops reading: the router's writes pile up in the pipe
        os.close(1)  # mute: closes stdout but stays alive
        time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["deaf", "mute"])
async def test_a_backend_that_stops_reading_or_writing_fails_the_call_within_its_timeout(
    tmp_path: Path, mode: str
) -> None:
    script = tmp_path / "raw_backend.py"
    script.write_text(RAW_BACKEND)
    config = write_config(
        tmp_path, [{"name": "raw", "command": sys.executable, "args": [str(script), mode], "timeout": 1}]
    )
    with anyio.fail_after(30):
        async with Client(router_params(config), mode="legacy", cache=None) as client:
            for _ in range(2):  # the first is read, then the backend stops; the second cannot even be written
                with pytest.raises(MCPError) as info:
                    await call(client, "raw__echo", {"text": "x" * 300_000})  # more than a pipe holds
                assert info.value.code in (types.REQUEST_TIMEOUT, mr.BACKEND_UNAVAILABLE)
            if mode == "mute":  # the closed stdout reaches the router, which restarts the backend
                while ((await call(client, "get_backend_health", {"name": "raw"})).structured_content or {})[
                    "restarts"
                ] < 1:
                    await anyio.sleep(0.05)


async def test_malformed_lines_from_a_client_get_json_rpc_errors_and_the_router_keeps_serving(tmp_path: Path) -> None:
    async with await anyio.open_process([sys.executable, str(ROUTER)], cwd=tmp_path) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        buffer = b""

        async def exchange(line: bytes) -> dict[str, Any]:
            nonlocal buffer
            await proc.stdin.send(line + b"\n")  # type: ignore[union-attr]
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive()  # type: ignore[union-attr]
            answer, buffer = buffer.split(b"\n", 1)
            return json.loads(answer)

        with anyio.fail_after(20):
            init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
            assert "result" in await exchange(
                json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}).encode()
            )
            await proc.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
            assert (await exchange(b"this is not json"))["error"]["code"] == -32700
            bad = await exchange(b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": [1]}')
            assert (bad["id"], bad["error"]["code"]) == (7, types.INVALID_REQUEST)
            assert (await exchange(b'{"jsonrpc": "2.0", "id": 8, "method": "ping"}')) == {
                "jsonrpc": "2.0",
                "id": 8,
                "result": {},
            }
            await proc.stdin.aclose()


async def test_a_sigkilled_replica_costs_no_call_the_very_next_one_included() -> None:
    config = mr.parse_config(
        {"backends": [{"name": n, "namespace": "pool", **fake_backend_command()} for n in ("one", "two")]}, {}
    )
    router = mr.Router(config)
    with anyio.fail_after(30):
        async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
            await router.wait_ready()
            pids = {}
            for _ in range(2):  # capability routing takes turns between equals
                result = await call(client, "pool__pid")
                pids[result.meta[mr.ROUTER_META_KEY]] = pids_from(result)  # type: ignore[index]
            assert set(pids) == {"one", "two"}
            death = os.pidfd_open(pids["one"])
            os.kill(pids["one"], signal.SIGKILL)
            await anyio.wait_readable(death)  # it is dead: its pipe is broken, whether or not the router has noticed
            os.close(death)
            for i in range(10):  # echo may not be re-sent once it may have run: none of these reached the dead one
                result = await call(client, "pool__echo", {"text": str(i)})
                assert text_of(result) == f"fake:echo:{i}"
            assert result.meta == {mr.ROUTER_META_KEY: "two"} or router.backends["one"].state == "ready"


INVALID_BACKEND = """
import json, sys
def send(message):
    sys.stdout.write(json.dumps(message) + "\\n"); sys.stdout.flush()
for line in sys.stdin:
    message = json.loads(line)
    method, rid = message.get("method"), message.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": rid, "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
              "serverInfo": {"name": "invalid", "version": "1"}}})
    elif method == "tools/list":
        tools = ["a bare string", {"name": 5}, {"name": "shape", "inputSchema": {"type": "object"}}]
        send({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}})
    elif method == "tools/call":
        shape = message["params"]["arguments"]["shape"]
        send({"null": {"jsonrpc": "2.0", "id": rid, "result": None},
              "list": {"jsonrpc": "2.0", "id": rid, "result": [1]},
              "no-code": {"jsonrpc": "2.0", "id": rid, "error": {"message": "x"}},
              "no-id": {"jsonrpc": "2.0", "result": {"content": []}},
              "wrong-id": {"jsonrpc": "2.0", "id": 10**6, "result": {"content": []}},
              "null-id-error": {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}},
              "no-content": {"jsonrpc": "2.0", "id": rid, "result": {"content": "text"}},
              "fine": {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "fine"}]}},
              "twice": {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "once"}]}}}[shape])
        if shape == "twice":  # the same answer again: a late one, for a call that has had its answer
            send({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": "twice"}]}})
    elif rid is not None:
        send({"jsonrpc": "2.0", "id": rid, "result": {}})
"""


async def test_invalid_list_items_and_invalid_answers_cost_nothing_but_themselves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = tmp_path / "invalid_backend.py"
    script.write_text(INVALID_BACKEND)
    config = mr.parse_config(
        {"backends": [{"name": "raw", "command": sys.executable, "args": [str(script)], "timeout": 60}]}, {}
    )
    router = mr.Router(config)
    with anyio.fail_after(20):  # a call waiting out the 60 s timeout fails the test
        async with router.running(), Client(mr.build_server(router), mode="legacy", cache=None) as client:
            await router.wait_ready()
            assert router.backends["raw"].state == "ready"
            assert [t.name for t in (await client.list_tools()).tools if t.name not in mr.MANAGEMENT_TOOLS] == [
                "raw__shape"
            ]
            for shape in ("null", "list", "no-code", "no-id", "wrong-id", "null-id-error"):
                with pytest.raises(MCPError) as info:
                    await call(client, "raw__shape", {"shape": shape})
                assert (
                    info.value.code == types.INTERNAL_ERROR
                    and "backend 'raw' sent an invalid answer" in info.value.message
                )
            with pytest.raises(MCPError) as info:
                await call(client, "raw__shape", {"shape": "no-content"})
            assert "invalid tools/call result: content is not a list" in info.value.message
            assert text_of(await call(client, "raw__shape", {"shape": "twice"})) == "once"
            assert (
                text_of(await call(client, "raw__shape", {"shape": "fine"})) == "fine"
            )  # the late answer cost nothing
            assert router.backends["raw"].breaker.failures == 0  # answered, however badly: no transport failure
    warnings = [r.getMessage() for r in caplog.records if "invalid Tool items" in r.getMessage()]
    assert len(warnings) == 1 and "#0" in warnings[0] and "#1" in warnings[0] and "backend raw" in warnings[0]


async def test_an_sse_backend_that_never_answers_fails_within_its_timeout() -> None:
    with socket.socket() as listener:  # accepts the TCP connection, then says nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/sse"
        config = mr.parse_config({"backends": [{"name": "mute", "url": url, "transport": "sse", "timeout": 1}]}, {})
        router = mr.Router(config)
        with anyio.fail_after(20):
            async with router.running():
                await until(router, lambda: router.backends["mute"].state == "failing")
                assert "no answer to connecting and initialize within 1s" in (router.backends["mute"].last_error or "")


def nested_request(request_id: int, depth: int, *, closed: bool = True, method: str = "tools/call") -> bytes:
    """A tools/call whose arguments nest lists until the whole message is `depth` levels deep."""
    lists = "[" * (depth - 3) + ("]" * (depth - 3) if closed else "")
    tail = "}}}" if closed else ""
    return f'{{"jsonrpc":"2.0","id":{request_id},"method":"{method}","params":{{"name":"list_backends","arguments":{{"a":{lists}{tail}'.encode()


async def test_hostile_client_lines_are_answered_and_the_router_keeps_serving(tmp_path: Path) -> None:
    errors = tmp_path / "stderr.txt"
    with errors.open("wb") as stderr:
        proc = await anyio.open_process([sys.executable, str(ROUTER)], cwd=tmp_path, stderr=stderr)
    async with proc:
        assert proc.stdin is not None and proc.stdout is not None
        buffer = b""

        async def exchange(line: bytes) -> dict[str, Any]:
            nonlocal buffer
            await proc.stdin.send(line + b"\n")  # type: ignore[union-attr]
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive()  # type: ignore[union-attr]
            answer, buffer = buffer.split(b"\n", 1)
            return json.loads(answer)

        def error_of(answer: dict[str, Any]) -> tuple[Any, int, str]:
            return answer["id"], answer["error"]["code"], answer["error"]["message"]

        with anyio.fail_after(20):
            early = await exchange(
                b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_backends"}}'
            )
            assert error_of(early)[:2] == (1, types.INVALID_REQUEST) and "handshake is missing" in error_of(early)[2]
            init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
            assert "result" in await exchange(
                json.dumps({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": init}).encode()
            )
            await proc.stdin.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')

            deep = nested_request(3, 975)
            assert len(deep) < 2100  # the 2 KB line that used to stop the router
            assert error_of(await exchange(deep)) == (
                3,
                types.INVALID_REQUEST,
                "Invalid request: nested more than 201 levels deep",
            )
            assert error_of(await exchange(nested_request(4, 5000)))[:2] == (4, types.INVALID_REQUEST)
            assert error_of(await exchange(nested_request(5, 202)))[:2] == (5, types.INVALID_REQUEST)
            assert error_of(await exchange(nested_request(6, 975, closed=False)))[:2] == (None, types.PARSE_ERROR)
            notification = (
                b'{"jsonrpc":"2.0","method":"notifications/progress","params":' + b"[" * 975 + b"]" * 975 + b"}"
            )
            await proc.stdin.send(notification + b"\n")  # no answer: the ping's answer comes next
            assert await exchange(b'{"jsonrpc": "2.0", "id": 7, "method": "ping"}') == {
                "jsonrpc": "2.0",
                "id": 7,
                "result": {},
            }
            served = await exchange(nested_request(8, 201))  # as deep as it gets, and served
            assert served["id"] == 8 and "backends" in served["result"]["structuredContent"]

            for bad_id in ("null", '{"a": 1}', "true", "1.5"):
                answer = await exchange(f'{{"jsonrpc": "2.0", "id": {bad_id}, "method": "ping"}}'.encode())
                assert error_of(answer)[:2] == (None, types.INVALID_REQUEST) and "id must be" in error_of(answer)[2]

            cursor = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "tools/list", "params": {"cursor": "9" * 5000}})
            assert error_of(await exchange(cursor.encode()))[:2] == (9, types.INVALID_PARAMS)
            assert "Invalid cursor" in error_of(await exchange(cursor.encode()))[2]
            assert await exchange(b'{"jsonrpc": "2.0", "id": 10, "method": "ping"}') == {
                "jsonrpc": "2.0",
                "id": 10,
                "result": {},
            }
            await proc.stdin.aclose()
            assert await proc.wait() == 0
    assert "Traceback" not in errors.read_text()


FLOOD_BACKEND = """
import json, sys
def send(message):
    sys.stdout.write(json.dumps(message) + "\\n")
for line in sys.stdin:
    message = json.loads(line)
    method, request_id = message.get("method"), message.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": request_id, "result": {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}, "logging": {}},
              "serverInfo": {"name": "flood", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": [{"name": "flood", "inputSchema": {"type": "object"}}]}})
    elif method == "tools/call":
        arguments = message["params"]["arguments"]
        for i in range(arguments["count"]):
            send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "logger": "flood", "data": f"line {i} " + "x" * 200}})
        send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": "flooded"}]}})
        sys.stdout.flush()
        with open(arguments["fifo"], "w") as done:
            done.write("flooded\\n")
    elif request_id is not None:
        send({"jsonrpc": "2.0", "id": request_id, "result": {}})
    sys.stdout.flush()
"""
"""A stdio backend whose one tool sends `count` log messages at once, then its result, then a line to `fifo`."""


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
@pytest.mark.parametrize("reads_after", [True, False])
async def test_a_client_that_does_not_read_while_a_backend_floods_costs_bounded_memory(
    tmp_path: Path, reads_after: bool
) -> None:
    """20,000 log lines (5 MB of JSON) at a client that reads nothing: the router grew from 75 to 280 MB."""
    fifo = tmp_path / "flooded"
    os.mkfifo(fifo)
    script = tmp_path / "flood_backend.py"
    script.write_text(FLOOD_BACKEND)
    config = write_config(tmp_path, [{"name": "svc", "command": sys.executable, "args": [str(script)]}])
    args = [sys.executable, str(ROUTER), "--config", str(config), "--log-level", "ERROR"]
    async with await anyio.open_process(args, stderr=None) as proc:
        assert proc.stdin is not None and proc.stdout is not None

        async def send(message: dict[str, Any]) -> None:
            await proc.stdin.send(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")  # type: ignore[union-attr]

        with anyio.fail_after(30):
            init = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
            await send({"id": 1, "method": "initialize", "params": init})
            assert b'"id":1' in await proc.stdout.receive()
            await send({"method": "notifications/initialized"})
            await send({"id": 2, "method": "logging/setLevel", "params": {"level": "debug"}})
            flood = {"name": "svc__flood", "arguments": {"count": 20_000, "fifo": str(fifo)}}
            await send({"id": 3, "method": "tools/call", "params": flood})
            done = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:  # the backend has written every line when it writes here
                await anyio.wait_readable(done)
                assert os.read(done, 100) == b"flooded\n"
            finally:
                os.close(done)
            assert rss_mb(proc.pid) < 150  # 75 MB at rest: bounded queues keep it there
            if reads_after:  # a slow client, not a dead one: the result still comes, after what was queued
                received = b""
                while b'"id":3,' not in received:
                    received += await proc.stdout.receive()
                assert b'"isError"' not in received
                # the queue, plus what the pipe and the router's write buffer held (64 KB each)
                assert received.count(b"notifications/message") <= mr.NOTIFICATION_QUEUE_BOUND + 1_000
                await send({"id": 4, "method": "tools/call", "params": {"name": "list_backends"}})
                while b'"id":4,' not in received:
                    received += await proc.stdout.receive()
                answer = json.loads(received[received.rindex(b'{"jsonrpc":"2.0","id":4,') :].split(b"\n")[0])
                clients = answer["result"]["structuredContent"]["clients"]
                unsent = 20_000 - received.count(b"line ") - clients["dropped_log_messages"]  # still queued
                assert clients["connected"] == 1 and 0 <= unsent <= mr.NOTIFICATION_QUEUE_BOUND
            await proc.stdin.aclose()  # stdin EOF: the router exits, reading on or not
            assert await proc.wait() == 0


async def test_sighup_reloads_the_config_instead_of_stopping(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    with anyio.fail_after(30):
        async with Client(router_params(config), mode="legacy", cache=None, message_handler=on_message) as client:
            router_pid = pids_from(await call(client, "one__ppid"))  # the router is the backend's parent
            write_config(
                tmp_path, [{"name": "one", **fake_backend_command()}, {"name": "two", **fake_backend_command()}]
            )
            os.kill(router_pid, signal.SIGHUP)
            while True:
                changed = anyio.Event()  # before listing: a change announced meanwhile is not missed
                if "two__echo" in {t.name for t in (await client.list_tools()).tools}:
                    break
                await changed.wait()
            assert text_of(await call(client, "two__echo", {"text": "new"})) == "fake:echo:new"
            assert text_of(await call(client, "one__echo", {"text": "old"})) == "fake:echo:old"


def test_a_busy_port_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [sys.executable, str(ROUTER), "--transport", "http", "--port", str(port)]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 1
    assert f"cannot serve HTTP on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


async def test_http_connections_are_served_without_nagle_delays() -> None:
    """With Nagle on, an answer written in two parts waits for the client's delayed ACK: 40 ms a call."""
    accepted: list[asyncio.BaseTransport] = []
    connected = anyio.Event()

    class Remember(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)
            connected.set()

    listening = mr.bind("127.0.0.1", 0)
    async with await asyncio.get_running_loop().create_server(Remember, sock=listening):  # as uvicorn serves it
        with socket.create_connection(listening.getsockname()):
            with anyio.fail_after(5):
                await connected.wait()
            assert accepted[0].get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_bad_config_exits_2_with_every_problem_and_no_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "a", "url": "localhost:8000"}, {"name": "a", "command": "x", "prio": 1}])
    proc = subprocess.run(
        [sys.executable, str(ROUTER), "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert f"{config}: backends[0].url: expected an http(s) URL, got 'localhost:8000'" in proc.stderr
    assert "backends[1].prio: unknown key (did you mean 'priority'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_an_alias_bomb_config_exits_2_with_a_clear_message_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "backends.yaml"
    config.write_text(ALIAS_BOMB)
    proc = subprocess.run(
        [sys.executable, str(ROUTER), "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert f"{config}: invalid YAML: line 5, column 8: aliases expand to more than 10,000 values" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------------------- the HTTP service

MCP_ACCEPT: dict[str, str] = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
HELLO: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}


def rpc(request_id: int, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


@asynccontextmanager
async def served(
    *fakes: FakeBackend, server: dict[str, Any] | None = None, **backend_keys: Any
) -> AsyncIterator[tuple[httpx2.AsyncClient, mr.Router, dict[str, InProcess]]]:
    """The router's HTTP app over in-process fakes, served by uvicorn on 127.0.0.1, and an HTTP client for it."""
    connectors = {f.name: InProcess(f) for f in fakes}
    router = mr.Router(
        config_for(*connectors, settings={"server": server or {}}, **backend_keys), connectors=connectors
    )
    async with router.running(), uvicorn_serving(mr.http_app(router, mr.build_server(router))) as base:
        await router.wait_ready()
        async with httpx2.AsyncClient(base_url=base, headers=MCP_ACCEPT) as http:
            yield http, router, connectors


async def open_session(http: httpx2.AsyncClient, **headers: str) -> dict[str, str]:
    opened = await http.post("/mcp", json=HELLO, headers=headers)
    assert opened.status_code == 200, opened.text
    session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25", **headers}
    await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
    return session


def mcp_url(http: httpx2.AsyncClient) -> str:
    """The MCP endpoint of the router that `served` serves to `http`, for an SDK client."""
    return str(http.base_url.join("/mcp"))


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_closing_a_calls_http_stream_cancels_the_call_at_the_backend(mode: str) -> None:
    """2026-07-28 has no client notifications over HTTP: the SDK client cancels by closing the request's stream."""
    fake = FakeBackend("svc")
    with anyio.fail_after(20):
        async with served(fake) as (http, _, _), Client(mcp_url(http), mode=mode, cache=None) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, client, "svc__hang")
                await fake.hang_started.wait()
                tg.cancel_scope.cancel()  # the client gives up on the call
            await fake.cancelled.wait()
            assert text_of(await call(client, "svc__echo", {"text": "after"})) == "svc:echo:after"


async def test_over_http_a_2026_client_gets_its_calls_logs_on_the_calls_own_stream_before_the_result() -> None:
    """A 2026-era client opens no other stream: what reaches it came on the POST that carried the call."""
    fake = FakeBackend("svc")
    recorder = LogRecorder()
    with anyio.fail_after(20):
        async with (
            served(fake) as (http, _, _),
            Client(mcp_url(http), cache=None, log_level="info", logging_callback=recorder) as client,
        ):
            assert client.protocol_version in mr.MODERN_PROTOCOL_VERSIONS
            assert text_of(await call(client, "svc__log")) == "svc:log:"
            assert recorder.logs == SVC_LOGS[1:]


@asynccontextmanager
async def http_router(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, backends: list[dict[str, Any]] | None = None
) -> AsyncIterator[tuple[str, LogWatch]]:
    """The router as a real HTTP subprocess on 127.0.0.1 (by default one stdio fake behind it), once it serves and a
    backend is ready (as /readyz says by default); yields its URL and its log, read to its end when the block ends."""
    config = write_config(tmp_path, backends or [{"name": "one", **fake_backend_command()}])
    port = free_port()
    command = [sys.executable, str(ROUTER), "--config", str(config), "--transport", "http", "--port", str(port)]
    command += ["--log-level", "INFO", *args]
    async with watched_server(command, env, ": ready (") as (_, log):
        with anyio.fail_after(30):
            await log.until(": ready (")
        yield f"http://127.0.0.1:{port}", log


@asynccontextmanager
async def authorized_client(url: str, token: str) -> AsyncIterator[Client]:
    """A client sending `token`; its HTTP client is ours to close (the SDK leaves a client it was given open)."""
    async with (
        httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}) as http,
        Client(mr.streamable_http_client(f"{url}/mcp", http_client=http), mode="legacy", cache=None) as client,
    ):
        yield client


async def test_http_refuses_a_missing_or_wrong_token_and_serves_the_right_one(tmp_path: Path) -> None:
    async with http_router(tmp_path, env={"MCP_AUTH_TOKEN": "s3cret-token"}) as (url, log):
        async with httpx2.AsyncClient(base_url=url, headers=MCP_ACCEPT) as http:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic czNjcmV0LXRva2Vu"}):
                refused = await http.post("/mcp", json=HELLO, headers=headers)
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
            assert (await http.get("/healthz")).status_code == 200  # operations endpoints stay outside auth
        with anyio.fail_after(20):
            async with authorized_client(url, "s3cret-token") as client:
                assert text_of(await call(client, "one__echo", {"text": "in"})) == "fake:echo:in"
    assert "s3cret-token" not in "\n".join(log.lines)


async def test_tokens_rotate_through_the_tokens_file_without_a_restart(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one a line\nold-token\n")
    async with (
        http_router(tmp_path, "--auth-tokens-file", str(tokens)) as (url, _),
        httpx2.AsyncClient(base_url=url) as http,
    ):

        async def status(token: str) -> int:
            headers = {**MCP_ACCEPT, "authorization": f"Bearer {token}"}
            return (await http.post("/mcp", json=HELLO, headers=headers)).status_code

        assert (await status("old-token"), await status("new-token")) == (200, 401)
        rotated = tmp_path / "tokens.next"
        rotated.write_text("new-token\n")
        rotated.replace(tokens)
        assert (await status("old-token"), await status("new-token")) == (401, 200)


def test_a_non_loopback_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    args = [sys.executable, str(ROUTER), "--transport", "http", "--host", "0.0.0.0", "--port", str(free_port())]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        "without authentication" in proc.stderr
        and "MCP_AUTH_TOKEN" in proc.stderr
        and "--allow-unauthenticated" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_a_jwks_url_without_issuer_and_audience_is_a_clear_error() -> None:
    settings = mr.parse_config({"server": {"auth": {"jwks_url": "https://idp.example.com/jwks"}}}, {}).settings
    assert mr.http_service_problems(settings) == [
        "server.auth.jwks_url needs server.auth.issuer and server.auth.resource_url (the tokens' iss and aud)"
    ]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_bad_host_and_origin_are_refused_whatever_the_bind_address(host: str) -> None:
    # the app is configured for `host` but served on 127.0.0.1: tests never listen beyond loopback
    async with served(FakeBackend("svc"), server={"host": host, "allowed_hosts": ["mcp.example.com"]}) as (http, _, _):
        assert (await http.post("/mcp", json=HELLO, headers={"host": "evil.example"})).status_code == 421
        assert (await http.post("/mcp", json=HELLO, headers={"origin": "http://evil.example"})).status_code == 403
        assert (await http.post("/mcp", json=HELLO, headers={"host": "mcp.example.com"})).status_code == 200
        assert (await http.post("/mcp", json=HELLO, headers={"origin": "http://localhost:3000"})).status_code == 200
        assert (await http.options("/mcp", headers={"origin": "http://localhost:3000"})).headers.get(
            "access-control-allow-origin"
        ) is None
        session = await open_session(http)  # a call on an open session is checked as every request is
        echo = rpc(2, "tools/call", {"name": "svc__echo", "arguments": {"text": "hi"}})
        assert (await http.post("/mcp", json=echo, headers={**session, "host": "evil.example"})).status_code == 421
        assert (
            await http.post("/mcp", json=echo, headers={**session, "origin": "http://evil.example"})
        ).status_code == 403
        assert (await http.post("/mcp", json=echo, headers=session)).json()["result"]["content"][0][
            "text"
        ] == "svc:echo:hi"


async def test_a_stateless_router_answers_a_call_with_no_session_and_checks_it_as_every_request() -> None:
    async with served(FakeBackend("svc"), server={"stateless": True}) as (http, _, _):
        echo = rpc(2, "tools/call", {"name": "svc__echo", "arguments": {"text": "hi"}})
        answer = await http.post("/mcp", json=echo)
        assert answer.status_code == 200 and "mcp-session-id" not in answer.headers
        assert answer.json()["id"] == 2 and answer.json()["result"]["content"][0]["text"] == "svc:echo:hi"
        assert (await http.post("/mcp", json=echo, headers={"origin": "http://evil.example"})).status_code == 403
        assert (await http.post("/mcp", json=echo, headers={"accept": "text/event-stream"})).status_code == 406
        unknown = await http.post("/mcp", json=rpc(3, "tools/call", {"name": "nope", "arguments": {}}))
        assert unknown.json()["error"]["code"] == types.INVALID_PARAMS and "nope" in unknown.json()["error"]["message"]


async def test_a_call_ends_with_its_session_and_only_a_checked_cancel_reaches_it() -> None:
    fake = FakeBackend("svc")
    async with served(fake) as (http, _, _):
        session = await open_session(http)
        answers: list[httpx2.Response] = []

        async def hang() -> None:
            answers.append(await http.post("/mcp", json=rpc(2, "tools/call", {"name": "svc__hang"}), headers=session))

        async with anyio.create_task_group() as tg:
            tg.start_soon(hang)
            await fake.hang_started.wait()
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 2}}
            rebound = await http.post("/mcp", json=cancel, headers={**session, "host": "evil.example"})
            assert rebound.status_code == 421  # refused as every request from a rebound name is
            unhashable = {**cancel, "params": {"requestId": [2]}}
            assert (await http.post("/mcp", json=unhashable, headers=session)).status_code < 500
            assert not fake.cancelled.is_set()
            assert (await http.delete("/mcp", headers=session)).status_code == 200
            await fake.cancelled.wait()  # the session's end ends its call at the backend
        assert answers[0].json()["error"]["code"] == mr.REQUEST_CANCELLED


async def test_a_backends_roots_request_during_a_call_reaches_a_client_with_no_get_stream() -> None:
    """Outside the call's own stream the client could be reached only on a GET stream, which this one never opens."""
    fake = FakeBackend("svc")
    hello = {**HELLO, "params": {**HELLO["params"], "capabilities": {"roots": {"listChanged": True}}}}
    async with served(fake, era="handshake") as (http, _, _):
        opened = await http.post("/mcp", json=hello)
        session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-11-25"}
        await http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
        with anyio.fail_after(10):
            call = rpc(5, "tools/call", {"name": "svc__roots", "arguments": {}})
            async with http.stream("POST", "/mcp", json=call, headers=session) as streamed:
                async for line in streamed.aiter_lines():
                    message = json.loads(line[len("data:") :]) if line.startswith("data:") else {}
                    if message.get("method") == "roots/list":
                        roots = {"jsonrpc": "2.0", "id": message["id"], "result": {"roots": [{"uri": "file:///x"}]}}
                        await http.post("/mcp", json=roots, headers=session)
                    elif message.get("id") == 5:
                        break
    assert message["result"]["content"][0]["text"] == "roots:file:///x"


async def test_a_session_serves_only_the_token_that_opened_it(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-ada\ntoken-of-bob\n")
    async with served(FakeBackend("svc"), server={"auth": {"tokens_file": str(tokens)}}) as (http, _, _):
        ada, bob = {"authorization": "Bearer token-of-ada"}, {"authorization": "Bearer token-of-bob"}
        session = await open_session(http, **ada)
        echo = rpc(2, "tools/call", {"name": "svc__echo", "arguments": {"text": "hi"}})
        assert (await http.post("/mcp", json=echo, headers={**session, **bob})).status_code == 404  # as if none
        assert (await http.post("/mcp", json=echo, headers=session)).json()["result"]["content"][0][
            "text"
        ] == "svc:echo:hi"


async def test_cors_answers_only_the_configured_origins() -> None:
    async with served(FakeBackend("svc"), server={"cors_origins": ["https://app.example.com"]}) as (http, _, _):
        preflight = {"origin": "https://app.example.com", "access-control-request-method": "POST"}
        allowed = await http.options("/mcp", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        opened = await http.post("/mcp", json=HELLO, headers={"origin": "https://app.example.com"})
        assert opened.status_code == 200 and "mcp-session-id" in opened.headers["access-control-expose-headers"].lower()


async def test_a_body_over_the_limit_gets_413_and_the_next_request_is_served() -> None:
    async with served(FakeBackend("svc"), server={"limits": {"max_body_bytes": 100_000}}) as (http, _, _):
        session = await open_session(http)
        big = rpc(2, "tools/call", {"name": "svc__echo", "arguments": {"text": "x" * 200_000}})
        refused = await http.post("/mcp", json=big, headers=session)
        assert refused.status_code == 413
        assert (
            refused.json()["error"]["code"] == types.INVALID_REQUEST
            and "max_body_bytes" in refused.json()["error"]["message"]
        )
        fine = await http.post(
            "/mcp",
            json=rpc(3, "tools/call", {"name": "svc__echo", "arguments": {"text": "x" * 50_000}}),
            headers=session,
        )
        assert fine.status_code == 200 and fine.json()["result"]["content"][0]["text"] == "svc:echo:" + "x" * 50_000


@asynccontextmanager
async def busy(http: httpx2.AsyncClient, session: dict[str, str]) -> AsyncIterator[None]:
    """The session with its GET stream open: never idle while the block runs."""
    async with http.stream("GET", "/mcp", headers={**session, "accept": "text/event-stream"}) as stream:
        assert stream.status_code == 200
        yield


async def still_open(http: httpx2.AsyncClient, session: dict[str, str]) -> bool:
    answer = await http.post("/mcp", json=rpc(99, "ping"), headers=session)
    assert answer.status_code in (200, 404), answer.text
    return answer.status_code == 200


MODERN_DISCOVER: Final = {
    "jsonrpc": "2.0",
    "id": 7,
    "method": "server/discover",
    "params": {
        "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    },
}
MODERN_HEADERS: Final = {"mcp-protocol-version": "2026-07-28", "mcp-method": "server/discover"}


async def test_a_client_at_its_session_cap_ends_its_longest_idle_session_and_is_refused_only_when_all_are_busy() -> (
    None
):
    async with served(FakeBackend("svc"), server={"limits": {"max_sessions_per_client": 2}}) as (http, _, _):
        first, second = await open_session(http), await open_session(http)
        third = await open_session(http)  # the first, idle longest, made room: abandoned sessions lock nobody out
        assert not await still_open(http, first)
        assert await still_open(http, second)
        async with busy(http, second), busy(http, third):
            refused = await http.post("/mcp", json=HELLO)
            assert refused.status_code == 429 and refused.json()["error"]["code"] == mr.LIMIT_EXCEEDED
            assert "all busy" in refused.json()["error"]["message"]
            # a 2026-era request opens no session, so the cap does not apply to it
            assert (await http.post("/mcp", json=MODERN_DISCOVER, headers=MODERN_HEADERS)).status_code == 200
        assert (await http.delete("/mcp", headers=second)).status_code == 200
        await open_session(http)  # an ended session frees its place


async def test_at_the_total_session_cap_the_longest_idle_session_makes_room_and_only_busy_ones_refuse_more() -> None:
    async with served(FakeBackend("svc"), server={"limits": {"max_sessions": 2}}) as (http, _, _):
        first, second = await open_session(http), await open_session(http)
        third = await open_session(http)
        assert not await still_open(http, first)
        assert await still_open(http, second) and await still_open(http, third)
        async with busy(http, second), busy(http, third):
            refused = await http.post("/mcp", json=HELLO)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == mr.LIMIT_EXCEEDED
        assert parse_metrics((await http.get("/metrics")).text)["mcp_router_sessions"] == 2


@pytest.mark.parametrize("cap", ["max_sessions", "max_sessions_per_client"])
async def test_a_request_naming_its_session_or_era_twice_is_refused_and_opens_no_session_past_the_caps(
    cap: str,
) -> None:
    async with served(FakeBackend("svc"), server={"limits": {cap: 1}}) as (http, _, _):
        first = await open_session(http)
        async with busy(http, first):  # no idle session to end: a counted new one would be refused
            twice = [("mcp-protocol-version", "2025-11-25"), ("mcp-protocol-version", "2026-07-28")]
            refused = await http.post("/mcp", json=HELLO, headers=twice)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == types.INVALID_REQUEST
            assert "mcp-protocol-version header is repeated" in refused.json()["error"]["message"]
            assert "mcp-session-id" not in refused.headers
            both = [("mcp-session-id", first["mcp-session-id"]), ("mcp-session-id", "another")]
            refused = await http.post("/mcp", json=rpc(2, "ping"), headers=both)
            assert refused.status_code == 400 and "mcp-session-id header is repeated" in refused.text
            assert parse_metrics((await http.get("/metrics")).text)["mcp_router_sessions"] == 1
        assert await still_open(http, first)


@pytest.mark.parametrize("cap", ["max_sessions", "max_sessions_per_client"])
async def test_at_a_session_cap_only_an_initialize_request_ends_an_idle_session(cap: str) -> None:
    async with served(FakeBackend("svc"), server={"limits": {cap: 1}}) as (http, _, _):
        first = await open_session(http)
        for body in (b"{not json", json.dumps(rpc(2, "ping")).encode(), b"[]", nested_request(3, 975)):
            answer = await http.post("/mcp", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400, answer.text  # the SDK's refusal: no session without initialize
        assert await still_open(http, first)  # an initialize request would have ended it (the tests above)


async def test_a_session_cannot_have_more_requests_in_flight_than_its_limit() -> None:
    fake = FakeBackend("svc")
    async with served(fake, server={"limits": {"max_requests_per_session": 1}}) as (http, _, _):
        session = await open_session(http)
        async with anyio.create_task_group() as tg:
            hung: list[httpx2.Response] = []

            async def hang() -> None:
                hung.append(await http.post("/mcp", json=rpc(2, "tools/call", {"name": "svc__hang"}), headers=session))

            tg.start_soon(hang)
            await fake.hang_started.wait()
            refused = await http.post("/mcp", json=rpc(3, "tools/call", {"name": "svc__echo"}), headers=session)
            assert refused.status_code == 429 and "in flight" in refused.json()["error"]["message"]
            other = await open_session(http)  # other sessions are served meanwhile
            assert (
                await http.post("/mcp", json=rpc(4, "tools/call", {"name": "svc__echo"}), headers=other)
            ).status_code == 200
            fake.release.set()
        assert hung[0].status_code == 200


class LogWatch:
    """A subprocess's stderr, read as it comes (so a chatty log never fills the pipe), counting the lines that
    hold each of `markers`."""

    def __init__(self, stream: Any, *markers: str) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self.counts = dict.fromkeys(markers, 0)
        self._changed = anyio.Event()

    async def read(self) -> None:
        buffer = b""
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
            while True:
                buffer += await self.stream.receive()
                *complete, buffer = buffer.split(b"\n")
                for line in (c.decode(errors="replace") for c in complete):
                    self.lines.append(line)
                    for marker in self.counts:
                        if marker in line:
                            self.counts[marker] += 1
                            self._changed.set()
                            self._changed = anyio.Event()

    async def until(self, marker: str, count: int = 1) -> None:
        """Wait until `count` lines with `marker` have been read."""
        while self.counts[marker] < count:
            await self._changed.wait()


async def test_idle_sessions_expire_and_a_client_at_its_session_cap_locks_out_no_other(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("tok-alpha-1\ntok-beta-22\n")
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    port = free_port()
    argv = http_router_argv(config, port, "--log-level", "DEBUG", "--auth-tokens-file", str(tokens))
    env = {**os.environ, "MCP_SESSION_IDLE_SECONDS": "1", "MCP_MAX_SESSIONS_PER_CLIENT": "1"}
    alpha, beta = {"authorization": "Bearer tok-alpha-1"}, {"authorization": "Bearer tok-beta-22"}
    async with (
        watched_server(argv, env, "backend one: ready", "a client connection closed") as (_, log),
        httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=MCP_ACCEPT) as http,
    ):
        with anyio.fail_after(30):
            await log.until("backend one: ready")

        async def sessions() -> float:
            return parse_metrics((await http.get("/metrics")).text)["mcp_router_sessions"]

        with anyio.fail_after(30):
            first = await open_session(http, **alpha)
            stream_headers = {**first, "accept": "text/event-stream"}
            async with http.stream("GET", "/mcp", headers=stream_headers) as get_stream:
                assert get_stream.status_code == 200  # an open GET stream keeps the session alive
                assert await sessions() == 1
                refused = await http.post("/mcp", json=HELLO, headers=alpha)
                assert refused.status_code == 429
                assert "too many open sessions for this client" in refused.json()["error"]["message"]
                other = await open_session(http, **beta)  # another client still gets in
                assert (await http.delete("/mcp", headers=other)).status_code == 200
                await log.until("a client connection closed", 1)
                assert await sessions() == 1
            await log.until("a client connection closed", 2)  # the abandoned one, idle for a second, expired
            gone = await http.post("/mcp", json=rpc(5, "ping"), headers=first)
            assert gone.status_code == 404
            assert await sessions() == 0
            await open_session(http, **alpha)  # the expired session no longer counts against its client
    assert "tok-alpha-1" not in "\n".join(log.lines)


async def backend_attempts_until(router: mr.Router, done: Callable[[], bool]) -> None:
    """Wait, move by move of the backends' lifecycles (each wakes it), until `done()`."""
    with anyio.fail_after(10):
        while not done():
            await router.changed.wait()


async def test_planted_secrets_appear_in_no_response_and_no_log_line(tmp_path: Path) -> None:
    secrets = {
        "ENV_SECRET": "env-6a1f",
        "HEADER_SECRET": "hdr-93c2",
        "URL_USER": "usr-0b8e",
        "URL_PASSWORD": "pw-55d0",
        "QUERY_SECRET": "qry-d41f",
        "MCP_AUTH_TOKEN": "tok-7e4b",
    }
    backends = [
        {"name": "one", "env": {"API_KEY": "${ENV_SECRET}"}, **fake_backend_command()},
        {
            "name": "remote",
            "url": "http://${URL_USER}:${URL_PASSWORD}@127.0.0.1:1/mcp?key=${QUERY_SECRET}",
            "headers": {"X-Key": "${HEADER_SECRET}"},
        },
    ]
    seen: list[str] = []
    async with http_router(tmp_path, "--log-level", "DEBUG", env=secrets, backends=backends) as (url, log):
        async with httpx2.AsyncClient(base_url=url, headers=MCP_ACCEPT) as http:
            seen += [(await http.get(path)).text for path in mr.OPERATIONS_PATHS]
            seen.append((await http.post("/mcp", json=HELLO, headers={"authorization": "Bearer tok-7e4"})).text)
        with anyio.fail_after(20):
            async with authorized_client(url, "tok-7e4b") as client:
                for name, arguments in [
                    ("list_backends", {}),
                    ("get_backend_health", {"name": "remote"}),
                    ("remote__x", {}),
                ]:
                    try:
                        seen.append((await call(client, name, arguments)).model_dump_json())
                    except MCPError as err:
                        seen.append(str(err.error))
    log_text = "\n".join(log.lines)
    assert "remote" in seen[-2] and "Unknown tool" in seen[-1]
    for secret in secrets.values():
        assert all(secret not in text for text in seen), secret
        assert secret not in log_text, secret


@dataclass
class Received:
    """One HTTP request as a backend received it."""

    headers: dict[str, str]
    body: bytes = b""

    def method(self) -> str | None:
        """The JSON-RPC method of a POST's message."""
        return json.loads(self.body).get("method") if self.body else None


@asynccontextmanager
async def uvicorn_serving(app: Any) -> AsyncIterator[str]:
    """`app` served by uvicorn on 127.0.0.1 in this process; yields its base URL. The socket listens before uvicorn
    starts, so requests wait in its backlog: nothing to poll for."""
    import uvicorn

    listening = mr.bind("127.0.0.1", 0)
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    with listening:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: web.serve(sockets=[listening]))
            try:
                yield f"http://127.0.0.1:{listening.getsockname()[1]}"
            finally:
                web.should_exit = True


@asynccontextmanager
async def http_backend(fake: FakeBackend) -> AsyncIterator[tuple[str, list[Received]]]:
    """`fake` as a real streamable HTTP server on 127.0.0.1 in this process; yields its URL, and every request it
    receives (headers and body) as they arrive."""
    app = fake.server().streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
    received: list[Received] = []

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        request = Received({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        received.append(request)

        async def reading() -> Any:
            message = await receive()
            request.body += message.get("body", b"")
            return message

        await app(scope, reading, send)

    async with uvicorn_serving(recording) as base:
        yield f"{base}/mcp", received


async def test_sigterm_drains_a_streamed_call_and_delivers_its_result(tmp_path: Path) -> None:
    """The call outlives the SIGTERM as long as the test holds it (the stop grace once cut calls at 2 s)."""
    fake = FakeBackend("svc", extra_tools=[types.Tool(name="stall", input_schema={"type": "object"})])
    async with http_backend(fake) as (backend_url, _):
        config = write_config(tmp_path, [{"name": "svc", "url": backend_url}])
        port = free_port()
        argv = http_router_argv(config, port, "--log-level", "INFO")
        markers = ("stopped accepting", "ASGI callable returned without completing", "Traceback")
        async with watched_server(argv, None, *markers) as (proc, log):
            progressed = anyio.Event()

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                progressed.set()

            with anyio.fail_after(30):
                async with (
                    Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client,
                    anyio.create_task_group() as calls,
                ):
                    answers: list[types.CallToolResult] = []

                    async def stall() -> None:
                        request = types.CallToolRequest(params=types.CallToolRequestParams(name="svc__stall"))
                        answers.append(
                            await client.session.send_request(
                                request, types.CallToolResult, progress_callback=on_progress
                            )
                        )

                    calls.start_soon(stall)
                    await progressed.wait()  # the answer is an SSE stream now, its progress sent
                    proc.send_signal(signal.SIGTERM)
                    await log.until("stopped accepting")
                    with pytest.raises(httpx2.ConnectError):
                        async with httpx2.AsyncClient() as http:
                            await http.get(f"http://127.0.0.1:{port}/healthz")
                    fake.release.set()
                assert text_of(answers[0]) == "svc:stall:"
                assert await proc.wait() == 0
    assert log.counts["ASGI callable returned without completing"] == 0, "\n".join(log.lines)
    assert log.counts["Traceback"] == 0, "\n".join(log.lines)


async def test_sigterm_ends_a_2026_era_clients_listen_stream_gracefully(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    port = free_port()
    argv = http_router_argv(config, port, "--log-level", "INFO")
    env = {**os.environ, "MCP_DRAIN_SECONDS": "1"}  # were the stream cut instead, the wait would be short
    with anyio.fail_after(30):
        async with watched_server(argv, env) as (proc, log):
            async with Client(f"http://127.0.0.1:{port}/mcp", cache=None) as client:
                assert client.protocol_version in mr.MODERN_PROTOCOL_VERSIONS
                async with client.listen(tools_list_changed=True) as events:
                    proc.send_signal(signal.SIGTERM)
                    async for event in events:  # the server's close ends the loop; a cut stream would raise
                        assert isinstance(event, mr.ToolsListChanged)  # the router may announce its first listing
            assert await proc.wait() == 0
    assert not [line for line in log.lines if "graceful shutdown" in line or "Traceback" in line], "\n".join(log.lines)


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_a_backend_gets_the_client_headers_it_names_and_never_the_clients_credentials(
    tmp_path: Path, mode: str
) -> None:
    quoting = FakeBackend("svc", extra_tools=[types.Tool(name="quote", input_schema={"type": "object"})])
    async with (
        http_backend(quoting) as (svc_url, svc_got),
        http_backend(FakeBackend("other")) as (other_url, other_got),
    ):
        backends: list[dict[str, Any]] = [
            {"name": "svc", "url": svc_url, "forward_headers": ["X-Request-Id", "X-Tenant", "X-User", "X-Absent"]},
            {"name": "other", "url": other_url},
        ]
        env = {"MCP_AUTH_TOKEN": "tok-31c8d2"}
        async with http_router(tmp_path, "--log-level", "DEBUG", env=env, backends=backends) as (url, log):
            client_headers = [
                ("authorization", "Bearer tok-31c8d2"),
                ("cookie", "session=cookie-77e1"),
                ("x-request-id", "req-5f3a9c"),
                ("x-user", "ada"),  # shorter than a configured secret must be, and hidden all the same
                ("x-tenant", "acme-north-1"),
                ("x-tenant", "acme-south-2"),  # sent twice: forwarded joined, each value hidden
            ]
            with anyio.fail_after(20):
                async with (
                    httpx2.AsyncClient(headers=client_headers) as http,
                    Client(mr.streamable_http_client(f"{url}/mcp", http_client=http), mode=mode, cache=None) as c,
                ):
                    assert (c.protocol_version in mr.MODERN_PROTOCOL_VERSIONS) == (mode == "auto")
                    assert text_of(await call(c, "svc__echo", {"text": "a"})) == "svc:echo:a"
                    assert text_of(await call(c, "other__echo", {"text": "b"})) == "other:echo:b"
                    refused = "refused request req-5f3a9c of ada for acme-south-2"
                    with pytest.raises(MCPError, match=refused):  # the client's own, to it
                        await call(c, "svc__quote")
                    with pytest.raises(MCPError, match=refused):  # logged as a failed attempt, after the request
                        await call(c, "svc__quote", {"code": types.CONNECTION_CLOSED})
        log_text = "\n".join(log.lines)
    assert log_text.count("tools/call quote -> svc: refused request *** of *** for *** in ") == 2  # shown to nobody
    calls = [r for r in svc_got if r.method() == "tools/call"]
    assert len(calls) == 3
    for request in calls:
        assert request.headers["x-request-id"] == "req-5f3a9c" and request.headers["x-user"] == "ada"
        assert request.headers["x-tenant"] == "acme-north-1, acme-south-2"
        assert "x-absent" not in request.headers  # the client sent none
    assert all("x-request-id" not in r.headers for r in svc_got if r.method() != "tools/call")  # the router's own
    for request in svc_got + other_got:
        assert "x-request-id" not in request.headers or request in calls
        assert "tok-31c8d2" not in str(request.headers) and "cookie-77e1" not in str(request.headers)
    for value in ("req-5f3a9c", "acme-north-1", "acme-south-2", "tok-31c8d2", "cookie-77e1", " ada "):
        assert value not in log_text, value


async def test_older_clients_use_the_legacy_sse_transport() -> None:
    async with served(FakeBackend("svc"), server={"transport": "sse"}) as (http, _, _):
        assert (await http.get("/sse", headers={"host": "evil.example"})).status_code == 421
        async with Client(mr.sse_client(f"{http.base_url}/sse"), mode="legacy", cache=None) as client:
            assert "svc__echo" in {t.name for t in (await client.list_tools()).tools}
            assert text_of(await call(client, "svc__echo", {"text": "old"})) == "svc:echo:old"
            assert parse_metrics((await http.get("/metrics")).text)["mcp_router_sessions"] == 1


async def test_idle_connections_beyond_the_file_limit_are_refused_then_reaped_and_the_router_recovers(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    port = free_port()
    low_file_limit = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160)); "
    low_file_limit += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    argv = [sys.executable, "-c", low_file_limit, *http_router_argv(config, port, "--log-level", "INFO")[1:]]
    env = {**os.environ, "MCP_HEADER_TIMEOUT_SECONDS": "1"}
    async with watched_server(argv, env, "refusing more", "Traceback") as (_, log):
        with anyio.fail_after(30):
            idle = [
                await anyio.connect_tcp("127.0.0.1", port) for _ in range(150)
            ]  # more than the 160 descriptors allow
            answers = []
            for stream in idle:  # each is refused at once with a JSON-RPC 503, or closed when its headers are overdue
                received = b""
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        received += await stream.receive()
                answers.append(received)
                await stream.aclose()
            refused = [a for a in answers if a]
            assert refused and all(
                a.startswith(b"HTTP/1.1 503") and b'"too many open connections"' in a for a in refused
            )
            assert len(refused) < len(answers)  # the others were held open until the header timeout
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client:
                assert text_of(await call(client, "one__echo", {"text": "back"})) == "fake:echo:back"
    assert log.counts["refusing more"] == 1 and log.counts["Traceback"] == 0, "\n".join(log.lines)


async def test_a_backend_restarts_while_the_router_holds_as_many_connections_as_its_file_limit_allows(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    port = free_port()
    low_file_limit = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160)); "
    low_file_limit += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    argv = [sys.executable, "-c", low_file_limit, *http_router_argv(config, port, "--log-level", "INFO")[1:]]
    env = {**os.environ, "MCP_HEADER_TIMEOUT_SECONDS": "120"}  # the idle connections stay until the test ends them
    async with watched_server(argv, env, "backend one: ready", "refusing more", "Traceback") as (_, log):
        with anyio.fail_after(60):
            await log.until("backend one: ready")
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client:
                first_pid = pids_from(await call(client, "one__pid"))
            idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(150)]  # more than 160 files allow
            await log.until("refusing more")
            os.kill(first_pid, signal.SIGKILL)
            await log.until("backend one: ready", 2)  # restarted while every connection it may take is held
            for stream in idle:
                await stream.aclose()
            async with Client(f"http://127.0.0.1:{port}/mcp", mode="legacy", cache=None) as client:
                assert pids_from(await call(client, "one__pid")) != first_pid
    assert log.counts["refusing more"] == 1 and log.counts["Traceback"] == 0, "\n".join(log.lines)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text: `name{labels}` -> value, HELP and TYPE lines checked for every metric family."""
    samples = {}
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            assert re.sub(r"(_bucket|_sum|_count)$", "", name.split("{")[0]) in families, line
            samples[name] = float(value)
    return samples


async def test_health_readiness_and_metrics_follow_the_backends() -> None:
    async with served(FakeBackend("alpha"), FakeBackend("beta"), server={"min_ready": 2}) as (http, router, connectors):
        assert (await http.get("/healthz")).text == "ok\n"
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {
            "ready": True,
            "needed": 2,
            "up": ["alpha", "beta"],
            "down": {},
        }
        session = await open_session(http)
        for i in range(3):
            await http.post("/mcp", json=rpc(10 + i, "tools/call", {"name": "alpha__echo"}), headers=session)
        await http.post("/mcp", json=rpc(20, "tools/call", {"name": "alpha__fail"}), headers=session)
        await http.post("/mcp", json=rpc(21, "tools/call", {"name": "beta__broken"}), headers=session)
        for code in (4711, -1):  # codes a backend makes up
            fail = {"name": "alpha__fail", "arguments": {"code": code}}
            assert "error" in (await http.post("/mcp", json=rpc(30, "tools/call", fail), headers=session)).json()

        connectors["beta"].refuse = True
        connectors["beta"].cut()
        await backend_attempts_until(router, lambda: router.backends["beta"].state != "ready")
        down = await http.get("/readyz")
        assert down.status_code == 503 and list(down.json()["down"]) == ["beta"] and down.json()["up"] == ["alpha"]

        metrics = await http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = parse_metrics(metrics.text)
        call_ok = 'mcp_router_requests_total{mcp_method_name="tools/call",backend="alpha",outcome="ok"}'
        assert samples[call_ok] == 3
        assert samples['mcp_router_requests_total{mcp_method_name="tools/call",backend="alpha",outcome="error"}'] == 3
        assert (
            samples['mcp_router_requests_total{mcp_method_name="tools/call",backend="beta",outcome="tool_error"}'] == 1
        )
        inf = 'mcp_server_operation_duration_seconds_bucket{mcp_method_name="tools/call",backend="alpha",le="+Inf"}'
        assert samples[inf] == 3
        assert samples['mcp_server_operation_duration_seconds_count{mcp_method_name="tools/call",backend="alpha"}'] == 3
        failed = 'mcp_server_operation_duration_seconds_count{mcp_method_name="tools/call",backend="alpha",error_type='
        assert samples[failed + '"-32042"}'] == 1  # error.type: the JSON-RPC error code, on failures only
        assert samples[failed + '"_OTHER"}'] == 2  # one series for codes no standard names, however many there are
        assert samples[failed.replace("alpha", "beta") + '"tool_error"}'] == 1
        assert (
            samples['mcp_router_backend_up{backend="alpha"}'] == 1
            and samples['mcp_router_backend_up{backend="beta"}'] == 0
        )
        assert samples['mcp_router_backend_circuit_state{backend="alpha",state="closed"}'] == 1
        assert (
            samples['mcp_router_backend_restarts_total{backend="beta"}'] == router.backends["beta"].status()["restarts"]
        )
        assert samples["mcp_router_sessions"] == 1 and samples["mcp_router_in_flight"] == 0

        connectors["beta"].refuse = False
        router.restart_backend("beta")
        await backend_attempts_until(router, lambda: router.backends["beta"].state == "ready")
        assert (await http.get("/readyz")).json()["up"] == ["alpha", "beta"]


async def test_metrics_name_the_replica_of_a_pool_that_served_each_call() -> None:
    async with served(FakeBackend("a"), FakeBackend("b"), namespace="pool") as (http, _, _):
        session = await open_session(http)
        for i in range(4):  # the capability strategy takes turns
            answer = await http.post("/mcp", json=rpc(10 + i, "tools/call", {"name": "pool__echo"}), headers=session)
            assert answer.status_code == 200 and "error" not in answer.json()
        unknown = await http.post("/mcp", json=rpc(20, "tools/call", {"name": "pool__nope"}), headers=session)
        assert unknown.json()["error"]["code"] == types.INVALID_PARAMS
        samples = parse_metrics((await http.get("/metrics")).text)
    calls = {
        labels: n
        for name, n in samples.items()
        if name.startswith("mcp_router_requests_total{") and (labels := name.partition("{")[2])
    }
    assert calls == {
        'mcp_method_name="tools/call",backend="a",outcome="ok"}': 2,
        'mcp_method_name="tools/call",backend="b",outcome="ok"}': 2,
        'mcp_method_name="tools/call",backend="router",outcome="error"}': 1,
        'mcp_method_name="initialize",backend="router",outcome="ok"}': 1,
    }
    for replica in ("a", "b"):
        assert (
            samples[f'mcp_server_operation_duration_seconds_count{{mcp_method_name="tools/call",backend="{replica}"}}']
            == 2
        )
    assert not any('backend="a+b"' in name for name in samples)


async def test_metrics_name_the_replica_of_a_pool_that_served_a_2026_era_clients_calls() -> None:
    async with served(FakeBackend("a"), FakeBackend("b"), namespace="pool") as (http, _, _):
        async with Client(mcp_url(http), cache=None) as client:
            assert client.protocol_version in mr.MODERN_PROTOCOL_VERSIONS
            for _ in range(4):  # through the era bridge, whose parked call runs in a task of its own
                assert text_of(await call(client, "pool__echo", {"text": "x"})) in ("a:echo:x", "b:echo:x")
        samples = parse_metrics((await http.get("/metrics")).text)
    calls = {name: n for name, n in samples.items() if 'mcp_method_name="tools/call"' in name and "_total{" in name}
    assert calls == {
        'mcp_router_requests_total{mcp_method_name="tools/call",backend="a",outcome="ok"}': 2,
        'mcp_router_requests_total{mcp_method_name="tools/call",backend="b",outcome="ok"}': 2,
    }
    assert not any('backend="a+b"' in name for name in samples)


class Issuer:
    """An OAuth authorization server as far as a resource server sees it: RSA keys, a JWKS served on 127.0.0.1, tokens."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2")}
        self.published = ["k1"]
        self.fetches = 0
        self.listening = mr.bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.listening.getsockname()[1]}"

    def jwks(self) -> dict[str, Any]:
        from jwt.algorithms import RSAAlgorithm

        keys = [
            {**RSAAlgorithm.to_jwk(self.keys[k].public_key(), as_dict=True), "kid": k, "alg": "RS256", "use": "sig"}
            for k in self.published
        ]
        return {"keys": keys}

    def token(self, audience: str, *, kid: str = "k1", issuer: str | None = None, expires_in: float = 300) -> str:
        import time

        import jwt

        claims = {
            "iss": issuer or self.url,
            "aud": audience,
            "sub": "alice",
            "client_id": "agent-7",
            "exp": int(time.time() + expires_in),
        }
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid})

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Issuer]:
        import uvicorn

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            self.fetches += 1
            body = json.dumps(self.jwks()).encode()
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": body})

        web = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        with self.listening:
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: web.serve(sockets=[self.listening]))
                try:
                    yield self
                finally:
                    web.should_exit = True


async def test_jwt_access_tokens_are_checked_against_the_issuers_keys(tmp_path: Path) -> None:
    port = free_port()
    resource = f"http://127.0.0.1:{port}/mcp"
    async with Issuer().serving() as issuer:
        auth = ["--auth-issuer", issuer.url, "--auth-jwks-url", f"{issuer.url}/jwks", "--auth-resource-url", resource]
        config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
        args = [sys.executable, str(ROUTER), "--config", str(config), "--transport", "http", "--port", str(port), *auth]
        proc = await anyio.open_process(args, stderr=subprocess.DEVNULL)
        try:
            async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=MCP_ACCEPT) as http:
                with anyio.fail_after(30):
                    while True:
                        try:
                            metadata = await http.get("/.well-known/oauth-protected-resource/mcp")
                            break
                        except httpx2.TransportError:
                            await anyio.sleep(0.05)
                assert metadata.json()["resource"] == resource and metadata.json()["authorization_servers"] == [
                    issuer.url
                ]

                async def answer(token: str) -> httpx2.Response:
                    return await http.post("/mcp", json=HELLO, headers={"authorization": f"Bearer {token}"})

                assert (await answer(issuer.token(resource))).status_code == 200
                refused = {
                    "expired": issuer.token(resource, expires_in=-120),
                    "wrong audience": issuer.token("http://elsewhere.example/mcp"),
                    "wrong issuer": issuer.token(resource, issuer="http://impostor.example"),
                    "unknown key id": issuer.token(resource, kid="k2"),
                    "not a JWT": "garbage",
                }
                for why, token in refused.items():
                    response = await answer(token)
                    assert response.status_code == 401, why
                    metadata_url = (
                        f'resource_metadata="http://127.0.0.1:{port}/.well-known/oauth-protected-resource/mcp"'
                    )
                    assert metadata_url in response.headers["www-authenticate"], why
        finally:
            proc.terminate()
            await proc.wait()


async def test_a_new_signing_key_is_fetched_on_its_first_token_but_unknown_ids_cannot_flood_the_issuer() -> None:
    clock = FakeClock()
    async with Issuer().serving() as issuer:
        verifier = mr.JwtVerifier(issuer.url, "https://mcp.example.com/mcp", f"{issuer.url}/jwks", clock=clock)
        assert (await verifier.verify_token(issuer.token("https://mcp.example.com/mcp"))) is not None
        assert issuer.fetches == 1
        issuer.published.append("k2")  # the issuer rotates in a new key
        rotated = issuer.token("https://mcp.example.com/mcp", kid="k2")
        assert (
            await verifier.verify_token(rotated) is None
        )  # within JWKS_MIN_REFETCH of the last fetch: not fetched again
        assert issuer.fetches == 1
        clock.advance(mr.JWKS_MIN_REFETCH)
        accepted = await verifier.verify_token(rotated)
        assert accepted is not None and issuer.fetches == 2
        assert (accepted.client_id, accepted.subject, accepted.resource) == (
            "agent-7",
            "alice",
            "https://mcp.example.com/mcp",
        )
        assert await verifier.verify_token(issuer.token("https://mcp.example.com/mcp", kid="k2")) is not None
        assert issuer.fetches == 2  # known keys are not fetched again


NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
)


def readme_nginx_config(listen: int, upstreams: list[int], *, stateful: bool = False) -> str:
    """The README's nginx block, pointed at the test's replicas and port; `stateful`: with the balancing the README
    gives for stateful sessions."""
    readme = (HERE / "README.md").read_text()
    block = re.search(r"```nginx\n(.*?)```", readme, re.S)
    assert block is not None, "README lacks its nginx configuration"
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in upstreams)
    if stateful:
        pinning = re.search(r"For stateful\s+sessions instead, .*?`(hash [^`]+;)`", readme, re.S)
        assert pinning is not None, "README lacks the balancing for stateful sessions"
        servers = f"    {pinning[1]}\n{servers}"
    text = re.sub(r"(    server \d+\.\d+\.\d+\.\d+:\d+;\n)+", servers, block[1], count=1)
    return text.replace("listen 80;", f"listen 127.0.0.1:{listen};")


@asynccontextmanager
async def nginx_in_front(tmp_path: Path, upstreams: list[int], *, stateful: bool = False) -> AsyncIterator[int]:
    """nginx on a free 127.0.0.1 port with the README's config, in the foreground, everything of its own in tmp_path;
    once it has bound its port (it logs that it starts its workers after)."""
    assert NGINX is not None
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    temp_paths = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        f"daemon off;\nworker_processes 1;\npid {prefix}/nginx.pid;\nerror_log stderr notice;\n"
        f"events {{ worker_connections 256; }}\nhttp {{\n    access_log off;\n{temp_paths}"
        f"{readme_nginx_config(port, upstreams, stateful=stateful)}}}\n"
    )
    command = [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    async with watched_server(command, ready="start worker processes"):
        yield port


@pytest.mark.skipif(NGINX is None and not os.environ.get("CI"), reason="nginx is not installed (.ci/run installs it)")
async def test_stateless_replicas_behind_nginx_share_the_calls_and_survive_losing_one(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    ports = [free_port(), free_port()]
    base = [
        sys.executable,
        str(ROUTER),
        "--config",
        str(config),
        "--transport",
        "http",
        "--stateless",
        "--log-level",
        "INFO",
    ]

    async def tool_calls(http: httpx2.AsyncClient, port: int) -> float:
        samples = parse_metrics((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
        return samples.get('mcp_router_requests_total{mcp_method_name="tools/call",backend="one",outcome="ok"}', 0)

    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            (await stack.enter_async_context(watched_server([*base, "--port", str(port)], os.environ)))[0]
            for port in ports
        ]
        async with nginx_in_front(tmp_path, ports) as front, httpx2.AsyncClient() as http:
            with anyio.fail_after(60):
                async with Client(f"http://127.0.0.1:{front}/mcp", mode="legacy", cache=None) as client:
                    for i in range(50):
                        assert text_of(await call(client, "one__echo", {"text": str(i)})) == f"fake:echo:{i}"
                    before = [await tool_calls(http, port) for port in ports]
                    assert sum(before) == 50 and min(before) > 0  # both replicas served
                    replicas[0].kill()
                    await replicas[0].wait()
                    for i in range(50, 100):  # every call after the kill succeeds through the other replica
                        assert text_of(await call(client, "one__echo", {"text": str(i)})) == f"fake:echo:{i}"
                    assert await tool_calls(http, ports[1]) == before[1] + 50


@pytest.mark.skipif(NGINX is None and not os.environ.get("CI"), reason="nginx is not installed (.ci/run installs it)")
async def test_stateful_sessions_behind_nginx_stay_on_the_replica_that_opened_them(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    ports = [free_port(), free_port()]
    async with contextlib.AsyncExitStack() as stack:
        for port in ports:
            await stack.enter_async_context(
                watched_server(http_router_argv(config, port, "--log-level", "INFO"), os.environ)
            )
        async with (
            nginx_in_front(tmp_path, ports, stateful=True) as front,
            httpx2.AsyncClient(base_url=f"http://127.0.0.1:{front}", headers=MCP_ACCEPT) as http,
        ):
            with anyio.fail_after(60):
                for i in range(8):  # a random session id would hash to the other replica about every other time
                    session = await open_session(http)
                    answer = await http.post("/mcp", json=rpc(2, "tools/call", {"name": "one__echo"}), headers=session)
                    assert answer.status_code == 200, (i, answer.text)
                    async with http.stream("GET", "/mcp", headers={**session, "accept": "text/event-stream"}) as get:
                        assert get.status_code == 200
                    assert (await http.delete("/mcp", headers=session)).status_code == 200


async def lines_until(stream: Any, wanted: str, seen: list[str] | None = None) -> list[str]:
    """Read a subprocess's stderr line by line until one contains `wanted`; bound it with fail_after."""
    seen = [] if seen is None else seen
    buffer = b""
    while not any(wanted in line for line in seen):
        chunk = await stream.receive()
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        seen += [line.decode(errors="replace") for line in complete]
    return seen


@pytest.mark.parametrize("stdin_kind", ["terminal", "never-closing pipe"])
async def test_sigint_stops_the_router_within_the_stop_grace_whatever_stdin_is(tmp_path: Path, stdin_kind: str) -> None:
    import pty

    pid_file = tmp_path / "backend.pid"
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command("--pid-file", str(pid_file))}])
    controller, terminal = pty.openpty()
    stdin: Any = terminal if stdin_kind == "terminal" else subprocess.PIPE
    stdout: Any = (
        (tmp_path / "out.txt").open("wb") if stdin_kind != "terminal" else subprocess.PIPE
    )  # a file, or a pipe
    args = [sys.executable, str(ROUTER), "--config", str(config), "--log-level", "INFO"]
    try:
        async with await anyio.open_process(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE) as proc:
            try:
                with anyio.fail_after(30):
                    await lines_until(proc.stderr, "serving MCP over stdio")
                backend_pid = int(pid_file.read_text())
                assert alive(backend_pid)
                proc.send_signal(signal.SIGINT)
                with anyio.fail_after(mr.STOP_GRACE + 3):
                    assert await proc.wait() == 0
                assert not alive(backend_pid)
            finally:
                if proc.returncode is None:
                    proc.kill()
    finally:
        os.close(controller)
        os.close(terminal)
        if not isinstance(stdout, int):
            stdout.close()


# ---------------------------------------------------------------------------- command line


def run_router(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROUTER), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


def test_check_reports_every_backend_and_fails_when_one_does(tmp_path: Path) -> None:
    noisy = {"command": "sh", "args": ["-c", 'echo "hello from good" >&2; exec "$0" "$@"', sys.executable, str(Path(__file__).resolve()), "--fake-backend"]}  # fmt: skip
    config = write_config(
        tmp_path, [{"name": "good", **noisy}, {"name": "missing", "command": "/nonexistent/mcp-server"}]
    )
    table = run_router("check", "--config", str(config))
    assert "[good] hello from good\n" in table.stderr  # a backend's stderr, named
    assert table.returncode == 1, table.stderr
    lines = {line.split()[0]: line for line in table.stdout.splitlines() if line.strip()}
    assert lines["BACKEND"].split()[:4] == ["BACKEND", "TRANSPORT", "ERA", "STATE"]
    assert lines["good"].split()[1:5] == ["stdio", "2026", "2026-07-28", "ready"]  # an SDK 2.x server
    assert "cannot run '/nonexistent/mcp-server': No such file or directory" in lines["missing"]
    assert "1 of 2 backends ready; failed: missing" in table.stdout
    report = run_router("check", "--config", str(config), "--json")
    assert report.returncode == 1
    rows = {r["name"]: r for r in json.loads(report.stdout)["backends"]}
    assert rows["good"]["state"] == "ready" and rows["good"]["tools"] >= 15 and rows["good"]["startup_seconds"] > 0
    assert rows["missing"]["state"] == "failing" and "No such file" in rows["missing"]["last_error"]
    assert "starting: " in report.stderr  # progress, on stderr only
    assert "Traceback" not in report.stderr + table.stderr


def test_check_passes_when_every_enabled_backend_is_up(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "off", "command": "nothing", "enabled": False}])
    report = run_router("check", "--config", str(config), "--json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["ok"] is True


def test_tools_lists_exposed_names_with_backend_and_warns_past_client_limits(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        [
            {"name": "big", **fake_backend_command("--fillers", "30")},
            {"name": "missing", "command": "/nonexistent/mcp-server"},
        ],
    )
    listed = run_router("tools", "--config", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["big__echo"] == {
        "name": "big__echo",
        "backends": ["big"],
        "original": "echo",
        "description": "echo on fake",
    }
    assert rows["list_backends"]["backends"] == ["(router)"]
    assert "more than Cursor (about 40 tools) takes; trim them with a backend's include or exclude" in listed.stderr
    table = run_router("tools", "--config", str(config), "big__e[cx]*")
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["TOOL", "BACKEND", "ORIGINAL", "NAME"], ["big__echo", "big", "echo"], ["big__expired", "big", "expired"],
    ]  # fmt: skip
    assert "warning" in table.stderr  # the limit counts every tool, not only those shown


def test_call_prints_the_result_and_fails_on_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path, [{"name": "svc", **fake_backend_command()}])
    listed = run_router("call", "--config", str(config), "list_backends", "{}")
    assert listed.returncode == 0, listed.stderr
    text, structured = listed.stdout.split("\n", 1)
    assert (
        text.startswith("svc: ready (2026 era), circuit closed, ")
        and json.loads(structured)["backends"][0]["name"] == "svc"
    )
    tool_error = run_router("call", "--config", str(config), "svc__broken", '{"text": "x"}')
    assert (tool_error.returncode, tool_error.stdout) == (1, "tool-level failure\n")
    mcp_error = run_router("call", "--config", str(config), "svc__fail")
    assert (
        mcp_error.returncode == 1 and "mcp-router: call svc__fail: error -32042: the fake refuses" in mcp_error.stderr
    )
    bad = run_router("call", "--config", str(config), "svc__echo", "[1]")
    assert bad.returncode == 2 and "argument JSON: expected a JSON object of arguments, got [1]" in bad.stderr
    assert "Traceback" not in listed.stderr + tool_error.stderr + mcp_error.stderr + bad.stderr


def test_help_examples_use_the_name_the_program_was_invoked_by(tmp_path: Path) -> None:
    shown = run_router("--help")
    assert shown.returncode == 0
    assert "  mcp_router.py check --config backends.yaml" in shown.stdout
    assert "{serve,check,tools,call}" in shown.stdout and "--config" in shown.stdout


def test_a_bad_flag_names_the_flag() -> None:
    bad = run_router("--port", "eighty")
    assert bad.returncode == 2 and "argument --port: invalid int value: 'eighty'" in bad.stderr


def test_the_program_starts_early_only_when_run_as_a_script_or_the_installed_command() -> None:
    assert mr.run_as_program("__main__", "mcp_router.py")  # uv run / python mcp_router.py
    assert mr.run_as_program("mcp_router", "/home/me/.local/bin/mcp-router")  # the installed command
    assert not mr.run_as_program("mcp_router", "/usr/bin/pytest")  # imported as a module
    assert mr.STARTED is None  # this test imported it: nothing was launched


async def test_the_installed_command_serves(tmp_path: Path) -> None:
    command = tmp_path / "mcp-router"  # what pip's console-script wrapper does: import, then main()
    command.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\nimport mcp_router\nsys.exit(mcp_router.main())\n"
    )
    command.chmod(0o755)
    config = write_config(tmp_path, [{"name": "one", **fake_backend_command()}])
    params = StdioServerParameters(command=str(command), args=["--config", str(config), "--log-level", "WARNING"])
    with anyio.fail_after(30):
        async with Client(params, mode="legacy", cache=None) as client:
            assert text_of(await call(client, "one__echo", {"text": "installed"})) == "fake:echo:installed"


# ---------------------------------------------------------------------------- the fake backend as a program


def run_fake_backend(argv: list[str]) -> None:
    """`--fake-backend [--http PORT]`: a FakeBackend (plus `pid` and `environ` tools) over stdio or HTTP."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--fake-backend", action="store_true")
    parser.add_argument("--http", type=int)
    parser.add_argument("--fillers", type=int, default=0)
    parser.add_argument("--token", help="ignored: stands for a secret given on the command line")
    parser.add_argument("--escape", action="store_true", help="start a child that leaves for a session of its own")
    parser.add_argument("--stubborn", action="store_true", help="ignore SIGTERM and stdin EOF")
    parser.add_argument("--pid-file", type=Path)
    args = parser.parse_args(argv)
    if args.pid_file:
        args.pid_file.write_text(str(os.getpid()))

    own_tools = [
        types.Tool(name=name, input_schema={"type": "object"})
        for name in ("pid", "ppid", "environ", "escapee", "orphan", "nap")
    ]
    if args.stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.escape:  # the child says when it has left, so the test never races its setsid
        code = "import os, time; os.setsid(); print(flush=True); time.sleep(120)"
        escapee = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert escapee.stdout is not None and escapee.stdout.readline() == b"\n"
        # a daemon's double fork: the middle process says its child's pid once that has left, and exits
        code = "import os, time; os.setsid(); print(os.getpid(), flush=True); time.sleep(120)"
        middle = f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {code!r}], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL); print(p.stdout.readline().decode(), end='', flush=True)"  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-c", middle], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, check=True
        )
        orphan = int(run.stdout)
    fake = FakeBackend("fake", fillers=args.fillers, extra_tools=own_tools, instructions="Ask the fake nicely.")
    fake.result_for["pid"] = types.CallToolResult(content=[types.TextContent(text=f"pid:{os.getpid()}")])
    fake.result_for["ppid"] = types.CallToolResult(content=[types.TextContent(text=f"pid:{os.getppid()}")])
    fake.result_for["environ"] = types.CallToolResult(content=[types.TextContent(text=" ".join(sorted(os.environ)))])
    if args.escape:
        fake.result_for["escapee"] = types.CallToolResult(content=[types.TextContent(text=f"pid:{escapee.pid}")])
        fake.result_for["orphan"] = types.CallToolResult(content=[types.TextContent(text=f"pid:{orphan}")])
    server = fake.server()

    async def serve() -> None:
        if args.http:
            import uvicorn

            app = server.streamable_http_app(streamable_http_path="/mcp", host="127.0.0.1")
            await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.http, log_level="warning")).serve()
        else:
            from mcp.server.stdio import stdio_server

            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())
            if args.stubborn:
                await anyio.sleep(120)

    anyio.run(serve)


if __name__ == "__main__":
    if "--fake-backend" in sys.argv:
        run_fake_backend(sys.argv[1:])
    else:
        # a fresh interpreter, so pytest can rewrite the asserts of modules this one already imported
        # two workers: most of the suite's time is real processes starting and answering, which overlaps well
        raise SystemExit(subprocess.call([sys.executable, "-m", "pytest", __file__, "-n", "2", *sys.argv[1:]]))
