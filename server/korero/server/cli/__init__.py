"""`korero` subcommands of the server package: `serve`, `keys`, `kb`."""
