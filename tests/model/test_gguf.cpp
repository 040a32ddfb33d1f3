// GGUF reader: the real SmolLM2 file, dequantisation against hand-computed
// blocks, and hand-made files (valid ones and one defect at a time).
#include <catch2/catch.hpp>

#include <cmath>
#include <map>

#include "gguf_builder.hpp"
#include "model_fixture.hpp"

using namespace model_test;
using Catch::Matchers::Contains;

TEST_CASE("real GGUF file: header, metadata and tensor table", "[gguf]") {
    const GgufFile& f = real_file();
    CHECK(f.version() == 3);
    CHECK(f.file_size() == 98362432u);
    CHECK(f.metadata().size() == 33);
    CHECK(f.tensors().size() == 272);  // 30 layers x 9 + token_embd + output_norm
    CHECK(f.alignment() == 32);
    CHECK(f.data_offset() % 32 == 0);
    CHECK(f.data_offset() == 1785664u);

    CHECK(f.at("general.architecture").as_string() == "llama");
    CHECK(f.at("llama.block_count").as_int() == 30);
    CHECK(f.at("llama.attention.head_count_kv").as_int() == 3);
    CHECK(f.at("llama.rope.freq_base").as_float() == Approx(100000.0));
    CHECK(f.at("tokenizer.ggml.pre").as_string() == "smollm");
    CHECK_FALSE(f.at("tokenizer.ggml.add_bos_token").as_bool());

    const GgufValue& tokens = f.at("tokenizer.ggml.tokens");
    REQUIRE(tokens.is_array());
    CHECK(tokens.element_type == GgufType::String);
    CHECK(tokens.strings.size() == 49152);
    CHECK(tokens.strings[1] == "<|im_start|>");
    CHECK(f.at("tokenizer.ggml.merges").strings.size() == 48900);
    CHECK(f.at("tokenizer.ggml.token_type").ints.size() == 49152);
    CHECK(f.at("general.languages").strings == std::vector<std::string>{"en"});

    std::map<GgmlType, int> by_type;
    for (const GgufTensorInfo& t : f.tensors()) ++by_type[t.type];
    CHECK(by_type[GgmlType::F32] == 61);
    CHECK(by_type[GgmlType::Q4_1] == 210);
    CHECK(by_type[GgmlType::Q8_0] == 1);

    const GgufTensorInfo& embd = f.tensor("token_embd.weight");
    CHECK(embd.type == GgmlType::Q8_0);
    CHECK(embd.dims == std::vector<std::int64_t>{576, 49152});
    CHECK(embd.n_bytes == 576u * 49152u / 32u * 34u);
    CHECK(f.find_tensor("output.weight") == nullptr);  // tied to token_embd
    CHECK(f.tensor("blk.0.attn_k.weight").dims == std::vector<std::int64_t>{576, 192});
    CHECK_THROWS_AS(f.tensor("no.such.tensor"), FormatError);
    CHECK_THROWS_AS(f.at("no.such.key"), FormatError);
}

TEST_CASE("real GGUF file: dequantised weights are finite and plausible", "[gguf]") {
    const GgufFile& f = real_file();
    for (const char* name : {"token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"}) {
        const std::vector<float> w = f.tensor_as_float(f.tensor(name));
        double sum_abs = 0.0;
        for (float x : w) {
            REQUIRE(std::isfinite(x));
            sum_abs += std::fabs(x);
        }
        const double mean_abs = sum_abs / static_cast<double>(w.size());
        INFO(name << " mean |w| = " << mean_abs);
        CHECK(mean_abs > 1e-3);
        CHECK(mean_abs < 10.0);
    }
}

TEST_CASE("half and bfloat16 conversion", "[gguf]") {
    CHECK(half_to_float(0x3c00) == 1.0f);
    CHECK(half_to_float(0xc000) == -2.0f);
    CHECK(half_to_float(0x7bff) == 65504.0f);
    CHECK(half_to_float(0x0001) == std::ldexp(1.0f, -24));  // smallest subnormal
    CHECK(half_to_float(0x0200) == std::ldexp(1.0f, -15));  // subnormal
    CHECK(half_to_float(0x3555) == 0.333251953125f);
    CHECK(std::signbit(half_to_float(0x8000)));
    CHECK(std::isinf(half_to_float(0x7c00)));
    CHECK(std::isnan(half_to_float(0x7e00)));
    CHECK(bf16_to_float(0x3f80) == 1.0f);
    CHECK(bf16_to_float(0xc040) == -3.0f);
}

