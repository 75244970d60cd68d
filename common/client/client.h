// The blocking keyhold client, shared by the OpenSSL provider, the PKCS#11
// module and the CLI.
//
// Safe inside any host process: no threads, no event loop, no signals (writes
// use MSG_NOSIGNAL). Thread-safe: concurrent Call()s from many threads each
// use their own pooled connection, so they run in parallel with one round
// trip each. Connections persist across calls. After fork() the child drops
// the parent's connections and opens its own; after a daemon restart a call
// on a dead connection reconnects and is retried once.
//
// Before sending anything on a new connection the client checks the peer's
// kernel uid against the expected daemon uid, so an impostor socket gets
// nothing.
#ifndef KEYHOLD_COMMON_CLIENT_CLIENT_H_
#define KEYHOLD_COMMON_CLIENT_CLIENT_H_

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "common/secret.h"
#include "common/status.h"
#include "keyhold/v1/keyhold.pb.h"

namespace keyhold::client {

inline constexpr char kDefaultSocketPath[] = "/run/keyhold/keyhold.sock";

struct Options {
  // Socket path; empty: $KEYHOLD_SOCKET, else kDefaultSocketPath.
  std::string socket_path;
  // The uid the daemon must run as; unset: $KEYHOLD_DAEMON_UID, else the
  // owner of the socket file.
  std::optional<uid_t> expected_daemon_uid;
  std::chrono::milliseconds connect_timeout{5000};
  // Per call; $KEYHOLD_TIMEOUT_MS overrides the default.
  std::chrono::milliseconds call_timeout{120000};
  // Idle connections kept for reuse.
  std::size_t max_idle_connections = 8;
};

// Options with the environment applied ($KEYHOLD_SOCKET, $KEYHOLD_DAEMON_UID,
// $KEYHOLD_TIMEOUT_MS).
Options OptionsFromEnvironment();

class Client {
 public:
  // Never connects; the first call does.
  explicit Client(Options options);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  const Options& options() const;

  // Sends one request (its id is assigned here) and waits for the response.
  // A response with a non-OK code is returned as that Status.
  StatusOr<v1::Response> Call(v1::Request request);

  // Typed helpers over Call().
  StatusOr<v1::HelloResponse> Hello();
  Status Ping();
  StatusOr<v1::GenerateKeyResponse> GenerateKey(const v1::KeyRef& key,
                                                v1::KeyType type,
                                                const std::string& backend = "");
  // private_key is PEM or DER; the request buffer is wiped after sending.
  StatusOr<v1::ImportKeyResponse> ImportKey(const v1::KeyRef& key,
                                            const SecretBytes& private_key,
                                            const std::string& backend = "");
  StatusOr<v1::GetPublicKeyResponse> GetPublicKey(const v1::KeyRef& key);
  StatusOr<v1::ListKeysResponse> ListKeys(bool include_shared);
  Status DestroyKey(const v1::KeyRef& key);
  // Stores DER X.509 `der` beside the key (empty: removes it).
  StatusOr<v1::KeyInfo> SetCertificate(const v1::KeyRef& key,
                                       const std::string& der);
  StatusOr<std::string> Sign(const v1::SignRequest& request);
  StatusOr<SecretBytes> Decrypt(const v1::DecryptRequest& request);
  StatusOr<SecretBytes> Derive(const v1::KeyRef& key,
                               std::span<const uint8_t> peer_public_key);
  Status GrantUse(const v1::KeyRef& key, const v1::Grant& grantee);
  Status RevokeUse(const v1::KeyRef& key, const v1::Grant& grantee);
  StatusOr<v1::ListClientsResponse> ListClients();
  StatusOr<uint32_t> DeleteClient(uint32_t uid);
  StatusOr<v1::AuditResponse> Audit(const v1::AuditRequest& request);
  StatusOr<v1::StatsResponse> Stats();

  struct Impl;  // implementation detail (public for the fork handlers)

 private:
  std::unique_ptr<Impl> impl_;
};

v1::KeyRef MakeKeyRef(const std::string& name,
                      std::optional<uint32_t> owner = std::nullopt);

}  // namespace keyhold::client

#endif  // KEYHOLD_COMMON_CLIENT_CLIENT_H_
