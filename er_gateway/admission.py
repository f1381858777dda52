"""Letting a request in: authenticate its key, count it against its limits, and account for
the tokens it costs (reserved before forwarding, settled to vLLM's count after)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import GatewayError
from .keys import ApiKey, Keys
from .observability import RequestInfo
from .ratelimit import RateLimiter


@dataclass
class Admission:
    """An admitted request: its key, the rate-limit headers to answer with, its bookkeeping."""

    key: ApiKey
    headers: dict[str, str]
    info: RequestInfo
    reserved: int = 0  # tokens taken from the key's budget before forwarding, settled after
    done_tokens: int = 0  # tokens the backend reported for the calls it answered (dispatch.py)


class Admitter:
    """Keys and limits for one configuration (a reload builds a new one with its limiter)."""

    def __init__(self, keys: Keys, limiter: RateLimiter, on_tokens: Callable[[str, str, int], None]) -> None:
        self.keys = keys
        self.limiter = limiter
        self._on_tokens = on_tokens  # (model, key name, tokens) for metrics

    async def admit(self, api_key: str | None, info: RequestInfo, route: str, cost: int = 1) -> Admission:
        """Authenticate the caller and count the request against its limits (`cost` requests)."""
        info.route = route
        key = self.keys.authenticate(api_key)
        info.key_name = key.name
        headers = await self.limiter.hit_request(key, cost) if cost else {}
        if self.budgets_tokens(key):
            try:
                headers.update(await self.limiter.check_tokens(key))
            except GatewayError as e:
                e.headers = {**headers, **e.headers}
                raise
        return Admission(key, headers, info)

    def authenticate(self, api_key: str | None) -> ApiKey:
        return self.keys.authenticate(api_key)

    async def check_requests(self, adm: Admission) -> None:
        """401/429 now if the key has no request left (before reading a body that costs several)."""
        adm.headers.update(await self.limiter.check_request(adm.key))

    async def count_requests(self, adm: Admission, cost: int) -> None:
        """Charge `cost` requests to the key at once (429 if they do not all fit)."""
        adm.headers.update(await self.limiter.hit_request(adm.key, cost=cost))

    def is_admin(self, api_key: str | None) -> bool:
        """Whether `api_key` is a valid admin key (for pages that are public otherwise)."""
        if api_key is None:
            return False  # the common case (a load balancer's probe): no error object built
        try:
            return self.keys.authenticate(api_key).admin
        except GatewayError:
            return False

    @staticmethod
    def require_admin(key: ApiKey) -> None:
        if not key.admin:
            raise GatewayError(403, f"key {key.name!r} is not an admin key")

    def budgets_tokens(self, key: ApiKey) -> bool:
        """Whether `key` has a token budget (only then are tokens counted before forwarding)."""
        return bool(key.token_limit or self.limiter.default_tokens)

    async def reserve_tokens(self, adm: Admission, tokens: int) -> None:
        """Take an estimate of the request's tokens from the key's budget (429 if it does not fit)."""
        try:
            reserved, headers = await self.limiter.reserve_tokens(adm.key, tokens)
        except GatewayError as e:
            e.headers = {**adm.headers, **e.headers}
            raise
        adm.reserved += reserved
        adm.headers.update(headers)

    async def settle(self, adm: Admission, model: str) -> None:
        """Charge what the backend reported doing (`adm.done_tokens`, the parts that answered),
        whether the request then succeeded or not, and settle the reservation against it."""
        tokens = adm.done_tokens
        if tokens:
            adm.info.tokens = (adm.info.tokens or 0) + tokens
            self._on_tokens(model, adm.key.name, tokens)
        if adm.reserved:
            reserved, adm.reserved = adm.reserved, 0
            await self.limiter.settle_tokens(adm.key, reserved, tokens)
        elif tokens and self.budgets_tokens(adm.key):
            await self.limiter.add_tokens(adm.key, tokens)
