"""One typed settings object, filled from flag > environment > config file > default.

Every option is declared once in ``OPTIONS``; the CLI flags, the ``ER_*``
environment variables, the config-file keys and ``--help`` are all generated
from that table, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from limits import parse as parse_limit
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .httpclient import check_backend_url

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
BACKEND_KEY_FILE = "vllm_api_key"  # in the log directory, written by start_vllm_models.sh

Kind = Literal["embedding", "rerank"]
# What people type for a kind ("reranker", "embed"), as the kind it means.
KIND_ALIASES = {"reranker": "rerank", "embed": "embedding", "embeddings": "embedding"}
PromptMode = Literal["gateway", "server", "none"]


class ModelConfig(BaseModel):
    """One model the gateway serves: a name clients send and the replicas behind it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Kind
    urls: list[str] = Field(min_length=1)
    # The name the vLLM server was started with (--served-model-name); defaults to `name`.
    served_name: str | None = None
    aliases: list[str] = Field(default_factory=list)
    prompt: PromptMode = "gateway"
    instruction: str | None = None
    # The model's tokenizer.json (or a directory holding it): exact token counts for budgets
    # and `max_length` cut in the gateway. Unset: looked up in the Hugging Face cache.
    tokenizer: str | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_alias(cls, v: Any) -> Any:
        return KIND_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("urls", mode="before")
    @classmethod
    def _split_urls(cls, v: Any) -> Any:
        return backend_urls(v)

    @property
    def backend_name(self) -> str:
        return self.served_name or self.name


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = 2048
    config: str | None = None
    embedding_urls: list[str] = ["http://127.0.0.1:8000"]
    embedding_model: str = "Qwen3-Embedding-0.6B"
    reranker_urls: list[str] = ["http://127.0.0.1:8001"]
    reranker_model: str = "Qwen3-Reranker-0.6B"
    reranker_prompt: PromptMode = "gateway"
    embedding_tokenizer: str | None = None
    reranker_tokenizer: str | None = None
    default_instruction: str = DEFAULT_INSTRUCTION
    backend_api_key: str | None = None
    keys_file: str = "er_api_keys.json"
    keys_store: Literal["file", "redis"] = "file"
    rate_limit: str = "100/minute"
    token_limit: str | None = None
    redis_url: str | None = None
    redis_failure_mode: Literal["open", "closed"] = "open"
    redis_timeout: float = Field(0.5, gt=0)
    redis_breaker_interval: float = Field(5.0, ge=0)
    max_concurrency: int = Field(500, ge=1)
    # None: half of max_concurrency (at least 1), so one key never holds every slot.
    max_concurrency_per_key: int | None = Field(None, ge=1)
    queue_timeout: float = Field(30.0, ge=0)
    global_max_concurrency: int | None = Field(None, ge=1)
    global_lease_ttl: float = Field(10.0, ge=1)
    timeout: float = Field(600.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    max_json_values: int = Field(1_000_000, ge=1000)
    max_inputs: int = Field(2048, ge=1)
    max_documents: int = Field(1000, ge=1)
    max_batch_items: int = Field(64, ge=1)
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(60.0, gt=0)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    keepalive_timeout: float = Field(5.0, gt=0)
    max_connections: int = Field(4096, ge=1)
    # The largest legitimate answer: 2,048 inputs x 4,096 floats, at most 24 bytes each as JSON
    # (192 MiB), with headroom. Above it the answer is refused (502) instead of buffered.
    max_upstream_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    max_retries: int = Field(2, ge=0)
    health_interval: float = Field(5.0, gt=0)
    health_timeout: float = Field(2.0, gt=0)
    eject_cooldown: float = Field(5.0, ge=0)
    max_batch_inputs: int = Field(64, ge=1)
    max_batch_docs: int = Field(64, ge=1)
    coalesce: bool = True
    coalesce_wait_ms: float = Field(2.0, ge=0, le=1000)
    coalesce_max_inputs: int = Field(64, ge=1)
    coalesce_max_tokens: int = Field(16384, ge=1)
    cache_size: float = Field(256.0, ge=0)  # MB; 0 turns the result cache off
    cache_ttl: float = Field(86400.0, gt=0)
    cache_scope: Literal["key", "shared"] = "key"
    workers: int = Field(1, ge=1)
    usage_snapshot_interval: float = Field(60.0, gt=0)
    drain_delay: float = Field(5.0, ge=0)
    drain_timeout: float = Field(30.0, ge=0)
    log_dir: str = "logs"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    log_max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    log_backups: int = Field(5, ge=0)
    access_log: bool = True
    metrics_auth: bool = False
    status_auth: bool = True
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    http2: bool = False
    manage_models: bool = False
    otlp_endpoint: str | None = None
    models: list[ModelConfig] = Field(default_factory=list)

    @field_validator("embedding_urls", "reranker_urls", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        return backend_urls(v)

    @field_validator("rate_limit", "token_limit")
    @classmethod
    def _limit_spec(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                parse_limit(v)
            except ValueError:
                raise ValueError(f"{v!r} is not a limit like 100/minute or 1000/hour") from None
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fill_models(self) -> Settings:
        # Without a `models:` list the flags describe one embedding and one reranker model.
        if not self.models:
            if self.embedding_urls:
                self.models.append(
                    ModelConfig(
                        name=self.embedding_model,
                        kind="embedding",
                        urls=self.embedding_urls,
                        tokenizer=self.embedding_tokenizer,
                    )
                )
            if self.reranker_urls:
                self.models.append(
                    ModelConfig(
                        name=self.reranker_model,
                        kind="rerank",
                        urls=self.reranker_urls,
                        prompt=self.reranker_prompt,
                        tokenizer=self.reranker_tokenizer,
                    )
                )
            if not self.models:
                raise ValueError("no model to serve: --embedding-url and --reranker-url are both `none`")
        names: set[str] = set()
        for m in self.models:
            for n in (m.name, *m.aliases):
                if n in names:
                    raise ValueError(f"model name {n!r} is configured twice")
                names.add(n)
        if self.manage_models and self.workers > 1:
            raise ValueError(
                "--manage-models needs --workers 1: a reload drains and restarts replicas from one "
                "process, and other workers would keep sending to a server being restarted"
            )
        if self.otlp_endpoint is not None:
            from .observability.tracing import available

            if not urlsplit(self.otlp_endpoint).scheme.startswith("http"):
                raise ValueError(f"--otlp-endpoint must be an http(s) URL, got {self.otlp_endpoint!r}")
            if not available():
                raise ValueError(
                    "--otlp-endpoint needs the OpenTelemetry SDK: pip install 'er-gateway[otlp]' "
                    "(opentelemetry-sdk, opentelemetry-exporter-otlp-proto-http)"
                )
        if self.global_max_concurrency is not None and not self.redis_url:
            raise ValueError("--global-max-concurrency needs --redis-url: the gateways share its slots there")
        if self.keys_store == "redis" and not self.redis_url:
            raise ValueError("--keys-store redis needs --redis-url")
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                "--workers > 1 needs --redis-url: each worker would keep its own in-memory "
                "rate-limit counters, letting N times the configured rate through"
            )
        return self

    @property
    def per_key_concurrency(self) -> int:
        return self.max_concurrency_per_key or max(1, self.max_concurrency // 2)

    def default_model(self, kind: Kind) -> ModelConfig | None:
        """The model used when a request names none: the flag's name if present, else the first."""
        wanted = self.embedding_model if kind == "embedding" else self.reranker_model
        of_kind = [m for m in self.models if m.kind == kind]
        for m in of_kind:
            if m.name == wanted or wanted in m.aliases:
                return m
        return of_kind[0] if of_kind else None


def split_urls(value: str) -> list[str]:
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def backend_urls(value: Any) -> Any:
    """A comma-separated string or a list of backend URLs, normalised and checked."""
    if not isinstance(value, (str, list, tuple)):
        return value  # pydantic reports the wrong type
    urls = split_urls(value) if isinstance(value, str) else [str(u).strip().rstrip("/") for u in value]
    if urls == ["none"]:
        return []  # `--embedding-url none`: a host that serves only the other model
    for u in urls:
        check_backend_url(u)
    return urls


@dataclass(frozen=True)
class Option:
    field: str
    help: str
    metavar: str | None = None
    flag: str | None = None  # defaults to --field-with-dashes
    kind: Literal["value", "bool"] = "value"

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return "ER_" + self.field.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", "address to listen on", "ADDR"),
    Option("port", "port to listen on", "PORT"),
    Option("config", "YAML or TOML config file (same keys as the flags, plus a `models:` list)", "FILE"),
    Option(
        "embedding_urls",
        "embedding vLLM replica URL(s), comma-separated; `none` for a host without an embedding model",
        "URL[,URL...]",
        "--embedding-url",
    ),
    Option("embedding_model", "name of the default embedding model (vLLM --served-model-name)", "NAME"),
    Option(
        "reranker_urls",
        "reranker vLLM replica URL(s), comma-separated; `none` for a host without a reranker",
        "URL[,URL...]",
        "--reranker-url",
    ),
    Option("reranker_model", "name of the default reranker model", "NAME"),
    Option("reranker_prompt", "who applies the Qwen3-Reranker prompt: gateway | server | none", "MODE"),
    Option(
        "embedding_tokenizer",
        "the embedding model's tokenizer.json or its directory (default: found in "
        "the Hugging Face cache, else vLLM's /tokenize)",
        "PATH",
    ),
    Option(
        "reranker_tokenizer",
        "the reranker model's tokenizer.json or its directory (exact token counts, "
        "max_length cut in the gateway; default: the Hugging Face cache, else vLLM's /tokenize)",
        "PATH",
    ),
    Option("default_instruction", "instruction used when a request gives none", "TEXT"),
    Option(
        "backend_api_key",
        "key sent upstream as Bearer (vLLM's VLLM_API_KEY); clients' keys never are. "
        f"Unset: read from LOG_DIR/{BACKEND_KEY_FILE} (start_vllm_models.sh writes it) when every "
        "backend URL is loopback",
        "KEY",
    ),
    Option("keys_file", "API keys file (hashed keys)", "PATH"),
    Option(
        "keys_store",
        "file: keys in --keys-file (one host) | redis: keys in Redis (--redis-url), shared by every "
        "gateway; `keys import` copies the file there",
        "STORE",
    ),
    Option("rate_limit", "default per-key request limit, e.g. 100/minute", "SPEC"),
    Option("token_limit", "default per-key token budget, e.g. 100000/minute (off when unset)", "SPEC"),
    Option("redis_url", "Redis URL for limits shared by all workers and hosts (redis://host:port/db)", "URL"),
    Option("redis_failure_mode", "when Redis fails: open (serve, warn, count) | closed (503)", "MODE"),
    Option("redis_timeout", "seconds one Redis call may take before it counts as a failure", "S"),
    Option(
        "redis_breaker_interval",
        "after a Redis failure, seconds Redis is skipped (failure mode applies) before one request tries it again",
        "S",
    ),
    Option("max_concurrency", "max requests upstream at once (per gateway process group)", "N"),
    Option(
        "max_concurrency_per_key",
        "max upstream requests of one key at once; other keys' requests are "
        "queued fairly (default: half of --max-concurrency)",
        "N",
    ),
    Option("queue_timeout", "seconds a request may wait for a concurrency slot before 503", "S"),
    Option(
        "global_max_concurrency",
        "max upstream requests at once across every gateway sharing --redis-url (on top of "
        "--max-concurrency; off when unset)",
        "N",
    ),
    Option("global_lease_ttl", "seconds the global slots of a gateway that died stay taken", "S"),
    Option("timeout", "total upstream timeout in seconds (504 after)", "S"),
    Option("connect_timeout", "upstream connect timeout in seconds", "S"),
    Option("max_body_bytes", "largest request body accepted (413 above)", "N"),
    Option(
        "max_json_values",
        "most JSON values (array items, object members) in a request body, counted "
        "as it arrives; bounds what parsing a body costs (413 above)",
        "N",
    ),
    Option("max_inputs", "most inputs in one embeddings request (400 above)", "N"),
    Option("max_documents", "most documents in one rerank request (400 above)", "N"),
    Option("max_batch_items", "most requests in one /batch_rerank (400 above)", "N"),
    Option("header_timeout", "seconds a client may take to send a request's headers (connection closed after)", "S"),
    Option("body_timeout", "seconds a client may take to send a request's body (408 after)", "S"),
    Option("max_header_bytes", "largest request head (request line + headers) accepted (431 above)", "N"),
    Option("keepalive_timeout", "seconds an idle keep-alive connection is kept open", "S"),
    Option("max_connections", "most client connections open at once; more are closed at once, with a log line", "N"),
    Option("max_upstream_bytes", "largest answer body accepted from vLLM (502 above)", "N"),
    Option("max_retries", "retries on another replica after a connect error or a 503", "N"),
    Option("health_interval", "seconds between active health checks of each replica", "S"),
    Option("health_timeout", "timeout of one health check in seconds", "S"),
    Option("eject_cooldown", "seconds a replica gets no traffic after a connect error, timeout or 5xx", "S"),
    Option("max_batch_inputs", "embedding inputs per upstream request; larger requests are split", "N"),
    Option("max_batch_docs", "rerank documents per upstream request; larger requests are split", "N"),
    Option(
        "coalesce",
        "merge concurrent small embeddings/rerank requests into one upstream call "
        "(sent at once when the model is idle); --no-coalesce sends each alone",
        kind="bool",
    ),
    Option("coalesce_wait_ms", "longest a request waits for others to merge with while the model is busy", "MS"),
    Option("coalesce_max_inputs", "most inputs (or rerank documents) in one merged upstream call", "N"),
    Option(
        "coalesce_max_tokens",
        "most tokens in one merged upstream call, bounded by UTF-8 bytes (bigger requests go alone)",
        "N",
    ),
    Option(
        "cache_size",
        "MB of embedding vectors and rerank scores kept for identical inputs (LRU; shared through "
        "Redis with --redis-url); 0: no cache",
        "MB",
    ),
    Option("cache_ttl", "seconds a cached result lives in Redis", "S"),
    Option(
        "cache_scope",
        "key: each API key hits only its own entries (no key can learn what another embedded) | "
        "shared: every key shares them (more hits, for one tenant)",
        "SCOPE",
    ),
    Option("workers", "worker processes (more than 1 needs --redis-url)", "N"),
    Option(
        "usage_snapshot_interval",
        "without --redis-url: seconds between saves of the usage counters (GET /v1/usage) beside the keys file",
        "S",
    ),
    Option(
        "drain_delay",
        "on SIGTERM, seconds the gateway keeps serving (with /health/ready at 503) before it stops "
        "accepting connections, for load balancers to notice",
        "S",
    ),
    Option("drain_timeout", "after the drain delay, seconds in-flight requests may take to finish", "S"),
    Option("log_dir", "directory of embedding_reranker_proxy.log and access.log", "DIR"),
    Option("log_level", "debug | info | warning | error", "LEVEL"),
    Option("log_format", "text | json", "FORMAT"),
    Option("log_max_bytes", "rotate a log file at this size", "N"),
    Option("log_backups", "rotated log files kept", "N"),
    Option("access_log", "write logs/access.log", kind="bool"),
    Option("metrics_auth", "require an API key for GET /metrics", kind="bool"),
    Option("status_auth", "require an API key for GET /status (?api_key= works in a browser)", kind="bool"),
    Option("ssl_certfile", "TLS certificate (serve HTTPS)", "FILE"),
    Option("ssl_keyfile", "TLS private key", "FILE"),
    Option(
        "http2",
        "also serve HTTP/2: h2 over TLS (ALPN) and h2c with prior knowledge; HTTP/1.1 is served either way",
        kind="bool",
    ),
    Option(
        "otlp_endpoint",
        "export a span per request (admission, queue wait, upstream calls, batches) over OTLP/HTTP to this "
        "collector, e.g. http://otel-collector:4318 (needs the [otlp] extra); off when unset",
        "URL",
    ),
    Option(
        "manage_models",
        "the gateway manages the local vLLM servers: POST /reload_model with new settings "
        "restarts them through start_vllm_models.sh (scripts/run.sh turns this on for local backends)",
        kind="bool",
    ),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = Settings.model_fields
    for opt in OPTIONS:
        default = defaults[opt.field].default
        shown = ",".join(default) if isinstance(default, list) else default
        text = f"{opt.help} [env {opt.env}; default: {shown}]"
        if opt.kind == "bool":
            parser.add_argument(
                opt.cli,
                dest=opt.field,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            parser.add_argument(opt.cli, dest=opt.field, metavar=opt.metavar, default=argparse.SUPPRESS, help=text)


class SettingsError(Exception):
    """Configuration that cannot start a gateway; the message says what to fix."""


def load_settings(cli: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Merge flag > env > config file > default into one validated Settings."""
    cli = dict(cli or {})
    env = os.environ if environ is None else environ
    from_env = {o.field: env[o.env] for o in OPTIONS if env.get(o.env, "") != ""}
    if "reranker_prompt" not in from_env and env.get("RERANKER_PROMPT"):
        # The scripts' variable: one setting keeps vLLM and the gateway in agreement.
        from_env["reranker_prompt"] = env["RERANKER_PROMPT"]
    config_path = cli.get("config") or from_env.get("config")
    from_file = read_config_file(config_path) if config_path else {}
    merged: dict[str, Any] = {**from_file, **from_env, **cli}
    for o in OPTIONS:
        if o.kind == "bool" and isinstance(merged.get(o.field), str):
            merged[o.field] = merged[o.field].strip().lower() in ("1", "true", "yes", "on")
    try:
        settings = Settings.model_validate(merged)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            problems.append(f"{where}: {err['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
    if settings.backend_api_key is None:
        settings.backend_api_key = local_backend_key(settings)
    return settings


def local_backend_key(settings: Settings) -> str | None:
    """The key start_vllm_models.sh gave the vLLM servers on this machine, if it applies here.

    The start script protects vLLM's /v1 routes with a random key it keeps in
    LOG_DIR/vllm_api_key (0600); reading it here lets `./start_vllm_models.sh` followed by
    `scripts/run.sh` work without copying a secret around. Only when every backend URL is
    loopback: the file belongs to servers on this machine, and sending it elsewhere would hand
    the secret to another host. A file that exists but cannot be read is an error rather than
    a silent "no key", which would surface later as every request failing with 401.
    """
    urls = [u for m in settings.models for u in m.urls]
    if not urls or not all(is_loopback_url(u) for u in urls):
        return None
    path = Path(settings.log_dir) / BACKEND_KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(
            f"cannot read the vLLM key {path} ({getattr(e, 'strerror', None) or e}); run the gateway as "
            "the user that ran start_vllm_models.sh, or pass --backend-api-key"
        ) from None
    if not key:
        raise SettingsError(f"the vLLM key file {path} is empty; delete it and restart vLLM, or pass --backend-api-key")
    return key


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise SettingsError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(raw.decode())
        else:
            data = yaml.safe_load(raw) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise SettingsError(f"cannot parse config file {path}: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of settings")
    # Config files may spell keys with dashes, like the flags.
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for alias, field in (("embedding_url", "embedding_urls"), ("reranker_url", "reranker_urls")):
        if alias in data:
            data[field] = data.pop(alias)
    return data
