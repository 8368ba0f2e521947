"""What `mio caption` and `mio imagine` load: components, their parts and parameters, and peak RSS.

Builds the tiny checkpoint (miocli.model.tiny) in a temporary MIO_CACHE and runs each command once through the
real entry point with `--verbose --device cpu`. The Runtime's `--verbose` report (stderr) names every
component loaded, the codec parts (`seed (encoder)`), the parameter count and, per component, the
parameters of each top-level module (`visual_encoder`, `Qformer`, `quantize`, `unet`, ...). The peak RSS is
the process's own ru_maxrss (os.wait4). Exits non-zero if caption loads anything beyond tokenizer + LLM +
SEED encoder, or imagine loads the EVA ViT, the speech codec or the SEED encoder.

The imagine run uses small pixel settings (`--steps 2 --size 64` by default) to stay short; they change the
diffusion work, not what is loaded. Both commands use `--max-new-tokens 40` by default (an image is 32
tokens between `<image>` and `</image>`).

Run: python benchmarks/components.py [--steps S] [--size PX] [--max-new-tokens T]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from captioning import MIO, build_tiny, child_env, run_measured, synthetic_image

LOADED = re.compile(r"^mio: loaded (\w+)(?: \((.*)\))? in ([\d.]+) s, ([\d.]+) M parameters")
BREAKDOWN = re.compile(r"^mio:\s+(\w+) parameters: (.*)$")
COMPONENTS = ["tokenizer", "llm", "seed", "unclip", "speech"]
LABELS = {
    "tokenizer": "tokenizer", "llm": "LLM", "seed": "SEED-Tokenizer-2", "unclip": "unCLIP (SD 2.1)",
    "speech": "SpeechTokenizer", "visual_encoder": "EVA ViT `visual_encoder`", "Qformer": "Q-Former `Qformer`",
    "quantize": "quantizer codebook `quantize`",
}
SEED_ENCODER = {"visual_encoder", "ln_vision", "query_tokens", "Qformer", "encode_task_layer"}


@dataclass
class Load:
    detail: str
    seconds: float
    modules: dict[str, int] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(self.modules.values())


def parse_verbose(stderr: str) -> dict[str, Load]:
    loads: dict[str, Load] = {}
    for line in stderr.splitlines():
        if m := LOADED.match(line):
            loads[m[1]] = Load(m[2] or "", float(m[3]))
        elif (m := BREAKDOWN.match(line)) and m[1] in loads:
            for item in m[2].split(", "):
                name, count = item.rsplit(" ", 1)
                loads[m[1]].modules[name] = int(count.replace(",", ""))
    return loads


def problems(command: str, loads: dict[str, Load]) -> list[str]:
    found = []
    seed = loads.get("seed")
    if command == "caption":
        if set(loads) != {"tokenizer", "llm", "seed"}:
            found.append(f"caption loaded {sorted(loads)}, expected tokenizer, llm, seed")
        if seed is None or seed.detail != "encoder" or not set(seed.modules) >= SEED_ENCODER:
            found.append("caption: the SEED encoder part (EVA ViT + Q-Former + quantizer) was not what was loaded")
    else:
        if set(loads) != {"tokenizer", "llm", "seed", "unclip"}:
            found.append(f"imagine loaded {sorted(loads)}, expected tokenizer, llm, seed, unclip")
        if seed is None or seed.detail != "decoder" or SEED_ENCODER & set(seed.modules):
            found.append("imagine: the SEED encoder part (EVA ViT / Q-Former) was loaded")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="imagine's diffusion steps (default 2)")
    parser.add_argument("--size", type=int, default=64, help="imagine's output side (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="both commands (default 40)")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(prefix="mio-components-bench-") as tmp:
        root = Path(tmp)
        env = child_env(root / "cache")
        model = build_tiny(root / "cache")
        image = root / "img000.png"
        synthetic_image(0).save(image)
        common = ["--model", str(model), "--device", "cpu", "--verbose", "--max-new-tokens", str(args.max_new_tokens)]
        commands = {
            "caption": [*MIO, "caption", str(image), *common],
            "imagine": [*MIO, "imagine", "a red kite over a green hill", "-o", str(root / "out"),
                        "--steps", str(args.steps), "--size", str(args.size), *common],
        }
        load_before = Path("/proc/loadavg").read_text().split()[:3]
        for name, cmd in commands.items():
            done = run_measured(cmd, env)
            if done.returncode != 0:
                raise SystemExit(f"mio {name}: exit {done.returncode}\n{done.stderr[-3000:]}")
            results[name] = (done, parse_verbose(done.stderr))
            print(f"mio {name}: {done.wall_s:.1f} s\n{done.stderr.strip()}", file=sys.stderr)

    load_after = Path("/proc/loadavg").read_text().split()[:3]
    names = list(commands)
    print(f"\ntiny checkpoint, CPU, one fresh `mio ... --verbose` process per command; imagine with --steps "
          f"{args.steps} --size {args.size}; both with --max-new-tokens {args.max_new_tokens}; "
          f"load average before {' '.join(load_before)}, after {' '.join(load_after)}\n")
    print("| component (parameters) | " + " | ".join(f"`mio {n}`" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for component in COMPONENTS:
        cells = []
        for n in names:
            load = results[n][1].get(component)
            if load is None:
                cells.append("not loaded")
            else:
                what = f"{load.detail} part, " if component in ("seed", "speech") else ""
                cells.append(f"{what}{load.parameters:,}" if load.modules else "loaded (no parameters)")
        print(f"| {LABELS[component]} | " + " | ".join(cells) + " |")
        # modules of the first command that loaded them, largest first; the LLM's two halves are not shown
        modules: list[str] = []
        for n in names:
            held = results[n][1].get(component, Load("", 0)).modules
            modules += sorted((m for m in held if m not in modules), key=lambda m, held=held: -held[m])
        if component in ("tokenizer", "llm") or len(modules) < 2:
            continue
        for module in modules:
            cells = []
            for n in names:
                count = results[n][1][component].modules.get(module) if component in results[n][1] else None
                cells.append(f"{count:,}" if count is not None else "—")
            print(f"| &nbsp;&nbsp;└ {LABELS.get(module, f'`{module}`')} | " + " | ".join(cells) + " |")
    totals = [sum(load.parameters for load in results[n][1].values()) for n in names]
    print("| **all parameters loaded** | " + " | ".join(f"**{t:,}**" for t in totals) + " |")
    print("| peak RSS of the process | " + " | ".join(f"{results[n][0].max_rss_kib / 1024:.0f} MiB" for n in names)
          + " |")
    print("| wall time of the process | " + " | ".join(f"{results[n][0].wall_s:.1f} s" for n in names) + " |")

    found = [p for n in names for p in problems(n, results[n][1])]
    print("\nexpected loads: " + ("yes" if not found else "NO: " + "; ".join(found)))
    if found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
