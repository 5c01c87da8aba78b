#!/usr/bin/env bash
# The end-to-end demo on a fresh machine: installs easy-VQA if missing, builds the release
# binary, serves the embedded tiny model on loopback, streams the 1000 easy-VQA test images
# through the ingest RPC, runs text searches with ITM rerank, captions images, answers
# questions, prints the held-out quality figures, and stops the server.
#
# Environment overrides: MPLUG_DEMO_PORT (default 50151), MPLUG_DEMO_DATA (default
# .data/demo), MPLUG_DEMO_CHECKPOINT / MPLUG_DEMO_CONFIG (default: the embedded model),
# MPLUG_DEMO_IMAGES (default: the easy-VQA test images). easy-VQA is installed only when the
# demo uses it: for the default images, and for the held-out evaluation, which runs only for
# the embedded model on the easy-VQA images (so not when MPLUG_DEMO_IMAGES is set).
set -euo pipefail
cd "$(dirname "$0")/.."

port="${MPLUG_DEMO_PORT:-50151}"
data_dir="${MPLUG_DEMO_DATA:-.data/demo}"
checkpoint="${MPLUG_DEMO_CHECKPOINT:-}"
config="${MPLUG_DEMO_CONFIG:-}"
model_flags=()
if [[ -n "$checkpoint" ]]; then
    model_flags=(--checkpoint "$checkpoint" --model-config "$config")
fi
server="http://127.0.0.1:$port"
bin=target/release/mplug-search
if [[ -n "${CARGO_TARGET_DIR:-}" ]]; then
    bin="$CARGO_TARGET_DIR/release/mplug-search"
fi

section() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }

easy_vqa=""
images="${MPLUG_DEMO_IMAGES:-}"
if [[ -z "$images" ]]; then
    section "easy-VQA data"
    easy_vqa=$(bash scripts/fetch-easy-vqa.sh)
    images="$easy_vqa/data/test/images"
fi
echo "images: $images"

section "build (release)"
cargo build --release --locked --bin mplug-search

section "serve on $server"
mkdir -p "$data_dir"
"$bin" serve --listen "127.0.0.1:$port" --data-dir "$data_dir" "${model_flags[@]}" \
    > "$data_dir/server.log" 2>&1 &
server_pid=$!
stop_server() {
    if kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid"
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap stop_server EXIT INT TERM

for _ in $(seq 1 120); do
    if "$bin" stats --server "$server" > /dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited; its log:" >&2
        cat "$data_dir/server.log" >&2
        exit 1
    fi
    sleep 0.5
done
"$bin" stats --server "$server"

section "index $images (ingest RPC; re-running is a cheap no-op)"
"$bin" index "$images" --server "$server"

section "text search with ITM rerank (top 5)"
for query in "a red circle" "a blue triangle" "a yellow rectangle" "a teal circle" \
    "a gray triangle"; do
    echo "-- $query"
    "$bin" search "$query" --rerank --k 5 --server "$server"
done

mapfile -t samples < <(find "$images" -maxdepth 1 -type f \( -name '*.png' -o -name '*.jpg' \
    -o -name '*.jpeg' -o -name '*.webp' \) | sort | head -n 5)

section "captions"
for file in "${samples[@]}"; do
    printf '%s: ' "$(basename "$file")"
    "$bin" caption "$file" --server "$server"
done

section "questions"
questions=("what color is the shape?" "what shape is in the image?" "is there a circle?"
    "does the image not contain a red shape?" "what is the color of the shape?")
for i in "${!samples[@]}"; do
    printf '%s | %s -> ' "$(basename "${samples[$i]}")" "${questions[$i]}"
    "$bin" ask "${samples[$i]}" "${questions[$i]}" --server "$server"
done

if [[ -z "$checkpoint" && -n "$easy_vqa" ]]; then
    section "held-out quality (eval of the built-in model on the 1000 easy-VQA test images)"
    "$bin" eval --checkpoint models/tiny-easyvqa/model.safetensors \
        --model-config models/tiny-easyvqa/mplug.json --easy-vqa "$easy_vqa"
fi
