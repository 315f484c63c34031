#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "mcp>=2.3,<3",
#     "pyyaml>=6",
# ]
# ///
"""mcp-router: one MCP server in front of many, with namespaces and resilience.

Connects to many backend MCP servers (stdio subprocesses, streamable HTTP, SSE),
exposes all their tools, resources and prompts under namespace prefixes, and keeps
serving when backends crash, hang or flap (health checks, circuit breakers,
retries with backoff, self-healing connections).

Run it any of three ways:

    uv run mcp_router.py --config backends.yaml
    pipx run mcp_router.py --config backends.yaml
    python mcp_router.py --config backends.yaml      # with mcp and pyyaml installed

A minimal backends.yaml:

    backends:
      - name: time
        command: uvx
        args: [mcp-server-time]
      - name: docs
        url: https://example.com/mcp

Map of this file, contract first, machinery last:

    constants, errors      names, limits and the error hierarchy
    config                 frozen dataclasses; parse_config(raw, env) is pure, load_config(path) reads the file
    pure core              no await, no I/O, no SDK: naming and the catalogue, backoff, the circuit breaker,
                           the Clock, the backend lifecycle table, and routing (plans, snapshots, STRATEGIES)
    start-up               the command line (every flag and subcommand) and config; run as a program to serve,
                           stdio backends launch while the SDK (next) is imported
    the SDK                its imports
    I/O shell: backends    one Backend per server: connection, supervisor, health, requests; a 2026-era one's
                           ChangeStream (subscriptions/listen: list changes, followed resources)
    I/O shell: the router  Router: the backends, the catalogue, and the request path between them
    MCP wiring             the SDK Server's handlers, the management tools, the fast path
    serving                stdio and HTTP serving, hot reload (ConfigReloader), signals (run_router)
    CLI                    the check, tools and call subcommands; main()

The path of one tools/call (handshake era, stdio):

    LineReader (serving) reads the client's line -> the SDK Server -> _RouterMiddleware's fast path
    (2026-era calls: the SDK's checked handler) -> route_tool_call -> Router.find: the catalogue's
    Entry (original name, pool, plan) -> Router.forward: Backend.snapshot of each candidate ->
    STRATEGIES[plan.strategy] -> Decision -> Backend.request -> the backend's pipe; the answer comes
    back through _WatchedDispatcher, is checked and stamped with the serving backend, and is written
    by LineWriter. A failure goes to the next candidate only where may_send_elsewhere() allows.
    Over HTTP: uvicorn -> SessionLimits -> DirectCalls (the call on an open session, or stateless)
    -> _RouterMiddleware -> ... -> Backend.request -> DirectPosts (a 2026-era HTTP backend) or the
    SDK's client session; everything DirectCalls passes over takes the SDK's StreamableHTTP path.

Where the router bypasses the SDK for speed (each guarded by the test named):
    LineReader/LineWriter read and write pipes on the event loop, no thread or memory-stream hop (a
        terminal or file: a daemon thread and in-place writes, so signals never wait on a read)
        (test_end_to_end_over_stdio_with_real_stdio_backends, test_malformed_lines_from_a_client_...,
        test_sigint_stops_the_router_within_the_stop_grace_whatever_stdin_is)
    _RouterMiddleware answers handshake-era tools/call and lists without re-validating what the
        backend's listing validated once (test_parity_router_changes_nothing_but_names)
    EncodedItems: list pages encoded once per catalogue (test_a_cached_page_is_written_as_the_sdk_would_write_it)
    PlainAnswers: plain JSON instead of a one-event SSE stream (test_http_answers_are_plain_json_unless_the_call_streams)
    _DrainedOnClose: an answered SSE stream from a backend is read to its end, so its connection is
        reused (test_an_http_backends_streamed_answers_leave_its_connection_open_for_the_next_call)
    bind(): a TCP socket, so asyncio turns Nagle off (test_http_connections_are_served_without_nagle_delays)
    DirectCalls: a handshake-era tools/call over HTTP answered past the SDK's per-request streams
        (test_bad_host_and_origin_are_refused_whatever_the_bind_address, test_a_session_serves_only_
        the_token_that_opened_it, test_closing_a_calls_http_stream_cancels_the_call_at_the_backend)
    DirectPosts: a 2026-era HTTP backend's request as one POST past the SDK's client transport
        (test_a_2026_http_backends_answers_are_read_as_the_sdk_reads_them_and_a_timeout_cancels_the_call)

SPDX-License-Identifier: MIT
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import contextvars
import dataclasses
import difflib
import errno
import functools
import gc
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections import ChainMap, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast
from urllib.parse import parse_qsl, urljoin, urlsplit

import yaml

__version__ = "0.1.0"
_T = TypeVar("_T")
__all__ = [
    "BackendConfig",
    "Catalogue",
    "CircuitBreaker",
    "Config",
    "ConfigError",
    "Router",
    "Settings",
    "backoff_delay",
    "build_catalogue",
    "build_server",
    "expose_name",
    "load_config",
    "main",
    "parse_config",
]

# ---------------------------------------------------------------------------- constants

log = logging.getLogger("mcp_router")

MAX_PATTERN_LENGTH: Final = 256
"""Longest route glob: fnmatch compiles a glob in time that grows with the square of its length."""
SEPARATOR: Final = "__"
"""Joins namespace and name: `github` + `search` -> `github__search`."""
MAX_NAME_LENGTH: Final = 64
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_META_PREFIX: Final = "io.modelcontextprotocol/"
PAGE_SIZE: Final = 1000
"""Items per page of tools/prompts/resources lists toward the client."""
LISTS: Final = {
    "tools/list": ("tool_items", "tools"),
    "prompts/list": ("prompt_items", "prompts"),
    "resources/list": ("resource_items", "resources"),
    "resources/templates/list": ("template_items", "resourceTemplates"),
}
"""Each list method: the catalogue attribute that holds its items, and the result key."""
RESOURCE_NOT_FOUND: Final = -32002
REQUEST_CANCELLED: Final = -32800
"""The error a handshake-era HTTP request that its client cancelled ends with (as the SDK ends one)."""
BACKEND_UNAVAILABLE: Final = -32050
"""JSON-RPC server-error code for 'the backend is down or its circuit is open'."""
RESTART_INITIAL_DELAY: Final = 0.5
RETRY_INITIAL_DELAY: Final = 0.1
MIN_ATTEMPT_SECONDS: Final = 0.05
"""A request with less time left than this is not tried again: the last error is the answer."""
JITTER: Final = 0.2
"""Each backoff delay is scaled into [1 - JITTER, 1] so retries do not march in step."""
CONFIG_FILE_NAME: Final = "backends.yaml"
NO_CONFIG: Final = "(no config)"
"""The source of the configuration when there is no file: zero-config."""


MANAGEMENT_TOOLS: Final = ("list_backends", "get_backend_health", "explain_route")
LOG_SEVERITY: Final = {
    level: i
    for i, level in enumerate(("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"))
}
LOG_MESSAGES_PER_SECOND: Final = 200
"""Log messages a second (and at once) a stdio backend may send through the router; more are dropped and counted."""
DROPPED_LINES_PER_SECOND: Final = 2000
"""Lines a second a stdio backend may send that are dropped unparsed (see Backend._sheds) before its pipe is read
more slowly: a backend flooding logs then waits on its own pipe, instead of taking the router's loop from the calls
of every other backend."""
DROPPED_BATCH: Final = 64
"""Dropped lines between two chances for the loop's other tasks to run."""
HANDSHAKE_TIMEOUT: Final = 60.0
"""Seconds a backend without its own `timeout` may take to answer initialize."""
STOP_GRACE: Final = 2.0
"""Seconds a stdio backend gets to exit, half after stdin closes and half after SIGTERM, before SIGKILL; and HTTP
clients at shutdown."""
SSE_DRAIN_TIMEOUT: Final = 0.1
"""Seconds the end of an answered SSE stream from a backend is waited for, so its connection can be reused."""
NOTIFICATION_QUEUE_BOUND: Final = 1000
"""Log messages from backends that may wait for one slow client; more are dropped, and counted in list_backends.
List changes and resource updates coalesce instead (one pending per list and per URI); results never wait here."""
MAX_JSON_DEPTH: Final = 201
"""Arrays and objects one message may nest, its own object counted: as deep as the SDK's JSON parser reads.
Real MCP traffic nests a few dozen levels at most; a deeper client line is answered -32600."""
STARTUP_GRACE: Final = 10.0
"""Seconds the first initialize and lists wait for backends to connect, so the first tool list is complete.
A backend that takes longer appears later, announced with list_changed."""

# ---------------------------------------------------------------------------- errors


class RouterError(Exception):
    """Base of every error the router raises on purpose."""


class ConfigError(RouterError):
    """A configuration that cannot be used; `problems` lists every one found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class NotSent(RouterError):
    """A request that provably never reached its backend (its connection was gone, or writing it failed): it may be
    sent elsewhere, whatever it is."""


class InvalidCursor(RouterError):
    """A list cursor the router never handed out."""


class EraUnknown(RouterError):
    """An HTTP backend answered the era probe (`server/discover`) with an auth failure or a server error: no verdict
    on its era, so this connection attempt fails and the next one asks again."""


# ---------------------------------------------------------------------------- config

Transport: TypeAlias = Literal["stdio", "http", "sse"]
BackendEra: TypeAlias = Literal["auto", "handshake"]
BACKEND_ERAS: Final[tuple[BackendEra, ...]] = ("auto", "handshake")
"""auto: 2026-07-28 with a backend that serves it (server/discover answers), else the handshake; handshake: always
the handshake era, for a server whose tools ask the client through their session (see the README)."""


def strategy_names() -> tuple[str, ...]:
    """The routing strategies config accepts: the pure core's registry (STRATEGIES) and its aliases."""
    return (*STRATEGIES, *STRATEGY_ALIASES)


LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
EVENT_LOOPS: Final = ("auto", "asyncio", "uvloop")


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    enabled: bool = True
    interval_seconds: float = 30.0
    timeout_seconds: float = 5.0
    endpoint: str | None = None
    """Extra HTTP GET path, relative to the backend URL, checked beside MCP ping."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerConfig:
    failure_threshold: int = 5
    timeout_seconds: float = 60.0
    half_open_attempts: int = 1
    """Trial requests admitted while half-open; all must succeed to close."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    pattern: str
    strategy: str
    fallback_to: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    name: str
    transport: Transport
    namespace: str
    url: str | None = None
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    forward_headers: tuple[str, ...] = ()
    """Client request headers (lower case) passed on to this HTTP backend with each call made for that client."""
    priority: int = 10
    routes: tuple[RouteConfig, ...] = ()
    health_check: HealthCheckConfig = HealthCheckConfig()
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    timeout: float | None = None
    enabled: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    expanded: tuple[str, ...] = field(default=(), repr=False)
    """The values `${VAR}` references in this backend's entry took from the environment: secrets, wherever they went."""
    fallback_to_sse: bool = False
    """A URL backend whose transport is not declared: streamable HTTP, else the legacy SSE transport."""
    era: BackendEra | None = None
    """The protocol era spoken to it: "auto" (its newest) or "handshake"; None: the router's `backend_eras`."""

    def secrets(self) -> list[str]:
        """Values that must never appear in output: what came from `${VAR}`, env and header values (and their last
        word, the token), credentials and query values of the URL and of URLs among the args."""
        found = [*self.expanded, *self.env.values(), *self.headers.values()]
        found += [v.split()[-1] for v in self.headers.values() if v.split()]
        for url in (self.url or "", *(a for a in self.args if "://" in a)):
            parts = urlsplit(url)
            found += [p for p in (parts.password, parts.username) if p]
            found += [value for _, value in parse_qsl(parts.query)]
        return sorted({s for s in found if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)  # longest first

    def public_target(self) -> str:
        """What to show of where this backend lives: the URL without credentials or query, or the program and its package."""
        secrets = self.secrets()
        if self.url:
            parts = urlsplit(self.url)
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            return redact(f"{parts.scheme}://{host}{port}{parts.path}", secrets)  # a key in the path: /mcp/${KEY}/sse
        package = next((a for a in self.args if not a.startswith("-") and "=" not in a and redact(a, secrets) == a), "")
        return redact(f"{Path(self.command or '').name} {package}".strip(), secrets)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    server_name: str = "mcp-router"
    transport: Literal["stdio", "http", "sse"] = "stdio"
    host: str = "127.0.0.1"
    port: int = 8000
    json_response: bool = False
    log_level: str = "INFO"
    event_loop: str = "asyncio"
    default_strategy: str = "capability"
    enable_namespaces: bool = True
    cache_ttl: float = 300.0
    request_timeout: float = 30.0
    max_retries: int = 3
    retry_backoff: float = 2.0
    max_backoff: float = 10.0
    health_check_interval: float = 30.0
    health_check_timeout: float = 5.0
    backend_eras: BackendEra = "auto"
    # the HTTP service (see the serving section)
    allow_unauthenticated: bool = False
    auth_token: str | None = None
    auth_tokens_file: str | None = None
    auth_issuer: str | None = None
    auth_jwks_url: str | None = None
    auth_resource_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    stateless: bool = False
    min_ready: int = 1
    drain_seconds: float = 10.0
    max_body_bytes: int = 32 * 1024 * 1024
    max_connections: int = 1000
    max_sessions: int = 1000
    max_sessions_per_client: int = 100
    max_requests_per_session: int = 64
    session_idle_seconds: float = 600.0
    header_timeout_seconds: float = 10.0
    keep_alive_seconds: float = 15.0  # past the 5 s after which httpx clients (the SDK's) drop an idle connection

    @property
    def authenticated(self) -> bool:
        return bool(self.auth_token or self.auth_tokens_file or self.auth_jwks_url)

    def backoff(self, attempt: int, initial: float, rng: Callable[[], float]) -> float:
        """backoff_delay with these settings' growth and cap: between retries, and between restarts."""
        return backoff_delay(attempt, initial=initial, multiplier=self.retry_backoff, cap=self.max_backoff, rng=rng)


Kind: TypeAlias = type | tuple[str, ...] | Callable[[], tuple[str, ...]]
"""What a setting or key holds: a type, a choice of words, or a function naming the choices (read when checked)."""


@dataclass(frozen=True, slots=True)
class Setting:
    """One router setting: where it is read from, and what it means."""

    field: str
    yaml_path: str
    env: str
    flag: str | None
    kind: Kind
    help: str


# fmt: off
SETTINGS: Final = (
    Setting("server_name", "server.name", "MCP_SERVER_NAME", "--name", str, "name the router reports to clients"),
    Setting("transport", "server.transport", "MCP_TRANSPORT", "--transport", ("stdio", "http", "sse"),
            "how clients reach the router (sse: the legacy HTTP+SSE transport, for older clients)"),
    Setting("host", "server.host", "MCP_HOST", "--host", str, "HTTP bind address"),
    Setting("port", "server.port", "MCP_PORT", "--port", int, "HTTP port"),
    Setting("json_response", "server.json_response", "MCP_JSON_RESPONSE", "--json-response", bool,
            "answer every HTTP request with one JSON body, never a stream: no progress or sampling mid-call"),
    Setting("log_level", "server.log_level", "MCP_LOG_LEVEL", "--log-level", LOG_LEVELS, "stderr log level"),
    Setting("event_loop", "server.event_loop", "MCP_EVENT_LOOP", None, EVENT_LOOPS,
            "asyncio, uvloop, or auto: uvloop when it is installed"),
    Setting("default_strategy", "routing.default_strategy", "MCP_DEFAULT_STRATEGY", None, strategy_names,
            "routing strategy of a route that names none"),
    Setting("enable_namespaces", "routing.enable_namespace_prefixing", "MCP_ENABLE_NAMESPACES", "--namespaces", bool,
            "prefix tool and prompt names with the backend namespace"),
    Setting("cache_ttl", "routing.capability_cache_ttl_seconds", "MCP_CACHE_TTL", None, float,
            "seconds a backend's listing is trusted before it is listed again (0: only on list_changed)"),
    Setting("request_timeout", "routing.request_timeout_seconds", "MCP_REQUEST_TIMEOUT", "--request-timeout", float,
            "seconds a forwarded request may take, retries included"),
    Setting("max_retries", "routing.retry.max_attempts", "MCP_MAX_RETRIES", None, int,
            "attempts for a request that is safe to retry, the first one included"),
    Setting("retry_backoff", "routing.retry.backoff_multiplier", "MCP_RETRY_BACKOFF", None, float,
            "growth factor between retry delays and between restart delays"),
    Setting("max_backoff", "routing.retry.max_backoff_seconds", "MCP_MAX_BACKOFF", None, float,
            "longest delay between retries and between restarts"),
    Setting("health_check_interval", "health_check.interval_seconds", "MCP_HEALTH_CHECK_INTERVAL", None, float,
            "default seconds between a backend's health checks"),
    Setting("health_check_timeout", "health_check.timeout_seconds", "MCP_HEALTH_CHECK_TIMEOUT", None, float,
            "default seconds a health check may take"),
    Setting("backend_eras", "routing.backend_eras", "MCP_BACKEND_ERAS", None, BACKEND_ERAS,
            "protocol era spoken to backends without their own `era`: auto (2026-07-28 with those that serve it, "
            "found by server/discover, else the handshake) or handshake (the handshake era with every backend)"),
    # the HTTP service
    Setting("allow_unauthenticated", "server.allow_unauthenticated", "MCP_ALLOW_UNAUTHENTICATED", "--allow-unauthenticated", bool,
            "serve a non-loopback address without authentication (logs a warning)"),
    Setting("auth_token", "server.auth.token", "MCP_AUTH_TOKEN", None, str, "a bearer token clients must present"),
    Setting("auth_tokens_file", "server.auth.tokens_file", "MCP_AUTH_TOKENS_FILE", "--auth-tokens-file", str,
            "file of accepted bearer tokens, one a line, re-read when it changes"),
    Setting("auth_issuer", "server.auth.issuer", "MCP_AUTH_ISSUER", "--auth-issuer", str,
            "OAuth authorization server whose JWT access tokens are accepted (the tokens' iss)"),
    Setting("auth_jwks_url", "server.auth.jwks_url", "MCP_AUTH_JWKS_URL", "--auth-jwks-url", str, "the issuer's JWKS URL"),
    Setting("auth_resource_url", "server.auth.resource_url", "MCP_AUTH_RESOURCE_URL", "--auth-resource-url", str,
            "this router's public URL, e.g. https://mcp.example.com/mcp: the JWT audience and the metadata's resource"),
    Setting("allowed_hosts", "server.allowed_hosts", "MCP_ALLOWED_HOSTS", "--allowed-hosts", list,
            "Host headers accepted besides localhost and the bound address (host or host:port, host:* for any port)"),
    Setting("allowed_origins", "server.allowed_origins", "MCP_ALLOWED_ORIGINS", "--allowed-origins", list,
            "browser Origins accepted besides localhost's (scheme://host:port, :* for any port)"),
    Setting("cors_origins", "server.cors_origins", "MCP_CORS_ORIGINS", None, list, "Origins given CORS headers (none: CORS off)"),
    Setting("stateless", "server.stateless", "MCP_STATELESS", "--stateless", bool,
            "streamable HTTP without sessions, JSON answers: any request may land on any replica"),
    Setting("min_ready", "server.min_ready", "MCP_MIN_READY", None, int, "backends that must be up for /readyz to say ready"),
    Setting("drain_seconds", "server.drain_seconds", "MCP_DRAIN_SECONDS", None, float,
            "seconds in-flight calls get to finish after SIGTERM"),
    Setting("max_body_bytes", "server.limits.max_body_bytes", "MCP_MAX_BODY_BYTES", None, int, "largest request body (413 above)"),
    Setting("max_connections", "server.limits.max_connections", "MCP_MAX_CONNECTIONS", None, int,
            "open HTTP connections (503 above; kept below the file limit)"),
    Setting("max_sessions", "server.limits.max_sessions", "MCP_MAX_SESSIONS", None, int,
            "open sessions (at the cap the longest idle is ended; 503 if none is idle)"),
    Setting("max_sessions_per_client", "server.limits.max_sessions_per_client", "MCP_MAX_SESSIONS_PER_CLIENT", None, int,
            "open sessions of one client, by token or else address (at the cap its longest idle is ended; 429 if none is)"),
    Setting("max_requests_per_session", "server.limits.max_requests_per_session", "MCP_MAX_REQUESTS_PER_SESSION", None, int,
            "requests one session may have in flight (429 above)"),
    Setting("session_idle_seconds", "server.limits.session_idle_seconds", "MCP_SESSION_IDLE_SECONDS", None, float,
            "seconds an idle session lives"),
    Setting("header_timeout_seconds", "server.limits.header_timeout_seconds", "MCP_HEADER_TIMEOUT_SECONDS", None, float,
            "seconds a new connection has to send its request headers"),
    Setting("keep_alive_seconds", "server.limits.keep_alive_seconds", "MCP_KEEP_ALIVE_SECONDS", None, float,
            "seconds an idle keep-alive connection stays open (longer than clients keep one: a connection closed "
            "just as a client reuses it fails that request)"),
)
# fmt: on

MIN_SECRET_LENGTH: Final = 6
"""Shorter secret values are not redacted from output: `***` in place of every `true` or `8080` would say nothing."""
_POSITIVE: Final = {
    "request_timeout", "health_check_interval", "health_check_timeout", "retry_backoff", "max_backoff",
    "max_body_bytes", "max_connections", "max_sessions", "max_sessions_per_client", "max_requests_per_session",
    "session_idle_seconds", "header_timeout_seconds", "keep_alive_seconds",
}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    settings: Settings = Settings()
    backends: tuple[BackendConfig, ...] = ()
    source: str | None = None
    expanded: tuple[str, ...] = field(default=(), repr=False)
    """Every value a `${VAR}` reference took from the environment, anywhere in the file."""

    def secrets(self) -> list[str]:
        """What the router must never say, in any backend's words: every backend's secrets, and all that was expanded."""
        found = {s for b in self.backends for s in b.secrets()} | {
            s for s in self.expanded if len(s) >= MIN_SECRET_LENGTH
        }
        return sorted(found, key=len, reverse=True)


class _Problems:
    """Collects config problems so they can be reported together; never with a value that came from `${VAR}`."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: list[str] = []
        self.expanded: list[tuple[str, str]] = []
        """(path, value) of each value a `${VAR}` took from the environment."""

    def add(self, path: str, message: str) -> None:
        here = [value for where, value in self.expanded if _within(where, path)]  # any length: the message is about it
        message = redact(message, sorted({*here, *self.expanded_secrets()}, key=len, reverse=True))
        self.items.append(": ".join(part for part in (self.source, path, message) if part))

    def elsewhere(self) -> _Problems:
        """Problems of the same report that are not in the file (flags, environment variables): no file name."""
        other = _Problems("")
        other.items, other.expanded = self.items, self.expanded
        return other

    def expanded_under(self, path: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value for where, value in self.expanded if _within(where, path)))

    def expanded_secrets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(value for _, value in self.expanded if len(value) >= MIN_SECRET_LENGTH))

    def unknown_keys(self, mapping: Mapping[str, Any], known: Iterable[str], path: str) -> None:
        known = list(known)
        for key in mapping:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(known)})"
                self.add(_join(path, str(key)), f"unknown key{hint}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _within(path: str, ancestor: str) -> bool:
    """Whether `path` is `ancestor` or lies inside it (`backends[0].env.T` inside `backends[0]`)."""
    return not ancestor or path == ancestor or path.startswith((ancestor + ".", ancestor + "["))


_ENV_REF: Final = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand(value: Any, env: Mapping[str, str], path: str, problems: _Problems) -> Any:
    """Expand ${VAR} and ${VAR:-default} in every string of a YAML tree."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                if env[name]:
                    problems.expanded.append((path, env[name]))
                return env[name]
            if default is not None:
                return default
            problems.add(
                path, f"environment variable {name} is not set and has no default (write ${{{name}:-default}})"
            )
            return ""

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, env, _join(path, str(k)), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, _join(path, i), problems) for i, v in enumerate(value)]
    return value


def _same_origin(url: str, other: str) -> bool:
    a, b = urlsplit(url), urlsplit(other)
    try:
        return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)
    except ValueError:  # a port that is not a number
        return False


def _describe(value: Any) -> str:
    text = re.sub(r"//[^/@\s]+@", "//***@", repr(value))  # never echo URL credentials
    return text if len(text) <= 60 else text[:57] + "..."


def _check(value: Any, kind: Kind, path: str, problems: _Problems) -> Any:
    """Return `value` as `kind`, or None after recording what was expected."""
    if callable(kind) and not isinstance(kind, type):
        kind = kind()
    if isinstance(value, str) and kind in (int, float, bool):
        value = _from_text(value, kind)  # "${PORT:-8001}" expands to text
    if isinstance(kind, tuple):
        if isinstance(value, str) and value in kind:
            return value
        if isinstance(value, str) and value.upper() in kind:
            return value.upper()
        problems.add(path, f"expected one of {', '.join(kind)}, got {_describe(value)}")
    elif kind is bool:
        if isinstance(value, bool):
            return value
        problems.add(path, f"expected true or false, got {_describe(value)}")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        problems.add(path, f"expected a whole number >= 0, got {_describe(value)}")
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return float(value)
        problems.add(path, f"expected a number >= 0, got {_describe(value)}")
    elif kind is str:
        if isinstance(value, str) and value:
            return value
        problems.add(path, f"expected a non-empty string, got {_describe(value)}")
    elif kind is list:
        if isinstance(value, list | tuple) and all(isinstance(v, str) and v for v in value):
            return tuple(value)
        problems.add(path, f"expected a list of non-empty strings, got {_describe(value)}")
    return None


def _from_text(text: str, kind: Kind) -> Any:
    """Turn an env var or CLI string into the setting's kind (validated afterwards by `_check`)."""
    if kind is bool:
        lowered = text.strip().lower()
        return {
            "true": True,
            "1": True,
            "yes": True,
            "on": True,
            "false": False,
            "0": False,
            "no": False,
            "off": False,
        }.get(lowered, text)
    if kind is list:  # comma-separated in the environment and on the command line
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind in (int, float):
        try:
            return int(text) if kind is int else float(text)
        except ValueError:
            return text
    return text


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _parse_settings(
    raw: Mapping[str, Any], env: Mapping[str, str], overrides: Mapping[str, Any], problems: _Problems
) -> Settings:
    """Precedence: CLI > environment > YAML > default."""
    values: dict[str, Any] = {}
    in_file = problems
    for s in SETTINGS:
        problems = in_file
        if s.field in overrides and overrides[s.field] is not None:
            where, value, problems = s.flag or s.field, overrides[s.field], in_file.elsewhere()
        elif s.env in env:
            where, value, problems = s.env, _from_text(env[s.env], s.kind), in_file.elsewhere()
        elif (yaml_value := _lookup(raw, s.yaml_path)) is not None:
            where, value = s.yaml_path, yaml_value
        else:
            continue
        checked = _check(value, s.kind, where, problems)
        if checked is None:
            continue
        if s.field in _POSITIVE and checked <= 0:
            problems.add(where, f"expected a number > 0, got {_describe(value)}")
            continue
        if s.field == "max_retries" and checked < 1:
            problems.add(where, "expected at least 1 attempt")
            continue
        if s.field == "port" and not 0 < checked < 65536:
            problems.add(where, f"expected a TCP port 1-65535, got {checked}")
            continue
        values[s.field] = checked
    return Settings(**values)


_TOP_KEYS: Final = ("backends", "mcpServers", "routing", "server", "health_check")
_BACKEND_KEYS: Final = (
    "name", "url", "command", "args", "env", "cwd", "transport", "headers", "forward_headers", "namespace", "priority",
    "routes", "health_check", "circuit_breaker", "timeout", "enabled", "disabled", "include", "exclude", "era",
)  # fmt: skip
HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (RFC 9110's token)."""
UNFORWARDABLE_HEADERS: Final = {
    **dict.fromkeys(("authorization", "proxy-authorization", "cookie"),
                    "is the client's credential, which never reaches a backend (give the backend its own in headers)"),
    **dict.fromkeys(("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
                     "host", "content-length", "content-type", "accept", "expect"),
                    "belongs to one HTTP hop, which the router makes itself"),
    **dict.fromkeys(("mcp-session-id", "mcp-protocol-version", "mcp-method", "mcp-name", "last-event-id"),
                    "belongs to the router's own MCP session with the backend"),
}  # fmt: skip
"""Client headers a backend may not name in forward_headers, and why."""
_MCP_SERVERS_EXTRA_KEYS: Final = ("type",)
"""Keys of the Claude Desktop / Claude Code / Cursor `mcpServers` format beside ours."""


def _check_sections(raw: Mapping[str, Any], problems: _Problems) -> None:
    """Unknown keys and non-mappings in the settings sections, whose keys the SETTINGS table knows."""
    problems.unknown_keys(raw, _TOP_KEYS, "")
    for section in ("server", "server.auth", "server.limits", "routing", "routing.retry", "health_check"):
        block = _lookup(raw, section)
        if block is None:
            continue
        if not isinstance(block, dict):
            problems.add(section, f"expected a mapping, got {_describe(block)}")
            continue
        depth = section.count(".") + 1
        known = [s.yaml_path.split(".")[depth] for s in SETTINGS if s.yaml_path.startswith(section + ".")]
        problems.unknown_keys(block, dict.fromkeys(known), section)


def _str_list(value: Any, path: str, problems: _Problems) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in value):
        return tuple(str(v) for v in value)
    problems.add(path, f"expected a list of strings, got {_describe(value)}")
    return ()


def _str_map(value: Any, path: str, problems: _Problems) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(v, str | int | float | bool) for v in value.values()):
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
    problems.add(path, "expected a mapping of names to strings")
    return {}


def _block(value: Any, cls: type, kinds: Mapping[str, type], path: str, problems: _Problems) -> Any:
    """Build a small frozen config block (health_check, circuit_breaker) from a mapping."""
    if value is None:
        return cls()
    if not isinstance(value, dict):
        problems.add(path, f"expected a mapping, got {_describe(value)}")
        return cls()
    problems.unknown_keys(value, kinds, path)
    values = {}
    for key, kind in kinds.items():
        if key in value and value[key] is not None:
            checked = _check(value[key], kind, _join(path, key), problems)
            if checked is not None:
                values[key] = checked
    return cls(**values)


