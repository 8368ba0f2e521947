"""Find a MIO model folder and check that it holds what a task needs (MIO_PROTOCOL §1).

Nothing here imports a model library or touches the network: `--model` resolves to a local
folder or to a snapshot already in the Hugging Face cache, and every problem is reported as
what is missing and how to get it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from miocli.errors import ModelError, UsageError

INSTRUCT_ID = "m-a-p/MIO-7B-Instruct"
BASE_ID = "m-a-p/MIO-7B-Base"
DEFAULT_MODEL = INSTRUCT_ID
HUB_IDS = {"instruct": INSTRUCT_ID, "base": BASE_ID}
VARIANTS = ("instruct", "base")

# Component names used across the runtime: what each task needs, what doctor checks.
LLM = "llm"
SEED = "seed"
SPEECH = "speech"
UNCLIP = "unclip"
COMPONENTS = (LLM, SEED, SPEECH, UNCLIP)

TOKENIZER_FILES = ("tokenizer.model",)
UNCLIP_FOLDER = "stable-diffusion-2-1-unclip"
UNCLIP_SUBFOLDERS = ("unet", "vae", "scheduler", "text_encoder", "tokenizer", "image_normalizer",
                     "image_noising_scheduler")
UNCLIP_PIPELINE = "StableUnCLIPImg2ImgPipeline"

# Files transformers reads while loading a causal LM and its tokenizer/processor: an `auto_map` in any
# of them is how a folder asks to run its own Python (trust_remote_code).
LLM_CONFIG_FILES = ("config.json", "tokenizer_config.json", "generation_config.json", "preprocessor_config.json",
                    "processor_config.json")
# Libraries a diffusers model_index.json may name for a component without importing code from the
# folder; "stable_diffusion" is diffusers' own pipeline module that holds StableUnCLIPImageNormalizer.
DIFFUSERS_LIBRARIES = ("diffusers", "transformers", "stable_diffusion")
CUSTOM_CODE_HINT = ("mio never runs Python shipped with a model: use the official m-a-p/MIO-7B files "
                    "(`mio download`), or remove the auto_map entries and .py files if you added them")


def hf_cache_dir() -> Path:
    """The hub cache folder, honouring the same variables huggingface_hub does."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home) / "hub"


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and "\\" not in text


def cached_snapshot(repo_id: str) -> Path | None:
    """The newest complete local snapshot of `repo_id` in the hub cache, if any."""
    repo_dir = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = repo_dir / "refs" / "main"
    snapshots = repo_dir / "snapshots"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if candidate.is_dir():
            return candidate
    if snapshots.is_dir():
        found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None


# `--model tiny`: the random checkpoint `mio demo` runs on, built in $MIO_CACHE on first use (no download).
TINY = "tiny"


def missing_model_hint(spec: str) -> str:
    return (f"download it on purpose with `mio download {spec}`, try the tiny random model with `--model tiny`, "
            "or pass --model PATH to a local folder (mio never downloads implicitly)")


def resolve_model(model: str | None) -> Path:
    """`--model` (or MIO_MODEL, or the Instruct id) as a local folder; `tiny` is the tiny random checkpoint."""
    spec = model or os.environ.get("MIO_MODEL") or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if spec == TINY and not path.exists():
        from miocli.model.tiny import ensure_tiny_checkpoint

        return ensure_tiny_checkpoint("instruct")
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"--model {spec} is a file; it should be the model folder",
                             hint="pass the folder that holds config.json")
        return path
    if looks_like_hub_id(spec):
        snapshot = cached_snapshot(spec)
        if snapshot is None:
            raise ModelError(f"model {spec} is not in the local Hugging Face cache ({hf_cache_dir()})",
                             hint=missing_model_hint(spec))
        return snapshot
    raise ModelError(f"no model folder at {spec}", hint="pass --model PATH to a MIO folder or a hub id")


def detect_variant(model_dir: Path, override: str | None = None) -> str:
    """'instruct' or 'base': --variant, else config.json's mio_variant, else the folder's name."""
    if override:
        value = override.lower()
        if value not in VARIANTS:
            raise UsageError(f"--variant {override} is not one of {', '.join(VARIANTS)}")
        return value
    config_path = model_dir / "config.json"
    if config_path.is_file():
        try:
            declared = json.loads(config_path.read_text()).get("mio_variant")
        except (OSError, json.JSONDecodeError, AttributeError):
            declared = None
        if declared in VARIANTS:
            return declared
    for name in _variant_names(model_dir):
        lowered = name.lower()
        if "instruct" in lowered:
            return "instruct"
        if lowered.endswith("-base") or "mio-7b-base" in lowered or "--base" in lowered:
            return "base"
    return "instruct"


