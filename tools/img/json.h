// A small JSON writer: enough for qcow2fs-img's reports, nothing more.
//
// Pretty output indents by four spaces, as qemu-img's does; compact output
// puts a whole value on one line (qemu-img map prints one entry a line).
// Calls must nest correctly (a Key before every value inside an object);
// that is the caller's contract, not checked at run time.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace qcow2fs::img {

class JsonWriter {
 public:
  explicit JsonWriter(bool pretty = true) : pretty_(pretty) {}

  void BeginObject() { Open('{'); }
  void EndObject() { Close('}'); }
  void BeginArray() { Open('['); }
  void EndArray() { Close(']'); }
  void Key(std::string_view key);
  void String(std::string_view value);
  void Uint(uint64_t value);
  void Int(int64_t value);
  void Bool(bool value);

  // Key and value in one call.
  void Field(std::string_view key, std::string_view value) {
    Key(key);
    String(value);
  }
  void Field(std::string_view key, const char* value) {
    Key(key);
    String(value);
  }
  void Field(std::string_view key, const std::string& value) {
    Key(key);
    String(value);
  }
  void Field(std::string_view key, uint64_t value) {
    Key(key);
    Uint(value);
  }
  void Field(std::string_view key, int value) {
    Key(key);
    Int(value);
  }
  void Field(std::string_view key, bool value) {
    Key(key);
    Bool(value);
  }

  const std::string& str() const { return out_; }

 private:
  struct Level {
    bool empty = true;
  };
  void BeforeValue();
  void Open(char c);
  void Close(char c);
  void NewLine();

  bool pretty_;
  bool after_key_ = false;
  std::vector<Level> levels_;
  std::string out_;
};

// `s` as a JSON string literal, quotes included.
std::string JsonQuote(std::string_view s);

}  // namespace qcow2fs::img
