"""What the image commands load: caption needs the SEED encoder, imagine the SEED decoder and unCLIP.

`mio caption` must load the tokenizer, the LLM and the SEED encoder part (EVA ViT + Q-Former + quantizer)
and neither the unCLIP pipeline nor the speech codec; `mio imagine` must load the LLM, the SEED decoder part
and unCLIP, and never the EVA ViT (about 1 B of SEED-Tokenizer-2's 1.15 B parameters at the real size).
Checked through the real entry point (the `--verbose` load report) and on the Runtime itself.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from mio_testing import run_mio

FAST = ["--device", "cpu", "--verbose", "--beams", "1", "--max-new-tokens", "40"]
PIXELS = ["--size", "64", "--steps", "2", "--seed", "0"]
LOADED = re.compile(r"^mio: loaded (\w+)(?: \((.*?)\))? in ", re.MULTILINE)
ENCODER_MODULES = ("visual_encoder", "Qformer", "ln_vision", "query_tokens", "encode_task_layer")


def loads(stderr: str) -> dict[str, str]:
    """component -> detail, from the --verbose report."""
    return {m[1]: m[2] or "" for m in LOADED.finditer(stderr)}


def seed_modules(stderr: str) -> set[str]:
    match = re.search(r"^mio:\s+seed parameters: (.*)$", stderr, re.MULTILINE)
    assert match, stderr
    return {item.rsplit(" ", 1)[0] for item in match[1].split(", ")}


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("pictures") / "kite.png"
    image = Image.new("RGB", (96, 64), (40, 120, 40))
    image.paste((200, 20, 20), (30, 10, 60, 30))
    image.save(path)
    return path


def test_caption_loads_tokenizer_llm_and_the_seed_encoder_only(tiny_model, picture):
    done = run_mio("caption", str(picture), "--model", str(tiny_model), *FAST)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    loaded = loads(done.stderr)
    assert set(loaded) == {"tokenizer", "llm", "seed"}  # neither unclip nor speech
    assert loaded["seed"] == "encoder"
    modules = seed_modules(done.stderr)
    assert {"visual_encoder", "Qformer", "quantize"} <= modules
    assert not modules & {"decode_task_layer", "blocks_image", "distill_image_proj"}


def test_imagine_loads_no_eva_vit(tiny_model, tmp_path):
    done = run_mio("imagine", "a red kite over a green hill", "-o", str(tmp_path), "--model", str(tiny_model),
                   *FAST, *PIXELS)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.glob("*.imagine.png"))
    loaded = loads(done.stderr)
    assert set(loaded) == {"tokenizer", "llm", "seed", "unclip"}
    assert loaded["seed"] == "decoder"
    modules = seed_modules(done.stderr)
    assert {"quantize", "decode_task_layer", "distill_image_proj"} <= modules
    assert not modules & set(ENCODER_MODULES)
    assert "visual_encoder" not in done.stderr


def test_imagine_runtime_holds_only_the_seed_decoder(tiny_model, tmp_path):
    """The same through the API the command runs on, looking at the loaded modules themselves."""
    from miocli.core.api import Mio

    mio = Mio(str(tiny_model), device="cpu")
    result = mio.imagine("a red kite", max_new_tokens=40, beams=1, steps=2, size=64, seed=0)
    assert len(result.images) == 1
    runtime = mio.runtime
    assert set(runtime.loaded()) == {"tokenizer", "llm", "seed", "unclip"}
    parts, codec = runtime._components["seed"]
    assert parts == frozenset({"decoder"})
    names = {name.split(".", 1)[0] for name, _ in codec.model.named_parameters()}
    assert not names & set(ENCODER_MODULES)
    assert not hasattr(codec.model, "visual_encoder")
    seed_record = next(r for r in runtime.loads if r.component == "seed")
    assert seed_record.parameters == codec.num_parameters() == sum(seed_record.breakdown.values())
