// tokenizer.hpp - GPT-2 style byte-level BPE tokenizer built from the
// `tokenizer.ggml.*` metadata of a GGUF file, plus ChatML prompt formatting.
//
// Encoding: (1) special tokens (control / user-defined) written literally in
// the text become single ids; (2) the remaining text is pre-tokenized with the
// GPT-2 split rules (for SmolLM's "smollm" pre-tokenizer every digit is split
// off first); (3) each piece's bytes are mapped to the GPT-2 byte alphabet and
// merged with the ranked BPE merges.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <queue>
#include <string>
#include <unordered_map>
#include <vector>

#include "llama/gguf.hpp"

namespace pyramidinfer::llama {

// Token types from tokenizer.ggml.token_type (llama.cpp numbering).
enum class TokenType : std::int32_t {
    Undefined = 0, Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6,
};

struct ChatMessage {
    std::string role;  // "system", "user" or "assistant"
    std::string content;
};

namespace detail {

// ---- UTF-8 and character classes used by the pre-tokenizer ----

// Decodes one code point at `pos`; returns its byte length. Invalid bytes
// decode as a 1-byte U+FFFD so that every byte still belongs to some piece.
inline std::size_t utf8_decode(const std::string& s, std::size_t pos, std::uint32_t& cp) {
    const auto byte = [&](std::size_t i) { return static_cast<std::uint8_t>(s[i]); };
    const std::uint8_t b0 = byte(pos);
    std::size_t length = b0 < 0x80 ? 1 : (b0 >> 5) == 0x6 ? 2 : (b0 >> 4) == 0xe ? 3 : (b0 >> 3) == 0x1e ? 4 : 0;
    if (length == 0 || pos + length > s.size()) {
        cp = 0xfffd;
        return 1;
    }
    cp = length == 1 ? b0 : length == 2 ? (b0 & 0x1fu) : length == 3 ? (b0 & 0x0fu) : (b0 & 0x07u);
    for (std::size_t i = 1; i < length; ++i) {
        if ((byte(pos + i) & 0xc0) != 0x80) {
            cp = 0xfffd;
            return 1;
        }
        cp = (cp << 6) | (byte(pos + i) & 0x3fu);
    }
    return length;
}

inline void utf8_append(std::string& out, std::uint32_t cp) {
    if (cp < 0x80) {
        out += static_cast<char>(cp);
    } else if (cp < 0x800) {
        out += static_cast<char>(0xc0 | (cp >> 6));
        out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        out += static_cast<char>(0xe0 | (cp >> 12));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
        out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
        out += static_cast<char>(0xf0 | (cp >> 18));
        out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
        out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
        out += static_cast<char>(0x80 | (cp & 0x3f));
    }
}

// Unicode White_Space (\s).
inline bool is_space(std::uint32_t c) {
    return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
           c == 0x3000;
}

// \p{N}: exact for ASCII and Latin-1; beyond that only the common digit
// blocks are listed (no full Unicode table - enough for English text).
inline bool is_number(std::uint32_t c) {
    return (c >= '0' && c <= '9') || c == 0xb2 || c == 0xb3 || c == 0xb9 || (c >= 0xbc && c <= 0xbe) ||
           (c >= 0x660 && c <= 0x669) || (c >= 0x6f0 && c <= 0x6f9) || (c >= 0x966 && c <= 0x96f) ||
           (c >= 0x2070 && c <= 0x2079) || (c >= 0x2080 && c <= 0x2089) || (c >= 0x2150 && c <= 0x218b) ||
           (c >= 0x2460 && c <= 0x249b) || (c >= 0xff10 && c <= 0xff19);
}

// \p{L}: exact for ASCII and Latin-1. Above Latin-1, code points are letters
// unless they fall in the punctuation / symbol blocks listed here.
inline bool is_letter(std::uint32_t c) {
    if (c < 0x80) return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
    if (c < 0x100) return c == 0xaa || c == 0xb5 || c == 0xba || (c >= 0xc0 && c != 0xd7 && c != 0xf7);
    if (is_space(c) || is_number(c) || c == 0xfffd) return false;
    const bool symbol_block = (c >= 0x2000 && c <= 0x2bff) ||  // punctuation, arrows, math, boxes
                              (c >= 0x3000 && c <= 0x303f) ||  // CJK punctuation
                              (c >= 0xfe30 && c <= 0xfe4f) || (c >= 0xff00 && c <= 0xff20) ||
                              (c >= 0x1f000 && c <= 0x1faff) ||  // emoji and pictographs
                              (c >= 0x0300 && c <= 0x036f);      // combining marks (\p{M}, not \p{L})
    return !symbol_block;
}

// GPT-2's reversible byte -> printable code point map: printable Latin-1
// bytes map to themselves, the rest to 256, 257, ... in byte order.
inline std::array<std::uint32_t, 256> byte_to_code_point() {
    std::array<std::uint32_t, 256> table{};
    std::uint32_t next = 256;
    for (std::uint32_t b = 0; b < 256; ++b) {
        const bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
        table[b] = printable ? b : next++;
    }
    return table;
}

}  // namespace detail

class Tokenizer {
public:
    static constexpr std::size_t kMaxVocab = 1u << 22;

