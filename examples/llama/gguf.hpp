// gguf.hpp - reader for GGUF model files (versions 2 and 3).
//
// A GGUF file is: header (magic, version, tensor count, metadata count),
// metadata key/value pairs, a tensor table (name, dims, type, offset), then
// padding to `general.alignment` and the tensor data section.
//
// The file is treated as untrusted input: every count, length, dimension
// and offset is checked against the bytes that are actually there before it
// is used, and any inconsistency throws FormatError naming the field.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace pyramidinfer::llama {

// Thrown for any malformed, truncated or unsupported model file content.
class FormatError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Metadata value types, numbered as in the GGUF specification.
enum class GgufType : std::uint32_t {
    Uint8 = 0, Int8 = 1, Uint16 = 2, Int16 = 3, Uint32 = 4, Int32 = 5,
    Float32 = 6, Bool = 7, String = 8, Array = 9, Uint64 = 10, Int64 = 11,
    Float64 = 12,
};

// Tensor element types we can dequantise, numbered as in ggml.
enum class GgmlType : std::uint32_t {
    F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, BF16 = 30,
};

// One metadata value. Scalars are stored as one-element arrays so that
// scalar and array access share the same storage; `type` tells them apart.
struct GgufValue {
    GgufType type = GgufType::Uint8;          // GgufType::Array for arrays
    GgufType element_type = GgufType::Uint8;  // equals `type` for scalars
    std::vector<std::int64_t> ints;   // integer and bool elements (uint64 wraps)
    std::vector<double> floats;       // float32 / float64 elements
    std::vector<std::string> strings; // string elements

    bool is_array() const { return type == GgufType::Array; }
    std::size_t size() const { return ints.size() + floats.size() + strings.size(); }

    std::int64_t as_int() const {
        if (is_array() || ints.size() != 1) throw FormatError("GGUF: value is not an integer scalar");
        return ints[0];
    }
    double as_float() const {
        if (!is_array() && floats.size() == 1) return floats[0];
        return static_cast<double>(as_int());
    }
    bool as_bool() const { return as_int() != 0; }
    const std::string& as_string() const {
        if (is_array() || strings.size() != 1) throw FormatError("GGUF: value is not a string scalar");
        return strings[0];
    }
};

// One entry of the tensor table. `dims[0]` is the contiguous (row) length,
// as in ggml: a [rows x cols] matrix is stored as dims = {cols, rows}.
struct GgufTensorInfo {
    std::string name;
    std::vector<std::int64_t> dims;
    GgmlType type = GgmlType::F32;
    std::uint64_t offset = 0;      // relative to the data section
    std::uint64_t n_elements = 0;
    std::uint64_t n_bytes = 0;
};

// ---------------------------------------------------------------------------
// Element types and dequantisation
// ---------------------------------------------------------------------------

struct GgmlTypeTraits {
    const char* name;
    std::uint64_t block_size;   // elements per block
    std::uint64_t block_bytes;  // bytes per block
};

// Returns nullptr for types this reader does not support.
inline const GgmlTypeTraits* ggml_type_traits(std::uint32_t type) {
    static const GgmlTypeTraits f32{"F32", 1, 4}, f16{"F16", 1, 2}, bf16{"BF16", 1, 2},
        q4_0{"Q4_0", 32, 18}, q4_1{"Q4_1", 32, 20}, q8_0{"Q8_0", 32, 34};
    switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32: return &f32;
    case GgmlType::F16: return &f16;
    case GgmlType::BF16: return &bf16;
    case GgmlType::Q4_0: return &q4_0;
    case GgmlType::Q4_1: return &q4_1;
    case GgmlType::Q8_0: return &q8_0;
    }
    return nullptr;
}

inline std::uint16_t load_u16_le(const std::uint8_t* p) {
    return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}

