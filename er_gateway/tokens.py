"""The model's own tokenizer in the gateway: exact token counts and `max_length` cuts.

Counting and cutting here, instead of a vLLM ``/tokenize`` + ``/detokenize`` pair per document,
turns 2,000 upstream calls for a 1,000-document rerank into one call into Rust, and lets token
budgets be charged before the request goes upstream. vLLM's ``/tokenize`` stays the fallback for
a model whose ``tokenizer.json`` is not found.

Counts never include special tokens (``add_special_tokens=False``): callers add the prompt
template themselves. Special tokens written *in* the text (``<|im_end|>``) count as one token
each, as vLLM counts them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from .settings import ModelConfig

log = logging.getLogger("er_gateway.tokens")

TOKENIZER_FILE = "tokenizer.json"
# The *_async helpers tokenize in a worker thread from this many characters on. encode_batch
# releases the GIL while Rust works, so the event loop keeps serving; below this size (a few ms
# at the 1-5 MB/s byte-level BPE manages per core) the thread hop is not worth it.
ASYNC_MIN_CHARS = 2048
# One thread for all tokenizing: big jobs queue behind each other instead of taking every core
# (encode_batch already spreads one job over the cores), and the event loop keeps running.
_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="er-tokenizer")
# Characters per wanted token in the window a `max_length` cut tokenizes: Qwen3's tokens average
# about 4 characters of English and 1.5 of Chinese, so this leaves a wide margin.
WINDOW_CHARS_PER_TOKEN = 16


class TokenizerError(Exception):
    """A tokenizer file cannot be used; the message says which file and why."""


class ModelTokenizer:
    """Wraps tokenizers.Tokenizer for one model."""

    def __init__(self, tokenizer: Tokenizer, path: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.path = path
        # Truncation or padding saved in tokenizer.json would silently change every count.
        tokenizer.no_truncation()
        tokenizer.no_padding()

    @classmethod
    def from_file(cls, path: str | Path) -> ModelTokenizer:
        given = Path(path).expanduser()
        p = given / TOKENIZER_FILE if given.is_dir() else given
        if not p.is_file():
            where = (
                f"directory {str(given)!r} has no {TOKENIZER_FILE}"
                if given.is_dir()
                else (f"tokenizer file {str(given)!r} does not exist")
            )
            raise TokenizerError(where)
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # the binding raises bare Exception for bad JSON or unknown parts
            raise TokenizerError(f"cannot load tokenizer {str(p)!r} (is it a Hugging Face tokenizer.json?): {e}") from e
        return cls(tok, p)

    def _encode(self, texts: list[str]) -> list[Encoding]:
        return self.tokenizer.encode_batch(texts, add_special_tokens=False)

    def _count(self, texts: list[str]) -> list[int]:
        # Counting needs no offsets, and skipping them saves about a quarter of the time;
        # tokenizers releases before encode_batch_fast existed compute them anyway.
        fast = getattr(self.tokenizer, "encode_batch_fast", None) or self.tokenizer.encode_batch
        return [len(e.ids) for e in fast(texts, add_special_tokens=False)]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_many(self, texts: list[str]) -> list[int]:
        return self._count(texts)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self.truncate_count_many([text], max_tokens)[0][0]

    def truncate_many(self, texts: list[str], max_tokens: int) -> list[str]:
        return self.truncate_count_many(texts, max_tokens)[0]

    def truncate_count_many(self, texts: list[str], max_tokens: int) -> tuple[list[str], list[int]]:
        """Each text cut to its first `max_tokens` tokens, and the token count of what is kept.

        A text is cut at the character offset where its token number `max_tokens` starts, so the
        kept characters are the original ones (no decode round trip); a text of at most
        `max_tokens` tokens comes back unchanged. The counts are those of the kept text, which
        is what the model sees and what a token budget should be charged.

        Only an opening window of each text is tokenized (WINDOW_CHARS_PER_TOKEN characters per
        token wanted), so 32 MB of documents with a small `max_length` costs what the kept parts
        cost, not seconds of CPU. A window that holds no more than `max_tokens` tokens (very long
        tokens, e.g. runs of spaces) is tokenized again in full.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        span = (max_tokens + 1) * WINDOW_CHARS_PER_TOKEN
        out, counts, totals = self._truncate([t[:span] for t in texts], max_tokens)
        redo = [i for i, t in enumerate(texts) if len(t) > span and totals[i] <= max_tokens]
        if redo:
            again, again_counts, _ = self._truncate([texts[i] for i in redo], max_tokens)
            for i, kept, c in zip(redo, again, again_counts, strict=True):
                out[i], counts[i] = kept, c
        return out, counts

    def _truncate(self, texts: list[str], max_tokens: int) -> tuple[list[str], list[int], list[int]]:
        """Cut texts, the counts of what is kept, and the counts of the texts as given."""
        encs = self._encode(texts)
        out = list(texts)
        counts = [len(e.ids) for e in encs]
        totals = list(counts)
        # A cut at a token boundary nearly always re-tokenizes to exactly the tokens before it,
        # but the pre-tokenizer can split the end of the shorter text differently: Qwen's regex
        # takes "\n \n" as one piece, a text cut after "\n " as two ("\n", " "), one token more.
        # So every cut text is counted again, and one over the limit is cut again that many
        # tokens earlier, until it fits ("" always does).
        want = {i: max_tokens for i, c in enumerate(counts) if c > max_tokens}
        while want:
            idx = list(want)
            cut = [texts[i][: _cut_at(texts[i], encs[i].offsets, want[i])] for i in idx]
            again: dict[int, int] = {}
            for i, kept, c in zip(idx, cut, self._count(cut), strict=True):
                if c <= max_tokens:
                    out[i], counts[i] = kept, c
                elif want[i] == 0:
                    out[i], counts[i] = "", 0  # nothing left to cut back: the empty prefix fits
                else:
                    again[i] = max(0, want[i] - (c - max_tokens))
            want = again
        return out, counts, totals

    # encode_batch holds the GIL only to build the Python results, so in a thread it lets the
    # event loop run; a single encode() holds it throughout, hence the batch calls below.
    async def count_many_async(self, texts: list[str]) -> list[int]:
        if not _big(texts):
            return self.count_many(texts)
        return await asyncio.get_running_loop().run_in_executor(_THREAD, self.count_many, texts)

    async def truncate_many_async(self, texts: list[str], max_tokens: int) -> list[str]:
        return (await self.truncate_count_many_async(texts, max_tokens))[0]

    async def truncate_count_many_async(self, texts: list[str], max_tokens: int) -> tuple[list[str], list[int]]:
        if not _big(texts):
            return self.truncate_count_many(texts, max_tokens)
        return await asyncio.get_running_loop().run_in_executor(_THREAD, self.truncate_count_many, texts, max_tokens)


