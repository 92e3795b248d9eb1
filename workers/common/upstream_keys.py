"""The API key of each machine gpuproxy starts, known to the provisioner and the proxy only.

A rented machine's endpoint is reachable by anyone who learns its address; without a key a
user could skip the gateway and its metering. So every machine is started with its own key
(vLLM reads `VLLM_API_KEY`, and the `sim` machine does too), derived from one secret and the
instance id: the provisioner passes it at the launch, the proxy presents it on every call,
and a key that leaks opens one machine, not the fleet. Users never see it; the endpoint they
use is the gateway's.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_ENV = "VLLM_API_KEY"
"""The launch environment variable that carries a machine's key."""


class UpstreamKeys:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def __repr__(self) -> str:
        return "UpstreamKeys(<secret>)"

    def of(self, instance_id: str) -> str:
        digest = hmac.new(self._secret, instance_id.encode(), hashlib.sha256).hexdigest()
        return f"gpk_{digest[:48]}"
