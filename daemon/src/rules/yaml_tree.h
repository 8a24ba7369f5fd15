// The config loader's first job: bytes -> checked YAML tree, with line and column positions.
//
// yaml-cpp's YAML::Load hides what a strict loader needs (it keeps only the first of duplicate
// keys on lookup, cannot say whether a node came from an alias, and recurses as deep as the
// input nests), so the loader builds its own small tree from yaml-cpp's parser events. The
// event handler stops the parser at a nesting limit, rejects recursive aliases, and counts
// how far aliases expand the document, before the schema walk (config.cc) looks at anything.
// Internal to rules/.
#pragma once

#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/mark.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace registry_proxy {
namespace config_internal {

// A ConfigMap holds at most 1 MiB; nothing legitimate comes close.
constexpr size_t kMaxConfigBytes = size_t{1} << 20;
// The schema nests about six levels; yaml-cpp recurses once (or more) per level.
constexpr size_t kMaxDepth = 64;
// Aliases may share a mirror list between rules, but not multiply the document (alias bombs).
constexpr uint64_t kMaxAliasNodes = 100000;

struct Pos {
  int line = 0;  // 1-based; 0 = unknown
  int column = 0;
};

inline Pos ToPos(const YAML::Mark& m) {
  if (m.is_null() || m.line < 0) return {};
  return {m.line + 1, m.column < 0 ? 0 : m.column + 1};
}

// A problem found before the schema walk (text, YAML), and where.
struct TextProblem {
  Pos pos;
  std::string message;
};

std::string TooBig(size_t size);
// Size aside, whether `s` is UTF-8 text without control characters.
std::optional<TextProblem> CheckText(std::string_view s);

struct Node {
  enum class Kind { kNull, kScalar, kSequence, kMap };
  Kind kind = Kind::kNull;
  Pos pos;
  std::string tag;    // "?" plain scalar or untagged collection, "!" quoted scalar, or a tag
  std::string value;  // scalars
  // Sequence items; for a map, keys and values alternating. Aliases share nodes.
  std::vector<const Node*> children;
  bool open = false;      // a collection still being parsed
  uint64_t expanded = 1;  // nodes in this subtree with every alias expanded (saturating)
};

// Thrown from the event handler to stop yaml-cpp; no yaml-cpp frame catches it.
struct StopParsing {
  Pos pos;
  std::string message;
};

class TreeBuilder final : public YAML::EventHandler {
 public:
  const Node* root() const { return root_; }
  size_t node_count() const { return nodes_.size(); }
  Pos document_pos() const { return document_pos_; }

  void OnDocumentStart(const YAML::Mark& mark) override { document_pos_ = ToPos(mark); }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    Finish(New(Node::Kind::kNull, mark, ""), anchor);
  }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t anchor) override {
    auto it = anchors_.find(anchor);
    if (it == anchors_.end()) throw StopParsing{ToPos(mark), "alias to an unknown anchor"};
    if (it->second->open) {
      throw StopParsing{ToPos(mark), "recursive alias: it refers to a collection that contains it"};
    }
    Attach(it->second);
  }
  void OnScalar(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                const std::string& value) override {
    Node* n = New(Node::Kind::kScalar, mark, tag);
    n->value = value;
    Finish(n, anchor);
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                       YAML::EmitterStyle::value /*style*/) override {
    Open(Node::Kind::kSequence, mark, tag, anchor);
  }
  void OnSequenceEnd() override { Close(); }
  void OnMapStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t anchor,
                  YAML::EmitterStyle::value /*style*/) override {
    Open(Node::Kind::kMap, mark, tag, anchor);
  }
  void OnMapEnd() override { Close(); }

 private:
  static constexpr uint64_t kSaturated = uint64_t{1} << 62;

  Node* New(Node::Kind kind, const YAML::Mark& mark, const std::string& tag) {
    Node& n = nodes_.emplace_back();
    n.kind = kind;
    n.pos = ToPos(mark);
    n.tag = tag;
    return &n;
  }
  void Register(YAML::anchor_t anchor, Node* n) {
    if (anchor != YAML::NullAnchor) anchors_[anchor] = n;
  }
  void Finish(Node* n, YAML::anchor_t anchor) {
    Register(anchor, n);
    Attach(n);
  }
  // The depth check runs before yaml-cpp descends further, so its recursion stays shallow.
  void Open(Node::Kind kind, const YAML::Mark& mark, const std::string& tag,
            YAML::anchor_t anchor) {
    if (stack_.size() >= kMaxDepth) {
      throw StopParsing{ToPos(mark), "nesting is deeper than " + std::to_string(kMaxDepth) +
                                         " levels; a registry-proxy config needs fewer than 10"};
    }
    Node* n = New(kind, mark, tag);
    n->open = true;
    Register(anchor, n);
    stack_.push_back(n);
  }
  void Close() {
    if (stack_.empty()) return;
    Node* n = stack_.back();
    stack_.pop_back();
    n->open = false;
    Attach(n);
  }
  void Attach(const Node* n) {
    if (stack_.empty()) {
      if (!root_) root_ = n;
      return;
    }
    Node* parent = stack_.back();
    parent->children.push_back(n);
    parent->expanded = std::min(kSaturated, parent->expanded + n->expanded);
  }

  std::deque<Node> nodes_;  // stable addresses
  std::vector<Node*> stack_;
  std::unordered_map<YAML::anchor_t, Node*> anchors_;
  const Node* root_ = nullptr;
  Pos document_pos_;
};
// Parses the single document of `yaml` into `tree`. Null (and `*problem` says why) when it is
// not YAML, stops at a limit, is empty, or has more than one document.
const Node* ParseYamlDocument(std::string_view yaml, TreeBuilder& tree, TextProblem* problem);

// YAML 1.2 core schema resolution of plain scalars.
bool IsCoreBool(std::string_view v);
bool IsTrue(std::string_view v);
bool IsYaml11Bool(std::string_view v);
bool IsCoreNumber(std::string_view v);
bool IsPlain(const Node& n);
std::string Describe(const Node& n);

}  // namespace config_internal
}  // namespace registry_proxy
