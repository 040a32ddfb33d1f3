// Model-file layout checks (issue 14, item 5): tensors that share bytes, a
// type or shape that no longer matches the bytes stored, unexpected tensors,
// llama.block_count against the layers in the file, non-regular files,
// general.architecture messages and llama.context_length. Each defect is
// made on a tiny hand-built llama file and, where the bug was first seen,
// on the real model file too.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <future>
#include <iterator>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

#include "model_fixture.hpp"
#include "tiny_llama.hpp"

using namespace model_test;
using Catch::Matchers::Contains;

namespace {

// Parses and loads the model; returns the FormatError message ("" if loaded).
std::string load_error(const std::vector<std::uint8_t>& bytes) {
    try {
        const GgufFile file = GgufFile::view_bytes(bytes.data(), bytes.size());
        (void)Model::from_gguf(file);
        return "";
    } catch (const FormatError& e) {
        return e.what();
    }
}

void require_rejected(const std::vector<std::uint8_t>& bytes, const std::string& message_part) {
    const std::string message = load_error(bytes);
    INFO("message: " << message);
    REQUIRE_FALSE(message.empty());
    CHECK_THAT(message, Contains(message_part));
}

std::vector<std::uint8_t> read_model_bytes() {
    require_model_file();
    return read_file_bytes(model_path());
}

// Offset of the value (after the u32 type) of metadata key `key`.
std::size_t metadata_value(const std::vector<std::uint8_t>& bytes, const std::string& key) {
    const std::size_t at = tensor_entry(bytes, key);  // same encoding: u64 length + bytes
    REQUIRE(at != 0);
    return at + 4;
}

std::string temp_dir() {
    char pattern[] = "/tmp/pyramidinfer_model_file_XXXXXX";
    const char* dir = mkdtemp(pattern);
    REQUIRE(dir != nullptr);
    return dir;
}

// Runs GgufFile::open(path) on a thread so that a hang fails the test
// instead of blocking ctest; returns the FormatError message.
std::string open_error(const std::string& path) {
    auto result = std::make_shared<std::promise<std::string>>();
    std::future<std::string> message = result->get_future();
    std::thread([path, result] {
        try {
            (void)GgufFile::open(path);
            result->set_value("");
        } catch (const FormatError& e) {
            result->set_value(e.what());
        } catch (const std::exception& e) {
            result->set_value(std::string("wrong exception type: ") + e.what());
        }
    }).detach();
    if (message.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
        FAIL("GgufFile::open('" << path << "') hangs");
    }
    return message.get();
}

}  // namespace

TEST_CASE("tiny llama file loads and runs", "[gguf]") {
    const std::vector<std::uint8_t> bytes = TinyLlama{}.build();
    const GgufFile file = GgufFile::view_bytes(bytes.data(), bytes.size());
    const Model model = Model::from_gguf(file);
    CHECK(model.config().n_layers == 2);
    CHECK(model.config().context_length == 32);
    FullKvCache cache = model.make_full_cache(4);
    const Matrix logits = model.logits(model.forward({1, 2, 3}, iota_positions(0, 3), cache));
    for (float x : logits.data) REQUIRE(std::isfinite(x));
}

TEST_CASE("tensors that share bytes are rejected", "[gguf]") {
    std::vector<std::uint8_t> bytes = TinyLlama{}.build();
    // Point blk.1.attn_q at blk.0.attn_q's bytes (same type and shape).
    poke(bytes, tensor_offset_field(bytes, "blk.1.attn_q.weight"),
         peek<std::uint64_t>(bytes, tensor_offset_field(bytes, "blk.0.attn_q.weight")));
    require_rejected(bytes, "overlaps tensor 'blk.0.attn_q.weight'");

    // Partial overlap: start inside the previous tensor.
    bytes = TinyLlama{}.build();
    const std::size_t at = tensor_offset_field(bytes, "blk.0.attn_k.weight");
    poke(bytes, at, peek<std::uint64_t>(bytes, at) - 64);
    require_rejected(bytes, "overlaps");
}

