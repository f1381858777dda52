"""er_gateway.tokens on the tiny Qwen3 models' real tokenizer.json files (byte-level BPE)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from er_gateway import tokens
from er_gateway.settings import ModelConfig
from er_gateway.tokens import ModelTokenizer, TokenizerError, find_tokenizer, load_tokenizers

ROOT = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("ER_TEST_MODELS") or ROOT / "tests" / ".artifacts" / "models")
EMB_JSON = MODELS / "tiny-qwen3-embedding" / "tokenizer.json"
RER_JSON = MODELS / "tiny-qwen3-reranker" / "tokenizer.json"

if not (EMB_JSON.is_file() and RER_JSON.is_file()):
    # scripts/test.sh (the README's test command) builds them; without them this is a failure, not a skip.
    raise RuntimeError(
        f"tiny model tokenizers missing under {MODELS}; run bash scripts/test.sh (or scripts/make_tiny_models.py)"
    )

# Qwen3's own tokenizer.json runs NFC and this split regex before a regex-less byte-level step;
# the tiny models use the GPT-2 byte-level regex. The same vocabulary under Qwen's pipeline
# exercises what the tiny files cannot: NFC offsets and a cut that re-tokenizes longer.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def qwen_pipeline() -> Tokenizer:
    d = json.loads(RER_JSON.read_text())
    d["normalizer"] = {"type": "NFC"}
    d["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False},
            BYTE_LEVEL,
        ],
    }
    d["post_processor"] = d["decoder"] = BYTE_LEVEL
    return Tokenizer.from_str(json.dumps(d))


EMB = ModelTokenizer.from_file(EMB_JSON)
RER = ModelTokenizer.from_file(RER_JSON.parent)  # a directory works too
QWEN = ModelTokenizer(qwen_pipeline())
RAW = Tokenizer.from_file(str(RER_JSON))


def _bytes_to_unicode() -> dict[str, int]:
    # GPT-2's byte <-> printable-character table, which byte-level token strings are written in.
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


BYTE_OF = _bytes_to_unicode()


def byte_oracle(mt: ModelTokenizer, text: str, n: int) -> tuple[str, int]:
    """Independent of offsets: the UTF-8 bytes the first n token strings spell (and how many),
    cut back to a character boundary. Valid for texts the normalizer leaves alone."""
    enc = mt.tokenizer.encode(text, add_special_tokens=False)
    added = mt.tokenizer.get_added_tokens_decoder()
    size = 0
    for tid, tok in zip(enc.ids[:n], enc.tokens[:n], strict=True):
        size += len(added[tid].content.encode()) if tid in added else len(bytes(BYTE_OF[c] for c in tok))
    spelled = text.encode()[:size]
    assert len(spelled) == size
    return spelled.decode(errors="ignore"), size  # the bytes of a prefix: only the end can be torn


PIECES = [
    "a",
    "yes",
    "no",
    " ",
    "  ",
    "\n",
    "\n \n",
    "\r\n",
    "\t",
    "'s",
    "'ll",
    "中文",
    "字",
    "é",
    "e\u0301",
    "😀",
    "🎉",
    "\U0010ffff",
    "<|im_end|>",
    "<|endoftext|>",
    "0",
    "123",
    ".",
    "!?",
    "\ufffd",
    "ß",
]
texts = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=25).map("".join),
)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_invariants(mt: ModelTokenizer, t: str, n: int) -> str:
    cut = mt.truncate(t, n)
    assert t.startswith(cut)
    assert mt.count(cut) <= n
    assert mt.truncate_count_many([t], n) == ([cut], [mt.count(cut)])
    if mt.count(t) <= n:
        assert cut == t
    return cut


@pytest.mark.parametrize("mt", [RER, EMB], ids=["reranker", "embedding"])
@SETTINGS
@given(t=texts, n=st.integers(0, 70))
@example(t="a" + " " * 16 + "😀x", n=8)
@example(t=" 😀", n=3)
@example(t="", n=0)
def test_truncate_properties(mt: ModelTokenizer, t: str, n: int) -> None:
    cut = check_invariants(mt, t, n)
    ids = mt.tokenizer.encode(t, add_special_tokens=False).ids
    if len(ids) <= n:
        return
    # Tight: exactly the characters the first n tokens spell, less the one character token n
    # still holds bytes of (so at most 3 UTF-8 bytes short). With the GPT-2 regex of the tiny
    # tokenizers that cut never re-tokenizes over n, so no step back is ever taken.
    oracle, size = byte_oracle(mt, t, n)
    assert cut == oracle
    assert size - 3 <= len(cut.encode()) <= size
    # The other oracle: the decode the gateway used to ask vLLM for. It round-trips unless
    # token n-1 ends inside a character, which it then shows as one U+FFFD.
    decoded = mt.tokenizer.decode(ids[:n], skip_special_tokens=False)
    torn = len(cut.encode()) < size
    assert decoded == (cut + "\ufffd" if torn else cut)


@SETTINGS
@given(t=texts, n=st.integers(0, 70))
@example(t="a\n \n", n=2)
def test_truncate_properties_qwen_pipeline(t: str, n: int) -> None:
    cut = check_invariants(QWEN, t, n)
    ids = QWEN.tokenizer.encode(t, add_special_tokens=False).ids
    if len(ids) <= n or unicodedata.normalize("NFC", t) != t:
        return  # the byte oracle spells normalized text
    oracle, _ = byte_oracle(QWEN, t, n)
    if QWEN.count(oracle) <= n:
        assert cut == oracle
    else:  # the rare cut that re-tokenizes longer: stepped back a token or more
        assert oracle.startswith(cut) and len(cut) < len(oracle)


@SETTINGS
@given(
    words=st.lists(st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12), min_size=1, max_size=30),
    n=st.integers(0, 60),
)
def test_plain_words_keep_exactly_n_tokens(words: list[str], n: int) -> None:
    # Words joined by single spaces: every piece of the cut text re-tokenizes as it was.
    t = " ".join(words)
    assert RER.count(RER.truncate(t, n)) == min(n, RER.count(t))


def test_how_short_a_cut_can_come_out() -> None:
    # There is no n-1 bound on the re-tokenized count. Here the cut drops the 3 tokens holding
    # the first bytes of 😀 (token 8 holds its last), and the 16 spaces left at the end
    # re-tokenize as one token where they had been 3 + 1 before the emoji.
    t = "a" + " " * 16 + "😀x"
    enc = RAW.encode(t, add_special_tokens=False)
    assert enc.tokens[:8] == ["a", "ĠĠĠĠĠĠĠĠ", "ĠĠĠĠ", "ĠĠĠ", "Ġ", "ð", "Ł", "ĺ"]
    assert RER.truncate_count_many([t], 8) == (["a" + " " * 16], [2])


def test_count_matches_the_tokenizer_library() -> None:
    samples = [
        "",
        "Paris is the capital of France.",
        "中文字符 😀 é e\u0301",
        "<|im_end|> yes no",
        " " * 40,
        "line\n\nbreak\r\n\ttab",
        "x" * 3000,
    ]
    want = [len(RAW.encode(s, add_special_tokens=False).ids) for s in samples]
    assert [RER.count(s) for s in samples] == want
    assert RER.count_many(samples) == want
    assert RER.count("<|im_end|>") == 1  # a special token in the text is one token, as vLLM counts it
    # The embedding tokenizer appends <|endoftext|> when asked for special tokens; counts leave it out.
    emb_raw = Tokenizer.from_file(str(EMB_JSON))
    assert len(emb_raw.encode("hello", add_special_tokens=True).ids) == EMB.count("hello") + 1


def test_truncate_examples() -> None:
    t = "Paris is the capital of France. 巴黎是法国的首都。"
    ids = RAW.encode(t, add_special_tokens=False).ids
    for n in range(len(ids) + 2):
        cut = RER.truncate(t, n)
        decoded = RAW.decode(ids[:n], skip_special_tokens=False)
        assert cut == (decoded if t.startswith(decoded) else decoded[:-1])
    assert RER.truncate(" 😀", 3) == " "  # 2 of the 4 bytes of 😀: the character is dropped whole
    assert RAW.decode(RAW.encode(" 😀", add_special_tokens=False).ids[:3]) == " \ufffd"
    assert RER.truncate_many(["", "abc", t], 0) == ["", "", ""]
    assert RER.truncate("", 5) == "" and RER.count("") == 0 and RER.count_many([]) == []
    assert RER.truncate_many([], 3) == []
    with pytest.raises(ValueError, match="max_tokens"):
        RER.truncate("abc", -1)


def test_cut_that_re_tokenizes_longer_steps_back() -> None:
    # Qwen's regex reads "\n \n" as one piece, tokenized ["a", "\n ", "\n"]; cut after two tokens,
    # "a\n " splits into "a", "\n", " ": three tokens. The cut steps back a token.
    t = "a\n \n"
    enc = QWEN.tokenizer.encode(t, add_special_tokens=False)
    assert enc.tokens == ["a", "ĊĠ", "Ċ"]
    assert QWEN.count("a\n ") == 3
    assert QWEN.truncate_count_many([t, "a\n\n", "bb"], 2) == (["a", "a\n\n", "bb"], [1, 2, 2])


def test_nfc_offsets_point_into_the_original_text() -> None:
    t = "cafe\u0301 cafe\u0301"  # decomposed: NFC joins e + U+0301 before tokenizing
    for n in range(QWEN.count(t) + 1):
        cut = QWEN.truncate(t, n)
        assert t.startswith(cut) and QWEN.count(cut) <= n
        assert not cut.endswith("e") or not t[len(cut) :].startswith("\u0301")  # never splits é


def test_cut_offsets() -> None:
    # (0, 0) is what an inserted special token reports; it must not drag the cut to 0.
    t = "abcdefgh"
    offsets = [(0, 3), (0, 0), (3, 5), (0, 0), (5, 8)]
    assert [tokens._cut_at(t, offsets, n) for n in (1, 2, 3, 4)] == [3, 3, 5, 5]
    assert tokens._cut_at(t, [(0, 0), (0, 0), (0, 4)], 2) == 0
    assert tokens._cut_at(t, [(0, 2), (2, 3), (0, 0)], 2) == 3  # nothing after but empty spans
    assert tokens._cut_at(t, [(0, 2), (1, 2), (1, 2), (2, 3)], 2) == 1  # token 2 holds part of char 1
    # Unclaimed characters: folded into the previous one (kept), or trimmed whitespace (left out).
    assert tokens._cut_at("e\u0301\u0301x", [(0, 1), (3, 4)], 1) == 3
    assert tokens._cut_at("ab  cd", [(0, 2), (4, 6)], 1) == 2
    assert tokens._cut_at("e\u0301 x", [(0, 1), (3, 4)], 1) == 2


# --- async helpers


def test_async_helpers_run_big_batches_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    where: list[int] = []
    real = ModelTokenizer._encode

    def spy(self: ModelTokenizer, texts: list[str]):  # type: ignore[no-untyped-def]
        where.append(threading.get_ident())
        return real(self, texts)

    monkeypatch.setattr(ModelTokenizer, "_encode", spy)
    small, big = ["short text"], ["word " * 400] * 20
    assert sum(map(len, big)) >= tokens.ASYNC_MIN_CHARS > sum(map(len, small))

    async def run() -> None:
        loop = threading.get_ident()
        assert await RER.truncate_many_async(small, 1) == RER.truncate_many(small, 1)
        assert where.pop() == loop and where.pop() == loop
        assert await RER.truncate_many_async(big, 5) == RER.truncate_many(big, 5)
        where.pop()
        assert where.pop() != loop
        assert await RER.truncate_count_many_async(big, 5) == RER.truncate_count_many(big, 5)
        assert await RER.count_many_async(big) == RER.count_many(big)
        assert await RER.count_many_async(small) == [RER.count(small[0])]

    asyncio.run(run())


# --- loading and discovery


def model(name: str = "Qwen3-Reranker-0.6B", kind: str = "rerank", **kw: str) -> ModelConfig:
    return ModelConfig(name=name, kind=kind, urls=["http://127.0.0.1:8001"], **kw)  # type: ignore[arg-type]


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer file '.*nope\.json' does not exist"):
        ModelTokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match=r"directory '.*' has no tokenizer\.json"):
        ModelTokenizer.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(TokenizerError, match=r"cannot load tokenizer '.*tokenizer\.json' \(is it a Hugging Face"):
        ModelTokenizer.from_file(bad)
    bad.write_text("not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        ModelTokenizer.from_file(tmp_path)


def test_configured_tokenizer(tmp_path: Path) -> None:
    assert find_tokenizer(model(tokenizer=str(RER_JSON))) == RER_JSON
    assert find_tokenizer(model(tokenizer=str(RER_JSON.parent))) == RER_JSON
    with pytest.raises(TokenizerError) as e:
        find_tokenizer(model(tokenizer=str(tmp_path / "missing.json")))
    msg = str(e.value)
    assert "'Qwen3-Reranker-0.6B'" in msg and "--reranker-tokenizer" in msg and "missing.json' does not exist" in msg
    with pytest.raises(TokenizerError, match=r"--embedding-tokenizer.*directory '.*' has no tokenizer\.json"):
        find_tokenizer(model("emb", "embedding", tokenizer=str(tmp_path)))


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache at $HF_HOME/hub, nothing else in the environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    return hub


def cache_model(hub: Path, repo: str, snapshot: str = "0123abcd", *, main: bool = True) -> Path:
    folder = hub / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / snapshot
    snap.mkdir(parents=True)
    # The real cache holds symlinks into blobs/; found through them all the same.
    blob = folder / "blobs" / f"blob-{snapshot}"
    blob.parent.mkdir(exist_ok=True)
    shutil.copy(RER_JSON, blob)
    (snap / "tokenizer.json").symlink_to(blob)
    if main:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / "main").write_text(snapshot)
    return snap / "tokenizer.json"


def test_hf_cache_discovery(hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_tokenizer(model()) is None  # empty cache, nothing downloaded
    f = cache_model(hf_cache, "Qwen/Qwen3-Reranker-0.6B")
    assert find_tokenizer(model()) == f
    assert find_tokenizer(model("Qwen/Qwen3-Reranker-0.6B")) == f
    assert find_tokenizer(model("qwen3-reranker-0.6b")) == f  # cache folder case does not matter
    assert find_tokenizer(model("rerank", served_name="Qwen3-Reranker-0.6B")) == f
    assert find_tokenizer(model("rerank", served_name="/srv/models/Qwen3-Reranker-0.6B")) == f
    assert find_tokenizer(model("Other/Qwen3-Reranker-0.6B")) is None  # an org is taken at its word
    assert find_tokenizer(model("Qwen3-Embedding-0.6B", "embedding")) is None
    # A vLLM started on a local directory: its tokenizer.json is used directly.
    assert find_tokenizer(model("rerank", served_name=str(RER_JSON.parent))) == RER_JSON
    # HF_HUB_CACHE wins over HF_HOME.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert find_tokenizer(model()) is None


def test_hf_cache_snapshot_choice(hf_cache: Path) -> None:
    cache_model(hf_cache, "Qwen/Qwen3-Reranker-0.6B", "old")
    newer = cache_model(hf_cache, "Qwen/Qwen3-Reranker-0.6B", "new", main=False)
    assert find_tokenizer(model()).parent.name == "old"  # type: ignore[union-attr]  # refs/main decides
    (hf_cache / "models--Qwen--Qwen3-Reranker-0.6B" / "refs" / "main").write_text("gone")
    os.utime(newer.resolve(), (2e9, 2e9))
    assert find_tokenizer(model()) == newer  # refs/main names no snapshot: the newest


def test_hf_cache_other_orgs(hf_cache: Path) -> None:
    f = cache_model(hf_cache, "BAAI/bge-reranker-v2-m3")
    assert find_tokenizer(model("bge-reranker-v2-m3")) == f  # one org holds the name: that one
    cache_model(hf_cache, "someone/bge-reranker-v2-m3")
    assert find_tokenizer(model("bge-reranker-v2-m3")) is None  # two: ambiguous, not guessed
    q = cache_model(hf_cache, "Qwen/Qwen3-Reranker-0.6B")
    cache_model(hf_cache, "someone/Qwen3-Reranker-0.6B")
    assert find_tokenizer(model()) == q  # bare default names are Qwen's


def test_hf_cache_home_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tokens.hf_hub_cache() == tmp_path / ".cache" / "huggingface" / "hub"
    f = cache_model(tmp_path / ".cache" / "huggingface" / "hub", "Qwen/Qwen3-Reranker-0.6B")
    assert find_tokenizer(model()) == f


def test_load_tokenizers_logs_each_model(hf_cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = cache_model(hf_cache, "Qwen/Qwen3-Reranker-0.6B")
    models = [model(), model("Qwen3-Embedding-0.6B", "embedding"), model("emb2", "embedding", tokenizer=str(EMB_JSON))]
    with caplog.at_level(logging.INFO, logger="er_gateway.tokens"):
        got = load_tokenizers(models)
    assert set(got) == {"Qwen3-Reranker-0.6B", "emb2"}
    assert got["Qwen3-Reranker-0.6B"].path == f and got["emb2"].path == EMB_JSON
    shared = load_tokenizers(
        [model("a", "embedding", tokenizer=str(EMB_JSON)), model("b", "embedding", tokenizer=str(EMB_JSON.parent))]
    )
    assert shared["a"] is shared["b"]
    lines = [r.getMessage() for r in caplog.records][:3]
    assert lines == [
        f"tokenizer for Qwen3-Reranker-0.6B: {f}",
        "tokenizer for Qwen3-Embedding-0.6B: none: falling back to vLLM /tokenize",
        f"tokenizer for emb2: {EMB_JSON}",
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_load_tokenizers_bad_files(hf_cache: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Found in the cache but unreadable: left to vLLM, with a warning.
    f = cache_model(hf_cache, "Qwen/Qwen3-Reranker-0.6B")
    f.resolve().write_text("{}")
    with caplog.at_level(logging.INFO, logger="er_gateway.tokens"):
        assert load_tokenizers([model()]) == {}
    assert caplog.records[-1].levelno == logging.WARNING
    assert "falling back to vLLM /tokenize" in caplog.records[-1].getMessage()
    # Configured and unreadable: startup stops, naming the model.
    bad = tmp_path / "tok.json"
    bad.write_text("{}")
    with pytest.raises(TokenizerError, match=r"model 'x': cannot load tokenizer '.*tok\.json'"):
        load_tokenizers([model("x", tokenizer=str(bad))])
    with pytest.raises(TokenizerError, match="--reranker-tokenizer"):
        load_tokenizers([model("x", tokenizer=str(tmp_path / "absent"))])


def test_tokenizer_json_settings_do_not_change_counts(tmp_path: Path) -> None:
    d = json.loads(RER_JSON.read_text())
    d["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    d["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "<|endoftext|>",
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    mt = ModelTokenizer.from_file(tmp_path)
    t = "Paris is the capital of France, and Berlin is the capital of Germany."
    assert mt.count(t) == RER.count(t) > 4
    assert mt.count_many([t, ""]) == RER.count_many([t, ""])
    assert mt.truncate(t, 6) == RER.truncate(t, 6)