TEST_CASE("Q4_0 block dequantisation", "[gguf]") {
    // d = 0.5 (half 0x3800); byte j holds element j (low nibble = j) and
    // element j + 16 (high nibble = 15 - j); x = (q - 8) * d.
    std::vector<std::uint8_t> block = {0x00, 0x38};
    for (int j = 0; j < 16; ++j) block.push_back(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
    float out[32];
    dequantize(GgmlType::Q4_0, block.data(), out, 32);
    CHECK(out[0] == -4.0f);
    CHECK(out[8] == 0.0f);
    CHECK(out[15] == 3.5f);
    CHECK(out[16] == 3.5f);
    CHECK(out[31] == -4.0f);
    for (int j = 0; j < 16; ++j) {
        CHECK(out[j] == static_cast<float>(j - 8) * 0.5f);
        CHECK(out[j + 16] == static_cast<float>(7 - j) * 0.5f);
    }
}

TEST_CASE("Q4_1 block dequantisation", "[gguf]") {
    // d = 0.25 (0x3400), m = -1 (0xbc00); low nibble j, high nibble 3j mod 16;
    // x = q * d + m.
    std::vector<std::uint8_t> block = {0x00, 0x34, 0x00, 0xbc};
    for (int j = 0; j < 16; ++j) block.push_back(static_cast<std::uint8_t>(j | (((3 * j) % 16) << 4)));
    float out[32];
    dequantize(GgmlType::Q4_1, block.data(), out, 32);
    CHECK(out[0] == -1.0f);
    CHECK(out[4] == 0.0f);
    CHECK(out[15] == 2.75f);
    CHECK(out[17] == -0.25f);  // j = 1: q = 3
    CHECK(out[21] == 2.75f);   // j = 5: q = 15
    for (int j = 0; j < 16; ++j) {
        CHECK(out[j] == static_cast<float>(j) * 0.25f - 1.0f);
        CHECK(out[j + 16] == static_cast<float>((3 * j) % 16) * 0.25f - 1.0f);
    }
}

TEST_CASE("Q8_0 block dequantisation", "[gguf]") {
    // d = 2 (0x4000); q = -128, then j - 16 for j = 1..30, then 127.
    std::vector<std::uint8_t> block = {0x00, 0x40, 0x80};
    for (int j = 1; j < 31; ++j) block.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(j - 16)));
    block.push_back(0x7f);
    float out[32];
    dequantize(GgmlType::Q8_0, block.data(), out, 32);
    CHECK(out[0] == -256.0f);
    CHECK(out[1] == -30.0f);
    CHECK(out[16] == 0.0f);
    CHECK(out[30] == 28.0f);
    CHECK(out[31] == 254.0f);
}

TEST_CASE("F16 tensor dequantisation", "[gguf]") {
    const std::vector<std::uint8_t> data = {0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x00, 0x00};
    float out[4];
    dequantize(GgmlType::F16, data.data(), out, 4);
    CHECK(out[0] == 1.0f);
    CHECK(out[1] == -2.0f);
    CHECK(out[2] == 65504.0f);
    CHECK(out[3] == 0.0f);
}

namespace {

std::vector<std::uint8_t> f32_bytes(const std::vector<float>& values) {
    std::vector<std::uint8_t> bytes(values.size() * 4);
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return bytes;
}

std::vector<KeyValue> all_value_types() {
    return {
        kv_scalar<std::uint8_t>("t.u8", 0, 200),
        kv_scalar<std::int8_t>("t.i8", 1, -100),
        kv_scalar<std::uint16_t>("t.u16", 2, 60000),
        kv_scalar<std::int16_t>("t.i16", 3, -30000),
        kv_scalar<std::uint32_t>("t.u32", 4, 4000000000u),
        kv_scalar<std::int32_t>("t.i32", 5, -2000000000),
        kv_scalar<float>("t.f32", 6, 1.5f),
        kv_scalar<std::uint8_t>("t.bool", 7, 1),
        kv_string("t.string", "hello"),
        kv_scalar<std::uint64_t>("t.u64", 10, 1ull << 40),
        kv_scalar<std::int64_t>("t.i64", 11, -(1ll << 40)),
        kv_scalar<double>("t.f64", 12, 0.25),
        kv_array<std::int32_t>("t.ints", 5, {1, -2, 3}),
        kv_array<float>("t.floats", 6, {0.5f, -0.5f}),
        kv_array<std::uint8_t>("t.bools", 7, {0, 1}),
        kv_string_array("t.strings", {"a", "", "ccc"}),
    };
}

}  // namespace

