// gguf_builder.hpp - writes small GGUF images in memory so the reader can be
// tested on hand-made (valid and invalid) files.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace model_test {

class ByteWriter {
public:
    std::vector<std::uint8_t> bytes;

    template <typename T>
    ByteWriter& put(T value) {
        const auto* p = reinterpret_cast<const std::uint8_t*>(&value);
        bytes.insert(bytes.end(), p, p + sizeof(T));
        return *this;
    }
    ByteWriter& put_string(const std::string& s) {
        put<std::uint64_t>(s.size());
        bytes.insert(bytes.end(), s.begin(), s.end());
        return *this;
    }
    ByteWriter& append(const std::vector<std::uint8_t>& other) {
        bytes.insert(bytes.end(), other.begin(), other.end());
        return *this;
    }
};

// One encoded metadata entry: key, value type, value.
struct KeyValue {
    std::vector<std::uint8_t> bytes;
};

template <typename T>
KeyValue kv_scalar(const std::string& key, std::uint32_t type, T value) {
    ByteWriter w;
    w.put_string(key).put<std::uint32_t>(type).put<T>(value);
    return {w.bytes};
}

inline KeyValue kv_string(const std::string& key, const std::string& value) {
    ByteWriter w;
    w.put_string(key).put<std::uint32_t>(8).put_string(value);
    return {w.bytes};
}

template <typename T>
KeyValue kv_array(const std::string& key, std::uint32_t element_type, const std::vector<T>& values) {
    ByteWriter w;
    w.put_string(key).put<std::uint32_t>(9).put<std::uint32_t>(element_type).put<std::uint64_t>(values.size());
    for (const T& v : values) w.put<T>(v);
    return {w.bytes};
}

inline KeyValue kv_string_array(const std::string& key, const std::vector<std::string>& values) {
    ByteWriter w;
    w.put_string(key).put<std::uint32_t>(9).put<std::uint32_t>(8).put<std::uint64_t>(values.size());
    for (const std::string& v : values) w.put_string(v);
    return {w.bytes};
}

struct TestTensor {
    std::string name;
    std::vector<std::uint64_t> dims;
    std::uint32_t type = 0;
    std::vector<std::uint8_t> data;
};

// Header, metadata, tensor table, padding to `alignment`, then each tensor's
// data padded to `alignment` (offsets assigned in order).
inline std::vector<std::uint8_t> build_gguf(const std::vector<KeyValue>& kvs, const std::vector<TestTensor>& tensors,
                                            std::uint32_t version = 3, std::uint64_t alignment = 32) {
    ByteWriter w;
    w.put<std::uint32_t>(0x46554747u).put<std::uint32_t>(version);
    w.put<std::uint64_t>(tensors.size()).put<std::uint64_t>(kvs.size());
    for (const KeyValue& kv : kvs) w.append(kv.bytes);
    std::uint64_t offset = 0;
    for (const TestTensor& t : tensors) {
        w.put_string(t.name).put<std::uint32_t>(static_cast<std::uint32_t>(t.dims.size()));
        for (std::uint64_t d : t.dims) w.put<std::uint64_t>(d);
        w.put<std::uint32_t>(t.type).put<std::uint64_t>(offset);
        offset += (t.data.size() + alignment - 1) / alignment * alignment;
    }
    while (w.bytes.size() % alignment != 0) w.bytes.push_back(0);
    for (const TestTensor& t : tensors) {
        w.append(t.data);
        while (w.bytes.size() % alignment != 0) w.bytes.push_back(0);
    }
    return w.bytes;
}

}  // namespace model_test
