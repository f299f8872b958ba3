# Runs the Llama demo in a tiny configuration and checks what it prints (ctest example.llama_demo).
#   cmake -DDEMO=<path to kvcache_llama_demo> -P check_llama_demo.cmake
# A plain PASS_REGULAR_EXPRESSION would ignore the exit code; this script checks both.
if(NOT DEMO)
  message(FATAL_ERROR "check_llama_demo.cmake: pass -DDEMO=<path to kvcache_llama_demo>")
endif()

execute_process(
  COMMAND "${DEMO}" --model random --layers 2 --hidden 64 --heads 4 --kv-heads 2 --head-dim 16 --group-size 16
                    --vocab 256 --prompt 24 --new-tokens 8 --window 8 --sinks 2 --window-chunk 4
                    --residual 0 --prefix 16 --continuations 2 --no-cache-tokens 0 --threads 2
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE errors)
message("${output}")

set(failures "")
if(NOT result EQUAL 0)
  string(APPEND failures "\n  exit code ${result} (expected 0); stderr: ${errors}")
endif()
if(NOT output MATCHES "check: static == dynamic == no-cache: yes")
  string(APPEND failures "\n  no line 'check: static == dynamic == no-cache: yes'")
endif()
# Every cache kind has a row in the table: its name, then numbers.
foreach(row IN ITEMS "static" "dynamic" "window 8\\+2 sinks" "int8" "int4" "prefix 16 \\+ 2 seqs"
                     "paged, 2 batched" "no cache")
  if(NOT output MATCHES "\n${row} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9]+/[0-9]+ ")
    string(APPEND failures "\n  no table row for '${row}'")
  endif()
endforeach()
# The paged pool serves the prefix run's requests batched: the same tokens, request by request
# (all 8 of --new-tokens).
foreach(request IN ITEMS 0 1)
  if(NOT output MATCHES "paged seq ${request}: 8/8 tokens equal to prefix seq ${request}'s")
    string(APPEND failures "\n  paged seq ${request} does not generate the prefix run's tokens")
  endif()
endforeach()
if(failures)
  message(FATAL_ERROR "kvcache_llama_demo failed:${failures}")
endif()