def _parse_backend(
    raw: Any, path: str, settings: Settings, problems: _Problems, *, foreign_keys: bool, names: Sequence[str] = ()
) -> BackendConfig | None:
    """One backend entry; `names` are all the backends' names, which `fallback_to` must be one of."""
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping with name and url or command, got {_describe(raw)}")
        return None
    if foreign_keys:
        ignored = [k for k in raw if k not in _BACKEND_KEYS and k not in _MCP_SERVERS_EXTRA_KEYS]
        if ignored:
            log.warning(
                "%s: %s: ignoring keys used by other MCP clients: %s",
                problems.source,
                path,
                ", ".join(map(str, ignored)),
            )
    else:
        problems.unknown_keys(raw, _BACKEND_KEYS, path)
    before = len(problems.items)
    name = _check(raw.get("name"), str, _join(path, "name"), problems)
    for key in ("name", "namespace"):  # what came from ${VAR} is a secret, and these two every client sees
        if problems.expanded_under(_join(path, key)):
            problems.add(_join(path, key), "cannot come from ${VAR}: it prefixes the backend's tools for every client")
    url, command = raw.get("url"), raw.get("command")
    declared = raw.get("transport", raw.get("type"))
    transport: Transport = "stdio" if command is not None else "http"
    if declared is not None:
        aliases = {"stdio": "stdio", "http": "http", "streamable-http": "http", "streamableHttp": "http", "sse": "sse"}
        if declared in aliases:
            transport = cast(Transport, aliases[declared])
        else:
            problems.add(_join(path, "transport"), f"expected stdio, http or sse, got {_describe(declared)}")
    if url is not None and command is not None:
        problems.add(path, "expected either url or command, not both")
    elif url is None and command is None:
        problems.add(path, "expected url (an http(s) URL) or command (a program to run)")
    elif url is not None:
        if not (isinstance(url, str) and re.match(r"^https?://[^/\s]+", url)):
            problems.add(_join(path, "url"), f"expected an http(s) URL, got {_describe(url)}")
        if transport == "stdio":
            problems.add(_join(path, "transport"), "expected http or sse for a url backend")
    else:
        _check(command, str, _join(path, "command"), problems)
        if transport != "stdio":
            problems.add(_join(path, "transport"), "expected stdio for a command backend")
    namespace = raw.get("namespace", re.sub(r"[^A-Za-z0-9_-]", "_", name or "")[:MAX_NAME_LENGTH])
    if namespace is not None and (not isinstance(namespace, str) or not NAME_PATTERN.match(namespace)):
        problems.add(_join(path, "namespace"), f"expected letters, digits, '_' or '-', got {_describe(namespace)}")
    priority = _check(raw.get("priority", 10), int, _join(path, "priority"), problems)
    timeout = raw.get("timeout")
    if timeout is not None and _check(timeout, float, _join(path, "timeout"), problems) == 0:
        problems.add(_join(path, "timeout"), "expected a number of seconds > 0")
    enabled = raw.get("enabled", not raw.get("disabled", False))
    _check(enabled, bool, _join(path, "enabled"), problems)
    routes: list[RouteConfig] = []
    raw_routes = raw.get("routes") or []
    if not isinstance(raw_routes, list):
        problems.add(_join(path, "routes"), "expected a list of {pattern, strategy, fallback_to}")
        raw_routes = []
    for i, r in enumerate(raw_routes):
        rpath = _join(_join(path, "routes"), i)
        if not isinstance(r, dict):
            problems.add(rpath, f"expected a mapping with pattern and strategy, got {_describe(r)}")
            continue
        problems.unknown_keys(r, ("pattern", "strategy", "fallback_to"), rpath)
        pattern = _check(r.get("pattern"), str, _join(rpath, "pattern"), problems)
        strategy = _check(
            r.get("strategy", settings.default_strategy), strategy_names, _join(rpath, "strategy"), problems
        )
        fallback_to = r.get("fallback_to")
        if (
            fallback_to is not None
            and _check(fallback_to, str, _join(rpath, "fallback_to"), problems)
            and fallback_to not in names
        ):
            close = difflib.get_close_matches(fallback_to, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.add(_join(rpath, "fallback_to"), f"names unknown backend {_describe(fallback_to)}{hint}")
        if pattern is not None and len(pattern) > MAX_PATTERN_LENGTH:
            problems.add(_join(rpath, "pattern"), f"expected a glob of at most {MAX_PATTERN_LENGTH} characters")
        if pattern and strategy:
            routes.append(RouteConfig(pattern=pattern, strategy=strategy, fallback_to=fallback_to))
    health = _block(
        raw.get("health_check"),
        HealthCheckConfig,
        {"enabled": bool, "interval_seconds": float, "timeout_seconds": float, "endpoint": str},
        _join(path, "health_check"),
        problems,
    )
    if health.interval_seconds <= 0 or health.timeout_seconds <= 0:
        problems.add(_join(path, "health_check"), "expected interval_seconds and timeout_seconds > 0")
    if health.endpoint and isinstance(url, str) and not _same_origin(url, urljoin(url, health.endpoint)):
        problems.add(
            _join(path, "health_check.endpoint"),
            f"expected a path on the backend's own server, which gets its headers, got {_describe(health.endpoint)}",
        )
    defaults = {}
    if not (isinstance(raw.get("health_check"), dict) and "interval_seconds" in raw["health_check"]):
        defaults["interval_seconds"] = settings.health_check_interval
    if not (isinstance(raw.get("health_check"), dict) and "timeout_seconds" in raw["health_check"]):
        defaults["timeout_seconds"] = settings.health_check_timeout
    health = dataclasses.replace(health, **defaults)
    breaker = _block(
        raw.get("circuit_breaker"),
        CircuitBreakerConfig,
        {"failure_threshold": int, "timeout_seconds": float, "half_open_attempts": int},
        _join(path, "circuit_breaker"),
        problems,
    )
    if breaker.failure_threshold < 1 or breaker.half_open_attempts < 1:
        problems.add(_join(path, "circuit_breaker"), "expected failure_threshold and half_open_attempts of at least 1")
    args = _str_list(raw.get("args"), _join(path, "args"), problems)
    env = _str_map(raw.get("env"), _join(path, "env"), problems)
    headers = _str_map(raw.get("headers"), _join(path, "headers"), problems)
    forward_headers = _forwarded_names(raw.get("forward_headers"), transport, headers, path, problems)
    include = _str_list(raw.get("include"), _join(path, "include"), problems)
    exclude = _str_list(raw.get("exclude"), _join(path, "exclude"), problems)
    cwd = raw.get("cwd")
    if cwd is not None:
        _check(cwd, str, _join(path, "cwd"), problems)
    era = raw.get("era")
    if era is not None:
        era = _check(era, BACKEND_ERAS, _join(path, "era"), problems)
    if len(problems.items) > before:
        return None
    return BackendConfig(
        name=name,
        transport=transport,
        namespace=namespace,
        url=url,
        command=command,
        args=args,
        env=env,
        cwd=cwd,
        headers=headers,
        forward_headers=forward_headers,
        priority=priority,
        routes=tuple(routes),
        health_check=health,
        circuit_breaker=breaker,
        timeout=float(timeout) if timeout is not None else None,
        enabled=enabled,
        include=include,
        exclude=exclude,
        expanded=problems.expanded_under(path),
        fallback_to_sse=url is not None and declared is None,
        era=era,
    )


def _forwarded_names(
    value: Any, transport: Transport, headers: Mapping[str, str], path: str, problems: _Problems
) -> tuple[str, ...]:
    """A backend's forward_headers, lower case: HTTP field names, none of them a credential, hop or session header."""
    where = _join(path, "forward_headers")
    names = _str_list(value, where, problems)
    if names and transport != "http":
        problems.add(where, f"only streamable HTTP backends (url) take client headers; {transport} has no place for "
                            "them: remove forward_headers")  # fmt: skip
        return ()
    own = {k.lower() for k in headers}
    for i, name in enumerate(names):
        lower = name.lower()
        if not HEADER_NAME.fullmatch(name):
            problems.add(_join(where, i), f"expected an HTTP header name, got {_describe(name)}")
        elif lower in UNFORWARDABLE_HEADERS:
            problems.add(_join(where, i), f"{name} {UNFORWARDABLE_HEADERS[lower]}: remove it")
        elif lower in own:
            problems.add(
                _join(where, i), f"{name} is also set in headers: keep the backend's own value or the client's"
            )
    return tuple(dict.fromkeys(n.lower() for n in names))


def _check_namespaces(backends: Sequence[BackendConfig], entries: Mapping[str, Any], problems: _Problems) -> None:
    """Backends share a namespace only as replicas by choice: each declares it. Names that merely clean to the
    same namespace (`a.b`, `a_b`) would otherwise pool two different servers."""
    paths = {entry.get("name"): path for path, entry in entries.items() if isinstance(entry, dict)}
    first: dict[str, BackendConfig] = {}
    for b in backends:
        other = first.setdefault(b.namespace, b)
        if other.name == b.name or all("namespace" in entries[paths[x.name]] for x in (b, other)):
            continue  # the same backend, a duplicate name (reported), or replicas by choice
        problems.add(
            _join(paths[b.name], "name"),
            f"backend {b.name!r} has the namespace {b.namespace!r} of {other.name!r} ({paths[other.name]}); "
            f"rename one, or give both `namespace: {b.namespace}` to make them replicas",
        )


# -- the configs people already have, recognised by their shape
# Claude Desktop, Claude Code (.mcp.json), Cursor and Windsurf keep their servers under `mcpServers`, VS Code
# (.vscode/mcp.json) under `servers`, Codex (config.toml) under `mcp_servers`. Such a file becomes one of ours:
# its other top-level keys are ignored with one warning, and an entry that runs this router is skipped.

FOREIGN_SERVER_KEYS: Final = {"mcpServers": "mcpServers", "servers": "VS Code", "mcp_servers": "Codex"}
_FOREIGN_ENTRY_KEYS: Final = {
    "serverUrl": "url",  # Windsurf
    "http_headers": "headers",  # Codex, and the rest of its keys below
    "enabled_tools": "include",
    "disabled_tools": "exclude",
    "tool_timeout_sec": "timeout",
}
_EDITOR_VARIABLE: Final = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
"""VS Code's and Cursor's `${env:NAME}`, which is our `${NAME}`."""
_INPUT_VARIABLE: Final = re.compile(r"\$\{input:[^}]*\}")
SELF_NAMES: Final = ("mcp_router.py", "mcp-router", "mcp-router.exe")


def runs_this_router(entry: Mapping[str, Any]) -> bool:
    """Whether a client's server entry starts mcp-router itself (directly, or through uv, uvx, pipx or python)."""
    words = [entry.get("command"), *(entry.get("args") or [])]
    return any(isinstance(word, str) and Path(word).name in SELF_NAMES for word in words)


def adopt_foreign_config(raw: Any, source: str) -> Any:
    """Another MCP client's config file in our shape; ours (with `backends`) and anything unrecognised unchanged."""
    if not isinstance(raw, dict) or "backends" in raw:
        return raw
    key = next((k for k in FOREIGN_SERVER_KEYS if k in raw), None)
    if key is None:
        return raw
    ignored = [str(k) for k in raw if k not in _TOP_KEYS and k != key and k != "inputs"]
    if ignored:
        log.warning("%s: ignoring top-level keys that are not about MCP servers: %s", source, ", ".join(ignored))
    if raw.get("inputs"):
        ids = [i.get("id") for i in raw["inputs"] if isinstance(i, dict)] if isinstance(raw["inputs"], list) else []
        log.warning(
            "%s: inputs (%s) are VS Code prompts, which the router cannot show: ${input:...} stays as written; "
            "use ${NAME} with an environment variable instead",
            source,
            ", ".join(map(str, ids)) or "?",
        )
    servers = raw[key]
    if isinstance(servers, dict):
        adopted = {}
        for name, entry in servers.items():
            if isinstance(entry, dict) and runs_this_router(entry):
                log.info("%s: %s.%s: skipped: it runs this router, which must not proxy itself", source, key, name)
                continue
            adopted[name] = _adopt_entry(entry, f"{key}.{name}", source) if isinstance(entry, dict) else entry
        servers = adopted
    return {k: v for k, v in raw.items() if k in _TOP_KEYS and k != "mcpServers"} | {"mcpServers": servers}


def _adopt_entry(entry: dict[str, Any], path: str, source: str) -> dict[str, Any]:
    """One server entry of another client in our keys: renamed keys, `${env:NAME}` as `${NAME}`."""
    adopted = {_FOREIGN_ENTRY_KEYS.get(k, k): v for k, v in entry.items()}
    if isinstance(token_variable := entry.get("bearer_token_env_var"), str):  # Codex
        adopted.pop("bearer_token_env_var")
        adopted["headers"] = {"Authorization": f"Bearer ${{{token_variable}}}", **(adopted.get("headers") or {})}

    def rewrite(value: Any) -> Any:
        if isinstance(value, str):
            if (found := _INPUT_VARIABLE.search(value)) is not None:
                log.warning("%s: %s: %s is a VS Code input, which the router cannot ask for", source, path, found[0])
            return _EDITOR_VARIABLE.sub(r"${\1}", value)
        if isinstance(value, list):
            return [rewrite(v) for v in value]
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items()}
        return value

    return cast(dict[str, Any], rewrite(adopted))


def _load_toml(text: str, source: str) -> Any:
    """A Codex config.toml (its MCP servers are [mcp_servers.NAME] tables)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{source}: invalid TOML: {err}"]) from None


def parse_config(
    raw: Any,
    env: Mapping[str, str],
    *,
    source: str = CONFIG_FILE_NAME,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate a parsed YAML/JSON document; raise ConfigError listing every problem."""
    problems = _Problems(source)
    if raw is None:
        raw = {}
    raw = adopt_foreign_config(raw, source)
    if not isinstance(raw, dict):
        problems.add("", f"expected a mapping with a 'backends' list or an 'mcpServers' mapping, got {_describe(raw)}")
        raise ConfigError(problems.items)
    raw = _expand(raw, env, "", problems)
    _check_sections(raw, problems)
    settings = _parse_settings(raw, env, overrides or {}, problems)
    entries: list[tuple[str, Any, bool]] = []
    if raw.get("backends") is not None:  # an empty list, like an empty file, means no backends (zero-config)
        listed = raw["backends"]
        if not isinstance(listed, list):
            problems.add("backends", f"expected a list of backends, got {_describe(listed)}")
        else:
            entries += [(f"backends[{i}]", b, False) for i, b in enumerate(listed)]
    if raw.get("mcpServers") is not None:
        servers = raw["mcpServers"]
        if not isinstance(servers, dict):
            problems.add("mcpServers", f"expected a mapping of server names to settings, got {_describe(servers)}")
        else:
            for name, body in servers.items():
                entry = {"name": name, **body} if isinstance(body, dict) else body
                entries.append((f"mcpServers.{name}", entry, True))
    seen: dict[str, str] = {}
    for path, entry, _ in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name in seen:
            problems.add(
                _join(path, "name"), f"duplicate backend name {name!r} (also at {seen[name]}); names must be unique"
            )
        elif isinstance(name, str):
            seen[name] = path
    backends = [
        b
        for path, entry, foreign in entries
        if (b := _parse_backend(entry, path, settings, problems, foreign_keys=foreign, names=list(seen))) is not None
    ]
    _check_namespaces(backends, {path: entry for path, entry, _ in entries}, problems)
    for cycle in fallback_cycles(r for rs in routes_of(backends).values() for r in rs):
        problems.add(
            "routes", f"fallback_to links form a cycle: {' -> '.join(cycle)} (a request would go round forever)"
        )
    if problems.items:
        raise ConfigError(problems.items)
    return Config(settings=settings, backends=tuple(backends), source=source, expanded=problems.expanded_secrets())


MAX_CONFIG_BYTES: Final = 10 * 1024 * 1024
MAX_CONFIG_DEPTH: Final = 100
"""Levels of nesting a config file may have; a real one has under ten."""
MAX_ALIAS_NODES: Final = 10_000
"""Values that YAML aliases (`*name`, `<<: *name`) may add to a config, so a small file cannot expand to gigabytes."""
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds: nesting depth and what aliases add; duplicate keys are collected,
    and values Python cannot build (a 5,000-digit integer, 2026-13-45) are YAML errors with a line."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.depth = 0
        self.composed = 0
        """Values composed so far, counting each alias as the values it stands for."""
        self.alias_nodes = 0
        self.anchored: dict[str, int] = {}
        """The size of each anchored value, known once it is complete."""
        self.duplicates: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            size = self.anchored.get(event.anchor or "")
            if size is None and event.anchor in self.anchors:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} is inside its own anchor", event.start_mark
                )
            self.alias_nodes += size or 0
            self.composed += size or 0
            if self.alias_nodes > MAX_ALIAS_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand to more than {MAX_ALIAS_NODES:,} values", event.start_mark
                )
            return cast(yaml.Node, super().compose_node(parent, index))
        if self.depth >= MAX_CONFIG_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_CONFIG_DEPTH} levels deep", event.start_mark
            )
        anchor, before = getattr(event, "anchor", None), self.composed
        self.depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        self.composed += 1
        if anchor is not None:
            self.anchored[anchor] = self.composed - before
        return cast(yaml.Node, node)

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                line = key.start_mark.line + 1
                if (seen := first.setdefault((key.tag, key.value), line)) != line:
                    self.duplicates.append(f"line {line}: duplicate key {_describe(key.value)} (first at line {seen})")
        return cast(yaml.MappingNode, node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as err:  # e.g. int() past sys.get_int_max_str_digits()
            reason = str(err).split(":")[0]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {reason}", node.start_mark
            ) from None


def _read_config(candidate: Path, source: str) -> Any:
    """The parsed document of a config file, bounded in size, nesting and alias expansion."""
    try:
        with candidate.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{source}: larger than {MAX_CONFIG_BYTES // 2**20} MB; a config file must be smaller"])
        text = data.decode("utf-8")
    except OSError as err:
        raise ConfigError([f"{source}: cannot read: {err.strerror or err}"]) from err
    except UnicodeDecodeError as err:
        raise ConfigError([f"{source}: not UTF-8 text: {err.reason}"]) from err
    if candidate.suffix == ".toml":
        return _load_toml(text, source)  # Codex's config.toml
    loader = _ConfigLoader(text)  # JSON is YAML, so .mcp.json files load too
    try:
        raw = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{source}: invalid YAML: {where}{problem}"]) from err
    except RecursionError as err:  # bounded above; kept so that no input can end in a traceback
        raise ConfigError([f"{source}: invalid YAML: nested too deep"]) from err
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([f"{source}: {duplicate}" for duplicate in loader.duplicates])
    return raw


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str], overrides: Mapping[str, Any] | None = None
) -> Config:
    """Find, read and parse the config file: --config, else MCP_BACKENDS_CONFIG, else ./backends.yaml.

    With no file anywhere the router runs with no backends (zero-config).
    """
    explicit = path or env.get("MCP_BACKENDS_CONFIG")
    candidate = Path(explicit) if explicit else Path(CONFIG_FILE_NAME)
    if not explicit and not candidate.exists():
        return parse_config({}, env, source=NO_CONFIG, overrides=overrides)
    source = str(candidate)
    raw = _read_config(candidate, source)
    return parse_config(raw, env, source=source, overrides=overrides)


def no_backends_hint(source: str | None) -> str:
    """What to say when there are no backends: where to add them."""
    where = source if source not in (None, NO_CONFIG) else f"{CONFIG_FILE_NAME} or pass --config"
    return f"no backends configured; add some to {where} (see backends.example.yaml)"


# ---------------------------------------------------------------------------- pure core
# Rules for this section: no await, no I/O, no SDK; time and chance are passed in. Everything here is
# deterministic given its arguments, so tests drive it with fake clocks and rngs.


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def expose_name(namespace: str | None, name: str, taken: Container[str] = frozenset()) -> str:
    """The client-facing name for a backend's tool or prompt: `namespace__name`.

    Clients reject names outside ^[A-Za-z0-9_-]{1,64}$, so illegal characters
    become '_' and a name that is too long, was changed, or collides with one
    already taken gets a short hash of the full original, which keeps it unique
    and deterministic. The mapping back is kept in the catalogue, never re-parsed.
    """
    full = f"{namespace}{SEPARATOR}{name}" if namespace else name
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", full)
    if clean == full and len(clean) <= MAX_NAME_LENGTH and clean not in taken:
        return clean
    suffix = "_" + _short_hash(full)
    candidate = clean[: MAX_NAME_LENGTH - len(suffix)] + suffix
    salt = 0
    while candidate in taken:  # a hash collision: vanishingly rare, still handled
        salt += 1
        suffix = "_" + _short_hash(f"{full}#{salt}")
        candidate = clean[: MAX_NAME_LENGTH - len(suffix)] + suffix
    return candidate


def strip_reserved_meta(item: dict[str, Any]) -> dict[str, Any]:
    """Drop protocol-reserved `_meta` keys a backend set; they belong to the router's own hop."""
    meta = item.get("_meta")
    if meta and any(k.startswith(RESERVED_META_PREFIX) for k in meta):
        kept = {k: v for k, v in meta.items() if not k.startswith(RESERVED_META_PREFIX)}
        item = {**item, "_meta": kept} if kept else {k: v for k, v in item.items() if k != "_meta"}
    return item


def most_verbose(*levels: str | None) -> str | None:
    """The most verbose of the MCP log levels given (None: none asked for), or None if none is."""
    return min((lv for lv in levels if lv in LOG_SEVERITY), key=LOG_SEVERITY.__getitem__, default=None)


def admits(asked: str | None, level: object) -> bool:
    """Does a client that asked for `asked` (None: for no log messages) take a message of `level` (an unknown
    level counts as debug)?"""
    severity = LOG_SEVERITY.get(level, 0) if isinstance(level, str) else 0
    return asked is not None and severity >= LOG_SEVERITY.get(asked, 0)


@dataclass(frozen=True, slots=True)
class Listing:
    """What one backend offers, as the raw wire dicts it sent (after include/exclude)."""

    tools: tuple[dict[str, Any], ...] = ()
    resources: tuple[dict[str, Any], ...] = ()
    templates: tuple[dict[str, Any], ...] = ()
    prompts: tuple[dict[str, Any], ...] = ()
    instructions: str | None = None
    cache_hints: tuple[tuple[str, int, str], ...] = ()
    """(list method, ttlMs, cacheScope) for each list the backend sent hints for (2026-era backends do)."""


@dataclass(frozen=True, slots=True)
class Member:
    """A backend as the catalogue sees it."""

    name: str
    namespace: str
    priority: int
    listing: Listing
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True, slots=True)
class Entry:
    """Where an exposed name goes: the pool of backends that offer it (replicas sharing a namespace), its original
    name, and how requests for it are routed."""

    exposed: str
    original: str
    pool: tuple[str, ...]
    retry_safe: bool = False
    plan: Plan | None = None


@dataclass(frozen=True, slots=True)
class Catalogue:
    tools: Mapping[str, Entry] = field(default_factory=dict)
    prompts: Mapping[str, Entry] = field(default_factory=dict)
    resources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    templates: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Each resource template's text and the backends that list it."""
    tool_items: tuple[dict[str, Any], ...] = ()
    prompt_items: tuple[dict[str, Any], ...] = ()
    resource_items: tuple[dict[str, Any], ...] = ()
    template_items: tuple[dict[str, Any], ...] = ()
    conflicts: tuple[str, ...] = ()
    instructions: str | None = None


def _is_retry_safe(tool: Mapping[str, Any]) -> bool:
    annotations = tool.get("annotations") or {}
    return bool(annotations.get("readOnlyHint") or annotations.get("idempotentHint"))


def _expose_items(
    members: Sequence[Member],
    items_of: Callable[[Listing], Sequence[dict[str, Any]]],
    namespaced: bool,
    reserved: Mapping[str, object],
    kind: str,
    conflicts: list[str],
) -> tuple[dict[str, Entry], list[dict[str, Any]]]:
    entries: dict[str, Entry] = {}
    items: dict[str, dict[str, Any]] = {}
    by_key: dict[tuple[str | None, str], str] = {}
    owner: dict[str, Member] = {}
    for m in members:
        for item in items_of(m.listing):
            original = item.get("name")
            if not isinstance(original, str):
                continue
            key = (m.namespace if namespaced else None, original)
            if key in by_key:
                exposed = by_key[key]
                entry = entries[exposed]
                if owner[exposed].namespace == m.namespace:  # a replica: one pool
                    entries[exposed] = dataclasses.replace(entry, pool=(*entry.pool, m.name))
                    continue
                # Namespaces off: another backend's tool of the same name. One owner, the other never reached
                # through this name: by priority, unless the other's path route claims the name.
                if not (_path_claims(m, original) and not _path_claims(owner[exposed], original)):
                    conflicts.append(
                        f"{kind} {original!r} of {m.name} is hidden by {entry.pool[0]}'s (higher priority)"
                    )
                    continue
                conflicts.append(f"{kind} {original!r} of {entry.pool[0]} is hidden by {m.name}'s (its path route)")
            else:
                exposed = by_key[key] = expose_name(
                    key[0], original, ChainMap(cast("dict[str, object]", entries), dict(reserved))
                )
            owner[exposed] = m
            entries[exposed] = Entry(exposed, original, (m.name,), retry_safe=kind == "tool" and _is_retry_safe(item))
            items[exposed] = strip_reserved_meta({**item, "name": exposed})
    return entries, list(items.values())


def _path_claims(m: Member, name: str) -> bool:
    """Does a `path` route of this backend claim `name`?"""
    route = best_route(name, m.routes)
    return route is not None and route.strategy == "path"


def build_catalogue(
    members: Sequence[Member],
    *,
    namespaced: bool = True,
    reserved: Iterable[str] = MANAGEMENT_TOOLS,
    default_strategy: str = "capability",
) -> Catalogue:
    """Merge backends' listings into the names the client sees, each with its routing plan.

    Members come in priority order (lower number first); a name offered by
    several backends of one namespace becomes one entry whose pool lists them
    in that order.
    """
    members = sorted(members, key=lambda m: m.priority)
    conflicts: list[str] = []
    routes = {m.name: m.routes for m in members}
    priority = {m.name: m.priority for m in members}

    def planned(entries: dict[str, Entry]) -> dict[str, Entry]:
        return {
            exposed: dataclasses.replace(e, plan=plan_route(e.original, e.pool, routes, priority, default_strategy))
            for exposed, e in entries.items()
        }

    tools, tool_items = _expose_items(
        members, lambda lst: lst.tools, namespaced, dict.fromkeys(reserved), "tool", conflicts
    )
    prompts, prompt_items = _expose_items(members, lambda lst: lst.prompts, namespaced, {}, "prompt", conflicts)
    tools, prompts = planned(tools), planned(prompts)
    offered = {  # a backend not listed yet offers nothing so far: it is not counted
        (kind, m.name): frozenset(i.get("name") for i in getattr(m.listing, f"{kind}s"))
        for m in members
        if m.listing != Listing()
        for kind in ("tool", "prompt")
    }
    missing: dict[tuple[str, str], list[str]] = {}
    for kind, entries in (("tool", tools), ("prompt", prompts)):
        for e in entries.values():
            assert e.plan is not None
            for b in e.plan.candidates:
                if b not in e.pool and (kind, b) in offered and e.original not in offered[(kind, b)]:
                    missing.setdefault((kind, b), []).append(e.original)
    for (kind, b), names in missing.items():
        shown = ", ".join(map(repr, names[:3])) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        conflicts.append(f"fallback backend {b} does not offer {len(names)} {kind}(s) routed to it: {shown}")
    resources: dict[str, tuple[str, ...]] = {}
    resource_items: list[dict[str, Any]] = []
    templates: list[tuple[str, tuple[str, ...]]] = []
    template_items: list[dict[str, Any]] = []
    template_index: dict[str, int] = {}
    namespace = {m.name: m.namespace for m in members}

    def pooled(owners: tuple[str, ...], m: Member, what: str) -> tuple[str, ...]:
        """A replica joins the owners' pool; an unrelated backend listing the same URI is hidden, never reached."""
        if namespace[owners[0]] == m.namespace:
            return (*owners, m.name)
        conflicts.append(f"{what} of {m.name} is hidden by {owners[0]}'s (higher priority)")
        return owners

    for m in members:
        for res in m.listing.resources:
            uri = res.get("uri")
            if not isinstance(uri, str):
                continue
            if uri in resources:
                resources[uri] = pooled(resources[uri], m, f"resource {uri!r}")
                continue
            resources[uri] = (m.name,)
            resource_items.append(strip_reserved_meta(res))
        for tpl in m.listing.templates:
            text = tpl.get("uriTemplate")
            if not isinstance(text, str):
                continue
            if text in template_index:
                i = template_index[text]
                templates[i] = (text, pooled(templates[i][1], m, f"resource template {text!r}"))
                continue
            template_index[text] = len(templates)
            templates.append((text, (m.name,)))
            template_items.append(strip_reserved_meta(tpl))
    instructions = "\n\n".join(
        f"## {m.namespace if namespaced else m.name}\n{m.listing.instructions.strip()}"
        for m in members
        if m.listing.instructions
    )
    return Catalogue(
        tools=tools,
        prompts=prompts,
        resources=resources,
        templates=tuple(templates),
        tool_items=tuple(tool_items),
        prompt_items=tuple(prompt_items),
        resource_items=tuple(resource_items),
        template_items=tuple(template_items),
        conflicts=tuple(dict.fromkeys(conflicts)),
        instructions=instructions or None,
    )


def list_cache_hint(method: str, listings: Iterable[Listing], refresh_seconds: float) -> dict[str, Any]:
    """The cache hints of the router's `method` list: no longer than any contributing backend allows, nor than
    the router's own re-listing interval (0: none, as it then relies on change notifications); private if any
    backend says so.

    The router's lists are the same for every caller, so they are public unless a backend's is private.
    """
    hints = [(ttl, scope) for listing in listings for m, ttl, scope in listing.cache_hints if m == method]
    ttls = [ttl for ttl, _ in hints] + ([round(refresh_seconds * 1000)] if refresh_seconds > 0 else [])
    scope = "private" if any(scope == "private" for _, scope in hints) else "public"
    return {"ttlMs": max(0, min(ttls)) if ttls else 0, "cacheScope": scope}


def refresh_interval(listing: Listing, refresh_seconds: float) -> float | None:
    """Seconds between re-listings of a backend: the router's interval, or sooner where the backend's hints say
    its lists go stale sooner; None: only on change notifications. Hints under a second count as a second."""
    seconds = [max(1.0, ttl / 1000) for _, ttl, _ in listing.cache_hints if ttl > 0]
    seconds += [refresh_seconds] if refresh_seconds > 0 else []
    return min(seconds) if seconds else None


def page(items: Sequence[dict[str, Any]], cursor: str | None, key: str, size: int = PAGE_SIZE) -> dict[str, Any]:
    """One page of a list result; the cursor is the offset, opaque to clients."""
    start = 0
    if cursor is not None:
        if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 9 or int(cursor) > len(items):
            raise InvalidCursor(f"Invalid cursor: {cursor[:40]!r}")
        start = int(cursor)
    end = start + size
    result: dict[str, Any] = {key: list(items[start:end])}
    if end < len(items):
        result["nextCursor"] = str(end)
    return result


class EncodedItems(list[Any]):
    """A page's items, kept until the catalogue changes; a line writer encodes them once for every listing."""

    __slots__ = ("encoded",)

    def __init__(self, items: Iterable[Any]) -> None:
        super().__init__(items)
        self.encoded: bytes | None = None


def filter_tools(
    tools: Iterable[dict[str, Any]], include: Sequence[str], exclude: Sequence[str]
) -> tuple[dict[str, Any], ...]:
    """Keep tools whose name matches an include glob (all, when none are given) and no exclude glob."""

    def wanted(name: str) -> bool:
        if include and not any(fnmatchcase(name, g) for g in include):
            return False
        return not any(fnmatchcase(name, g) for g in exclude)

    return tuple(t for t in tools if isinstance(t.get("name"), str) and wanted(t["name"]))


def backoff_delay(
    attempt: int,
    *,
    initial: float,
    multiplier: float,
    cap: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `attempt` (1-based): initial * multiplier**(attempt-1), capped, with jitter.

    Any attempt number is fine: past the cap the power is never computed (it overflows a float near attempt 1,025).
    """
    growth = max(0, attempt - 1)
    if multiplier > 1 and initial > 0 and growth * math.log(multiplier) >= math.log(max(cap, initial) / initial):
        base = cap
    else:
        base = min(cap, initial * multiplier**growth)
    return base * (1.0 - JITTER * rng())


BreakerState: TypeAlias = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class CircuitBreaker:
    """Per-backend circuit breaker; state is derived from the clock on read.

    closed: requests flow; `failure_threshold` consecutive failures open it.
    open: requests are rejected at once until `reset_timeout` has passed.
    half_open: up to `half_open_attempts` trial requests are admitted one at a
    time; when that many have succeeded it closes, and any failure re-opens it.
    `record_*` return the transition ("open", "closed", ...) or None, so the
    caller logs once per transition, never per request.
    """

    name: str
    failure_threshold: int = 5
    reset_timeout: float = 60.0
    half_open_attempts: int = 1
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    last_error: str | None = None
    opened_at: float | None = None
    trial_in_flight: bool = False
    trial_successes: int = 0

    @property
    def state(self) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        if self.clock() - self.opened_at >= self.reset_timeout:
            return "half_open"
        return "open"

    @property
    def retry_at(self) -> float | None:
        """Clock time when an open breaker will admit a trial request."""
        return None if self.opened_at is None else self.opened_at + self.reset_timeout

    def admits(self, state: BreakerState | None = None) -> bool:
        """Would a request go through now? Changes nothing (routing decisions read it); `state`, if read already."""
        state = state or self.state
        return state == "closed" or (state == "half_open" and not self.trial_in_flight)

    def allow(self) -> bool:
        """May a request go through now? In half-open, admits one trial at a time."""
        if not self.admits():
            return False
        if self.state == "half_open":
            self.trial_in_flight = True
        return True

    def release(self) -> None:
        """A request it admitted ended with no verdict on the backend (never sent, cancelled): free the trial slot."""
        self.trial_in_flight = False

    def reconnected(self) -> BreakerState | None:
        """The backend's connection was re-established (handshake and listing done): an open breaker half-opens,
        so the next call is the trial, instead of every call being refused until the reset timeout."""
        if self.state != "open":
            return None
        assert self.opened_at is not None
        self.opened_at = self.clock() - self.reset_timeout
        self.trial_in_flight = False
        return "half_open"

    def record_success(self) -> BreakerState | None:
        if self.opened_at is None:
            self.failures = 0
            return None
        if self.state == "open":
            return None  # a straggler answering late proves nothing; wait for the trial
        self.failures = 0
        self.trial_in_flight = False
        self.trial_successes += 1
        if self.trial_successes < self.half_open_attempts:
            return None
        self.opened_at = None
        self.trial_successes = 0
        return "closed"

    def record_failure(self, error: str) -> BreakerState | None:
        state = self.state
        self.failures += 1
        self.last_error = error
        self.trial_in_flight = False
        self.trial_successes = 0
        if state == "half_open" or (state == "closed" and self.failures >= self.failure_threshold):
            self.opened_at = self.clock()
            return "open"
        return None  # still closed, or a straggler failing while already open

    def open_error(self) -> str:
        wait = max(0.0, (self.retry_at or 0.0) - self.clock())
        return (
            f"backend {self.name!r} is unavailable: circuit open after {self.failures} consecutive failures "
            f"(last error: {self.last_error}); retrying in {wait:.1f}s"
        )


# -- time


@dataclass(frozen=True, slots=True)
class Clock:
    """Where the router's time and chance come from, handed to every backend (sched.scheduler's timefunc and delayfunc).

    Restart backoff, health checks, list refresh, latency timing and jitter all read it,
    so tests move a fake clock instead of sleeping.
    """

    now: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random.random


# -- the backend lifecycle

LifecycleState: TypeAlias = Literal["starting", "ready", "reconnecting", "failing", "stopped", "disabled"]
LifecycleEvent: TypeAlias = Literal["connected", "failed", "lost", "restart", "stop"]
LIFECYCLE: Final[Mapping[tuple[str, str], LifecycleState]] = {
    ("starting", "connected"): "ready",
    ("starting", "failed"): "failing",
    ("starting", "restart"): "starting",
    ("ready", "lost"): "reconnecting",
    ("ready", "restart"): "reconnecting",
    ("reconnecting", "connected"): "ready",
    ("reconnecting", "failed"): "failing",
    ("reconnecting", "restart"): "reconnecting",
    ("failing", "connected"): "ready",
    ("failing", "failed"): "failing",
    ("failing", "restart"): "reconnecting",
    **{(state, "stop"): "stopped" for state in ("starting", "ready", "reconnecting", "failing", "disabled", "stopped")},
}
"""Every legal move of a backend's lifecycle: (state, event) -> next state. Anything else is a router bug."""
CALLS_WAIT: Final = frozenset({"starting", "reconnecting"})
"""States of a backend on its way (back): calls wait for it within their deadline. Calls to a failing backend fail at once
with its reason (it crash-loops: waiting would cost every caller its whole timeout), and so do calls to a stopped one."""


class IllegalTransition(RouterError):
    """A lifecycle event that has no move from the backend's state."""


def next_state(state: LifecycleState, event: LifecycleEvent) -> LifecycleState:
    try:
        return LIFECYCLE[(state, event)]
    except KeyError:
        raise IllegalTransition(f"backend lifecycle: no transition on {event!r} from {state!r}") from None


# -- routing
# The shell takes a snapshot of each candidate backend and asks a strategy; the strategy returns a decision.
# No live objects, no breaker changes, no exceptions as state: the shell acts on the decision.


@dataclass(frozen=True, slots=True)
class Route:
    """One `routes` entry of a backend's config: names matching `pattern` go to `backend` under `strategy`."""

    backend: str
    pattern: str
    strategy: str
    fallback_to: str | None = None
    order: int = 0
    """Position in the config, which breaks ties between equally specific patterns."""

    def specificity(self) -> tuple[int, int, int]:
        """Sorts the most specific first: fewest wildcards, then the longest literal part, then config order."""
        wildcards = sum(self.pattern.count(c) for c in "*?[")
        literal = len(re.sub(r"\[[^]]*\]|[*?]", "", self.pattern))
        return wildcards, -literal, self.order


def best_route(name: str, routes: Iterable[Route]) -> Route | None:
    """The most specific route whose glob matches `name` (a tool or prompt's own name, or a resource URI)."""
    matching = [r for r in routes if fnmatchcase(name, r.pattern)]
    return min(matching, key=Route.specificity) if matching else None


@dataclass(frozen=True, slots=True)
class Plan:
    """How requests for one name are routed, worked out when the catalogue is built: the strategy, the route
    that chose it (None: the default strategy), and the backends to consider, in the order the strategy reads them."""

    strategy: str
    route: Route | None
    candidates: tuple[str, ...]