def _big(texts: list[str]) -> bool:
    return sum(map(len, texts)) >= ASYNC_MIN_CHARS


def _cut_at(text: str, offsets: list[tuple[int, int]], n: int) -> int:
    """The character offset where the first `n` of these tokens end (len(offsets) > n)."""
    # Tokens with an empty span ((0, 0), as an inserted special token has) say nothing about
    # position and are skipped.
    end = next((e for s, e in reversed(offsets[:n]) if e > s), 0)
    start = next((s for s, e in offsets[n:] if e > s), None)
    if start is None:
        return end
    if start < end:
        # Byte-level BPE can end token n-1 inside a multi-byte UTF-8 character; every token
        # holding a piece of it reports the whole character. It cannot be kept (it needs token n
        # too) nor halved, so the cut moves back to where it starts: the result is
        # tokenizer.decode(ids[:n]) without its trailing U+FFFD. That loses up to 3 tokens (the
        # first 3 bytes of a 4-byte character), or up to 11 for the few characters NFC turns
        # into three 4-byte ones (U+1D160).
        return start
    # Characters no token claims lie between the two: ones NFC folded into the character
    # before (the U+0301 of "e\u0301") belong with token n-1; whitespace there is what
    # trim_offsets cut from either side, and is left out to be safe.
    gap = text[end:start]
    keep = next((i for i, ch in enumerate(gap) if ch.isspace()), len(gap))
    return end + keep


