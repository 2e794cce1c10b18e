// test_main.cpp: entry point of ./test_blocktf (doctest). Every other test/*.cpp and test/*.cu adds cases.
#define DOCTEST_CONFIG_IMPLEMENT
#include <cstdio>
#include "test/test_util.h"

int main(int argc, char** argv) {
    std::printf("blocktf tests: %s\n",
                gpu_present() ? "GPU present, [gpu] cases run" : "no GPU found, [gpu] cases are reported as skipped");
    doctest::Context context(argc, argv);
    return context.run();
}