@dataclass(slots=True)  # not frozen: one is built per candidate on every call, and frozen ones cost four times as much
class Candidate:
    """A backend as a routing decision sees it, for one request."""

    name: str
    priority: int
    state: LifecycleState
    breaker: BreakerState
    admits: bool
    """Its breaker would admit a call now."""
    in_flight: int
    offers: bool
    """Its current listing offers the requested name."""
    latency_ms: float | None = None
    reason: str = ""
    """Why it cannot take calls, when it cannot."""

    @property
    def usable(self) -> bool:
        return self.offers and self.state == "ready" and self.admits

    def why_not(self) -> str:
        if not self.offers:
            return "does not offer it"
        if self.state != "ready":
            return self.reason or self.state
        return self.reason or f"circuit {self.breaker.replace('_', '-')}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a request: send it (to `order[0]`, then the next on a failure that allows it), wait for a
    backend that is coming back (within the request's deadline), or refuse it (`reason` says why)."""

    action: Literal["send", "wait", "refuse"]
    order: tuple[str, ...] = ()
    reason: str = ""
    skipped: tuple[tuple[str, str], ...] = ()
    """Each candidate not first in `order`, with why."""


RouteStrategy: TypeAlias = Callable[[Sequence[Candidate], int], Decision]
"""A strategy: the candidates (in the plan's order) and the request's turn (for round-robin) in, a decision out."""


def _decide(
    ranked: Sequence[Candidate], candidates: Sequence[Candidate], why_later: Callable[[Candidate], str]
) -> Decision:
    """The decision for candidates ranked best first: send to the usable ones, else wait or refuse."""
    usable = [c for c in ranked if c.usable]
    if usable:
        later = [(c.name, why_later(c)) for c in usable[1:]] + [
            (c.name, c.why_not()) for c in candidates if not c.usable
        ]
        return Decision("send", tuple(c.name for c in usable), skipped=tuple(later))
    skipped = tuple((c.name, c.why_not()) for c in candidates)
    reason = (
        "; ".join(why if repr(name) in why else f"backend {name!r}: {why}" for name, why in skipped)
        or "no backend offers it"
    )
    coming_back = any(c.offers and c.state in CALLS_WAIT for c in candidates)
    return Decision("wait" if coming_back else "refuse", reason=reason, skipped=skipped)


def route_in_order(candidates: Sequence[Candidate], turn: int) -> Decision:
    """`fallback` (alias `priority`), and `path`: the first candidate that can take the request, in the plan's order
    (priority, lower first, with each route's `fallback_to` after its backend; for `path`, the route's own backend first)."""
    return _decide(candidates, candidates, lambda c: "later in the chain")


def route_by_capability(candidates: Sequence[Candidate], turn: int) -> Decision:
    """`capability`: among the backends that offer the name, a closed breaker first, then the fewest calls in flight,
    then the lower priority, then round-robin."""
    n = len(candidates)
    ranked = sorted(
        enumerate(candidates),
        key=lambda ic: (ic[1].breaker != "closed", ic[1].in_flight, ic[1].priority, (ic[0] - turn) % n),
    )
    best = ranked[0][1] if ranked else None

    def why_later(c: Candidate) -> str:
        if best is None or c.in_flight > best.in_flight:
            return f"busier ({c.in_flight} in flight)"
        return "lower priority" if c.priority > best.priority else "not its turn"

    return _decide([c for _, c in ranked], candidates, why_later)


STRATEGIES: Final[Mapping[str, RouteStrategy]] = {
    "path": route_in_order,
    "capability": route_by_capability,
    "fallback": route_in_order,
}
"""The routing strategies by name; config validation reads this table."""
STRATEGY_ALIASES: Final = {"priority": "fallback"}


def plan_route(
    name: str, pool: Sequence[str], routes: Mapping[str, Sequence[Route]], priority: Mapping[str, int], default: str
) -> Plan:
    """The plan for `name`, offered by `pool` (replicas, in priority order): the most specific route of a pool member
    that matches decides the strategy; `fallback_to` links (followed while routes match) add backends outside the pool."""
    route = best_route(name, (r for member in pool for r in routes.get(member, ())))
    strategy = route.strategy if route else default
    strategy = STRATEGY_ALIASES.get(strategy, strategy)
    if strategy == "capability":
        return Plan(strategy, route, tuple(pool))

    def chain(start: str) -> list[str]:
        found, here = [start], best_route(name, routes.get(start, ()))
        while here is not None and here.fallback_to is not None and here.fallback_to not in found:
            found.append(here.fallback_to)
            here = best_route(name, routes.get(here.fallback_to, ()))
        return found

    if strategy == "path" and route is not None:
        return Plan(strategy, route, tuple(chain(route.backend)))
    ordered = sorted(pool, key=lambda member: (route is None or member != route.backend, priority.get(member, 0)))
    return Plan(strategy, route, tuple(dict.fromkeys(b for member in ordered for b in chain(member))))


def routes_of(backends: Iterable[BackendConfig]) -> dict[str, tuple[Route, ...]]:
    """Every backend's routes, numbered in config order."""
    numbered = enumerate((b.name, r) for b in backends for r in b.routes)
    found: dict[str, list[Route]] = {}
    for i, (name, r) in numbered:
        found.setdefault(name, []).append(Route(name, r.pattern, r.strategy, r.fallback_to, i))
    return {name: tuple(rs) for name, rs in found.items()}


def fallback_cycles(routes: Iterable[Route]) -> list[list[str]]:
    """Cycles of `fallback_to` links between backends, each as the backends it passes through, first repeated last."""
    links: dict[str, set[str]] = {}
    for r in routes:
        if r.fallback_to is not None:
            links.setdefault(r.backend, set()).add(r.fallback_to)
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            if not any(set(cycle) == set(c) for c in cycles):
                cycles.append(cycle)
            return
        if node in done:
            return
        for target in sorted(links.get(node, ())):
            visit(target, [*path, node])
        done.add(node)

    for start in sorted(links):
        visit(start, [])
    return cycles


def may_send_elsewhere(*, reached_backend: bool, retry_safe: bool) -> bool:
    """The one rule for sending a failed request again, to the next candidate or the same one: always when it provably
    never reached a backend; when it may have run there, only if repeating it is harmless (lists, reads, prompts,
    completion, and tools annotated readOnlyHint or idempotentHint)."""
    return retry_safe or not reached_backend


@dataclass(slots=True)
class TokenBucket:
    """Admits `rate` events a second on average and bursts of up to `burst`; time is passed in."""

    rate: float
    burst: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        self.tokens = self.burst if self.tokens < 0 else min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


LATENCY_WINDOW: Final = 256
"""Recent calls per backend kept for its latency percentiles."""


@dataclass(slots=True)
class RouteStats:
    """A backend's routing counters: what list_backends, get_backend_health and the debug log show."""

    requests: int = 0
    errors: int = 0
    fallbacks: int = 0
    """Requests this backend served after another candidate failed or was passed over in a chain."""
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    recent_ms: float | None = None
    """A moving average of the latency, cheap enough for every routing snapshot."""

    def record(self, milliseconds: float, *, ok: bool, fallback: bool) -> None:
        self.requests += 1
        self.errors += not ok
        self.fallbacks += fallback
        self.latencies_ms.append(milliseconds)
        self.recent_ms = milliseconds if self.recent_ms is None else 0.8 * self.recent_ms + 0.2 * milliseconds

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret shown as `***`; pass the secrets longest first, so none is left half shown."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------------------- start-up
# Nothing in this section needs the SDK, which is imported after it: see "the one thing done while the module imports".

BASIC_ENV: Final = frozenset(
    (
        "APPDATA HOMEDRIVE HOMEPATH LOCALAPPDATA PATH PATHEXT PROCESSOR_ARCHITECTURE SYSTEMDRIVE SYSTEMROOT TEMP USERNAME USERPROFILE"
        if sys.platform == "win32"
        else "HOME LOGNAME PATH SHELL TERM USER"
    ).split()
)
"""The environment the SDK gives stdio servers (its get_default_environment)."""
NETWORK_ENV: Final = re.compile(
    r"(HTTPS?_PROXY|NO_PROXY|ALL_PROXY|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|NODE_EXTRA_CA_CERTS"
    r"|LANG|TMPDIR|(UV|PIP|NPM_CONFIG|XDG|LC)_\w+)",
    re.IGNORECASE,
)
"""Beyond that: what `uvx`/`npx` need behind proxies and private CAs, and the locale."""


def child_environment(parent: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    """A stdio backend's environment: the basics and network settings of the router's (never its secrets), then its own `env`."""
    inherited = {
        k: v for k, v in parent.items() if (k in BASIC_ENV or NETWORK_ENV.fullmatch(k)) and not v.startswith("()")
    }
    return inherited | dict(own)  # "()": an exported shell function


BACKEND_MARK: Final = "MCP_ROUTER_BACKEND"
"""Set in each stdio backend's environment to `<router's token>.<launch number>`: its descendants inherit it, so they
are found by it wherever they have gone (a daemon's double fork leaves no parent to trace them through)."""
ROUTER_TOKEN: Final = os.urandom(8).hex()
"""This router's part of the marks, so the warden stops this router's descendants, not another's."""

ESCAPED: Final = '''
def _start_time(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return None if fields[0] in "ZX" else fields[19]  # a zombie is gone
    except (OSError, IndexError):
        return None


def _marked(pid, mark):
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return mark in b"\\0" + environ.read()
    except OSError:  # gone, or not ours to read
        return False


def escaped_descendants(groups, mark=None):
    """Descendants of the members of process `groups` that left them (setsid, setpgid), with their start times; and,
    given a `mark` (bytes, from a NUL), every process outside `groups` whose environment holds it, wherever it went.
    Read from /proc (Linux; elsewhere none)."""
    import os
    try:
        pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return {}
    children, group, started = {}, {}, {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if fields[0] in "ZX":
                continue
            children.setdefault(int(fields[1]), []).append(pid)
            group[pid], started[pid] = int(fields[2]), fields[19]
        except (OSError, IndexError, ValueError):
            continue
    todo = [pid for pid in group if group[pid] in groups]
    seen, found = set(todo), {}
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
                if group.get(child) not in groups:
                    found[child] = started[child]
    if mark is not None:
        mine = os.getpid()
        for pid in group:
            if pid not in found and pid != mine and group[pid] not in groups and _marked(pid, mark):
                found[pid] = started[pid]
    return found


def signal_escaped(escaped, signum):
    """Send `signum` (0: none) to each of `escaped` still there, checked by start time as pids are reused; return those."""
    import os
    there = {pid: start for pid, start in escaped.items() if _start_time(pid) == start}
    for pid in there:
        try:
            os.kill(pid, signum)
        except OSError:
            pass
    return there
'''
"""Finds and stops what a backend started in a session or group of its own, which the stop of its group misses.
One text, run by the warden and (below) by the router, so a killed router and a graceful stop stop the same."""
_tree: dict[str, Any] = {}
exec(ESCAPED, _tree)  # our own text: the one the warden runs
escaped_descendants: Callable[[Container[int], bytes | None], dict[int, str]] = _tree["escaped_descendants"]
signal_escaped: Callable[[Mapping[int, str], int], dict[int, str]] = _tree["signal_escaped"]


def backend_mark(n: int) -> bytes:
    """What the environment of the `n`th launched stdio backend and its descendants holds (an environ entry)."""
    return f"\0{BACKEND_MARK}={ROUTER_TOKEN}.{n}\0".encode()


WARDEN: Final = (
    "# mcp-router warden: stops the router's stdio backends if the router is killed\n"
    + ESCAPED
    + """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
listed = {}
for line in sys.stdin:  # the router's pipe: it ends when the router does, however it ends
    group = int(line[1:])
    listed[group] = listed.get(group, 0) + (1 if line[0] == "+" else -1)  # counted: a reused pid may come before its -
groups = {group for group, count in listed.items() if count > 0}
# before any signal: once a backend is gone, whose they were is known only by their mark
escaped = escaped_descendants(groups, b"\\0" + sys.argv[1].encode())  # any of this router's marks
def alive(group):
    try:
        os.killpg(group, 0)
        return True
    except OSError:
        return False
for signum in (signal.SIGTERM, signal.SIGKILL):
    for group in groups:
        try: os.killpg(group, signum)
        except OSError: pass
    escaped = signal_escaped(escaped, signum)
    deadline = time.monotonic() + 2
    while ((groups := {g for g in groups if alive(g)}) or (escaped := signal_escaped(escaped, 0))) and time.monotonic() < deadline:
        time.sleep(0.05)
"""
)
"""Outlives the router to stop the process groups of its stdio backends (npx/uvx grandchildren too), and the
descendants of theirs that left their group (a daemon's setsid, a double fork): SIGTERM, 2 s, SIGKILL."""


class Warden:
    """One helper process (`python -I -S`, about 5 MB) that makes stdio backends die with the router, even by SIGKILL.

    The router tells it each backend's process group as it starts and stops. The
    pipe between them closes when the router ends, however it ends; the warden
    then stops every group still listed: SIGTERM, 2 s, SIGKILL.
    """

    def watch(self, group: int) -> None:
        self._tell(b"+%d\n" % group)

    def forget(self, group: int) -> None:
        self._tell(b"-%d\n" % group)

    @functools.cached_property
    def _pipe(self) -> int | None:
        """The write end of the pipe to the warden, started with the first stdio backend; None without one."""
        if not hasattr(os, "posix_spawn"):
            return None  # Windows: backends see their stdin close, and most exit
        read_end, write_end = os.pipe()  # neither is inherited by backends started later
        try:
            actions = [(os.POSIX_SPAWN_DUP2, read_end, 0), (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
            os.posix_spawn(
                sys.executable,
                [sys.executable, "-I", "-S", "-c", WARDEN, f"{BACKEND_MARK}={ROUTER_TOKEN}."],
                os.environ,
                file_actions=actions,
                setsid=True,
            )
        except (OSError, NotImplementedError) as err:  # NotImplementedError: no setsid for posix_spawn here
            log.warning("cannot start the warden that stops stdio backends if the router is killed: %s", err)
            os.close(write_end)
            return None
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)  # a stopped warden must not stop the event loop
        return write_end

    def _tell(self, line: bytes) -> None:
        if self._pipe is None:
            return
        try:
            os.write(self._pipe, line)
        except BlockingIOError:  # closing the pipe would tell it to stop every backend
            log.warning("the warden is not reading; a stdio backend's start or stop went unrecorded")
        except OSError:
            log.warning("the warden is gone: stdio backends will outlive a killed router")
            os.close(self._pipe)
            self._pipe = None


warden = Warden()


_launches = itertools.count(1)
_marks: dict[int, bytes] = {}
"""The mark of each launched stdio backend (`backend_mark`), by pid, until it has stopped."""


def launch(config: BackendConfig) -> subprocess.Popen[bytes]:
    """Start a stdio backend in a process group of its own, marked, for the warden to watch."""
    n = next(_launches)
    try:
        process = subprocess.Popen(
            [config.command or "", *config.args],
            bufsize=0,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,  # read by the event loop, each line prefixed with the backend's name: BackendStderr
            env=child_environment(os.environ, config.env) | {BACKEND_MARK: f"{ROUTER_TOKEN}.{n}"},
            cwd=config.cwd,
            start_new_session=True,
        )
    except OSError as err:
        where = f" in {config.cwd!r}" if config.cwd and err.filename == config.cwd else ""
        raise RouterError(f"cannot run {config.command!r}{where}: {err.strerror or err}") from None
    _marks[process.pid] = backend_mark(n)
    warden.watch(process.pid)
    return process


class RedactSecrets(logging.Filter):
    """Takes the configuration's secrets out of every log line, the SDK's and httpx's too (a filter on the handlers).

    Belt and braces: the router's own lines are redacted where they are written. It
    costs nothing on the call path, where nothing is logged, and little per line."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: Sequence[str] = ()
        """Longest first; replaced whole when the configuration changes."""
        self.passing: collections.Counter[str] = collections.Counter()
        """Values of client headers forwarded by the calls in flight (see `hide`)."""

    def hide(self, values: Iterable[str]) -> list[str]:
        """Redact `values` too, each whole and each comma-separated part of it, however short, until `unhide` is given
        what this returns: a client's forwarded headers, for as long as its call lasts (the client's, not ours to
        judge harmless)."""
        hidden = [part for value in values for part in {value, *value.split(", ")} if part]
        self.passing.update(hidden)
        return hidden

    def unhide(self, values: Iterable[str]) -> None:
        self.passing.subtract(values)
        self.passing += collections.Counter()  # drops the values no call forwards any more

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets
        if self.passing:
            secrets = sorted({*secrets, *self.passing}, key=len, reverse=True)
        if not secrets:
            return True
        message = record.getMessage()
        if (clean := redact(message, secrets)) != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # the formatter keeps a text it finds
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info), secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, secrets)
        return True


log_redaction = RedactSecrets()


# -- the command line (all of it: flags, subcommands, help)

COMMANDS: Final = {
    "serve": "serve the backends to one MCP client over stdio, or to many over HTTP (the default)",
    "check": "start every backend once and report how each did; exit 1 if any failed",
    "tools": "list the tools a client sees, with their backend and original name",
    "call": "call one tool through the router and print its result; exit 1 if it failed",
}
CLIENT_TOOL_LIMITS: Final = ((128, "OpenAI's API (128 functions)"), (40, "Cursor (about 40 tools)"))
"""Tool counts past which popular clients drop or refuse tools, the tightest last."""
CHECK_TIMEOUT: Final = 60.0
"""Default seconds `check`, `tools` and `call` wait for backends to start."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; `prog` is the name the program was invoked by."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        metavar="PATH",
        help="backends file: YAML, or the JSON/TOML of Claude, Cursor, VS Code, Windsurf or Codex; "
        "default: $MCP_BACKENDS_CONFIG, else ./backends.yaml",
    )
    for s in SETTINGS:
        if s.flag is None:
            continue
        if s.kind is bool:
            common.add_argument(
                s.flag,
                dest=s.field,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{s.help} (env {s.env})",
            )
        elif isinstance(s.kind, tuple):
            common.add_argument(s.flag, dest=s.field, metavar="|".join(s.kind).lower(), help=f"{s.help} (env {s.env})")
        elif s.kind is list:
            common.add_argument(
                s.flag,
                dest=s.field,
                type=functools.partial(_from_text, kind=list),
                metavar="A,B",
                help=f"{s.help} (env {s.env})",
            )
        else:
            common.add_argument(
                s.flag, dest=s.field, type=cast(Callable[[str], Any], s.kind), help=f"{s.help} (env {s.env})"
            )
    common.add_argument(
        "--debug", dest="log_level", action="store_const", const="DEBUG", help="same as --log-level debug"
    )
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument(
        "--timeout", type=float, default=CHECK_TIMEOUT, metavar="SECONDS", help="how long backends may take to start"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser = argparse.ArgumentParser(
        description="One MCP server in front of many: namespaced tools, resources and prompts, with health checks, circuit breakers and retries.",
        epilog=(
            "examples:\n"
            "  %(prog)s --config backends.yaml                 serve over stdio (for Claude Desktop, Cursor, ...)\n"
            "  %(prog)s --config backends.yaml --transport http --port 8000\n"
            "  %(prog)s check --config backends.yaml           start every backend once and report\n"
            "  %(prog)s tools --config backends.yaml 'github__*'\n"
            '  %(prog)s call --config backends.yaml time__get_current_time \'{"timezone": "UTC"}\'\n'
            "\n"
            "settings also come from MCP_* environment variables and the YAML file; "
            "precedence: flags > environment > YAML > defaults. SIGHUP, or saving the file, reloads the backends."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],  # for --help only: the command line always names a subcommand once parsed
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, summary in COMMANDS.items():
        extra = {"serve": [], "check": [waits, as_json], "tools": [waits, as_json], "call": [waits]}[name]
        command = commands.add_parser(name, parents=[common, *extra], help=summary, description=summary)
        if name == "tools":
            command.add_argument(
                "pattern", nargs="?", default="*", metavar="GLOB", help="only the names that match, e.g. 'github__*'"
            )
        elif name == "call":
            command.add_argument("tool", metavar="TOOL", help="the tool's exposed name, as `tools` lists it")
            command.add_argument(
                "arguments",
                nargs="?",
                default={},
                type=_json_object,
                metavar="JSON",
                help="the arguments, a JSON object",
            )
    return parser


def setting_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, by field (None where not given)."""
    return {s.field: getattr(args, s.field, None) for s in SETTINGS}


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of arguments, got {_describe(value)}")
    return value


def parse_command_line(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; without a subcommand it is `serve`, so `--config FILE` alone keeps serving."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    return build_parser().parse_args(argv)


def bind(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before anything starts, so a busy port is a clear error and not a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(
        family, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )  # asyncio disables Nagle only when it sees TCP here
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        hint = " (is the port in use?)" if err.errno == errno.EADDRINUSE else ""
        raise RouterError(f"cannot serve HTTP on {host}:{port}: {err.strerror or err}{hint}") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def http_service_problems(settings: Settings) -> list[str]:
    """What stops the HTTP service from starting as configured (exit 2): above all, an open door to every backend."""
    problems = []
    if settings.auth_jwks_url and not (settings.auth_issuer and settings.auth_resource_url):
        problems.append(
            "server.auth.jwks_url needs server.auth.issuer and server.auth.resource_url (the tokens' iss and aud)"
        )
    if not settings.authenticated and not settings.allow_unauthenticated and not is_loopback(settings.host):
        problems.append(
            f"serving {settings.host} without authentication would hand every backend's credentials to anyone who can "
            "reach it; set MCP_AUTH_TOKEN (or MCP_AUTH_TOKENS_FILE, or server.auth.jwks_url for OAuth), "
            "or pass --allow-unauthenticated if a proxy in front authenticates"
        )
    return problems


@dataclass(frozen=True, slots=True)
class Started:
    args: argparse.Namespace
    """The parsed command line; `args.command` is the subcommand."""
    config: Config
    listening: socket.socket | None
    """The HTTP socket, when serving over HTTP."""
    launched: dict[str, subprocess.Popen[bytes]]
    """For `serve`, the enabled stdio backends' processes by backend name, for their first connections to take."""


def start(argv: Sequence[str] | None) -> Started | int:
    """All that comes before the SDK: the command line, logging, the configuration (exit status 2 if it is
    unusable) and, to serve, the HTTP socket (1 if it cannot be had) and the stdio backends' launch."""
    args = parse_command_line(argv)
    overrides = setting_flags(args)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, os.environ, overrides)
    except ConfigError as err:
        print("mcp-router: configuration error:", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    if config.settings.event_loop == "uvloop" and not uvloop_installed():
        print("mcp-router: configuration error:", file=sys.stderr)
        print("  server.event_loop: uvloop is not installed: install it (pip install uvloop, or uv run --with uvloop "
              "mcp_router.py ...), or choose auto or asyncio", file=sys.stderr)  # fmt: skip
        return 2
    quiet = args.command != "serve" and args.log_level is None  # a report on stdout needs no progress log
    logging.getLogger().setLevel("WARNING" if quiet else config.settings.log_level)
    log_redaction.secrets = config.secrets()
    for handler in logging.getLogger().handlers:
        handler.addFilter(log_redaction)
    # sse_starlette's debug lines hold every answer's bytes, which may quote a client's forwarded headers
    for noisy in ("httpx", "httpx2", "mcp", "uvicorn.error", "client", "sse_starlette"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command != "serve":
        return Started(args, config, None, {})
    settings = config.settings
    serves_http = settings.transport in ("http", "sse")
    if serves_http and (problems := http_service_problems(settings)):
        print("mcp-router: cannot serve HTTP:", *(f"  {p}" for p in problems), sep="\n", file=sys.stderr)
        return 2
    if serves_http and not settings.authenticated and not is_loopback(settings.host):
        log.warning(
            "serving %s without authentication (--allow-unauthenticated): anyone who reaches it uses every backend",
            settings.host,
        )
    try:
        listening = bind(settings.host, settings.port) if serves_http else None
    except RouterError as err:
        log.error("%s", err)
        return 1
    launched = {}
    for backend in config.backends:
        if backend.enabled and backend.transport == "stdio":
            with contextlib.suppress(RouterError):  # its supervisor tries again, says why, and retries with backoff
                launched[backend.name] = launch(backend)
    return Started(args, config, listening, launched)


def uvloop_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("uvloop") is not None


def event_loop_options(choice: str) -> dict[str, Any]:
    """anyio's options for the loop `server.event_loop` names (auto: uvloop where it is installed). uvloop is not
    the default: measured, it took about a tenth off an HTTP call's p50 and nothing clear off throughput."""
    return {"use_uvloop": choice == "uvloop" or (choice == "auto" and uvloop_installed())}


def running_loop_name() -> str:
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"


# -- the one thing done while the module imports
# Importing the SDK takes about 0.6 s, as long as stdio backends (npx, uvx, Python servers) take to start. Run as a
# program, the router parses its command line here and, to serve, launches its stdio backends, which then start while
# the SDK below is imported: start-up takes about as long as the slowest backend, not that plus the import.
# Imported as a module (tests, other programs), nothing happens until main() is called.


def run_as_program(module_name: str, argv0: str) -> bool:
    """Run as a script (`__main__`), or as the installed `mcp-router` command, which imports this module, then calls main()."""
    return module_name == "__main__" or Path(argv0).name in ("mcp-router", "mcp-router.exe")


def _stop_quietly(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # Ctrl-C before serving: no traceback of an import in progress


RUN_AS_PROGRAM: Final = run_as_program(__name__, (sys.argv or [""])[0])
if RUN_AS_PROGRAM:
    signal.signal(signal.SIGINT, _stop_quietly)  # the router's own handling replaces it once it serves
STARTED: Final = start(None) if RUN_AS_PROGRAM else None
if isinstance(STARTED, int):
    raise SystemExit(STARTED)  # no need to load the SDK to say that the configuration is unusable

# ---------------------------------------------------------------------------- the SDK
# Imported here, not at the top: see the start-up section.

import anyio
import httpx2
import mcp_types as types
import pydantic
import pydantic_core
from mcp.client._probe import negotiate_auto
from mcp.client.client import Client
from mcp.client.session import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost, listen
from mcp.server import Server
from mcp.server.auth.provider import AccessToken
from mcp.server.caching import CACHEABLE_METHODS, CacheableMethod, CacheHint
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.models import InitializationOptions
from mcp.server.request_state import RequestStateBoundary, RequestStateSecurity
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ListenHandler,
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.inbound import find_invalid_x_mcp_header, x_mcp_header_map
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher
from mcp.shared.message import ServerMessageMetadata, SessionMessage
from mcp.shared.uri_template import UriTemplate
from mcp_types import (
    CONNECTION_CLOSED,
    DEFAULT_NEGOTIATED_VERSION,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    REQUEST_TIMEOUT,
    URL_ELICITATION_REQUIRED,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

# ---------------------------------------------------------------------------- I/O shell: backends


def describe_error(exc: BaseException) -> str:
    """A one-line account of a failure: the innermost cause of an exception group, typed."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError | RouterError):
        return str(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


Streams: TypeAlias = tuple[Any, Any]
Connector: TypeAlias = Callable[[], AbstractAsyncContextManager[Streams]]


class InvalidMessage(ValueError):
    """A line from a backend that is not a valid JSON-RPC message; kept whole, so an answer can still find its call."""

    def __init__(self, line: bytes) -> None:
        super().__init__("not a valid JSON-RPC message")
        self.line = line


def _answer_problem(message: Any) -> str:
    """What makes a backend's would-be answer invalid, in words."""
    if not isinstance(message, dict):
        return "not a JSON object"
    if not isinstance(message.get("id"), str | int) or isinstance(message.get("id"), bool):
        return "no usable id"
    if "result" in message and not isinstance(message["result"], dict):
        return "its result is not an object"
    error = message.get("error")
    if "error" in message and not (
        isinstance(error, dict) and isinstance(error.get("code"), int) and "message" in error
    ):
        return "its error has no code or message"
    return "not a valid JSON-RPC answer"


SESSION_LOST: Final = re.compile(r"session (not found|terminated)", re.IGNORECASE)
"""How the SDKs spell an HTTP 404 for our session id (the server restarted and forgot it)."""
TRANSPORT_ERRORS: Final = (
    NotSent,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    OSError,
    httpx2.TransportError,
)


def is_transport_failure(exc: BaseException) -> bool:
    """Failures that say the backend's connection is in trouble: an explicit list, so a router bug never opens a
    breaker or triggers a retry. Errors the backend answered are its own business and pass to the client."""
    if isinstance(exc, MCPError):
        return exc.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT)
    return isinstance(exc, TRANSPORT_ERRORS)


class _ReportedWrites:
    """A backend connection's write stream that tells a request whose write failed (it never reached the backend,
    so it may go elsewhere) from one that was sent; the SDK reports both as "Connection closed"."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def send(self, item: SessionMessage) -> None:
        try:
            await self._stream.send(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as err:
            if isinstance(item.message, types.JSONRPCRequest):
                raise NotSent("writing to the backend failed: its connection is gone") from err
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> _ReportedWrites:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class _WatchedDispatcher(JSONRPCDispatcher[Any]):
    """A backend's JSON-RPC dispatcher: says when its connection has ended, refuses to send on an ended one
    (`NotSent`), and fails a call at once when the backend answers it with something that is not a valid answer."""

    def __init__(self, name: str, read_stream: Any, write_stream: Any) -> None:
        super().__init__(read_stream, _ReportedWrites(write_stream))
        self.name = name
        self.ended = anyio.Event()

    async def run(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().run(*args, **kwargs)
        finally:
            self.ended.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def send_raw_request(
        self, method: str, params: Mapping[str, Any] | None, opts: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        if self._closed:
            raise NotSent("the backend's connection has ended")
        return await super().send_raw_request(method, params, opts, **kwargs)

    async def _dispatch(self, item: Any, *args: Any) -> None:
        if isinstance(item, InvalidMessage):
            self._fail_answered(item)
        else:
            await super()._dispatch(item, *args)

    def _fail_answered(self, item: InvalidMessage) -> None:
        """An invalid answer fails the call it answers; one whose id cannot be read fails every call now pending,
        since none of them can be told apart (a backend this broken is answering garbage)."""
        try:
            message = json.loads(item.line)
        except (ValueError, RecursionError):
            message = None
        if isinstance(message, dict) and "method" in message:
            log.warning("backend %s: ignoring a request or notification that is not valid JSON-RPC", self.name)
            return
        problem = _answer_problem(message)
        raw_id = message.get("id") if isinstance(message, dict) else None
        key = coerce_request_id(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
        self._fail([key] if key in self._pending else list(self._pending), problem)

    def _resolve_pending(self, request_id: Any, outcome: dict[str, Any] | types.ErrorData) -> None:
        """An answer to a call: to its call; a late one (a call given up) is dropped; one with an id that was never
        sent, or none (an error for a request the backend could not read), fails every call now pending."""
        key = coerce_request_id(request_id) if request_id is not None else None
        if key in self._pending or (isinstance(key, int) and 0 < key <= self._next_id):
            super()._resolve_pending(request_id, outcome)
        elif isinstance(outcome, types.ErrorData):
            self._fail(list(self._pending), f"an error for no request it was sent ({outcome.code}: {outcome.message})")
        else:
            self._fail(list(self._pending), f"an answer to a request it was never sent (id {repr(request_id)[:40]})")

    def _fail(self, pending: list[Any], problem: str) -> None:
        if not pending:
            log.warning("backend %s: ignoring a line that is not an answer to any call (%s)", self.name, problem)
            return
        log.warning("backend %s: invalid answer (%s); failing %d pending call(s)", self.name, problem, len(pending))
        error = types.ErrorData(code=INTERNAL_ERROR, message=f"backend {self.name!r} sent an invalid answer: {problem}")
        for request_id in pending:
            super()._resolve_pending(request_id, error)


@dataclass(slots=True)
class HealthRecord:
    last_success: float | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    checks: int = 0
    failed_checks: int = 0
    last_latency_ms: float | None = None


class LineReader:
    """The SDK's ReadStream over newline-delimited JSON-RPC on an event-loop pipe.

    The SDK's stdio transports relay every message through a task and a memory
    stream (the server side also through a thread); reading and writing the pipe
    in place saves those hops on each message.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        answer_errors_to: asyncio.StreamWriter | None = None,
        transport: asyncio.ReadTransport | None = None,
    ) -> None:
        self._reader = reader
        self._errors_to = answer_errors_to
        self._transport = transport
        """The pipe's, paused while a flood of dropped lines is paced, so the flood waits in the pipe, not in memory."""
        self.skip: Callable[[bytes], bool] | None = None
        """Lines to drop before they are parsed (a backend's log messages nobody will take)."""
        self._dropped = 0
        self._drop_budget = TokenBucket(
            DROPPED_LINES_PER_SECOND / DROPPED_BATCH, DROPPED_LINES_PER_SECOND / DROPPED_BATCH
        )

    async def receive(self) -> SessionMessage | Exception:
        while line := await self._readline():
            if self.skip is not None and self.skip(line):
                self._dropped += 1
                if not self._dropped % DROPPED_BATCH:  # readline does not yield while lines are buffered
                    await self._pace()
            elif line.strip():
                try:
                    message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                except ValueError as exc:  # the dispatcher only logs it, so a client would wait forever
                    if self._errors_to is None:
                        return InvalidMessage(line)
                    await self._answer(malformed_line_answer(line, exc))
                    continue
                # The SDK takes a request whose id is null, a float, a bool or an object for a notification.
                if type(message) is types.JSONRPCNotification and self._errors_to is not None and b'"id"' in line:  # noqa: SIM102
                    if (answer := bad_id_answer(line)) is not None:
                        await self._answer(answer)
                        continue
                return SessionMessage(message)
        raise anyio.EndOfStream

    async def _pace(self) -> None:
        """Let the loop's other tasks run; past DROPPED_LINES_PER_SECOND, also stop reading the pipe for a while."""
        if self._drop_budget.take(anyio.current_time()):
            await anyio.lowlevel.checkpoint()
            return
        if self._transport is not None:
            self._transport.pause_reading()
        try:
            await anyio.sleep(DROPPED_BATCH / DROPPED_LINES_PER_SECOND)
        finally:
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()

    async def _answer(self, answer: dict[str, Any] | None) -> None:
        if answer is None:
            return
        assert self._errors_to is not None
        self._errors_to.write(json.dumps(answer).encode() + b"\n")
        with contextlib.suppress(ConnectionError, OSError):
            await self._errors_to.drain()

    async def _readline(self) -> bytes:
        try:
            return await self._reader.readline()
        except ValueError:  # a line over the 1 GiB limit: the framing is lost, so is the connection
            log.error("a message over 1 GiB; closing the connection")
            return b""

    def __aiter__(self) -> LineReader:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        pass

    async def __aenter__(self) -> LineReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        pass


_JSON_TOKEN: Final = re.compile(rb'"(?:[^"\\]|\\.)*"|[][{}]')
"""A JSON string (skipped whole, brackets and all) or a bracket: enough to measure nesting."""
_OUTLINED_LINE_LIMIT: Final = 1 << 20
"""Bytes of a line too deep for the stdlib's parser that are searched (in Python) for its id; a longer one gets id null."""


def _outer_levels(line: bytes, depth: int) -> bytes | None:
    """`line` with every array or object nested deeper than `depth` replaced by null; None if none is.

    Only for lines already refused: the stdlib's parser recurses, and ~1,000 levels overflow it.
    """
    if line.count(b"[") + line.count(b"{") <= depth:  # too few brackets to be that deep: C speed
        return None
    kept: list[bytes] = []
    level, cut_from, last = 0, -1, 0
    for token in _JSON_TOKEN.finditer(line):
        bracket = token[0]
        if bracket in (b"[", b"{"):
            level += 1
            if level == depth + 1:
                cut_from = token.start()
        elif bracket in (b"]", b"}"):
            if level == depth + 1:
                kept += (line[last:cut_from], b"null")
                last = token.end()
            level -= 1
    if cut_from < 0:
        return None
    if level > depth:  # never closed: invalid JSON, but what comes before may still name the request
        kept += (line[last:cut_from], b"null")
        last = len(line)
    return b"".join([*kept, line[last:]])


def _error_answer(request_id: Any, code: int, message: str) -> dict[str, Any]:
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        request_id = None  # MCP ids are strings or integers: any other is answered as unreadable
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _parser_went_too_deep(error: ValueError) -> bool:
    """Whether pydantic's JSON parser stopped at its depth limit (MAX_JSON_DEPTH levels); cheap on huge errors."""
    if not isinstance(error, pydantic.ValidationError) or error.error_count() != 1:
        return False
    return "recursion limit exceeded" in error.errors(include_url=False, include_input=False)[0]["msg"]


def malformed_line_answer(line: bytes, error: ValueError) -> dict[str, Any] | None:
    """The JSON-RPC answer to a line the SDK's parser refused (`error`); None for a notification: nobody waits.

    -32700 for bad JSON; -32600 for JSON that is no JSON-RPC message, or nested deeper than the parser reads.
    """
    too_deep = _parser_went_too_deep(error)
    try:
        message = json.loads(line)
    except RecursionError:  # deeper than the stdlib's parser goes: its outer levels alone may name the request
        shallow = _outer_levels(line, MAX_JSON_DEPTH) if len(line) <= _OUTLINED_LINE_LIMIT else None
        try:
            message = json.loads(shallow) if shallow is not None else None
        except ValueError:
            return _error_answer(None, PARSE_ERROR, "Parse error: not JSON")
    except ValueError:
        return _error_answer(None, PARSE_ERROR, "Parse error: not JSON")
    if isinstance(message, dict) and "id" not in message:
        return None  # a malformed notification
    request_id = message.get("id") if isinstance(message, dict) else None
    if too_deep:
        return _error_answer(
            request_id, INVALID_REQUEST, f"Invalid request: nested more than {MAX_JSON_DEPTH} levels deep"
        )
    return _error_answer(request_id, INVALID_REQUEST, "Invalid request: not a valid JSON-RPC message")


def bad_id_answer(line: bytes) -> dict[str, Any] | None:
    """-32600 (id null) for a request whose id is not a string or an integer; None for a true notification."""
    message = json.loads(line)  # it parsed once, within the depth limit: it parses again
    if not isinstance(message, dict) or "id" not in message or "method" not in message:
        return None  # a notification, or an answer to the router's own request
    if isinstance(message["id"], str | int) and not isinstance(message["id"], bool):
        return None
    return _error_answer(None, INVALID_REQUEST, "Invalid request: the id must be a string or an integer")


def encode_line(message: types.JSONRPCMessage) -> bytes:
    """A message as one line of JSON; a cached page's items are encoded once, not at every listing."""
    if type(message) is types.JSONRPCResponse and any(type(v) is EncodedItems for v in message.result.values()):
        members = b",".join(_to_json(k) + b":" + _encoded(v) for k, v in message.result.items())
        return b'{"jsonrpc":"2.0","id":' + _to_json(message.id) + b',"result":{' + members + b"}}\n"
    return message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"


def _encoded(value: Any) -> bytes:
    if type(value) is not EncodedItems:
        return _to_json(value)
    if value.encoded is None:
        value.encoded = _to_json(value)
    return value.encoded


def _to_json(value: Any) -> bytes:
    """JSON as pydantic's model_dump_json writes it: infinities and NaN (which backends may send) become null."""
    return pydantic_core.to_json(value, inf_nan_mode="null")


class LineWriter:
    """The SDK's WriteStream that writes each message as one line to an event-loop pipe."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    async def send(self, item: SessionMessage) -> None:
        if self._writer.is_closing():
            raise anyio.ClosedResourceError
        self._writer.write(encode_line(item.message))
        try:
            await self._writer.drain()
        except (ConnectionError, OSError) as err:
            raise anyio.BrokenResourceError from err

    async def aclose(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()

    async def __aenter__(self) -> LineWriter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@asynccontextmanager
async def _line_pipes(
    read_file: Any, write_file: Any, *, answer_errors: bool = False
) -> AsyncIterator[tuple[LineReader, LineWriter]]:
    """Newline-delimited JSON-RPC over a pipe (or socket) pair, read and written by the event loop; closed on exit."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)  # one line is one message, of any size
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), read_file)
    try:
        write_transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), write_file
        )
        try:
            writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
            answers_to = writer if answer_errors else None
            yield LineReader(reader, answer_errors_to=answers_to, transport=read_transport), LineWriter(writer)
        finally:
            write_transport.close()
    finally:
        read_transport.close()