def hf_hub_cache() -> Path:
    """Where huggingface_hub keeps downloaded models, by its own order of settings."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_tokenizer(model: ModelConfig) -> Path | None:
    """model.tokenizer if set (file or dir; missing -> TokenizerError naming the setting), else a
    tokenizer.json in the Hugging Face cache for the model; never downloads anything; None if
    not found."""
    if model.tokenizer:
        given = Path(model.tokenizer).expanduser()
        f = given / TOKENIZER_FILE if given.is_dir() else given
        if f.is_file():
            return f
        what = (
            f"directory {str(given)!r} has no {TOKENIZER_FILE}"
            if given.is_dir()
            else (f"{str(given)!r} does not exist")
        )
        flag = "--reranker-tokenizer" if model.kind == "rerank" else "--embedding-tokenizer"
        raise TokenizerError(f"model {model.name!r}: tokenizer setting ({flag}, or `tokenizer:` under models) {what}")
    names = list(dict.fromkeys(n for n in (model.served_name, model.name) if n))
    for name in names:
        # vLLM started on a local directory serves it under that path unless renamed.
        if name.startswith(("/", "~")):
            local = Path(name).expanduser() / TOKENIZER_FILE
            if local.is_file():
                return local
    cache = hf_hub_cache()
    try:
        repos = {e.name.lower(): e for e in os.scandir(cache) if e.name.startswith("models--")}
    except OSError:
        return None
    for name in names:
        for repo_dir in _cached_repos(name, repos):
            found = _snapshot_tokenizer(Path(repo_dir.path))
            if found is not None:
                return found
    return None


def _cached_repos(name: str, repos: dict[str, os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    """Cache folders (models--org--name) a configured model name may stand for, best first."""
    if name.startswith(("/", "~")):
        name = Path(name).name  # a local model directory: its cached twin, by the bare name
    elif "/" in name:
        hit = repos.get("models--" + name.strip("/").replace("/", "--").lower())
        return [hit] if hit is not None else []
    # Without an org the default names are Qwen's; any other org only if it is the only one,
    # since two orgs' repos of one name (an original and a fine-tune) may tokenize differently.
    qwen = repos.get(f"models--qwen--{name.lower()}")
    if qwen is not None:
        return [qwen]
    same = [e for k, e in repos.items() if k.count("--") == 2 and k.endswith("--" + name.lower())]
    return same if len(same) == 1 else []


def _snapshot_tokenizer(repo: Path) -> Path | None:
    snapshots = repo / "snapshots"
    # The snapshot refs/main names is what huggingface_hub (and so vLLM) loads; the others are
    # older revisions, used newest first only when refs/main is missing or incomplete.
    try:
        head = (repo / "refs" / "main").read_text().strip()
    except OSError:
        head = ""
    if head and (snapshots / head / TOKENIZER_FILE).is_file():
        return snapshots / head / TOKENIZER_FILE
    found = [p for p in snapshots.glob(f"*/{TOKENIZER_FILE}") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def load_tokenizers(models: list[ModelConfig]) -> dict[str, ModelTokenizer]:
    """model.name -> tokenizer, for the models whose tokenizer.json was found.

    A configured tokenizer that cannot be loaded stops startup (TokenizerError); one found in
    the cache that cannot be loaded is logged and left to vLLM's /tokenize.
    """
    out: dict[str, ModelTokenizer] = {}
    loaded: dict[Path, ModelTokenizer] = {}  # models sharing a file share one copy (tens of MB)
    for m in models:
        path = find_tokenizer(m)
        if path is None:
            log.info("tokenizer for %s: none: falling back to vLLM /tokenize", m.name)
            continue
        try:
            key = path.resolve()
            out[m.name] = loaded[key] if key in loaded else loaded.setdefault(key, ModelTokenizer.from_file(path))
        except TokenizerError as e:
            if m.tokenizer:
                raise TokenizerError(f"model {m.name!r}: {e}") from e
            log.warning("tokenizer for %s: %s; falling back to vLLM /tokenize", m.name, e)
            continue
        log.info("tokenizer for %s: %s", m.name, path)
    return out