TEST_CASE("a tensor type that does not match the bytes stored is rejected", "[gguf]") {
    struct Swap {
        const char* tensor;
        std::uint32_t type;
        const char* message;
    };
    // Each swap still fits the file; only the neighbours reveal it.
    for (const Swap& s : {Swap{"blk.0.attn_q.weight", TinyLlama::Q4_1, "overlaps"},       // 2304 -> 2560 bytes
                          Swap{"blk.0.attn_k.weight", TinyLlama::Q4_0, "gap of 128 bytes"},  // 1280 -> 1152
                          Swap{"blk.1.attn_norm.weight", TinyLlama::F16, "gap of 128 bytes"},
                          Swap{"output.weight", TinyLlama::F32, "overlaps"},
                          Swap{"token_embd.weight", TinyLlama::Q4_0, "gap"},
                          Swap{"blk.1.ffn_down.weight", TinyLlama::F16, "bytes follow the end of the last tensor"}}) {
        std::vector<std::uint8_t> bytes = TinyLlama{}.build();
        poke(bytes, tensor_type_field(bytes, s.tensor), s.type);
        INFO(s.tensor << " as ggml type " << s.type);
        require_rejected(bytes, s.message);
        CHECK_THAT(load_error(bytes), Contains(s.tensor));
    }
}

TEST_CASE("a changed shape that still fits is rejected", "[gguf]") {
    std::vector<std::uint8_t> bytes = TinyLlama{}.build();
    // attn_q [64 x 64] -> [64 x 32]: half the bytes, rest becomes a gap.
    poke<std::uint64_t>(bytes, tensor_entry(bytes, "blk.0.attn_q.weight") + 4 + 8, 32);
    require_rejected(bytes, "gap");
}

TEST_CASE("trailing bytes after the last tensor are rejected", "[gguf]") {
    std::vector<std::uint8_t> bytes = TinyLlama{}.build();
    bytes.insert(bytes.end(), 64, 0);
    require_rejected(bytes, "bytes follow the end of the last tensor");
}

TEST_CASE("unexpected tensors are rejected by name", "[gguf]") {
    TinyLlama tiny;
    tiny.extra_tensors.push_back({"rope_freqs.weight", {8}, 0, std::vector<std::uint8_t>(32, 0)});
    require_rejected(tiny.build(), "tensor 'rope_freqs.weight' [8] is not used by a llama model");

    TinyLlama typo;
    typo.extra_tensors.push_back({"blk.0.attn_qq.weight", {64}, 0, std::vector<std::uint8_t>(256, 0)});
    require_rejected(typo.build(), "'blk.0.attn_qq.weight'");
}

TEST_CASE("llama.block_count must equal the layers in the file", "[gguf]") {
    TinyLlama fewer;  // block_count 1, two layers stored: layer 1 would be dropped
    fewer.n_layers = 1;
    require_rejected(fewer.build(), "llama.block_count is 1 but the file has tensors for 2 layers");

    TinyLlama more;
    more.n_layers = 3;
    require_rejected(more.build(), "llama.block_count is 3 but the file has tensors for 2 layers");

    TinyLlama gap;  // blk.0 and blk.2 but no blk.1: the missing layer is named
    gap.n_layers = 3;
    gap.layers_written = 1;
    for (const TestTensor& t : TinyLlama{}.tensors()) {
        if (t.name.rfind("blk.1.", 0) == 0) gap.extra_tensors.push_back({"blk.2." + t.name.substr(6), t.dims, t.type, t.data});
    }
    require_rejected(gap.build(), "missing tensor 'blk.1.");

    // The real file: block_count 30 -> 29 used to load 29 of the 30 layers.
    std::vector<std::uint8_t> real = read_model_bytes();
    const std::size_t at = metadata_value(real, "llama.block_count");
    REQUIRE(peek<std::uint32_t>(real, at) == 30);
    poke<std::uint32_t>(real, at, 29);
    require_rejected(real, "llama.block_count is 29 but the file has tensors for 30 layers");
}

TEST_CASE("real model file: a swapped tensor type is rejected", "[gguf]") {
    std::vector<std::uint8_t> bytes = read_model_bytes();
    // Q4_1 -> Q4_0 shrinks blk.5.ffn_up by 1/10: the file still holds it.
    const std::size_t at = tensor_type_field(bytes, "blk.5.ffn_up.weight");
    REQUIRE(peek<std::uint32_t>(bytes, at) == TinyLlama::Q4_1);
    poke<std::uint32_t>(bytes, at, TinyLlama::Q4_0);
    require_rejected(bytes, "blk.5.ffn_up.weight");
    // Two tensors at the same offset.
    bytes = read_model_bytes();
    poke(bytes, tensor_offset_field(bytes, "blk.3.attn_v.weight"),
         peek<std::uint64_t>(bytes, tensor_offset_field(bytes, "blk.3.attn_k.weight")));
    require_rejected(bytes, "overlaps");
}

