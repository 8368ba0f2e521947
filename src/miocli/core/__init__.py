"""The task core, in memory: inputs in, results out, batch by batch.

`api.Mio` is the API every edge uses (the CLI, `mio serve`, Ray workers, scripts); `stream` runs a
task over its inputs, chaining the `steps` of each batch (load → encode → prompt → generate →
decode) or the two-stage tasks of `composite`. Tasks are data (`tasks`); inputs and results are
plain objects (`inputs`, `results`); prompt text comes from `prompts`, token ids and the engine call
from `pipeline`, media ↔ token strings from `mediatokens`, the generation options and presets from
`generation`. Nothing here writes files, prints or serves: the edges do.

May import: engines, model, codecs, media, protocol, errors, quiet.
"""
