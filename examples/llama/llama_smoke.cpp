// llama-smoke: loads a llama GGUF model, wraps the prompt in the model's
// ChatML template and prints the greedy continuation (full KV cache).
//
//   llama-smoke [--model PATH] [--max-tokens N] [--raw] PROMPT...
//
// --raw feeds PROMPT to the model as is (no chat template). Timings go to
// stderr. The model defaults to $PYRAMIDINFER_MODEL, then
// <repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf (see examples/fetch_model.sh).
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#include "llama/generate.hpp"
#include "llama/tokenizer.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Options {
    std::string model_path;
    std::size_t max_tokens = 64;
    bool raw = false;
    std::string prompt;
};

std::string default_model_path() {
    if (const char* env = std::getenv("PYRAMIDINFER_MODEL")) return env;
    return std::string(PYRAMIDINFER_REPO_ROOT) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

Options parse_args(int argc, char** argv) {
    Options o;
    o.model_path = default_model_path();
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--model" && i + 1 < argc) {
            o.model_path = argv[++i];
        } else if (arg == "--max-tokens" && i + 1 < argc) {
            o.max_tokens = static_cast<std::size_t>(std::stoul(argv[++i]));
        } else if (arg == "--raw") {
            o.raw = true;
        } else {
            o.prompt += (o.prompt.empty() ? "" : " ") + arg;
        }
    }
    if (o.prompt.empty()) o.prompt = "What is the capital of France?";
    return o;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace pyramidinfer::llama;
    try {
        const Options opt = parse_args(argc, argv);
        auto start = Clock::now();
        const GgufFile file = GgufFile::open(opt.model_path);
        const Tokenizer tokenizer = Tokenizer::from_gguf(file);
        const Model model = Model::from_gguf(file);
        std::cerr << "loaded " << opt.model_path << " in " << seconds_since(start) << " s\n";

        const std::string text = opt.raw ? opt.prompt : tokenizer.apply_chat_template({{"user", opt.prompt}}, true);
        const std::vector<std::int32_t> prompt = tokenizer.encode(text);
        const std::int32_t stop = opt.raw ? tokenizer.eos_id() : tokenizer.token_id("<|im_end|>");

        start = Clock::now();
        Clock::time_point first_token_time{};
        std::size_t n_generated = 0;
        generate_greedy(model, prompt, opt.max_tokens, stop, [&](std::int32_t id) {
            if (n_generated++ == 0) first_token_time = Clock::now();
            std::cout << tokenizer.token_text(id) << std::flush;
        });
        std::cout << "\n";
        if (n_generated > 0) {
            const double prefill = std::chrono::duration<double>(first_token_time - start).count();
            const double decode = seconds_since(first_token_time);
            std::cerr << "prompt " << prompt.size() << " tokens: " << static_cast<double>(prompt.size()) / prefill << " tok/s prefill; "
                      << n_generated << " generated: "
                      << (n_generated > 1 ? static_cast<double>(n_generated - 1) / decode : 0.0) << " tok/s decode\n";
        }
        return 0;
    } catch (const std::exception& e) {
        std::cerr << "llama-smoke: " << e.what() << "\n";
        return 1;
    }
}
