#include "rules/yaml_tree.h"

#include <yaml-cpp/exceptions.h>
#include <yaml-cpp/parser.h>

#include <sstream>

#include "rules/config_text.h"

namespace registry_proxy {
namespace config_internal {

// ---------------------------------------------------------------------------------------------
// Text checks before YAML: size and encoding.

std::string TooBig(size_t size) {
  return "config is " + std::to_string(size) + " bytes; the limit is " +
         std::to_string(kMaxConfigBytes) + " bytes (1 MiB)";
}

// yaml-cpp guesses encodings and quietly replaces bad bytes; a config must be UTF-8 text.
std::optional<TextProblem> CheckText(std::string_view s) {
  if (s.size() >= 2 && ((s[0] == '\xfe' && s[1] == '\xff') || (s[0] == '\xff' && s[1] == '\xfe'))) {
    return TextProblem{{1, 1},
                       "config is UTF-16 (it starts with a byte order mark); save it as "
                       "UTF-8"};
  }
  int line = 1, col = 1;
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\n') {
      ++line, col = 1, ++i;
      continue;
    }
    if (c < 0x80) {
      if ((c < 0x20 && c != '\t' && c != '\r') || c == 0x7f) {
        static constexpr char kHex[] = "0123456789ABCDEF";
        std::string code = "U+00";
        code.push_back(kHex[c >> 4]);
        code.push_back(kHex[c & 0xf]);
        return TextProblem{{line, col}, "control character " + code + " is not allowed"};
      }
      ++i, ++col;
      continue;
    }
    size_t len = 0;
    uint32_t cp = 0;
    if ((c & 0xe0) == 0xc0) {
      len = 2, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4, cp = c & 0x07;
    }
    bool ok = len != 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      ok = (cc & 0xc0) == 0x80;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8 either.
    if (ok) {
      ok = !((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
             (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) || (cp >= 0xd800 && cp <= 0xdfff));
    }
    if (!ok) return TextProblem{{line, col}, "config is not valid UTF-8"};
    i += len, ++col;
  }
  return std::nullopt;
}

const Node* ParseYamlDocument(std::string_view yaml, TreeBuilder& tree, TextProblem* problem) {
  try {
    std::istringstream in{std::string(yaml)};
    YAML::Parser parser(in);
    if (!parser.HandleNextDocument(tree)) {
      *problem = {{},
                  "config is empty: it has no keys (write enabled: false to turn rewriting off)"};
      return nullptr;
    }
    // A second document would be ignored silently by most tools; say so instead. Empty ones
    // (a trailing '---', as generated files often have) are harmless.
    Pos last = tree.document_pos();
    while (true) {
      TreeBuilder rest;
      if (!parser.HandleNextDocument(rest)) break;
      // yaml-cpp can get stuck on junk (a leading ',') and return empty documents forever
      // without consuming anything.
      if (rest.document_pos().line == last.line && rest.document_pos().column == last.column) {
        *problem = {last, "invalid YAML: cannot parse the text here"};
        return nullptr;
      }
      last = rest.document_pos();
      if (rest.root() && rest.root()->kind != Node::Kind::kNull) {
        *problem = {rest.document_pos(),
                    "config has more than one YAML document (a '---' separator); keep one"};
        return nullptr;
      }
    }
  } catch (const StopParsing& e) {
    *problem = {e.pos, e.message};
    return nullptr;
  } catch (const YAML::Exception& e) {
    *problem = {ToPos(e.mark), "invalid YAML: " + e.msg};
    return nullptr;
  }
  const Node* root = tree.root();
  if (!root || root->kind == Node::Kind::kNull) {
    *problem = {{}, "config is empty: it has no keys (write enabled: false to turn rewriting off)"};
    return nullptr;
  }
  if (root->expanded > tree.node_count() + kMaxAliasNodes) {
    *problem = {root->pos, "aliases expand the config to more than " +
                               std::to_string(kMaxAliasNodes) +
                               " extra nodes; write it out instead"};
    return nullptr;
  }
  return root;
}

// YAML 1.2 core schema resolution of plain scalars (yaml-cpp reports nulls separately).
bool IsCoreBool(std::string_view v) {
  return v == "true" || v == "True" || v == "TRUE" || v == "false" || v == "False" || v == "FALSE";
}
bool IsTrue(std::string_view v) { return v == "true" || v == "True" || v == "TRUE"; }
// YAML 1.1 booleans: plain strings in YAML 1.2, a classic source of surprises.
bool IsYaml11Bool(std::string_view v) {
  static constexpr std::string_view kWords[] = {"y",  "Y",   "yes", "Yes", "YES", "n",
                                                "N",  "no",  "No",  "NO",  "on",  "On",
                                                "ON", "off", "Off", "OFF"};
  return std::find(std::begin(kWords), std::end(kWords), v) != std::end(kWords);
}
bool IsCoreNumber(std::string_view v) {
  if (v == ".inf" || v == ".Inf" || v == ".INF" || v == "-.inf" || v == "-.Inf" || v == "-.INF" ||
      v == "+.inf" || v == "+.Inf" || v == "+.INF" || v == ".nan" || v == ".NaN" || v == ".NAN") {
    return true;
  }
  if (v.size() > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'o')) {
    const bool hex = v[1] == 'x';
    return std::all_of(v.begin() + 2, v.end(), [&](char c) {
      return hex ? (IsDigit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))
                 : (c >= '0' && c <= '7');
    });
  }
  size_t i = 0;
  if (i < v.size() && (v[i] == '-' || v[i] == '+')) ++i;
  size_t digits = 0;
  while (i < v.size() && IsDigit(v[i])) ++i, ++digits;
  if (i < v.size() && v[i] == '.') {
    ++i;
    while (i < v.size() && IsDigit(v[i])) ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < v.size() && (v[i] == 'e' || v[i] == 'E')) {
    ++i;
    if (i < v.size() && (v[i] == '-' || v[i] == '+')) ++i;
    size_t exp = 0;
    while (i < v.size() && IsDigit(v[i])) ++i, ++exp;
    if (exp == 0) return false;
  }
  return i == v.size();
}

bool IsPlain(const Node& n) { return n.tag == "?"; }

// "a list", "the string 'x'", ...: what the file has where something else was expected.
std::string Describe(const Node& n) {
  switch (n.kind) {
    case Node::Kind::kNull:
      return "no value";
    case Node::Kind::kSequence:
      return "a list";
    case Node::Kind::kMap:
      return "a map";
    case Node::Kind::kScalar:
      break;
  }
  if (!IsPlain(n)) return "the string " + Quote(n.value);
  if (IsCoreBool(n.value)) return "the boolean " + n.value;
  if (IsCoreNumber(n.value)) return "the number " + n.value;
  return Quote(n.value);
}

}  // namespace config_internal
}  // namespace registry_proxy
