"""Request and response shapes of the public API (no logic here).

Requests are validated with pydantic so a wrong type becomes a 400 naming the
field; unknown fields on embeddings are kept, because vLLM has many extras
(`truncate_prompt_tokens`, `embed_dtype`, ...) that must reach it untouched.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from .settings import KIND_ALIASES

TokenIds = list[StrictInt]
EmbeddingInput = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64", "bytes"] | None = None
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None
    # Gateway extras (Qwen3-Embedding query instruction); never sent upstream.
    instruction: StrictStr | None = None
    input_type: Literal["query", "document", "search_query", "search_document"] | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(isinstance(x, list) and not x for x in v)):
            raise ValueError("input must not be empty")
        if isinstance(v, str) and v == "":
            raise ValueError("input must not be an empty string")
        return v


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: StrictStr


class RerankRequest(BaseModel):
    """Jina/Cohere rerank, plus seed 000's `max_length` and the Qwen3 `instruction`."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    query: StrictStr = Field(min_length=1)
    documents: list[Union[StrictStr, RerankDocument]] = Field(min_length=1)
    top_n: StrictInt | None = Field(None, ge=0)
    return_documents: bool = True
    instruction: StrictStr | None = None
    max_length: StrictInt | None = Field(None, ge=1)
    truncate_prompt_tokens: StrictInt | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ReloadModelRequest(BaseModel):
    """`POST /reload_model` with seed 000's body: restart one kind's vLLM servers with new settings.

    An empty body (or `{}`) re-reads the config and keys files instead.
    """

    model_config = ConfigDict(extra="forbid")

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
            raise ValueError("model_path must be a hub name or a path, not starting with '-' and "
                             "without control characters")
        return v

    def settings(self) -> dict[str, Any]:
        """The settings asked for (the fields given, without `kind`)."""
        return self.model_dump(exclude={"kind"}, exclude_none=True)
