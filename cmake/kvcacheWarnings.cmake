# kvcache_target_warnings(<target>): the warning flags for the project's own tests, examples
# and benchmarks. Set per target, never globally, so nothing leaks into a consumer's build.
# With KVCACHE_DEVELOPER=ON warnings are errors.
function(kvcache_target_warnings target)
  if(MSVC)
    target_compile_options(${target} PRIVATE /W4 $<$<BOOL:${KVCACHE_DEVELOPER}>:/WX>)
  else()
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic
                                             $<$<BOOL:${KVCACHE_DEVELOPER}>:-Werror>)
  endif()
endfunction()
