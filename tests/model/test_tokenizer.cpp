// Byte-level BPE tokenizer built from the real SmolLM2 GGUF metadata.
#include <catch2/catch.hpp>

#include "model_fixture.hpp"

using namespace model_test;

namespace {

// Decoded text of each token, to check how a string was split.
std::vector<std::string> pieces(const Tokenizer& t, const std::string& text) {
    std::vector<std::string> out;
    for (std::int32_t id : t.encode(text)) out.push_back(t.token_text(id));
    return out;
}

}  // namespace

TEST_CASE("tokenizer metadata", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    CHECK(t.vocab_size() == 49152);
    CHECK(t.pre_tokenizer() == "smollm");
    CHECK(t.bos_id() == 1);
    CHECK(t.eos_id() == 2);
    CHECK_FALSE(t.add_bos());
    CHECK(t.token(0) == "<|endoftext|>");
    CHECK(t.token_id("<|im_end|>") == 2);
    CHECK(t.is_control(1));
    CHECK_FALSE(t.is_control(19556));
}

TEST_CASE("known token ids", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    // Checked against the vocabulary: 19556 = "Hello", 905 = "Ġworld".
    REQUIRE(t.token(19556) == "Hello");
    REQUIRE(t.token(905) == "Ġworld");
    CHECK(t.encode("Hello world") == std::vector<std::int32_t>{19556, 905});
    // 7042 = "ĠParis", 198 = "Ċ" (newline).
    CHECK(t.encode(" Paris\n") == std::vector<std::int32_t>{7042, 198});
    CHECK(t.decode({19556, 905, 7042}) == "Hello world Paris");
}

TEST_CASE("special tokens in text are single ids", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    const std::vector<std::int32_t> ids = t.encode("<|im_start|>user\nHello world<|im_end|>\n");
    REQUIRE(ids.size() >= 5);
    CHECK(ids.front() == 1);
    CHECK(ids[ids.size() - 2] == 2);
    CHECK(ids.back() == 198);
    CHECK(t.decode(ids) == "<|im_start|>user\nHello world<|im_end|>\n");
    CHECK(t.decode(ids, true) == "user\nHello world\n");
    // Without special parsing the same text is spelled out in ordinary tokens.
    const std::vector<std::int32_t> plain = t.encode("<|im_start|>", false);
    CHECK(plain.size() > 1);
    CHECK(std::find(plain.begin(), plain.end(), 1) == plain.end());
}

TEST_CASE("pre-tokenizer splits like the smollm regex", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    // Digits are always split one by one; the space before them stands alone.
    CHECK(pieces(t, "in 2024") == std::vector<std::string>{"in", " ", "2", "0", "2", "4"});
    // Contractions are separate pieces.
    CHECK(pieces(t, "I'm sure it's") == std::vector<std::string>{"I", "'m", " sure", " it", "'s"});
    // In a whitespace run the last space joins the next word.
    const std::vector<std::string> spaced = pieces(t, "a   b");
    CHECK(spaced.front() == "a");
    CHECK(spaced.back() == " b");
    std::string joined;
    for (const std::string& p : spaced) joined += p;
    CHECK(joined == "a   b");
}

TEST_CASE("encode/decode round trip on English prose (Moby Dick)", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    const std::string text = moby_dick_passage();
    REQUIRE(text.size() > 2500);
    const std::vector<std::int32_t> ids = t.encode(text);
    const double bytes_per_token = static_cast<double>(text.size()) / static_cast<double>(ids.size());
    WARN("Moby Dick passage: " << text.size() << " bytes -> " << ids.size() << " tokens ("
                               << bytes_per_token << " bytes/token)");
    CHECK(bytes_per_token > 3.0);  // a working BPE compresses English well beyond bytes
    CHECK(bytes_per_token < 6.0);
    CHECK(t.decode(ids) == text);
    CHECK(t.encode("Call me Ishmael.") == t.encode("Call me Ishmael."));
    CHECK(t.token_text(t.encode("Call me Ishmael.").front()) == "Call");
}

TEST_CASE("round trip on non-ASCII and odd bytes", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    for (const std::string& text : {std::string("naïve café — 東京 🙂 ½ ²"), std::string("tabs\tand\r\nnewlines\n\n\n  x"),
                                   std::string("lone bytes \xc3 \x80 \xe2\x82"), std::string("")}) {
        CHECK(t.decode(t.encode(text)) == text);
    }
    // SmolLM2's vocabulary has no symbol for bytes that never occur in
    // UTF-8 (e.g. 0xff); they encode as the unknown token instead of failing.
    CHECK(t.encode("\xff") == std::vector<std::int32_t>{0});
}

TEST_CASE("ChatML prompt follows the model's chat template", "[tokenizer]") {
    const Tokenizer& t = real_tokenizer();
    CHECK(t.chat_template().find("<|im_start|>") != std::string::npos);
    CHECK(t.default_system_prompt() == "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
    CHECK(t.apply_chat_template({{"user", "Hi"}}, true) ==
          "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
          "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    CHECK(t.apply_chat_template({{"system", "Be brief."}, {"user", "Hi"}}, false) ==
          "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
}
