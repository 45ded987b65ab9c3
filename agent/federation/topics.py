"""Topic names under `fedsilo/v1/<federation>/` (PROTOCOL.md) and their parser.

Pure string functions; parsing is strict so a message on an unexpected topic is refused
before its payload is even looked at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.config import SITE_ID_PATTERN
from agent.federation.envelope import MAX_CHUNK_INDEX, MAX_ROUND

ROOT = "fedsilo/v1"


def root(federation: str) -> str:
    return f"{ROOT}/{federation}"


def coordinator_status(fed: str) -> str:
    return f"{root(fed)}/coordinator/status"


def coordinator_control(fed: str) -> str:
    return f"{root(fed)}/coordinator/control"


def coordinator_manifest(fed: str, rnd: int) -> str:
    return f"{root(fed)}/coordinator/round/{rnd}/manifest"


def coordinator_chunk(fed: str, rnd: int, index: int) -> str:
    return f"{root(fed)}/coordinator/round/{rnd}/chunk/{index}"


def coordinator_req(fed: str, site: str) -> str:
    return f"{root(fed)}/coordinator/req/{site}"


def site_status(fed: str, site: str) -> str:
    return f"{root(fed)}/site/{site}/status"


def site_metrics(fed: str, site: str) -> str:
    return f"{root(fed)}/site/{site}/metrics"


def site_manifest(fed: str, site: str, rnd: int) -> str:
    return f"{root(fed)}/site/{site}/update/{rnd}/manifest"


def site_chunk(fed: str, site: str, rnd: int, index: int) -> str:
    return f"{root(fed)}/site/{site}/update/{rnd}/chunk/{index}"


def site_req(fed: str, site: str) -> str:
    return f"{root(fed)}/site/{site}/req"


def site_doctor(fed: str, site: str) -> str:
    """`fedsilo doctor`'s probe: inside the site's own write ACL (site/<id>/#), read by no one
    (no agent subscribes to it), so publishing there tests the ACL and disturbs nothing."""
    return f"{root(fed)}/site/{site}/doctor"


def coordinator_subscriptions(fed: str) -> list[str]:
    r = root(fed)
    return [f"{r}/site/+/update/#", f"{r}/site/+/req", f"{r}/site/+/status"]


def site_subscriptions(fed: str, site: str) -> list[str]:
    r = root(fed)
    return [f"{r}/coordinator/round/#", f"{r}/coordinator/control", coordinator_req(fed, site),
            f"{r}/coordinator/status"]


@dataclass(frozen=True)
class Topic:
    """A parsed fedsilo topic. `kind` is one of: status, metrics, control, manifest, chunk,
    req. `site` is None for coordinator topics, except coordinator/req/<site>."""

    federation: str
    sender: str  # "coordinator" or a site id
    kind: str
    round: int | None = None
    index: int | None = None
    site: str | None = None


# ASCII digits only, no sign, no leading zero: `str.isdigit()` and `int()` also take '²', '①',
# '١' (Arabic-Indic), full-width digits, ' 1', '+1' and '1_0', and int('²') raises.
_NUMBER = re.compile(r"0|[1-9][0-9]{0,9}")


def _number(part: str, hi: int) -> int | None:
    """A topic level as a number in [0, hi], or None: never raises, whatever the level is."""
    if _NUMBER.fullmatch(part) is None:
        return None
    value = int(part)
    return value if value <= hi else None


def _round(part: str) -> int | None:
    return _number(part, MAX_ROUND)


def _index(part: str) -> int | None:
    return _number(part, MAX_CHUNK_INDEX)


def parse(topic: str) -> Topic | None:
    """Parse a topic under fedsilo/v1; None for anything that is not exactly a fedsilo topic.

    Never raises (any str): receivers drop what gives None before looking at the payload."""
    parts = topic.split("/")
    if len(parts) < 5 or parts[0] != "fedsilo" or parts[1] != "v1":
        return None
    fed, who, rest = parts[2], parts[3], parts[4:]
    if not SITE_ID_PATTERN.fullmatch(fed):
        return None
    if who == "coordinator":
        match rest:
            case ["status"] | ["control"]:
                return Topic(fed, "coordinator", rest[0])
            case ["round", r, "manifest"] if _round(r) is not None:
                return Topic(fed, "coordinator", "manifest", round=_round(r))
            case ["round", r, "chunk", k] if _round(r) is not None and _index(k) is not None:
                return Topic(fed, "coordinator", "chunk", round=_round(r), index=_index(k))
            case ["req", site] if SITE_ID_PATTERN.fullmatch(site):
                return Topic(fed, "coordinator", "req", site=site)
        return None
    # "coordinator" is no site's id (pki.RESERVED): as one it would make the sender ambiguous.
    if who == "site" and rest[0] != "coordinator" and SITE_ID_PATTERN.fullmatch(rest[0]):
        site, rest = rest[0], rest[1:]
        match rest:
            case ["status"] | ["metrics"] | ["req"]:
                return Topic(fed, site, rest[0], site=site)
            case ["update", r, "manifest"] if _round(r) is not None:
                return Topic(fed, site, "manifest", round=_round(r), site=site)
            case ["update", r, "chunk", k] if _round(r) is not None and _index(k) is not None:
                return Topic(fed, site, "chunk", round=_round(r), index=_index(k), site=site)
    return None
