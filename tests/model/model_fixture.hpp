// model_fixture.hpp - locates the test model and test data, and loads the
// real GGUF file, tokenizer and model once per test process.
#pragma once

#include <catch2/catch.hpp>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "llama/generate.hpp"
#include "llama/gguf.hpp"
#include "llama/model.hpp"
#include "llama/tokenizer.hpp"

namespace model_test {

using namespace pyramidinfer::llama;

inline std::string model_path() {
    if (const char* env = std::getenv("PYRAMIDINFER_MODEL")) return env;
    return std::string(PYRAMIDINFER_REPO_ROOT) + "/models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

inline void require_model_file() {
    const std::string path = model_path();
    if (!std::ifstream(path, std::ios::binary)) {
        FAIL("model file " << path << " not found: run examples/fetch_model.sh "
             "(or set PYRAMIDINFER_MODEL to a SmolLM2-135M-Instruct Q4_1 GGUF)");
    }
}

// One read() call: istreambuf_iterator takes seconds per 100 MB unoptimised.
inline std::vector<std::uint8_t> read_file_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    REQUIRE(in);
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(in.tellg()));
    in.seekg(0);
    in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(in);
    return bytes;
}

inline const GgufFile& real_file() {
    require_model_file();
    static const GgufFile file = GgufFile::open(model_path());
    return file;
}

inline const Tokenizer& real_tokenizer() {
    static const Tokenizer tokenizer = Tokenizer::from_gguf(real_file());
    return tokenizer;
}

inline const Model& real_model() {
    static const Model model = Model::from_gguf(real_file());
    return model;
}

inline std::string read_test_data(const std::string& name) {
    const std::string path = std::string(PYRAMIDINFER_MODEL_TEST_DATA) + "/" + name;
    std::ifstream in(path, std::ios::binary);
    if (!in) FAIL("missing test data file " << path);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

// The first chapter opening of Moby Dick (public domain), 2787 bytes.
inline std::string moby_dick_passage() { return read_test_data("moby_dick_ch1.txt"); }

}  // namespace model_test
