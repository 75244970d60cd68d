// keyhold: the command-line front-end of keyholdd.
//
// Parses the command line with CLI11, then runs the one action the chosen
// subcommand registered. Exit codes: 0 success, 1 the operation failed (one
// line on stderr), 2 usage error.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "cli/cli_util.h"
#include "cli/commands/commands.h"

#ifndef KEYHOLD_VERSION
#define KEYHOLD_VERSION "unknown"
#endif

namespace keyhold::cli {
namespace {

int Main(int argc, char** argv) {
  CLI::App app{"keyhold: create, share and use keys held by keyholdd",
               "keyhold"};
  // Global options are accepted after the subcommand too
  // ("keyhold key list --socket PATH"); subcommands inherit this setting.
  app.fallthrough();
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("keyhold ") + KEYHOLD_VERSION);
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return std::string("keyhold: ") + e.what() +
           " (run with --help for usage)\n";
  });

  Context ctx;
  app.add_option("--socket", ctx.socket_path,
                 std::string("keyholdd socket; default: $KEYHOLD_SOCKET, "
                             "else ") +
                     client::kDefaultSocketPath)
      ->option_text("PATH");

  Action action;
  AddPingCommand(app, &action);
  AddKeyCommands(app, &action);
  AddCertCommands(app, &action);
  AddCryptoCommands(app, &action);
  AddAdminCommands(app, &action);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? kExitOk : kExitUsage;
  }
  if (!action) {
    std::fputs("keyhold: no command given (run with --help for usage)\n",
               stderr);
    return kExitUsage;
  }
  return action(ctx);
}

}  // namespace
}  // namespace keyhold::cli

int main(int argc, char** argv) {
  try {
    return keyhold::cli::Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "keyhold: internal error: %s\n", e.what());
  } catch (...) {
    std::fputs("keyhold: internal error: unknown exception\n", stderr);
  }
  return keyhold::cli::kExitFailure;
}
