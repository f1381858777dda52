"""The keys file: hashed, 0600, atomic, locked; the CLI prints only keys; corrupt files stop us."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, free_port, run_cli

from er_gateway import keys as ks
from er_gateway.errors import GatewayError


def test_create_stores_only_a_hash(tmp_path: Path) -> None:
    f = tmp_path / "k.json"
    key = ks.create_key(f, "a", rate_limit="5/minute", models=["m"], expires="2099-01-01")
    text = f.read_text()
    assert key.startswith("er-") and len(key) > 40
    assert key not in text and ks.hash_key(key) in text
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    rec = ks.read_keys(f)[0]
    assert (rec.name, rec.rate_limit, rec.models, rec.expires) == ("a", "5/minute", ("m",), "2099-01-01")


def test_duplicate_name_and_missing_name(tmp_path: Path) -> None:
    f = tmp_path / "k.json"
    ks.create_key(f, "a")
    with pytest.raises(ValueError, match="already exists"):
        ks.create_key(f, "a")
    with pytest.raises(ValueError, match="no key named"):
        ks.revoke_key(f, "zzz")


def test_authenticate_revoke_rotate_expire(tmp_path: Path) -> None:
    f = tmp_path / "k.json"
    k1 = ks.create_key(f, "a")
    k2 = ks.create_key(f, "old", expires="2020-01-01")
    store = ks.KeyStore(f)
    assert store.authenticate(k1).name == "a"
    for bad in (None, "", "er-nope", k2):
        with pytest.raises(GatewayError) as e:
            store.authenticate(bad)
        assert e.value.status == 401
    ks.revoke_key(f, "a")
    assert store.changed()
    store.reload()
    with pytest.raises(GatewayError, match="revoked"):
        store.authenticate(k1)
    k3 = ks.rotate_key(f, "a")
    store.reload()
    assert store.authenticate(k3).name == "a"
    with pytest.raises(GatewayError):
        store.authenticate(k1)


def test_expiry_is_end_of_day_utc() -> None:
    ts = ks.expiry_timestamp("2030-05-01")
    assert ts == ks.expiry_timestamp("2030-05-02T00:00:00+00:00")


def test_concurrent_creates_lose_nothing(tmp_path: Path) -> None:
    f = tmp_path / "k.json"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: ks.create_key(f, f"k{i}"), range(40)))
    assert len(ks.read_keys(f)) == 40


@pytest.mark.parametrize("content", ["{not json", '{"keys": 5}', '{"keys": [{"name": "x"}]}', "[]"])
def test_corrupt_file_is_an_error(tmp_path: Path, content: str) -> None:
    f = tmp_path / "k.json"
    f.write_text(content)
    with pytest.raises(ks.KeysFileError, match="corrupt"):
        ks.read_keys(f)


def test_cli_prints_only_the_key(tmp_path: Path) -> None:
    f = str(tmp_path / "k.json")
    r = run_cli(
        "keys", "--keys-file", f, "create", "--name", "svc", "--rpm", "10", "--models", "a,b", "--expires", "2099-12-31"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("er-")
    key = r.stdout.strip()
    listing = run_cli("keys", "--keys-file", f, "list")
    assert "svc" in listing.stdout and "10/minute" in listing.stdout and "a,b" in listing.stdout
    assert key not in listing.stdout and key[:20] not in listing.stdout
    rot = run_cli("keys", "--keys-file", f, "rotate", "svc")
    assert rot.returncode == 0 and rot.stdout.strip().startswith("er-") and rot.stdout.strip() != key
    rev = run_cli("keys", "--keys-file", f, "revoke", "svc")
    assert rev.returncode == 0 and rev.stdout == ""
    assert "revoked" in run_cli("keys", "--keys-file", f, "list").stdout
    assert run_cli("keys", "--keys-file", f, "revoke", "nobody").returncode == 1


def test_first_start_banner_and_corrupt_file_refusal(tmp_path: Path) -> None:
    port = free_port()
    f = tmp_path / "er_api_keys.json"
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "embedding_reranker_proxy.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--keys-file",
            str(f),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    )
    try:
        lines = []
        assert p.stdout is not None
        for line in p.stdout:
            lines.append(line)
            if "Uvicorn running" in line or len(lines) > 60:
                break
        out = "".join(lines)
        assert "First start" in out
        key = next(w for w in out.split() if w.startswith("er-") and len(w) > 40)
        assert ks.KeyStore(f).authenticate(key).admin
        assert key not in f.read_text()
    finally:
        p.terminate()
        p.wait(10)
    # second start: no banner, same file
    before = f.read_bytes()
    f.write_text("{corrupt")
    r = run_cli("--port", str(port), "--keys-file", str(f), "--log-dir", str(tmp_path / "logs"))
    assert r.returncode == 2 and "corrupt" in r.stderr
    assert f.read_text() == "{corrupt"  # never overwritten
    assert json.loads(before)["keys"][0]["admin"] is True
