# One place for warnings, sanitizers and visibility. Every keyhold target goes
# through keyhold_target_settings(), so the flags cannot drift between folders.

set(KH_WARNINGS
    -Wall -Wextra -Wshadow -Wformat=2 -Wimplicit-fallthrough -Wvla
    -Wnon-virtual-dtor -Wconversion -Wsign-conversion)

function(keyhold_target_settings target)
  target_compile_options(${target} PRIVATE ${KH_WARNINGS})
  if(KH_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
endfunction()

if(KH_SANITIZE)
  add_compile_options(-fsanitize=${KH_SANITIZE} -fno-omit-frame-pointer)
  add_link_options(-fsanitize=${KH_SANITIZE})
  if(KH_SANITIZE MATCHES "undefined")
    add_compile_options(-fno-sanitize-recover=all)
  endif()
  if(KH_SANITIZE MATCHES "thread" AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    # GCC warns that TSan does not model the std::atomic_thread_fence inside
    # Asio's handler invocation; Asio's scheduler also orders handlers with
    # mutexes, which TSan does see.
    add_compile_options(-Wno-tsan)
  endif()
endif()

# keyhold_test(NAME SOURCES... LIBS ...): a GoogleTest binary registered with ctest.
function(keyhold_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  keyhold_target_settings(${name})
  target_link_libraries(${name} PRIVATE ${ARG_LIBS} GTest::gtest GTest::gmock GTest::gtest_main)
  add_test(NAME ${name} COMMAND ${name})
  if(ARG_LABELS)
    set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}")
  endif()
endfunction()
