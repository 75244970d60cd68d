// kill -9 while a client creates keys: every acknowledged key survives the
// restart and signs; nothing half-written appears.
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>
#include <set>
#include <thread>

#include "tests/harness/daemon_process.h"

namespace keyhold::testing {
namespace {

TEST(DurabilityTest, AcknowledgedCreatesSurviveKill9) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  for (int round = 0; round < 3; ++round) {
    std::mutex mu;
    std::set<std::string> acked;
    std::atomic<bool> stop{false};
    std::thread creator([&] {
      client::Options o = daemon.ClientOptions();
      client::Client c(o);
      for (int i = 0; !stop; ++i) {
        const std::string name =
            "r" + std::to_string(round) + "-" + std::to_string(i);
        auto r = c.GenerateKey(client::MakeKeyRef(name),
                               i % 2 == 0 ? v1::EC_P256 : v1::ED25519);
        if (r.ok()) {
          std::lock_guard<std::mutex> lock(mu);
          acked.insert(name);
        }
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(700 + round * 300));
    daemon.Kill();
    stop = true;
    creator.join();
    ASSERT_TRUE(daemon.Start()) << daemon.log();
    ASSERT_FALSE(acked.empty());

    client::Client c(daemon.ClientOptions());
    auto list = c.ListKeys(false);
    ASSERT_TRUE(list.ok());
    std::set<std::string> present;
    for (const auto& k : list->keys()) {
      present.insert(k.name());
    }
    for (const std::string& name : acked) {
      EXPECT_TRUE(present.contains(name)) << name << " was acknowledged";
      v1::SignRequest req;
      *req.mutable_key() = client::MakeKeyRef(name);
      const bool ed = (std::stoi(name.substr(name.find('-') + 1)) % 2) == 1;
      req.set_algorithm(ed ? v1::ED25519_PURE : v1::ECDSA);
      req.set_digest(ed ? v1::DIGEST_NONE : v1::SHA256);
      req.set_data(std::string(32, 'z'));
      auto sig = c.Sign(req);
      EXPECT_TRUE(sig.ok()) << name << ": " << sig.status().ToString();
    }
    // Every key that is present (acknowledged or not) is whole and usable.
    for (const auto& k : list->keys()) {
      auto pub = c.GetPublicKey(client::MakeKeyRef(k.name()));
      EXPECT_TRUE(pub.ok()) << k.name();
    }
    std::cout << "round " << round << ": " << acked.size() << " acknowledged, "
              << present.size() << " present\n";
  }
}

TEST(DurabilityTest, AcknowledgedDeletesSurviveKill9) {
  DaemonProcess daemon;
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  constexpr int kKeys = 1500;
  {
    client::Client c(daemon.ClientOptions());
    for (int i = 0; i < kKeys; ++i) {
      ASSERT_TRUE(c.GenerateKey(client::MakeKeyRef("d" + std::to_string(i)),
                                v1::ED25519)
                      .ok());
    }
  }
  std::mutex mu;
  std::set<std::string> deleted;
  std::atomic<bool> stop{false};
  std::thread deleter([&] {
    client::Client c(daemon.ClientOptions());
    for (int i = 0; i < kKeys && !stop; ++i) {
      const std::string name = "d" + std::to_string(i);
      if (c.DestroyKey(client::MakeKeyRef(name)).ok()) {
        std::lock_guard<std::mutex> lock(mu);
        deleted.insert(name);
      }
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  daemon.Kill();
  stop = true;
  deleter.join();
  ASSERT_TRUE(daemon.Start()) << daemon.log();
  client::Client c(daemon.ClientOptions());
  int present = 0;
  for (int i = 0; i < kKeys; ++i) {
    const std::string name = "d" + std::to_string(i);
    auto pub = c.GetPublicKey(client::MakeKeyRef(name));
    if (deleted.contains(name)) {
      EXPECT_EQ(pub.status().code(), Code::kNotFound)
          << name << " was deleted, acknowledged, and came back";
    } else if (pub.ok()) {
      ++present;
    }
  }
  std::cout << deleted.size() << " deletes acknowledged, " << present
            << " keys left\n";
  EXPECT_FALSE(deleted.empty());
}

}  // namespace
}  // namespace keyhold::testing
