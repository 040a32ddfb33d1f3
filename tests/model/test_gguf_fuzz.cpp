// Mutation tests: truncated and corrupted copies of the real model file must
// either load or throw FormatError - never crash, never throw anything else
// (bad_alloc, length_error, ...). Meant to run under ASan/UBSan as well.
//
// Each mutant goes through the GGUF parser, the tokenizer (including an
// encode/decode), the llama config and - for a few - the full model load.
// PYRAMIDINFER_FUZZ_ITERATIONS scales the random loops (default 150).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>

#include "model_fixture.hpp"

using namespace model_test;

namespace {

enum class Outcome { Loaded, Rejected };

// Any exception other than FormatError escapes and fails the test.
Outcome try_load(const std::vector<std::uint8_t>& bytes, std::size_t size, bool load_model) {
    try {
        const GgufFile file = GgufFile::view_bytes(bytes.data(), size);
        const Tokenizer tokenizer = Tokenizer::from_gguf(file);
        const std::vector<std::int32_t> ids = tokenizer.encode("<|im_start|>Hello world, it's 42 o'clock.\n");
        (void)tokenizer.decode(ids);
        (void)LlamaConfig::from_gguf(file);
        if (load_model) (void)Model::from_gguf(file);
        return Outcome::Loaded;
    } catch (const FormatError& e) {
        if (std::getenv("PYRAMIDINFER_FUZZ_VERBOSE")) std::fprintf(stderr, "rejected: %s\n", e.what());
        return Outcome::Rejected;
    }
}

std::vector<std::uint8_t> read_model_bytes() {
    require_model_file();
    return read_file_bytes(model_path());
}

std::size_t fuzz_iterations() {
    const char* env = std::getenv("PYRAMIDINFER_FUZZ_ITERATIONS");
    return env ? static_cast<std::size_t>(std::stoul(env)) : 150;
}

// End of the last tensor's data: any shorter file must be rejected.
std::size_t required_size(const GgufFile& f) {
    std::uint64_t end = 0;
    for (const GgufTensorInfo& t : f.tensors()) end = std::max(end, f.data_offset() + t.offset + t.n_bytes);
    return static_cast<std::size_t>(end);
}

void put_u64(std::vector<std::uint8_t>& bytes, std::size_t at, std::uint64_t value) {
    std::memcpy(bytes.data() + at, &value, sizeof value);
}

// Byte offset of the value that follows metadata key `key` (its type field).
std::size_t key_value_offset(const std::vector<std::uint8_t>& bytes, const std::string& key) {
    auto it = std::search(bytes.begin(), bytes.end(), key.begin(), key.end());
    REQUIRE(it != bytes.end());
    return static_cast<std::size_t>(it - bytes.begin()) + key.size();
}

}  // namespace

TEST_CASE("truncated model files are rejected with FormatError", "[fuzz]") {
    const std::vector<std::uint8_t> bytes = read_model_bytes();
    const GgufFile& real = real_file();
    const std::size_t needed = required_size(real);
    REQUIRE(try_load(bytes, bytes.size(), false) == Outcome::Loaded);

    std::vector<std::size_t> lengths;
    for (std::size_t n = 0; n <= 64; ++n) lengths.push_back(n);
    const std::size_t header_end = static_cast<std::size_t>(real.data_offset()) + 4096;
    for (std::size_t i = 0; i < 300; ++i) lengths.push_back(64 + i * (header_end - 64) / 300);
    for (std::size_t i = 0; i < 20; ++i) lengths.push_back(header_end + i * (needed - header_end) / 20);
    lengths.push_back(needed - 1);

    for (std::size_t n : lengths) {
        INFO("truncated to " << n << " bytes");
        CHECK(try_load(bytes, n, false) == Outcome::Rejected);
    }
}

