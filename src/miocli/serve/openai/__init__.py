"""The OpenAI-compatible subset of `mio serve`, so existing OpenAI clients work unchanged.

Each request becomes a `Job` on the same worker as the native `/v1/run/{task}` requests, so it is
batched with them and its result comes back as soon as its batch is decoded. These modules only
translate: OpenAI request → task, `Item`s and settings (checked before anything is queued), and
`Result` → OpenAI response; docs/server_openai.md lists what maps to what.

- `protocol`: what every endpoint shares: the body reader, data URLs and base64, OpenAI-shaped errors;
- `schema`: the request bodies as pydantic models (strict JSON types, OpenAI's ranges and error codes);
- `plans`: a request's job (`Plan`), checked by the core, queued, its results awaited, cancelled when
  its client hangs up;
- `chat`, `images`, `audio`: one module per endpoint family;
- `routes`: the routes on the app, and OpenAI-shaped 404/405s under /v1/.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 4xx for what the
client can fix, 5xx only for a problem of the server or the model, never a traceback.
"""
