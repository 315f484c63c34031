#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "mcp>=2.3,<3",
#     "pyyaml>=6",
# ]
# ///
"""Benchmark for mcp-router: what the router costs, measured against real backend processes.

Run it from the repository root:

    uv run bench_mcp_router.py                    # full run, a few minutes
    uv run bench_mcp_router.py --quick            # reduced run, under a minute
    uv run bench_mcp_router.py --json out.json    # also write the results as JSON, to compare commits
    uv run bench_mcp_router.py --strict           # exit 1 when a target is missed
    uv run bench_mcp_router.py --only overhead,hang --router ../other-checkout/mcp_router.py

Every backend is a real process (this same file, see "fake backend" below), everything listens on
127.0.0.1, and every router is started through its CLI, exactly as users start it.

What is measured, one scenario each (`--only` takes their names):

overhead  The `echo` tool called directly on a backend and through the router, side by side, over
          stdio (stdio client -> router -> stdio backend) and over streamable HTTP (HTTP client ->
          router -> HTTP backend) twice: a backend answering with SSE streams (the SDK's default)
          behind a router in its default mode, and backend and router both set to plain JSON
          (json_response, --json-response), and over stdio to a pool of two replicas with routes
          (the routing decision's share): p50, p99 and calls/s with one caller and with 32
          concurrent callers sharing one session, and the ratio routed/direct. Direct and routed are
          measured in alternating rounds so that drift on a busy machine hits both alike. The
          http-auth row compares two routers over one SSE backend, one taking a bearer token
          (MCP_AUTH_TOKEN) and one without authentication: what auth costs a call.
scale     tools/list through a stdio router (every page, catalogue warm) with 1, 10 and 50 backends
          of 50 tools each and with one backend of 5,000 tools, and the router's resident memory
          (VmRSS from /proc) with 0, 1, 10 and 50 backends. The client is a bare JSON-RPC client
          on the router's pipes, no SDK, so the p50/p99 columns are the router's share: from writing
          each request until the last byte of its answer is in. Decoding the answer is the client's
          work, timed apart: "decoded" adds json.loads, "SDK-parsed" adds the client SDK's message
          and result validation instead (a large share for big lists). With --quick, the 50 backends
          are 50 connections to one shared HTTP backend process instead of 50 stdio processes.
startup   Time from launching the router until all of 10 stdio backends are listed, against the
          slowest of those backends started alone. The backends wait 0.1..1.0 x a start-up delay
          before serving, as slow servers (npx, uvx, remote setup) do. The backends use the
          standard library alone and start in milliseconds (this measures how the router connects).
          For context: the router with no backends and, in full runs, the 10 backends started
          directly in parallel, and the same with Python SDK backends, which each spend about 0.6 s
          of CPU loading the SDK (ten at once on two cores measure the machine).
hang      p50/p99 of calls to a healthy backend, normally and while 16 background callers keep
          calling a tool of another backend that never answers, each call ending in the router's
          (short) request timeout. The phases alternate and are timed, each longer than the
          timeout. The hanging backend's circuit breaker threshold is raised so that its calls keep
          reaching it and timing out throughout, instead of being rejected at once.
flood     p50/p99 of calls to a healthy backend through an HTTP router, normally and while another
          backend floods log messages at a second client that set a level and opened its GET
          stream but reads nothing; the router's RSS before and during, and the log messages it
          dropped for the slow client (its queue is bounded).

Calls use `session.send_request(CallToolRequest)`, the same on both sides, after a warm-up; latencies
are time.perf_counter() around each call; p50/p99 are nearest-rank percentiles of all samples.

The fake backend: `python bench_mcp_router.py --fake-backend [--tools N] [--http PORT [--sse]] [--hang]
[--startup-delay S]` serves `echo` (returns its `text` argument) plus fillers `tool_1..tool_{N-1}`
(N tools in all), 100 per tools/list page, over stdio or, with --http, streamable HTTP with JSON
responses (SSE streams with --sse) at http://127.0.0.1:PORT/mcp. `--hang` adds a `hang` tool that
never answers. The start-up scenario also uses a light fake backend on the standard library alone
(LIGHT_BACKEND below), with the same tools.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import anyio
import mcp_types as types
import yaml
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp_types import INVALID_PARAMS, REQUEST_TIMEOUT

# ---------------------------------------------------------------------------- settings

HERE: Final = Path(__file__).resolve().parent
THIS_FILE: Final = Path(__file__).resolve()
DEFAULT_ROUTER: Final = HERE / "mcp_router.py"
HOST: Final = "127.0.0.1"
SEPARATOR: Final = "__"
"""How the router joins namespace and tool name: `b0` + `echo` -> `b0__echo`."""

CONCURRENT_CALLERS: Final = 32
HANG_CALLERS: Final = 16
MAX_PHASE_CALLS: Final = 100_000
"""Bound on the calls of one timed phase of the hang scenario."""
FAKE_PAGE_SIZE: Final = 100
CLIENT_TIMEOUT: Final = 30.0
"""Client-side read timeout for every request the benchmark sends."""
READY_TIMEOUT: Final = 120.0
"""Longest wait for a router to list all its backends' tools (50 stdio backends on 2 cores take a while)."""
SCENARIO_TIMEOUT: Final = 600.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """How much of everything to do: --quick trades precision for time."""

    name: str
    warmup_calls: int
    rounds: int
    """Alternating direct/routed rounds in the overhead scenario."""
    sequential_calls: int
    """Calls per side per round with one caller."""
    calls_per_caller: int
    """Calls per caller per round with 32 concurrent callers."""
    scale_cases: tuple[tuple[int, int], ...]
    """(backends, tools per backend) for the scale scenario."""
    shared_http_from: int | None
    """Scale cases with at least this many backends use one shared HTTP backend process (None: never)."""
    list_samples: int
    startup_delay: float
    """Start-up delay of the slowest of the 10 start-up backends; the others wait 0.1..0.9 of it."""
    startup_repeats: int
    startup_reference: bool
    """Also time the references: each set of 10 backends started directly in parallel, and 10 Python SDK backends."""
    hang_timeout: float
    """The router's request timeout in the hang scenario. Also bounds the router's handshake with each backend."""
    hang_rounds: int
    """Alternating normal/hanging phases in the hang scenario."""
    hang_phase_seconds: float
    """How long each phase calls the healthy backend; at least the timeout, so every hanging call times out within it."""


SCALE_CASES: Final = ((0, 0), (1, 50), (10, 50), (50, 50), (1, 5000))
FULL: Final = Profile(
    name="full",
    warmup_calls=100,
    rounds=4,
    sequential_calls=500,
    calls_per_caller=25,
    scale_cases=SCALE_CASES,
    shared_http_from=None,
    list_samples=50,
    startup_delay=2.0,
    startup_repeats=3,
    startup_reference=True,
    hang_timeout=2.0,
    hang_rounds=2,
    hang_phase_seconds=5.0,
)
QUICK: Final = Profile(
    name="quick",
    warmup_calls=50,
    rounds=1,
    sequential_calls=200,
    calls_per_caller=8,
    scale_cases=SCALE_CASES,
    shared_http_from=50,
    list_samples=8,
    startup_delay=1.0,
    startup_repeats=1,
    startup_reference=False,
    hang_timeout=2.0,
    hang_rounds=1,
    hang_phase_seconds=2.5,
)

