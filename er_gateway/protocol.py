"""Request and response shapes of the public API (no logic here).

Requests are validated with pydantic so a wrong type becomes a 400 naming the
field; unknown fields on embeddings are kept, because vLLM has many extras
(`truncate_prompt_tokens`, `embed_dtype`, ...) that must reach it untouched.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictInt, StrictStr, field_validator, model_validator

from .errors import GatewayError
from .settings import KIND_ALIASES

TokenIds = list[StrictInt]
EmbeddingInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request plus the Qwen3 query instruction; other vLLM fields pass through."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {"model": "Qwen3-Embedding-0.6B", "input": ["what is a panda?"], "input_type": "query"},
            ]
        },
    )

    model: StrictStr | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64", "bytes"] | None = None
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None
    # Gateway extras (Qwen3-Embedding query instruction); never sent upstream.
    instruction: StrictStr | None = None
    input_type: (
        Literal["query", "document", "search_query", "search_document", "classification", "clustering"] | None
    ) = None
    # Voyage's names: the vector type (README, "Embedding types") and `dimensions`.
    output_dtype: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = None
    output_dimension: StrictInt | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _aliases(self) -> EmbeddingRequest:
        if self.dimensions is None:
            self.dimensions = self.output_dimension
        return self

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(x, list) and not x for x in v)):
            raise ValueError("input must not be empty")
        if isinstance(v, str) and v == "":
            raise ValueError("input must not be an empty string")
        return v


class CohereContent(BaseModel):
    type: Literal["text"]
    text: StrictStr


class CohereInput(BaseModel):
    content: list[CohereContent] = Field(min_length=1)


EmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


def _float_only() -> list[EmbeddingType]:
    return ["float"]


class CohereEmbedRequest(BaseModel):
    """Cohere's v2 embed: `texts` (or `inputs` of text content), an `input_type` that picks the
    Qwen3 instruction, `embedding_types`, `output_dimension` (Matryoshka) and `truncate`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "Qwen3-Embedding-0.6B",
                    "texts": ["what is a panda?"],
                    "input_type": "search_query",
                    "embedding_types": ["float", "int8"],
                },
            ]
        },
    )

    model: StrictStr | None = None
    texts: list[StrictStr] | None = Field(None, min_length=1)
    inputs: list[CohereInput] | None = Field(None, min_length=1)
    input_type: Literal["search_document", "search_query", "classification", "clustering"] = "search_document"
    embedding_types: list[EmbeddingType] = Field(default_factory=_float_only, min_length=1)
    output_dimension: StrictInt | None = Field(None, ge=1)
    truncate: Literal["NONE", "START", "END"] = "END"
    max_tokens: StrictInt | None = Field(None, ge=1, description="tokens kept of each text (END or START)")

    @model_validator(mode="after")
    def _one_input_field(self) -> CohereEmbedRequest:
        if (self.texts is None) == (self.inputs is None):
            raise ValueError("give either texts or inputs")
        if any(t == "" for t in self.all_texts()):
            raise ValueError("texts must not be empty strings")
        return self

    def all_texts(self) -> list[str]:
        if self.texts is not None:
            return self.texts
        return ["\n".join(c.text for c in i.content) for i in self.inputs or ()]


class CohereEmbedResponse(BaseModel):
    id: str
    embeddings: dict[str, list[Any]] = Field(description="one list per requested embedding type, in input order")
    texts: list[str]
    meta: dict[str, Any]
    response_type: Literal["embeddings_by_type"]


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: StrictStr


