"""SEED-Tokenizer-2 at the real size (1.15 B parameters) on the CPU.

Writes random weights in the real checkpoint layout (ViT included, float32, ~4.6 GB) to a
temporary folder, then runs each measurement in a fresh Python process:

- ours: `SeedCodec.load` (meta-device build, memory-mapped checkpoint, tensors assigned in
  place) + encode the two golden images, timed from process start, with the peak RSS;
- baseline: what the reference does: build the whole model in float32 with its random
  initialisation, `torch.load` the checkpoint into memory and `load_state_dict` over the
  model, then encode the same two images with the same forward code. (The reference also
  loads eva_vit_g.pth into the ViT first; this baseline skips that, so it is a lower bound);
- latency: encoder-only load, then per-image encode time at batch 1 and batch 8;
- parts: parameters materialised and RSS after loading parts={"encoder"} and {"decoder"}.

Needs ~5 GB free in the temporary folder and ~10 GB of memory for the baseline; the folder is
deleted at the end. Run: python benchmarks/image.py [--dir /tmp] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
IMAGES = sorted((REPO / "tests" / "golden" / "seed" / "images").glob("*.png"))
BATCH_LATENCY_REPS = {1: 3, 8: 1}


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; file-backed (memory-mapped) pages that were touched count too
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _emit(result: dict) -> None:
    result["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print("RESULT " + json.dumps(result), flush=True)


def _pixels():  # -> torch.Tensor
    import torch

    from miocli.media.image import load_image, preprocess

    return torch.from_numpy(preprocess([load_image(p) for p in IMAGES]))


# ---------------------------------------------------------------- children (one per process)


def child_build(folder: Path) -> None:
    from miocli.codecs.seed import SeedDims
    from miocli.codecs.seed.tiny import random_state, write_checkpoint

    t = time.perf_counter()
    state = random_state(SeedDims.real(), seed=0, uniform=True)
    drawn = time.perf_counter() - t
    write_checkpoint(folder, state, SeedDims.real())
    n = sum(v.numel() for k, v in state.items() if v.is_floating_point())
    _emit({"draw_s": drawn, "total_s": time.perf_counter() - t, "elements": n,
           "bytes": (folder / "seed_quantizer.pt").stat().st_size})


def child_ours(folder: Path) -> None:
    import torch

    from miocli.codecs.seed import SeedCodec

    imported = time.perf_counter()
    codec = SeedCodec.load(folder)
    loaded = time.perf_counter()
    ids = codec.encode(_pixels())
    done = time.perf_counter()
    assert ids.shape == (len(IMAGES), 32)
    _emit({"import_s": imported - START, "load_s": loaded - imported, "encode_s": done - loaded,
           "in_process_s": done - START, "threads": torch.get_num_threads(), "ids0": ids[0, :4].tolist()})


def _reference_init(model: object) -> None:
    """The reference's own initialisation on top of PyTorch's constructor defaults:
    truncated normal for the EVA / timm parts, BERT's normal(0.02) for the Q-Former."""
    import torch
    from torch import nn

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                if name.startswith("Qformer."):
                    module.weight.normal_(0.0, 0.02)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, param in model.named_parameters(recurse=True):
            if name.endswith(("pos_embed", "cls_token", "query_tokens", "pos_embed_image")):
                nn.init.trunc_normal_(param, std=0.02)


