"""The model on disk and in memory: finding, checking and loading a checkpoint.

`checkpoint` finds a model folder and checks its files; `runtime` loads each component on first use,
after `memory` has planned room for it, on the device, dtype and quantization `devices` resolves;
`llm` checks and loads the LLM (`quantize`: mio's CPU weight-only layers), `tokenizer` is MIO's
tokenizer and `stdio` the guard every load runs under. `download` fetches weights on purpose;
`tiny` and `realsize` build random checkpoints of the real layout (tests, `mio demo`, measurements).

May import: codecs, protocol, errors, quiet.
"""
