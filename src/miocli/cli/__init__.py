"""The `mio` command line, an edge over the core: options, inputs, printing.

`app` assembles the Typer app from one module per command group (`chat`, `media`, `video`, `tokens`,
`server`, `housekeeping`, `export`); `options` declares the shared options once and `run` turns a command's
arguments into targets and streams them through `miocli.core.api.Mio` into the writer
(`miocli.output`). A command runs in this process, on a `mio serve` (`--server`, `miocli.serve.client`)
or on a Ray cluster (`--ray`, `miocli.scale`). Nothing heavy at import: `mio --help` loads all of it.

May import: scale, serve, output, core, engines, model, codecs, media, protocol, errors, quiet.
"""