class BackendStderr(asyncio.Protocol):
    """A stdio backend's stderr, copied line by line to the router's, each line prefixed with the backend's name.

    Read by the event loop as it arrives, apart from the backend's stdout: it costs the calls nothing.
    Shown whatever the log level, as it was when backends wrote to the router's stderr themselves.
    """

    MAX_LINE: Final = 1 << 16

    def __init__(self, name: str, secrets: Sequence[str]) -> None:
        self.prefix = f"[{name}] "
        self.secrets = secrets
        self.partial = b""

    def data_received(self, data: bytes) -> None:
        *lines, self.partial = (self.partial + data).split(b"\n")
        if len(self.partial) > self.MAX_LINE:  # no newline in sight: show what there is
            lines.append(self.partial)
            self.partial = b""
        self._show(lines)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partial:
            self._show([self.partial])
            self.partial = b""

    def _show(self, lines: Iterable[bytes]) -> None:
        text = "".join(
            f"{self.prefix}{redact(line.decode(errors='replace').rstrip(), self.secrets)}\n" for line in lines
        )
        if text:
            with contextlib.suppress(OSError, ValueError):  # the router's stderr is gone: nowhere to show it
                sys.stderr.write(text)
                sys.stderr.flush()


@asynccontextmanager
async def stdio_connection(
    process: subprocess.Popen[bytes], stderr: BackendStderr | None = None
) -> AsyncIterator[Streams]:
    """A launched stdio backend's pipes; on exit its stdin closes, then its group gets SIGTERM and SIGKILL."""
    async with AsyncExitStack() as stack:
        with anyio.CancelScope(shield=True):  # a loop turn; cancelled then, the process would be left running
            if process.stderr is not None and stderr is not None:
                relay, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: stderr, process.stderr)
                stack.callback(relay.close)  # after the backend has stopped, so its last words are shown
            reader, writer = await stack.enter_async_context(_line_pipes(process.stdout, process.stdin))
        try:
            yield reader, writer
        finally:
            with anyio.CancelScope(shield=True):  # found while the backend lives (its tree), and by its mark
                escaped = await anyio.to_thread.run_sync(
                    escaped_descendants, {process.pid}, _marks.pop(process.pid, None)
                )
            await writer.aclose()  # stdin EOF asks the server to exit; its stdout is read until it has,
            with anyio.CancelScope(shield=True):  # so what it writes meanwhile meets no broken pipe
                await _stop(process, escaped)
            warden.forget(process.pid)


async def _stop(process: subprocess.Popen[bytes], escaped: Mapping[int, str]) -> None:
    """The MCP shutdown sequence for a stdio server whose stdin is closed, within STOP_GRACE whatever it does: half of it
    to exit; then SIGTERM to its whole group and to its `escaped` descendants, the other half, and SIGKILL."""
    with anyio.move_on_after(STOP_GRACE / 2):
        while process.poll() is None:  # not wait(): that blocks the event loop
            await anyio.sleep(0.02)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None and not escaped:
            break
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signum)
        escaped = signal_escaped(escaped, signum)
        with anyio.move_on_after(STOP_GRACE / 2):
            while process.poll() is None or (escaped := signal_escaped(escaped, 0)):
                await anyio.sleep(0.02)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # the backend is gone; so must be what it left in its group


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One TLS context for every HTTP backend: loading the CA bundle costs ~20 ms and ~1 MB each time."""
    return httpx2.create_ssl_context()


class _DrainedOnClose(httpx2.AsyncByteStream):
    """A response body that, closed before its end, first reads to it (briefly) so its connection goes back to the pool.

    The SDK closes an SSE answer as soon as the answer's event is in, though the
    backend ends the stream right after: closing first would cost a new TCP
    connection for every call. The answer has reached the caller by then.
    """

    def __init__(self, stream: httpx2.AsyncByteStream) -> None:
        self._stream = stream
        self._chunks: AsyncIterator[bytes] | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self._chunks = aiter(self._stream)
        async for chunk in self._chunks:
            yield chunk

    async def aclose(self) -> None:
        try:
            if self._chunks is not None:
                with anyio.move_on_after(SSE_DRAIN_TIMEOUT), contextlib.suppress(httpx2.HTTPError):
                    async for _ in self._chunks:  # a backend that drops the connection now only costs the connection
                        pass
        finally:
            await self._stream.aclose()


async def _reuse_after_sse_answers(response: httpx2.Response) -> None:
    """Response hook of the HTTP clients to backends (any transport, proxies included)."""
    if response.request.method == "POST" and response.headers.get("content-type", "").startswith("text/event-stream"):
        assert isinstance(response.stream, httpx2.AsyncByteStream)
        response.stream = _DrainedOnClose(response.stream)


INCONCLUSIVE_STATUSES: Final = frozenset({401, 403, 408, 429})
"""HTTP answers to the era probe that say nothing of the era (with every 5xx): the SDK would take them as a refusal,
so as the handshake era."""


def _is_discover(request: httpx2.Request) -> bool:
    with contextlib.suppress(httpx2.RequestNotRead, ValueError, AttributeError):
        return json.loads(request.content).get("method") == "server/discover"
    return False


def _era_probe_verdicts() -> Callable[[httpx2.Response], Awaitable[None]]:
    """Response hook of one connection: an auth failure or a server error answering its first server/discover (the
    era probe) fails the connection attempt (EraUnknown), where the SDK would take it for the handshake era. Later
    ones (2026-era health checks) fail as any request does."""
    probing = True

    async def verdict(response: httpx2.Response) -> None:
        nonlocal probing
        if not probing or response.request.method != "POST" or not _is_discover(response.request):
            return
        probing = False
        status = response.status_code
        if status >= 500 or status in INCONCLUSIVE_STATUSES:
            await response.aclose()
            raise EraUnknown(
                f"the backend answered server/discover with HTTP {status} {response.reason_phrase}".strip()
            )

    return verdict


async def _name_error_statuses(response: httpx2.Response) -> None:
    """Response hook: an HTTP error answer that carries no JSON-RPC error gets one naming its status.

    The SDK reports any such answer as "Server returned an error response"; 404
    is left alone, as the SDK reads it (a lost session, which the router handles).
    """
    if response.request.method != "POST" or response.status_code < 400 or response.status_code == 404:
        return
    assert isinstance(response.stream, httpx2.AsyncByteStream)
    body = b""
    if response.headers.get("content-type", "").startswith("application/json"):
        body = b"".join([chunk async for chunk in response.stream])
        with contextlib.suppress(ValueError):
            if isinstance(types.jsonrpc_message_adapter.validate_json(body, by_name=False), types.JSONRPCError):
                response.stream = httpx2.ByteStream(body)  # the backend's own error says more than its status
                return
    await response.stream.aclose()
    text = f"the backend answered HTTP {response.status_code} {response.reason_phrase}".strip()
    body = json.dumps(_error_answer(None, INTERNAL_ERROR, text)).encode()
    for header in ("content-encoding", "transfer-encoding"):
        response.headers.pop(header, None)
    response.headers["content-type"] = "application/json"
    response.headers["content-length"] = str(len(body))
    response.stream = httpx2.ByteStream(body)


class _SseMessages(httpx2.AsyncClient):
    """The HTTP client under a legacy SSE connection: a POST of a message that fails is answered in the SDK's stead.

    The SDK's sse_client raises on a failed POST, which ends its writer and leaves
    the call waiting out its whole timeout. Here the call fails at once, and the
    SDK sees a 202 and writes on: an error status is named (`HTTP 500`), as
    streamable HTTP backends' are, and the connection serves on; a 404 is a lost
    session, which Backend.request reconnects (nothing ran, so the call goes
    again); a reset connection fails the call with CONNECTION_CLOSED (it may have
    run) and ends the connection, so the backend reconnects.
    """

    def __init__(self, failed: Callable[[SessionMessage | None], None], **kwargs: Any) -> None:
        super().__init__(verify=_tls_context(), **kwargs)
        self._failed = failed

    async def send(self, request: httpx2.Request, **kwargs: Any) -> httpx2.Response:
        if request.method != "POST":
            return await super().send(request, **kwargs)
        try:
            response = await super().send(request, **kwargs)
        except httpx2.TransportError as err:
            reset = isinstance(err, httpx2.ReadError | httpx2.WriteError | httpx2.RemoteProtocolError)
            text = "connection reset while sending to the backend" if reset else describe_error(err)
            self._failed(self._answer(request, CONNECTION_CLOSED, text))
            self._failed(None)
        else:
            if response.is_success:
                return response
            await response.aclose()
            if response.status_code == 404:  # the server forgot our session (request() reconnects on these words)
                answer = self._answer(request, INVALID_REQUEST, "Session not found")
            else:
                text = f"the backend answered HTTP {response.status_code} {response.reason_phrase}".strip()
                answer = self._answer(request, INTERNAL_ERROR, text)
            self._failed(answer)
            if answer is None:  # a notification or an answer was lost, and nobody waits to hear it: start afresh
                self._failed(None)
        return httpx2.Response(202, request=request)

    @staticmethod
    def _answer(request: httpx2.Request, code: int, text: str) -> SessionMessage | None:
        """The error answer to the request `request` carried; None if it carried none (a notification, an answer)."""
        with contextlib.suppress(ValueError, RecursionError):
            message = json.loads(request.content)
            if isinstance(message, dict) and "method" in message and isinstance(message.get("id"), str | int):
                error = types.ErrorData(code=code, message=text)
                return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=message["id"], error=error))
        return None


@asynccontextmanager
async def sse_connection(config: BackendConfig) -> AsyncIterator[Streams]:
    """A legacy SSE backend's connection: the SDK's sse_client, whose failed POSTs fail their calls at once."""
    inbox, read = anyio.create_memory_object_stream[SessionMessage | Exception](math.inf)

    def failed(answer: SessionMessage | None) -> None:
        """Give the dispatcher an error answer; None ends the connection (after what it has been given)."""
        if answer is None:
            inbox.close()
        else:
            with contextlib.suppress(anyio.ClosedResourceError):
                inbox.send_nowait(answer)

    def client(
        headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None
    ) -> httpx2.AsyncClient:
        return _SseMessages(failed, headers=headers, timeout=timeout, auth=auth)

    async def relay(messages: Any) -> None:
        with inbox:
            async for message in messages:
                try:
                    await inbox.send(message)
                except anyio.ClosedResourceError:
                    return

    with inbox, read:  # closed here too if connecting fails
        async with (
            sse_client(config.url or "", headers=dict(config.headers) or None, httpx_client_factory=client) as (
                messages,
                write,
            ),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(relay, messages)
            yield read, write
            tg.cancel_scope.cancel()


class DirectPosts:
    """2026-era requests to a streamable HTTP backend, each sent as one POST on the connection's HTTP client and
    answered from that POST's body, past the SDK's client transport (a task group, a task, memory streams and a
    validation of every answer: about a third of the router's time per call).

    Only a request that wants nothing but its answer comes here (no progress, no log level): its answer is the
    body (JSON), or the stream's event that answers it (SSE). The 2026 era has no session and no back-channel,
    so nothing else travels on the POST; a cancelled request closes its stream, which is that era's cancellation.
    Failures read as the SDK's do: a JSON-RPC error in the body (the response hooks give bare HTTP error statuses
    one), a timeout, an unreachable backend (NotSent), an invalid answer.
    """

    HEADERS: Final = {"accept": "application/json, text/event-stream", "content-type": "application/json"}

    def __init__(self, client: httpx2.AsyncClient, url: str, backend: str) -> None:
        self.client, self.url, self.backend = client, url, backend
        self._ids = itertools.count(1)

    async def request(self, method: str, params: Mapping[str, Any] | None, opts: Mapping[str, Any]) -> dict[str, Any]:
        request_id = next(self._ids)
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params:
            message["params"] = params
        headers = {**self.HEADERS, **opts.get("headers", {})}
        with anyio.move_on_after(opts["timeout"]) as waited:
            try:
                async with self.client.stream("POST", self.url, content=_to_json(message), headers=headers) as response:
                    answer = await self._answer(response)
            except (httpx2.ConnectError, httpx2.ConnectTimeout) as err:
                raise NotSent(f"cannot reach the backend: {describe_error(err)}") from None
            except httpx2.SSEError:
                raise MCPError(INTERNAL_ERROR, f"the backend's answer is over {MAX_ANSWER_BYTES} bytes") from None
            except (httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError) as err:
                raise PostBroken(describe_error(err)) from None
        if waited.cancelled_caught:
            raise MCPError(REQUEST_TIMEOUT, f"Request {method!r} timed out")
        return _result_of(answer, request_id, self.backend)

    async def _answer(self, response: httpx2.Response) -> Any:
        """The would-be JSON-RPC answer a response carries; MCPError for an HTTP answer that carries none."""
        status, content_type = response.status_code, response.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            answer = _parsed(await _bounded_read(response.aiter_bytes()))
            if status < 400 or (isinstance(answer, dict) and "error" in answer):
                return answer
        if status == 404:  # no session to have lost in this era: the method or the endpoint is not there
            raise MCPError(METHOD_NOT_FOUND, "Not Found")
        if status >= 300 or status == 202:
            raise MCPError(INVALID_REQUEST, f"the backend answered HTTP {status} {response.reason_phrase}".strip())
        if not content_type.startswith("text/event-stream"):
            raise MCPError(INVALID_REQUEST, f"the backend answered with content type {content_type!r}")
        async for event in httpx2.EventSource(response, max_event_size=MAX_ANSWER_BYTES):
            if event.event == "message" and event.data:  # not a ping, nor a resumption point's empty event
                message = _parsed(event.data.encode())
                if not (isinstance(message, dict) and "method" in message):  # the answer, not a notification
                    return message
        raise PostBroken("the backend ended the answer's stream before answering")


class PostBroken(MCPError):
    """A backend's POST whose connection broke before its answer was in: reads as the SDK reads a lost connection
    (so the breaker is fed once, for the connection, not for each call it cut)."""

    def __init__(self, detail: str) -> None:
        super().__init__(CONNECTION_CLOSED, "Connection closed")
        self.detail = detail


def _result_of(answer: Any, request_id: int, backend: str) -> dict[str, Any]:
    """The result of a would-be answer to request `request_id`; MCPError with its error, or for an invalid one."""
    if isinstance(answer, dict) and "method" not in answer:
        answered = answer.get("id")
        ours = (
            isinstance(answered, int | str)
            and not isinstance(answered, bool)
            and coerce_request_id(answered) == request_id  # "7" answers 7, as the SDK reads it
        )
        if ours and isinstance(result := answer.get("result"), dict):
            return result
        error = answer.get("error")
        if (ours or answered is None) and isinstance(error, dict):  # None: the backend could not read our id
            code, message = error.get("code"), error.get("message")
            if isinstance(code, int) and isinstance(message, str):
                raise MCPError(code, message, error.get("data"))
    problem = _answer_problem(answer)
    if problem == "not a valid JSON-RPC answer" and isinstance(answer, dict) and answer.get("id") != request_id:
        problem = "an answer to another request"
    raise MCPError(INTERNAL_ERROR, f"backend {backend!r} sent an invalid answer: {problem}")


MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
"""The largest answer read from an HTTP backend (past the multi-MB payloads tools pass)."""


async def _bounded_read(chunks: AsyncIterator[bytes]) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise MCPError(INTERNAL_ERROR, f"the backend's answer is over {MAX_ANSWER_BYTES} bytes")
    return bytes(body)


def _parsed(text: bytes) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class HttpStreams(tuple[Any, Any]):
    """A streamable HTTP connection's (read, write) streams, with DirectPosts on its HTTP client."""

    posts: DirectPosts

    def __new__(cls, streams: Streams, posts: DirectPosts) -> HttpStreams:
        connection = super().__new__(cls, streams)
        connection.posts = posts
        return connection


BACKEND_POOL: Final = httpx2.Limits(max_connections=100, max_keepalive_connections=100, keepalive_expiry=2.0)
"""Connections to one HTTP backend: as many kept as may be open (httpx keeps 20, so 32 callers reconnect all the
time), each dropped after 2 s idle, before the 5 s after which uvicorn and most servers close one: a connection
the server closes just as a request reuses it fails that request."""


def _connector_for(config: BackendConfig, launched: subprocess.Popen[bytes] | None = None) -> Connector:
    """The transport context manager that opens a connection to `config`'s backend (the first to a stdio
    backend takes the process `launched` at start-up, if any)."""
    if config.transport == "stdio":

        def connect() -> AbstractAsyncContextManager[Streams]:
            nonlocal launched
            process, launched = launched or launch(config), None
            return stdio_connection(process, BackendStderr(config.name, config.secrets()))

        return connect
    if config.transport == "sse":
        return lambda: sse_connection(config)

    @asynccontextmanager
    async def http() -> AsyncIterator[Streams]:
        timeout = httpx2.Timeout(30.0, read=300.0)
        hooks = {"response": [_era_probe_verdicts(), _reuse_after_sse_answers, _name_error_statuses]}
        async with (
            httpx2.AsyncClient(
                headers=dict(config.headers),
                timeout=timeout,
                verify=_tls_context(),
                event_hooks=hooks,
                limits=BACKEND_POOL,
            ) as client,
            streamable_http_client(config.url or "", http_client=client) as streams,
        ):
            yield HttpStreams(streams, DirectPosts(client, config.url or "", config.name))

    return _http_or_sse(config, http) if config.fallback_to_sse else http


def _http_or_sse(config: BackendConfig, http: Connector) -> Connector:
    """For a URL whose transport is not declared: streamable HTTP, or the legacy SSE transport if the URL is an SSE
    stream whose first event is `endpoint` (the spec's backwards-compatibility test). Decided at the first
    connection that gets an answer, and logged."""
    chosen: Connector | None = None

    @asynccontextmanager
    async def connect() -> AsyncIterator[Streams]:
        nonlocal chosen
        connector = chosen
        if connector is None:
            legacy = await _serves_legacy_sse(config)
            if legacy:
                log.info("backend %s: the URL is a legacy SSE endpoint; using the SSE transport", config.name)
                if config.forward_headers:
                    log.warning("backend %s: the SSE transport cannot carry a call's own headers; forward_headers "
                                "is ignored for it", config.name)  # fmt: skip
                connector = chosen = lambda: sse_connection(config)
            else:
                connector = http
                if legacy is not None:
                    log.info("backend %s: using streamable HTTP", config.name)
                    chosen = http
        async with connector() as streams:
            yield streams

    return connect


async def _serves_legacy_sse(config: BackendConfig) -> bool | None:
    """Whether a GET of the URL opens an SSE stream whose first event is `endpoint`, as only legacy SSE servers
    send; None if the server errs (5xx) and cannot tell yet. A GET, unlike the spec's initialize POST, opens no
    session on a streamable HTTP server (which answers it with 400 or 405, or a stream without that event)."""
    headers = {**config.headers, "accept": "text/event-stream"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0), verify=_tls_context()) as client,
        client.stream("GET", config.url or "") as response,
    ):
        if response.status_code >= 500:
            return None
        if response.status_code != 200 or not response.headers.get("content-type", "").startswith("text/event-stream"):
            return False
        start = b""
        with anyio.move_on_after(5):
            async for chunk in response.aiter_bytes():
                start += chunk
                if b"\n\n" in start.replace(b"\r\n", b"\n") or len(start) > 4096:
                    break
        return start.replace(b"\r\n", b"\n").lstrip().startswith(b"event: endpoint")


def _note_cache_hint(hints: list[tuple[str, int, str]], method: str, page: Mapping[str, Any]) -> None:
    """Keep a list page's cache hint, if it has a valid one; over several pages, the shortest and most private."""
    ttl, scope = page.get("ttlMs"), page.get("cacheScope")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or scope not in ("public", "private"):
        return
    for i, (m, old_ttl, old_scope) in enumerate(hints):
        if m == method:
            hints[i] = (m, min(ttl, old_ttl), "private" if "private" in (scope, old_scope) else "public")
            return
    hints.append((method, ttl, scope))


async def open_in_newest_era(session: ClientSession) -> types.InitializeResult | types.DiscoverResult:
    """Classify a backend as the spec's version negotiation says, and open the session in its newest era.

    The SDK's own policy (mcp.client._probe): `server/discover` first; any protocol-level refusal means the
    handshake era, and `initialize` follows. A transport failure (refused, auth, 5xx) is no verdict: it fails
    this connection attempt, and the next attempt probes again. Nothing that may have run is ever re-sent.
    """
    await negotiate_auto(session)
    result = session.discover_result or session.initialize_result
    if result is None:  # pragma: no cover - negotiate_auto sets one or raises
        raise RouterError("the backend answered neither server/discover nor initialize")
    return result


Stamp: TypeAlias = Callable[
    [str, Mapping[str, Any] | None, dict[str, Any], str | None, Mapping[str, Any]], Mapping[str, Any]
]
"""(method, params, call options, log level, client capabilities) -> the params to send, with the options' headers
set."""
RELAYED_CAPABILITIES: Final = frozenset({"sampling", "elicitation", "roots"})
"""The client capabilities the router can carry for a backend: the requests it relays to the client behind a call
(as server requests or input_required rounds). Extensions and experimental ones it cannot, so backends never hear
of them."""


def modern_stamp(session: ClientSession) -> Stamp | None:
    """For a session opened in the 2026 era, what makes a raw request one of that era, else None.

    The SDK's session stamp: the request `_meta` (protocol version, the router's client info) and, over HTTP,
    `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name`, the backend's own (un-prefixed) name, as the router sends
    the backend's own names. The capabilities are those of the client behind the request, as far as the router
    relays them; the router's own requests (re-listing, health, the listen stream) declare none, as the router
    alone can answer none. The log level is the one the request's client asked for (see Router.forward); without
    one the backend sends no log messages for the request, as the 2026 era has no
    logging/setLevel.
    """
    if session.discover_result is None:
        return None
    sdk_stamp = session._stamp  # the SDK keeps it private; Backend.request sends raw requests, past its send_request

    def own_stamp(data: dict[str, Any], opts: Any) -> None:
        sdk_stamp(data, opts)
        data["params"]["_meta"][types.CLIENT_CAPABILITIES_META_KEY] = {}

    session._stamp = own_stamp  # what the SDK sends itself (subscriptions/listen) is the router's own request

    def stamp(
        method: str,
        params: Mapping[str, Any] | None,
        opts: dict[str, Any],
        log_level: str | None,
        capabilities: Mapping[str, Any],
    ) -> Mapping[str, Any]:
        own = dict(params or {})
        if isinstance(meta := own.get("_meta"), Mapping):
            own["_meta"] = dict(meta)  # the stamp writes into it; the caller's stays as it was
        if log_level is not None:
            own["_meta"] = {**own.get("_meta", {}), types.LOG_LEVEL_META_KEY: log_level}
        data = {"method": method, "params": own}
        opts["headers"] = dict(opts.get("headers") or {})  # per request: Mcp-Name differs from call to call
        sdk_stamp(data, cast(Any, opts))
        own["_meta"][types.CLIENT_CAPABILITIES_META_KEY] = capabilities
        return own

    return stamp


NO_BACK_CHANNEL: Final = "no back-channel for server-initiated requests"
"""The SDK's words (NoBackChannelError) when a 2.x server's tool asks the client through its session in 2026-07-28."""


