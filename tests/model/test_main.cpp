// Catch2 v2 entry point for the model tests.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
