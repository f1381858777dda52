#!/usr/bin/env python3
"""Download Qwen3-Embedding / Qwen3-Reranker weights for start_vllm_models.sh.

    python download_models.py --model-size 0.6B --kind all --output-dir ./models
    python download_models.py --model-size 4B --kind reranker --source modelscope

Resumable (an interrupted run continues where it stopped), with progress bars, and verified:
every file the repository lists must be present with its size, and every safetensors file must
have a readable header. Then start the servers with e.g.
    EMBEDDING_MODEL_PATH=./models/Qwen3-Embedding-0.6B RERANKER_MODEL_PATH=./models/Qwen3-Reranker-0.6B \\
    ./start_vllm_models.sh
Exit codes: 0 downloaded and verified; 1 verification failed; 2 usage, missing library or no network.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

SIZES = ("0.6B", "4B", "8B")
KINDS = {"embedding": "Qwen3-Embedding", "reranker": "Qwen3-Reranker"}


def repo_ids(size: str, kind: str) -> list[str]:
    kinds = list(KINDS) if kind == "all" else [kind]
    return [f"Qwen/{KINDS[k]}-{size}" for k in kinds]


def verify(directory: Path, expected: dict[str, int | None]) -> list[str]:
    """Problems with a downloaded model directory (empty list: fine)."""
    problems = []
    if not (directory / "config.json").exists():
        problems.append("config.json is missing")
    for name, size in expected.items():
        f = directory / name
        if not f.exists():
            problems.append(f"{name} is missing")
        elif size is not None and f.stat().st_size != size:
            problems.append(f"{name} has {f.stat().st_size} bytes, expected {size}")
    weights = list(directory.glob("*.safetensors"))
    if not weights and not list(directory.glob("*.bin")):
        problems.append("no weight files (*.safetensors or *.bin)")
    for w in weights:
        try:
            with open(w, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                json.loads(fh.read(n))
        except (OSError, struct.error, ValueError) as e:
            problems.append(f"{w.name} is not a readable safetensors file ({e})")
    return problems


def download_hf(repo: str, target: Path) -> dict[str, int | None]:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise SystemExit("error: pip install huggingface_hub (or use --source modelscope)") from None
    try:
        info = HfApi().model_info(repo, files_metadata=True)
        expected = {s.rfilename: s.size for s in info.siblings or []}
        snapshot_download(repo, local_dir=target)  # resumes partial files; tqdm progress bars
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise _Offline(repo, e) from None
    except Exception as e:  # requests/httpx connection errors differ between hub versions
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise _Offline(repo, e) from None
        raise
    return expected


def download_modelscope(repo: str, target: Path) -> dict[str, int | None]:
    try:
        from modelscope import snapshot_download as ms_download
    except ImportError:
        raise SystemExit("error: pip install modelscope (or use --source huggingface)") from None
    try:
        ms_download(repo, local_dir=str(target))
    except Exception as e:  # noqa: BLE001 - modelscope raises many kinds; all mean "could not download"
        raise _Offline(repo, e) from None
    return {}


class _Offline(Exception):
    def __init__(self, repo: str, cause: Exception) -> None:
        super().__init__(f"could not download {repo}: {type(cause).__name__}: {cause}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", choices=SIZES, default="0.6B")
    ap.add_argument("--kind", choices=["embedding", "reranker", "all"], default="all")
    ap.add_argument("--output-dir", default="models", help="models go to OUTPUT_DIR/<model name>")
    ap.add_argument("--source", choices=["huggingface", "modelscope"], default="huggingface")
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fetch = download_hf if args.source == "huggingface" else download_modelscope
    failed = False
    for repo in repo_ids(args.model_size, args.kind):
        target = out / repo.split("/", 1)[1]
        print(f"==> {repo} -> {target} (from {args.source})", flush=True)
        try:
            expected = fetch(repo, target)
        except _Offline as e:
            print(
                f"error: {e}\n       Is this machine online? Partial files are kept; run again to resume.",
                file=sys.stderr,
            )
            return 2
        problems = verify(target, expected)
        if problems:
            failed = True
            print(f"error: {target} failed verification: " + "; ".join(problems), file=sys.stderr)
        else:
            print(f"ok: {target} verified ({len(expected) or 'all'} files)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