class ChangeStream:
    """The `subscriptions/listen` stream of a 2026-era backend, the only way that era tells of changes: its list
    changes re-list it, and updates of the resources clients follow on it go to them.

    The era has no resources/subscribe: following a resource re-opens the stream with the new set of URIs, the new
    stream acknowledged before the old one closes, so no change falls between them; a backend that refuses the new
    one keeps the old, and the follow that asked for it fails. The set outlives connections.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.uris: dict[str, int] = {}
        """The resources followed, each with the change (of `_wanted`) that added it."""
        self._wanted = 0
        """Counts changes of `uris`; a stream opened at count n carries the set as it was then."""
        self._opened = math.inf
        """The count of the set the open stream carries (math.inf: none is opening, as none runs: the next `run`
        opens one with the whole set)."""
        self._tried = math.inf
        """The count of the set last asked for: the open stream's, or one the backend refused (`_refusal` says why)."""
        self._refusal = ""
        self._asked = anyio.Event()
        self._heard = anyio.Event()
        self._lost = False
        """The open stream ended by itself (the backend closed it, or a proxy cut it) while the connection lasts."""

    async def follow(self, uri: str, *, on: bool, timeout: float) -> None:
        """Add (or drop) a resource; returns once a stream carries it (or no longer needs to), or after `timeout`, or
        at once while no stream runs. Raises MCPError when the backend refused a stream with an added resource: the
        old one goes on (a dropped one it may still carry, harmlessly, until the next change)."""
        if not on and uri not in self.uris:
            return
        if on != (uri in self.uris):
            self._wanted += 1
            self._asked.set()
            if on:
                self.uris[uri] = self._wanted
            else:
                del self.uris[uri]
        wanted = self.uris.get(uri, self._wanted)  # a resource followed already: the change that added it
        with anyio.move_on_after(timeout):
            while self._tried < wanted:
                await self._heard.wait()
        if on and self._opened < wanted <= self._tried:  # refused: the old stream goes on, without it
            if self.uris.get(uri) == wanted:
                del self.uris[uri]
            raise MCPError(INTERNAL_ERROR, f"backend {self.backend.name!r} could not follow {uri!r}: {self._refusal}")

    async def run(self, session: ClientSession, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Hold the stream open while the connection lasts, re-opened whenever the set of resources changes; started
        once the first stream is acknowledged (or refused)."""
        self._opened = self._tried = -1.0
        try:
            async with anyio.create_task_group() as tg:
                old: anyio.CancelScope | None = None
                while True:
                    self._asked = anyio.Event()
                    wanted, uris = self._wanted, tuple(self.uris)
                    opened = await tg.start(self._listen, session, uris, old is None or self._lost)
                    if old is None:
                        task_status.started()  # the first stream: the connection goes on to list the backend
                        if not isinstance(opened, anyio.CancelScope):  # calls and re-listing go on without it
                            return
                    if isinstance(opened, anyio.CancelScope):
                        if old is not None:
                            old.cancel()
                        old = opened
                        self._settle(wanted, opened=True)
                        if self._lost:  # what changed between the streams went unheard
                            self._lost = False
                            tg.start_soon(self.backend.refresh)
                    else:
                        self._refusal = opened
                        self._settle(wanted, opened=False)
                    await self._asked.wait()
        finally:
            self._opened = self._tried = math.inf  # nobody waits for a stream that will not come
            self._wake()

    def _settle(self, wanted: float, *, opened: bool) -> None:
        self._tried = wanted
        if opened:
            self._opened = wanted
        self._wake()

    def _wake(self) -> None:
        self._heard.set()
        self._heard = anyio.Event()

    async def _listen(
        self, session: ClientSession, uris: Sequence[str], first: bool, *, task_status: anyio.abc.TaskStatus[Any]
    ) -> None:
        """One stream: started (with its cancel scope) once acknowledged, or (with the reason) when refused; one that
        ends by itself while the connection lasts (the backend closed it, a proxy cut it) asks for another."""
        started, reason = False, ""
        ended: str | None = None
        with anyio.CancelScope() as scope:
            try:
                async with listen(
                    session, tools_list_changed=True, prompts_list_changed=True, resources_list_changed=True,
                    resource_subscriptions=uris,
                ) as events:  # fmt: skip
                    task_status.started(scope)
                    started = True
                    async for event in events:
                        if isinstance(event, ResourceUpdated):
                            await self.backend.router.resource_updated(event.uri)
                        else:
                            await self.backend.refresh()
                ended = "closed by the backend"
            except (MCPError, SubscriptionLost, ListenNotSupportedError, TimeoutError) as err:
                reason = describe_error(err)
                if started:
                    ended = reason
                elif first:
                    log.info(
                        "backend %s: no change stream (%s); re-listed on its interval (one that announces changes "
                        "through its session needs `era: handshake`)",
                        self.backend.name,
                        reason,
                    )
                else:
                    log.warning(
                        "backend %s: refused to re-open its change stream for %d resources (%s); the old one goes on",
                        self.backend.name,
                        len(uris),
                        reason,
                    )
        if not started:
            task_status.started(reason)
        elif ended is not None:  # not ended by the router: open another, unhurried if the backend keeps ending them
            log.info("backend %s: its change stream ended (%s); opening another", self.backend.name, ended)
            await self.backend.clock.sleep(RESTART_INITIAL_DELAY)
            self._lost = True
            self._asked.set()


class Backend:
    """One backend: its connection, supervisor, breaker and health.

    `run()` is the supervisor: it connects, lists, serves until the connection
    ends, and reconnects with backoff, forever, in its own task so a backend's
    failure never reaches another's. Its lifecycle moves only through `_move`,
    by the LIFECYCLE table.
    """

    def __init__(self, config: BackendConfig, router: Router, connector: Connector | None = None) -> None:
        self.config = config
        self.name = config.name
        self.router = router
        self.settings = router.settings
        self.clock = router.clock
        self.connector = connector or _connector_for(config)
        cb = config.circuit_breaker
        self.breaker = CircuitBreaker(
            config.name, cb.failure_threshold, cb.timeout_seconds, cb.half_open_attempts, self.clock.now
        )
        self.timeout = config.timeout or router.settings.request_timeout
        self.era: BackendEra = config.era or router.backend_eras
        self.state: LifecycleState = "starting" if config.enabled else "disabled"
        self.session: ClientSession | None = None
        self.dispatcher: _WatchedDispatcher | None = None
        self.listing = Listing()
        self.offered: dict[str, frozenset[str]] = {"tool": frozenset(), "prompt": frozenset(), "resource": frozenset()}
        """The listing's own names (and resource URIs) by kind, for routing decisions."""
        self.templates: tuple[UriTemplate, ...] = ()
        """The listing's resource templates, compiled."""
        self.health = HealthRecord()
        self.stats = RouteStats()
        self.last_error: str | None = None
        self.failed_attempts = 0
        """Connection attempts that failed in a row."""
        self.restarts = 0
        self.connected_at: float | None = None
        self.next_attempt_at: float | None = None
        self.first_attempt_done = anyio.Event()
        self.inflight: dict[object, Any] = {}
        """Request contexts of the client calls now running on this backend, oldest first."""
        self.secrets = config.secrets()
        self._headers: dict[str, str] = {}
        self._stamp: Stamp | None = None
        """For a backend spoken to in the 2026 era: adds the `_meta` envelope and mirrored headers to each request."""
        self._posts: DirectPosts | None = None
        """For a streamable HTTP backend spoken to in the 2026 era: sends the requests that want only their answer."""
        self._relayed_for: tuple[Any, Mapping[str, Any]] = (None, {})
        self.changes = ChangeStream(self)
        self._told_era = False
        """Whether the log said once that this backend needs the handshake era."""
        self._stop_scope: anyio.CancelScope | None = None
        self._connection_scope: anyio.CancelScope | None = None
        self._booked_delay: float | None = None
        self._log_budget = TokenBucket(LOG_MESSAGES_PER_SECOND, LOG_MESSAGES_PER_SECOND)
        self.logs_at: str | None = None
        """The level this connection was set to (logging/setLevel, handshake era), None if it was not."""
        self._refreshing = anyio.Lock()
        self._health_probe = "ping"
        """The request of this connection's health checks: ping; server/discover in the 2026 era, which has no ping;
        a one-page tools/list where ping is not served."""

    # -- supervision

    async def run(self) -> None:
        """Connect, serve, and after each end connect again with backoff; nothing but cancellation leaves this loop."""
        with anyio.CancelScope() as self._stop_scope:
            started = False
            while True:
                self.restarts += started
                started = True
                self.connected_at = self._booked_delay = None
                self._connection_scope = connection = anyio.CancelScope()
                try:
                    with connection:
                        await self._connect_and_serve()
                    failure = "connection closed"
                except Exception as exc:  # noqa: BLE001 - any failure of one backend is contained here
                    failure = describe_error(exc)
                try:
                    if connection.cancel_called:  # restart(): the lifecycle has moved already
                        continue
                    delay = self._booked_delay if self._booked_delay is not None else self._book_end(failure)
                except Exception as exc:  # noqa: BLE001 - a router bug must not end the supervisor
                    log.error("backend %s: supervisor error: %s", self.name, describe_error(exc))
                    delay = self.settings.max_backoff
                self.next_attempt_at = self.clock.now() + delay
                with anyio.CancelScope() as self._connection_scope:  # restart() cuts the wait short
                    await self.clock.sleep(delay)
                self.next_attempt_at = None

    def _book_end(self, failure: str) -> float:
        """Book a connection that ended or an attempt that failed, at once (calls stop going to it); returns the
        seconds until the next attempt."""
        error = redact(failure, self.secrets)
        lost = self.state == "ready"
        stable = (
            lost and self.connected_at is not None and self.clock.now() - self.connected_at > self.settings.max_backoff
        )
        self.failed_attempts = 0 if lost else self.failed_attempts + 1
        self._disconnect("lost" if lost else "failed", error)
        self._feed_breaker(error)  # once per connection, however many calls were in flight on it
        attempt = 1 if stable else max(1, self.failed_attempts)
        if lost:
            log.warning("backend %s: connection lost: %s; reconnecting", self.name, error)
        elif (
            self.failed_attempts & (self.failed_attempts - 1) == 0 or error != self.last_error
        ):  # 1, 2, 4, 8... or news
            log.warning("backend %s: cannot connect (attempt %d): %s; retrying", self.name, self.failed_attempts, error)
        self.last_error = error
        self._booked_delay = self.settings.backoff(attempt, RESTART_INITIAL_DELAY, self.clock.random)
        return self._booked_delay

    def stop(self) -> None:
        if self._stop_scope is not None:
            self._stop_scope.cancel()
        self._disconnect("stop")

    def restart(self, reason: str = "restarted on request") -> None:
        """Drop the connection (or cut the backoff short) and connect again at once; calls wait for it meanwhile."""
        if self._connection_scope is not None and self.state not in ("stopped", "disabled"):
            log.info("backend %s: %s", self.name, reason)
            self.failed_attempts = 0
            self._disconnect("restart")
            self._connection_scope.cancel()

    def _move(self, event: LifecycleEvent) -> None:
        self.state = next_state(self.state, event)
        self.router.backend_changed()

    def _disconnect(self, event: LifecycleEvent, error: str | None = None) -> None:
        """Stop taking calls on this connection at once; the lifecycle says whether new ones wait or fail."""
        self.session = self.dispatcher = self._posts = None
        if error is not None:
            self.last_error = error
        self._move(event)
        if event != "restart":
            self.first_attempt_done.set()

    def _sheds(self, line: bytes) -> bool:
        """A log message line that no client takes, or past this backend's log budget: dropped before the SDK
        parses it (about 0.3 ms each), so a backend flooding logs cannot starve everyone's calls."""
        if b"notifications/message" not in line[:256]:
            return False
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return False
        if not (isinstance(message, dict) and message.get("method") == "notifications/message" and "id" not in message):
            return False
        params = message.get("params")
        if not self.takes_log(params.get("level") if isinstance(params, dict) else None):
            return True  # as Router.forward_log would: nobody asked for this level
        if self._log_budget.take(self.clock.now()):
            return False
        self.router.clients.dropped += 1
        return True

    @property
    def follows_on_stream(self) -> bool:
        """Whether this backend (its last connection) is in the 2026 era, which follows resources on its change
        stream (ChangeStream) instead of resources/subscribe."""
        return self._stamp is not None

    def unavailable_reason(self) -> str:
        state = "failing to connect" if self.state == "failing" else self.state
        return f"backend {self.name!r} is {state}" + (f" ({self.last_error})" if self.last_error else "")

    def snapshot(self, kind: str, name: str) -> Candidate:
        """This backend as a routing decision sees it, for a request for `name` (its own name of a tool or prompt,
        or a resource URI, which the catalogue already matched). On every call's path: computed once, and cheaply."""
        b = self.breaker
        breaker = b.state
        admits = b.admits(breaker)
        offers = name in self.offered[kind] or (
            kind == "resource" and any(t.match(name) is not None for t in self.templates)
        )
        if self.state != "ready":
            reason = self.unavailable_reason()
        elif not admits:
            reason = (
                b.open_error()
                if breaker == "open"
                else f"backend {self.name!r}: circuit half-open, its trial call is under way"
            )
        else:
            reason = ""
        return Candidate(
            name=self.name,
            priority=self.config.priority,
            state=self.state,
            breaker=breaker,
            admits=admits,
            in_flight=len(self.inflight),
            offers=offers,
            latency_ms=self.stats.recent_ms,
            reason=reason,
        )

    async def _connect_and_serve(self) -> None:
        # npx/uvx may download first: connecting and the handshake get the backend's own timeout, else a generous one.
        limit = self.config.timeout or max(self.timeout, HANDSHAKE_TIMEOUT)
        with anyio.CancelScope(deadline=anyio.current_time() + limit) as handshake:
            await self._connect(handshake)
        if handshake.cancelled_caught:
            raise RouterError(f"no answer to connecting and initialize within {limit:g}s")

    async def _connect(self, handshake: anyio.CancelScope) -> None:
        """Connect, shake hands (under `handshake`'s deadline), list, and serve until the connection ends."""
        async with AsyncExitStack() as stack:
            connected = await stack.enter_async_context(self.connector())
            read, write = connected
            if isinstance(read, LineReader):
                read.skip = self._sheds
            dispatcher = _WatchedDispatcher(self.name, read, write)
            session = ClientSession(
                dispatcher=dispatcher,
                read_timeout_seconds=self.timeout,
                message_handler=self._on_message,
                logging_callback=functools.partial(self.router.forward_log, self),
                # Advertised always, so backends show every tool; a client lacking one gets a clear error.
                sampling_callback=self._on_sampling,
                elicitation_callback=self._on_elicitation,
                list_roots_callback=self._on_list_roots,
                client_info=types.Implementation(name="mcp-router", version=__version__),
            )
            await stack.enter_async_context(session)
            try:
                init = await open_in_newest_era(session) if self.era == "auto" else await session.initialize()
            except (MCPError, NotSent) as err:
                if isinstance(err, MCPError) and err.code != CONNECTION_CLOSED:
                    raise
                hint = (
                    " (did the command exit? its stderr is in the router's log)"
                    if self.config.transport == "stdio"
                    else ""
                )
                raise RouterError(f"connection closed during the MCP handshake{hint}") from None
            handshake.deadline = math.inf
            if self.era == "auto" and session.discover_result is None and not self.restarts:
                log.info("backend %s: the handshake era: it refused server/discover (1.x servers log a validation "
                         "error for it, which is harmless; `era: handshake` asks no more)", self.name)  # fmt: skip
            # 2026 era: the stamp sets the version header with the others, and each request's log level
            self._stamp = modern_stamp(session)
            self._posts = connected.posts if isinstance(connected, HttpStreams) and self._stamp is not None else None
            self._health_probe = "server/discover" if self._stamp is not None else "ping"
            if self.config.transport != "stdio" and self._stamp is None:
                self._headers = {"mcp-protocol-version": init.protocol_version}  # type: ignore[union-attr]
            self.session, self.dispatcher = session, dispatcher
            self.logs_at = None
            await self.follow_log_level()
            if self._stamp is not None:  # a 2026-era backend tells of changes only on a stream: open before listing
                streams = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(streams.cancel_scope.cancel)  # runs first: the stream ends with the connection
                await streams.start(self.changes.run, session)
            listing = await self._fetch_listing(init.instructions)
            self.connected_at = self.clock.now()
            self.last_error = None
            self.failed_attempts = 0
            if self.breaker.reconnected() == "half_open":
                log.info("backend %s: circuit half-open: the next call is its trial", self.name)
            log.info(
                "backend %s: ready (%d tools, %d resources, %d prompts)",
                self.name,
                len(listing.tools),
                len(listing.resources) + len(listing.templates),  # counted as list_backends counts them
                len(listing.prompts),
            )
            self.router.set_listing(self, listing)
            self._move("connected")
            self.first_attempt_done.set()
            await self.router.resubscribe(self)
            async with anyio.create_task_group() as tg:
                if self.config.health_check.enabled:
                    tg.start_soon(self._every, self.config.health_check.interval_seconds, self.check_health)
                tg.start_soon(self._refresh_when_stale)
                await dispatcher.ended.wait()
                self._book_end("connection closed")
                tg.cancel_scope.cancel()

    async def _fetch_all(self, method: str, key: str, hints: list[tuple[str, int, str]] | None = None) -> list[Any]:
        """Every item of a paginated list, following cursors to the end (items unchecked: see _valid); the pages'
        cache hints go to `hints`."""
        items: list[Any] = []
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            try:
                result = await self.request(method, {"cursor": cursor} if cursor else None, self.timeout, guarded=False)
            except MCPError as err:
                if err.code == METHOD_NOT_FOUND:  # advertised the capability, serves only part of it
                    return items
                raise
            page = result.get(key) or []
            if not isinstance(page, list):
                log.warning("backend %s: ignoring its %s: %s is not a list", self.name, method, key)
                return items
            items.extend(page)
            if hints is not None:
                _note_cache_hint(hints, method, result)
            cursor = result.get("nextCursor")
            if not cursor or not isinstance(cursor, str) or cursor in seen:
                return items
            seen.add(cursor)

    async def _fetch_listing(self, instructions: str | None = None) -> Listing:
        session = self.session
        assert session is not None
        caps = session.server_capabilities or types.ServerCapabilities()
        hints: list[tuple[str, int, str]] = []
        tools = await self._fetch_all("tools/list", "tools", hints) if caps.tools else []
        resources = await self._fetch_all("resources/list", "resources", hints) if caps.resources else []
        templates = (
            await self._fetch_all("resources/templates/list", "resourceTemplates", hints) if caps.resources else []
        )
        prompts = await self._fetch_all("prompts/list", "prompts", hints) if caps.prompts else []
        kept = filter_tools(self._valid(tools, types.Tool), self.config.include, self.config.exclude)
        return Listing(
            cache_hints=tuple(hints),
            tools=self._mirrored_arguments(session, kept) if session.discover_result is not None else kept,
            resources=self._valid(resources, types.Resource),
            templates=self._valid(templates, types.ResourceTemplate),
            prompts=self._valid(prompts, types.Prompt),
            instructions=instructions if instructions is not None else self.listing.instructions,
        )

    def _valid(self, items: Iterable[Any], model: type[pydantic.BaseModel]) -> tuple[dict[str, Any], ...]:
        """The items that are valid MCP, checked once here so that no client call re-checks them; the others are
        skipped, with one warning that names each by its place in the list."""
        kept, problems = [], []
        for i, item in enumerate(items):
            try:
                model.model_validate(item)
            except pydantic.ValidationError as err:
                first = err.errors()[0]
                where = ".".join(map(str, first["loc"]))
                name = f" {item.get('name')!r}" if isinstance(item, dict) and isinstance(item.get("name"), str) else ""
                problems.append(f"#{i}{name} ({where + ': ' if where else ''}{first['msg']})")
                continue
            kept.append(item)
        if problems:
            log.warning(
                "backend %s: ignoring %d invalid %s items: %s",
                self.name,
                len(problems),
                model.__name__,
                "; ".join(problems),
            )
        return tuple(kept)

    def _mirrored_arguments(self, session: ClientSession, tools: tuple[dict[str, Any], ...]) -> tuple[Any, ...]:
        """2026 era: note which arguments of each tool a call mirrors into `Mcp-Param-*` headers (x-mcp-header), which
        the backend requires. The SDK's stamp adds them to each tools/call from the session's map, which its own
        list_tools fills; the router lists with raw requests, so it fills the map here. A tool whose annotations are
        invalid is skipped, with a warning, as the spec tells clients to."""
        maps: dict[str, dict[tuple[str, ...], str]] = {}
        kept, problems = [], []
        for tool in tools:
            if (reason := find_invalid_x_mcp_header(tool.get("inputSchema"))) is not None:
                problems.append(f"{tool['name']!r} ({reason})")
                continue
            if header_map := x_mcp_header_map(tool.get("inputSchema")):
                maps[tool["name"]] = header_map
            kept.append(tool)
        if problems:
            log.warning("backend %s: ignoring tools with an invalid x-mcp-header: %s", self.name, "; ".join(problems))
        session._x_mcp_header_maps = maps  # the SDK keeps it private (see modern_stamp)
        return tuple(kept)

    async def refresh(self) -> None:
        """Re-list this backend and publish the result if it changed; one re-listing at a time, so the newest wins."""
        async with self._refreshing:
            try:
                listing = await self._fetch_listing()
            except Exception as exc:  # noqa: BLE001
                log.warning("backend %s: re-listing failed: %s", self.name, redact(describe_error(exc), self.secrets))
                return
            self.router.set_listing(self, listing)

    async def _refresh_when_stale(self) -> None:
        """Re-list on the router's interval, or sooner where the backend's cache hints say its lists expire sooner."""
        while (seconds := refresh_interval(self.listing, self.settings.cache_ttl)) is not None:
            await self.clock.sleep(seconds)
            await self.refresh()

    async def _every(self, seconds: float, task: Callable[[], Awaitable[Any]]) -> None:
        while True:
            await self.clock.sleep(seconds)
            await task()

    async def _on_message(self, message: Any) -> None:
        if isinstance(
            message,
            types.ToolListChangedNotification
            | types.PromptListChangedNotification
            | types.ResourceListChangedNotification,
        ):
            await self.refresh()
        elif isinstance(message, types.ResourceUpdatedNotification):
            await self.router.resource_updated(str(message.params.uri))

    # -- log messages

    def log_request(self) -> RequestLog | None:
        """The 2026-era client request this backend's log messages belong to now: its only call in flight, if such
        a client made it. Otherwise they belong to no request (no call, several, or a handshake-era client's call):
        MCP does not say which call a message is for, as with sampling (see Router.ask_client)."""
        if len(self.inflight) != 1:
            return None
        key = next(iter(self.inflight))
        return key if isinstance(key, RequestLog) else None

    def takes_log(self, level: object) -> bool:
        """Does anybody take a log message of `level` from this backend now?"""
        request = self.log_request()
        return request.takes(level) if request is not None else self.router.clients.takes(level)

    async def follow_log_level(self) -> None:
        """Set a handshake-era backend that logs to the level its clients want (Router.backend_log_level), unless it
        is at that level already. A 2026-era backend gets each request's level with the request instead."""
        level = self.router.backend_log_level()
        session = self.session
        if level is None or level == self.logs_at or self._stamp is not None or session is None:
            return
        caps = session.server_capabilities
        if caps is None or caps.logging is None:
            return
        asked, self.logs_at = self.logs_at, level  # at once: concurrent followers do not ask twice
        try:
            await self.request("logging/setLevel", {"level": level}, min(self.timeout, 5.0), guarded=False)
        except Exception:  # noqa: BLE001 - a backend that could not set it is asked again the next time
            if self.logs_at == level and self.session is session:
                self.logs_at = asked

    # -- requests from the backend to the client behind the call that caused them

    async def _on_sampling(self, context: Any, params: types.CreateMessageRequestParams) -> Any:
        result_type = types.CreateMessageResultWithTools if params.tools else types.CreateMessageResult
        return await self.router.ask_client(self, "sampling", types.CreateMessageRequest(params=params), result_type)

    async def _on_elicitation(self, context: Any, params: Any) -> Any:
        return await self.router.ask_client(self, "elicitation", types.ElicitRequest(params=params), types.ElicitResult)

    async def _on_list_roots(self, context: Any) -> Any:
        return await self.router.ask_client(self, "roots", types.ListRootsRequest(), types.ListRootsResult)

    # -- health

    async def check_health(self) -> bool:
        """One health check: one request (see _health_probe), plus the optional HTTP endpoint."""
        check = self.config.health_check
        started = self.clock.now()
        try:
            with anyio.fail_after(check.timeout_seconds):
                try:
                    await self.request(self._health_probe, None, check.timeout_seconds, guarded=False)
                except MCPError as err:
                    if err.code != METHOD_NOT_FOUND or self._health_probe != "ping":
                        raise
                    self._health_probe = "tools/list"  # and no more pings on this connection
                    await self.request("tools/list", None, check.timeout_seconds, guarded=False)
                if check.endpoint and self.config.url:
                    await self._check_endpoint(check.endpoint, check.timeout_seconds)
        except Exception as exc:  # noqa: BLE001
            error = redact(
                "health check failed: "
                + (
                    describe_error(exc)
                    if not isinstance(exc, TimeoutError)
                    else f"no answer within {check.timeout_seconds}s"
                ),
                self.secrets,
            )
            self._record_health(ok=False, error=error, latency=self.clock.now() - started)
            self._feed_breaker(error)
            if self.health.consecutive_failures >= self.config.circuit_breaker.failure_threshold:
                self.restart(f"restarting after {self.health.consecutive_failures} failed health checks in a row")
            return False
        self._record_health(ok=True, error=None, latency=self.clock.now() - started)
        self._feed_breaker(None)
        return True

    async def _check_endpoint(self, endpoint: str, timeout: float) -> None:
        async with httpx2.AsyncClient(
            headers=dict(self.config.headers), timeout=timeout, verify=_tls_context()
        ) as client:
            response = await client.get(urljoin(self.config.url or "", endpoint))
        if response.status_code >= 400:
            raise RouterError(f"health endpoint answered HTTP {response.status_code}")

    def _record_health(self, *, ok: bool, error: str | None, latency: float) -> None:
        h = self.health
        h.checks += 1
        h.last_latency_ms = round(latency * 1000, 2)
        if ok:
            h.last_success = self.clock.wall()
            h.consecutive_failures = 0
        else:
            h.last_error = error
            h.failed_checks += 1
            h.consecutive_failures += 1

    def _feed_breaker(self, failure: str | None) -> None:
        """Record one outcome (None: a success) in the breaker, and log when it opens or closes."""
        transition = self.breaker.record_success() if failure is None else self.breaker.record_failure(failure)
        if transition == "open":
            log.warning(
                "backend %s: circuit opened after %d failures: %s",
                self.name,
                self.breaker.failures,
                self.breaker.last_error,
            )
        elif transition == "closed":
            log.info("backend %s: circuit closed; backend healthy again", self.name)

    # -- requests

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None,
        timeout: float,
        *,
        on_progress: Any = None,
        guarded: bool = True,
        log_level: str | None = None,
        caller: Any = None,
        forwarded: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Send one request. Transport failures feed the breaker (answered errors, router bugs and `guarded=False`
        housekeeping do not); a lost connection is fed once, by the supervisor, not once per call it cut.
        `log_level`: what the request's client asked for, and `caller`: the client's request context behind it
        (None: the router's own request), whose capabilities a 2026-era backend is told of, go with the request to a
        2026-era backend. `forwarded`: the client's headers that go with it (see forwarded_headers).
        Raises NotSent when the request provably never reached the backend."""
        feed = self._feed_breaker if guarded else lambda failure: None
        dispatcher, posts = self.dispatcher, self._posts
        if dispatcher is None:
            raise NotSent(self.unavailable_reason())
        opts: dict[str, Any] = {"timeout": timeout}
        if self._headers:
            opts["headers"] = self._headers
        if forwarded:
            opts["headers"] = {**forwarded, **self._headers}
        if on_progress is not None:
            opts["on_progress"] = on_progress
        if self._stamp is not None:
            params = self._stamp(method, params, opts, log_level, self._relayed(caller))
        try:
            # The SDK's own timeout starts once the request is written; this one also bounds a backend that stopped reading.
            with anyio.fail_after(timeout + 1):
                if posts is not None and on_progress is None and log_level is None:
                    result = await posts.request(method, params, opts)
                else:
                    result = await dispatcher.send_raw_request(method, params, cast(Any, opts))
        except TimeoutError:
            feed(f"could not write to the backend within {timeout:g}s")
            raise MCPError(
                REQUEST_TIMEOUT, f"Request timed out: the backend is not reading (after {timeout:g}s)"
            ) from None
        except MCPError as err:
            if isinstance(err, PostBroken) and posts is not None and self._posts is posts:  # not cut by a restart
                self.restart(f"its HTTP connection broke ({err.detail}); reconnecting")
            if (
                self.config.transport != "stdio"
                and err.code in (INVALID_REQUEST, REQUEST_TIMEOUT)
                and SESSION_LOST.fullmatch(err.message)
            ):
                self.breaker.release()
                # the server forgot our session, so nothing ran; unless this is a straggler of a replaced connection
                if self.dispatcher is dispatcher:
                    self.restart("its HTTP session was lost; reconnecting")
                raise NotSent(f"backend {self.name!r} lost its session; reconnecting") from None
            if err.code == CONNECTION_CLOSED or (err.code == REQUEST_TIMEOUT and timeout < self.timeout):
                self.breaker.release()  # counted once for the lost connection; or the router cut its time short
            else:
                feed(err.message if err.code == REQUEST_TIMEOUT else None)
            if self._stamp is not None and NO_BACK_CHANNEL in err.message and not self._told_era:
                self._told_era = True
                log.warning(
                    "backend %s: %s asked the client through its session, which the 2026 era cannot carry; "
                    "give the backend `era: handshake` in the config",
                    self.name,
                    _subject(method, params or {})[1],
                )
            raise
        except NotSent:
            self.breaker.release()
            if self.dispatcher is dispatcher and not dispatcher.closed:  # its writes fail, yet nothing else noticed
                self.restart("writing to it failed; reconnecting")
            raise
        except TRANSPORT_ERRORS as exc:
            feed(redact(describe_error(exc), self.secrets))
            raise
        except BaseException:
            self.breaker.release()  # a cancelled trial, or a router bug, must not wedge a half-open breaker
            raise
        feed(None)
        return result

    def _relayed(self, caller: Any) -> Mapping[str, Any]:
        """What of the calling client's declared capabilities the router relays (see RELAYED_CAPABILITIES); the last
        answer is kept, as a handshake-era client's capabilities are one object for all its calls."""
        declared = caller.session.client_capabilities if caller is not None else None
        if declared is None:
            return {}
        if declared is not self._relayed_for[0]:
            relayed = declared.model_dump(by_alias=True, mode="json", exclude_none=True, include=RELAYED_CAPABILITIES)
            self._relayed_for = (declared, relayed)
        return self._relayed_for[1]

    def forwarded_headers(self, ctx: Any) -> dict[str, str] | None:
        """The headers of the client's HTTP request (`ctx`'s) that this backend's forward_headers names."""
        names = self.config.forward_headers
        headers = getattr(getattr(ctx, "request", None), "headers", None) if names else None
        if headers is None:  # none to forward, or a client over stdio
            return None
        found = {name: ", ".join(values) for name in names if (values := headers.getlist(name))}
        return found or None

    # -- visibility

    def status(self, *, detail: bool = False) -> dict[str, Any]:
        """What list_backends and get_backend_health show. Never env values, headers or URL credentials."""
        b = self.breaker
        state = b.state
        now = self.clock.now()
        retry_at = self.next_attempt_at if self.state == "failing" else b.retry_at if state == "open" else None
        s = self.stats
        version = self.session.protocol_version if self.session is not None else None
        info: dict[str, Any] = {
            "name": self.name,
            "namespace": self.config.namespace,
            "transport": self.config.transport,
            "target": self.config.public_target(),
            "state": self.state,
            "healthy": self.state == "ready" and state == "closed",
            "circuit_state": state,
            "consecutive_failures": b.failures,
            "tools": len(self.listing.tools),
            "resources": len(self.listing.resources) + len(self.listing.templates),
            "prompts": len(self.listing.prompts),
            "restarts": self.restarts,
            "era": None if version is None else "2026" if version in MODERN_PROTOCOL_VERSIONS else "handshake",
            "protocol_version": version,
            "last_error": redact(self.last_error or (b.last_error if b.failures else None) or "", self.secrets) or None,
            "next_retry_in_seconds": None if retry_at is None else round(max(0.0, retry_at - now), 1),
            "requests": s.requests,
            "errors": s.errors,
            "fallbacks": s.fallbacks,
            "in_flight": len(self.inflight),
            "latency_p50_ms": s.percentile(0.5),
            "latency_p95_ms": s.percentile(0.95),
        }
        if detail:
            h = self.health
            info |= {
                "priority": self.config.priority,
                "failed_attempts": self.failed_attempts,
                "uptime_seconds": round(now - self.connected_at, 1)
                if self.connected_at is not None and self.state == "ready"
                else None,
                "reconnect_in_seconds": round(max(0.0, self.next_attempt_at - now), 1)
                if self.next_attempt_at
                else None,
                "health_checks": {
                    "enabled": self.config.health_check.enabled,
                    "interval_seconds": self.config.health_check.interval_seconds,
                    "total": h.checks,
                    "failed": h.failed_checks,
                    "consecutive_failures": h.consecutive_failures,
                    "last_latency_ms": h.last_latency_ms,
                    "last_success_ago_seconds": round(self.clock.wall() - h.last_success, 1)
                    if h.last_success
                    else None,
                    "last_error": h.last_error,
                },
            }
        return info


# ---------------------------------------------------------------------------- I/O shell: the router


class _Outbox:
    """What waits to go out to one client outside any request, sent by one task: a slow reader holds up nobody.

    List changes coalesce (one pending per list), resource updates too (one per URI); log messages wait in a
    queue of at most `bound`, and those beyond it are dropped and counted.
    """

    def __init__(self, connection: Any, bound: int) -> None:
        self.connection = connection
        self.bound = bound
        self.log_level: str | None = None
        """Set by the client's logging/setLevel: until then it gets no backend's log messages."""
        self.changes: dict[str, None] = {}
        self.updates: dict[str, None] = {}
        self.logs: collections.deque[dict[str, Any]] = collections.deque()
        self.dropped = 0
        self.scope = anyio.CancelScope()
        self._wake = anyio.Event()

    def change(self, sender: str) -> None:
        self.changes[sender] = None
        self._wake.set()

    def update(self, uri: str) -> None:
        self.updates[uri] = None
        self._wake.set()

    def log(self, message: dict[str, Any]) -> bool:
        """Queue a log message; False when the queue is full and it was dropped."""
        if len(self.logs) >= self.bound:
            self.dropped += 1
            return False
        self.logs.append(message)
        self._wake.set()
        return True

    async def run(self) -> None:
        """Send what is queued, oldest kind first, until cancelled; a failed send ends it (the client is gone)."""
        with self.scope:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                while self.changes or self.updates or self.logs:
                    if self.changes:
                        sender = next(iter(self.changes))
                        del self.changes[sender]
                        await getattr(self.connection, sender)()
                    elif self.updates:
                        uri = next(iter(self.updates))
                        del self.updates[uri]
                        await self.connection.send_resource_updated(uri)
                    else:
                        await self.connection.notify("notifications/message", self.logs.popleft())


class ClientHub:
    """The router's clients, for what reaches them outside any request.

    Handshake-era connections get list changes, updates of the resources they
    subscribed to, and (once they set a level) the backends' log messages, each
    through its own bounded `_Outbox`. 2026-era clients hear list changes and
    resource updates on `events` (`subscriptions/listen`) and no log messages:
    in that era logs travel only with the request that asked for them (RequestLog).
    Results and progress never pass here: they go out on their request's own
    channel, and are never dropped.
    """

    def __init__(self, events: InMemorySubscriptionBus, *, bound: int = NOTIFICATION_QUEUE_BOUND) -> None:
        self.events = events
        self.bound = bound
        self.dropped = 0
        """Log messages dropped, for all clients, since the start: shown by list_backends."""
        self.unfollowed: Callable[[str], None] = lambda uri: None
        """Called when the last subscriber of a resource is gone."""
        self._outboxes: dict[Any, _Outbox] = {}
        self._followers: dict[str, dict[Any, None]] = {}
        self._by_session: dict[str, Any] = {}
        """HTTP connections by their mcp-session-id (for DirectCalls)."""

    def add(self, connection: Any, task_group: anyio.abc.TaskGroup) -> bool:
        """Remember a handshake-era connection until it closes; False if it is known already."""
        if connection in self._outboxes:
            return False
        self._outboxes[connection] = outbox = _Outbox(connection, self.bound)
        if connection.session_id is not None:
            self._by_session[connection.session_id] = connection
        connection.exit_stack.callback(self.forget, connection)
        task_group.start_soon(self._serve, outbox, name="client outbox")
        return True

    async def _serve(self, outbox: _Outbox) -> None:
        try:
            await outbox.run()
        except Exception:  # noqa: BLE001 - a gone client must not stop the others
            self.forget(outbox.connection)

    def forget(self, connection: Any) -> None:
        """Drop a closed (or failed) connection at once: its queue, its sender and its subscriptions."""
        outbox = self._outboxes.pop(connection, None)
        if outbox is not None:
            outbox.scope.cancel()
            session = connection.session_id
            if self._by_session.get(session) is connection:
                del self._by_session[session]
            # the one sign of an HTTP session's end (DELETE, or idle past server.limits.session_idle_seconds)
            log.debug("a client connection closed; %d remain", len(self._outboxes))
        for uri, followers in list(self._followers.items()):
            if followers.pop(connection, False) is None and not followers:
                del self._followers[uri]
                self.unfollowed(uri)

    def of_session(self, session_id: str) -> Any | None:
        """The handshake-era connection of an HTTP session, once it is initialized; None if unknown or closed."""
        return self._by_session.get(session_id)

    def newest(self, where: Callable[[Any], bool] = lambda connection: True) -> Any | None:
        """The connection that arrived last (of those `where` accepts), or None."""
        return next((c for c in reversed(self._outboxes) if where(c)), None)

    def __len__(self) -> int:
        return len(self._outboxes)

    async def list_changed(self, signals: Sequence[tuple[str, Callable[[], Any]]]) -> None:
        """Each change (the connection's `send_*_list_changed`, the bus event) to every client of both eras."""
        for sender, event in signals:
            for outbox in self._outboxes.values():
                outbox.change(sender)
            await self.events.publish(event())

    async def resource_updated(self, uri: str) -> None:
        for connection in self._followers.get(uri, ()):
            if (outbox := self._outboxes.get(connection)) is not None:
                outbox.update(uri)
        await self.events.publish(ResourceUpdated(uri=uri))

    def follow(self, connection: Any, uri: str) -> None:
        self._followers.setdefault(uri, {})[connection] = None

    def unfollow(self, connection: Any, uri: str) -> bool:
        """Stop sending `uri`'s updates to `connection`; True if nobody follows it any more."""
        followers = self._followers.get(uri, {})
        followers.pop(connection, None)
        if not followers:
            self._followers.pop(uri, None)
        return not followers

    def followed(self, uri: str) -> bool:
        return bool(self._followers.get(uri))

    def followed_uris(self) -> list[str]:
        return list(self._followers)

    def set_log_level(self, connection: Any, level: str) -> str:
        """Record a client's level; returns the most verbose level any handshake-era client set now."""
        if (outbox := self._outboxes.get(connection)) is not None:
            outbox.log_level = level
        return most_verbose(*(o.log_level for o in self._outboxes.values())) or level

    def level_of(self, connection: Any) -> str | None:
        """The level a handshake-era client set, None if it set none (or is not known)."""
        outbox = self._outboxes.get(connection)
        return outbox.log_level if outbox is not None else None

    def log(self, message: dict[str, Any]) -> None:
        """A backend's log message, to the clients whose level it meets; never waits (full queues drop it)."""
        for outbox in self._outboxes.values():
            if admits(outbox.log_level, message["level"]) and not outbox.log(message):
                self.dropped += 1

    def takes(self, level: Any) -> bool:
        """Does any client take backends' log messages of `level` (a handshake-era client that set a level it meets)?"""
        return any(admits(o.log_level, level) for o in self._outboxes.values())

    def status(self) -> dict[str, Any]:
        return {"connected": len(self._outboxes), "dropped_log_messages": self.dropped, "queue_bound": self.bound}


async def ask_outside_a_call(connection: Any, request: Any, result_type: type[Any], timeout: float) -> Any:
    """A request to a client outside any of its requests (its GET stream carries it), the answer checked."""
    params = request.params.model_dump(by_alias=True, mode="json", exclude_none=True) if request.params else None
    return result_type.model_validate(await connection.send_raw_request(request.method, params, {"timeout": timeout}))


served_by: contextvars.ContextVar[str | None] = contextvars.ContextVar("served_by", default=None)
"""The backend that the request being served went to last (Router.forward sets it): the metrics' backend label.
Set in the request's own task, so the server middleware around it reads it once the request is answered."""


class Router:
    """Owns the backends, the catalogue, and the request path between them."""

    def __init__(
        self,
        config: Config,
        *,
        connectors: Mapping[str, Connector] | None = None,
        clock: Clock = Clock(),
        backend_eras: BackendEra | None = None,
    ) -> None:
        self.settings = config.settings
        self.backend_eras: BackendEra = backend_eras or config.settings.backend_eras
        """The era of backends without their own `era`: "auto" speaks 2026-07-28 to those that serve it (see
        open_in_newest_era), "handshake" the handshake era only."""
        self.config_source = config.source
        self.clock = clock
        self.routes = routes_of(config.backends)
        connectors = connectors or {}
        self.backends: dict[str, Backend] = {b.name: Backend(b, self, connectors.get(b.name)) for b in config.backends}
        self._task_group: anyio.abc.TaskGroup | None = None
        self.ready = anyio.Event()
        self.changed = anyio.Event()
        """Set (then replaced) whenever a backend's lifecycle moves: calls waiting for a backend decide again."""
        self._turns: dict[tuple[str, ...], int] = {}
        """Requests routed to each set of candidates, for round-robin."""
        self.log_level: str | None = None
        """The most verbose level a handshake-era client has set (logging/setLevel), None until one does."""
        self.asked_log_level: str | None = None
        """The most verbose level any 2026-era request has asked for (`io.modelcontextprotocol/logLevel`)."""
        self.events = InMemorySubscriptionBus()
        """Change events for 2026-era clients, which hear them on `subscriptions/listen`."""
        self.clients = ClientHub(self.events)
        self.clients.unfollowed = self._unfollowed
        self._templates: tuple[tuple[UriTemplate | None, tuple[str, ...]], ...] = ()
        self._resource_plans: dict[str, Plan] = {}
        self._followed_at: dict[str, str] = {}
        """The backend that took each followed resource's subscription, where it is let go again."""
        self._priorities: dict[str, int] = {}
        self._pages: dict[tuple[str, str | None], dict[str, Any]] = {}
        """List pages by method and cursor, built once per catalogue."""
        self._input_schemas: dict[str, Any] = {}
        self.catalogue = Catalogue()
        self._rebuild()
        self.bridge = EraBridge(self)
        """Calls of 2026-era clients whose handshake-era backend asks them for input, parked between rounds."""

    # -- lifecycle (the supervisor)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Router]:
        """Start every enabled backend concurrently; stop them all, concurrently, on exit."""
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            for backend in self.backends.values():
                self._start(backend)
            tg.start_soon(self._mark_ready)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
        self._task_group = None

    def _start(self, backend: Backend) -> None:
        if backend.config.enabled and self._task_group is not None:
            self._task_group.start_soon(backend.run, name=f"backend {backend.name}")
        else:
            backend.first_attempt_done.set()

    def add_backend(self, config: BackendConfig, connector: Connector | None = None) -> Backend:
        """Add and start a backend while serving."""
        backend = Backend(config, self, connector)
        self.backends[config.name] = backend
        self.routes = routes_of(b.config for b in self.backends.values())
        self._start(backend)
        return backend

    def remove_backend(self, name: str) -> None:
        """Stop a backend and withdraw its tools, resources and prompts while serving."""
        backend = self.backends.pop(name)
        self.routes = routes_of(b.config for b in self.backends.values())
        backend.stop()
        self._rebuild()

    def restart_backend(self, name: str) -> None:
        """Drop a backend's connection; its supervisor reconnects at once."""
        self.backends[name].restart()

    def backend_changed(self) -> None:
        """A backend's lifecycle moved: wake the calls waiting for one."""
        self.changed.set()
        self.changed = anyio.Event()

    async def _mark_ready(self) -> None:
        """Lists wait for every backend's first connection attempt, for STARTUP_GRACE at most; later ones are announced."""
        with anyio.move_on_after(STARTUP_GRACE):
            for backend in list(self.backends.values()):
                await backend.first_attempt_done.wait()
        self.ready.set()
        # What exists now (the SDK's models, the catalogue) lives as long as the router: keep the collector from
        # re-scanning it on every full collection, which otherwise stalls large tool lists for tens of milliseconds.
        gc.freeze()

    async def wait_ready(self) -> None:
        if not self.ready.is_set():
            await self.ready.wait()

    # -- catalogue

    def tool_input_schema(self, name: str) -> Any:
        """The input schema of a tool the client sees, None if there is none: the SDK checks a 2026-era call's
        `Mcp-Param-*` headers against it, and would otherwise run the whole tools/list on every call to find it."""
        return self._input_schemas.get(name)

    def set_listing(self, backend: Backend, listing: Listing) -> None:
        if listing == backend.listing:
            return
        backend.listing = listing
        backend.offered = {
            kind: frozenset(i["name"] for i in items)
            for kind, items in (("tool", listing.tools), ("prompt", listing.prompts))
        } | {"resource": frozenset(r["uri"] for r in listing.resources)}
        backend.templates = tuple(
            t for t in (_compiled_template(t["uriTemplate"]) for t in listing.templates) if t is not None
        )
        self._rebuild()

    def _rebuild(self) -> None:
        """Rebuild the catalogue from every backend's listing, and tell clients what changed."""
        old = self.catalogue
        members = [
            Member(b.name, b.config.namespace, b.config.priority, b.listing, self.routes.get(b.name, ()))
            for b in self.backends.values()
        ]
        new = build_catalogue(
            members, namespaced=self.settings.enable_namespaces, default_strategy=self.settings.default_strategy
        )
        new = dataclasses.replace(new, tool_items=MANAGEMENT_TOOL_ITEMS + new.tool_items)
        for conflict in set(new.conflicts) - set(old.conflicts):
            log.warning("routing: %s", conflict)
        self.catalogue = new
        self._priorities = {m.name: m.priority for m in members}
        self._templates = tuple((_compiled_template(text), owners) for text, owners in new.templates)
        self._resource_plans = {}
        self._pages = {}
        self._input_schemas = {t["name"]: t.get("inputSchema") for t in new.tool_items}
        changed = [
            signal
            for signal, a, b in (
                (("send_tool_list_changed", ToolsListChanged), old.tool_items, new.tool_items),
                (("send_prompt_list_changed", PromptsListChanged), old.prompt_items, new.prompt_items),
                (
                    ("send_resource_list_changed", ResourcesListChanged),
                    old.resource_items + old.template_items,
                    new.resource_items + new.template_items,
                ),
            )
            if a != b
        ]
        if changed and self._task_group is not None:
            self._task_group.start_soon(self._notify_changed, changed)

    def register_connection(self, connection: Any) -> None:
        """Remember a client connection so notifications reach it; forgotten when it closes."""
        if self._task_group is None or not self.clients.add(connection, self._task_group):
            return
        capabilities = connection.client_capabilities
        if capabilities is not None and capabilities.roots is not None:
            self._task_group.start_soon(self.roots_changed)  # backends asked before any client could answer

    def _unfollowed(self, uri: str) -> None:
        if self._task_group is not None:
            self._task_group.start_soon(self._unsubscribe_backend, uri)

    async def _notify_changed(self, signals: Sequence[tuple[str, Callable[[], Any]]]) -> None:
        await self.clients.list_changed(signals)

    # -- notifications and requests that cross the router

    async def resource_updated(self, uri: str) -> None:
        await self.clients.resource_updated(uri)

    async def subscribe(self, connection: Any, uri: str) -> None:
        plan = self.resource_plan(uri)
        if plan is None:
            raise MCPError(RESOURCE_NOT_FOUND, f"Resource not found: {uri!r}")
        if not self.clients.followed(uri):
            self._followed_at[uri] = await self._follow(plan, uri)
        self.clients.follow(connection, uri)

    async def _follow(self, plan: Plan, uri: str) -> str:
        """Follow `uri` at one backend of its plan; returns the one that took it. The first ready one, if it is in
        the 2026 era, follows it on its change stream: no request, so no breaker trial. Otherwise resources/subscribe
        is routed among the plan's handshake-era backends."""
        members = [b for name in plan.candidates if (b := self.backends.get(name)) is not None]
        first = next((b for b in members if b.state == "ready"), members[0] if members else None)
        if first is not None and first.follows_on_stream:
            await first.changes.follow(uri, on=True, timeout=first.timeout)
            return first.name
        handshake = Plan(plan.strategy, plan.route, tuple(b.name for b in members if not b.follows_on_stream))
        await self.forward("resources/subscribe", handshake, {"uri": uri}, retry_safe=True)
        return served_by.get() or handshake.candidates[0]  # forward names the backend that served

    async def unsubscribe(self, connection: Any, uri: str) -> None:
        if self.clients.unfollow(connection, uri):
            await self._unsubscribe_backend(uri)

    async def resubscribe(self, backend: Backend) -> None:
        """After a reconnect, subscribe again to what clients still follow on this backend (a 2026-era backend's
        stream asks for them already)."""
        for uri, name in list(self._followed_at.items()):
            if name == backend.name and not backend.follows_on_stream:
                with contextlib.suppress(Exception):
                    await backend.request("resources/subscribe", {"uri": uri}, backend.timeout, guarded=False)

    async def _unsubscribe_backend(self, uri: str) -> None:
        """Nobody follows `uri` any more: the backend that took its subscription (and only that one) lets it go."""
        if self.clients.followed(uri) or (backend := self.backends.get(self._followed_at.pop(uri, ""))) is None:
            return
        if backend.follows_on_stream:
            await backend.changes.follow(uri, on=False, timeout=backend.timeout)
            return
        plan = Plan("fallback", None, (backend.name,))
        with contextlib.suppress(MCPError):
            await self.forward("resources/unsubscribe", plan, {"uri": uri}, retry_safe=True)

    def backend_log_level(self) -> str | None:
        """What handshake-era backends that log are set to: the most verbose level any client asked for, of the
        levels handshake-era clients set now and those 2026-era requests asked for since the start. Each client
        still gets only what it asked for: the router filters (see forward_log)."""
        return most_verbose(self.log_level, self.asked_log_level)

    async def set_log_level(self, level: str, connection: Any = None) -> None:
        """A client's logging/setLevel: that client now gets log messages at `level` and above; every backend that
        logs (and those that connect later) follows backend_log_level."""
        self.log_level = self.clients.set_log_level(connection, level)
        async with anyio.create_task_group() as tg:
            for backend in self.backends.values():
                tg.start_soon(backend.follow_log_level)

    async def ask_for_logs(self, backend: Backend, level: str) -> None:
        """A 2026-era request asks for log messages at `level`: a handshake-era backend that logs less is set to it
        (once: the level stays, so requests do not each cost a logging/setLevel)."""
        if most_verbose(level, self.asked_log_level) != self.asked_log_level:
            self.asked_log_level = level
        await backend.follow_log_level()

    async def forward_log(self, backend: Backend, params: types.LoggingMessageNotificationParams) -> None:
        """A backend's log message, tagged with the backend's name: to the 2026-era request it belongs to, on that
        request's own stream if it asked for the level; one that belongs to no request, to the handshake-era clients
        whose level it meets, never waiting for a slow client."""
        message = {
            "level": params.level,
            "logger": f"{backend.name}/{params.logger}" if params.logger else backend.name,
            "data": params.data,
        }
        if (request := backend.log_request()) is not None:
            await request.send(message)
        else:
            self.clients.log(message)

    async def roots_changed(self) -> None:
        """A client's roots changed (or a client with roots arrived): backends that cache roots ask again."""
        for backend in self.backends.values():
            if backend.dispatcher is not None:
                with contextlib.suppress(Exception):
                    await backend.dispatcher.notify("notifications/roots/list_changed", None)

    async def ask_client(self, backend: Backend, capability: str, request: Any, result_type: type[Any]) -> Any:
        """Carry a backend's sampling, elicitation or roots request to the client whose call caused it.

        Backend connections are shared and MCP does not say which call caused
        such a request, so it goes to the client whose calls are running on
        that backend; when calls of several clients are, the router refuses
        rather than guess. Roots, asked outside any call, go to the newest
        client connection.
        """

        def refuse(reason: str) -> types.ErrorData:
            return types.ErrorData(code=INVALID_REQUEST, message=f"mcp-router: {reason}")

        callers = {_connection_of(c): c for c in backend.inflight.values() if c is not None}
        if len(callers) > 1:
            return refuse(
                f"calls of several clients are running on {backend.name!r}; cannot tell which one {request.method} is for"
            )
        ctx = next(iter(callers.values()), None)
        connection = self.clients.newest()
        if ctx is not None:
            capabilities = ctx.session.client_capabilities
        elif capability == "roots":
            connection = self.clients.newest(lambda c: getattr(c.client_capabilities, "roots", None) is not None)
            if connection is None:  # asked at start-up: a client with roots, once there, has the backend ask again
                return types.ListRootsResult(roots=[])
            capabilities = connection.client_capabilities
        else:
            return refuse(f"no client request is in progress to carry {request.method}")
        if (lacking := missing_capability(capabilities, capability, request)) is not None:
            return refuse(f"the client does not support {lacking}")
        if isinstance(ctx, _ParkedContext):  # a 2026-era client: asked in its call's next input_required round
            return await ctx.parked.ask(request, result_type)
        try:
            if ctx is None:
                assert connection is not None
                return await ask_outside_a_call(connection, request, result_type, self.settings.request_timeout)
            return await ctx.session.send_request(
                request, result_type, metadata=ServerMessageMetadata(related_request_id=ctx.request_id)
            )
        except NoBackChannelError:
            return refuse(f"the client's connection cannot carry {request.method}")
        except MCPError as err:
            return err.error

    # -- the request path

    def unknown(self, kind: Literal["tool", "prompt"], name: str) -> MCPError:
        """The error for a name nobody lists, naming the backends never listed: the name may be theirs."""
        unlisted = [
            b.unavailable_reason()
            for b in self.backends.values()
            if b.state in ("starting", "reconnecting", "failing") and not getattr(b.listing, f"{kind}s")
        ]
        return MCPError(
            INVALID_PARAMS,
            f"Unknown {kind}: {name!r}" + (f"; not listed yet: {'; '.join(unlisted)}" if unlisted else ""),
        )

    async def find(self, lookup: Callable[[Catalogue], _T | None]) -> _T | None:
        """Look something up in the catalogue; before the first listing is complete, wait for it and look again."""
        found = lookup(self.catalogue)
        if found is None and not self.ready.is_set():
            await self.wait_ready()
            found = lookup(self.catalogue)
        return found

    def plan_for(self, name: str, pool: Sequence[str]) -> Plan:
        return plan_route(name, pool, self.routes, self._priorities, self.settings.default_strategy)

    def resource_plan(self, uri: str) -> Plan | None:
        """How a request for `uri` is routed: among the backends that listed it, else the owners of a matching template."""
        if (plan := self._resource_plans.get(uri)) is not None:
            return plan
        pool = self.catalogue.resources.get(uri)
        if pool is None:
            pool = next(
                (
                    owners
                    for template, owners in self._templates
                    if template is not None and template.match(uri) is not None
                ),
                None,
            )
        if pool is None:
            return None
        plan = self.plan_for(uri, pool)
        if len(self._resource_plans) < PAGE_SIZE:  # URIs under templates are unbounded: keep the cache so
            self._resource_plans[uri] = plan
        return plan

    async def list_page(self, method: str, cursor: str | None) -> dict[str, Any]:
        """One page of a list, answered from cache for the cursors the router hands out."""
        await self.wait_ready()
        if (result := self._pages.get((method, cursor))) is None:
            attribute, key = LISTS[method]
            try:
                result = page(getattr(self.catalogue, attribute), cursor, key)
            except InvalidCursor as err:
                raise MCPError(INVALID_PARAMS, str(err)) from None
            if cursor is None or cursor == str(
                int(cursor) // PAGE_SIZE * PAGE_SIZE
            ):  # the cursors the router hands out
                result[key] = EncodedItems(result[key])
                self._pages[(method, cursor)] = result
        return result

    async def forward(
        self,
        method: str,
        plan: Plan,
        params: Mapping[str, Any],
        *,
        retry_safe: bool,
        ctx: Any = None,
    ) -> dict[str, Any]:
        """Send a request where its plan's strategy decides, and on a failure, where the one rule allows, to the next.

        `ctx` is the client's request context: progress flows back to it, and
        requests the backend makes while serving this one go to its client; so do
        its log messages, as a 2026-era client asked for them (see RequestLog), or
        as a handshake-era one set its level.
        """
        kind, name = _subject(method, params)
        owner, params = round_owner(params)  # a retry answering a backend's input round goes back to that backend
        members = [self.backends[n] for n in plan.candidates if n in self.backends and owner in (None, n)]
        if not members:
            raise MCPError(BACKEND_UNAVAILABLE, f"no backend serves {name!r} any more")
        deadline = self.clock.now() + max(self.settings.request_timeout, *(b.timeout for b in members))
        backend = members[0]
        strategy = STRATEGIES[plan.strategy]
        turn = self._turns[plan.candidates] = self._turns.get(plan.candidates, -1) + 1  # each pool takes its own turns
        on_progress = _progress_forwarder(ctx)
        request_log = RequestLog.of(ctx)
        if request_log is not None:
            log_level = request_log.level
        else:  # a handshake-era client's own level goes with its requests to 2026-era backends
            log_level = self.clients.level_of(_connection_of(ctx)) if ctx is not None else None
        failed: set[str] = set()
        attempts = 0  # attempts that may have run
        error: Exception | None = None
        hidden: list[str] = []  # the client's forwarded header values, kept out of the log until the call ends
        try:
            while True:
                remaining = deadline - self.clock.now()
                if error is not None and remaining < MIN_ATTEMPT_SECONDS:  # no time left to try again
                    raise _as_mcp_error(error, backend) from None
                decision = strategy([b.snapshot(kind, name) for b in members], turn)
                if decision.action != "send":
                    if decision.action == "wait" and remaining > 0:
                        with anyio.move_on_after(remaining):
                            await self.changed.wait()
                        continue
                    raise MCPError(BACKEND_UNAVAILABLE, decision.reason)
                target = next((n for n in decision.order if n not in failed), decision.order[0])
                backend = self.backends[target]
                served_by.set(target)
                backend.breaker.allow()  # the snapshot said it admits; a half-open breaker now counts this as its trial
                key = request_log or object()  # the key tells backend.log_request where its log messages go
                backend.inflight[key] = ctx
                if forwarded := backend.forwarded_headers(ctx):
                    hidden += log_redaction.hide(forwarded.values())
                started = self.clock.now()
                try:
                    if request_log is not None and request_log.level is not None:
                        await self.ask_for_logs(backend, request_log.level)
                    timeout = min(backend.timeout, max(0.001, deadline - started))
                    result = await backend.request(
                        method,
                        params,
                        timeout,
                        on_progress=on_progress,
                        log_level=log_level,
                        caller=ctx,
                        forwarded=forwarded,
                    )
                    if result.get("resultType") == "input_required" and ctx is not None:  # a 2026-era backend asks
                        result = await answer_input_rounds(backend, method, params, result, ctx, on_progress, log_level)
                    if on_progress is not None:
                        await on_progress.drained()  # the client hears every update before the result
                    if request_log is not None:
                        await request_log.drained()  # and every log message
                    # an input round is no result yet
                    if method == "tools/call" and result.get("resultType") != "input_required":
                        result = _checked_call_result(result, target)
                except NotSent as exc:
                    reached, error = False, cast(Exception, exc)
                except Exception as exc:
                    if not is_transport_failure(exc):
                        self._account(method, name, backend, started, exc, fallback=False)
                        raise
                    reached, error = True, exc
                else:
                    fell_back = bool(failed) or (plan.strategy != "capability" and target != plan.candidates[0])
                    self._account(
                        method,
                        name,
                        backend,
                        started,
                        None,
                        fallback=fell_back,
                        tool_error=result.get("isError") is True,
                    )
                    return result
                finally:
                    backend.inflight.pop(key, None)
                if reached:
                    self._account(method, name, backend, started, error, fallback=False)
                if not may_send_elsewhere(reached_backend=reached, retry_safe=retry_safe) or (
                    reached and attempts + 1 >= self.settings.max_retries
                ):
                    raise _as_mcp_error(error, backend) from None
                attempts += reached
                failed.add(target)
                if all(n in failed for n in decision.order):  # none left: try the same one again when it admits
                    failed.clear()
                    if reached:
                        delay = self.settings.backoff(attempts, RETRY_INITIAL_DELAY, self.clock.random)
                        if self.clock.now() + delay >= deadline:
                            raise _as_mcp_error(error, backend) from None
                        log.debug("retrying %s in %.2fs after: %s", method, delay, describe_error(error))
                        await self.clock.sleep(delay)
                    else:  # its connection is going (Backend.request restarts it): wait until its lifecycle has moved
                        with anyio.move_on_after(max(0.0, deadline - self.clock.now())):
                            await self.changed.wait()
        finally:
            if hidden:
                log_redaction.unhide(hidden)

    def _account(
        self,
        method: str,
        name: str,
        backend: Backend,
        started: float,
        error: BaseException | None,
        *,
        fallback: bool,
        tool_error: bool = False,
    ) -> None:
        """Count one attempt on `backend`, and at debug level say how it went (`name`: the backend's own)."""
        milliseconds = (self.clock.now() - started) * 1000
        backend.stats.record(milliseconds, ok=error is None, fallback=fallback)
        if log.isEnabledFor(logging.DEBUG):
            outcome = (
                ("tool error" if tool_error else "ok")
                if error is None
                else redact(describe_error(error), backend.secrets)
            )
            via = " (fallback)" if fallback else ""
            log.debug("%s %s -> %s%s: %s in %.1f ms", method, name, backend.name, via, outcome, milliseconds)


def _compiled_template(text: str) -> UriTemplate | None:
    try:
        return UriTemplate.parse(text)
    except ValueError:
        return None


def _subject(method: str, params: Mapping[str, Any]) -> tuple[str, str]:
    """What a request asks a backend for, as routing snapshots need it: the kind, and the backend's own name or URI."""
    if method in ("tools/call", "prompts/get"):
        return ("tool" if method == "tools/call" else "prompt"), str(params.get("name"))
    ref = params.get("ref")
    if method == "completion/complete" and isinstance(ref, Mapping) and ref.get("type") == "ref/prompt":
        return "prompt", str(ref.get("name"))
    return "resource", str(params.get("uri") or (ref.get("uri") if isinstance(ref, Mapping) else ""))


ROUTER_META_KEY: Final = "mcp-router/backend"
"""The `_meta` key of a tools/call result that names the backend that served it (the router's own, not a reserved key)."""


def _checked_call_result(result: dict[str, Any], backend: str) -> dict[str, Any]:
    """A backend's tools/call result, checked for the shape every client parses (cheaply: no model is built), and
    stamped with the backend that served it."""
    content = result.get("content")
    if not isinstance(content, list) or not all(
        isinstance(c, dict) and isinstance(c.get("type"), str) for c in content
    ):
        problem = "content is not a list of typed blocks"
    elif "structuredContent" in result and not isinstance(result["structuredContent"], dict):
        problem = "structuredContent is not an object"
    elif "isError" in result and not isinstance(result["isError"], bool):
        problem = "isError is not true or false"
    else:
        meta = result.get("_meta")
        return {
            **result,
            "_meta": {**meta, ROUTER_META_KEY: backend} if isinstance(meta, dict) else {ROUTER_META_KEY: backend},
        }
    raise MCPError(INTERNAL_ERROR, f"backend {backend!r} sent an invalid tools/call result: {problem}")


def _as_mcp_error(error: Exception, backend: Backend) -> MCPError:
    """The client-facing error for a request that failed in transport: names the backend, leaks nothing."""
    if isinstance(error, MCPError) and error.code == REQUEST_TIMEOUT:
        return MCPError(REQUEST_TIMEOUT, f"backend {backend.name!r} did not answer in time ({error.message})")
    return MCPError(
        BACKEND_UNAVAILABLE, f"backend {backend.name!r} failed: {redact(describe_error(error), backend.secrets)}"
    )


# ---------------------------------------------------------------------------- I/O shell: the era bridge
# A 2026-era client cannot take server requests: what a handshake-era backend asks while serving its
# tools/call, resources/read or prompts/get goes back to that client as `input_required` rounds
# (basic/patterns/mrtr). The backend's call runs on, parked here, until the client retries with the answers.

INVALID_REQUEST_STATE: Final = "Invalid or expired requestState"
"""The spec's (and the SDK's) words for a requestState the server did not mint, or no longer holds."""
STATE_KEY_ENV: Final = "MCP_STATE_KEY"
"""Environment variable with the key that seals requestState (at least 32 bytes); without it a key is generated."""
_PARKED_STATE: Final = "parked:"
_BACKEND_STATE: Final = "backend:"
"""Prefixes a 2026-era backend's own requestState (inside the router's seal) with the backend's name: the retry goes
back to it, as a replica's state means nothing to the others."""


def state_security(env: Mapping[str, str]) -> RequestStateSecurity:
    """How requestState is sealed: with the operator's key (shared by replicas), else a key made for this process."""
    key = env.get(STATE_KEY_ENV)
    if not key:
        return RequestStateSecurity.ephemeral()
    try:
        return RequestStateSecurity(keys=[key])
    except ValueError:
        raise RouterError(f"{STATE_KEY_ENV}: expected at least 32 bytes of secret randomness") from None


def _wire(model: pydantic.BaseModel) -> dict[str, Any]:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _stale_state() -> MCPError:
    return MCPError(INVALID_PARAMS, INVALID_REQUEST_STATE, {"reason": "invalid_request_state"})


@dataclass(eq=False, slots=True)
class _InputAsk:
    """One request of the backend, waiting for the client's answer."""

    request: Any
    result_type: type[Any]
    answered: anyio.Event = field(default_factory=anyio.Event)
    answer: Any = None
    sent: bool = False


class ParkedCall:
    """One 2026-era client call on a handshake-era backend, running in its own task across the client's rounds."""

    def __init__(self, ctx: Any) -> None:
        self.id = os.urandom(12).hex()
        self.round = 0
        """Counts the input_required answers given; each round's requestState names it, so each is good once."""
        self.asks: dict[str, _InputAsk] = {}
        self.changed = anyio.Event()
        self.outcome: dict[str, Any] | MCPError | None = None
        self.served_by: str | None = None
        """The backend that served the call (the `served_by` of its task), for the metrics of the round that answers."""
        self.scope = anyio.CancelScope()
        """Around the backend call: cancelled when the client gives up or never comes back."""
        self.timer: anyio.CancelScope | None = None
        self.current: Any = ctx
        """The client's request now waiting on this call (the first, then each retry), or None between rounds."""
        self.context = _ParkedContext(ctx, self)
        self._asked = 0

    def state(self) -> str:
        return f"{_PARKED_STATE}{self.id}:{self.round}"

    async def ask(self, request: Any, result_type: type[Any]) -> Any:
        """The backend's request, put to the client in the next round; its answer (or an ErrorData) when it comes."""
        self._asked += 1
        ask = self.asks[f"{request.method.rpartition('/')[2]}-{self._asked}"] = _InputAsk(request, result_type)
        self.changed.set()
        await ask.answered.wait()
        return ask.answer

    def answer(self, responses: Any) -> None:
        """The client's `inputResponses` to the requests of the last round; those it left out are asked again."""
        responses = responses if isinstance(responses, Mapping) else {}
        for key, ask in list(self.asks.items()):
            if not ask.sent:
                continue
            if key not in responses:
                ask.sent = False
                continue
            try:
                ask.answer = ask.result_type.model_validate(responses[key])
            except pydantic.ValidationError:
                problem = f"mcp-router: the client's answer to {key} is invalid"
                ask.answer = types.ErrorData(code=INVALID_PARAMS, message=problem)
            del self.asks[key]
            ask.answered.set()

    def end(self, reason: str) -> None:
        """Cancel the backend's call and answer whatever it still waits for."""
        self.scope.cancel()
        for ask in self.asks.values():
            ask.answer = types.ErrorData(code=REQUEST_TIMEOUT, message=f"mcp-router: {reason}")
            ask.answered.set()
        self.asks.clear()
        if self.outcome is None:
            self.outcome = MCPError(REQUEST_TIMEOUT, f"mcp-router: {reason}")
        self.changed.set()


class _ParkedContext:
    """Stands for the client's request in the request path while the call outlives each round's request."""

    def __init__(self, ctx: Any, parked: ParkedCall) -> None:
        self.parked = parked
        self.request_id = ctx.request_id
        self.meta = ctx.meta
        self.params = ctx.params
        self.protocol_version = ctx.protocol_version
        self.request = getattr(ctx, "request", None)  # the first round's HTTP request: the headers forwarded
        self.client_capabilities = ctx.session.client_capabilities
        self.session = self  # ask_client and the progress relay look here
        self._connection = parked  # one caller per call, as each 2026-era request is its own connection

    async def report_progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        """Progress goes to whichever of the client's requests is waiting now; between rounds there is none."""
        current = self.parked.current
        if current is not None:
            with contextlib.suppress(Exception):
                await current.session.report_progress(progress, total, message)


class EraBridge:
    """The table of parked calls, and the rounds that drive them."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.parked: dict[str, ParkedCall] = {}

    def applies(self, ctx: Any) -> bool:
        return ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and self.router._task_group is not None

    async def run(self, ctx: Any, call: Callable[..., Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        """The answer to one round of a 2026-era client's call: the backend's result, or the input it needs."""
        state = (ctx.params or {}).get("requestState")
        if state is not None and not str(state).startswith(_PARKED_STATE):
            return await call(ctx=ctx)  # a 2026-era backend's own round: the retry carries its state and answers
        if state is None:
            parked = ParkedCall(ctx)
            self.parked[parked.id] = parked
            assert self.router._task_group is not None
            self.router._task_group.start_soon(self._drive, parked, call, name=f"parked call {parked.id}")
        else:
            parked = self._resume(str(state), ctx)
        return await self._round(parked, ctx)

    def _resume(self, state: str, ctx: Any) -> ParkedCall:
        call_id, _, round_ = state.removeprefix(_PARKED_STATE).partition(":")
        parked = self.parked.get(call_id) if state.startswith(_PARKED_STATE) else None
        if parked is None or parked.current is not None or round_ != str(parked.round):
            raise _stale_state()  # sealed by us, but its call has ended, or this round was answered already
        if parked.timer is not None:
            parked.timer.cancel()
        parked.current = ctx
        parked.answer((ctx.params or {}).get("inputResponses"))
        return parked

    async def _drive(self, parked: ParkedCall, call: Callable[..., Awaitable[dict[str, Any]]]) -> None:
        with parked.scope:
            try:
                parked.outcome = await call(ctx=parked.context)
            except MCPError as err:
                parked.outcome = err
            except Exception:
                log.exception("internal error")
                parked.outcome = MCPError(INTERNAL_ERROR, "internal router error; see the router's log")
            finally:
                parked.served_by = served_by.get()
        parked.changed.set()

    async def _round(self, parked: ParkedCall, ctx: Any) -> dict[str, Any]:
        try:
            while True:
                if parked.outcome is not None:
                    self.parked.pop(parked.id, None)
                    served_by.set(parked.served_by)  # this task's: the metrics middleware reads it
                    if isinstance(parked.outcome, MCPError):
                        raise parked.outcome
                    return parked.outcome
                if asks := {key: ask for key, ask in parked.asks.items() if not ask.sent}:
                    for ask in asks.values():
                        ask.sent = True
                    parked.round += 1
                    parked.current = None
                    parked.timer = anyio.CancelScope()  # a retry that comes before the timer starts still stops it
                    spawn = cast("anyio.abc.TaskGroup", self.router._task_group).start_soon
                    spawn(self._expire_unless_resumed, parked, parked.timer)
                    requests = {key: _wire(ask.request) for key, ask in asks.items()}
                    return {"resultType": "input_required", "inputRequests": requests, "requestState": parked.state()}
                parked.changed = anyio.Event()
                await parked.changed.wait()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                self._release(parked, "the client cancelled its request")
            raise

    async def _expire_unless_resumed(self, parked: ParkedCall, timer: anyio.CancelScope) -> None:
        """A parked call the client does not resume within the request timeout is cancelled at the backend."""
        timeout = self.router.settings.request_timeout
        with timer:
            await self.router.clock.sleep(timeout)
            log.info("a 2026-era client did not resume its call within %gs; cancelling it", timeout)
            self._release(parked, f"the client did not answer within {timeout:g}s")

    def _release(self, parked: ParkedCall, reason: str) -> None:
        self.parked.pop(parked.id, None)
        if parked.timer is not None:
            parked.timer.cancel()
        parked.current = None
        parked.end(reason)


def missing_capability(capabilities: types.ClientCapabilities | None, capability: str, request: Any) -> str | None:
    """What the client did not declare that answering `request` needs, in words; None if it declared it all."""
    declared = getattr(capabilities, capability, None) if capabilities is not None else None
    if declared is None:
        return capability
    params = getattr(request, "params", None)
    if isinstance(params, types.ElicitRequestURLParams) and declared.url is None:
        return "URL-mode elicitation"  # an empty elicitation capability means form mode only
    if capability == "sampling" and getattr(params, "tools", None) and declared.tools is None:
        return "sampling with tools"
    return None


def _resumed(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
    """A 2026-era client's retry of a 2026-era backend's input_required round carries its answers and state on
    (the state still names its backend: see round_owner)."""
    raw = ctx.params if ctx is not None else None
    if raw and (state := raw.get("requestState")) is not None and not str(state).startswith(_PARKED_STATE):
        params = {**params, "requestState": state}
        if raw.get("inputResponses") is not None:
            params["inputResponses"] = raw["inputResponses"]
    return params


def _owned_round(result: dict[str, Any], backend: str) -> dict[str, Any]:
    """A 2026-era backend's input_required round for a 2026-era client, its requestState naming the backend."""
    state = result.get("requestState")
    return (
        {**result, "requestState": _BACKEND_STATE + json.dumps([backend, state])} if isinstance(state, str) else result
    )


def round_owner(params: Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    """The backend whose input_required round a retry answers (None if it answers none), and the params to send it,
    with that backend's own requestState."""
    state = params.get("requestState")
    if not isinstance(state, str) or not state.startswith(_BACKEND_STATE):
        return None, params
    try:
        owner, own = json.loads(state.removeprefix(_BACKEND_STATE))
    except (ValueError, TypeError):  # sealed by the router, so only a router of another version could send this
        raise _stale_state() from None
    return str(owner), {**params, "requestState": own}


INPUT_METHODS: Final[dict[str, tuple[str, type[Any]]]] = {
    "sampling/createMessage": ("sampling", types.CreateMessageResult),
    "elicitation/create": ("elicitation", types.ElicitResult),
    "roots/list": ("roots", types.ListRootsResult),
}
"""What each input request of a 2026-era backend needs of the client: the capability, and the answer's type."""
MAX_INPUT_ROUNDS: Final = 10
"""As the SDK's client: a backend still asking after this many rounds gets an error."""


async def answer_input_rounds(
    backend: Backend,
    method: str,
    params: Mapping[str, Any],
    result: dict[str, Any],
    ctx: Any,
    on_progress: Any,
    log_level: str | None = None,
) -> dict[str, Any]:
    """A 2026-era backend's input_required, for a handshake-era client: each input request goes to that client as
    an ordinary server request, and the call is retried with the answers until the backend completes it.

    A 2026-era client gets the backend's rounds as they are, their state naming the backend (its retry carries
    them back to it, see `_resumed` and `round_owner`).
    """
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return _owned_round(result, backend.name)
    for _ in range(MAX_INPUT_ROUNDS):
        if result.get("resultType") != "input_required":
            return result
        try:
            asked = types.InputRequiredResult.model_validate(result)
        except pydantic.ValidationError:
            raise MCPError(INTERNAL_ERROR, f"backend {backend.name!r} sent an invalid input_required result") from None
        answers: dict[str, Any] = {}
        for key, request in (asked.input_requests or {}).items():
            capability, result_type = INPUT_METHODS[request.method]
            if isinstance(request, types.CreateMessageRequest) and request.params.tools:
                result_type = types.CreateMessageResultWithTools
            if (lacking := missing_capability(ctx.session.client_capabilities, capability, request)) is not None:
                raise MCPError(INVALID_REQUEST, f"mcp-router: the client does not support {lacking}")
            related = ServerMessageMetadata(related_request_id=ctx.request_id)  # the very call the backend asks for
            try:
                answers[key] = _wire(await ctx.session.send_request(request, result_type, metadata=related))
            except NoBackChannelError:
                problem = f"mcp-router: the client's connection cannot carry {request.method}"
                raise MCPError(INVALID_REQUEST, problem) from None
        retry = {**params, "inputResponses": answers}
        if asked.request_state is not None:
            retry["requestState"] = asked.request_state
        result = await backend.request(
            method,
            retry,
            backend.timeout,
            on_progress=on_progress,
            log_level=log_level,
            caller=ctx,
            forwarded=backend.forwarded_headers(ctx),
        )
    raise MCPError(INTERNAL_ERROR, f"backend {backend.name!r} still asks for input after {MAX_INPUT_ROUNDS} rounds")


# ---------------------------------------------------------------------------- MCP wiring

_OUTPUT_BACKEND: Final[dict[str, Any]] = {
    "type": "object",
    "properties": {
        **{key: {"type": "string"} for key in ("name", "namespace", "transport", "target", "state", "circuit_state")},
        **{
            key: {"type": "integer"}
            for key in (
                "consecutive_failures",
                "tools",
                "resources",
                "prompts",
                "restarts",
                "requests",
                "errors",
                "fallbacks",
                "in_flight",
            )
        },
        "healthy": {"type": "boolean"},
        "last_error": {"type": ["string", "null"]},
        **{key: {"type": ["number", "null"]} for key in ("next_retry_in_seconds", "latency_p50_ms", "latency_p95_ms")},
        "era": {
            "type": ["string", "null"],
            "enum": ["2026", "handshake", None],
            "description": "the protocol era the router speaks to it in (null while not connected)",
        },
        "protocol_version": {"type": ["string", "null"], "description": "the protocol version of that era"},
    },
    "required": ["name", "state", "healthy", "circuit_state"],
}

MANAGEMENT_TOOL_ITEMS: Final[tuple[dict[str, Any], ...]] = (
    {
        "name": "list_backends",
        "title": "List backends",
        "description": "Every backend of this router: transport, state, circuit breaker, tool/resource/prompt counts and last error.",
        "inputSchema": {"type": "object", "properties": {}},
        "outputSchema": {
            "type": "object",
            "properties": {
                "backends": {"type": "array", "items": _OUTPUT_BACKEND},
                "conflicts": {"type": "array", "items": {"type": "string"}},
                "clients": {
                    "type": "object",
                    "description": "handshake-era client connections, and the log messages dropped for slow readers",
                    "properties": {
                        key: {"type": "integer"} for key in ("connected", "dropped_log_messages", "queue_bound")
                    },
                },
            },
            "required": ["backends"],
        },
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
    },
    {
        "name": "get_backend_health",
        "title": "Backend health",
        "description": "Health detail for one backend: breaker state, failures, last error, next retry, restarts, uptime and health-check history.",
        "inputSchema": {
            "type": "object",
            "properties": {"name": {"type": "string", "description": "backend name"}},
            "required": ["name"],
        },
        "outputSchema": _OUTPUT_BACKEND,
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
    },
    {
        "name": "explain_route",
        "title": "Explain a route",
        "description": "Which backend would serve a tool, prompt or resource URI right now, under which strategy and route, "
        "and why each other candidate was passed over.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "a tool or prompt name as listed here, or a resource URI"}
            },
            "required": ["name"],
        },
        "outputSchema": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "kind": {"type": ["string", "null"]},
                "original": {"type": ["string", "null"]},
                "strategy": {"type": ["string", "null"]},
                "route": {"type": ["object", "null"]},
                "decision": {"type": "string", "enum": ["send", "wait", "refuse", "unknown"]},
                "backend": {"type": ["string", "null"]},
                "reason": {"type": ["string", "null"]},
                "candidates": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "backend": {"type": "string"},
                            "verdict": {"type": "string"},
                            "state": {"type": "string"},
                        },
                        "required": ["backend", "verdict"],
                    },
                },
            },
            "required": ["name", "decision", "candidates"],
        },
        "annotations": {"readOnlyHint": True, "openWorldHint": False},
    },
)