TEST_CASE("hand-made GGUF: all metadata types and tensor types", "[gguf]") {
    const std::vector<TestTensor> tensors = {
        {"f32", {4}, 0, f32_bytes({1, 2, 3, 4})},
        {"f16", {2, 1}, 1, {0x00, 0x3c, 0x00, 0xc0}},
        {"bf16", {1}, 30, {0x80, 0x3f}},
        {"q8", {32}, 8, std::vector<std::uint8_t>(34, 0)},
    };
    for (std::uint32_t version : {2u, 3u}) {
        const GgufFile f = GgufFile::from_bytes(build_gguf(all_value_types(), tensors, version));
        CHECK(f.version() == version);
        CHECK(f.at("t.u8").as_int() == 200);
        CHECK(f.at("t.i8").as_int() == -100);
        CHECK(f.at("t.u16").as_int() == 60000);
        CHECK(f.at("t.i16").as_int() == -30000);
        CHECK(f.at("t.u32").as_int() == 4000000000ll);
        CHECK(f.at("t.i32").as_int() == -2000000000);
        CHECK(f.at("t.f32").as_float() == 1.5);
        CHECK(f.at("t.bool").as_bool());
        CHECK(f.at("t.string").as_string() == "hello");
        CHECK(f.at("t.u64").as_int() == (1ll << 40));
        CHECK(f.at("t.i64").as_int() == -(1ll << 40));
        CHECK(f.at("t.f64").as_float() == 0.25);
        CHECK(f.at("t.ints").ints == std::vector<std::int64_t>{1, -2, 3});
        CHECK(f.at("t.floats").floats == std::vector<double>{0.5, -0.5});
        CHECK(f.at("t.bools").ints == std::vector<std::int64_t>{0, 1});
        CHECK(f.at("t.strings").strings == std::vector<std::string>{"a", "", "ccc"});
        CHECK_THROWS_AS(f.at("t.strings").as_string(), FormatError);
        CHECK_THROWS_AS(f.at("t.string").as_int(), FormatError);

        CHECK(f.tensor_as_float(f.tensor("f32")) == std::vector<float>{1, 2, 3, 4});
        CHECK(f.tensor_as_float(f.tensor("f16")) == std::vector<float>{1, -2});
        CHECK(f.tensor_as_float(f.tensor("bf16")) == std::vector<float>{1});
        CHECK(f.tensor_as_float(f.tensor("q8")) == std::vector<float>(32, 0.0f));
    }
}

TEST_CASE("hand-made GGUF: general.alignment is honoured", "[gguf]") {
    const std::vector<TestTensor> tensors = {{"a", {3}, 0, f32_bytes({1, 2, 3})}, {"b", {1}, 0, f32_bytes({7})}};
    const GgufFile f = GgufFile::from_bytes(build_gguf({kv_scalar<std::uint32_t>("general.alignment", 4, 64)},
                                                       tensors, 3, 64));
    CHECK(f.alignment() == 64);
    CHECK(f.data_offset() % 64 == 0);
    CHECK(f.tensor("b").offset == 64);
    CHECK(f.tensor_as_float(f.tensor("b")) == std::vector<float>{7});
}

namespace {

void require_format_error(const std::vector<std::uint8_t>& bytes, const std::string& message_part) {
    try {
        (void)GgufFile::view_bytes(bytes.data(), bytes.size());
        FAIL("expected FormatError mentioning '" << message_part << "'");
    } catch (const FormatError& e) {
        INFO("message: " << e.what());
        CHECK_THAT(e.what(), Contains(message_part));
    }
}

}  // namespace

