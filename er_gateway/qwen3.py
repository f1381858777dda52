"""Qwen3 prompt formats, exactly as the model cards give them.

Qwen3-Reranker scores near random without its template, and vLLM applies it
only when started with ``--chat-template``; so in ``gateway`` mode the gateway
renders it and vLLM concatenates the two halves without a separator.
Qwen3-Embedding wants an instruction on queries only, never on documents.
"""

from __future__ import annotations

RERANK_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def rerank_query_part(query: str, instruction: str) -> str:
    """First half of the official prompt (sent as vLLM score `text_1`)."""
    return f"{RERANK_PREFIX}<Instruct>: {instruction}\n<Query>: {query}\n"


def rerank_document_part(document: str) -> str:
    """Second half of the official prompt (sent as vLLM score `text_2`)."""
    return f"<Document>: {document}{RERANK_SUFFIX}"


def rerank_prompt(query: str, document: str, instruction: str) -> str:
    """The whole prompt, as the reference implementation tokenizes it."""
    return rerank_query_part(query, instruction) + rerank_document_part(document)


def embedding_query(text: str, instruction: str) -> str:
    # No space after "Query:" — that is how the official code writes it.
    return f"Instruct: {instruction}\nQuery:{text}"


# Instructions for Cohere's `input_type`s beyond search (Qwen3-Embedding wants a task instruction
# on every input of such tasks; the model card's examples are of this form).
TASK_INSTRUCTIONS = {
    "classification": "Classify the given text into its category",
    "clustering": "Identify the main topic or theme of the given text",
}
