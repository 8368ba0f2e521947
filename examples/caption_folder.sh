#!/usr/bin/env bash
# Caption every image under a folder, one text file per image plus manifest.jsonl in OUT.
#
#   examples/caption_folder.sh photos/ captions/ [more mio options, e.g. --batch-size 16]
#
# Each caption is written as soon as its batch is done, so the run can be stopped at any
# moment (Ctrl-C, a reboot, a killed job) and started again with the same command: inputs
# whose caption exists are skipped (--skip-existing) and the set is finished.
set -euo pipefail

in=${1:?usage: caption_folder.sh IMAGES_DIR OUT_DIR [mio options]}
out=${2:?usage: caption_folder.sh IMAGES_DIR OUT_DIR [mio options]}
shift 2

# Paths on stdin ('-'): any selection `find` can make, in a stable order.
find "$in" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) -print | sort |
    mio caption - -o "$out" --skip-existing "$@"

# The manifest has one JSON line per result: count the captions and list any failures.
captions=$(find "$out" -name '*.caption.txt' | wc -l)
failed=$(grep -c '"error"' "$out/manifest.jsonl" || true)
echo "$captions captions in $out ($failed failed)" >&2
