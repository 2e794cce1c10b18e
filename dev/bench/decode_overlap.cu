// dev/bench/decode_overlap.cu: can a block model's decode step run its memory-bound and compute-bound halves at the
// same time? A block step is the block decoder's step (D: dominated by attention over the cache, memory-bound) and the
// token decoder's local generation of one block (T: the expansion, the prefix step and LB - 1 token steps, each with
// the LM head; matmuls, compute-bound). One sequence's T needs its own D before it, but two halves of the batch can
// be phase-shifted: T of half A beside D of half B, then D of A beside T of B. This times, on random weights at one
// cache length, the kernels of one block step (sampling and gathers left out):
//   the whole batch serially, D and T alone, the two halves serially, and the two phase-shifted halves on two streams
//   (equal priorities; T on a high-priority stream; D on a high-priority stream),
// each as a CUDA graph (the streams' order and priorities captured as graph dependencies and node priorities),
// median of 10 replays after 2. dev/NOTES.md (tenth session) has the outcome and why it does not pay.
// Build and run from the repository root (BF16 build, H200):
//   nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -DBLOCKTF_SM90A -DBLOCKTF_PRECISION_BF16 -I. \
//        dev/bench/decode_overlap.cu -o build/decode_overlap -lcublas -lcublasLt
//   build/decode_overlap [config (block_main_b4_85)] [batch (4096)] [cached blocks (290)]
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>
#include "blocktf.cu"   // defines: KvStack, linear_forward, Gpu, InferenceModel, config_by_name

namespace {

// The decode-step state of `rows` sequences: block-decoder and token-decoder caches and scratch, inputs, logits.
struct DecodeRows {
    int rows;
    KvStack block, token;
    DeviceBuffer<floatX> block_input, prefix, token_input, logits;
    DecodeRows(const ModelConfig& cfg, const TensorTable& table, int rows, int capacity)
        : rows(rows),
          block(cfg.block_decoder, "block_decoder.gpt_neox.", table, rows, capacity, 1),
          token(cfg.token_decoder, "token_decoder.gpt_neox.", table, rows, cfg.token_seq_len(), cfg.P),
          block_input((size_t)rows * cfg.block_decoder.C), prefix((size_t)rows * cfg.P * cfg.token_decoder.C),
          token_input((size_t)rows * cfg.token_decoder.C), logits((size_t)rows * cfg.V) {}
};

struct Scenario {
    std::string name;
    std::function<void(cudaStream_t)> enqueue;   // the work, forked from and joined back to the given stream
};

}  // namespace

