"""Ask each of our plugins whether it would accept a config, exactly as its plugin server does
when Kong starts an instance (`Plugin(config)`: the schema, then the core's own checks, files read
included), and collect the trust anchors the config loads.

Imports the Kong adapters (and with them kong-pdk) on first use only.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from kong_mtls.constants import CLIENT_CERT_AUTH, HEADER_CERT_AUTH, PLUGIN_MODULES, UPSTREAM_IDENTITY
from kong_mtls.core.chain import ChainConfigError, parse_pem_certificates, read_certificate_file
from kong_mtls.lint.rules import PluginCheck
from kong_mtls.schema import ConfigError


def check_plugin(name: str, config: Mapping[str, Any]) -> PluginCheck:
    """What plugin `name` says about `config` (for a name not ours: nothing)."""
    module_name = PLUGIN_MODULES.get(name)
    if module_name is None:
        return PluginCheck()
    module = importlib.import_module(module_name)
    try:
        if name in (CLIENT_CERT_AUTH, HEADER_CERT_AUTH):
            return PluginCheck(anchors=module.compile_config(config).anchors)
        module.Plugin(config)
    except ConfigError as exc:
        return PluginCheck(error=str(exc))
    except Exception as exc:  # a refusal the plugin did not word: still a refusal, never a traceback
        return PluginCheck(error=f"{type(exc).__name__}: {exc}")
    if name == UPSTREAM_IDENTITY:
        return PluginCheck(anchors=_upstream_anchors(config))
    return PluginCheck()


def _upstream_anchors(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """upstream-identity's CAs (already read successfully by the plugin's own check)."""
    anchors: list[Any] = []
    try:
        if isinstance(config.get("trusted_ca_pem"), str):
            anchors.extend(parse_pem_certificates(config["trusted_ca_pem"]))
        for path in config.get("trusted_ca_files") or ():
            anchors.extend(read_certificate_file(path))
    except ChainConfigError:
        return ()
    return tuple(anchors)
