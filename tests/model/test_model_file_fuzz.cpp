// Mutation fuzzing of a whole (tiny) llama model file: header, metadata,
// tensor table and data. Every mutant must either load and run a forward
// pass or be rejected with FormatError - never crash, never throw anything
// else. A mutant that loads must also satisfy the layout invariants the
// loader promises (no shared bytes, sizes matching type and shape, exactly
// the model's tensors), checked here independently of the loader.
// PYRAMIDINFER_FUZZ_ITERATIONS scales the loop (default 150 -> 15000 mutants).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdlib>
#include <random>

#include "model_fixture.hpp"
#include "tiny_llama.hpp"

using namespace model_test;

namespace {

std::size_t iterations() {
    const char* env = std::getenv("PYRAMIDINFER_FUZZ_ITERATIONS");
    return 100 * (env ? static_cast<std::size_t>(std::stoul(env)) : 150);
}

// What a loaded file must look like, whatever the loader's code says.
void check_loaded_layout(const GgufFile& file, const Model& model) {
    std::vector<const GgufTensorInfo*> by_offset;
    for (const GgufTensorInfo& t : file.tensors()) {
        const GgmlTypeTraits* traits = ggml_type_traits(static_cast<std::uint32_t>(t.type));
        REQUIRE(traits != nullptr);
        std::uint64_t elements = 1;
        for (std::int64_t d : t.dims) elements *= static_cast<std::uint64_t>(d);
        REQUIRE(t.n_bytes == elements / traits->block_size * traits->block_bytes);
        REQUIRE(file.data_offset() + t.offset + t.n_bytes <= file.file_size());
        by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(),
              [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
        INFO(by_offset[i - 1]->name << " and " << by_offset[i]->name);
        REQUIRE(by_offset[i - 1]->offset + by_offset[i - 1]->n_bytes <= by_offset[i]->offset);
    }
    const auto shapes = llama_tensor_shapes(model.config());
    for (const GgufTensorInfo& t : file.tensors()) {
        INFO("tensor " << t.name);
        REQUIRE(shapes.count(t.name) == 1);
        REQUIRE(shapes.at(t.name) == t.dims);
    }
    REQUIRE(file.tensors().size() + (file.find_tensor("output.weight") ? 0 : 1) == shapes.size());
}

enum class Outcome { Loaded, Rejected };

Outcome try_load_and_run(const std::vector<std::uint8_t>& bytes) {
    try {
        const GgufFile file = GgufFile::view_bytes(bytes.data(), bytes.size());
        const Model model = Model::from_gguf(file);
        check_loaded_layout(file, model);
        const std::size_t n = std::min<std::size_t>(3, model.config().context_length);
        std::vector<std::int32_t> ids(n);
        for (std::size_t i = 0; i < n; ++i) ids[i] = static_cast<std::int32_t>(i % model.config().vocab_size);
        FullKvCache cache = model.make_full_cache(n);
        (void)model.logits(model.forward(ids, iota_positions(0, n), cache));
        return Outcome::Loaded;
    } catch (const FormatError& e) {
        if (std::getenv("PYRAMIDINFER_FUZZ_VERBOSE")) std::fprintf(stderr, "rejected: %s\n", e.what());
        return Outcome::Rejected;
    }
}

}  // namespace

TEST_CASE("random mutations of a tiny llama file load or throw FormatError", "[fuzz]") {
    const std::vector<std::uint8_t> original = TinyLlama{}.build();
    const GgufFile parsed = GgufFile::view_bytes(original.data(), original.size());
    const std::size_t table = static_cast<std::size_t>(parsed.tensor_table_offset());
    const std::size_t data = static_cast<std::size_t>(parsed.data_offset());
    REQUIRE(try_load_and_run(original) == Outcome::Loaded);

    // Offsets of the fields a structured mutation rewrites.
    std::vector<std::size_t> type_fields, offset_fields, dim_fields, int_metadata;
    for (const GgufTensorInfo& t : parsed.tensors()) {
        type_fields.push_back(tensor_type_field(original, t.name));
        offset_fields.push_back(tensor_offset_field(original, t.name));
        for (std::size_t d = 0; d < t.dims.size(); ++d) dim_fields.push_back(tensor_entry(original, t.name) + 4 + 8 * d);
    }
    for (const char* key : {"llama.block_count", "llama.context_length", "llama.embedding_length",
                            "llama.feed_forward_length", "llama.attention.head_count",
                            "llama.attention.head_count_kv", "llama.vocab_size"}) {
        int_metadata.push_back(tensor_entry(original, key) + 4);  // u32 value after the u32 type
    }
    std::vector<std::uint64_t> tensor_offsets;
    for (const GgufTensorInfo& t : parsed.tensors()) tensor_offsets.push_back(t.offset);

    std::mt19937_64 rng(4242);
    const auto pick = [&](const std::vector<std::size_t>& v) {
        return v[std::uniform_int_distribution<std::size_t>(0, v.size() - 1)(rng)];
    };
    const auto below = [&](std::uint64_t n) { return std::uniform_int_distribution<std::uint64_t>(0, n - 1)(rng); };
    const std::vector<std::uint32_t> types = {0, 1, 2, 3, 8, 30, 6, 14, 31, 0xffffffffu};
    std::size_t loaded = 0, rejected = 0;
    const std::size_t n = iterations();
    for (std::size_t iter = 0; iter < n; ++iter) {
        std::vector<std::uint8_t> bytes = original;
        const int kind = static_cast<int>(iter % 8);
        switch (kind) {
        case 0:  // bit flips anywhere before the data
            for (std::uint64_t i = below(4) + 1; i > 0; --i) bytes[below(data)] ^= static_cast<std::uint8_t>(1u << below(8));
            break;
        case 1:  // bit flips in the tensor table
            for (std::uint64_t i = below(3) + 1; i > 0; --i) {
                bytes[table + below(data - table)] ^= static_cast<std::uint8_t>(1u << below(8));
            }
            break;
        case 2:  // swap a tensor's type
            poke(bytes, pick(type_fields), types[below(types.size())]);
            break;
        case 3: {  // move a tensor onto another one, or by a few alignment steps
            const std::size_t at = pick(offset_fields);
            const std::uint64_t moved = below(2) ? tensor_offsets[below(tensor_offsets.size())]
                                                 : peek<std::uint64_t>(bytes, at) + 32 * (below(9)) - 128;
            poke(bytes, at, moved);
            break;
        }
        case 4: {  // change a dimension
            const std::uint64_t values[] = {1, 16, 32, 48, 64, 96, 128, 1ull << 31, 1ull << 62, ~0ull};
            poke(bytes, pick(dim_fields), values[below(10)]);
            break;
        }
        case 5: {  // change an integer llama.* key
            const std::uint32_t values[] = {0, 1, 2, 3, 4, 16, 31, 32, 33, 48, 64, 96, 1u << 20, 0xffffffffu};
            poke(bytes, pick(int_metadata), values[below(14)]);
            break;
        }
        case 6:  // truncate or extend
            if (below(2)) {
                bytes.resize(below(bytes.size()));
            } else {
                bytes.resize(bytes.size() + below(200) + 1, static_cast<std::uint8_t>(below(256)));
            }
            break;
        case 7:  // garbage in the tensor data (NaN weights and all)
            for (std::uint64_t i = below(64) + 1; i > 0; --i) bytes[data + below(bytes.size() - data)] = static_cast<std::uint8_t>(below(256));
            break;
        }
        INFO("iteration " << iter << ", mutation kind " << kind);
        (try_load_and_run(bytes) == Outcome::Loaded ? loaded : rejected) += 1;
    }
    WARN("tiny llama mutants: " << loaded << " loaded and ran, " << rejected << " rejected with FormatError");
    CHECK(loaded + rejected == n);
    CHECK(rejected > n / 2);
}