def _variant_names(model_dir: Path) -> list[str]:
    """The names that may tell the variant: the folder's own name and, for a hub cache snapshot
    (`models--owner--name/snapshots/<sha>`), the repository folder's name. Never other parents:
    `knowledge-base/model` or `base-models/mine` say nothing about the model inside."""
    names: list[str] = []
    # As written (a symlink's own name counts) and as resolved (".", "..", hub snapshot links).
    for path in (Path(os.path.abspath(model_dir)), model_dir.resolve()):
        candidates = [path.name]
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            candidates.append(path.parent.parent.name)
        names += [name for name in candidates if name and name not in names]
    return names


@dataclass
class ComponentReport:
    name: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # A problem is the folder asking to run its own code (not a damaged or missing file).
    custom_code: bool = False


def _read_json_object(path: Path) -> dict[str, object] | None:
    """The JSON object in `path`; None when it is absent or not a readable JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def custom_code_problems(folder: Path, config_names: Iterable[str], *, recursive: bool = False,
                         prefix: str = "") -> list[str]:
    """Why `folder` would make transformers or diffusers import Python from it.

    Both libraries run a folder's own modules when a config names them (`auto_map`); the answer
    must be "no" without anyone asking, so such a folder is refused before a library sees it.
    Python files lying in the folder are refused too: nothing in a MIO checkpoint is code.
    """
    problems: list[str] = []
    for name in config_names:
        config = _read_json_object(folder / name)
        auto_map = config.get("auto_map") if config is not None else None
        if auto_map:
            shown = ", ".join(f"{k} -> {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else auto_map
            problems.append(f"{prefix}{name} asks to run custom code from the folder (auto_map: {shown})")
    try:
        scripts = sorted(folder.rglob("*.py") if recursive else folder.glob("*.py"))
    except OSError:
        scripts = []
    if scripts:
        names = [str(p.relative_to(folder)) for p in scripts]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        problems.append(f"{prefix}custom code in the model folder: {shown}")
    return problems


def _check_llm(model_dir: Path) -> ComponentReport:
    report = ComponentReport(LLM, ok=True)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        report.problems.append("config.json is missing")
    else:
        try:
            config = json.loads(config_path.read_text())
            if not isinstance(config, dict) or "model_type" not in config:
                report.problems.append("config.json has no model_type (corrupt or not a transformers config)")
            elif config.get("model_type") != "llama":
                report.notes.append(f"model_type is {config.get('model_type')!r}, MIO is a llama model")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            report.problems.append(f"config.json is corrupt ({exc.__class__.__name__}: {exc})")
    custom = custom_code_problems(model_dir, LLM_CONFIG_FILES)
    report.problems.extend(custom)
    report.custom_code = bool(custom)
    for name in TOKENIZER_FILES:
        if not (model_dir / name).is_file():
            report.problems.append(f"{name} is missing")
    if not (model_dir / "added_tokens.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        report.problems.append("added_tokens.json / tokenizer_config.json are missing (MIO's multimodal tokens)")
    else:
        vocab_problem = _vocab_problem(model_dir)
        if vocab_problem:
            report.problems.append(vocab_problem)
    report.problems.extend(_check_weight_files(model_dir))
    report.ok = not report.problems
    return report


def _vocab_problem(model_dir: Path) -> str | None:
    """An LLM vocabulary too small for the tokenizer's added tokens, from the JSON files alone.

    Every MIO media token is an added token at the top of the vocabulary; an id at or past the
    LLM's vocab_size would index beyond its embedding in the middle of a run. The sentencepiece
    part is checked against the loaded model when it loads (miocli.model.llm.load_llm).
    """
    config = _read_json_object(model_dir / "config.json")
    vocab_size = config.get("vocab_size") if config is not None else None
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        return None
    top = -1
    added = _read_json_object(model_dir / "added_tokens.json") or {}
    tokenizer_config = _read_json_object(model_dir / "tokenizer_config.json") or {}
    decoder = tokenizer_config.get("added_tokens_decoder")
    for token_id in [*added.values(), *(decoder.keys() if isinstance(decoder, dict) else ())]:
        try:
            top = max(top, int(token_id))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            continue
    if top >= vocab_size:
        return (f"config.json says vocab_size {vocab_size}, but the tokenizer has token ids up to {top}: "
                "the LLM and the tokenizer files come from different models")
    return None


def _check_weight_files(model_dir: Path) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if index_path.is_file():
            try:
                shards = set(json.loads(index_path.read_text())["weight_map"].values())
            except (OSError, KeyError, json.JSONDecodeError, AttributeError) as exc:
                return [f"{index_name} is corrupt ({exc})"]
            missing = sorted(s for s in shards if not _nonempty(model_dir / s))
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                return [f"weight shards missing or empty (half-downloaded?): {shown}"]
            return [p for p in (safetensors_problem(model_dir / s) for s in sorted(shards)) if p]
    singles = [model_dir / "model.safetensors", model_dir / "pytorch_model.bin"]
    present = [p for p in singles if _nonempty(p)]
    if present:
        problem = safetensors_problem(present[0])
        return [problem] if problem else []
    if any(p.exists() for p in singles):
        return ["the weights file is empty (half-downloaded?)"]
    return ["no LLM weights (model.safetensors, model-*.safetensors with an index, or pytorch_model*.bin)"]


# safetensors refuses headers above 100 MB; a larger length field is garbage, not a big header.
SAFETENSORS_MAX_HEADER = 100_000_000
REDOWNLOAD_HINT = "re-download it with `mio download` (or copy it again)"


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is truncated or corrupt, from its header alone; None when it looks whole.

    The file is 8 bytes of little-endian header length, the JSON header, then the tensor data;
    the header's largest `data_offsets` end says how long the data must be. The tensor data is
    never read, so this costs one small read even for a 10 GB shard. Other formats pass.
    """
    if path.suffix != ".safetensors":
        return None
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{name} is truncated ({size} bytes, shorter than a safetensors header): {REDOWNLOAD_HINT}"
            header_length = int.from_bytes(prefix, "little")
            if header_length > SAFETENSORS_MAX_HEADER:
                return f"{name} is corrupt (not a safetensors file: bad header length): {REDOWNLOAD_HINT}"
            if 8 + header_length > size:
                return (f"{name} is truncated ({size} bytes, its header alone needs {8 + header_length}; "
                        f"half-downloaded?): {REDOWNLOAD_HINT}")
            raw = handle.read(header_length)
    except OSError as exc:
        return f"{name} cannot be read ({exc.strerror or exc}): {REDOWNLOAD_HINT}"
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    end = _data_end(header)
    if end is None:
        return f"{name} is corrupt (its safetensors header is not valid): {REDOWNLOAD_HINT}"
    needed = 8 + header_length + end
    if size < needed:
        return f"{name} is truncated ({size} of {needed} bytes; half-downloaded?): {REDOWNLOAD_HINT}"
    return None


