"""Settings of the server: one dataclass, each field documented, read from the environment by `from_env`."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields

from ..errors import StemmaError

_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class ServeConfig:
    """How `stemma serve` runs. Environment variables: ``STEMMA_ADMIN_TOKEN`` and ``STEMMA_SERVE_<FIELD>``."""

    host: str = "127.0.0.1"
    """Address to bind. Anything but loopback needs an admin token."""
    port: int = 8000
    """TCP port."""
    admin_token: str | None = None
    """Bearer token for /admin endpoints (STEMMA_ADMIN_TOKEN). None: admin endpoints are refused."""
    max_batch: int = 64
    """KV-cache slots per engine: sequences decoded together."""
    max_adapters: int = 32
    """Adapters held per engine; the least recently used idle one is evicted beyond."""
    adapter_budget_bytes: int = 512 << 20
    """Bytes of adapters held per engine; LRU eviction beyond."""
    memory_budget_bytes: int = 0
    """Bytes of engines (weights + KV cache + adapters, measured) held at once; 0: half the available RAM.
    Idle engines are evicted least-recently-used to make room."""
    max_prefill_tokens: int = 2048
    """Padded prompt tokens prefilled in one step (bounds the pause running streams see)."""
    max_n: int = 16
    """Largest ``n`` (choices per prompt) a request may ask for."""
    max_prompts: int = 64
    """Largest number of prompts in one completions request."""
    max_body_bytes: int = 4 << 20
    """Largest request body (bytes) outside ``/admin/updates``; larger ones answer 413 before any parsing."""
    max_queue: int = 4096
    """Sequences waiting or running per engine before new requests get 429."""
    resolve_ttl_s: float = 2.0
    """How long a resolved node name is cached before the registry is asked again."""
    allow_flagged: bool = False
    """Serve versions reached by an active risk flag (and the apps bound to them); by default they answer 403."""
    flags_ttl_s: float = 2.0
    """How long the set of flagged versions (`stemma.risk.affected`) is cached: a new flag is refused at most this
    many seconds after it is set; 0 asks the registry on every request."""

    @classmethod
    def from_env(cls, **overrides) -> ServeConfig:
        """Defaults, then STEMMA_SERVE_* variables and STEMMA_ADMIN_TOKEN, then explicit overrides."""
        vals: dict = {}
        for f in fields(cls):
            raw = os.environ.get(f"STEMMA_SERVE_{f.name.upper()}")
            if raw is None:
                continue
            if f.type == "bool":
                if raw.strip().lower() not in _BOOLS:
                    raise StemmaError(f"STEMMA_SERVE_{f.name.upper()}={raw!r} is not one of 1, 0, true, false")
                vals[f.name] = _BOOLS[raw.strip().lower()]
                continue
            try:
                vals[f.name] = raw if f.type in ("str", "str | None") else (float(raw) if "float" in f.type
                                                                            else int(raw))
            except ValueError:
                raise StemmaError(f"STEMMA_SERVE_{f.name.upper()}={raw!r} is not a number") from None
        if os.environ.get("STEMMA_ADMIN_TOKEN"):
            vals["admin_token"] = os.environ["STEMMA_ADMIN_TOKEN"]
        vals.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**vals)

    def check_bind(self) -> None:
        """Refuse a non-loopback bind without an admin token: admin endpoints would be open to the network."""
        if self.admin_token:
            return
        if not is_loopback(self.host):
            raise StemmaError(f"refusing to serve on {self.host} without an admin token: set STEMMA_ADMIN_TOKEN "
                              "(admin endpoints must not be open to the network) or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