# ---------------------------------------------------------------------------- the fake backend

ECHO_SCHEMA: Final = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
FILLER_SCHEMA: Final = {"type": "object", "properties": {"value": {"type": "string", "description": "any text"}}}


def fake_tools(count: int, *, hang: bool) -> list[types.Tool]:
    """`echo`, then fillers up to `count` tools, then `hang` if asked."""
    tools = [types.Tool(name="echo", description="Return the `text` argument.", input_schema=ECHO_SCHEMA)]
    tools += [
        types.Tool(name=f"tool_{i}", description=f"Filler tool number {i}.", input_schema=FILLER_SCHEMA)
        for i in range(1, count)
    ]
    if hang:
        tools.append(types.Tool(name="hang", description="Never answers.", input_schema={"type": "object"}))
    return tools


def text_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)])


def fake_backend_server(tools: Sequence[types.Tool]) -> Server[Any]:
    names = {t.name for t in tools}

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        start = int(params.cursor) if params is not None and params.cursor else 0
        end = start + FAKE_PAGE_SIZE
        return types.ListToolsResult(tools=list(tools[start:end]), next_cursor=str(end) if end < len(tools) else None)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in names:
            raise MCPError(INVALID_PARAMS, f"unknown tool {params.name!r}")
        if params.name == "echo":
            return text_result(str((params.arguments or {}).get("text", "")))
        if params.name == "hang":
            await anyio.sleep_forever()
        return text_result("ok")

    return Server("bench-fake-backend", version="1.0", on_list_tools=list_tools, on_call_tool=call_tool)


