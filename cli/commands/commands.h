// The keyhold subcommands. Each Add*() registers its subcommands on the
// top-level app; the one the user picked stores its action in *action.
#ifndef KEYHOLD_CLI_COMMANDS_COMMANDS_H_
#define KEYHOLD_CLI_COMMANDS_COMMANDS_H_

#include <CLI/CLI.hpp>

#include "cli/cli_util.h"

namespace keyhold::cli {

// ping
void AddPingCommand(CLI::App& app, Action* action);
// key create|import|list|public|ref|delete|grant|revoke
void AddKeyCommands(CLI::App& app, Action* action);
// cert import|show|delete
void AddCertCommands(CLI::App& app, Action* action);
// sign, decrypt, derive
void AddCryptoCommands(CLI::App& app, Action* action);
// admin clients|delete-client
void AddAdminCommands(CLI::App& app, Action* action);

}  // namespace keyhold::cli

#endif  // KEYHOLD_CLI_COMMANDS_COMMANDS_H_