    static Tokenizer from_gguf(const GgufFile& file) {
        Tokenizer t;
        t.load_vocab(file);
        t.load_merges(file);
        t.load_special_ids(file);
        t.load_pre_tokenizer(file);
        if (const GgufValue* tmpl = file.find("tokenizer.chat_template")) {
            if (tmpl->type == GgufType::String) t.chat_template_ = tmpl->as_string();
        }
        return t;
    }

    std::size_t vocab_size() const { return tokens_.size(); }
    std::int32_t bos_id() const { return bos_id_; }
    std::int32_t eos_id() const { return eos_id_; }
    bool add_bos() const { return add_bos_; }
    const std::string& pre_tokenizer() const { return pre_; }
    const std::string& chat_template() const { return chat_template_; }

    // Raw vocabulary string of a token (byte-level alphabet, e.g. "Ġworld").
    const std::string& token(std::int32_t id) const { return tokens_.at(checked(id)); }
    TokenType token_type(std::int32_t id) const { return types_.at(checked(id)); }
    bool is_control(std::int32_t id) const { return token_type(id) == TokenType::Control; }

    // Id of a raw vocabulary string, or -1.
    std::int32_t token_id(const std::string& text) const {
        auto it = token_ids_.find(text);
        return it == token_ids_.end() ? -1 : it->second;
    }

    // Text -> ids. With parse_special, special token strings in `text`
    // (e.g. "<|im_start|>") become their single ids.
    std::vector<std::int32_t> encode(const std::string& text, bool parse_special = true) const {
        std::vector<std::int32_t> ids;
        std::size_t plain_start = 0;
        std::size_t pos = 0;
        while (pos < text.size()) {
            const std::int32_t special = parse_special ? special_token_at(text, pos) : -1;
            if (special < 0) {
                ++pos;
                continue;
            }
            encode_plain(text.substr(plain_start, pos - plain_start), ids);
            ids.push_back(special);
            pos += tokens_[static_cast<std::size_t>(special)].size();
            plain_start = pos;
        }
        encode_plain(text.substr(plain_start), ids);
        return ids;
    }

    // The pre-tokenizer's pieces of `text` (special tokens are not looked
    // for); encode() runs BPE on each piece separately.
    std::vector<std::string> pre_tokenize_pieces(const std::string& text) const { return pre_tokenize(text); }

    // ids -> text. Control tokens are written as their text unless skipped.
    std::string decode(const std::vector<std::int32_t>& ids, bool skip_control = false) const {
        std::string out;
        for (std::int32_t id : ids) {
            if (skip_control && is_control(id)) continue;
            out += token_text(id);
        }
        return out;
    }

