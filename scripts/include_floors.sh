#!/usr/bin/env bash
# Prints the include graph of include/kvcache/ as a markdown table (header, floor, lines, the
# kvcache headers it includes) and fails when a header includes one of a higher floor (an
# upward include). The floors, lowest first (docs/architecture.md):
#   0 core      the vocabulary: shapes, layouts, errors, the view a cache shows the kernel, the
#               cache concept, options, the workspace, kernel selection
#   1 storage   storage buffers and rings, quantization's byte format, the persistence codec
#   2 kinds     the cache kinds
#   3 kernel    masking rules, the online softmax, the attention kernel
#   4 attend    attend()
#   5 model     the multi-layer container
#   6 umbrella  kvcache.hpp
# A header may include its own floor or lower ones. Run from anywhere; CI runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../include"

floor_of() {
  case "$1" in
    kvcache/config.hpp|kvcache/version.hpp|kvcache/layout.hpp|kvcache/errors.hpp|\
    kvcache/cache_concept.hpp|kvcache/detail/kv_view.hpp|kvcache/attend_options.hpp|\
    kvcache/attend_workspace.hpp|kvcache/kernel_isa.hpp) echo 0 ;;
    kvcache/detail/kv_storage.hpp|kvcache/detail/kv_buffer.hpp|kvcache/detail/contiguous_cache.hpp|\
    kvcache/detail/serialization.hpp|kvcache/detail/crc32c.hpp|kvcache/persistence.hpp|\
    kvcache/detail/prefix_index.hpp|kvcache/detail/paged_record.hpp|kvcache/detail/record_header.hpp|\
    kvcache/detail/record_codec.hpp|kvcache/detail/quantized_record.hpp|kvcache/detail/quantizer.hpp|\
    kvcache/quantization.hpp) echo 1 ;;
    kvcache/static_cache.hpp|kvcache/dynamic_cache.hpp|kvcache/frozen_cache.hpp|\
    kvcache/prefix_cache.hpp|kvcache/sliding_window_cache.hpp|kvcache/quantized_cache.hpp|\
    kvcache/paged_cache.hpp) echo 2 ;;
    kvcache/detail/mask.hpp|kvcache/detail/online_softmax.hpp|kvcache/detail/kernel/*) echo 3 ;;
    kvcache/attend.hpp|kvcache/paged_attend.hpp) echo 4 ;;
    kvcache/model_cache.hpp) echo 5 ;;
    kvcache/kvcache.hpp) echo 6 ;;
    *) echo "?" ;;
  esac
}

status=0
echo "| header | floor | lines | includes (kvcache) |"
echo "|---|---:|---:|---|"
while IFS= read -r header; do
  floor=$(floor_of "$header")
  if [[ "$floor" == "?" ]]; then
    echo "include_floors.sh: $header has no floor; add it to floor_of()" >&2
    status=1
    continue
  fi
  includes=$(grep -o '#include <kvcache/[^>]*>' "$header" | sed 's/#include <//; s/>//' | sort -u || true)
  shown=()
  for included in $includes; do
    [[ "$included" == *.inl ]] && continue
    f=$(floor_of "$included")
    shown+=("${included#kvcache/}")
    if [[ "$f" == "?" || "$f" -gt "$floor" ]]; then
      echo "include_floors.sh: upward include: $header (floor $floor) includes $included (floor $f)" >&2
      status=1
    fi
  done
  echo "| ${header#kvcache/} | $floor | $(wc -l < "$header") | ${shown[*]:-} |"
done < <(find kvcache -name '*.hpp' | sort)
exit $status
