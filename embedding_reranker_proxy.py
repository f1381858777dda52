#!/usr/bin/env python3
"""Entry point: `python embedding_reranker_proxy.py [--help]` serves the gateway on :2048;
`python embedding_reranker_proxy.py keys ...` manages API keys. The code lives in er_gateway/."""

import sys

from er_gateway.cli import main

if __name__ == "__main__":
    sys.exit(main())