    // The bytes one token stands for (may be a partial UTF-8 sequence).
    std::string token_text(std::int32_t id) const {
        const std::string& raw = token(id);
        const TokenType type = token_type(id);
        if (type == TokenType::Control || type == TokenType::UserDefined) return raw;
        std::string out;
        for (std::size_t pos = 0; pos < raw.size();) {
            std::uint32_t cp;
            const std::size_t length = detail::utf8_decode(raw, pos, cp);
            if (cp < code_point_to_byte_.size() && code_point_to_byte_[cp] >= 0) {
                out += static_cast<char>(code_point_to_byte_[cp]);
            } else {
                out.append(raw, pos, length);  // not in the byte alphabet: keep as is
            }
            pos += length;
        }
        return out;
    }

    // ChatML prompt, following SmolLM2's chat template: when the first
    // message is not a system message, the template's default system prompt
    // is inserted; with add_generation_prompt the assistant turn is opened.
    std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
        std::string out;
        if (!messages.empty() && messages.front().role != "system" && !default_system_prompt().empty()) {
            out += "<|im_start|>system\n" + default_system_prompt() + "<|im_end|>\n";
        }
        for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
        if (add_generation_prompt) out += "<|im_start|>assistant\n";
        return out;
    }

    // The system prompt hard-coded in the metadata chat template, if any.
    std::string default_system_prompt() const {
        const std::string open = "<|im_start|>system\n";
        const std::size_t start = chat_template_.find(open);
        if (start == std::string::npos) return {};
        const std::size_t end = chat_template_.find("<|im_end|>", start + open.size());
        if (end == std::string::npos) return {};
        return chat_template_.substr(start + open.size(), end - start - open.size());
    }

private:
    std::size_t checked(std::int32_t id) const {
        if (id < 0 || static_cast<std::size_t>(id) >= tokens_.size()) {
            throw std::out_of_range("token id " + std::to_string(id) + " out of range");
        }
        return static_cast<std::size_t>(id);
    }

    void load_vocab(const GgufFile& file) {
        const GgufValue* model = file.find("tokenizer.ggml.model");
        if (!model || model->type != GgufType::String || model->as_string() != "gpt2") {
            throw FormatError("tokenizer: tokenizer.ggml.model must be the string \"gpt2\" (byte-level BPE)");
        }
        const GgufValue& tokens = file.at("tokenizer.ggml.tokens");
        if (!tokens.is_array() || tokens.element_type != GgufType::String || tokens.strings.empty() ||
            tokens.strings.size() > kMaxVocab) {
            throw FormatError("tokenizer: tokenizer.ggml.tokens must be a non-empty string array of at most " +
                              std::to_string(kMaxVocab) + " entries (got " + std::to_string(tokens.size()) + ")");
        }
        tokens_ = tokens.strings;
        types_.assign(tokens_.size(), TokenType::Normal);
        if (const GgufValue* types = file.find("tokenizer.ggml.token_type")) {
            if (!types->is_array() || types->ints.size() != tokens_.size()) {
                throw FormatError("tokenizer: tokenizer.ggml.token_type must be an integer array with one entry "
                                  "per token (" + std::to_string(tokens_.size()) + "), got " +
                                  std::to_string(types->size()));
            }
            for (std::size_t i = 0; i < tokens_.size(); ++i) {
                const std::int64_t t = types->ints[i];
                if (t < 0 || t > 6) {
                    throw FormatError("tokenizer: token_type[" + std::to_string(i) + "] = " + std::to_string(t) +
                                      " is not a known token type");
                }
                types_[i] = static_cast<TokenType>(t);
            }
        }
        token_ids_.reserve(tokens_.size());
        for (std::size_t i = 0; i < tokens_.size(); ++i) {
            token_ids_.emplace(tokens_[i], static_cast<std::int32_t>(i));  // first id wins on duplicates
            const bool special = types_[i] == TokenType::Control || types_[i] == TokenType::UserDefined;
            if (special && !tokens_[i].empty()) special_ids_.push_back(static_cast<std::int32_t>(i));
        }
        // Longest first, so that matching at a position picks the longest token.
        std::sort(special_ids_.begin(), special_ids_.end(), [&](std::int32_t a, std::int32_t b) {
            return tokens_[static_cast<std::size_t>(a)].size() > tokens_[static_cast<std::size_t>(b)].size();
        });
        const auto byte_map = detail::byte_to_code_point();
        code_point_to_byte_.assign(512, -1);
        for (std::size_t b = 0; b < 256; ++b) {
            byte_to_symbol_[b].clear();
            detail::utf8_append(byte_to_symbol_[b], byte_map[b]);
            code_point_to_byte_[byte_map[b]] = static_cast<std::int32_t>(b);
        }
    }