class RerankRequest(BaseModel):
    """Jina/Cohere rerank, plus `max_length` (truncate each document to that many tokens) and
    the Qwen3 `instruction`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "model": "Qwen3-Reranker-0.6B",
                    "query": "what is a panda?",
                    "documents": ["The giant panda is a bear.", "Paris is in France."],
                    "top_n": 1,
                },
            ]
        },
    )

    model: StrictStr | None = None
    query: StrictStr = Field(min_length=1)
    documents: list[Union[StrictStr, RerankDocument]] = Field(min_length=1)
    top_n: StrictInt | None = Field(None, ge=0)
    top_k: StrictInt | None = Field(None, ge=0, description="Voyage's name for top_n")
    return_documents: bool = True
    instruction: StrictStr | None = None
    max_length: StrictInt | None = Field(None, ge=1)
    max_tokens_per_doc: StrictInt | None = Field(None, ge=1, description="Cohere v2's name for max_length")
    truncate_prompt_tokens: StrictInt | None = None

    @model_validator(mode="after")
    def _aliases(self) -> RerankRequest:
        # One meaning, several dialects: the first that is set wins, in the order clients document.
        if self.top_n is None:
            self.top_n = self.top_k
        if self.max_length is None:
            self.max_length = self.max_tokens_per_doc
        return self

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ReloadModelRequest(BaseModel):
    """`POST /reload_model` with a body: restart one kind's vLLM servers with new settings.

    An empty body (or `{}`) re-reads the config and keys files instead. `kind` takes
    `reranker`/`rerank` or `embedding`.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "reranker",
                    "model_path": "Qwen/Qwen3-Reranker-4B",
                    "model_size": "4B",
                    "gpu_memory_utilization": 0.9,
                    "max_model_len": 8192,
                },
            ]
        },
    )

    kind: Literal["embedding", "rerank"] = "rerank"
    model_path: StrictStr | None = Field(None, min_length=1)
    model_size: Literal["0.6B", "4B", "8B"] | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: StrictInt | None = Field(None, ge=1)

    @field_validator("kind", mode="before")
    @classmethod
    def _kind_alias(cls, v: Any) -> Any:
        return KIND_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("model_path")
    @classmethod
    def _plain_path(cls, v: str | None) -> str | None:
        # It becomes vLLM's first argument: a leading dash would be read as an option.
        if v is not None and (v.startswith("-") or not v.isprintable()):
            raise ValueError(
                "model_path must be a hub name or a path, not starting with '-' and without control characters"
            )
        return v

    def settings(self) -> dict[str, Any]:
        """The settings asked for (the fields given, without `kind`)."""
        return self.model_dump(exclude={"kind"}, exclude_none=True)


ScoreText = Union[StrictStr, list[StrictStr]]
# The (first, second) field pairs some vLLM version's /score takes.
SCORE_PAIRS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2"))


class ScoreRequest(BaseModel):
    """vLLM's own `/score`, passed through as sent: `text_1` scored against `text_2`.

    The other pairs some vLLM versions take (`queries`/`documents`, `queries`/`items`,
    `data_1`/`data_2`) reach vLLM unchecked but for their size.
    """

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "Qwen3-Reranker-0.6B",
                    "text_1": "what is a panda?",
                    "text_2": ["The giant panda is a bear."],
                },
            ],
            "anyOf": [{"required": list(pair)} for pair in SCORE_PAIRS],
        },
    )

    model: StrictStr | None = None
    text_1: ScoreText | None = Field(None, min_length=1)
    text_2: ScoreText | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_pair(cls, data: Any) -> Any:
        # A GatewayError passes through pydantic as it is, so the 400 names the field at fault.
        if isinstance(data, dict):
            if not any(a in data and b in data for a, b in SCORE_PAIRS):
                raise GatewayError(400, "'text_1' and 'text_2' are required", param="text_1")
            for f in dict.fromkeys(f for pair in SCORE_PAIRS for f in pair):
                if f in data and (data[f] == [] or data[f] == ""):
                    raise GatewayError(400, f"'{f}' must not be empty", param=f)
        return data


class BatchRerankRequest(BaseModel):
    """`POST /batch_rerank`: rerank requests answered in order (a bare JSON list works too)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "requests": [
                        {"query": "what is a panda?", "documents": ["The giant panda is a bear.", "Paris."]},
                        {"query": "capital of France", "documents": ["Paris is the capital of France."]},
                    ]
                },
            ]
        }
    )

    requests: list[RerankRequest] = Field(min_length=1)


# ---- answers (documented in /openapi.json; the gateway writes them without these models) ----
class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error, ...")
    param: str | None = Field(None, description="the request field at fault, when there is one")
    code: int = Field(description="the HTTP status")


class ErrorEnvelope(BaseModel):
    """Every error the gateway answers, whatever the route or status."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str] = Field(description="floats, or base64 float32 with encoding_format=base64")


