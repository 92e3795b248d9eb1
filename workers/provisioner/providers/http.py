"""The HTTP client both marketplace adapters share: timeouts, 429 backoff, clean errors.

Errors name the provider and what happened, never a header: the API key travels in one and
must not reach a log or an answer.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from typing import Any

import httpx

from schemas.errors import Unavailable


def retry_after(response: httpx.Response, default: float) -> float:
    """Seconds the provider asks us to wait: `Retry-After` as seconds or an HTTP date."""
    raw = response.headers.get("retry-after", "").strip()
    if not raw:
        return default
    if raw.replace(".", "", 1).isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return default
    return max(when.timestamp() - time.time(), 0.0)


class ApiClient:
    """JSON over HTTP to one provider API.

    `request` returns the response for every 2xx and 4xx but 429, so the adapter reads the
    provider's own error body; it raises `Unavailable` for timeouts, connection failures, 5xx
    and a 429 that outlasts the backoff budget.
    """

    def __init__(
        self,
        provider: str,
        base_url: str,
        headers: Mapping[str, str],
        *,
        timeout: float = 15.0,
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.provider = provider
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=dict(headers),
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._max_backoff = max_backoff

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        delay = self._backoff
        for attempt in range(1, self._max_attempts + 1):
            try:
                response = await self._client.request(method, path, json=json, params=params)
            except httpx.TimeoutException:
                raise Unavailable(
                    f"{self.provider} did not answer {method} {path} within {self._timeout:g}s"
                ) from None
            except httpx.HTTPError as exc:
                raise Unavailable(
                    f"{self.provider} cannot be reached ({type(exc).__name__})"
                ) from None
            if response.status_code == 429:
                if attempt == self._max_attempts:
                    break
                wait = min(retry_after(response, delay), self._max_backoff)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self._max_backoff)
                continue
            if response.status_code >= 500:
                raise Unavailable(
                    f"{self.provider} answered {response.status_code} to {method} {path}"
                    f"{_reason(response)}"
                )
            return response
        raise Unavailable(
            f"{self.provider} kept answering 429 (too many requests) to {method} {path} "
            f"after {self._max_attempts} attempts"
        )

    async def close(self) -> None:
        await self._client.aclose()


def _reason(response: httpx.Response) -> str:
    """The provider's own short reason from an error body, if it gave one."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if isinstance(body, dict):
        for key in ("msg", "message", "detail", "error"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return f": {value[:300]}"
    return ""