def _management_result(payload: dict[str, Any] | None, text: str) -> dict[str, Any]:
    """A management tool's result; without a payload, an error result."""
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    return result | ({"structuredContent": payload} if payload is not None else {"isError": True})


def _management_call(router: Router, name: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
    if name == "list_backends":
        rows = [b.status() for b in router.backends.values()]
        lines = [
            f"{r['name']}: {r['state']}"
            + (f" ({r['era']} era)" if r["era"] else "")
            + f", circuit {r['circuit_state']}, {r['tools']} tools, {r['resources']} resources, {r['prompts']} prompts"
            + (f", last error: {r['last_error']}" if r["last_error"] else "")
            for r in rows
        ] or [no_backends_hint(router.config_source)]
        payload = {"backends": rows, "conflicts": list(router.catalogue.conflicts), "clients": router.clients.status()}
        if router.clients.dropped:
            lines.append(f"log messages dropped for clients that read too slowly: {router.clients.dropped}")
        return _management_result(payload, "\n".join(lines))
    wanted = arguments.get("name")
    if name == "explain_route":
        if not isinstance(wanted, str):
            problem = "is missing" if wanted is None else f"must be a string, not {type(wanted).__name__}"
            return _management_result(
                None, f"the 'name' argument {problem}: give a tool or prompt name, or a resource URI"
            )
        explained = explain_route(router, wanted)
        lines = [f"{wanted}: {explained['decision']}" + (f" to {explained['backend']}" if explained["backend"] else "")]
        lines += (
            [
                f"  strategy {explained['strategy']}"
                + (
                    f", route {explained['route']['pattern']!r} of {explained['route']['backend']}"
                    if explained["route"]
                    else ", no route"
                )
            ]
            if explained["strategy"]
            else []
        )
        lines += [f"  {c['backend']}: {c['verdict']}" for c in explained["candidates"]]
        lines += [f"  {explained['reason']}"] if explained["reason"] and explained["decision"] != "send" else []
        return _management_result(explained, "\n".join(lines))
    backend = router.backends.get(wanted) if isinstance(wanted, str) else None
    if backend is None:
        problem = f"unknown backend {wanted!r}" if wanted is not None else "the 'name' argument is missing"
        return _management_result(None, f"{problem}; known backends: {', '.join(router.backends) or 'none'}")
    info = backend.status(detail=True)
    return _management_result(info, json.dumps(info, indent=2))


def explain_route(router: Router, name: str) -> dict[str, Any]:
    """What explain_route says: the decision the router would take for `name` now, and why, candidate by candidate."""
    catalogue = router.catalogue
    entry = catalogue.tools.get(name) or catalogue.prompts.get(name)
    if entry is not None:
        kind, original, plan, pool = (
            ("tool" if name in catalogue.tools else "prompt"),
            entry.original,
            entry.plan,
            entry.pool,
        )
    else:
        kind, original, plan, pool = "resource", name, router.resource_plan(name), ()
    if plan is None:
        hidden = [c for c in catalogue.conflicts if repr(name) in c]
        reason = "; ".join(hidden) if hidden else f"no backend lists {name[:200]!r}"
        if name in MANAGEMENT_TOOLS:
            reason = "the router serves it itself"
        return {"name": name, "kind": None, "original": None, "strategy": None, "route": None, "decision": "unknown",
                "backend": None, "reason": reason, "candidates": []}  # fmt: skip
    snapshots = [router.backends[b].snapshot(kind, original) for b in plan.candidates if b in router.backends]
    decision = STRATEGIES[plan.strategy](snapshots, router._turns.get(plan.candidates, -1) + 1)
    why = dict(decision.skipped)
    candidates = [
        {"backend": s.name, "state": s.state, "circuit_state": s.breaker, "in_flight": s.in_flight, "priority": s.priority,
         "offers": s.offers, "verdict": "chosen" if decision.order[:1] == (s.name,) else why.get(s.name, "")}
        for s in snapshots
    ]  # fmt: skip
    candidates += [
        {
            "backend": b,
            "verdict": f"no pattern match: {plan.strategy} route {plan.route.pattern!r} of {plan.route.backend} applies",
        }
        for b in pool
        if b not in plan.candidates and plan.route is not None
    ]
    route = plan.route
    return {
        "name": name,
        "kind": kind,
        "original": original,
        "strategy": plan.strategy,
        "route": {"backend": route.backend, "pattern": route.pattern, "fallback_to": route.fallback_to}
        if route
        else None,
        "decision": decision.action,
        "backend": decision.order[0] if decision.order else None,
        "reason": decision.reason or None,
        "candidates": candidates,
    }


async def route_tool_call(
    router: Router, ctx: Any, name: str, arguments: dict[str, Any] | None, *, checked: bool
) -> dict[str, Any]:
    """The one implementation of tools/call. `checked`: the SDK validated the request and checks the result on its way
    out (2026-era calls, and handshake-era ones the fast path passed over); otherwise the result goes to the wire as is."""
    if name in MANAGEMENT_TOOLS:
        result = _management_call(router, name, arguments or {})
    else:
        entry = await router.find(lambda catalogue: catalogue.tools.get(name))
        if entry is None:
            raise router.unknown("tool", name)
        assert entry.plan is not None
        out: dict[str, Any] = {"name": entry.original}
        if arguments is not None:
            out["arguments"] = arguments
        if (meta := _forwarded_meta(ctx.params)) is not None:
            out["_meta"] = meta
        if router.bridge.applies(ctx):  # a 2026-era client: what the backend asks becomes input_required rounds
            resumed = _resumed(ctx, out)
            forward = functools.partial(router.forward, "tools/call", entry.plan, resumed, retry_safe=entry.retry_safe)
            result = strip_reserved_meta(await router.bridge.run(ctx, forward))
        else:
            result = await router.forward("tools/call", entry.plan, out, retry_safe=entry.retry_safe, ctx=ctx)
            result = strip_reserved_meta(result)
    if checked:
        result.setdefault("resultType", "complete")  # the SDK drops it again on handshake-era connections
    else:
        result.pop("resultType", None)
    return result


def _passthrough(result: dict[str, Any]) -> dict[str, Any]:
    """A backend's result as the client gets it: reserved `_meta` keys dropped, resultType for 2026 clients."""
    result = strip_reserved_meta(result)
    result.setdefault("resultType", "complete")  # the SDK drops it again on handshake-era connections
    return result


class _SendsUnderWay:
    """What must reach the client before its request's result: each send runs `with` this, the result awaits
    `drained()`. The SDK runs each progress and notification callback in a task of its own, so without this a
    result could overtake the last of them on its way to the client."""

    def __init__(self) -> None:
        self._count = 0
        self._idle: anyio.Event | None = None
        """Set when the last send under way ends; made when one starts (most requests send nothing)."""

    def __enter__(self) -> None:
        if not self._count:
            self._idle = anyio.Event()
        self._count += 1

    def __exit__(self, *exc_info: object) -> None:
        self._count -= 1
        if not self._count and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        await anyio.lowlevel.checkpoint()  # a send that arrived just before the result starts first
        if self._count and self._idle is not None:
            await self._idle.wait()


class _ProgressRelay:
    """Passes a backend's progress to the client, and lets the result wait until every update has gone out."""

    def __init__(self, report: Callable[[float, float | None, str | None], Awaitable[None]]) -> None:
        self._report = report
        self._sends = _SendsUnderWay()

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        with self._sends:
            await self._report(progress, total, message)

    async def drained(self) -> None:
        await self._sends.drained()


def requested_log_level(ctx: Any) -> str | None:
    """The level a 2026-era client's request asked for (`io.modelcontextprotocol/logLevel` in its `_meta`), else
    None. A handshake-era client sets its level once, for its connection, with logging/setLevel."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS or not ctx.meta:
        return None
    level = ctx.meta.get(types.LOG_LEVEL_META_KEY)
    return level if level in LOG_SEVERITY else None


class RequestLog:
    """Where a backend's log messages for one 2026-era client request go: that request's own stream (the only
    place the spec allows), at or above the level it asked for, none if it asked for none. The request's result
    waits until each has gone out."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.level = requested_log_level(ctx)
        self._sends = _SendsUnderWay()

    @classmethod
    def of(cls, ctx: Any) -> RequestLog | None:
        """A 2026-era request's log; None for a handshake-era one (its client's level decides) or no request."""
        return cls(ctx) if ctx is not None and ctx.protocol_version in MODERN_PROTOCOL_VERSIONS else None

    def takes(self, level: object) -> bool:
        return admits(self.level, level)

    async def send(self, message: dict[str, Any]) -> None:
        # A parked call's messages go to whichever of the client's requests waits now; between rounds, none does.
        ctx = self.ctx.parked.current if isinstance(self.ctx, _ParkedContext) else self.ctx
        if ctx is None or not self.takes(message["level"]):
            return
        notification = types.LoggingMessageNotification(params=types.LoggingMessageNotificationParams(**message))
        with self._sends, contextlib.suppress(Exception):  # a client gone: its result will not reach it either
            await ctx.session.send_notification(notification, related_request_id=ctx.request_id)

    async def drained(self) -> None:
        await self._sends.drained()


def _progress_forwarder(ctx: Any) -> _ProgressRelay | None:
    meta = ctx.meta if ctx is not None else None
    if meta and meta.get("progress_token") is not None:
        return _ProgressRelay(ctx.session.report_progress)
    return None


def _forwarded_meta(raw_params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A client's own `_meta` keys, minus the protocol's reserved ones and its progress token."""
    meta = raw_params.get("_meta") if raw_params else None
    if not meta or not isinstance(meta, Mapping):
        return None
    kept = {k: v for k, v in meta.items() if k != "progressToken" and not k.startswith(RESERVED_META_PREFIX)}
    return kept or None


class RouterServer(Server[Any]):
    """The router's MCP face: advertises listChanged, carries the backends' instructions."""

    router: Router | None = None
    bridge: EraBridge | None = None
    listens: _FollowingListen
    metrics: Metrics
    fast_path: _RouterMiddleware

    @property
    def instructions(self) -> str | None:
        return self.router.catalogue.instructions if self.router is not None else None

    @instructions.setter
    def instructions(self, value: str | None) -> None:
        """Ignored: the instructions are the backends', under their namespaces."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        options = notification_options or NotificationOptions(
            prompts_changed=True, resources_changed=True, tools_changed=True
        )
        return super().create_initialization_options(options, experimental_capabilities, extensions)


def build_server(router: Router) -> RouterServer:
    """The low-level SDK Server whose handlers forward to the router (the checked path; see _RouterMiddleware)."""

    def list_handler(method: str) -> Any:
        async def handler(ctx: Any, params: types.PaginatedRequestParams | None) -> dict[str, Any]:
            listings = (b.listing for b in router.backends.values())
            hint = list_cache_hint(method, listings, router.settings.cache_ttl)
            listed = await router.list_page(method, params.cursor if params else None)
            return {**listed, "resultType": "complete", **hint}

        return _guard(handler)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> dict[str, Any]:
        return await route_tool_call(router, ctx, params.name, params.arguments, checked=True)

    async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> dict[str, Any]:
        entry = await router.find(lambda catalogue: catalogue.prompts.get(params.name))
        if entry is None:
            raise router.unknown("prompt", params.name)
        out: dict[str, Any] = {"name": entry.original}
        if params.arguments is not None:
            out["arguments"] = params.arguments
        assert entry.plan is not None
        forward = functools.partial(router.forward, "prompts/get", entry.plan, _resumed(ctx, out), retry_safe=True)
        return _passthrough(await (router.bridge.run(ctx, forward) if router.bridge.applies(ctx) else forward(ctx=ctx)))

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> dict[str, Any]:
        uri = str(params.uri)
        plan = await router.find(lambda catalogue: router.resource_plan(uri))
        if plan is None:
            raise MCPError(RESOURCE_NOT_FOUND, f"Resource not found: {uri!r}")
        resumed = _resumed(ctx, {"uri": uri})
        forward = functools.partial(router.forward, "resources/read", plan, resumed, retry_safe=True)
        return _passthrough(await (router.bridge.run(ctx, forward) if router.bridge.applies(ctx) else forward(ctx=ctx)))

    async def complete(ctx: Any, params: types.CompleteRequestParams) -> dict[str, Any]:
        ref = params.ref
        out = params.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"meta"})
        if isinstance(ref, types.PromptReference):
            entry = router.catalogue.prompts.get(ref.name)
            if entry is None:
                raise router.unknown("prompt", ref.name)
            out["ref"] = {**out["ref"], "name": entry.original}
            assert entry.plan is not None
            plan = entry.plan
        else:
            found = next((owners for text, owners in router.catalogue.templates if text == ref.uri), None)
            if found is None:
                raise MCPError(RESOURCE_NOT_FOUND, f"Resource template not found: {ref.uri!r}")
            plan = router.plan_for(ref.uri, found)
        return _passthrough(await router.forward("completion/complete", plan, out, retry_safe=True, ctx=ctx))

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> dict[str, Any]:
        await router.subscribe(_connection_of(ctx), str(params.uri))
        return {}

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> dict[str, Any]:
        await router.unsubscribe(_connection_of(ctx), str(params.uri))
        return {}

    async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> dict[str, Any]:
        await router.set_log_level(params.level, _connection_of(ctx))
        return {}

    async def roots_changed(ctx: Any, params: Any) -> None:
        await router.roots_changed()

    listens = _FollowingListen(router)
    server = RouterServer(
        router.settings.server_name,
        version=__version__,
        cache_hints=dict.fromkeys(
            cast("frozenset[CacheableMethod]", CACHEABLE_METHODS), CacheHint(ttl_ms=0, scope="private")
        ),
        on_list_tools=list_handler("tools/list"),
        on_call_tool=_guard(call_tool),
        on_list_prompts=list_handler("prompts/list"),
        on_get_prompt=_guard(get_prompt),
        on_list_resources=list_handler("resources/list"),
        on_list_resource_templates=list_handler("resources/templates/list"),
        on_read_resource=_guard(read_resource),
        on_completion=_guard(complete),
        on_subscribe_resource=_guard(subscribe),
        on_unsubscribe_resource=_guard(unsubscribe),
        on_subscriptions_listen=listens,
        get_tool_input_schema=router.tool_input_schema,
    )
    server.router, server.bridge, server.listens = router, router.bridge, listens
    # Registered by method rather than by constructor keyword, which warns that these are deprecated in 2026-07-28.
    server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, _guard(set_level))
    server.add_notification_handler("notifications/roots/list_changed", types.NotificationParams, roots_changed)
    # The router forwards; tracing each hop is the backends' and clients' business, and costs ~20 us a call.
    # requestState is sealed on the way out and checked on the way in (2026-era requests only; see EraBridge).
    boundary = RequestStateBoundary(state_security(os.environ), default_audience=server.name)
    server.metrics = Metrics()
    server.fast_path = _RouterMiddleware(router, server.get_request_handler, server.metrics)
    server.middleware = [server.fast_path, boundary]
    return server


