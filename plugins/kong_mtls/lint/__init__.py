"""`kong-mtls lint`: offline checks of a Kong configuration for the mistakes that open or break
a deployment of these plugins.

`model` turns a declarative config (or what the Admin API returns) into plain entities and answers
"which plugin config does Kong run here"; `rules` holds one small function per rule; `sources`
reads files, kong.conf and the Admin API; `plugin_checks` asks the plugins themselves whether they
would accept a config. The command is `kong_mtls.commands.lint`.
"""
