"""The LLM: its checks and its loader, never with code from the model folder.

`check_llm` is everything a load checks, without reading the weights (`mio doctor`); `load_llm`
loads for inference in float, with bitsandbytes on CUDA, or with mio's own weight-only layers on the
CPU (`miocli.model.quantize`). A broken file becomes one ModelError naming what is wrong.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from miocli import protocol
from miocli.errors import ModelError
from miocli.model import checkpoint
from miocli.model.devices import llm_compute_dtype, quiet_bitsandbytes
from miocli.model.stdio import library_stdio

if TYPE_CHECKING:
    import torch

    from miocli.model.tokenizer import MioTokenizer


# The tokens the protocol writes and parses (MIO_PROTOCOL §2-§4); a tokenizer without one would fail
# with a KeyError in the middle of a run.
def _media_tokens() -> list[str]:
    return [protocol.BOS, protocol.EOS, protocol.IMAGE_BEGIN, protocol.IMAGE_END, protocol.SPEECH_BEGIN,
            protocol.SPEECH_END, *(f"<img{i}>" for i in range(protocol.IMAGE_CODEBOOK_SIZE)),
            *(f"<spch{i}>" for i in range(protocol.SPEECH_CODEBOOK_SIZE * protocol.SPEECH_LAYERS_IN_OUTPUT))]


def require_media_tokens(tokenizer: MioTokenizer, model_dir: Path) -> None:
    """ModelError unless the tokenizer has every token MIO's protocol uses."""
    missing = []
    for token in _media_tokens():
        try:
            tokenizer.token_to_id(token)
        except KeyError:
            missing.append(token)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelError(f"the tokenizer in {model_dir} lacks MIO's tokens {shown}",
                         hint="added_tokens.json / tokenizer_config.json are not MIO's: " + LLM_REDOWNLOAD_HINT)


LLM_REDOWNLOAD_HINT = "check the folder with `mio doctor`; re-download damaged or incomplete files (`mio download`)"