def _connection_of(ctx: Any) -> Any:
    return ctx.session._connection  # the SDK offers no public handle on a request's connection


class _FollowingListen:
    """Serves a 2026-era client's `subscriptions/listen` (the SDK's ListenHandler, on the router's events), and while
    it lasts follows the resources it names at their backends, as a handshake-era client's resources/subscribe does.
    The stream is acknowledged at once and the resources followed meanwhile, all at once (a backend may take a
    round trip, or its timeout, for each). URIs no backend serves are passed over: the stream tells of the rest."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.serve = ListenHandler(router.events)

    def end_all(self) -> None:
        """End every open listen gracefully: each sends its result as its last message (the router is stopping)."""
        self.serve.close()

    async def __call__(self, ctx: Any, params: types.SubscriptionsListenRequestParams) -> Any:
        listener = object()  # this stream, among each resource's followers
        try:
            async with anyio.create_task_group() as tg:
                for uri in dict.fromkeys(params.notifications.resource_subscriptions or ()):
                    tg.start_soon(self._follow, listener, uri)
                result = await self.serve(ctx, params)
                tg.cancel_scope.cancel()
            return result
        finally:
            self.router.clients.forget(listener)  # backends are unsubscribed in the background

    async def _follow(self, listener: object, uri: str) -> None:
        with contextlib.suppress(MCPError):
            await self.router.subscribe(listener, uri)


KNOWN_ERROR_CODES: Final = frozenset(
    (PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR, CONNECTION_CLOSED, REQUEST_TIMEOUT,
     URL_ELICITATION_REQUIRED, RESOURCE_NOT_FOUND, BACKEND_UNAVAILABLE)
)  # fmt: skip
"""The error codes /metrics names in its error_type label (JSON-RPC's, MCP's, the router's); any other, which a
backend may make up, is `_OTHER`, so no backend can grow the number of series without bound."""


class _RouterMiddleware:
    """Server middleware: tracks client connections, lets initialize wait briefly for backends, and takes the fast path.

    On handshake-era connections tools/call and the lists skip the SDK's per-request
    validation of params and results: the router forwards what the backend said (the
    backend validates the arguments, the catalogue validated the listings once), so
    re-validating both on the hot path would only cost time.
    """

    def __init__(
        self, router: Router, handler_of: Callable[[str], object] = lambda method: None, metrics: Metrics | None = None
    ) -> None:
        self.router = router
        self.handler_of = handler_of
        """The server's handler of a request method, or None."""
        self.metrics = metrics or Metrics()

    async def __call__(self, ctx: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        if ctx.request_id is None or ctx.method == "subscriptions/listen":  # notifications; a listen lasts the session
            return await self._serve(ctx, call_next)
        metrics, began, outcome, error_type = self.metrics, time.perf_counter(), "error", "_OTHER"
        metrics.started()
        served_by.set(None)
        try:
            result = await self._serve(ctx, call_next)
            outcome = "tool_error" if isinstance(result, dict) and result.get("isError") else "ok"
            return result
        except MCPError as err:
            error_type = str(err.error.code) if err.error.code in KNOWN_ERROR_CODES else "_OTHER"  # a bounded label
            raise
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            backend = served_by.get() or _metrics_target(self.router, ctx.method, ctx.params)
            metrics.observe(ctx.method, backend, outcome, time.perf_counter() - began, error_type)

    async def _serve(self, ctx: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return await call_next(ctx)
        result = await _guarded_call(self._fast_path(ctx))
        return result if result is not None else await call_next(ctx)

    async def _fast_path(self, ctx: Any) -> dict[str, Any] | None:
        """The result for a request the router answers itself, or None to take the SDK's checked path."""
        router, method, params = self.router, ctx.method, ctx.params
        if (
            ctx.request_id is not None
            and method not in ("initialize", "ping")
            and not _connection_of(ctx).initialize_accepted
        ):
            if self.handler_of(method) is not None:  # the SDK would say "Invalid request parameters"
                raise MCPError(INVALID_REQUEST, f"the MCP handshake is missing: send initialize before {method}")
            return None  # the SDK answers the rest: method not found
        if method == "tools/call":
            name = params.get("name") if isinstance(params, Mapping) else None
            arguments = params.get("arguments") if isinstance(params, Mapping) else None
            if not isinstance(name, str) or not isinstance(arguments, dict | None):
                return None  # the SDK's checked path says what is wrong with it
            return await route_tool_call(router, ctx, name, arguments, checked=False)
        if method in LISTS:
            cursor = (params or {}).get("cursor")
            return await router.list_page(method, cursor) if isinstance(cursor, str | None) else None
        if method == "notifications/initialized":  # not at initialize: nothing may precede its answer
            router.register_connection(_connection_of(ctx))
        elif method == "initialize":
            await router.wait_ready()
        return None


async def _guarded_call(call: Awaitable[Any]) -> Any:
    """No Python exception text reaches a client: anything unexpected is logged and becomes a plain internal error."""
    try:
        return await call
    except MCPError:
        raise
    except Exception:
        log.exception("internal error")
        raise MCPError(INTERNAL_ERROR, "internal router error; see the router's log") from None


def _guard(handler: Callable[..., Awaitable[Any]]) -> Any:
    """A handler whose unexpected exceptions reach the client as a plain internal error."""

    async def guarded(ctx: Any, params: Any) -> Any:
        return await _guarded_call(handler(ctx, params))

    return guarded


# ---------------------------------------------------------------------------- serving


class _FileWriter:
    """The part of asyncio.StreamWriter that LineWriter uses, writing in place to a terminal or a file.

    The event loop cannot watch those; a write to them is quick, and it never waits for a reader.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._fd is not None:
            view = view[os.write(self._fd, view) :]

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self._fd is None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _thread_fed_reader(fd: int) -> asyncio.StreamReader:
    """A StreamReader over a terminal or file, read by a daemon thread: a signal then never waits for Enter or Ctrl-D,
    as it would for the SDK's worker thread, and the thread ends with the process. The thread closes `fd`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 30)

    def pump() -> None:
        try:
            while chunk := os.read(fd, 1 << 16):
                loop.call_soon_threadsafe(reader.feed_data, chunk)
            loop.call_soon_threadsafe(reader.feed_eof)
        except (OSError, RuntimeError):  # RuntimeError: the loop has closed, the router is stopping
            pass
        finally:
            os.close(fd)

    threading.Thread(target=pump, name="mcp-router stdin", daemon=True).start()
    return reader


def _is_pipe(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@contextlib.asynccontextmanager
async def _stdio_pipes() -> AsyncIterator[tuple[LineReader, LineWriter]]:
    """The wire on private copies of fds 0 and 1, while fd 0 reads /dev/null and fd 1 writes to stderr.

    Pipes and sockets (how MCP clients start servers) are read and written by the event loop; a terminal or
    a file, which the event loop cannot watch, by `_thread_fed_reader` and `_FileWriter`.
    """
    piped_in, piped_out = _is_pipe(0), _is_pipe(1)
    wire_in, wire_out = os.dup(0), os.dup(1)
    saved_in, saved_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print() must never corrupt the protocol stream
    os.close(devnull)
    loop = asyncio.get_running_loop()
    try:
        async with AsyncExitStack() as stack:
            if piped_in:
                reader = asyncio.StreamReader(limit=1 << 30)
                transport, _ = await loop.connect_read_pipe(
                    lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(wire_in, "rb", 0)
                )
                stack.callback(transport.close)
            else:
                reader = _thread_fed_reader(wire_in)
            writer: Any
            if piped_out:
                protocol_factory = lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader())  # noqa: E731
                write_transport, protocol = await loop.connect_write_pipe(
                    protocol_factory, os.fdopen(wire_out, "wb", 0)
                )
                stack.callback(write_transport.close)
                writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
            else:
                writer = _FileWriter(wire_out)
                stack.callback(writer.close)
            yield LineReader(reader, answer_errors_to=writer), LineWriter(writer)
    finally:
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)


async def serve_stdio(server: Server[Any], router: Router) -> None:
    # the client's initialize waits in the pipe; its answer then carries the backends' instructions
    await router.wait_ready()
    async with _stdio_pipes() as (read, write):
        log.info("serving MCP over stdio (%s)", running_loop_name())
        await server.run(read, write, server.create_initialization_options())


class PlainRefusals:
    """ASGI wrapper: the SDK's 400 for a body that is no valid message says what stdio says, without pydantic's text;
    a request whose id is no id (null, a float, a bool, an object), which the SDK takes for a notification (202), is
    refused as stdio refuses it.

    The SDK puts the parser's or validator's whole report (field paths, input values,
    links to pydantic's docs) in the message. This answers as the stdio LineReader
    does: -32700 for bad JSON, -32600 naming the depth limit or "not a valid JSON-RPC
    message", with the request's id when it can be read.
    """

    _SDK_PREFIXES: Final = (b'"message":"Parse error: ', b'"message":"Validation error: ')

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body: list[bytes] = []
        refusal: dict[str, Any] | None = None

        async def keep_body() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                body.append(message.get("body", b""))
            return message

        async def relay(message: dict[str, Any]) -> None:
            nonlocal refusal
            if message["type"] == "http.response.start" and message["status"] in (400, 202):
                refusal = message  # held until its body shows whose refusal it is
                return
            if refusal is not None and message["type"] == "http.response.body":
                start, refusal = refusal, None
                text = message.get("body", b"")
                answer = None
                if start["status"] == 202:  # taken for a notification: a request whose id is null, a float, ...
                    whole = b"".join(body)
                    answer = bad_id_answer(whole) if b'"id"' in whole else None
                elif any(prefix in text for prefix in self._SDK_PREFIXES):
                    answer = _refusal_of(b"".join(body))
                if answer is not None:
                    text = json.dumps(answer).encode()
                    headers = [(k, v) for k, v in start["headers"] if k not in (b"content-length", b"content-type")]
                    length = (b"content-length", b"%d" % len(text))
                    start = {
                        **start,
                        "status": 400,
                        "headers": [*headers, (b"content-type", b"application/json"), length],
                    }
                    message = {**message, "body": text, "more_body": False}
                await send(start)
            await send(message)

        await self.app(scope, keep_body, relay)


def _refusal_of(body: bytes) -> dict[str, Any]:
    """What the stdio side would answer to `body` as a line; a refused notification still needs an HTTP answer."""
    try:
        types.jsonrpc_message_adapter.validate_json(body, by_name=False)
    except ValueError as error:
        answer = malformed_line_answer(body, error)
    else:
        answer = None  # valid after all (the SDK refused it for another reason): say so plainly
    return answer or _error_answer(None, INVALID_REQUEST, "Invalid request: not a valid JSON-RPC message")


SSE_ANSWER_EVENT: Final = re.compile(
    rb'event: message\r\ndata: (\{"jsonrpc":"2\.0","id":(?:-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)":[^\r\n]*)\r\n\r\n'
)
"""An SSE stream's event that is a JSON-RPC answer, as the SDK writes one: it ends the request."""
SSE_ONLY_HEADERS: Final = (b"content-type", b"cache-control", b"connection", b"x-accel-buffering")


class PlainAnswers:
    """ASGI wrapper: a request whose SSE stream would carry nothing but its answer is answered with plain JSON.

    Streamable HTTP lets the server pick either for each request, and clients must
    take both. The SDK starts every answer as an SSE stream; holding back the
    stream's start until its first event shows whether a stream is needed costs
    nothing, while plain JSON spares both sides the stream, and lets clients
    reuse their connection (the SDK client drops it after an SSE answer). Calls
    that send progress, logs or requests first, or run past the SDK's 15 s
    keep-alive ping, stream as before.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        state = "undecided"  # then "held" (an SSE start, until its first event), "json" (the rest is dropped) or "pass"
        held: dict[str, Any] = {}

        async def relay(message: dict[str, Any]) -> None:
            nonlocal state, held
            if state == "pass":
                await send(message)
            elif state == "undecided":
                content_type = dict(message.get("headers", ())).get(b"content-type", b"")
                if message["type"] == "http.response.start" and content_type.startswith(b"text/event-stream"):
                    state, held = "held", message
                else:
                    state = "pass"
                    await send(message)
            elif state == "held" and (
                message.get("body") or not message.get("more_body")
            ):  # empty chunks carry nothing
                if (event := SSE_ANSWER_EVENT.fullmatch(message.get("body", b""))) is None:
                    state = "pass"  # progress, a log or a request comes first: a stream it is
                    await send(held)
                    await send(message)
                    return
                state, body = "json", event[1]
                headers = [(k, v) for k, v in held["headers"] if k not in SSE_ONLY_HEADERS]
                headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
                await send({"type": "http.response.start", "status": held["status"], "headers": headers})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, relay)


# -- the HTTP service
# Who may call (bearer tokens or OAuth JWTs, through the SDK's auth middleware), from where (the SDK's Host and
# Origin checks), how much (limits on bodies, connections, sessions and requests), and what operators see
# (/healthz, /readyz, /metrics, outside auth). Every refusal is an HTTP status with a JSON-RPC error body.

LIMIT_EXCEEDED: Final = -32051
"""JSON-RPC server-error code for 'a limit of the HTTP service was reached'."""
JWKS_MAX_AGE: Final = 600.0
"""Seconds the issuer's key set is trusted before it is fetched again."""
JWKS_MIN_REFETCH: Final = 30.0
"""An unknown key id fetches the key set again at most this often, so made-up key ids cannot flood the issuer."""
FD_RESERVE: Final = 64
"""File descriptors kept for backends, logs and the listening socket, beyond HTTP connections."""
OPERATIONS_PATHS: Final = ("/healthz", "/readyz", "/metrics")
LATENCY_BUCKETS: Final = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
"""Seconds: the OpenTelemetry MCP conventions' buckets for mcp.server.operation.duration, with finer ones below 10 ms."""

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: Any) -> None:
    """A limit hit by a flood is worth one line in the log, not one per connection."""
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _json_rpc_refusal(status: int, message: str, code: int = LIMIT_EXCEEDED) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}, status_code=status)


class StaticTokens:
    """The SDK's TokenVerifier for fixed bearer tokens: MCP_AUTH_TOKEN and a file of them, re-read when it changes.

    Tokens are compared by their SHA-256 digests in constant time, against every
    accepted token, so neither timing nor an early exit tells which one nearly matched.
    """

    def __init__(self, token: str | None, path: str | None) -> None:
        self._fixed = [self._digest(token)] if token else []
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._from_file: list[bytes] = []
        self._tokens()

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def _tokens(self) -> list[bytes]:
        if self._path is not None:
            try:
                info = os.stat(self._path)  # about a microsecond: cheaper than a timer, and rotation is seen at once
                stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
                if stamp != self._stamp:
                    lines = Path(self._path).read_text().splitlines()
                    self._from_file = [
                        self._digest(t.strip()) for t in lines if t.strip() and not t.lstrip().startswith("#")
                    ]
                    self._stamp = stamp
                    log.info("accepting %d token(s) from %s", len(self._from_file), self._path)
            except OSError as err:
                _warn_once(
                    f"tokens:{err.errno}",
                    "cannot read %s (%s); keeping the tokens read before",
                    self._path,
                    err.strerror,
                )
        return self._fixed + self._from_file

    async def verify_token(self, token: str) -> AccessToken | None:
        offered = self._digest(token)
        matched = False
        for accepted in self._tokens():
            matched |= hmac.compare_digest(offered, accepted)
        if not matched:
            return None
        return AccessToken(token=token, client_id=f"token-{offered.hex()[:8]}", scopes=[])


class JwtVerifier:
    """The SDK's TokenVerifier for an OAuth 2.1 resource server: JWT access tokens signed by the issuer's JWKS keys.

    Checks signature, issuer, audience (this router's resource URL) and expiry. The
    key set is cached; a token with an unknown key id fetches it again (at most
    every JWKS_MIN_REFETCH seconds), so the issuer can rotate keys. Fetching runs
    in a thread: PyJWT's client blocks.
    """

    def __init__(self, issuer: str, audience: str, jwks_url: str, clock: Callable[[], float] = time.monotonic) -> None:
        import jwt

        self._jwt = jwt
        self._issuer, self._resource = issuer, audience
        self._audiences = list(dict.fromkeys((audience, audience.rstrip("/"), audience.rstrip("/") + "/")))
        self._client = jwt.PyJWKClient(jwks_url, cache_jwk_set=False, cache_keys=False, timeout=5)
        self._where = urlsplit(jwks_url)._replace(query="", fragment="").geturl()
        self._keys: dict[str, Any] = {}
        self._fetched_at = -math.inf
        self._clock = clock
        self._lock = anyio.Lock()

    async def _key(self, kid: str) -> Any:
        def due() -> bool:
            age = self._clock() - self._fetched_at
            return age >= JWKS_MAX_AGE or (kid not in self._keys and age >= JWKS_MIN_REFETCH)

        if due():
            async with self._lock:
                if due():  # another request may have fetched it while this one waited
                    self._fetched_at = self._clock()
                    try:
                        keys = await anyio.to_thread.run_sync(self._client.get_signing_keys, True)
                        self._keys = {k.key_id: k for k in keys if k.key_id}
                    except self._jwt.PyJWTError as err:
                        log.warning("cannot fetch the signing keys from %s: %s", self._where, err)
        return self._keys.get(kid)

    async def verify_token(self, token: str) -> AccessToken | None:
        jwt = self._jwt
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = await self._key(kid) if isinstance(kid, str) else None
            if key is None:
                log.info("refused a bearer token: its key id is not in the issuer's key set")
                return None
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self._audiences,
                issuer=self._issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError as err:  # the messages name the failed check, never the token
            log.info("refused a bearer token: %s", err)
            return None
        client = claims.get("client_id") or claims.get("azp") or claims.get("sub") or "jwt"
        scopes = claims.get("scope", "")
        return AccessToken(
            token=token,
            client_id=str(client),
            scopes=scopes.split() if isinstance(scopes, str) else [],
            expires_at=int(claims["exp"]),
            resource=self._resource,
            subject=claims.get("sub"),
            claims={"iss": claims["iss"]},
        )


def token_verifier(settings: Settings) -> StaticTokens | JwtVerifier | None:
    if settings.auth_jwks_url and settings.auth_issuer and settings.auth_resource_url:
        return JwtVerifier(settings.auth_issuer, settings.auth_resource_url, settings.auth_jwks_url)
    if settings.auth_token or settings.auth_tokens_file:
        return StaticTokens(settings.auth_token, settings.auth_tokens_file)
    return None