class EmbeddingResponse(BaseModel):
    """vLLM's answer, passed through byte for byte."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class RerankedDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="the document's position in the request")
    relevance_score: float
    document: RerankedDocument | None = Field(None, description="with return_documents (the default)")


class RankedDocument(BaseModel):
    document: str
    score: float
    rank: int


class BilledUnits(BaseModel):
    search_units: int = Field(description="ceil(documents / 100), at least 1, as Cohere bills a search")


class MetaTokens(BaseModel):
    input_tokens: int


class RerankMeta(BaseModel):
    """Cohere's `meta`, which billing tools (LiteLLM, Dify) read for rerank cost."""

    api_version: dict[str, str]
    billed_units: BilledUnits
    tokens: MetaTokens


class RerankResponse(BaseModel):
    """Jina/Cohere shape; `/rerank` adds `scores` (in input order) and `ranked_documents`."""

    id: str
    model: str
    usage: Usage
    meta: RerankMeta
    results: list[RerankResult] = Field(description="best first, at most top_n")
    scores: list[float] | None = None
    ranked_documents: list[RankedDocument] | None = None


class BatchRerankResponse(RootModel[list[Union[RerankResponse, ErrorEnvelope]]]):
    """One entry per request, in order: its rerank answer, or its own error envelope."""


class ScoreItem(BaseModel):
    index: int
    object: str = "score"
    score: float


class ScoreResponse(BaseModel):
    """vLLM's answer, passed through byte for byte."""

    model_config = ConfigDict(extra="allow")

    data: list[ScoreItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["embedding", "rerank"]
    root: str = Field(description="the name the backend serves the model as")
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    """Readiness per model and replica (with `?model=`: that model's entry alone)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["healthy", "degraded", "unhealthy", "draining"] | None = None
    model_loaded: bool | None = None
    models: dict[str, Any] | None = None


class Probe(BaseModel):
    """A probe's answer: `/health/live` (the process serves) or `/health/ready` (send it traffic)."""

    status: Literal["alive", "ready", "unready", "draining"]
    models: dict[str, bool] | None = None  # /health/ready: whether each model can serve


class ReloadReach(BaseModel):
    """How many gateway processes the reload reached (this one included): every worker and every
    gateway sharing the Redis of --redis-url; without it, this process alone."""

    processes: int
    acknowledged: int
    failed: list[dict[str, Any]] = Field(default_factory=list)  # {"process": host:pid, "error": ...}
    silent: int | None = None  # got the message but did not answer within 10 s


class ReloadAnswer(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["reloaded"]
    processes: ReloadReach | None = None  # a config reload; a model restart has `served_as` instead


# ---- key admin (admin keys; the `keys` CLI's semantics) -----------------------------------------
class KeyCreateRequest(BaseModel):
    """`keys create` over HTTP: the key is in the answer, once."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "team-a", "rpm": 600, "models": ["Qwen3-Embedding-0.6B"]}]},
    )

    name: StrictStr = Field(min_length=1, max_length=128, pattern=r"^[^/\s\x00-\x1f]+$")
    rpm: StrictInt | None = Field(None, ge=1, description="requests per minute (default: --rate-limit)")
    rate_limit: StrictStr | None = Field(None, description="any limit spec instead of rpm, e.g. 10/second")
    tpm: StrictInt | None = Field(None, ge=1, description="token budget per minute")
    models: list[StrictStr] | None = None
    expires: StrictStr | None = Field(None, description="last valid day, YYYY-MM-DD (UTC), or an ISO datetime")
    admin: bool = False


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    hint: str
    state: Literal["active", "revoked", "expired"]
    rate_limit: str | None = None
    token_limit: str | None = None
    models: list[str] | None = None
    expires: str | None = None
    created: str
    admin: bool


class KeyList(BaseModel):
    data: list[KeyRecord]


class KeyCreated(KeyRecord):
    key: str = Field(description="the key itself: shown this once, only its hash is kept")


class UsageRow(BaseModel):
    date: str = Field(description="UTC day, YYYY-MM-DD")
    key: str
    model: str
    requests: int = Field(description="answered with a status below 400")
    inputs: int = Field(description="their inputs (embeddings) or documents (rerank, score)")
    errors: int = Field(description="answered 400 or above, after naming a model")
    tokens: int = Field(description="what vLLM counted doing (cached inputs not), failed parts included")


class UsageList(BaseModel):
    object: Literal["list"]
    days: int
    data: list[UsageRow]