    void load_merges(const GgufFile& file) {
        const GgufValue& merges = file.at("tokenizer.ggml.merges");
        if (!merges.is_array() || merges.element_type != GgufType::String) {
            throw FormatError("tokenizer: tokenizer.ggml.merges must be a string array");
        }
        merge_ranks_.reserve(merges.strings.size());
        for (std::size_t i = 0; i < merges.strings.size(); ++i) {
            const std::string& m = merges.strings[i];
            const std::size_t space = m.find(' ', 1);
            if (space == std::string::npos || space + 1 >= m.size()) {
                throw FormatError("tokenizer: merges[" + std::to_string(i) + "] = '" + detail::printable(m) +
                                  "' is not of the form 'left right'");
            }
            // Keyed by "left right" exactly as stored; the lowest rank wins.
            merge_ranks_.emplace(m, static_cast<std::int32_t>(i));
        }
    }

    std::int32_t optional_id(const GgufFile& file, const std::string& key) const {
        const GgufValue* v = file.find(key);
        if (!v) return -1;
        if (v->is_array() || v->ints.size() != 1 || v->ints[0] < 0 ||
            static_cast<std::uint64_t>(v->ints[0]) >= tokens_.size()) {
            throw FormatError("tokenizer: " + key + " is not a token id in [0, " + std::to_string(tokens_.size()) +
                              ")");
        }
        return static_cast<std::int32_t>(v->ints[0]);
    }

    void load_special_ids(const GgufFile& file) {
        bos_id_ = optional_id(file, "tokenizer.ggml.bos_token_id");
        eos_id_ = optional_id(file, "tokenizer.ggml.eos_token_id");
        unknown_id_ = optional_id(file, "tokenizer.ggml.unknown_token_id");
        if (const GgufValue* v = file.find("tokenizer.ggml.add_bos_token")) {
            if (v->type != GgufType::Bool) throw FormatError("tokenizer: tokenizer.ggml.add_bos_token is not a bool");
            add_bos_ = v->as_bool();
        }
    }

    // Only the GPT-2 split rules are implemented; the SmolLM / StarCoder
    // variants additionally isolate every digit.
    void load_pre_tokenizer(const GgufFile& file) {
        pre_ = "gpt-2";
        if (const GgufValue* v = file.find("tokenizer.ggml.pre")) {
            if (v->type != GgufType::String) throw FormatError("tokenizer: tokenizer.ggml.pre is not a string");
            pre_ = v->as_string();
        }
        if (pre_ == "smollm" || pre_ == "starcoder" || pre_ == "refact" || pre_ == "codeshell") {
            split_digits_ = true;
        } else if (pre_ == "gpt-2" || pre_ == "gpt2") {
            split_digits_ = false;
        } else {
            throw FormatError("tokenizer: unsupported tokenizer.ggml.pre '" + detail::printable(pre_) + "'");
        }
    }

