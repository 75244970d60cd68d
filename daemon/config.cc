#include "daemon/config.h"

#include <sys/stat.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

namespace keyhold::daemon {
namespace {

Status CheckKeys(const toml::table& table, const std::set<std::string>& known,
                 const std::string& where) {
  for (const auto& [key, value] : table) {
    if (!known.contains(std::string(key.str()))) {
      return InvalidArgument("unknown setting '" + where +
                             std::string(key.str()) + "'");
    }
  }
  return Status::Ok();
}

template <typename T>
Status ReadUint(const toml::table& t, const char* key, T* out,
                const std::string& where, int64_t min, int64_t max) {
  const toml::node* node = t.get(key);
  if (node == nullptr) {
    return Status::Ok();
  }
  auto v = node->value<int64_t>();
  if (!v || *v < min || *v > max) {
    return InvalidArgument("setting '" + where + key +
                           "' must be an integer from " + std::to_string(min) +
                           " to " + std::to_string(max));
  }
  *out = static_cast<T>(*v);
  return Status::Ok();
}

Status ReadString(const toml::table& t, const char* key, std::string* out) {
  const toml::node* node = t.get(key);
  if (node == nullptr) {
    return Status::Ok();
  }
  auto v = node->value<std::string>();
  if (!v || v->empty()) {
    return InvalidArgument(std::string("setting '") + key +
                           "' must be a non-empty string");
  }
  *out = *v;
  return Status::Ok();
}

// A boolean setting; TOML integers are refused (no int-to-bool).
Status ReadBool(const toml::table& t, const char* key, bool* out) {
  const toml::node* node = t.get(key);
  if (node == nullptr) {
    return Status::Ok();
  }
  const toml::value<bool>* v = node->as_boolean();
  if (v == nullptr) {
    return InvalidArgument(std::string("setting '") + key +
                           "' must be true or false");
  }
  *out = v->get();
  return Status::Ok();
}

// [[backend.pkcs11]] and [[backend.tpm]]: arrays of tables, each with a
// unique name; everything else in a table is for that backend to parse.
Status ReadBackends(const toml::node* node, std::vector<BackendSection>* out) {
  const toml::table* backend = node->as_table();
  if (backend == nullptr) {
    return InvalidArgument(
        "'backend' must hold [[backend.pkcs11]] or [[backend.tpm]] tables");
  }
  KH_RETURN_IF_ERROR(CheckKeys(*backend, {"pkcs11", "tpm"}, "backend."));
  std::set<std::string> names = {"software"};
  for (const char* kind : {"pkcs11", "tpm"}) {
    const toml::node* list = backend->get(kind);
    if (list == nullptr) {
      continue;
    }
    const toml::array* arr = list->as_array();
    if (arr == nullptr || !arr->is_array_of_tables()) {
      return InvalidArgument(std::string("write [[backend.") + kind +
                             "]] tables for '" + kind + "' backends");
    }
    for (const toml::node& entry : *arr) {
      const toml::table& t = *entry.as_table();
      BackendSection section;
      section.kind = kind;
      KH_RETURN_IF_ERROR(ReadString(t, "name", &section.name));
      if (section.name.empty()) {
        return InvalidArgument(std::string("every [[backend.") + kind +
                               "]] needs a name");
      }
      if (!names.insert(section.name).second) {
        return InvalidArgument("backend name '" + section.name +
                               "' is used twice (or is 'software')");
      }
      std::ostringstream text;
      text << t;
      section.settings = text.str();
      out->push_back(std::move(section));
    }
  }
  return Status::Ok();
}

}  // namespace

StatusOr<Config> ParseConfig(const std::string& toml_text,
                             const std::string& source_name) {
  toml::table root;
  try {
    root = toml::parse(toml_text, source_name);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << source_name << ":" << e.source().begin.line << ": "
        << e.description();
    return InvalidArgument(msg.str());
  }
  Config c;
  KH_RETURN_IF_ERROR(CheckKeys(
      root,
      {"socket", "state_dir", "admins", "log_level", "default_backend",
       "worker_threads", "blocking_threads", "inline_crypto", "audit_key_use",
       "audit_key_use_per_minute", "audit_rotate_mb", "audit_keep_files",
       "master_key_sealed_by", "cpu_local_sessions", "limits", "backend"},
      ""));
  KH_RETURN_IF_ERROR(ReadString(root, "socket", &c.socket_path));
  KH_RETURN_IF_ERROR(ReadString(root, "state_dir", &c.state_dir));
  KH_RETURN_IF_ERROR(ReadString(root, "log_level", &c.log_level));
  KH_RETURN_IF_ERROR(ReadString(root, "default_backend", &c.default_backend));
  KH_RETURN_IF_ERROR(
      ReadString(root, "master_key_sealed_by", &c.master_key_sealed_by));
  KH_RETURN_IF_ERROR(
      ReadUint(root, "worker_threads", &c.worker_threads, "", 0, 256));
  KH_RETURN_IF_ERROR(
      ReadUint(root, "blocking_threads", &c.blocking_threads, "", 0, 256));
  KH_RETURN_IF_ERROR(ReadBool(root, "inline_crypto", &c.inline_crypto));
  KH_RETURN_IF_ERROR(
      ReadBool(root, "cpu_local_sessions", &c.cpu_local_sessions));
  KH_RETURN_IF_ERROR(ReadBool(root, "audit_key_use", &c.audit_key_use));
  KH_RETURN_IF_ERROR(
      ReadBool(root, "audit_key_use_per_minute", &c.audit_key_use_per_minute));
  KH_RETURN_IF_ERROR(
      ReadUint(root, "audit_rotate_mb", &c.audit_rotate_mb, "", 0, 1 << 20));
  KH_RETURN_IF_ERROR(
      ReadUint(root, "audit_keep_files", &c.audit_keep_files, "", 1, 10000));
  if (const toml::node* admins = root.get("admins")) {
    const toml::array* arr = admins->as_array();
    if (arr == nullptr) {
      return InvalidArgument("setting 'admins' must be an array of uids");
    }
    c.admin_uids.clear();
    for (const toml::node& n : *arr) {
      auto v = n.value<int64_t>();
      if (!v || *v < 0 || *v > UINT32_MAX) {
        return InvalidArgument("setting 'admins' must hold numeric uids");
      }
      c.admin_uids.push_back(static_cast<uint32_t>(*v));
    }
  }
  static const std::set<std::string> kLevels = {"trace", "debug", "info",
                                                "warn",  "error", "off"};
  if (!kLevels.contains(c.log_level)) {
    return InvalidArgument(
        "setting 'log_level' must be one of trace, debug, "
        "info, warn, error, off");
  }
  if (const toml::node* limits = root.get("limits")) {
    const toml::table* t = limits->as_table();
    if (t == nullptr) {
      return InvalidArgument("'limits' must be a table");
    }
    KH_RETURN_IF_ERROR(CheckKeys(
        *t,
        {"max_frame_bytes", "max_in_flight_per_connection", "max_connections",
         "max_connections_per_uid", "max_in_flight_per_uid",
         "idle_timeout_seconds", "io_timeout_seconds"},
        "limits."));
    Limits& l = c.limits;
    KH_RETURN_IF_ERROR(ReadUint(*t, "max_frame_bytes", &l.max_frame_bytes,
                                "limits.", 1024, int64_t{16} * 1024 * 1024));
    KH_RETURN_IF_ERROR(ReadUint(*t, "max_in_flight_per_connection",
                                &l.max_in_flight_per_connection, "limits.", 1,
                                1024));
    KH_RETURN_IF_ERROR(ReadUint(*t, "max_connections_per_uid",
                                &l.max_connections_per_uid, "limits.", 1,
                                1000000));
    KH_RETURN_IF_ERROR(ReadUint(*t, "max_in_flight_per_uid",
                                &l.max_in_flight_per_uid, "limits.", 1,
                                1000000));
    KH_RETURN_IF_ERROR(ReadUint(*t, "max_connections", &l.max_connections,
                                "limits.", 1, 1000000));
    KH_RETURN_IF_ERROR(ReadUint(*t, "idle_timeout_seconds",
                                &l.idle_timeout_seconds, "limits.", 0,
                                int64_t{86400} * 7));
    KH_RETURN_IF_ERROR(ReadUint(*t, "io_timeout_seconds", &l.io_timeout_seconds,
                                "limits.", 1, 3600));
  }
  if (const toml::node* node = root.get("backend")) {
    KH_RETURN_IF_ERROR(ReadBackends(node, &c.backends));
  }
  if (!c.master_key_sealed_by.empty() &&
      std::none_of(c.backends.begin(), c.backends.end(),
                   [&](const BackendSection& b) {
                     return b.kind == "tpm" && b.name == c.master_key_sealed_by;
                   })) {
    return InvalidArgument("setting 'master_key_sealed_by' names '" +
                           c.master_key_sealed_by +
                           "', which is not a [[backend.tpm]] table");
  }
  return c;
}

StatusOr<Config> LoadConfigFile(const std::string& path) {
  // The file names the admins, the backends and the files holding their
  // PINs: only root or keyholdd's own uid may be able to change it.
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    return InvalidArgument("cannot read config file " + path + ": " +
                           std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    return InvalidArgument("config file " + path + " is not a regular file");
  }
  if (st.st_uid != 0 && st.st_uid != ::geteuid()) {
    return InvalidArgument("config file " + path + " is owned by uid " +
                           std::to_string(st.st_uid) +
                           "; it must belong to root or to keyholdd's uid " +
                           std::to_string(::geteuid()));
  }
  if ((st.st_mode & (S_IWGRP | S_IWOTH)) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o",
                  static_cast<unsigned>(st.st_mode & 07777));
    return InvalidArgument("config file " + path + " has mode " + mode +
                           ": others than its owner could change it; "
                           "chmod go-w it");
  }
  std::ifstream in(path);
  if (!in) {
    return InvalidArgument("cannot read config file " + path);
  }
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseConfig(ss.str(), path);
}

}  // namespace keyhold::daemon