TEST_CASE("random byte flips in the metadata and tensor table never crash", "[fuzz]") {
    std::vector<std::uint8_t> bytes = read_model_bytes();
    const GgufFile& real = real_file();
    const std::size_t header_size = static_cast<std::size_t>(real.data_offset());
    const std::size_t table_start = static_cast<std::size_t>(real.tensor_table_offset());
    std::mt19937_64 rng(12345);
    std::size_t loaded = 0, rejected = 0, models_loaded = 0;

    // Half the mutants hit anywhere in the header region (mostly the
    // tokenizer arrays), half target the tensor table, where a flip changes
    // names, shapes, types or offsets that the model loader must validate.
    const std::size_t iterations = fuzz_iterations();
    for (std::size_t iter = 0; iter < iterations; ++iter) {
        const bool table_only = iter % 2 == 1;
        std::uniform_int_distribution<std::size_t> where(table_only ? table_start : 0, header_size - 1);
        std::uniform_int_distribution<int> count(1, 4), bit(0, 7);
        std::vector<std::pair<std::size_t, std::uint8_t>> saved;
        for (int i = count(rng); i > 0; --i) {
            const std::size_t at = where(rng);
            saved.emplace_back(at, bytes[at]);
            bytes[at] ^= static_cast<std::uint8_t>(1u << bit(rng));
        }
        // Full model loads are slow (0.5 GB of fp32), so only a few mutants get one.
        const bool load_model = table_only && models_loaded < 4;
        INFO("iteration " << iter << ", first flipped byte at " << saved.front().first);
        const Outcome outcome = try_load(bytes, bytes.size(), load_model);
        (outcome == Outcome::Loaded ? loaded : rejected) += 1;
        if (outcome == Outcome::Loaded && load_model) ++models_loaded;
        for (auto it = saved.rbegin(); it != saved.rend(); ++it) bytes[it->first] = it->second;
    }
    WARN("byte-flip mutants: " << loaded << " loaded, " << rejected << " rejected with FormatError, "
                               << models_loaded << " full model loads");
    CHECK(loaded + rejected == iterations);
}

TEST_CASE("huge counts, lengths and dims are rejected with FormatError", "[fuzz]") {
    std::vector<std::uint8_t> bytes = read_model_bytes();
    const GgufFile& real = real_file();
    const std::size_t table = static_cast<std::size_t>(real.tensor_table_offset());
    const std::size_t first_name_length = real.tensors().front().name.size();

    // (description, byte offset of a u64 field)
    std::vector<std::pair<std::string, std::size_t>> fields = {
        {"tensor_count", 8},
        {"metadata_kv_count", 16},
        {"first key length", 24},
        // key, then u32 value type, u32 element type, u64 count
        {"tokens array length", key_value_offset(bytes, "tokenizer.ggml.tokens") + 8},
        {"merges array length", key_value_offset(bytes, "tokenizer.ggml.merges") + 8},
        {"token_type array length", key_value_offset(bytes, "tokenizer.ggml.token_type") + 8},
        {"chat_template string length", key_value_offset(bytes, "tokenizer.chat_template") + 4},
        {"first tensor name length", table},
        {"first tensor dim 0", table + 8 + first_name_length + 4},
        {"first tensor dim 1", table + 8 + first_name_length + 4 + 8},
        {"first tensor offset", table + 8 + first_name_length + 4 + 16 + 4},
    };
    for (const auto& [name, at] : fields) {
        for (std::uint64_t value : {~0ull, 1ull << 63, 1ull << 40, (1ull << 32) + 1}) {
            std::uint64_t saved;
            std::memcpy(&saved, bytes.data() + at, 8);
            put_u64(bytes, at, value);
            INFO(name << " set to " << value);
            CHECK(try_load(bytes, bytes.size(), false) == Outcome::Rejected);
            put_u64(bytes, at, saved);
        }
    }
    // n_dims (u32) of the first tensor
    const std::size_t n_dims_at = table + 8 + first_name_length;
    for (std::uint32_t n_dims : {0u, 5u, 0xffffffffu}) {
        std::uint32_t saved;
        std::memcpy(&saved, bytes.data() + n_dims_at, 4);
        std::memcpy(bytes.data() + n_dims_at, &n_dims, 4);
        INFO("n_dims set to " << n_dims);
        CHECK(try_load(bytes, bytes.size(), false) == Outcome::Rejected);
        std::memcpy(bytes.data() + n_dims_at, &saved, 4);
    }
    REQUIRE(try_load(bytes, bytes.size(), false) == Outcome::Loaded);  // all restored
}