    std::int32_t special_token_at(const std::string& text, std::size_t pos) const {
        for (std::int32_t id : special_ids_) {
            const std::string& s = tokens_[static_cast<std::size_t>(id)];
            if (text.compare(pos, s.size(), s) == 0) return id;
        }
        return -1;
    }

    void encode_plain(const std::string& text, std::vector<std::int32_t>& ids) const {
        for (const std::string& piece : pre_tokenize(text)) bpe(piece, ids);
    }

    // Splits text like the GPT-2 regex
    //   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    // applied to each segment left after isolating digits (if split_digits_).
    std::vector<std::string> pre_tokenize(const std::string& text) const {
        std::vector<std::uint32_t> cps;
        std::vector<std::size_t> offsets;  // byte offset of each code point, plus the end
        for (std::size_t pos = 0; pos < text.size();) {
            std::uint32_t cp;
            offsets.push_back(pos);
            pos += detail::utf8_decode(text, pos, cp);
            cps.push_back(cp);
        }
        offsets.push_back(text.size());

        std::vector<std::string> pieces;
        const auto emit = [&](std::size_t begin, std::size_t end) {
            pieces.push_back(text.substr(offsets[begin], offsets[end] - offsets[begin]));
        };
        std::size_t segment_start = 0;
        for (std::size_t i = 0; i <= cps.size(); ++i) {
            const bool digit_boundary = i < cps.size() && split_digits_ && detail::is_number(cps[i]);
            if (i < cps.size() && !digit_boundary) continue;
            split_segment(cps, segment_start, i, emit);
            if (digit_boundary) emit(i, i + 1);
            segment_start = i + 1;
        }
        return pieces;
    }

    template <typename Emit>
    static void split_segment(const std::vector<std::uint32_t>& cps, std::size_t begin, std::size_t end, Emit& emit) {
        for (std::size_t i = begin; i < end;) {
            const std::size_t next = match_piece(cps, i, end);
            emit(i, next);
            i = next;
        }
    }

    // End of the regex match starting at `i` within [i, end).
    static std::size_t match_piece(const std::vector<std::uint32_t>& cps, std::size_t i, std::size_t end) {
        using detail::is_letter;
        using detail::is_number;
        using detail::is_space;
        const auto at = [&](std::size_t k) -> std::uint32_t { return k < end ? cps[k] : 0; };
        // Contractions: 's 't 'm 'd and 're 've 'll (case-sensitive, as in GPT-2).
        if (cps[i] == '\'') {
            const std::uint32_t a = at(i + 1), b = at(i + 2);
            if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
        }
        // Optional single leading space, then a run of one character class.
        std::size_t j = i;
        if (cps[i] == ' ' && i + 1 < end && !is_space(cps[i + 1])) j = i + 1;
        if (!is_space(cps[j])) {
            const auto same_class = [&](std::uint32_t c) {
                if (is_letter(cps[j])) return is_letter(c);
                if (is_number(cps[j])) return is_number(c);
                return !is_space(c) && !is_letter(c) && !is_number(c);
            };
            std::size_t k = j + 1;
            while (k < end && same_class(cps[k])) ++k;
            return k;
        }
        // Whitespace run: \s+(?!\S) leaves the last space for the next word;
        // a single space before a non-space falls back to \s+.
        std::size_t k = i;
        while (k < end && is_space(cps[k])) ++k;
        if (k == end || k - i == 1) return k;
        return k - 1;
    }