int main(int argc, char** argv) {
    try {
        const ModelConfig cfg = config_by_name(argc > 1 ? argv[1] : "block_main_b4_85");
        const int batch = argc > 2 ? std::atoi(argv[2]) : 4096, cached = argc > 3 ? std::atoi(argv[3]) : 290;
        if (!cfg.is_block || batch < 2 || batch % 2 != 0 || cached < 1)
            throw std::runtime_error("needs a block config, an even batch >= 2 and >= 1 cached blocks");
        InferenceModel model(cfg);
        std::vector<float> weights(model.table.num_params);
        std::mt19937 rng(1);
        std::uniform_real_distribution<float> uniform(-0.02f, 0.02f);
        for (float& w : weights) w = uniform(rng);
        model.load(weights);
        const floatX* params = model.params.data();
        const int DB = cfg.block_decoder.C, HT = cfg.token_decoder.C;
        DecodeRows whole(cfg, model.table, batch, cached + 1), half_a(cfg, model.table, batch / 2, cached + 1),
            half_b(cfg, model.table, batch / 2, cached + 1);

        // D: one block-decoder step at cache position `cached` (keys 0..cached visible).
        auto block_step = [&](Gpu& gpu, DecodeRows& r) {
            r.block.forward(gpu, r.block_input.data(), 1, nullptr, cached, nullptr, nullptr, params);
        };
        // T: the expansion, the prefix step and LB - 1 token steps, each followed by the LM head.
        auto token_block = [&](Gpu& gpu, DecodeRows& r) {
            const floatX* head = model.param("token_decoder.embed_out.weight");
            linear_forward(gpu, r.prefix.data(), r.block.out(), model.param("token_decoder.expansion_layer.weight"),
                           model.param("token_decoder.expansion_layer.bias"), r.rows, DB, cfg.P * HT);
            r.token.forward(gpu, r.prefix.data(), cfg.P, nullptr, 0, nullptr, nullptr, params);
            linear_forward(gpu, r.logits.data(), r.token.out(), head, nullptr, r.rows, HT, cfg.V);
            for (int j = 0; j + 1 < cfg.LB; j++) {
                r.token.forward(gpu, r.token_input.data(), 1, nullptr, cfg.P + j, nullptr, nullptr, params);
                linear_forward(gpu, r.logits.data(), r.token.out(), head, nullptr, r.rows, HT, cfg.V);
            }
        };

        int low_priority = 0, high_priority = 0;
        cudaCheck(cudaDeviceGetStreamPriorityRange(&low_priority, &high_priority));
        auto make_stream = [](int priority) {
            cudaStream_t s;
            cudaCheck(cudaStreamCreateWithPriority(&s, cudaStreamNonBlocking, priority));
            return s;
        };
        const cudaStream_t origin = make_stream(low_priority), low_a = make_stream(low_priority),
                           low_b = make_stream(low_priority), high = make_stream(high_priority);
        Gpu gpu_a, gpu_b;   // a cuBLASLt workspace per concurrent stream
        auto on = [](Gpu& gpu, cudaStream_t s) -> Gpu& {
            gpu.stream = s;
            cublasCheck(cublasSetStream(gpu.blas, s));
            return gpu;
        };
        cudaEvent_t fork, a_done, b_done;
        for (cudaEvent_t* e : {&fork, &a_done, &b_done}) cudaCheck(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
        // Phase 1: T of half A on stream t_a beside D of half B on d_b; phase 2, once both are done: D of A on d_a beside
        // T of B on t_b. Half A's work goes through gpu_a, half B's through gpu_b (never one Gpu on two streams at once).
        auto phase_shifted = [&](cudaStream_t o, cudaStream_t t_a, cudaStream_t d_b, cudaStream_t d_a, cudaStream_t t_b) {
            cudaCheck(cudaEventRecord(fork, o));
            for (cudaStream_t s : {t_a, d_b}) cudaCheck(cudaStreamWaitEvent(s, fork));
            token_block(on(gpu_a, t_a), half_a);
            cudaCheck(cudaEventRecord(a_done, t_a));
            block_step(on(gpu_b, d_b), half_b);
            cudaCheck(cudaEventRecord(b_done, d_b));
            for (cudaStream_t s : {d_a, t_b}) {
                cudaCheck(cudaStreamWaitEvent(s, a_done));
                cudaCheck(cudaStreamWaitEvent(s, b_done));
            }
            block_step(on(gpu_a, d_a), half_a);
            cudaCheck(cudaEventRecord(a_done, d_a));
            token_block(on(gpu_b, t_b), half_b);
            cudaCheck(cudaEventRecord(b_done, t_b));
            cudaCheck(cudaStreamWaitEvent(o, a_done));
            cudaCheck(cudaStreamWaitEvent(o, b_done));
        };
        const std::vector<Scenario> scenarios = {
            {"whole batch: D then T", [&](cudaStream_t o) { block_step(on(gpu_a, o), whole); token_block(gpu_a, whole); }},
            {"whole batch: D alone", [&](cudaStream_t o) { block_step(on(gpu_a, o), whole); }},
            {"whole batch: T alone", [&](cudaStream_t o) { token_block(on(gpu_a, o), whole); }},
            {"halves, one stream: D T D T", [&](cudaStream_t o) {
                 for (DecodeRows* r : {&half_a, &half_b}) {
                     block_step(on(gpu_a, o), *r);
                     token_block(gpu_a, *r);
                 }
             }},
            {"halves phase-shifted, a stream per half, equal priority",
             [&](cudaStream_t o) { phase_shifted(o, low_a, low_b, low_a, low_b); }},
            {"halves phase-shifted, T on a high-priority stream", [&](cudaStream_t o) { phase_shifted(o, high, low_a, low_a, high); }},
            {"halves phase-shifted, D on a high-priority stream", [&](cudaStream_t o) { phase_shifted(o, low_a, high, high, low_a); }},
        };

        std::printf("%s, batch %d, %d cached blocks: one block step's kernels as a CUDA graph, median of 10 replays\n",
                    cfg.name.c_str(), batch, cached);
        std::printf("| scenario | ms (median [min, max]) |\n| --- | --- |\n");
        cudaEvent_t start, stop;
        cudaCheck(cudaEventCreate(&start));
        cudaCheck(cudaEventCreate(&stop));
        for (const Scenario& scenario : scenarios) {
            scenario.enqueue(origin);   // outside the capture: cuBLASLt plans are made here
            cudaCheck(cudaStreamSynchronize(origin));
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            cudaCheck(cudaStreamBeginCapture(origin, cudaStreamCaptureModeThreadLocal));
            scenario.enqueue(origin);
            cudaCheck(cudaStreamEndCapture(origin, &graph));
            cudaCheck(cudaGraphInstantiateWithFlags(&exec, graph, cudaGraphInstantiateFlagUseNodePriority));
            std::vector<float> ms;
            for (int replay = 0; replay < 12; replay++) {
                cudaCheck(cudaEventRecord(start, origin));
                cudaCheck(cudaGraphLaunch(exec, origin));
                cudaCheck(cudaEventRecord(stop, origin));
                cudaCheck(cudaEventSynchronize(stop));
                float elapsed = 0.0f;
                cudaCheck(cudaEventElapsedTime(&elapsed, start, stop));
                if (replay >= 2) ms.push_back(elapsed);
            }
            std::sort(ms.begin(), ms.end());
            std::printf("| %s | %.3f [%.3f, %.3f] |\n", scenario.name.c_str(), ms[ms.size() / 2], ms.front(), ms.back());
            cudaCheck(cudaGraphExecDestroy(exec));
            cudaCheck(cudaGraphDestroy(graph));
        }
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "decode_overlap: %s\n", e.what());
        return 1;
    }
}
