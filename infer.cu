// infer.cu: `./infer`, cached generation and the throughput benchmark (issue 6). Not implemented yet: it says so
// and exits non-zero.
#include <cstdio>
#include "blocktf.cu"

int main() {
    std::fprintf(stderr, "infer: generation is not implemented yet (blocktf issue 6); nothing was done.\n");
    return 2;
}