    // Byte-level BPE of one pre-tokenized piece: start from one symbol per
    // byte and repeatedly merge the adjacent pair with the lowest rank (the
    // leftmost pair among equal ranks). Symbols form a linked list over the
    // piece's mapped text and candidate pairs wait in a min-heap keyed by
    // (rank, left symbol's position), so a piece of n bytes takes
    // O(n log n) instead of rescanning every pair after every merge - a
    // 32 KB run of '=' took half a minute that way. A heap entry goes stale
    // when either symbol has since changed; it is then skipped.
    void bpe(const std::string& piece, std::vector<std::int32_t>& ids) const {
        if (piece.empty()) return;
        struct Symbol {
            std::size_t start, length;  // in `text`
            std::ptrdiff_t prev, next;  // neighbour indices, -1 at the ends
        };
        std::string text;
        std::vector<Symbol> symbols;
        for (unsigned char byte : piece) {
            const std::string& s = byte_to_symbol_[byte];
            symbols.push_back({text.size(), s.size(), static_cast<std::ptrdiff_t>(symbols.size()) - 1,
                               static_cast<std::ptrdiff_t>(symbols.size()) + 1});
            text += s;
        }
        symbols.back().next = -1;

        struct Pair {
            std::int32_t rank;
            std::size_t left, right, length;  // symbol indices; length of the merged text
            bool operator>(const Pair& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
        };
        std::priority_queue<Pair, std::vector<Pair>, std::greater<Pair>> queue;
        std::string key;  // "left right", the merge_ranks_ key; reused to avoid allocations
        const auto push_pair = [&](std::ptrdiff_t left) {
            if (left < 0 || symbols[static_cast<std::size_t>(left)].next < 0) return;
            const Symbol& a = symbols[static_cast<std::size_t>(left)];
            const Symbol& b = symbols[static_cast<std::size_t>(a.next)];
            key.assign(text, a.start, a.length).append(1, ' ').append(text, b.start, b.length);
            auto it = merge_ranks_.find(key);
            if (it != merge_ranks_.end()) {
                queue.push({it->second, static_cast<std::size_t>(left), static_cast<std::size_t>(a.next),
                            a.length + b.length});
            }
        };
        for (std::size_t i = 0; i + 1 < symbols.size(); ++i) push_pair(static_cast<std::ptrdiff_t>(i));

        while (!queue.empty()) {
            const Pair top = queue.top();
            queue.pop();
            Symbol& a = symbols[top.left];
            Symbol& b = symbols[top.right];
            // Stale unless both symbols are still neighbours of the same
            // lengths (a merged-away symbol has length 0).
            if (a.length == 0 || b.length == 0 || a.next != static_cast<std::ptrdiff_t>(top.right) ||
                a.length + b.length != top.length) {
                continue;
            }
            a.length += b.length;  // b's text directly follows a's
            b.length = 0;
            a.next = b.next;
            if (b.next >= 0) symbols[static_cast<std::size_t>(b.next)].prev = static_cast<std::ptrdiff_t>(top.left);
            push_pair(a.prev);
            push_pair(static_cast<std::ptrdiff_t>(top.left));
        }

        for (std::ptrdiff_t i = 0; i >= 0; i = symbols[static_cast<std::size_t>(i)].next) {
            const Symbol& sym = symbols[static_cast<std::size_t>(i)];
            const std::int32_t id = token_id(text.substr(sym.start, sym.length));
            if (id >= 0) {
                ids.push_back(id);
            } else if (unknown_id_ >= 0) {
                ids.push_back(unknown_id_);  // vocab lacks this byte symbol; should not happen for GPT-2 vocabs
            }
        }
    }

    std::vector<std::string> tokens_;
    std::vector<TokenType> types_;
    std::unordered_map<std::string, std::int32_t> token_ids_;
    std::unordered_map<std::string, std::int32_t> merge_ranks_;
    std::vector<std::int32_t> special_ids_;  // control + user-defined, longest first
    std::array<std::string, 256> byte_to_symbol_;
    std::vector<std::int32_t> code_point_to_byte_;
    std::int32_t bos_id_ = -1, eos_id_ = -1, unknown_id_ = -1;
    bool add_bos_ = false;
    bool split_digits_ = false;
    std::string pre_;
    std::string chat_template_;
};

}  // namespace pyramidinfer::llama
