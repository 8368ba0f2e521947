"""Results to disk and stdout: the CLI's writers.

`writer` puts each result of a command on disk (`-o DIR`), in the manifest and on stdout as it
arrives; a file's way down is `folder` (a results folder: names claimed, no silent overwrite,
manifest.jsonl) then `files` (atomic writes, single files, names). `stdout` is the results' stream;
`keyframes` and `detokenize` write what those two commands produce; `transcripts` renders asr
results as txt, json, srt or vtt. Progress bars draw on `quiet`'s terminal stream, which silenced
library calls do not mute.

May import: core, media, protocol, errors, quiet.
"""