def safetensors_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a .safetensors file, from its header alone.

    For a file `safetensors_problem` passed; raises ModelError naming the file otherwise.
    """
    problem = safetensors_problem(path)
    if problem is None:
        try:
            with open(path, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problem = f"{path.name} cannot be read ({exc}): {REDOWNLOAD_HINT}"
    if problem is not None:
        raise ModelError(problem, hint="`mio doctor` checks every component")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) for n in shape):
            raise ModelError(f"{path.name} is corrupt (tensor {key} has no valid shape): {REDOWNLOAD_HINT}",
                             hint="`mio doctor` checks every component")
        tensors[key] = (str(entry.get("dtype")), tuple(shape))
    return tensors


def _data_end(header: object) -> int | None:
    """The largest `data_offsets` end in a safetensors header, or None when the header is malformed."""
    if not isinstance(header, dict):
        return None
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            return None
        end = max(end, offsets[1])
    return end


def _nonempty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _check_seed(model_dir: Path) -> ComponentReport:
    folder = model_dir / "seed-tokenizer-2"
    report = ComponentReport(SEED, ok=True)
    if not _nonempty(folder / "seed_quantizer.pt"):
        report.problems.append("seed-tokenizer-2/seed_quantizer.pt is missing or empty")
    if not (folder / "eva_vit_g.pth").exists():
        report.notes.append(
            "seed-tokenizer-2/eva_vit_g.pth is absent: fine if seed_quantizer.pt holds the ViT, "
            "otherwise image input fails (the reference would download it; mio never does)"
        )
    report.ok = not report.problems
    return report


def _check_speech(model_dir: Path) -> ComponentReport:
    folder = model_dir / "SpeechTokenizer"
    report = ComponentReport(SPEECH, ok=True)
    for name in ("config.json", "SpeechTokenizer.pt"):
        if not _nonempty(folder / name):
            report.problems.append(f"SpeechTokenizer/{name} is missing or empty")
    report.ok = not report.problems
    return report


def _check_unclip(model_dir: Path) -> ComponentReport:
    folder = model_dir / UNCLIP_FOLDER
    report = ComponentReport(UNCLIP, ok=True)
    prefix = f"{UNCLIP_FOLDER}/"
    if not (folder / "model_index.json").is_file():
        report.problems.append(f"{prefix}model_index.json is missing")
    else:
        custom = _pipeline_custom_code(folder / "model_index.json", prefix)
        if isinstance(custom, str):
            report.problems.append(custom)
        else:
            report.problems.extend(custom)
            report.custom_code = bool(custom)
    if folder.is_dir():
        # Only the config files: tokenizer/vocab.json of the real model is a megabyte of no interest here.
        sub_configs = [str(p.relative_to(folder)) for p in sorted(folder.glob("*/*config.json"))]
        custom = custom_code_problems(folder, sub_configs, recursive=True, prefix=prefix)
        report.problems.extend(custom)
        report.custom_code = report.custom_code or bool(custom)
    for sub in UNCLIP_SUBFOLDERS:
        if not (folder / sub).is_dir():
            report.problems.append(f"{prefix}{sub}/ is missing")
        else:
            report.problems.extend(prefix + f"{sub}/" + p for p in
                                   (safetensors_problem(w) for w in sorted((folder / sub).glob("*.safetensors"))) if p)
    report.ok = not report.problems
    return report


def _pipeline_custom_code(index_path: Path, prefix: str) -> list[str] | str:
    """Components of a diffusers model_index.json that name code outside diffusers and transformers
    (a custom pipeline or component is a module file shipped in the folder); a str when the file is bad."""
    index = _read_json_object(index_path)
    if index is None:
        return f"{prefix}model_index.json is corrupt (not a JSON object)"
    problems: list[str] = []
    class_name = index.get("_class_name")
    if not isinstance(class_name, str):
        # diffusers writes [module, class] here for a pipeline whose code comes with the folder.
        problems.append(f"{prefix}model_index.json names a custom pipeline {class_name!r}")
    elif class_name != UNCLIP_PIPELINE:
        return f"{prefix}model_index.json holds a {class_name} pipeline, not {UNCLIP_PIPELINE}"
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        library = entry[0] if entry else None
        if library is not None and library not in DIFFUSERS_LIBRARIES:
            problems.append(f"{prefix}model_index.json loads {name} from custom code ({library!r})")
    return problems


_CHECKS = {LLM: _check_llm, SEED: _check_seed, SPEECH: _check_speech, UNCLIP: _check_unclip}


def check_components(model_dir: Path, components: Iterable[str] = COMPONENTS) -> list[ComponentReport]:
    return [_CHECKS[name](model_dir) for name in components]


def require_components(model_dir: Path, components: Iterable[str]) -> None:
    """Raise one ModelError listing everything missing for the components a task needs."""
    failed = [r for r in check_components(model_dir, components) if not r.ok]
    if not failed:
        return
    details = "; ".join(f"{r.name}: {', '.join(r.problems)}" for r in failed)
    if len(failed) > 1 and len(details) > 150:
        # A folder that is not a MIO checkpoint at all misses everything: name the parts; doctor lists the files.
        details = f"{', '.join(r.name for r in failed)} have problems (`mio doctor --model` with it lists them)"
    if any(r.custom_code for r in failed):
        raise ModelError(f"the model folder {model_dir} is refused — {details}",
                         hint=CUSTOM_CODE_HINT + "; `mio doctor` shows the full check")
    raise ModelError(
        f"the model folder {model_dir} is incomplete — {details}",
        hint="re-run `mio download` for a hub model, or copy the missing files into the folder; "
        "`mio doctor` shows the full check",
    )
