"""`mio serve`, an edge over the core: one warm MIO for every command, script and OpenAI client.

`app` assembles the server: `guard` checks every request before a route sees it (plain ASGI),
`worker` owns the model and batches the requests' inputs, `native` is the `/v1/run/{task}` route,
`openai/` the OpenAI-compatible subset, `playground/` the page's files.
`wire` is the JSON form of inputs and results that crosses a process (these routes, `client` for
`--server`, Ray's rows). The package imports no web framework itself: `client` and `wire` stay light.
Of the engines it knows only the seam's `Cancelled`, which ends a batch whose clients all left; of the
CLI's writers only the transcript formats (srt, vtt) that /v1/audio/transcriptions answers in.

May import: miocli, output, core, engines, model, protocol, errors.
"""
