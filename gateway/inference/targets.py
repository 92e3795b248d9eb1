"""Where a gRPC inference request goes: `target_url` names a model or a machine, never a host.

    model://<model>[/<path>]        any machine serving the model that the caller may use
    instance://<instance id>[/<path>]   that machine, if the caller may use it

The path is one of the OpenAI-compatible inference paths and defaults to chat completions.
Anything else (`http://...`, a host, an unknown path) is refused before anything is sent.
"""

from __future__ import annotations

import re

import msgspec

from schemas.errors import InvalidArgument
from schemas.inference import Api

PROTOCOLS = ("", "http", "https", "openinference")
"""Every one speaks the OpenAI-compatible API upstream; the names are the original API's."""
_BY_PATH = {api.path: api for api in Api}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+\-]{0,255}")
_INSTANCE = re.compile(r"i-[A-Za-z0-9_\-]{1,64}")


class Target(msgspec.Struct, frozen=True, kw_only=True):
    api: Api
    model: str = ""
    instance_id: str = ""


def target(url: str, protocol: str, method: str) -> Target:
    if protocol.lower() not in PROTOCOLS:
        raise InvalidArgument(
            "one of http, https or openinference (all speak the OpenAI-compatible API)",
            field="protocol",
        )
    if method and method.upper() != "POST":
        raise InvalidArgument("inference requests are POST", field="method")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("model", "instance"):
        raise InvalidArgument(
            "name a model (model://<name>) or an instance (instance://<id>), never a host",
            field="target_url",
        )
    name, slash, path = rest.partition("/")
    api = Api.CHAT
    if slash:
        found = _BY_PATH.get("/" + path)
        if found is None:
            paths = ", ".join(_BY_PATH)
            raise InvalidArgument(f"the path must be one of {paths}", field="target_url")
        api = found
    if scheme == "model":
        if not _NAME.fullmatch(name):
            raise InvalidArgument("model://<name> needs a model name", field="target_url")
        return Target(api=api, model=name)
    if not _INSTANCE.fullmatch(name):
        raise InvalidArgument("instance://<id> needs an instance id (i-...)", field="target_url")
    return Target(api=api, instance_id=name)


def instance_named(value: str) -> str:
    """An instance id given on its own (an HTTP header); "" when none was given."""
    if value and not _INSTANCE.fullmatch(value):
        raise InvalidArgument("an instance id (i-...)", field="x-gpuproxy-instance")
    return value
