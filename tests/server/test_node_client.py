"""The official openai npm client works against the server unchanged.

Set-up (CI does it once): `npm ci --prefix tests/server/node`; the test runs it itself
when node_modules is missing, and is skipped only where npm is absent.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm is not installed")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    return NODE_DIR / "client.mjs"


def test_node_openai_client_gets_plain_and_streamed_chat_and_responses(server, node_client):
    run = subprocess.run(["node", str(node_client), f"{server.base_url}/v1", "tiny-gpt2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["plainFinish"] == result["streamFinish"] == "length"
    assert result["plain"] and result["streamed"] == result["plain"]
    assert result["plainUsage"]["completion_tokens"] == result["streamUsage"]["completion_tokens"] == 8
    assert result["response"] and result["responseStreamed"] == result["response"] == result["stored"]
    assert result["responseEvents"][0] == "response.created"
    assert result["responseEvents"][-1] == f"response.{result['responseStatus']}"
