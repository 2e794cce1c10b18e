// train.cu: `./train`, training a blocktf model on one GPU (issue 5). Not implemented yet: it says so and exits
// non-zero, except `--list-configs`, which prints the named configs of model.h with their parameter counts.
#include <cstdio>
#include <cstring>
#include "blocktf.cu"

static void list_configs() {
    std::printf("%-20s %-8s %14s %14s %14s\n", "config", "kind", "non-embedding", "used", "stored");
    for (const ModelConfig& config : named_configs()) {
        ParamCounts n = count_params(build_tensor_table(config));
        std::printf("%-20s %-8s %13.2fM %13.2fM %13.2fM\n", config.name.c_str(), config.is_block ? "block" : "vanilla",
                    n.non_embedding / 1e6, n.used / 1e6, n.stored / 1e6);
    }
}

int main(int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--list-configs") == 0) {
        list_configs();
        return 0;
    }
    std::fprintf(stderr, "train: GPU training is not implemented yet (blocktf issue 5); nothing was done.\n"
                         "       available now: ./train --list-configs\n");
    return 2;
}
