"""Generation engines: what turns prompt ids into answer ids, behind one seam (`base`).

`transformers_engine` is the reference-exact default (its logits processors in
`transformers_processors`), `vllm_local` and `vllm_server` run vLLM in this process or at a URL,
`llamacpp` runs llama.cpp (llama-cpp-python) on the checkpoint's GGUF export;
`rules` is the decodable-output rule every engine applies through its own adapter.

May import: model, protocol, errors.
"""