inline float float_from_bits(std::uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// IEEE half -> float, including subnormals, infinities and NaN.
inline float half_to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
        const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
    return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline float bf16_to_float(std::uint16_t h) {
    return float_from_bits(static_cast<std::uint32_t>(h) << 16);
}

// Q4_0 block: f16 scale d, then 16 bytes of 4-bit values; the low nibbles
// are elements 0..15 and the high nibbles elements 16..31: x = (q - 8) * d.
inline void dequantize_q4_0_block(const std::uint8_t* block, float* out) {
    const float d = half_to_float(load_u16_le(block));
    const std::uint8_t* qs = block + 2;
    for (int j = 0; j < 16; ++j) {
        out[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
        out[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
}

// Q4_1 block: f16 scale d, f16 minimum m, 16 bytes of nibbles: x = q * d + m.
inline void dequantize_q4_1_block(const std::uint8_t* block, float* out) {
    const float d = half_to_float(load_u16_le(block));
    const float m = half_to_float(load_u16_le(block + 2));
    const std::uint8_t* qs = block + 4;
    for (int j = 0; j < 16; ++j) {
        out[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
        out[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
    }
}

// Q8_0 block: f16 scale d, then 32 signed bytes: x = q * d.
inline void dequantize_q8_0_block(const std::uint8_t* block, float* out) {
    const float d = half_to_float(load_u16_le(block));
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(static_cast<std::int8_t>(block[2 + j])) * d;
}

// Converts `n_elements` values of `type` at `src` to float. The caller
// guarantees that `src` holds the whole (block-aligned) range.
inline void dequantize(GgmlType type, const std::uint8_t* src, float* dst, std::uint64_t n_elements) {
    switch (type) {
    case GgmlType::F32:
        std::memcpy(dst, src, n_elements * sizeof(float));
        return;
    case GgmlType::F16:
        for (std::uint64_t i = 0; i < n_elements; ++i) dst[i] = half_to_float(load_u16_le(src + 2 * i));
        return;
    case GgmlType::BF16:
        for (std::uint64_t i = 0; i < n_elements; ++i) dst[i] = bf16_to_float(load_u16_le(src + 2 * i));
        return;
    case GgmlType::Q4_0:
        for (std::uint64_t b = 0; b < n_elements / 32; ++b) dequantize_q4_0_block(src + 18 * b, dst + 32 * b);
        return;
    case GgmlType::Q4_1:
        for (std::uint64_t b = 0; b < n_elements / 32; ++b) dequantize_q4_1_block(src + 20 * b, dst + 32 * b);
        return;
    case GgmlType::Q8_0:
        for (std::uint64_t b = 0; b < n_elements / 32; ++b) dequantize_q8_0_block(src + 34 * b, dst + 32 * b);
        return;
    }
    throw FormatError("GGUF: cannot dequantise ggml type " + std::to_string(static_cast<unsigned>(type)));
}

// ---------------------------------------------------------------------------
// Bounds-checked little-endian reading
// ---------------------------------------------------------------------------

namespace detail {

// Reads primitive values from a byte range, throwing FormatError (naming the
// field being read) instead of ever reading past the end.
class ByteCursor {
public:
    ByteCursor(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

    std::size_t position() const { return pos_; }
    std::size_t remaining() const { return size_ - pos_; }

    // `field` and `detail` name what is being read; they are only joined
    // into a message on error, so reading stays cheap.
    template <typename T>
    T read(const std::string& field, const char* detail = "") {
        require(sizeof(T), field, detail);
        T value;
        std::memcpy(&value, data_ + pos_, sizeof(T));  // files are little-endian, as is x86/ARM
        pos_ += sizeof(T);
        return value;
    }

    std::string read_string(const std::string& field) {
        const std::uint64_t length = read<std::uint64_t>(field, " (string length)");
        require(length, field, " (string bytes)");
        std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<std::size_t>(length));
        pos_ += static_cast<std::size_t>(length);
        return s;
    }

    void require(std::uint64_t n_bytes, const std::string& field, const char* detail = "") const {
        if (n_bytes > remaining()) {
            throw FormatError("GGUF: truncated file while reading " + field + detail + " at offset " +
                              std::to_string(pos_) + ": need " + std::to_string(n_bytes) +
                              " bytes, " + std::to_string(remaining()) + " left");
        }
    }

private:
    const std::uint8_t* data_;
    std::size_t size_;
    std::size_t pos_ = 0;
};

inline std::size_t scalar_size(GgufType type) {
    switch (type) {
    case GgufType::Uint8: case GgufType::Int8: case GgufType::Bool: return 1;
    case GgufType::Uint16: case GgufType::Int16: return 2;
    case GgufType::Uint32: case GgufType::Int32: case GgufType::Float32: return 4;
    case GgufType::Uint64: case GgufType::Int64: case GgufType::Float64: return 8;
    case GgufType::String: return 8;  // at least the length prefix
    case GgufType::Array: return 12;  // at least element type + count
    }
    return 0;
}

// Names from the file may hold any bytes: escape them (and cap their
// length) before putting them into an error message.
inline std::string printable(const std::string& s) {
    std::string out;
    for (std::size_t i = 0; i < s.size() && i < 80; ++i) {
        const auto c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c < 0x7f) {
            out += static_cast<char>(c);
        } else {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        }
    }
    if (s.size() > 80) out += "...";
    return out;
}

// "[576 x 49152]" (ggml order: the row length first).
inline std::string dims_string(const std::vector<std::int64_t>& dims) {
    std::string out = "[";
    for (std::size_t i = 0; i < dims.size(); ++i) out += (i ? " x " : "") + std::to_string(dims[i]);
    return out + "]";
}

inline bool is_valid_type(std::uint32_t raw) { return raw <= static_cast<std::uint32_t>(GgufType::Float64); }

// Appends one element of scalar `type` to `value`.
inline void read_element(ByteCursor& in, GgufType type, GgufValue& value, const std::string& field) {
    switch (type) {
    case GgufType::Uint8: value.ints.push_back(in.read<std::uint8_t>(field)); return;
    case GgufType::Int8: value.ints.push_back(in.read<std::int8_t>(field)); return;
    case GgufType::Uint16: value.ints.push_back(in.read<std::uint16_t>(field)); return;
    case GgufType::Int16: value.ints.push_back(in.read<std::int16_t>(field)); return;
    case GgufType::Uint32: value.ints.push_back(in.read<std::uint32_t>(field)); return;
    case GgufType::Int32: value.ints.push_back(in.read<std::int32_t>(field)); return;
    case GgufType::Uint64: value.ints.push_back(static_cast<std::int64_t>(in.read<std::uint64_t>(field))); return;
    case GgufType::Int64: value.ints.push_back(in.read<std::int64_t>(field)); return;
    case GgufType::Float32: value.floats.push_back(in.read<float>(field)); return;
    case GgufType::Float64: value.floats.push_back(in.read<double>(field)); return;
    case GgufType::String: value.strings.push_back(in.read_string(field)); return;
    case GgufType::Bool: {
        const std::uint8_t b = in.read<std::uint8_t>(field);
        if (b > 1) throw FormatError("GGUF: " + field + " has invalid bool value " + std::to_string(b));
        value.ints.push_back(b);
        return;
    }
    case GgufType::Array: break;
    }
    throw FormatError("GGUF: " + field + ": nested arrays are not supported");
}

inline GgufValue read_value(ByteCursor& in, std::uint32_t raw_type, const std::string& field) {
    if (!is_valid_type(raw_type)) {
        throw FormatError("GGUF: " + field + " has invalid value type " + std::to_string(raw_type));
    }
    GgufValue value;
    value.type = static_cast<GgufType>(raw_type);
    value.element_type = value.type;
    if (value.type != GgufType::Array) {
        read_element(in, value.type, value, field);
        return value;
    }
    const std::uint32_t raw_element = in.read<std::uint32_t>(field, " (array element type)");
    if (!is_valid_type(raw_element) || raw_element == static_cast<std::uint32_t>(GgufType::Array)) {
        throw FormatError("GGUF: " + field + " has invalid array element type " + std::to_string(raw_element));
    }
    value.element_type = static_cast<GgufType>(raw_element);
    const std::uint64_t count = in.read<std::uint64_t>(field, " (array length)");
    // Every element needs at least scalar_size bytes, so this bounds the
    // allocation by the file size before reserving anything.
    if (count > in.remaining() / scalar_size(value.element_type)) {
        throw FormatError("GGUF: " + field + " array length " + std::to_string(count) +
                          " exceeds the remaining file size");
    }
    for (std::uint64_t i = 0; i < count; ++i) read_element(in, value.element_type, value, field);
    return value;
}

}  // namespace detail

// ---------------------------------------------------------------------------
// GgufFile
// ---------------------------------------------------------------------------

class GgufFile {
public:
    // Caps that keep a corrupted header from asking for absurd allocations.
    static constexpr std::uint64_t kMaxTensors = 1u << 20;
    static constexpr std::uint64_t kMaxKeyValues = 1u << 20;
    static constexpr std::uint32_t kMaxDims = 4;
    static constexpr std::uint64_t kMaxAlignment = 1u << 20;

    // Reads the whole file into memory and parses it. Only regular files are
    // accepted: a FIFO would block in open()/read() forever and a directory
    // reports a nonsense size, so the type is checked on the open descriptor
    // (O_NONBLOCK keeps open() itself from waiting for a FIFO writer).
    static GgufFile open(const std::string& path) {
        const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) throw FormatError("GGUF: cannot open '" + path + "': " + std::strerror(errno));
        struct FdCloser {
            int fd;
            ~FdCloser() { ::close(fd); }
        } closer{fd};
        struct stat st {};
        if (::fstat(fd, &st) != 0) throw FormatError("GGUF: cannot stat '" + path + "': " + std::strerror(errno));
        if (!S_ISREG(st.st_mode)) {
            throw FormatError("GGUF: '" + path + "' is " + file_kind(st.st_mode) +
                              ", not a regular file; a model must be a regular GGUF file");
        }
        if (st.st_size < 0 || static_cast<std::uint64_t>(st.st_size) > std::numeric_limits<std::size_t>::max()) {
            throw FormatError("GGUF: '" + path + "' has unusable size " + std::to_string(st.st_size));
        }
        std::vector<std::uint8_t> bytes(static_cast<std::size_t>(st.st_size));
        std::size_t done = 0;
        while (done < bytes.size()) {
            const ssize_t n = ::read(fd, bytes.data() + done, bytes.size() - done);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {  // 0: the file shrank while we read it
                throw FormatError("GGUF: error reading '" + path + "' at byte " + std::to_string(done) + " of " +
                                  std::to_string(bytes.size()) + (n < 0 ? std::string(": ") + std::strerror(errno) : ""));
            }
            done += static_cast<std::size_t>(n);
        }
        return from_bytes(std::move(bytes));
    }

    // Parses a file image, taking ownership of it.
    static GgufFile from_bytes(std::vector<std::uint8_t> bytes) {
        GgufFile file;
        file.owned_ = std::make_shared<std::vector<std::uint8_t>>(std::move(bytes));
        file.parse(file.owned_->data(), file.owned_->size());
        return file;
    }

    // Parses a file image without copying it; `data` must outlive the result.
    static GgufFile view_bytes(const std::uint8_t* data, std::size_t size) {
        GgufFile file;
        file.parse(data, size);
        return file;
    }

    std::uint32_t version() const { return version_; }
    std::uint64_t alignment() const { return alignment_; }
    std::uint64_t data_offset() const { return data_offset_; }
    std::uint64_t tensor_table_offset() const { return tensor_table_offset_; }
    std::size_t file_size() const { return size_; }

    const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
    const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

    const GgufValue* find(const std::string& key) const {
        auto it = metadata_.find(key);
        return it == metadata_.end() ? nullptr : &it->second;
    }
    const GgufValue& at(const std::string& key) const {
        const GgufValue* value = find(key);
        if (!value) throw FormatError("GGUF: missing metadata key '" + detail::printable(key) + "'");
        return *value;
    }

    const GgufTensorInfo* find_tensor(const std::string& name) const {
        auto it = tensor_index_.find(name);
        return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
    }
    const GgufTensorInfo& tensor(const std::string& name) const {
        const GgufTensorInfo* info = find_tensor(name);
        if (!info) throw FormatError("GGUF: missing tensor '" + detail::printable(name) + "'");
        return *info;
    }

    // Raw bytes of a tensor (bounds were checked at parse time).
    const std::uint8_t* tensor_data(const GgufTensorInfo& info) const {
        return data_ + data_offset_ + info.offset;
    }

    std::vector<float> tensor_as_float(const GgufTensorInfo& info) const {
        std::vector<float> out(static_cast<std::size_t>(info.n_elements));
        dequantize(info.type, tensor_data(info), out.data(), info.n_elements);
        return out;
    }

private:
    GgufFile() = default;

    void parse(const std::uint8_t* data, std::size_t size) {
        data_ = data;
        size_ = size;
        detail::ByteCursor in(data, size);
        parse_header(in);
        parse_metadata(in);
        tensor_table_offset_ = in.position();
        parse_tensor_table(in);
        locate_data_section(in);
    }

    void parse_header(detail::ByteCursor& in) {
        const std::uint32_t magic = in.read<std::uint32_t>("magic");
        if (magic != 0x46554747u) {  // "GGUF" little-endian
            throw FormatError("GGUF: bad magic 0x" + to_hex(magic) + " (not a GGUF file)");
        }
        version_ = in.read<std::uint32_t>("version");
        if (version_ != 2 && version_ != 3) {
            throw FormatError("GGUF: unsupported version " + std::to_string(version_) + " (need 2 or 3)");
        }
        n_tensors_ = in.read<std::uint64_t>("tensor_count");
        if (n_tensors_ > kMaxTensors) {
            throw FormatError("GGUF: tensor_count " + std::to_string(n_tensors_) + " exceeds limit " +
                              std::to_string(kMaxTensors));
        }
        n_key_values_ = in.read<std::uint64_t>("metadata_kv_count");
        if (n_key_values_ > kMaxKeyValues) {
            throw FormatError("GGUF: metadata_kv_count " + std::to_string(n_key_values_) + " exceeds limit " +
                              std::to_string(kMaxKeyValues));
        }
    }

    void parse_metadata(detail::ByteCursor& in) {
        for (std::uint64_t i = 0; i < n_key_values_; ++i) {
            std::string key = in.read_string("metadata[" + std::to_string(i) + "].key");
            const std::uint32_t type = in.read<std::uint32_t>("metadata '" + detail::printable(key) + "' type");
            GgufValue value = detail::read_value(in, type, "metadata '" + detail::printable(key) + "'");
            if (!metadata_.emplace(key, std::move(value)).second) {
                throw FormatError("GGUF: duplicate metadata key '" + detail::printable(key) + "'");
            }
        }
        alignment_ = 32;
        if (const GgufValue* align = find("general.alignment")) {
            const std::int64_t a = align->is_array() || align->ints.size() != 1 ? 0 : align->ints[0];
            if (a <= 0 || static_cast<std::uint64_t>(a) > kMaxAlignment || (a & (a - 1)) != 0) {
                throw FormatError("GGUF: general.alignment " + std::to_string(a) +
                                  " is not a power of two in [1, " + std::to_string(kMaxAlignment) + "]");
            }
            alignment_ = static_cast<std::uint64_t>(a);
        }
    }

    void parse_tensor_table(detail::ByteCursor& in) {
        // Each entry takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
        if (n_tensors_ > in.remaining() / 24) {
            throw FormatError("GGUF: tensor_count " + std::to_string(n_tensors_) +
                              " exceeds what the remaining file could hold");
        }
        tensors_.reserve(static_cast<std::size_t>(n_tensors_));
        for (std::uint64_t i = 0; i < n_tensors_; ++i) {
            tensors_.push_back(read_tensor_info(in, "tensor[" + std::to_string(i) + "]"));
            if (!tensor_index_.emplace(tensors_.back().name, tensors_.size() - 1).second) {
                throw FormatError("GGUF: duplicate tensor name '" + detail::printable(tensors_.back().name) + "'");
            }
        }
    }

    GgufTensorInfo read_tensor_info(detail::ByteCursor& in, const std::string& field) const {
        GgufTensorInfo info;
        info.name = in.read_string(field + ".name");
        const std::string where = "tensor '" + detail::printable(info.name) + "'";
        const std::uint32_t n_dims = in.read<std::uint32_t>(where + " n_dims");
        if (n_dims == 0 || n_dims > kMaxDims) {
            throw FormatError("GGUF: " + where + " has n_dims " + std::to_string(n_dims) + " (need 1.." +
                              std::to_string(kMaxDims) + ")");
        }
        // n_elements must stay far below 2^63 / 4 so that byte sizes cannot overflow.
        constexpr std::uint64_t kMaxElements = std::uint64_t{1} << 56;
        info.n_elements = 1;
        for (std::uint32_t d = 0; d < n_dims; ++d) {
            const std::uint64_t dim = in.read<std::uint64_t>(where + " dim " + std::to_string(d));
            if (dim == 0 || dim > kMaxElements / info.n_elements) {
                throw FormatError("GGUF: " + where + " dim " + std::to_string(d) + " = " + std::to_string(dim) +
                                  " is zero or makes the element count overflow");
            }
            info.n_elements *= dim;
            info.dims.push_back(static_cast<std::int64_t>(dim));
        }
        const std::uint32_t raw_type = in.read<std::uint32_t>(where + " type");
        const GgmlTypeTraits* traits = ggml_type_traits(raw_type);
        if (!traits) throw FormatError("GGUF: " + where + " has unsupported ggml type " + std::to_string(raw_type));
        info.type = static_cast<GgmlType>(raw_type);
        if (static_cast<std::uint64_t>(info.dims[0]) % traits->block_size != 0) {
            throw FormatError("GGUF: " + where + " row length " + std::to_string(info.dims[0]) +
                              " is not a multiple of the " + traits->name + " block size");
        }
        info.n_bytes = info.n_elements / traits->block_size * traits->block_bytes;
        info.offset = in.read<std::uint64_t>(where + " offset");
        return info;
    }

    // The data section starts at the next multiple of the alignment; every
    // tensor must lie inside it and be aligned. Offsets are relative to the
    // data section, so no tensor can reach back into the header, metadata or
    // tensor table.
    void locate_data_section(detail::ByteCursor& in) {
        const std::uint64_t end_of_table = in.position();
        data_offset_ = (end_of_table + alignment_ - 1) / alignment_ * alignment_;
        if (data_offset_ > size_) {
            throw FormatError("GGUF: data section offset " + std::to_string(data_offset_) +
                              " is past the end of the file (" + std::to_string(size_) + " bytes)");
        }
        const std::uint64_t data_size = size_ - data_offset_;
        for (const GgufTensorInfo& info : tensors_) {
            if (info.offset % alignment_ != 0) {
                throw FormatError("GGUF: tensor '" + detail::printable(info.name) + "' offset " + std::to_string(info.offset) +
                                  " is not a multiple of the alignment " + std::to_string(alignment_));
            }
            if (info.offset > data_size || info.n_bytes > data_size - info.offset) {
                throw FormatError("GGUF: tensor '" + detail::printable(info.name) + "' (offset " + std::to_string(info.offset) +
                                  ", " + std::to_string(info.n_bytes) + " bytes) extends past the end of the file");
            }
        }
        check_tensors_tile_data_section(data_size);
    }

    // Writers (llama.cpp, gguf-py) place tensors back to back, each padded to
    // the alignment. Requiring exactly that layout catches tensors that share
    // bytes and - since a tensor's size follows from its type and shape - a
    // type or shape that was changed while the result still fits the file:
    // it leaves a gap or an overlap next to the tensor.
    void check_tensors_tile_data_section(std::uint64_t data_size) const {
        std::vector<const GgufTensorInfo*> by_offset;
        for (const GgufTensorInfo& info : tensors_) by_offset.push_back(&info);
        std::stable_sort(by_offset.begin(), by_offset.end(),
                         [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
        std::uint64_t expected = 0;  // where the next tensor must start
        const GgufTensorInfo* previous = nullptr;
        for (const GgufTensorInfo* info : by_offset) {
            if (info->offset < expected) {
                throw FormatError("GGUF: tensor '" + detail::printable(info->name) + "' at offset " +
                                  std::to_string(info->offset) + " overlaps " + describe(*previous) +
                                  " (the type or shape of one of them is wrong, or they share bytes)");
            }
            if (info->offset > expected) {
                throw FormatError("GGUF: gap of " + std::to_string(info->offset - expected) + " bytes before tensor '" +
                                  detail::printable(info->name) + "' at offset " + std::to_string(info->offset) +
                                  (previous ? ", after " + describe(*previous) : std::string(" at the start of the data section")) +
                                  " (a type or shape does not match the bytes stored)");
            }
            expected = padded(info->offset + info->n_bytes);  // cannot overflow: both are <= data_size
            previous = info;
        }
        // The last tensor may or may not be padded; anything beyond is not ours.
        const std::uint64_t used = previous ? previous->offset + previous->n_bytes : 0;
        if (data_size > padded(used)) {
            throw FormatError("GGUF: " + std::to_string(data_size - used) + " bytes follow the end of the " +
                              (previous ? "last " + describe(*previous) : std::string("tensor table")) + "; the data section has " +
                              std::to_string(data_size) + " bytes but the tensor table accounts for " +
                              std::to_string(used) + " (a type or shape does not match the bytes stored)");
        }
    }

    std::uint64_t padded(std::uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

    static std::string describe(const GgufTensorInfo& info) {
        return "tensor '" + detail::printable(info.name) + "' (offset " + std::to_string(info.offset) + ", " +
               ggml_type_traits(static_cast<std::uint32_t>(info.type))->name + " " + detail::dims_string(info.dims) +
               " = " + std::to_string(info.n_bytes) + " bytes)";
    }

    static std::string file_kind(mode_t mode) {
        if (S_ISDIR(mode)) return "a directory";
        if (S_ISFIFO(mode)) return "a FIFO";
        if (S_ISCHR(mode)) return "a character device";
        if (S_ISBLK(mode)) return "a block device";
        if (S_ISSOCK(mode)) return "a socket";
        return "a special file";
    }

    static std::string to_hex(std::uint32_t v) {
        char buf[16];
        std::snprintf(buf, sizeof buf, "%08x", v);
        return buf;
    }

    std::shared_ptr<std::vector<std::uint8_t>> owned_;  // null for view_bytes
    const std::uint8_t* data_ = nullptr;
    std::size_t size_ = 0;
    std::uint32_t version_ = 0;
    std::uint64_t alignment_ = 32;
    std::uint64_t data_offset_ = 0;
    std::uint64_t tensor_table_offset_ = 0;
    std::uint64_t n_tensors_ = 0;      // from the header
    std::uint64_t n_key_values_ = 0;   // from the header
    std::map<std::string, GgufValue> metadata_;
    std::vector<GgufTensorInfo> tensors_;
    std::unordered_map<std::string, std::size_t> tensor_index_;
};

}  // namespace pyramidinfer::llama