def llm_config(model_dir: Path) -> Any:
    """The LLM's transformers config, never with code from the folder."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings(), library_stdio():
            warnings.simplefilter("ignore")
            return AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError... for a bad config
        raise ModelError(f"cannot read the LLM config {model_dir / 'config.json'}: {exc.__class__.__name__}: "
                         f"{exc}".splitlines()[0], hint=LLM_REDOWNLOAD_HINT) from exc


def check_vocabulary(config: Any, tokenizer_vocab: int, model_dir: Path) -> None:
    """ModelError when the LLM has fewer token rows than the tokenizer has ids (they would index past them)."""
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and vocab_size < tokenizer_vocab:
        raise ModelError(
            f"the LLM in {model_dir} has a vocabulary of {vocab_size} (config.json vocab_size) but its tokenizer "
            f"has {tokenizer_vocab} tokens",
            hint="the LLM and the tokenizer files come from different models; " + LLM_REDOWNLOAD_HINT,
        )


def _float_dtype(name: str) -> bool:
    """Whether a safetensors dtype name (F16, BF16, F32, F8_E4M3, ...) is a floating type."""
    return name.startswith(("F", "BF"))


def _llm_tensors(model_dir: Path) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """name -> (file, shape, is float) of every tensor in the LLM weight files, without reading weights:
    safetensors headers, or a memory-mapped weights_only read of .bin files."""
    files = [n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).is_file()][:1]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (model_dir / index_name).is_file():
            files = sorted(set(json.loads((model_dir / index_name).read_text())["weight_map"].values()))
            break
    found: dict[str, tuple[str, tuple[int, ...], bool]] = {}
    for name in files:
        path = model_dir / name
        if path.suffix == ".safetensors":
            for key, (dtype, shape) in checkpoint.safetensors_tensors(path).items():
                found[key] = (name, shape, _float_dtype(dtype))
        else:
            from miocli.codecs.weights import read_tensor_file

            for key, tensor in read_tensor_file(path, LLM_REDOWNLOAD_HINT).items():
                found[key] = (name, tuple(tensor.shape), tensor.is_floating_point())
    return found


def llm_weight_problems(model_dir: Path, config: Any) -> list[str]:
    """What in the LLM weight files does not fit `config`: missing tensors, wrong shapes, non-float data.

    The expected names and shapes come from the model built on the meta device (no memory, ~1 s
    at 7B), the present ones from the file headers: a 12 GB checkpoint is checked without reading it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from miocli.codecs.weights import format_keys

    with warnings.catch_warnings(), library_stdio(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    expected = {key: (tuple(t.shape), t.is_floating_point()) for key, t in model.state_dict().items()}
    found = _llm_tensors(model_dir)
    # A tied output head is the embedding: files rightly leave it out.
    optional = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [key for key in expected if key not in found and key not in optional]
    wrong = [f"{key} is {found[key][1]} in {found[key][0]}, config.json implies {shape}"
             for key, (shape, _) in expected.items() if key in found and found[key][1] != shape]
    not_float = [f"{key} in {found[key][0]}" for key, (_, is_float) in expected.items()
                 if key in found and is_float and not found[key][2]]
    problems = [f"missing tensors: {format_keys(missing)}"] if missing else []
    problems += [f"wrong shapes: {format_keys(wrong)}"] if wrong else []
    problems += [f"not float tensors: {format_keys(not_float)}"] if not_float else []
    return problems


def check_llm(model_dir: Path) -> None:
    """Everything a load of the LLM and its tokenizer checks, without loading the weights (`mio doctor`):
    the tokenizer loads and has MIO's tokens, the config loads without custom code, the vocabulary
    covers the tokenizer, and the weight files hold every tensor in the config's shapes."""
    from miocli.model.tokenizer import MioTokenizer

    with library_stdio():
        tokenizer = MioTokenizer.from_dir(model_dir)
    require_media_tokens(tokenizer, model_dir)
    config = llm_config(model_dir)
    check_vocabulary(config, tokenizer.vocab_size, model_dir)
    problems = llm_weight_problems(model_dir, config)
    if problems:
        raise ModelError(f"the LLM weights in {model_dir} do not fit its config.json: {'; '.join(problems)}",
                         hint=LLM_REDOWNLOAD_HINT)


def load_llm(model_dir: Path, device: torch.device, dtype: torch.dtype, quantize: str,
             tokenizer_vocab: int | None = None) -> Any:
    """The LLM, ready for inference; `tokenizer_vocab` is checked against its vocabulary before and after."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = llm_config(model_dir)
    if tokenizer_vocab is not None:
        check_vocabulary(config, tokenizer_vocab, model_dir)
    # Never code from the folder, whatever its config asks (checkpoint refuses such folders first).
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if quantize in ("8bit", "4bit") and device.type == "cpu":
        return _load_llm_quantized_cpu(model_dir, config, quantize, tokenizer_vocab)
    if quantize in ("8bit", "4bit"):
        from transformers import BitsAndBytesConfig

        quiet_bitsandbytes()
        compute = llm_compute_dtype(dtype, quantize)
        if quantize == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        dtype = compute
    # A failed load logs a many-line report ahead of its exception; mio's one error line names the cause.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), library_stdio():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, config=config, dtype=dtype, device_map={"": str(device)}, **kwargs
            )
    except Exception as exc:  # truncated or corrupt weight files raise library-specific errors
        raise _llm_load_error(model_dir, config, exc) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    if device.type == "cpu":
        from miocli.model import cpu_attention

        cpu_attention.use_on_cpu(model)
    _check_rows(model, model_dir, tokenizer_vocab)
    return model


def _load_llm_quantized_cpu(model_dir: Path, config: Any, quantize: str, tokenizer_vocab: int | None) -> Any:
    """8-bit or 4-bit weight-only on the CPU, quantized tensor by tensor as it loads (miocli.model.quantize)."""
    from miocli.model.quantize import load_quantized_llm

    try:
        with warnings.catch_warnings(), library_stdio():
            warnings.simplefilter("ignore")
            model = load_quantized_llm(model_dir, config, 8 if quantize == "8bit" else 4)
    except ModelError:
        raise
    except Exception as exc:  # corrupt weight files raise library-specific errors
        raise _llm_load_error(model_dir, config, exc) from exc
    from miocli.model import cpu_attention

    cpu_attention.use_on_cpu(model)
    _check_rows(model, model_dir, tokenizer_vocab)
    return model


def _check_rows(model: Any, model_dir: Path, tokenizer_vocab: int | None) -> None:
    if tokenizer_vocab is not None:
        heads = [model.get_input_embeddings(), model.get_output_embeddings()]
        rows = min(int(head.weight.shape[0]) for head in heads if head is not None)
        if rows < tokenizer_vocab:
            raise ModelError(f"the LLM in {model_dir} has {rows} token embeddings but its tokenizer has "
                             f"{tokenizer_vocab} tokens",
                             hint="the LLM and the tokenizer files come from different models; " + LLM_REDOWNLOAD_HINT)


def _llm_load_error(model_dir: Path, config: Any, exc: Exception) -> ModelError:
    """The ModelError for a failed LLM load: what the files lack when the headers show it, else the library's words."""
    try:
        problems = llm_weight_problems(model_dir, config)
    except Exception:  # the diagnosis is a better message only; the load's own error still stands
        problems = []
    if problems:
        return ModelError(f"the LLM weights in {model_dir} do not fit its config.json: {'; '.join(problems)}",
                          hint=LLM_REDOWNLOAD_HINT)
    return ModelError(f"cannot load the LLM from {model_dir}: {exc.__class__.__name__}: {exc}".splitlines()[0],
                      hint=LLM_REDOWNLOAD_HINT)