def transport_security(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection whatever the bind address: Host and Origin must be localhost's, the bound name's
    or configured ones."""
    names = ["localhost", "127.0.0.1", "[::1]"]
    if settings.host in ("0.0.0.0", "::", ""):
        names.append(socket.gethostname())
    else:
        names.append(f"[{settings.host}]" if ":" in settings.host else settings.host)
    with_port = re.compile(r".*:(\d+|\*)")
    hosts = [
        pattern
        for name in (*names, *settings.allowed_hosts)
        for pattern in ((name,) if with_port.fullmatch(name) else (name, f"{name}:*"))
    ]
    local = [f"{scheme}://{name}" for scheme in ("http", "https") for name in names]
    origins = [
        pattern for o in (*local, *settings.allowed_origins, *settings.cors_origins) for pattern in (o, f"{o}:*")
    ]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


class Metrics:
    """Request counters by method, backend and outcome, and a latency histogram per backend, for /metrics.

    Fed by one hook, `_RouterMiddleware`, for every request of every transport.
    Rendered in the Prometheus text format with the stdlib; the histogram is named
    after the OpenTelemetry MCP conventions (mcp.server.operation.duration).
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency: dict[tuple[str, str, str], list[float]] = {}
        """(method, backend, error type or ""): a count per bucket (the last for +Inf), then the sum."""
        self.in_flight = 0
        self._idle: anyio.Event | None = None
        """Made only while a drain waits: an event per request would cost more than the rest of the bookkeeping."""

    def started(self) -> None:
        self.in_flight += 1

    async def idle(self) -> None:
        """Return once no request is in flight."""
        if self.in_flight:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    def observe(self, method: str, backend: str, outcome: str, seconds: float, error_type: str = "_OTHER") -> None:
        """One finished request: outcome is ok, tool_error (an isError result), error (a JSON-RPC error, whose code
        is `error_type`) or cancelled. `backend`: the one that served it, else the pool or `router`."""
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()
            self._idle = None
        key = (method, backend, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1
        series = (method, backend, "" if outcome == "ok" else error_type if outcome == "error" else outcome)
        histogram = self.latency.get(series)
        if histogram is None:
            histogram = self.latency[series] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        histogram[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        histogram[-1] += seconds

    def render(self, rows: Sequence[Mapping[str, Any]], sessions: int) -> str:
        """The exposition text; `rows` are the backends' status() rows (state, breaker, restarts)."""

        def labels(**values: Any) -> str:
            inner = ",".join(
                f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                for k, v in values.items()
            )
            return "{" + inner + "}"

        out = ["# HELP mcp_router_requests_total MCP requests served, by method, backend and outcome.",
               "# TYPE mcp_router_requests_total counter"]  # fmt: skip
        out += [
            f"mcp_router_requests_total{labels(mcp_method_name=m, backend=b, outcome=o)} {n}"
            for (m, b, o), n in self.requests.items()
        ]
        out += ["# HELP mcp_server_operation_duration_seconds Time to answer an MCP request.",
                "# TYPE mcp_server_operation_duration_seconds histogram"]  # fmt: skip
        for (m, b, error), histogram in self.latency.items():
            # the OpenTelemetry MCP conventions' attributes: mcp.method.name, and error.type on failures only
            series = {"mcp_method_name": m, "backend": b, **({"error_type": error} if error else {})}
            total = 0.0
            for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), histogram[:-1], strict=True):
                total += count
                out.append(f"mcp_server_operation_duration_seconds_bucket{labels(**series, le=bound)} {int(total)}")
            out.append(f"mcp_server_operation_duration_seconds_sum{labels(**series)} {histogram[-1]:.6f}")
            out.append(f"mcp_server_operation_duration_seconds_count{labels(**series)} {int(total)}")
        out += ["# HELP mcp_router_backend_up Whether the backend is connected and listed (1) or not (0).",
                "# TYPE mcp_router_backend_up gauge"]  # fmt: skip
        out += [f"mcp_router_backend_up{labels(backend=r['name'])} {int(r['state'] == 'ready')}" for r in rows]
        out += ["# HELP mcp_router_backend_circuit_state The backend's circuit breaker state (1 for the current one).",
                "# TYPE mcp_router_backend_circuit_state gauge"]  # fmt: skip
        for r in rows:
            out += [f"mcp_router_backend_circuit_state{labels(backend=r['name'], state=st)} {int(r['circuit_state'] == st)}"
                    for st in ("closed", "open", "half_open")]  # fmt: skip
        out += ["# HELP mcp_router_backend_restarts_total Times the backend was reconnected or restarted.",
                "# TYPE mcp_router_backend_restarts_total counter"]  # fmt: skip
        out += [f"mcp_router_backend_restarts_total{labels(backend=r['name'])} {r['restarts']}" for r in rows]
        out += [
            "# HELP mcp_router_sessions Open client sessions.",
            "# TYPE mcp_router_sessions gauge",
            f"mcp_router_sessions {sessions}",
        ]
        out += ["# HELP mcp_router_in_flight MCP requests being served.", "# TYPE mcp_router_in_flight gauge",
                f"mcp_router_in_flight {self.in_flight}"]  # fmt: skip
        return "\n".join(out) + "\n"


def _metrics_target(router: Router, method: str, params: Any) -> str:
    """The backend label of a request no backend was tried for: the backend (or replicas, joined by +) its name
    routes to; else the router."""
    try:
        return _routed_to(router, method, params)
    except (
        AttributeError,
        TypeError,
        ValueError,
    ):  # a broken catalogue is the request's error to report, not the metrics'
        return "router"


def _routed_to(router: Router, method: str, params: Any) -> str:
    name = params.get("name") if isinstance(params, Mapping) else None
    entry = None
    if method == "tools/call" and isinstance(name, str):
        entry = router.catalogue.tools.get(name)
    elif method == "prompts/get" and isinstance(name, str):
        entry = router.catalogue.prompts.get(name)
    elif method == "resources/read" and isinstance(params, Mapping) and isinstance(uri := params.get("uri"), str):
        plan = router.resource_plan(uri)
        return "+".join(plan.candidates) if plan is not None else "router"
    return "+".join(entry.pool) if entry is not None else "router"


ROUTING_HEADERS: Final = (b"mcp-session-id", b"mcp-protocol-version")
"""Headers that decide which session and era a request is for: a request may send each once."""


class _BodyTooLarge(Exception):
    pass


async def _whole_body(receive: Any, limit: int) -> bytes | None:
    """A request's body, read to its end (None if the client went away first); _BodyTooLarge past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _too_large(settings: Settings) -> Any:
    limit = f"{settings.max_body_bytes} bytes (server.limits.max_body_bytes)"
    return _json_rpc_refusal(413, f"request body too large: at most {limit}", INVALID_REQUEST)


def _replaying(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives `body` whole, then what `receive` gives (the client's disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Any:
        return pending.pop() if pending else await receive()

    return replay


def _is_initialize(body: bytes) -> bool:
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):  # the SDK answers what it cannot parse (PlainRefusals words it)
        return False
    return isinstance(message, dict) and message.get("method") == "initialize"


class SessionLimits:
    """ASGI wrapper for the MCP endpoint: body size, sessions (in all and per client), and requests in flight per
    session.

    The SDK expires idle sessions; this caps them so that no client can lock out the
    others by opening sessions and abandoning them: at a cap, an initialize request (no
    other: only it opens a session) ends the session idle longest (no request in flight,
    no GET stream open), the client's own at its cap, anyone's at the total one, through
    the SDK's idle expiry (its id then answers 404, and its client opens another). Only
    when none is idle is the new one refused. A client is its token's principal when
    authenticated, else its address. A request naming its session or era twice is
    refused: the SDK reads the first copy, and no copy may pass the caps uncounted.
    """

    def __init__(self, app: Any, settings: Settings, live_sessions: Mapping[str, Any]) -> None:
        self.app, self.settings, self.live = app, settings, live_sessions
        """The SDK's open sessions: their transports by session id."""
        self.busy: dict[str, int] = {}
        """Requests in flight by session id."""
        self.opened: dict[str, set[str]] = {}
        """Session ids by client, pruned of ended sessions when the client opens another."""

    def _client(self, scope: Any) -> str:
        user = scope.get("user")
        token = getattr(user, "access_token", None)
        if token is not None:
            return f"principal:{token.client_id}"
        return f"address:{(scope.get('client') or ('?',))[0]}"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings
        length = session = era = None
        for name, value in scope["headers"]:
            if name in ROUTING_HEADERS:
                if (session if name == b"mcp-session-id" else era) is not None:  # which copy counts is ambiguous
                    message = f"the {name.decode()} header is repeated: send it once"
                    return await _json_rpc_refusal(400, message, INVALID_REQUEST)(scope, receive, send)
                if name == b"mcp-session-id":
                    session = value
                else:
                    era = value
            elif name == b"content-length":
                length = value
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return await _too_large(self.settings)(scope, receive, send)
        if session is None:
            handshake_era = era is None or era.decode("latin-1") in HANDSHAKE_PROTOCOL_VERSIONS  # else no session
            if scope["method"] == "POST" and handshake_era and not settings.stateless:
                return await self._opening(scope, receive, send)
            return await self.app(scope, receive, send)
        key = session.decode("latin-1")
        if self.busy.get(key, 0) >= settings.max_requests_per_session:
            _warn_once(
                "per-session",
                "a session reached max_requests_per_session (%d); refusing more",
                settings.max_requests_per_session,
            )
            message = f"too many requests in flight on this session (at most {settings.max_requests_per_session})"
            return await _json_rpc_refusal(429, message)(scope, receive, send)
        self.busy[key] = self.busy.get(key, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            if (left := self.busy.pop(key) - 1) > 0:
                self.busy[key] = left

    def is_open(self, session: str) -> bool:
        """Whether the session is open and not being ended."""
        transport = self.live.get(session)
        if transport is None or transport.is_terminated:
            return False
        return not (transport.idle_scope is not None and transport.idle_scope.cancel_called)

    def _end_longest_idle(self, sessions: Iterable[str]) -> bool:
        """End the one of `sessions` idle longest; False if each is busy. The SDK's idle countdown says which: its
        deadline is infinite while a request is in flight or a GET stream open (or the session still starting)."""
        countdowns = [self.live[s].idle_scope for s in sessions if self.is_open(s)]
        idle = [c for c in countdowns if c is not None and c.deadline < math.inf]
        if not idle:
            return False
        min(idle, key=lambda countdown: countdown.deadline).cancel()  # as if its time had run out: the SDK ends it
        return True

    async def _opening(self, scope: Any, receive: Any, send: Any) -> None:
        """A request without a session id, which may open one: if it is an initialize request, counted against its
        client's sessions and all; only for one does a full cap end another's idle session (any other is refused by
        the SDK, which opens no session for it)."""
        try:
            body = await _whole_body(receive, self.settings.max_body_bytes)
        except _BodyTooLarge:
            return await _too_large(self.settings)(scope, receive, send)
        if body is None:  # the client went away
            return
        receive = _replaying(body, receive)
        if not _is_initialize(body):
            return await self.app(scope, receive, send)
        client = self._client(scope)
        sessions = self.opened.setdefault(client, set())
        sessions.intersection_update([s for s in sessions if self.is_open(s)])
        settings = self.settings
        if len(sessions) >= settings.max_sessions_per_client and not self._end_longest_idle(sessions):
            _warn_once("per-client", "a client reached max_sessions_per_client (%d), each of them busy; "
                       "refusing more", settings.max_sessions_per_client)  # fmt: skip
            limit = settings.max_sessions_per_client
            message = f"too many open sessions for this client (at most {limit}, all busy); end some with DELETE"
            return await _json_rpc_refusal(429, message)(scope, receive, send)
        if sum(map(self.is_open, list(self.live))) >= settings.max_sessions and not self._end_longest_idle(
            list(self.live)
        ):
            _warn_once("sessions", "max_sessions (%d) sessions are open, each of them busy; refusing more",
                       settings.max_sessions)  # fmt: skip
            return await _json_rpc_refusal(503, f"too many open sessions (at most {settings.max_sessions})")(
                scope, receive, send
            )
        sessions.intersection_update([s for s in sessions if self.is_open(s)])  # less the one just ended

        async def record(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                opened = dict(message.get("headers", ())).get(b"mcp-session-id")
                if opened is not None:
                    sessions.add(opened.decode("latin-1"))
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            if not sessions:
                self.opened.pop(client, None)


class DirectCalls:
    """ASGI wrapper for the MCP endpoint: a handshake-era tools/call, on an open session or served stateless, is
    answered here in plain JSON, the router's own fast path (_RouterMiddleware) run on it directly; anything else
    goes on to the SDK.

    The SDK serves each request through an SSE stream of its own (stateless: a server
    of its own), a message router, memory streams and a task or two, which cost about
    as much as the call's whole forwarding. A call answered here is checked as the SDK
    would check it (Host and Origin, content type, Accept, the protocol version; the
    session's owner, an open session), holds its session against idle expiry while it
    runs, and is cancelled by the client's notifications/cancelled. Only calls that
    cannot need their own stream come here: none that asks for progress, none of a
    client that takes sampling or elicitation (a backend may ask for them during the
    call, on the call's stream); a backend's roots/list during a call reaches its
    client on the client's GET stream, as outside a call. Log messages of handshake-era
    clients never travel with a call.
    """

    def __init__(self, app: Any, server: RouterServer, manager: Any, security: TransportSecuritySettings) -> None:
        from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
        from mcp.server.connection import Connection
        from mcp.server.context import ServerRequestContext
        from mcp.server.streamable_http import GET_STREAM_KEY, check_accept_headers
        from mcp.server.transport_security import TransportSecurityMiddleware
        from starlette.requests import Request

        assert server.router is not None
        self.app, self.router, self.manager, self.serve = app, server.router, manager, server.fast_path
        self.guard = TransportSecurityMiddleware(security)
        self._user_type, self._principal, self._accepts = AuthenticatedUser, authorization_context, check_accept_headers
        self._request, self._context, self._connection = Request, ServerRequestContext, Connection.from_envelope
        self._get_stream = GET_STREAM_KEY
        self.running: dict[str, dict[Any, anyio.CancelScope]] = {}
        """The calls answered here on a session, by session id and request id: for notifications/cancelled, and
        to end them with their session."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # SessionLimits refused a repeated session or era header
        session, era = headers.get(b"mcp-session-id"), headers.get(b"mcp-protocol-version")
        transport = self.manager._server_instances.get(session.decode("latin-1")) if session is not None else None
        request = self._request(scope)
        if (
            (transport is None and not (session is None and self.manager.stateless))  # an opening request, or
            or not self._admits(request, era, transport)  # one the SDK refuses, saying why
            or await self.guard.validate_request(request, is_post=True) is not None
        ):
            return await self.app(scope, receive, send)
        with _holding_session(transport):  # from its body's first byte, as the SDK holds a session for a request
            try:
                body = await _whole_body(receive, self.router.settings.max_body_bytes)
            except _BodyTooLarge:
                return await _too_large(self.router.settings)(scope, receive, send)
            if body is None:  # the client went away
                return
            message = self._direct_message(body)
            key = transport.mcp_session_id if transport is not None else None
            calls = self.running.get(key, {}) if key is not None else {}
            if message is not None and message["method"] == "notifications/cancelled":
                call = calls.get(message["params"]["requestId"])
                if call is not None:
                    call.cancel()
                    return await _plain_answer(202, b"", session)(send)
                message = None  # not one of ours: the SDK's
            connection = self.router.clients.of_session(key) if key is not None else None
            if (
                message is None
                or (transport is not None and (connection is None or message["id"] in calls or transport.is_terminated))
                or self._may_ask_during_a_call(connection, transport)
            ):
                return await self.app(scope, _replaying(body, receive), send)
            if connection is None:  # stateless: as the SDK's, born ready with no channel back and nothing declared
                connection = self._connection(era.decode("latin-1") if era else DEFAULT_NEGOTIATED_VERSION, None, None)
            ctx = self._context(
                session=cast(Any, _DirectSession(connection, self.router.settings.request_timeout)),
                lifespan_context=None,
                protocol_version=connection.protocol_version,
                method="tools/call",
                params=message["params"],
                request_id=message["id"],
                request=request,
            )
            answer = await self._answer(ctx, key, connection)
        await _plain_answer(200, answer, session)(send)

    def _admits(self, request: Any, era: bytes | None, transport: Any) -> bool:
        """Whether the request may be answered here as far as its headers and its session tell."""
        if era is not None and era.decode("latin-1") not in HANDSHAKE_PROTOCOL_VERSIONS:
            return False
        has_json, has_sse = self._accepts(request)
        if transport is None:  # stateless: JSON answers only
            return has_json
        user = request.scope.get("user")
        owner = self._principal(user) if isinstance(user, self._user_type) else None
        if transport.is_terminated or owner != self.manager._session_owners.get(transport.mcp_session_id):
            return False
        if transport.idle_scope is not None and transport.idle_scope.cancel_called:
            return False
        return has_json and (has_sse or transport.is_json_response_enabled)

    @staticmethod
    def _direct_message(body: bytes) -> dict[str, Any] | None:
        """The body, if it is a tools/call request this class may answer or a notifications/cancelled; else None."""
        try:
            message = pydantic_core.from_json(body)  # as deep as the SDK's parser goes: it refuses a deeper one
        except ValueError:
            return None
        if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
            return None
        params = message.get("params")
        if not isinstance(params, dict):
            return None
        method, request_id = message.get("method"), message.get("id")
        if method == "notifications/cancelled" and "id" not in message:
            cancelled = params.get("requestId")
            return message if type(cancelled) in (int, str) else None
        if method != "tools/call" or type(request_id) not in (int, str):
            return None
        meta = params.get("_meta")
        if not isinstance(params.get("name"), str) or not isinstance(params.get("arguments"), dict | None):
            return None
        if meta is not None and (not isinstance(meta, dict) or "progressToken" in meta):
            return None
        return message

    async def _answer(self, ctx: Any, session: str | None, connection: Any) -> bytes:
        """The JSON-RPC answer to the call: its result, its error, or (cancelled by its client, or its session
        ended) REQUEST_CANCELLED."""
        request_id = ctx.request_id
        calls: dict[Any, anyio.CancelScope] = {}  # stateless: no notification can reach the call
        if session is not None:
            if session not in self.running:
                connection.exit_stack.callback(self._session_ended, session)
            calls = self.running.setdefault(session, calls)
        answer: dict[str, Any]
        with anyio.CancelScope() as call:
            calls[request_id] = call
            try:
                answer = {"jsonrpc": "2.0", "id": request_id, "result": await self.serve(ctx, _no_sdk_path)}
            except MCPError as err:
                answer = {"jsonrpc": "2.0", "id": request_id, "error": _wire(err.error)}
            finally:
                del calls[request_id]
        if call.cancelled_caught:
            answer = _error_answer(request_id, REQUEST_CANCELLED, "Request cancelled")
        return _to_json(answer)

    def _session_ended(self, session: str) -> None:
        """A session ended (DELETE, idle expiry): its calls end too, as the SDK ends a session's requests."""
        for call in self.running.pop(session, {}).values():
            call.cancel()

    def _may_ask_during_a_call(self, connection: Any, transport: Any) -> bool:
        """Whether a backend may ask the client something during a call that only the call's own stream can carry:
        sampling or elicitation, or roots while the client has no GET stream open (the one way to reach it
        outside a call). A stateless request's client (no connection) can be asked nothing."""
        capabilities = connection.client_capabilities if connection is not None else None
        if capabilities is None:
            return False
        if capabilities.sampling is not None or capabilities.elicitation is not None:
            return True
        return capabilities.roots is not None and self._get_stream not in transport._request_streams


async def _no_sdk_path(ctx: Any) -> Any:
    raise AssertionError("the router's fast path answers every tools/call DirectCalls takes")


def _plain_answer(status: int, body: bytes, session: bytes | None) -> Callable[[Any], Awaitable[None]]:
    """An HTTP answer as the SDK gives it in JSON mode (an empty `body`: none, as for 202 Accepted)."""
    headers = [(b"content-length", b"%d" % len(body))]
    if session is not None:
        headers.append((b"mcp-session-id", session))
    if body:
        headers.append((b"content-type", b"application/json"))

    async def answer(send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return answer


@contextlib.contextmanager
def _holding_session(transport: Any) -> Iterator[None]:
    """Hold an SDK session (if any) against its idle expiry while a request runs, as the SDK's handle_request does."""
    idle, timeout = (transport.idle_scope, transport._idle_timeout) if transport is not None else (None, None)
    if idle is None or timeout is None:
        yield
        return
    transport._requests_in_flight += 1
    idle.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1
        if not transport._requests_in_flight:
            idle.deadline = anyio.current_time() + timeout


class _DirectSession:
    """A call's `ctx.session` on the direct path: its connection's capabilities, and requests sent outside the call
    (on the client's GET stream), as the router sends roots/list outside any call."""

    def __init__(self, connection: Any, timeout: float) -> None:
        self._connection, self._timeout = connection, timeout

    @property
    def client_capabilities(self) -> Any:
        return self._connection.client_capabilities

    async def send_request(self, request: Any, result_type: type[Any], metadata: Any = None) -> Any:
        return await ask_outside_a_call(self._connection, request, result_type, self._timeout)


class LongStreams:
    """The long-lived GET streams (the MCP GET stream, legacy /sse), which the router ends when it drains."""

    def __init__(self) -> None:
        self.open: set[anyio.CancelScope] = set()

    def end_all(self) -> None:
        for stream in list(self.open):
            stream.cancel()


class Tracked:
    """ASGI wrapper whose GET requests join `streams` (an object, not a function, so Starlette takes it as ASGI).

    A stream ended by the drain is closed as a finished response (its last chunk sent), so the client reads an
    ordinary end of stream, not a broken connection.
    """

    def __init__(self, app: Any, streams: LongStreams) -> None:
        self.app, self.streams = app, streams

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        unfinished = False

        async def watched(message: dict[str, Any]) -> None:
            nonlocal unfinished
            if message["type"] == "http.response.start":
                unfinished = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                unfinished = False
            await send(message)

        with anyio.CancelScope() as stream:
            self.streams.open.add(stream)
            try:
                await self.app(scope, receive, watched)
            finally:
                self.streams.open.discard(stream)
        if stream.cancelled_caught and unfinished:
            with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


@dataclass(slots=True)
class HttpService:
    """The pieces of the HTTP service that serving needs to reach after it is built."""

    app: Any
    streams: LongStreams
    sessions: Callable[[], int]


def http_app(router: Router, server: RouterServer) -> Any:
    """The ASGI app: streamable HTTP at /mcp (and legacy SSE at /sse with --transport sse), operations endpoints."""
    return http_service(router, server).app


def http_service(router: Router, server: RouterServer) -> HttpService:
    from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
    from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
    from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
    from mcp.server.sse import SseServerTransport
    from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
    from pydantic import AnyHttpUrl
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Mount, Route

    settings = router.settings
    security = transport_security(settings)
    json_only = settings.json_response or settings.stateless
    manager = StreamableHTTPSessionManager(
        app=server,
        json_response=json_only,
        stateless=settings.stateless,
        security_settings=security,
        max_request_body_size=settings.max_body_bytes,
        session_idle_timeout=settings.session_idle_seconds,
        # SessionLimits caps them, making room by ending the session idle longest; the SDK's cap is a backstop
        max_sessions=2 * settings.max_sessions,
    )
    server._session_manager = manager  # as Server.streamable_http_app would
    live = manager._server_instances  # the SDK's table of open sessions; it offers no public view
    mcp_endpoint: Any = StreamableHTTPASGIApp(manager)
    mcp_endpoint = PlainRefusals(mcp_endpoint if json_only else PlainAnswers(mcp_endpoint))
    streams = LongStreams()
    sse = SseServerTransport("/messages/", security_settings=security, max_request_body_size=settings.max_body_bytes)

    async def sse_endpoint(scope: Any, receive: Any, send: Any) -> None:
        async with sse.connect_sse(scope, receive, send) as (read, write):
            await server.run(read, write, server.create_initialization_options())

    verifier = token_verifier(settings)
    middleware = []
    metadata_routes: list[Any] = []
    protect: Callable[[Any], Any] = lambda app: app  # noqa: E731
    if verifier is not None:
        resource = AnyHttpUrl(settings.auth_resource_url) if settings.auth_resource_url else None
        metadata_url = build_resource_metadata_url(resource) if resource is not None and settings.auth_issuer else None
        middleware = [
            Middleware(AuthenticationMiddleware, backend=BearerAuthBackend(verifier)),
            Middleware(AuthContextMiddleware),
        ]
        protect = functools.partial(RequireAuthMiddleware, required_scopes=[], resource_metadata_url=metadata_url)
        if metadata_url is not None and resource is not None:
            # strings, not AnyHttpUrl: the SDK's model keeps a path-less issuer as written (issuers compare exactly)
            metadata_routes = create_protected_resource_routes(
                cast(Any, settings.auth_resource_url), [cast(Any, settings.auth_issuer)]
            )
    if settings.cors_origins:
        middleware.insert(0, Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["Mcp-Session-Id", "WWW-Authenticate"],
        ))  # fmt: skip

    limits = SessionLimits(DirectCalls(mcp_endpoint, server, manager, security), settings, live)

    def sessions() -> int:
        return sum(map(limits.is_open, list(live))) + len(sse._read_stream_writers)  # the SDK's table of SSE ones

    async def healthz(request: Any) -> Any:
        return PlainTextResponse("ok\n")

    async def readyz(request: Any) -> Any:
        enabled = [b for b in router.backends.values() if b.config.enabled]
        up = [b.name for b in enabled if b.state == "ready"]
        down = {b.name: b.state for b in enabled if b.state != "ready"}
        needed = min(settings.min_ready, len(enabled))
        ready = len(up) >= needed
        return JSONResponse(
            {"ready": ready, "needed": needed, "up": up, "down": down}, status_code=200 if ready else 503
        )

    async def metrics(request: Any) -> Any:
        text = server.metrics.render([b.status() for b in router.backends.values()], sessions())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    routes: list[Any] = [
        Route("/mcp", endpoint=protect(Tracked(limits, streams))),
        *metadata_routes,
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    if settings.transport == "sse":
        routes += [
            Route("/sse", endpoint=protect(Tracked(sse_endpoint, streams))),
            Mount("/messages/", app=protect(sse.handle_post_message)),
        ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lambda app: manager.run())
    return HttpService(app, streams, sessions)


def _guarded_protocol(base: type, settings: Settings, max_connections: int) -> type:
    """uvicorn's HTTP protocol, with a cap on open connections and a time limit for each request's headers."""
    busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
    body = json.dumps(
        {"jsonrpc": "2.0", "id": None, "error": {"code": LIMIT_EXCEEDED, "message": "too many open connections"}}
    )

    class GuardedProtocol(base):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                _warn_once(
                    "connections",
                    "%d connections are open (server.limits.max_connections); refusing more",
                    max_connections,
                )
                transport.write(busy % (len(body), body.encode()))
                transport.close()
                return
            self._expect_headers()

        def _expect_headers(self) -> None:
            waiting_after = self.cycle  # a new request replaces it once its headers are complete
            self._header_timer = self.loop.call_later(
                settings.header_timeout_seconds, self._headers_overdue, waiting_after
            )

        def _headers_overdue(self, waiting_after: Any) -> None:
            if self.cycle is waiting_after and not self.transport.is_closing():
                self.transport.close()  # a client dribbling its headers holds a connection no longer

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._header_timer.cancel()
                self._expect_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            timer = getattr(self, "_header_timer", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

    return GuardedProtocol


def connection_cap(settings: Settings, backends: int) -> int:
    """max_connections, lowered to stay below the process's file limit (raised to its hard limit first)."""
    try:
        import resource
    except ImportError:  # Windows
        return settings.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = settings.max_connections + FD_RESERVE + 4 * backends
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    cap = max(1, min(settings.max_connections, soft - FD_RESERVE - 4 * backends))
    if cap < settings.max_connections:
        log.warning("serving at most %d connections: the file limit is %d (ulimit -n)", cap, soft)
    return cap


async def serve_http(router: Router, server: RouterServer, stop: anyio.Event, listening: socket.socket) -> None:
    """Serve until `stop`, then drain: stop accepting, let calls in flight finish (up to drain_seconds), end streams."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:  # the router owns signals, so shutdown is ours to order
            yield

    settings = router.settings
    service = http_service(router, server)
    config = uvicorn.Config(
        service.app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="on",
        timeout_keep_alive=max(1, round(settings.keep_alive_seconds)),
        timeout_graceful_shutdown=max(1, math.ceil(settings.drain_seconds + STOP_GRACE)),
    )
    config.load()
    config.http_protocol_class = _guarded_protocol(
        config.http_protocol_class, settings, connection_cap(settings, len(router.backends))
    )
    web = _Uvicorn(config)
    async with anyio.create_task_group() as tg:

        async def drain_on_stop() -> None:
            await stop.wait()
            for listener in web.servers:  # at once: uvicorn would close them on its next tick
                listener.close()
            web.should_exit = True  # uvicorn closes idle connections, and waits for the others to finish
            log.info(
                "stopped accepting connections; %d call(s) in flight get up to %gs to finish (server.drain_seconds)",
                server.metrics.in_flight,
                settings.drain_seconds,
            )
            with anyio.move_on_after(settings.drain_seconds):
                await server.metrics.idle()
            if server.metrics.in_flight:
                log.warning(
                    "%d call(s) still running after %gs (server.drain_seconds); ending them",
                    server.metrics.in_flight,
                    settings.drain_seconds,
                )
            service.streams.end_all()
            server.listens.end_all()

        tg.start_soon(drain_on_stop)
        await web.serve(sockets=[listening])
        tg.cancel_scope.cancel()


RELOAD_POLL: Final = 2.0
"""Seconds between two looks at the config file's modification time and size."""


class ConfigReloader:
    """Hot reload: on SIGHUP, or when the config file changes, re-read it and apply it to the running router.

    A config with problems is rejected whole (its problems logged, the running one kept). Otherwise added backends
    start, removed ones stop, changed ones (whose BackendConfig differs) are replaced, and the rest, with every
    client session, are left alone; clients hear list_changed when their lists change. Router settings are read
    once at start: a changed one is logged as needing a restart.
    """

    def __init__(
        self,
        router: Router,
        config: Config,
        path: str | None,
        env: Mapping[str, str],
        overrides: Mapping[str, Any] | None = None,
        *,
        connectors: Mapping[str, Connector] | None = None,
    ) -> None:
        self.router = router
        self.config = config
        self.path = path
        self.env = env
        self.overrides = dict(overrides or {})
        self.connectors = connectors or {}
        """Connectors for backends a reload adds, by name (tests pass in-process ones); else the config's transport."""
        self._seen = self._stamp()

    def watched_file(self) -> Path:
        """The file load_config reads: the one named, else $MCP_BACKENDS_CONFIG, else ./backends.yaml (which may appear later)."""
        return Path(self.path or self.env.get("MCP_BACKENDS_CONFIG") or CONFIG_FILE_NAME)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            info = self.watched_file().stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_size

    def check_file(self) -> bool:
        """Reload if the file changed since it was last seen; whether it had."""
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        log.info("%s changed; reloading", self.watched_file())
        self.reload()
        return True

    async def watch(self, interval: float = RELOAD_POLL) -> None:
        while True:
            await anyio.sleep(interval)
            self.check_file()

    def reload(self) -> bool:
        """Apply the config file as it is now; False (and the running config kept) if it has problems."""
        self._seen = self._stamp()
        try:
            new = load_config(self.path, self.env, self.overrides)
        except ConfigError as err:
            log.error("config reload rejected, still running the previous one:\n  %s", "\n  ".join(err.problems))
            return False
        old, self.config = self.config, new
        log_redaction.secrets = sorted({*log_redaction.secrets, *new.secrets()}, key=len, reverse=True)
        for s in SETTINGS:
            if getattr(old.settings, s.field) != getattr(new.settings, s.field):
                log.warning("%s (%s) changed; it takes effect when the router restarts", s.yaml_path, s.env)
        before, after = {b.name: b for b in old.backends}, {b.name: b for b in new.backends}
        for name in before.keys() - after.keys():
            log.info("backend %s: removed by reload", name)
            self.router.remove_backend(name)
        for name, backend in after.items():
            if name in before and before[name] == backend:
                continue
            if name in before:
                log.info("backend %s: changed; restarting it with its new settings", name)
                self.router.remove_backend(name)
            else:
                log.info("backend %s: added by reload", name)
            self.router.add_backend(backend, self.connectors.get(name))
        return True


SLOW_START: Final = 5.0
"""Seconds after which a backend still starting is logged, once."""


async def note_slow_starts(router: Router, after: float = SLOW_START) -> None:
    """Log once each backend that is still starting `after` seconds in: the wait is the backend's, not the router's."""
    await anyio.sleep(after)
    for backend in list(router.backends.values()):
        if not backend.first_attempt_done.is_set():
            log.info("waiting for backend %s, %g s", backend.name, after)


async def run_router(started: Started) -> None:
    """Start the backends (taking the stdio ones launched already) and serve until the client leaves or a signal arrives.

    SIGINT and SIGTERM stop the router, whatever its stdin and stdout are; SIGHUP reloads the configuration.
    """
    config, listening, launched = started.config, started.listening, started.launched
    router = Router(
        config, connectors={b.name: _connector_for(b, launched[b.name]) for b in config.backends if b.name in launched}
    )
    server = build_server(router)
    if not config.backends:
        log.info("%s; serving the management tools only", no_backends_hint(config.source))
    stop = anyio.Event()
    reloader = ConfigReloader(router, config, started.args.config, os.environ, setting_flags(started.args))
    async with router.running(), anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("received SIGHUP; reloading %s", reloader.watched_file())
                        reloader.reload()
                        continue
                    log.info("received %s; stopping", signal.Signals(signum).name)
                    stop.set()
                    if config.settings.transport == "stdio":
                        tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        tg.start_soon(note_slow_starts, router)
        tg.start_soon(reloader.watch)
        if listening is not None:
            where = f"http://{config.settings.host}:{config.settings.port}"
            log.info(
                "serving streamable HTTP on %s/mcp%s (%s)",
                where,
                f" and legacy SSE on {where}/sse" if config.settings.transport == "sse" else "",
                running_loop_name(),
            )
            await serve_http(router, server, stop, listening)
        else:
            await serve_stdio(server, router)
        tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------- CLI
# The subcommands other than serve. Each runs a Router of its own and reaches it as a client would, through an
# in-memory MCP client connected to build_server(router): what they show is what a client gets.


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], file: Any = None) -> None:
    cells = [[str(h) for h in headers], *([("" if c is None else str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=file or sys.stdout)


async def _show_starting(router: Router, began: float) -> None:
    """Which backends are still starting, on stderr: one updating line on a terminal, a plain line per change otherwise."""
    terminal = sys.stderr.isatty()
    shown = None
    while True:
        waiting = [b.name for b in router.backends.values() if not b.first_attempt_done.is_set()]
        text = f"starting: {', '.join(waiting)} ({time.monotonic() - began:.0f} s)" if waiting else ""
        if terminal:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
        elif waiting and waiting != shown:
            print(f"still starting: {', '.join(waiting)}" if shown else text, file=sys.stderr)
        shown = waiting
        with anyio.move_on_after(0.5 if terminal else math.inf):
            await router.changed.wait()


async def _started_router(router: Router, timeout: float) -> dict[str, float]:
    """Wait, within `timeout`, for every backend's first connection attempt; the seconds each took, by name."""
    began = time.monotonic()
    took: dict[str, float] = {}

    async def timed(backend: Backend) -> None:
        await backend.first_attempt_done.wait()
        took[backend.name] = time.monotonic() - began

    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_show_starting, router, began)
            async with anyio.create_task_group() as attempts:
                for backend in router.backends.values():
                    attempts.start_soon(timed, backend)
            tg.cancel_scope.cancel()
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    return took


def _check_row(r: Mapping[str, Any]) -> tuple[Any, ...]:
    era = f"{r['era']} {r['protocol_version']}" if r["protocol_version"] else None
    seconds = f"{r['startup_seconds']:.2f}s" if r["startup_seconds"] is not None else None
    return (
        r["name"],
        r["transport"],
        era,
        r["state"],
        r["tools"],
        r["resources"],
        r["prompts"],
        seconds,
        r["last_error"],
    )


async def run_check(started: Started) -> int:
    """`check`: start every backend, then report each: 0 if every enabled backend came up, else 1."""
    args, router = started.args, Router(started.config)
    async with router.running():
        took = await _started_router(router, args.timeout)
        rows = []
        for backend in router.backends.values():
            info = backend.status()
            error = info["last_error"]
            if backend.config.enabled and backend.name not in took:
                error = f"still starting after --timeout {args.timeout:g}s"
            seconds = took.get(backend.name)
            rows.append(
                info
                | {"enabled": backend.config.enabled, "last_error": error}
                | {"startup_seconds": round(seconds, 2) if seconds is not None and backend.config.enabled else None}
            )
    failed = [r["name"] for r in rows if r["enabled"] and r["state"] != "ready"]
    if args.json:
        print(json.dumps({"ok": not failed, "source": started.config.source, "backends": rows}, indent=2))
    elif not rows:
        print(no_backends_hint(started.config.source))
    else:
        headers = ("BACKEND", "TRANSPORT", "ERA", "STATE", "TOOLS", "RESOURCES", "PROMPTS", "START-UP", "ERROR")
        _print_table(headers, map(_check_row, rows))
        print(
            f"\n{len(rows) - len(failed)} of {len(rows)} backends ready"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    return 1 if failed else 0


async def _listed_tools(client: Client) -> list[types.Tool]:
    tools, cursor = [], None
    while True:
        result = await client.session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools += result.tools
        if not (cursor := result.next_cursor):
            return tools


async def run_tools(started: Started) -> int:
    """`tools`: the tools a client sees, with backend and original name; warns past popular clients' limits."""
    args, router = started.args, Router(started.config)
    async with router.running():
        await _started_router(router, args.timeout)
        async with Client(build_server(router), mode="legacy", cache=None) as client:
            tools = await _listed_tools(client)
    rows: list[dict[str, Any]] = []
    for tool in tools:
        entry = router.catalogue.tools.get(tool.name)
        backends, original = (list(entry.pool), entry.original) if entry else (["(router)"], tool.name)
        if fnmatchcase(tool.name, args.pattern):
            rows.append(
                {"name": tool.name, "backends": backends, "original": original, "description": tool.description}
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(
            ("TOOL", "BACKEND", "ORIGINAL NAME"), [(r["name"], ",".join(r["backends"]), r["original"]) for r in rows]
        )
    limit = next(((n, who) for n, who in CLIENT_TOOL_LIMITS if len(tools) > n), None)
    if limit is not None:
        print(
            f"mcp-router: warning: {len(tools)} tools is more than {limit[1]} takes; trim them with a backend's"
            " include or exclude list (glob patterns of its original tool names) in the config",
            file=sys.stderr,
        )
    return 0


async def run_call(started: Started) -> int:
    """`call`: one tool call through the router; prints its text and structuredContent; 1 if it failed."""
    args, arguments = started.args, started.args.arguments
    router = Router(started.config)
    async with router.running():
        with anyio.move_on_after(args.timeout):
            await router.wait_ready()
        async with Client(build_server(router), mode="legacy", cache=None) as client:
            try:
                request = types.CallToolRequest(params=types.CallToolRequestParams(name=args.tool, arguments=arguments))
                result = await client.session.send_request(request, types.CallToolResult)
            except MCPError as err:
                print(f"mcp-router: call {args.tool}: error {err.code}: {err.message}", file=sys.stderr)
                return 1
    texts = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            print(block.text)
            texts.append(block.text)
        else:
            print(json.dumps(block.model_dump(by_alias=True, mode="json", exclude_none=True)))
    if result.structured_content is not None and not any(
        _is_json_of(text, result.structured_content) for text in texts
    ):
        print(
            json.dumps(result.structured_content, indent=2)
        )  # unless a text block carries it already, as tools should
    return 1 if result.is_error else 0


def _is_json_of(text: str, value: Any) -> bool:
    try:
        return bool(json.loads(text) == value)
    except ValueError:
        return False


SUBCOMMANDS: Final[dict[str, Callable[[Started], Awaitable[int | None]]]] = {
    "serve": run_router,
    "check": run_check,
    "tools": run_tools,
    "call": run_call,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the router with `argv`, by default the command line (which, run as a program, has started already)."""
    started = STARTED if argv is None and STARTED is not None else start(argv)
    if isinstance(started, int):
        return started
    try:
        options = event_loop_options(started.config.settings.event_loop)
        return anyio.run(SUBCOMMANDS[started.args.command], started, backend_options=options) or 0
    except KeyboardInterrupt:
        return 130
    except RouterError as err:
        log.error("%s", err)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