def run_fake_backend(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_mcp_router.py --fake-backend")
    parser.add_argument("--fake-backend", action="store_true")
    parser.add_argument("--tools", type=int, default=1, help="tools in all, `echo` included")
    parser.add_argument("--http", type=int, metavar="PORT", help="serve streamable HTTP on this port instead of stdio")
    parser.add_argument(
        "--sse", action="store_true", help="with --http: answer requests with SSE streams (the SDK's default), not JSON"
    )
    parser.add_argument("--hang", action="store_true", help="add a `hang` tool that never answers")
    parser.add_argument("--startup-delay", type=float, default=0.0, metavar="S", help="seconds to wait before serving")
    args = parser.parse_args(argv)
    server = fake_backend_server(fake_tools(args.tools, hang=args.hang))
    time.sleep(args.startup_delay)

    async def serve() -> None:
        if args.http:
            import uvicorn

            app = server.streamable_http_app(streamable_http_path="/mcp", json_response=not args.sse, host=HOST)
            await uvicorn.Server(uvicorn.Config(app, host=HOST, port=args.http, log_level="warning")).serve()
        else:
            from mcp.server.stdio import stdio_server

            async with stdio_server() as (read, write):
                await server.run(read, write, server.create_initialization_options())

    anyio.run(serve)


def fake_backend_argv(
    *, tools: int = 1, http: int | None = None, sse: bool = False, hang: bool = False, startup_delay: float = 0.0
) -> list[str]:
    argv = [str(THIS_FILE), "--fake-backend", "--tools", str(tools)]
    if http is not None:
        argv += ["--http", str(http), *(["--sse"] if sse else [])]
    if hang:
        argv.append("--hang")
    if startup_delay:
        argv += ["--startup-delay", str(startup_delay)]
    return argv


LIGHT_BACKEND: Final = r"""
# A fake MCP server on the standard library alone, run with `python -S`: it starts in milliseconds, as
# servers in Go, Rust or Node do, so only its start-up delay keeps it from serving. Same tools as fake_tools().
import json, sys, time

tools, delay = int(sys.argv[1]), float(sys.argv[2])
time.sleep(delay)
echo_schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
filler_schema = {"type": "object", "properties": {"value": {"type": "string", "description": "any text"}}}
listing = [{"name": "echo", "description": "Return the `text` argument.", "inputSchema": echo_schema}]
listing += [{"name": f"tool_{i}", "description": f"Filler tool number {i}.", "inputSchema": filler_schema} for i in range(1, tools)]
results = {
    "initialize": lambda p: {
        "protocolVersion": p.get("protocolVersion"),
        "capabilities": {"tools": {}},
        "serverInfo": {"name": "light-fake-backend", "version": "1.0"},
    },
    "tools/list": lambda p: {"tools": listing},
    "tools/call": lambda p: {"content": [{"type": "text", "text": str((p.get("arguments") or {}).get("text", "ok"))}]},
    "ping": lambda p: {},
}
for line in sys.stdin:
    message = json.loads(line)
    if "id" not in message or "method" not in message:
        continue
    answer = {"jsonrpc": "2.0", "id": message["id"]}
    if (result := results.get(message["method"])) is not None:
        answer["result"] = result(message.get("params") or {})
    else:
        answer["error"] = {"code": -32601, "message": "Method not found"}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


# ---------------------------------------------------------------------------- processes


class BenchError(Exception):
    """Something the benchmark needs did not happen (a process died, a listing never completed)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Terminate, wait, kill."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until something accepts connections on the port, or the process has died."""
    with anyio.fail_after(timeout):
        while True:
            if proc.poll() is not None:
                raise BenchError(
                    f"process {proc.args!r} exited with code {proc.returncode} before listening on port {port}"
                )
            try:
                stream = await anyio.connect_tcp(HOST, port)
            except OSError:
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                return


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    ppid: int
    argv: list[str]


def process_table() -> dict[int, ProcessInfo]:
    """Every process this user can see, from /proc (Linux)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        table[int(entry.name)] = ProcessInfo(
            ppid=int(stat.rsplit(")", 1)[1].split()[1]), argv=argv
        )  # after "(comm)": state, ppid
    return table


def child_pid(table: Mapping[int, ProcessInfo], marker: str) -> int:
    """The pid of this process's one child whose command line contains `marker`."""
    found = [pid for pid, p in table.items() if p.ppid == os.getpid() and any(marker in arg for arg in p.argv)]
    if len(found) != 1:
        raise BenchError(f"expected one child process running {marker}, found {len(found)}")
    return found[0]


def descendants(table: Mapping[int, ProcessInfo], pid: int) -> list[int]:
    children = [child for child, p in table.items() if p.ppid == pid]
    return children + [d for child in children for d in descendants(table, child)]


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return {"rss_mb": round(values["VmRSS"], 1), "hwm_mb": round(values["VmHWM"], 1)}


def pss_mb(pid: int) -> float:
    """Proportional set size in MB: resident memory with shared pages split among their sharers, so it adds up."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (from /proc, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime after "(comm)"


def router_memory(router: Path) -> dict[str, float]:
    """The router process's memory, and the PSS of its helper processes: its descendants that are not fake backends."""
    table = process_table()
    pid = child_pid(table, str(router))
    helpers = [d for d in descendants(table, pid) if table[d].argv[1:2] != [str(THIS_FILE)]]
    helper_pss = 0.0
    for helper in helpers:
        with contextlib.suppress(OSError):  # it may have just exited
            helper_pss += pss_mb(helper)
    return {**memory_mb(pid), "helpers": len(helpers), "helpers_pss_mb": round(helper_pss, 1)}


class Lab:
    """The run's scratch directory (configs, logs) and the programs under test."""

    def __init__(self, root: Path, router: Path) -> None:
        self.root = root
        self.router = router
        self.logs: list[Path] = []
        self._files: list[TextIO] = []

    def close(self) -> None:
        for f in self._files:
            f.close()

    def log(self, label: str) -> TextIO:
        """A fresh file to send a process's stderr to."""
        path = self.root / f"{label}-{len(self.logs)}.log"
        self.logs.append(path)
        f = path.open("w")
        self._files.append(f)
        return f

    def tails(self, since: int, lines: int = 25) -> str:
        """The last lines of every log opened since `since` (an earlier len(self.logs))."""
        out = []
        for path in self.logs[since:]:
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            if text:
                out.append(f"--- {path.name} (last {min(lines, len(text))} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def write_config(
        self, label: str, backends: Sequence[Mapping[str, Any]], routing: Mapping[str, Any] | None = None
    ) -> Path:
        path = self.root / f"{label}.yaml"
        document: dict[str, Any] = {"backends": list(backends)} if backends else {}
        document["routing"] = {"request_timeout_seconds": CLIENT_TIMEOUT, **(routing or {})}
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    @contextmanager
    def spawn(
        self, label: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Iterator[subprocess.Popen[bytes]]:
        """A background process (HTTP backend or router) in its own session, stopped on the way out; `env` is added
        to this one's environment."""
        proc = subprocess.Popen(
            [sys.executable, *argv],
            env={**os.environ, **env} if env else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log(label),
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop_process(proc)


# ---------------------------------------------------------------------------- router configs and clients


def stdio_backend(name: str, **options: Any) -> dict[str, Any]:
    """A config entry for a fake stdio backend; options go to fake_backend_argv."""
    return {"name": name, "command": sys.executable, "args": fake_backend_argv(**options)}


def http_backend(name: str, url: str) -> dict[str, Any]:
    return {"name": name, "url": url}


@dataclass(frozen=True, slots=True)
class Connection:
    """A client connection: the SDK session, and the dispatcher under it for requests whose result the SDK should not parse."""

    session: ClientSession
    dispatcher: JSONRPCDispatcher[Any]


@asynccontextmanager
async def connect(transport: AbstractAsyncContextManager[Any]) -> AsyncIterator[Connection]:
    """A handshake-era session over `transport`: what `mcp.Client(mode="legacy", cache=None)` opens, with its dispatcher in reach."""
    async with transport as (read, write):
        dispatcher: JSONRPCDispatcher[Any] = JSONRPCDispatcher(read, write)
        async with ClientSession(dispatcher=dispatcher, read_timeout_seconds=CLIENT_TIMEOUT) as session:
            await session.initialize()
            yield Connection(session, dispatcher)


@asynccontextmanager
async def connect_http(url: str, token: str | None = None) -> AsyncIterator[Connection]:
    """A handshake-era session over streamable HTTP, presenting `token` as a bearer token if one is given."""
    if token is None:
        async with connect(streamable_http_client(url)) as conn:
            yield conn
        return
    async with (
        create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http,
        connect(streamable_http_client(url, http_client=http)) as conn,
    ):
        yield conn


class BareClient:
    """JSON-RPC lines over a program's stdio, no SDK: an answer is timed to its last byte, before any decoding."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._stdin, self._stdout = process.stdin, process.stdout
        self._last_id = 0

    async def request(self, method: str, params: Mapping[str, Any] | None = None) -> bytes:
        """The answer's line, undecoded; notifications and anything else before it are skipped."""
        self._last_id += 1
        self._stdin.write(
            json.dumps({"jsonrpc": "2.0", "id": self._last_id, "method": method, "params": params or {}}).encode()
            + b"\n"
        )
        await self._stdin.drain()
        answer = b'{"jsonrpc":"2.0","id":%d,' % self._last_id
        while line := await self._stdout.readline():
            if line.startswith(answer):
                return line
        raise BenchError(f"the program closed its stdout before answering {method}")

    def notify(self, method: str) -> None:
        self._stdin.write(json.dumps({"jsonrpc": "2.0", "method": method}).encode() + b"\n")


@asynccontextmanager
async def bare_client_of(lab: Lab, label: str, argv: Sequence[str]) -> AsyncIterator[BareClient]:
    """A program launched over stdio, after the handshake; on the way out its stdin is closed and it gets 5 s to exit."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lab.log(label), limit=1 << 30
    )
    try:
        client = BareClient(process)
        hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
        await client.request("initialize", hello)
        client.notify("notifications/initialized")
        yield client
    finally:
        if process.stdin is not None:
            process.stdin.close()
        with anyio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass(slots=True)
class Listing:
    """One tools/list, every page: its tools, and how long it took until answered, until decoded, until SDK-validated."""

    tools: list[dict[str, Any]]
    pages: int
    answered_s: float
    decoded_s: float
    sdk_parsed_s: float


async def bare_list_tools(client: BareClient) -> Listing:
    """Every page of tools/list; only the wait for each answer is timed as `answered`, decoding it is timed apart."""
    listing = Listing([], 0, 0.0, 0.0, 0.0)
    cursor: str | None = None
    while listing.pages < MAX_PAGES:
        started = time.perf_counter()
        line = await client.request("tools/list", {"cursor": cursor} if cursor else None)
        answered = time.perf_counter()
        result = json.loads(line)["result"]
        decoded = time.perf_counter()
        message = types.jsonrpc_message_adapter.validate_json(line)  # what an SDK client does with it
        assert isinstance(message, types.JSONRPCResponse)
        types.ListToolsResult.model_validate(message.result)
        validated = time.perf_counter()
        listing.pages += 1
        listing.answered_s += answered - started
        listing.decoded_s += decoded - started
        listing.sdk_parsed_s += validated - decoded + answered - started
        listing.tools += result["tools"]
        if (cursor := result.get("nextCursor")) is None:
            return listing
    raise BenchError(f"tools/list did not end after {MAX_PAGES} pages")


async def bare_wait_for_tools(
    client: BareClient, expected: Mapping[str, int], timeout: float = READY_TIMEOUT
) -> Listing:
    """Poll tools/list until each namespace lists its expected number of tools."""
    counts: Counter[str] = Counter()
    with anyio.move_on_after(timeout):
        while True:
            listing = await bare_list_tools(client)
            counts = Counter(t["name"].split(SEPARATOR, 1)[0] for t in listing.tools if SEPARATOR in t["name"])
            if all(counts[ns] >= n for ns, n in expected.items()):
                return listing
            await anyio.sleep(0.02)
    missing = {ns: f"{counts[ns]}/{n}" for ns, n in expected.items() if counts[ns] < n}
    raise BenchError(f"router did not list every backend's tools within {timeout:.0f}s (listed/expected: {missing})")


@asynccontextmanager
async def stdio_client_of(lab: Lab, label: str, argv: Sequence[str]) -> AsyncIterator[Connection]:
    """A connection to a program launched over stdio (the SDK stops it on the way out)."""
    params = StdioServerParameters(command=sys.executable, args=list(argv))
    async with connect(stdio_client(params, errlog=lab.log(label))) as conn:
        yield conn


def router_argv(lab: Lab, config: Path, *extra: str) -> list[str]:
    return [str(lab.router), "--config", str(config), "--log-level", "WARNING", *extra]


@asynccontextmanager
async def stdio_router(
    lab: Lab, label: str, backends: Sequence[Mapping[str, Any]], routing: Mapping[str, Any] | None = None
) -> AsyncIterator[Connection]:
    """A router over stdio, launched through its CLI, and a connection to it; its backends may not all be listed yet."""
    config = lab.write_config(label, backends, routing)
    async with stdio_client_of(lab, label, router_argv(lab, config)) as conn:
        yield conn


@asynccontextmanager
async def http_fake_backend(lab: Lab, label: str, tools: int = 1, *, sse: bool = False) -> AsyncIterator[str]:
    """A fake backend serving streamable HTTP, answering with JSON or (`sse`) SSE streams; yields its URL."""
    port = free_port()
    with lab.spawn(label, fake_backend_argv(tools=tools, http=port, sse=sse)) as proc:
        await wait_for_port(port, proc)
        yield f"http://{HOST}:{port}/mcp"


@asynccontextmanager
async def http_router(
    lab: Lab, label: str, backends: Sequence[Mapping[str, Any]], *extra: str, token: str | None = None
) -> AsyncIterator[Connection]:
    """A router serving streamable HTTP, launched through its CLI, and a connection to it; with `token`, the router
    takes only that bearer token (MCP_AUTH_TOKEN) and the connection presents it."""
    config = lab.write_config(label, backends)
    port = free_port()
    argv = router_argv(lab, config, "--transport", "http", "--host", HOST, "--port", str(port), *extra)
    with lab.spawn(label, argv, {"MCP_AUTH_TOKEN": token} if token else None) as proc:
        await wait_for_port(port, proc)
        async with connect_http(f"http://{HOST}:{port}/mcp", token) as conn:
            yield conn


MAX_PAGES: Final = 1000


async def list_all_tools(conn: Connection) -> tuple[list[types.Tool], int]:
    """Every tool, following cursors, parsed and validated by the SDK as any SDK client does; and how many pages that took."""
    tools: list[types.Tool] = []
    cursor: str | None = None
    for pages in range(1, MAX_PAGES + 1):
        request = types.ListToolsRequest(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        result = await conn.session.send_request(request, types.ListToolsResult)
        tools += result.tools
        cursor = result.next_cursor
        if cursor is None:
            return tools, pages
    raise BenchError(f"tools/list did not end after {MAX_PAGES} pages")


async def wait_for_tools(conn: Connection, expected: Mapping[str, int], timeout: float = READY_TIMEOUT) -> int:
    """Poll tools/list until each namespace lists its expected number of tools; return the total listed."""
    counts: Counter[str] = Counter()
    with anyio.move_on_after(timeout):
        while True:
            tools, _ = await list_all_tools(conn)
            counts = Counter(t.name.split(SEPARATOR, 1)[0] for t in tools if SEPARATOR in t.name)
            if all(counts[ns] >= n for ns, n in expected.items()):
                return len(tools)
            await anyio.sleep(0.02)
    missing = {ns: f"{counts[ns]}/{n}" for ns, n in expected.items() if counts[ns] < n}
    raise BenchError(f"router did not list every backend's tools within {timeout:.0f}s (listed/expected: {missing})")


# ---------------------------------------------------------------------------- measuring

Call = Callable[[], Awaitable[None]]


def echo_call(conn: Connection, tool: str) -> Call:
    """One echo call through the session, without call_tool's extra validation (which would burden both sides alike)."""
    request = types.CallToolRequest(params=types.CallToolRequestParams(name=tool, arguments={"text": "ping"}))

    async def call() -> None:
        result = await conn.session.send_request(request, types.CallToolResult)
        if result.is_error:
            raise BenchError(f"{tool} answered with an error: {result.content}")

    return call


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(slots=True)
class Timing:
    """Latencies of some calls and the wall time they took together."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0

    def add(self, other: Timing) -> None:
        self.latencies += other.latencies
        self.elapsed += other.elapsed

    def summary(self) -> dict[str, float]:
        if not self.latencies:
            return {"calls": 0}
        return {
            "calls": len(self.latencies),
            "p50_ms": round(percentile(self.latencies, 50) * 1000, 3),
            "p99_ms": round(percentile(self.latencies, 99) * 1000, 3),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 3),
            "calls_per_s": round(len(self.latencies) / self.elapsed, 1),
        }


async def sequential(call: Call, n: int, *, seconds: float = math.inf) -> Timing:
    """`n` calls back to back, or as many as fit in `seconds`."""
    timing = Timing()
    started = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        await call()
        timing.latencies.append(time.perf_counter() - t)
        if t - started >= seconds:
            break
    timing.elapsed = time.perf_counter() - started
    return timing


async def concurrent(call: Call, callers: int, per_caller: int) -> Timing:
    """`callers` tasks sharing one session, each making `per_caller` calls back to back."""
    timing = Timing()

    async def caller() -> None:
        for _ in range(per_caller):
            t = time.perf_counter()
            await call()
            timing.latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(caller)
    timing.elapsed = time.perf_counter() - started
    return timing


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


# ---------------------------------------------------------------------------- scenario: call overhead


async def compare(profile: Profile, direct: Call, routed: Call) -> dict[str, Any]:
    """Direct and routed calls in alternating rounds, one caller then 32; pooled per side."""
    sides = {"direct": direct, "routed": routed}
    for call in sides.values():
        await sequential(call, profile.warmup_calls)
    one = {side: Timing() for side in sides}
    many = {side: Timing() for side in sides}
    for _ in range(profile.rounds):
        for side, call in sides.items():
            one[side].add(await sequential(call, profile.sequential_calls))
        for side, call in sides.items():
            many[side].add(await concurrent(call, CONCURRENT_CALLERS, profile.calls_per_caller))
    result: dict[str, Any] = {}
    for mode, timings in (("sequential", one), ("concurrent", many)):
        d, r = timings["direct"].summary(), timings["routed"].summary()
        result[mode] = {
            "callers": 1 if mode == "sequential" else CONCURRENT_CALLERS,
            "direct": d,
            "routed": r,
            "ratio": {key: ratio(r[key], d[key]) for key in ("p50_ms", "p99_ms", "calls_per_s")},
        }
    return result


async def overhead_stdio(lab: Lab, profile: Profile) -> dict[str, Any]:
    async with (
        stdio_client_of(lab, "overhead-stdio-backend", fake_backend_argv()) as direct,
        stdio_router(lab, "overhead-stdio-router", [stdio_backend("b0")]) as routed,
    ):
        await wait_for_tools(routed, {"b0": 1})
        return await compare(profile, echo_call(direct, "echo"), echo_call(routed, "b0__echo"))


async def overhead_stdio_pool(lab: Lab, profile: Profile) -> dict[str, Any]:
    """The same call to a pool of two replicas with routes: the routing decision's share of a call."""
    routes = [{"pattern": "github_*", "strategy": "path"}, {"pattern": "ech?", "strategy": "capability"}]
    replicas = [
        stdio_backend("p0") | {"namespace": "pool", "routes": routes},
        stdio_backend("p1") | {"namespace": "pool"},
    ]
    async with (
        stdio_client_of(lab, "overhead-pool-backend", fake_backend_argv()) as direct,
        stdio_router(lab, "overhead-pool-router", replicas) as routed,
    ):
        await wait_for_tools(routed, {"pool": 1})
        return await compare(profile, echo_call(direct, "echo"), echo_call(routed, "pool__echo"))


async def overhead_http(lab: Lab, profile: Profile, *, sse: bool) -> dict[str, Any]:
    """A backend answering with SSE streams behind a router in its default mode, or both set to plain JSON."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(http_fake_backend(lab, "overhead-http-backend", sse=sse))
        direct = await stack.enter_async_context(connect_http(url))
        extra = () if sse else ("--json-response",)
        routed = await stack.enter_async_context(
            http_router(lab, "overhead-http-router", [http_backend("h0", url)], *extra)
        )
        await wait_for_tools(routed, {"h0": 1})
        return await compare(profile, echo_call(direct, "echo"), echo_call(routed, "h0__echo"))


async def overhead_http_auth(lab: Lab, profile: Profile) -> dict[str, Any]:
    """What a bearer token costs: two routers over one SSE-answering backend, one of them taking a static token;
    "direct" here is the router without authentication, "routed" the one with it."""
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(http_fake_backend(lab, "auth-http-backend", sse=True))
        backends = [http_backend("h0", url)]
        open_router = await stack.enter_async_context(http_router(lab, "auth-off-router", backends))
        token = "bench-token-" + "x" * 32
        guarded_router = await stack.enter_async_context(http_router(lab, "auth-on-router", backends, token=token))
        for conn in (open_router, guarded_router):
            await wait_for_tools(conn, {"h0": 1})
        return await compare(profile, echo_call(open_router, "h0__echo"), echo_call(guarded_router, "h0__echo"))


async def bench_overhead(lab: Lab, profile: Profile) -> dict[str, Any]:
    return {
        "stdio": await overhead_stdio(lab, profile),
        "stdio-pool": await overhead_stdio_pool(lab, profile),
        "http": await overhead_http(lab, profile, sse=True),
        "http-json": await overhead_http(lab, profile, sse=False),
        "http-auth": await overhead_http_auth(lab, profile),
    }


# ---------------------------------------------------------------------------- scenario: tools/list and memory at scale


async def scale_case(lab: Lab, profile: Profile, backends: int, tools: int) -> dict[str, Any]:
    """One router with `backends` backends of `tools` tools: time until all are listed, tools/list latency, memory."""
    label = f"scale-{backends}x{tools}"
    shared = profile.shared_http_from is not None and backends >= profile.shared_http_from
    async with AsyncExitStack() as stack:
        if shared:
            url = await stack.enter_async_context(http_fake_backend(lab, f"{label}-backend", tools))
            entries = [http_backend(f"b{i}", url) for i in range(backends)]
        else:
            entries = [stdio_backend(f"b{i}", tools=tools) for i in range(backends)]
        started = time.perf_counter()
        client = await stack.enter_async_context(
            bare_client_of(lab, label, router_argv(lab, lab.write_config(label, entries)))
        )
        listing = await bare_wait_for_tools(client, {f"b{i}": tools for i in range(backends)})
        ready_s = time.perf_counter() - started
        for _ in range(2):
            await bare_list_tools(client)
        router_pid = child_pid(process_table(), str(lab.router))
        answered, decoded, sdk_parsed = Timing(), Timing(), Timing()
        cpu_before = cpu_seconds(router_pid)
        for _ in range(profile.list_samples):
            sample = await bare_list_tools(client)
            answered.latencies.append(sample.answered_s)
            decoded.latencies.append(sample.decoded_s)
            sdk_parsed.latencies.append(sample.sdk_parsed_s)
        router_cpu_ms = (cpu_seconds(router_pid) - cpu_before) * 1000 / profile.list_samples
        for timing in (answered, decoded, sdk_parsed):
            timing.elapsed = sum(timing.latencies)
        return {
            "backends": backends,
            "tools_per_backend": tools,
            "backend_transport": "http, one shared process" if shared else "stdio",
            "tools_listed": len(listing.tools),
            "pages": listing.pages,
            "ready_s": round(ready_s, 2),
            "list": answered.summary(),
            "router_cpu_ms_per_list": round(router_cpu_ms, 2),
            "list_decoded": decoded.summary(),
            "list_sdk_parsed": sdk_parsed.summary(),
            **router_memory(lab.router),
        }


async def bench_scale(lab: Lab, profile: Profile) -> dict[str, Any]:
    return {f"{n}x{tools}": await scale_case(lab, profile, n, tools) for n, tools in profile.scale_cases}


# ---------------------------------------------------------------------------- scenario: start-up


async def time_to_list(lab: Lab, label: str, argv: Sequence[str], expected: Mapping[str, int] | None = None) -> float:
    """Seconds from launching a program over stdio until it lists its tools (all `expected` ones, for a router)."""
    started = time.perf_counter()
    async with stdio_client_of(lab, label, argv) as conn:
        if expected is None:
            await list_all_tools(conn)
        else:
            await wait_for_tools(conn, expected)
        return time.perf_counter() - started


async def time_to_list_in_parallel(lab: Lab, label: str, argvs: Sequence[Sequence[str]]) -> float:
    """Seconds from launching all the programs at once until every one has listed its tools."""
    listed = 0
    all_listed = anyio.Event()
    elapsed = 0.0

    async def one(i: int, argv: Sequence[str]) -> None:
        nonlocal listed, elapsed
        async with stdio_client_of(lab, f"{label}-{i}", argv) as conn:
            await list_all_tools(conn)
            listed += 1
            if listed == len(argvs):
                elapsed = time.perf_counter() - started
                all_listed.set()
            await all_listed.wait()  # stay up until all are listed, as they would be behind a router

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i, argv in enumerate(argvs):
            tg.start_soon(one, i, argv)
    return elapsed


def light_backend_argv(lab: Lab, *, tools: int, startup_delay: float) -> list[str]:
    path = lab.root / "light_backend.py"
    if not path.exists():
        path.write_text(LIGHT_BACKEND)
    return ["-S", str(path), str(tools), str(startup_delay)]


async def startup_case(lab: Lab, profile: Profile, kind: str, argvs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """The slowest of `argvs` alone, (optionally) all of them directly in parallel, and a router with all of them."""
    config = lab.write_config(
        f"startup-{kind}", [{"name": f"s{i}", "command": sys.executable, "args": list(a)} for i, a in enumerate(argvs)]
    )
    runs: dict[str, list[float]] = {"slowest_alone_s": [], "router_10_s": []}
    if profile.startup_reference:
        runs["direct_parallel_s"] = []
    for _ in range(profile.startup_repeats):
        runs["slowest_alone_s"].append(await time_to_list(lab, f"startup-{kind}-alone", argvs[-1]))
        if profile.startup_reference:
            runs["direct_parallel_s"].append(await time_to_list_in_parallel(lab, f"startup-{kind}-parallel", argvs))
        expected = {f"s{i}": 50 for i in range(len(argvs))}
        runs["router_10_s"].append(
            await time_to_list(lab, f"startup-{kind}-router", router_argv(lab, config), expected)
        )
    result: dict[str, Any] = {key: round(statistics.median(values), 3) for key, values in runs.items()}
    return result | {"ratio": ratio(result["router_10_s"], result["slowest_alone_s"]), "runs": runs}


async def bench_startup(lab: Lab, profile: Profile) -> dict[str, Any]:
    """10 backends that start in milliseconds but wait before serving, and 10 Python SDK backends, which also load the SDK."""
    delays = [round(profile.startup_delay * (i + 1) / 10, 3) for i in range(10)]
    empty = lab.write_config("startup-0", [])
    router_0 = [
        await time_to_list(lab, "startup-router-0", router_argv(lab, empty), {}) for _ in range(profile.startup_repeats)
    ]
    result = {
        "delays_s": delays,
        "repeats": profile.startup_repeats,
        "router_0_s": round(statistics.median(router_0), 3),
        "light": await startup_case(
            lab, profile, "light", [light_backend_argv(lab, tools=50, startup_delay=d) for d in delays]
        ),
    }
    if profile.startup_reference:  # what ten processes loading the SDK at once cost on this machine's CPUs
        result["sdk"] = await startup_case(
            lab, profile, "sdk", [fake_backend_argv(tools=50, startup_delay=d) for d in delays]
        )
    return result


# ---------------------------------------------------------------------------- scenario: one backend hangs


async def keep_calling_hang(conn: Connection, delay: float, stop: anyio.Event, outcomes: Counter[str]) -> None:
    """Call the hanging tool over and over until `stop`, counting how each call ended."""
    request = types.CallToolRequest(params=types.CallToolRequestParams(name="stuck__hang", arguments={}))
    await anyio.sleep(delay)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await conn.session.send_request(request, types.CallToolResult)
            outcomes["answered"] += 1
        except MCPError as err:
            outcomes["timed out" if err.error.code == REQUEST_TIMEOUT else f"error {err.error.code}"] += 1
        if time.perf_counter() - started < 0.05:
            await anyio.sleep(0.05)  # pace fast failures so they do not turn into a CPU hog of our own


async def bench_hang(lab: Lab, profile: Profile) -> dict[str, Any]:
    timeout = profile.hang_timeout
    backends = [
        stdio_backend("ok"),
        {**stdio_backend("stuck", hang=True), "circuit_breaker": {"failure_threshold": 1_000_000}},
    ]
    outcomes: Counter[str] = Counter()
    normal, hanging = Timing(), Timing()
    async with stdio_router(lab, "hang-router", backends, {"request_timeout_seconds": timeout}) as conn:
        await wait_for_tools(conn, {"ok": 1, "stuck": 2})
        call = echo_call(conn, "ok__echo")
        await sequential(call, profile.warmup_calls)
        for _ in range(profile.hang_rounds):
            normal.add(await sequential(call, MAX_PHASE_CALLS, seconds=profile.hang_phase_seconds))
            stop = anyio.Event()
            async with anyio.create_task_group() as tg:
                for i in range(HANG_CALLERS):  # staggered, so timeouts fire all along rather than in bursts
                    tg.start_soon(keep_calling_hang, conn, i * timeout / HANG_CALLERS, stop, outcomes)
                await anyio.sleep(timeout + 0.1)  # every background caller has a call in flight; timeouts are firing
                hanging.add(await sequential(call, MAX_PHASE_CALLS, seconds=profile.hang_phase_seconds))
                stop.set()
                tg.cancel_scope.cancel()
            await anyio.sleep(0.2)  # let the cancellations settle before the next normal phase
    n, h = normal.summary(), hanging.summary()
    return {
        "request_timeout_s": timeout,
        "hang_callers": HANG_CALLERS,
        "normal": n,
        "hanging": h,
        "hang_calls": dict(outcomes),
        "ratio": {key: ratio(h[key], n[key]) for key in ("p50_ms", "p99_ms")},
    }


# ---------------------------------------------------------------------------- scenario: a backend floods a slow client


FLOOD_BACKEND: Final = """
import json, sys, threading
lock = threading.Lock()
def send(message):
    with lock:
        sys.stdout.write(json.dumps(message) + "\\n")
        sys.stdout.flush()
def flood():
    i = 0
    while True:
        i += 1
        send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": f"line {i} " + "x" * 200}})
for line in sys.stdin:
    message = json.loads(line)
    method, request_id = message.get("method"), message.get("id")
    if method == "initialize":
        result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}, "logging": {}}, "serverInfo": {"name": "f", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": [{"name": "noop", "inputSchema": {"type": "object"}}]}
    elif method == "logging/setLevel":
        threading.Thread(target=flood, daemon=True).start()
        result = {}
    else:
        result = {}
    if request_id is not None:
        send({"jsonrpc": "2.0", "id": request_id, "result": result})
"""
"""A stdlib-only stdio backend that, once a level is set, sends log messages as fast as the router reads them."""


async def bench_flood(lab: Lab, profile: Profile) -> dict[str, Any]:
    """Healthy calls through an HTTP router while a backend floods log messages at a client that reads none of them."""
    import httpx2

    backends = [stdio_backend("ok"), {"name": "flood", "command": sys.executable, "args": ["-c", FLOOD_BACKEND]}]
    config = lab.write_config("flood-router", backends)
    port = free_port()
    url = f"http://{HOST}:{port}/mcp"
    normal, flooded = Timing(), Timing()
    with lab.spawn(
        "flood-router", router_argv(lab, config, "--transport", "http", "--host", HOST, "--port", str(port))
    ) as proc:
        await wait_for_port(port, proc)
        async with (
            connect_http(url) as conn,
            httpx2.AsyncClient(headers={"accept": "application/json, text/event-stream"}) as http,
        ):
            await wait_for_tools(conn, {"ok": 1, "flood": 1})
            call = echo_call(conn, "ok__echo")
            await sequential(call, profile.warmup_calls)
            normal.add(await sequential(call, MAX_PHASE_CALLS, seconds=profile.hang_phase_seconds))
            rss_before = memory_mb(proc.pid)["rss_mb"]

            def rpc(request_id: int | None, method: str, params: dict[str, Any]) -> dict[str, Any]:
                return {"jsonrpc": "2.0", "method": method, "params": params} | (
                    {"id": request_id} if request_id else {}
                )

            hello = {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "slow", "version": "1"},
            }
            opened = await http.post(url, json=rpc(1, "initialize", hello))
            session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
            await http.post(url, json=rpc(None, "notifications/initialized", {}), headers=session)
            async with http.stream(
                "GET", url, headers={**session, "accept": "text/event-stream"}
            ):  # opened, never read
                await http.post(url, json=rpc(2, "logging/setLevel", {"level": "debug"}), headers=session)
                await anyio.sleep(1.0)  # the flood is on and the slow client's buffers are full
                flooded.add(await sequential(call, MAX_PHASE_CALLS, seconds=profile.hang_phase_seconds))
                memory = memory_mb(proc.pid)
                listing = await conn.session.send_request(
                    types.CallToolRequest(params=types.CallToolRequestParams(name="list_backends", arguments={})),
                    types.CallToolResult,
                )
    n, f = normal.summary(), flooded.summary()
    return {
        "normal": n,
        "flooded": f,
        "rss_before_mb": rss_before,
        **memory,
        "clients": (listing.structured_content or {}).get("clients"),
        "ratio": {key: ratio(f[key], n[key]) for key in ("p50_ms", "p99_ms")},
    }


# ---------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class Target:
    description: str
    path: tuple[str, ...]
    """Where the measured value sits in the results."""
    limit: float
    at_most: bool
    """True: the value must not exceed `limit`; False: it must reach it."""
    unit: str

    def value(self, results: Mapping[str, Any]) -> float | None:
        node: Any = results
        for key in self.path:
            if not isinstance(node, Mapping) or key not in node:
                return None
            node = node[key]
        return node if isinstance(node, int | float) else None

    def check(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit


TARGETS: Final = (
    Target("routed/direct p50, stdio", ("overhead", "stdio", "sequential", "ratio", "p50_ms"), 2.0, True, "x"),
    Target(
        "routed/direct p50, stdio, 2 replicas with routes",
        ("overhead", "stdio-pool", "sequential", "ratio", "p50_ms"),
        2.0,
        True,
        "x",
    ),
    Target(
        "routed/direct calls/s, 32 callers, stdio",
        ("overhead", "stdio", "concurrent", "ratio", "calls_per_s"),
        0.5,
        False,
        "x",
    ),
    Target("routed/direct p50, http", ("overhead", "http", "sequential", "ratio", "p50_ms"), 1.6, True, "x"),
    Target(
        "routed/direct calls/s, 32 callers, http",
        ("overhead", "http", "concurrent", "ratio", "calls_per_s"),
        0.7,
        False,
        "x",
    ),
    Target(
        "with a bearer token / without, p50, http",
        ("overhead", "http-auth", "sequential", "ratio", "p50_ms"),
        1.05,
        True,
        "x",
    ),
    Target("tools/list p50, 50 backends x 50 tools", ("scale", "50x50", "list", "p50_ms"), 5.0, True, " ms"),
    Target("start-up, 10 backends / slowest alone", ("startup", "light", "ratio"), 1.3, True, "x"),
    Target("router RSS with 10 backends", ("scale", "10x50", "rss_mb"), 80.0, True, " MB"),
    Target("healthy p99 while one backend hangs / normal", ("hang", "ratio", "p99_ms"), 1.5, True, "x"),
    Target("router RSS while a backend floods a slow client", ("flood", "rss_mb"), 150.0, True, " MB"),
    Target("healthy p99 while a backend floods a slow client / normal", ("flood", "ratio", "p99_ms"), 1.5, True, "x"),
)


def evaluate(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        value = target.value(results)
        status = "n/a" if value is None else "PASS" if target.check(value) else "FAIL"
        limit = f"{'<=' if target.at_most else '>='} {target.limit:g}{target.unit}"
        rows.append({"target": target.description, "value": value, "limit": limit, "status": status})
    return rows


# ---------------------------------------------------------------------------- report


def num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> None:
    """A plain-text table; the first `left` columns are left-aligned, the rest right-aligned."""
    cells = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for n, row in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


SIDE_NAMES: Final = {"http-auth": {"direct": "no auth", "routed": "token", "routed/direct": "token/no auth"}}
"""The rows of the overhead table that compare two routers, not a backend with and without one."""


def report_overhead(results: Mapping[str, Any]) -> None:
    rows = []
    for transport, by_mode in results.items():
        names = SIDE_NAMES.get(transport, {})
        for mode in ("sequential", "concurrent"):
            m = by_mode[mode]
            for side in ("direct", "routed"):
                s = m[side]
                rows.append(
                    [
                        transport,
                        m["callers"],
                        names.get(side, side),
                        s["calls"],
                        num(s["p50_ms"]),
                        num(s["p99_ms"]),
                        num(s["calls_per_s"], 0),
                    ]
                )
            r = m["ratio"]
            rows.append(
                [
                    transport,
                    m["callers"],
                    names.get("routed/direct", "routed/direct"),
                    "",
                    *(num(r[k]) + "x" for k in ("p50_ms", "p99_ms", "calls_per_s")),
                ]
            )
    print_table(
        "Call overhead: `echo` directly on the backend vs through the router",
        ["transport", "callers", "side", "calls", "p50 ms", "p99 ms", "calls/s"],
        rows,
        left=3,
    )


def report_scale(results: Mapping[str, Any]) -> None:
    rows = [
        [
            r["backends"],
            r["tools_per_backend"],
            r["backend_transport"],
            r["tools_listed"],
            r["pages"],
            num(r["list"].get("p50_ms")),
            num(r["list"].get("p99_ms")),
            num(r["list_decoded"].get("p50_ms")),
            num(r["list_sdk_parsed"].get("p50_ms")),
            num(r.get("router_cpu_ms_per_list")),
            num(r["ready_s"]),
            num(r["rss_mb"], 1),
            num(r["hwm_mb"], 1),
            f"{r['helpers']} / {num(r['helpers_pss_mb'], 1)}",
        ]
        for r in results.values()
    ]
    print_table(
        "tools/list through the router (all pages, catalogue warm; p50/p99 until the last byte of each answer is in, 'decoded' adds "
        "json.loads, 'SDK-parsed' the client SDK's validation instead; 'router CPU' is the router's own CPU time per listing) and router memory",
        [
            "backends",
            "tools each",
            "backend transport",
            "tools listed",
            "pages",
            "p50 ms",
            "p99 ms",
            "decoded p50",
            "SDK-parsed p50",
            "router CPU ms",
            "ready s",
            "RSS MB",
            "peak MB",
            "helpers / PSS MB",
        ],
        rows,
        left=0,
    )


def report_startup(results: Mapping[str, Any]) -> None:
    delays = results["delays_s"]
    rows = [["router with no backends", "", num(results["router_0_s"])]]
    for kind, what in (("light", "stdlib-only backends"), ("sdk", "Python SDK backends")):
        if (r := results.get(kind)) is None:
            continue
        rows.append([what, f"slowest alone (waits {delays[-1]:g} s)", num(r["slowest_alone_s"])])
        if "direct_parallel_s" in r:
            rows.append(
                [
                    "",
                    f"10 started directly, in parallel (wait {delays[0]:g}..{delays[-1]:g} s)",
                    num(r["direct_parallel_s"]),
                ]
            )
        rows += [
            ["", "router with the 10, until all are listed", num(r["router_10_s"])],
            ["", "router with 10 / slowest alone", num(r["ratio"]) + "x"],
        ]
    print_table(
        f"Start-up: launch until listed (median of {results['repeats']})", ["backends", "case", "seconds"], rows
    )


def report_hang(results: Mapping[str, Any]) -> None:
    rows = []
    for phase, key in (("normal", "normal"), ("one backend hangs", "hanging")):
        s = results[key]
        rows.append([phase, s["calls"], num(s["p50_ms"]), num(s["p99_ms"]), num(s["calls_per_s"], 0)])
    r = results["ratio"]
    rows.append(["hangs / normal", "", num(r["p50_ms"]) + "x", num(r["p99_ms"]) + "x", ""])
    outcomes = ", ".join(f"{n} {what}" for what, n in sorted(results["hang_calls"].items())) or "none"
    print_table(
        f"Failure isolation: healthy calls while {results['hang_callers']} callers hit a hanging tool "
        f"(request timeout {results['request_timeout_s']:g} s; hang calls: {outcomes})",
        ["phase", "calls", "p50 ms", "p99 ms", "calls/s"],
        rows,
    )


def report_flood(results: Mapping[str, Any]) -> None:
    rows = []
    for phase, key in (("normal", "normal"), ("flood at a slow client", "flooded")):
        s = results[key]
        rows.append([phase, s["calls"], num(s["p50_ms"]), num(s["p99_ms"]), num(s["calls_per_s"], 0)])
    r = results["ratio"]
    rows.append(["flood / normal", "", num(r["p50_ms"]) + "x", num(r["p99_ms"]) + "x", ""])
    clients = results.get("clients") or {}
    print_table(
        f"Slow reader: healthy calls while a backend floods log messages at an HTTP client that reads none (router RSS "
        f"{num(results['rss_before_mb'], 1)} -> {num(results['rss_mb'], 1)} MB, peak {num(results['hwm_mb'], 1)} MB; "
        f"log messages dropped: {clients.get('dropped_log_messages', '-')})",
        ["phase", "calls", "p50 ms", "p99 ms", "calls/s"],
        rows,
    )


REPORTERS: Final[dict[str, Callable[[Mapping[str, Any]], None]]] = {
    "overhead": report_overhead,
    "scale": report_scale,
    "startup": report_startup,
    "hang": report_hang,
    "flood": report_flood,
}


def report(results: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]) -> None:
    for name, reporter in REPORTERS.items():
        if name not in results:
            continue
        if "error" in results[name]:
            print(f"\n{name}: ERROR: {results[name]['error']}")
        else:
            reporter(results[name])
    rows = [[t["status"], t["target"], "-" if t["value"] is None else f"{t['value']:g}", t["limit"]] for t in targets]
    print_table("Targets", ["", "target", "measured", "limit"], rows, left=2)


# ---------------------------------------------------------------------------- running


SCENARIOS: Final[dict[str, Callable[[Lab, Profile], Awaitable[dict[str, Any]]]]] = {
    "overhead": bench_overhead,
    "scale": bench_scale,
    "startup": bench_startup,
    "hang": bench_hang,
    "flood": bench_flood,
}


def describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}".strip()


async def run_scenarios(lab: Lab, profile: Profile, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Each scenario in turn, and its wall time; one that fails is reported with its processes' logs, and the rest still run."""
    results: dict[str, Any] = {}
    wall: dict[str, float] = {}
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        first_log = len(lab.logs)
        started = time.perf_counter()
        try:
            with anyio.fail_after(SCENARIO_TIMEOUT):
                results[name] = await SCENARIOS[name](lab, profile)
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
            results[name] = {"error": describe(exc)}
            print(f"{name} failed: {describe(exc)}\n{lab.tails(first_log)}", file=sys.stderr, flush=True)
        wall[name] = round(time.perf_counter() - started, 1)
    return results, wall


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C (or SIGTERM), possibly wrapped in exception groups by the task groups it went through."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.subgroup(KeyboardInterrupt) is not None
    return isinstance(exc, KeyboardInterrupt)


def git_describe(path: Path) -> dict[str, Any]:
    """Which router was measured: its commit (if in git), whether it differs from it, and its content hash."""
    info: dict[str, Any] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16]}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True, timeout=10)

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", path.name)
    except (OSError, subprocess.SubprocessError):
        return info
    if head.returncode == 0:
        info |= {"commit": head.stdout.strip(), "modified": bool(dirty.stdout.strip())}
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench_mcp_router.py",
        description="Benchmark mcp-router against real fake-backend processes (see the module docstring for what is measured).",
    )
    parser.add_argument("--quick", action="store_true", help="reduced run, under a minute")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results here as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed or a scenario fails")
    parser.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})"
    )
    parser.add_argument(
        "--router", metavar="PATH", type=Path, default=DEFAULT_ROUTER, help="the mcp_router.py to measure"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    profile = QUICK if args.quick else FULL
    router = args.router.resolve()
    if not router.is_file():
        print(f"no router at {router}", file=sys.stderr)
        return 2
    signal.signal(
        signal.SIGTERM, signal.default_int_handler
    )  # like Ctrl-C: unwind, so every process started gets stopped
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-mcp-router-") as tmp:
        lab = Lab(Path(tmp), router)
        try:
            results, scenario_wall = anyio.run(run_scenarios, lab, profile, names)
        except BaseException as exc:
            if not is_interrupt(exc):
                raise
            print("interrupted; every process started was stopped", file=sys.stderr)
            return 130
        finally:
            lab.close()
    meta: dict[str, Any] = {
        "profile": profile.name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(time.perf_counter() - started, 1),
        "scenario_wall_s": scenario_wall,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before, 2),
        "router": git_describe(router),
    }
    targets = evaluate(results)
    r = meta["router"]
    version = f"{r.get('commit', 'no git')}{' (modified)' if r.get('modified') else ''}, sha256 {r['sha256']}"
    print(
        f"mcp-router benchmark: {profile.name} run, {meta['wall_s']} s; router {version}\n"
        f"{meta['cpus']} CPUs (1-minute load average {load_before:.2f} before the run: other work skews results), Python {meta['python']}"
    )
    report(results, targets)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "targets": targets}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    failed = any(t["status"] == "FAIL" for t in targets) or any("error" in v for v in results.values())
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    if "--fake-backend" in sys.argv[1:]:
        run_fake_backend(sys.argv[1:])
    else:
        raise SystemExit(main())