TEST_CASE("hand-made GGUF: each defect is rejected with a clear FormatError", "[gguf]") {
    const TestTensor ok{"w", {4}, 0, f32_bytes({1, 2, 3, 4})};
    std::vector<std::uint8_t> good = build_gguf({kv_scalar<std::uint32_t>("k", 4, 1)}, {ok});
    REQUIRE_NOTHROW(GgufFile::view_bytes(good.data(), good.size()));

    SECTION("bad magic") {
        good[0] = 'X';
        require_format_error(good, "magic");
    }
    SECTION("unsupported version") {
        require_format_error(build_gguf({}, {ok}, 1), "version 1");
    }
    SECTION("tensor count beyond the cap") {
        std::vector<std::uint8_t> b = good;
        const std::uint64_t huge = 1ull << 62;
        std::memcpy(b.data() + 8, &huge, 8);
        require_format_error(b, "tensor_count");
    }
    SECTION("string length beyond the file") {
        std::vector<std::uint8_t> b = good;
        const std::uint64_t huge = ~0ull;
        std::memcpy(b.data() + 24, &huge, 8);  // length of the first key
        require_format_error(b, "metadata[0].key");
    }
    SECTION("invalid value type") {
        require_format_error(build_gguf({kv_scalar<std::uint32_t>("k", 13, 1)}, {}), "invalid value type 13");
    }
    SECTION("invalid bool") {
        require_format_error(build_gguf({kv_scalar<std::uint8_t>("flag", 7, 2)}, {}), "invalid bool");
    }
    SECTION("nested array") {
        ByteWriter w;
        w.put_string("nested").put<std::uint32_t>(9).put<std::uint32_t>(9).put<std::uint64_t>(1);
        w.put<std::uint32_t>(4).put<std::uint64_t>(0);
        require_format_error(build_gguf({KeyValue{w.bytes}}, {}), "array element type 9");
    }
    SECTION("array length beyond the file") {
        std::vector<std::uint8_t> b = build_gguf({kv_array<std::uint32_t>("a", 4, {1, 2})}, {});
        const std::uint64_t huge = 1ull << 61;
        // header (24), key "a" (8 + 1), value type (4), element type (4), then the length
        std::memcpy(b.data() + 24 + 9 + 4 + 4, &huge, 8);
        require_format_error(b, "array length");
    }
    SECTION("duplicate key") {
        require_format_error(build_gguf({kv_scalar<std::uint32_t>("k", 4, 1), kv_scalar<std::uint32_t>("k", 4, 2)}, {}),
                             "duplicate metadata key 'k'");
    }
    SECTION("bad alignment") {
        require_format_error(build_gguf({kv_scalar<std::uint32_t>("general.alignment", 4, 48)}, {ok}),
                             "general.alignment 48");
    }
    SECTION("duplicate tensor name") {
        require_format_error(build_gguf({}, {ok, ok}), "duplicate tensor name 'w'");
    }
    SECTION("unsupported tensor type") {
        require_format_error(build_gguf({}, {TestTensor{"k6", {256}, 14, std::vector<std::uint8_t>(210)}}),
                             "unsupported ggml type 14");
    }
    SECTION("too many dims") {
        require_format_error(build_gguf({}, {TestTensor{"w", {1, 1, 1, 1, 1}, 0, f32_bytes({1})}}), "n_dims 5");
    }
    SECTION("zero dim") {
        require_format_error(build_gguf({}, {TestTensor{"w", {4, 0}, 0, {}}}), "dim 1 = 0");
    }
    SECTION("element count overflow") {
        require_format_error(build_gguf({}, {TestTensor{"w", {1ull << 32, 1ull << 32, 1ull << 32}, 0, {}}}),
                             "overflow");
    }
    SECTION("row length not a multiple of the block size") {
        require_format_error(build_gguf({}, {TestTensor{"q", {16}, 2, std::vector<std::uint8_t>(18)}}),
                             "block size");
    }
    SECTION("tensor data past the end of the file") {
        const GgufFile parsed = GgufFile::view_bytes(good.data(), good.size());
        good.resize(static_cast<std::size_t>(parsed.data_offset()) + 15);  // 16 bytes of data needed
        require_format_error(good, "extends past the end");
    }
    SECTION("misaligned tensor offset") {
        std::vector<std::uint8_t> b = build_gguf({}, {ok});
        // Tensor table: header (24) + name (8 + 1) + n_dims (4) + dim (8) + type (4), then offset.
        b[24 + 9 + 4 + 8 + 4] = 4;
        require_format_error(b, "not a multiple of the alignment");
    }
    SECTION("truncated header") {
        good.resize(10);
        require_format_error(good, "truncated file while reading tensor_count");
    }
}
