"""Which models there are, under which names, and who may use them.

A model is reached by its configured name, an alias, or a name its backends report serving
(learned by upstream.py from each replica's /v1/models). The catalog also holds each model's
tokenizer, which counts tokens for budgets without asking vLLM.
"""

from __future__ import annotations

from typing import Any

from .errors import GatewayError
from .keys import ApiKey
from .settings import Kind, ModelConfig, Settings
from .tokens import ModelTokenizer
from .upstream import Pool, Upstreams

EXACT_COUNT_MAX_CHARS = 64 * 1024  # texts counted exactly for a reservation (~60 ms); above, a bound


class Catalog:
    def __init__(self, settings: Settings, upstreams: Upstreams, tokenizers: dict[str, ModelTokenizer]) -> None:
        self.settings = settings
        self.upstreams = upstreams
        self.tokenizers = tokenizers
        self.by_name: dict[str, ModelConfig] = {}
        for m in settings.models:
            self.by_name[m.name] = m
            for a in m.aliases:
                self.by_name[a] = m

    def resolve(self, name: str | None, kind: Kind, key: ApiKey) -> Pool:
        """The pool serving `name` (or the default model of `kind`), if `key` may use it."""
        if name is None:
            model = self.settings.default_model(kind)
            if model is None:
                raise GatewayError(404, f"no {kind} model is configured; available: {self.names()}", param="model")
        else:
            model = self.lookup(name)
            if model is None:
                raise self.not_found(name)
        if model.kind != kind:
            others = ", ".join(m.name for m in self.settings.models if m.kind == kind) or "none"
            verb = "rerank/score" if kind == "rerank" else "embed"
            raise GatewayError(
                400,
                f"model {model.name!r} is a{'n' if model.kind == 'embedding' else ''} {model.kind} "
                f"model and cannot {verb}; {kind} models: {others}",
                param="model",
            )
        if not self.may_use(key, model):
            raise GatewayError(403, f"key {key.name!r} may not use model {model.name!r}", param="model")
        return self.upstreams.pools[model.name]

    def lookup(self, name: str) -> ModelConfig | None:
        """A model by a configured name or alias, else by a name its backends report serving."""
        return self.by_name.get(name) or self.upstreams.served.get(name)

    def not_found(self, name: str) -> GatewayError:
        return GatewayError(404, f"model {name!r} not found; available models: {self.names()}", param="model")

    def names_of(self, model: ModelConfig) -> list[str]:
        """Every name that reaches `model`: what its backends serve first, then the configured ones."""
        return list(dict.fromkeys([*self.upstreams.pools[model.name].own_names, model.name, *model.aliases]))

    def may_use(self, key: ApiKey, model: ModelConfig) -> bool:
        return key.models is None or not set(self.names_of(model)).isdisjoint(key.models)

    def names(self) -> str:
        return ", ".join(sorted({*self.by_name, *self.upstreams.served}))

    def model_table(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "urls": m.urls,
                    "aliases": m.aliases,
                    **({"prompt": m.prompt} if m.kind == "rerank" else {}),
                }
                for m in self.settings.models
            ]
        }

    def tokenizer(self, model: ModelConfig) -> ModelTokenizer | None:
        return self.tokenizers.get(model.name)

    async def count_tokens(self, model: ModelConfig, texts: list[str]) -> int:
        """Tokens in `texts`: exact with the model's tokenizer, else an upper bound.

        The bound is the UTF-8 length (a byte-level BPE token, as Qwen3's are, covers at least one
        byte). It is also used above EXACT_COUNT_MAX_CHARS: tokenizing costs ~0.5 s of CPU per MB
        and this is only a reservation, settled to vLLM's own count after the answer.
        """
        tok = self.tokenizers.get(model.name)
        if tok is not None and sum(map(len, texts)) <= EXACT_COUNT_MAX_CHARS:
            return sum(await tok.count_many_async(texts))
        return sum(len(t) if t.isascii() else len(t.encode()) for t in texts)


def use_backend_name(data: dict[str, Any], pool: Pool) -> bool:
    """Point a client body at the name vLLM serves (an alias or the configured name may differ).

    A body without `model` is left alone: vLLM then uses its one served model; so is one whose
    replicas serve different names (the field is dropped). Returns whether `data` changed (and
    so must be re-serialised).
    """
    requested = data.get("model")
    name = pool.upstream_name
    if requested is None or requested == name:
        return False
    if name is None:
        del data["model"]
    else:
        data["model"] = name
    return True