TEST_CASE("general.architecture errors say what the file contains", "[gguf]") {
    TinyLlama qwen;
    qwen.architecture = "qwen2";
    require_rejected(qwen.build(), "general.architecture is \"qwen2\"; only \"llama\" is supported");

    std::vector<KeyValue> kvs = TinyLlama{}.metadata();
    kvs[0] = kv_scalar<std::uint32_t>("general.architecture", 4, 7);
    require_rejected(build_gguf(kvs, TinyLlama{}.tensors()), "general.architecture has value type 4, not a string");

    const std::vector<std::uint8_t> none =
        build_gguf({kv_scalar<std::uint32_t>("llama.block_count", 4, 1)}, {});
    require_rejected(none, "general.architecture is missing");
}

TEST_CASE("tokenizer vocabulary must match llama.vocab_size", "[gguf]") {
    TinyLlama tiny;
    tiny.tokenizer_tokens = TinyLlama::vocab + 1;
    require_rejected(tiny.build(), "tokenizer.ggml.tokens has 49 entries but llama.vocab_size is 48");
    tiny.tokenizer_tokens = TinyLlama::vocab;
    CHECK(load_error(tiny.build()).empty());

    // Without llama.vocab_size the token list sets it; it must be strings.
    std::vector<KeyValue> kvs = TinyLlama{}.metadata();
    kvs.pop_back();  // llama.vocab_size
    kvs.push_back(kv_array<std::int32_t>("tokenizer.ggml.tokens", 5, std::vector<std::int32_t>(TinyLlama::vocab, 1)));
    require_rejected(build_gguf(kvs, TinyLlama{}.tensors()), "tokenizer.ggml.tokens is not a non-empty string array");
}

TEST_CASE("non-regular files are rejected up front", "[gguf]") {
    const std::string dir = temp_dir();
    CHECK_THAT(open_error(dir), Contains("is a directory, not a regular file"));

    const std::string fifo = dir + "/model.gguf";
    REQUIRE(mkfifo(fifo.c_str(), 0600) == 0);
    CHECK_THAT(open_error(fifo), Contains("is a FIFO, not a regular file"));
    unlink(fifo.c_str());

    if (access("/dev/null", R_OK) == 0) CHECK_THAT(open_error("/dev/null"), Contains("character device"));
    CHECK_THAT(open_error(dir + "/missing.gguf"), Contains("cannot open"));

    // An empty regular file is opened and then rejected as truncated.
    const std::string empty = dir + "/empty.gguf";
    std::ofstream(empty).close();
    CHECK_THAT(open_error(empty), Contains("truncated"));
    unlink(empty.c_str());
    rmdir(dir.c_str());
}

TEST_CASE("llama.context_length is enforced", "[gguf]") {
    const std::vector<std::uint8_t> bytes = TinyLlama{}.build();
    const Model model = Model::from_gguf(GgufFile::view_bytes(bytes.data(), bytes.size()));
    const LlamaConfig& c = model.config();
    CHECK_NOTHROW(c.check_sequence_length(32, 0));
    CHECK_NOTHROW(c.check_sequence_length(30, 2));
    CHECK_THROWS_WITH(c.check_sequence_length(30, 3),
                      Contains("prompt of 30 tokens plus 3 new tokens exceeds llama.context_length 32"));
    CHECK_THROWS_AS(c.check_sequence_length(33, 0), std::invalid_argument);
    CHECK_THROWS_AS(c.check_sequence_length(1, ~std::size_t{0}), std::invalid_argument);  // no wrap-around
    CHECK_THROWS_AS(c.check_sequence_length(~std::size_t{0}, ~std::size_t{0}), std::invalid_argument);

    // The generation helpers check before allocating anything.
    const std::vector<std::int32_t> prompt(20, 1);
    CHECK_THROWS_WITH(generate_greedy(model, prompt, 13, -1), Contains("llama.context_length 32"));
    CHECK(generate_greedy(model, prompt, 12, -1).size() == 12);
    CHECK_THROWS_WITH(generate_greedy(model, prompt, ~std::size_t{0}, -1), Contains("llama.context_length"));
    CHECK_THROWS_AS(mean_negative_log_likelihood(model, std::vector<std::int32_t>(33, 1)), std::invalid_argument);
    CHECK(std::isfinite(mean_negative_log_likelihood(model, std::vector<std::int32_t>(32, 1))));

    // Engines that drive the layers themselves hit the per-call check.
    FullKvCache cache = model.make_full_cache(2);
    const Matrix h = model.embed({1});
    CHECK_THROWS_WITH(model.layer_qkv(0, h, {32}), Contains("position 32"));
    CHECK_THROWS_AS(model.layer_qkv(0, h, {-1}), std::invalid_argument);
    CHECK_NOTHROW(model.layer_qkv(0, h, {31}));

    // The real model: 8192.
    CHECK_THROWS_WITH(LlamaConfig::from_gguf(real_file()).check_sequence_length(8000, 193),
                      Contains("llama.context_length 8192"));
}