def child_baseline(folder: Path) -> None:
    import torch
    from torch import nn

    from miocli.codecs.seed import SeedCodec, SeedDims
    from miocli.codecs.seed.model import SeedModel
    from miocli.codecs.seed.vit import Block

    imported = time.perf_counter()
    dims = SeedDims.real()
    model = SeedModel(dims)  # on the CPU: every constructor initialises its weights
    q = dims.qformer
    # the reconstruction branch is part of the reference module as well
    model.pos_embed = nn.Parameter(torch.zeros(1, q.num_queries, q.hidden))
    model.blocks = nn.ModuleList(Block(q.hidden, 12, dims.decoder.recon_mlp_hidden, eva=False) for _ in range(4))
    nn.init.normal_(model.quantize.embedding.weight)
    _reference_init(model)
    built = time.perf_counter()
    state = torch.load(folder / "seed_quantizer.pt", map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    loaded = time.perf_counter()
    assert not result.missing_keys, result.missing_keys
    model.requires_grad_(False).eval()
    codec = SeedCodec(model, torch.device("cpu"), torch.float32)
    ids = codec.encode(_pixels())
    done = time.perf_counter()
    _emit({"import_s": imported - START, "build_init_s": built - imported, "load_s": loaded - built,
           "encode_s": done - loaded, "in_process_s": done - START, "ids0": ids[0, :4].tolist()})


def child_latency(folder: Path) -> None:
    import torch

    from miocli.codecs.seed import SeedCodec

    codec = SeedCodec.load(folder, parts=frozenset({"encoder"}))
    pixels = _pixels()
    codec.encode(pixels[:1])  # warm-up: page in the weights, allocator
    per_image: dict[str, float] = {}
    for batch, reps in BATCH_LATENCY_REPS.items():
        x = pixels[torch.arange(batch) % len(pixels)]
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            codec.encode(x)
            times.append((time.perf_counter() - t) / batch)
        per_image[str(batch)] = min(times)
    _emit({"per_image_s": per_image, "threads": torch.get_num_threads()})


def child_parts(folder: Path, part: str) -> None:
    import torch

    from miocli.codecs.seed import SeedCodec

    before = _rss_now_mb()
    t = time.perf_counter()
    codec = SeedCodec.load(folder, parts=frozenset({part}))
    load_s = time.perf_counter() - t
    result = {"part": part, "params": codec.num_parameters(), "load_s": load_s,
              "rss_growth_mb": _rss_now_mb() - before}
    if part == "decoder":
        ids = torch.randint(0, codec.codebook_size, (2, codec.num_tokens))
        t = time.perf_counter()
        codec.embed(ids)
        result["embed2_s"] = time.perf_counter() - t
    _emit(result)


# ---------------------------------------------------------------- driver


def _run(kind: str, *extra: str, folder: Path, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--folder", str(folder), *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child {kind} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = wall
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="where to put the temporary 4.6 GB checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    if args.child:
        folder = Path(args.folder)
        children = {"build": child_build, "ours": child_ours, "baseline": child_baseline,
                    "latency": child_latency}
        if args.child == "parts":
            child_parts(folder, args.part)
        else:
            children[args.child](folder)
        return

    with tempfile.TemporaryDirectory(prefix="mio-seed-bench-", dir=args.dir) as tmp:
        folder = Path(tmp) / "seed-tokenizer-2"
        run = functools.partial(_run, folder=folder, threads=args.threads)
        build = run("build")
        print(f"real-size checkpoint: {build['elements'] / 1e9:.3f} B elements, "
              f"{build['bytes'] / 2**30:.2f} GiB, drawn in {build['draw_s']:.1f} s, "
              f"written in {build['total_s']:.1f} s")
        ours = run("ours")
        base = run("baseline")
        latency = run("latency")
        enc = run("parts", "--part", "encoder")
        dec = run("parts", "--part", "decoder")

    print(f"\nwhole run, fresh process: load the real-size .pt + encode {len(IMAGES)} images (CPU, float32)")
    print(f"{'':10}{'wall s':>9}{'import':>9}{'build':>9}{'load':>9}{'encode':>9}{'peak RSS GB':>13}")
    for name, r in (("ours", ours), ("baseline", base)):
        print(f"{name:10}{r['wall_s']:9.1f}{r['import_s']:9.1f}{r.get('build_init_s', 0.0):9.1f}"
              f"{r['load_s']:9.1f}{r['encode_s']:9.1f}{r['peak_rss_mb'] / 1024:13.2f}")
    print(f"ratio ours/baseline: time {ours['wall_s'] / base['wall_s']:.2f}x (target <= 0.5), "
          f"peak memory {ours['peak_rss_mb'] / base['peak_rss_mb']:.2f}x (target <= 0.6)")
    print(f"same ids from both: {ours['ids0'] == base['ids0']}")
    print(f"\nencode latency per image (encoder only, {latency['threads']} threads): "
          + ", ".join(f"batch {b}: {s:.2f} s" for b, s in latency["per_image_s"].items()))
    print("\nparameters materialised per part:")
    for r in (enc, dec):
        extra = f", embed of 2 id lists {r['embed2_s'] * 1000:.0f} ms" if "embed2_s" in r else ""
        print(f"  parts={{'{r['part']}'}}: {r['params'] / 1e6:,.1f} M parameters, load {r['load_s']:.2f} s, "
              f"RSS growth {r['rss_growth_mb']:.0f} MB, fresh-process peak {r['peak_rss_mb'] / 1024:.2f} GB{extra}")


if __name__ == "__main__":
    main()
