#!/usr/bin/env bash
# Installs the easy-VQA dataset (PyPI package easy-vqa 1.0, MIT licence) into the git-ignored
# folder .data/pydeps when it is missing, then prints the package folder, which holds
# data/{train,test}/images/*.png and data/{train,test}/questions.json.
set -euo pipefail
cd "$(dirname "$0")/.."

target=.data/pydeps
package="$target/easy_vqa"
if [[ ! -f "$package/data/test/questions.json" ]]; then
    echo "installing easy-vqa==1.0 into $target" >&2
    python3 -m pip install --quiet --no-deps --target "$target" easy-vqa==1.0 >&2
fi

train_images=$(find "$package/data/train/images" -name '*.png' | wc -l)
test_images=$(find "$package/data/test/images" -name '*.png' | wc -l)
if [[ "$train_images" -ne 4000 || "$test_images" -ne 1000 ]]; then
    echo "easy-VQA looks incomplete: $train_images train and $test_images test images" >&2
    echo "(expected 4000 and 1000); delete $target and run again" >&2
    exit 1
fi
echo "$package"
