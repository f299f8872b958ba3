// Catch2 v2 only: the test runner's main(), compiled once and linked into every test.
// (With Catch2 v3 the tests link Catch2::Catch2WithMain instead and this file is not built.)
#define CATCH_CONFIG_MAIN
#include "catch.hpp"
