from er_gateway.qwen3 import embedding_query, rerank_document_part, rerank_prompt, rerank_query_part


def test_reranker_prompt_is_the_model_cards() -> None:
    p = rerank_prompt("what?", "doc", "Find")
    assert p == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: Find\n<Query>: what?\n<Document>: doc<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert p == rerank_query_part("what?", "Find") + rerank_document_part("doc")


def test_embedding_query_format() -> None:
    assert embedding_query("q", "Do it") == "Instruct: Do it\nQuery:q"


def test_server_template_renders_the_same_prompt() -> None:
    from pathlib import Path

    import jinja2

    src = (Path(__file__).resolve().parents[1] / "templates" / "qwen3_reranker.jinja").read_text()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "query", "content": "what?"}, {"role": "document", "content": "doc"}]
    assert env.from_string(src).render(messages=msgs, instruction="Find") == rerank_prompt("what?", "doc", "Find")
    default = env.from_string(src).render(messages=msgs)
    assert "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n" in default
