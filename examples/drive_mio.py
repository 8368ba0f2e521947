"""Drive `mio` from a script through subprocess, reading its --json records as they come.

    python examples/drive_mio.py talk1.wav talk2.flac ... [-- more mio options]

Each line `mio --json` prints is one input's record, flushed as soon as that input's batch
is done, so a long job reports progress as it goes. The exit code says how it ended:
0 all done, 1 some inputs failed (their records carry "error"), 2 a usage error,
3 a model or environment problem.
"""

from __future__ import annotations

import json
import subprocess
import sys


def transcribe(paths: list[str], options: list[str]) -> int:
    command = ["mio", "asr", *paths, "--json", *options]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            record = json.loads(line)
            if "error" in record:
                print(f"FAILED {record['input']}: {record['error']}")
            else:
                print(f"{record['input']}\t{record['text']!r}")
    if process.returncode >= 2:
        print(f"mio stopped with exit code {process.returncode} (see its message above)", file=sys.stderr)
    return process.returncode


if __name__ == "__main__":
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else len(args)
    sys.exit(transcribe(args[:split], args[split + 1 :]))
